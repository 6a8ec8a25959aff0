"""Building blocks of the spec-language tests (test_dsl.py, test_dsl_errors.py): a model block
from body lines, a small valid model, and the examples' folder."""

from __future__ import annotations

from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def model(*body: str, name: str = "m") -> str:
    """A model block with one body line per argument, indented by 4 (so body line i is file line i + 2)."""
    return f"model {name} {{\n" + "".join(f"    {line}\n" for line in body) + "}\n"


HEAD = ("hidden = 64", "heads = 4", "max_seq = 32", "modality text { vocab = 100 }")
MOE = "moe e { experts = 4  top_k = 2  expert_hidden = 32 }"
LAYERS = "layers = [e]"


def ok(*extra: str) -> str:
    """A valid model plus extra body lines."""
    return model(*HEAD, MOE, LAYERS, *extra)
