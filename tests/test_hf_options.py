"""Hugging Face import options the family fixtures of test_hf_import.py leave at their
defaults, each on a tiny random checkpoint built with transformers here (no downloads):
`hidden_act = gelu` with bf16 weights (compiled, the artifact against transformers), fp16
weights, DeepSeek-V3 `rope_interleave = false`, DeepSeek-V2 `topk_method = greedy` and
DeepSeek-V3's multi-token-prediction layers (each through `mocompile import-hf`, the
written spec and weights against transformers); and `inspect` / `check-isolation` on a
checkpoint. Where an option could go unnoticed on random weights, the test first shows that
transformers' logits change with it on the same inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import mocompile  # noqa: E402
from mocompile import cli  # noqa: E402
from mocompile.cli import EXIT_NOT_ISOLATED  # noqa: E402
from mocompile.dsl import build_model, load_spec  # noqa: E402
from mocompile.dsl.hf_import import import_checkpoint  # noqa: E402
from mocompile.runtime import load  # noqa: E402
from test_hf_import import CONFIGS, SMALL, VOCAB, _randomize  # noqa: E402  (the family configs and their weights)

IDS = np.random.default_rng(5).integers(0, VOCAB, (2, 11), dtype=np.int64)


def _mixtral(**extra):
    return transformers.MixtralConfig(**SMALL, num_hidden_layers=2, num_key_value_heads=2, intermediate_size=96,
                                      num_local_experts=4, num_experts_per_tok=2, **extra)


def _deepseek_v3(**extra):
    config = CONFIGS["deepseek_v3"]()
    for k, v in extra.items():
        setattr(config, k, v)
    return config


def _deepseek_v2(**extra):
    config = CONFIGS["deepseek_v2"]()
    for k, v in extra.items():
        setattr(config, k, v)
    return config


def _logits(model: torch.nn.Module, ids: np.ndarray = IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


def _save(config, path: Path, seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random checkpoint at `path` in `dtype`; returns transformers' model loaded from it in
    fp32 (the stored weights computed in fp32, what the import promises; loading, not casting
    the model back, so that buffers such as rope frequencies are not rounded too)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    _randomize(model, seed)
    model.to(dtype).save_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _with_config(model: torch.nn.Module, **changes) -> torch.nn.Module:
    """The same weights under a config with `changes` (to show an option changes the logits)."""
    config = type(model.config).from_dict({**model.config.to_dict(), **changes})
    other = transformers.AutoModelForCausalLM.from_config(config).eval()
    other.load_state_dict(model.state_dict())
    return other


def _import(path: Path, out: Path, capsys) -> torch.nn.Module:
    """`mocompile import-hf CKPT -o SPEC --weights W`, then the reference model of what it wrote."""
    spec, weights = out / f"{path.name}.moe", out / f"{path.name}.safetensors"
    assert cli.main(["import-hf", str(path), "-o", str(spec), "--weights", str(weights)]) == 0
    capsys.readouterr()
    return build_model(load_spec(spec), weights=weights)


def _ours(model: torch.nn.Module, ids: np.ndarray = IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).numpy()


@pytest.fixture(scope="module")
def gelu_bf16(tmp_path_factory):
    """Mixtral with hidden_act = gelu, saved in bfloat16, compiled (batch 1, 3 positions)."""
    root = tmp_path_factory.mktemp("gelu_bf16")
    model = _save(_mixtral(hidden_act="gelu"), root / "ckpt", seed=1, dtype=torch.bfloat16)
    art = mocompile.compile(root / "ckpt", out_dir=root / "art", batch=1, seq=3)
    return root / "ckpt", model, art


def _stored_dtypes(path: Path) -> set[str]:
    from safetensors import safe_open

    out = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            out |= {str(f.get_tensor(k).dtype) for k in f.keys()}
    return out


def test_gelu_bf16_checkpoint_compiles_and_matches_transformers(gelu_bf16) -> None:
    path, model, art = gelu_bf16
    assert _stored_dtypes(path) == {"torch.bfloat16"}
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    ckpt = import_checkpoint(path)
    assert ckpt.spec.moes[0].activation == "gelu"
    # hidden_act matters on these inputs: the same weights under silu give other logits
    ref = _logits(model)
    assert np.abs(_logits(_with_config(model, hidden_act="silu")) - ref).max() > 1e-2
    got = load(art.path).run({"text": IDS})["logits"]
    assert got.shape == ref.shape and np.abs(ref).max() > 0.5
    assert np.abs(got - ref).max() <= 1e-4


def test_fp16_checkpoint_is_computed_in_fp32(tmp_path, capsys) -> None:
    model = _save(CONFIGS["olmoe"](), tmp_path / "olmoe16", seed=2, dtype=torch.float16)
    assert _stored_dtypes(tmp_path / "olmoe16") == {"torch.float16"}
    ours = _import(tmp_path / "olmoe16", tmp_path, capsys)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    ref = _logits(model)
    assert np.abs(_ours(ours) - ref).max() <= 1e-4 and np.abs(ref).max() > 0.5


def test_deepseek_v3_rope_halves_are_not_permuted(tmp_path, capsys) -> None:
    """rope_interleave = false: the checkpoint already rotates halves, so the importer copies
    the rotary rows as they are (with true it de-interleaves them)."""
    model = _save(_deepseek_v3(rope_interleave=False), tmp_path / "ds3", seed=3)
    assert not import_checkpoint(tmp_path / "ds3").rope_interleaved
    ref = _logits(model)
    assert np.abs(_logits(_with_config(model, rope_interleave=True)) - ref).max() > 1e-2
    ours = _import(tmp_path / "ds3", tmp_path, capsys)
    assert "de-interleaved" not in (tmp_path / "ds3.moe").read_text()
    assert np.abs(_ours(ours) - ref).max() <= 1e-4


def test_deepseek_v2_greedy_routing_ignores_the_groups(tmp_path, capsys) -> None:
    """topk_method = greedy: plain top-k over all experts, whatever n_group / topk_group say
    (one group of 4 would hold both of a token's experts under group_limited_greedy)."""
    model = _save(_deepseek_v2(topk_method="greedy", topk_group=1), tmp_path / "ds2", seed=4)
    config = json.loads((tmp_path / "ds2" / "config.json").read_text())
    assert (config["topk_method"], config["n_group"], config["topk_group"]) == ("greedy", 4, 1)
    moe = import_checkpoint(tmp_path / "ds2").spec.moes[0]
    assert (moe.n_group, moe.topk_group) == (1, 1)
    ref = _logits(model)
    assert np.abs(_logits(_with_config(model, topk_method="group_limited_greedy")) - ref).max() > 1e-2
    ours = _import(tmp_path / "ds2", tmp_path, capsys)
    assert np.abs(_ours(ours) - ref).max() <= 1e-4


def _add_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    save_file({**load_file(str(file)), **tensors}, str(file), metadata={"format": "pt"})


MTP_TENSORS = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.head.weight",
               "self_attn.kv_a_proj_with_mqa.weight", "mlp.experts.0.gate_proj.weight")


def test_deepseek_v3_multi_token_prediction_layers_are_skipped(tmp_path, capsys) -> None:
    """DeepSeek-V3 checkpoints carry num_nextn_predict_layers extra layers numbered after the
    last one (transformers does not build them); the import skips them, and the same tensors
    inside the model's layers are refused."""
    model = _save(_deepseek_v3(num_nextn_predict_layers=1), tmp_path / "ds3", seed=5)
    n = model.config.num_hidden_layers
    assert json.loads((tmp_path / "ds3" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    extra = {f"model.layers.{n}.{name}": torch.randn(8, 8) for name in MTP_TENSORS}
    _add_tensors(tmp_path / "ds3", extra)
    ours = _import(tmp_path / "ds3", tmp_path, capsys)
    assert len(load_spec(tmp_path / "ds3.moe").layers) == n
    assert np.abs(_ours(ours) - _logits(model)).max() <= 1e-4
    _add_tensors(tmp_path / "ds3", {"model.layers.0.enorm.weight": torch.randn(8)})
    assert cli.main(["import-hf", str(tmp_path / "ds3"), "-o", str(tmp_path / "again.moe")]) == 1
    err = capsys.readouterr().err
    assert "unexpected tensor 'model.layers.0.enorm.weight'" in err and err.count("\n") == 1


# ---- inspect and check-isolation on a checkpoint ---------------------------------------------------
def test_inspect_a_checkpoint_counts_its_parameters(gelu_bf16, capsys) -> None:
    path, model, _ = gelu_bf16
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "hidden 64, heads 4 (kv 2, dim 16), 2 layers: sparse sparse" in out
    assert "moe sparse: 4 experts, top-2, hidden 96" in out
    total = next(int(line.split()[-1].replace(",", "")) for line in out.splitlines() if line.split()[0] == "total")
    assert total == sum(p.numel() for p in model.parameters())  # what transformers holds, counted from config.json
    assert cli.main(["inspect", str(path), "--ir"]) == 0
    ir = capsys.readouterr().out
    assert "experts(" in ir and "activation=gelu" in ir
    assert cli.main(["inspect", str(path), "--variant", "half"]) == 1
    assert "no variant 'half'" in capsys.readouterr().err


def test_check_isolation_on_a_checkpoint(gelu_bf16, capsys) -> None:
    path, _, _ = gelu_bf16
    assert cli.main(["check-isolation", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "isolated" and report["inputs"] == {"text": "axis 0"}
    leak = "quantize(w=int8,a=int8,dynamic=tensor,allow_batch_leak=true)"
    assert cli.main(["check-isolation", str(path), "--passes", leak]) == EXIT_NOT_ISOLATED
    out = capsys.readouterr().out
    assert "LEAKS" in out and "quantize_act at layers.0" in out and "witness:" in out
    assert cli.main(["check-isolation", str(path), "--variant", "half"]) == 1
    assert "has no variants (drop --variant)" in capsys.readouterr().err
