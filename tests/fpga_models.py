"""The examples at a reduced size for the fpga target's tests: one layer of each kind the
example has (the C simulation's g++ build grows with the kernels instantiated), narrower
where the example allows; everything else (routing, scoring, groups, latent attention,
modalities) as the example has it."""

from __future__ import annotations

from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

REDUCTIONS = {
    "mixtral_tiny": [("layers = [sparse] * 2", "layers = [sparse]"), ("hidden   = 128", "hidden   = 64"),
                     ("expert_hidden  = 256", "expert_hidden  = 64"), ("vocab = 512", "vocab = 64")],
    "deepseek_tiny": [("layers = [dense] + [fine] * 2", "layers = [dense, fine]"), ("hidden   = 128", "hidden   = 64"),
                      ("ffn dense { hidden = 384", "ffn dense { hidden = 96"), ("vocab = 512", "vocab = 64")],
    "latent_tiny": [("layers = [dense] + [fine] * 2", "layers = [dense, fine]"), ("vocab = 512", "vocab = 64"),
                    ("ffn dense { hidden = 256 }", "ffn dense { hidden = 64 }")],
    "unified_tiny": [("layers = [dense, mm] * 2", "layers = [dense, mm]"), ("vocab = 512", "vocab = 64"),
                     ("expert_hidden  = 128", "expert_hidden  = 32"), ("ffn dense { hidden = 256 }", "ffn dense { hidden = 64 }"),
                     ("layers  = [0, 1]", "layers  = [0]"), ("layers = 2 ", "layers = 1 ")],
}


def reduced_spec(name: str, folder: Path) -> Path:
    """The example `name` reduced (REDUCTIONS), written to folder/name.moe."""
    text = (EXAMPLES / f"{name}.moe").read_text()
    for old, new in REDUCTIONS[name]:
        assert old in text, f"{name}.moe no longer has {old!r}"
        text = text.replace(old, new)
    path = folder / f"{name}.moe"
    path.write_text(text)
    return path
