"""Hugging Face MoE checkpoints: tiny random checkpoints of every supported family, built with
transformers in the test (no downloads), imported, compiled for the CPU, and the artifact's
logits compared with transformers' on the same token ids; plus the spec writer's round trip,
the CLI, sharded checkpoints and the one-line errors of damaged checkpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import mocompile  # noqa: E402
from mocompile import cli  # noqa: E402
from mocompile.dsl import build_model, load_spec, parse_spec  # noqa: E402
from mocompile.dsl.hf_import import import_checkpoint, spec_text  # noqa: E402
from mocompile.dsl.spec_writer import write_spec  # noqa: E402
from mocompile.runtime import load  # noqa: E402

from conftest import OnFirstUse  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, max_position_embeddings=256)

# One tiny config per family, each exercising that family's options (see the comments).
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        **SMALL, num_hidden_layers=2, num_key_value_heads=2, intermediate_size=96, num_local_experts=4,
        num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(  # qkv bias, gated shared expert, one dense layer
        **SMALL, num_hidden_layers=3, num_key_value_heads=2, intermediate_size=96, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[1]),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(  # per-head q/k norm, head_dim != hidden/heads, biases,
        **SMALL, num_hidden_layers=3, num_key_value_heads=2, head_dim=24, intermediate_size=96,  # MoE every
        num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, decoder_sparse_step=2,  # 2nd layer,
        norm_topk_prob=True, attention_bias=True, tie_word_embeddings=True),  # tied embeddings
    "olmoe": lambda: transformers.OlmoeConfig(  # q/k norm over whole projections
        **SMALL, num_hidden_layers=2, num_key_value_heads=4, intermediate_size=48, num_experts=8,
        num_experts_per_tok=2, pad_token_id=0, eos_token_id=1),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(  # MLA with q_lora, sigmoid group-limited routing with
        **SMALL, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=96,  # score bias, first layer dense
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4,
        topk_group=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(  # MLA without q_lora, v dim != nope dim, max group routing
        **SMALL, num_hidden_layers=2, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, routed_scaling_factor=1.5),
}
SHARDED = "deepseek_v3"  # saved in shards with an index file


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every norm, bias and routing decision shows in the logits
    (transformers initialises norms to 1 and biases, score corrections to 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if not p.is_floating_point() or "inv_freq" in name:
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (family, make) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(make()).eval()
        _randomize(model, seed=i)
        path = root / family
        model.save_pretrained(path, max_shard_size="100KB" if family == SHARDED else "1GB")
        out[family] = (path, model)
    return out


@pytest.fixture(scope="module")
def artifacts(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """family -> its artifact directory, compiled when a test first asks (see COMPILED_BY_DEFAULT)."""
    root = tmp_path_factory.mktemp("hf_artifacts")

    def compiled(family: str) -> Path:
        mocompile.compile(checkpoints[family][0], target="cpu", out_dir=root / family, batch=3, seq=6)
        return root / family

    return OnFirstUse(compiled)


def _hf_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


@pytest.mark.parametrize("family", list(CONFIGS))
def test_imported_model_matches_transformers(checkpoints, family: str) -> None:
    """Every family's import (config read as a spec, weights renamed and reshaped into the
    reference model) computes transformers' logits; the compiled artifact is checked against
    this reference model by every compile, and against transformers below."""
    from mocompile.dsl.hf_weights import build_hf_model

    path, model = checkpoints[family]
    ours = build_hf_model(import_checkpoint(path)).eval()
    ids = np.random.default_rng(7).integers(0, VOCAB, (3, 9), dtype=np.int64)
    ref = _hf_logits(model, ids)
    with torch.no_grad():
        got = ours(torch.from_numpy(ids)).numpy()
    assert got.shape == ref.shape == (3, 9, VOCAB)
    assert np.abs(got - ref).max() <= 1e-4, family
    assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero logits


# Compiled by default: a plain Mixtral (softmax top-k, no shared expert) and DeepSeek-V3 (latent
# attention, shared expert, a dense first layer, sigmoid group-limited routing with a score
# bias); the other families' compiles run with -m slow (each family's import is checked above).
COMPILED_BY_DEFAULT = ("mixtral", "deepseek_v3")


@pytest.mark.parametrize("family", [f if f in COMPILED_BY_DEFAULT else pytest.param(f, marks=pytest.mark.slow)
                                    for f in CONFIGS])
def test_artifact_matches_transformers(checkpoints, artifacts, family: str) -> None:
    _, model = checkpoints[family]
    art = load(artifacts[family])
    rng = np.random.default_rng(7)
    for batch in (1, 3):
        ids = rng.integers(0, VOCAB, (batch, 9), dtype=np.int64)
        if batch == 3:
            assert len({tuple(row) for row in ids}) == 3  # different sequences
        got = art.run({"text": ids})["logits"]
        ref = _hf_logits(model, ids)
        assert got.shape == ref.shape == (batch, 9, VOCAB)
        assert np.abs(got - ref).max() <= 1e-4, f"{family}, batch {batch}"
        assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero logits


def test_manifest_names_the_checkpoint(checkpoints, artifacts) -> None:
    path, _ = checkpoints["deepseek_v3"]
    manifest = json.loads((artifacts["deepseek_v3"] / "manifest.json").read_text())
    assert manifest["model"]["hf_architecture"] == "DeepseekV3ForCausalLM"
    assert manifest["model"]["hf_source"] == str(path.resolve())
    assert manifest["verification"]["max_rel_error"] <= 1e-4


def test_imported_specs_say_what_the_config_says(checkpoints) -> None:
    specs = {family: import_checkpoint(path).spec for family, (path, _) in checkpoints.items()}
    assert specs["qwen2_moe"].layers == ("sparse", "dense", "sparse")  # mlp_only_layers = [1]
    assert specs["qwen3_moe"].layers == ("dense", "sparse", "dense")  # decoder_sparse_step = 2
    assert specs["deepseek_v3"].layers == ("dense", "sparse", "sparse")  # first_k_dense_replace = 1
    q2, q3, ds3, ds2 = specs["qwen2_moe"], specs["qwen3_moe"], specs["deepseek_v3"], specs["deepseek_v2"]
    assert q2.qkv_bias and not q2.out_bias and q2.moes[0].shared_gate and q2.moes[0].shared_hidden == 48
    assert q3.qk_norm == "per_head" and q3.head_dim == 24 and q3.tie_embeddings and q3.out_bias
    assert specs["olmoe"].qk_norm == "whole"
    assert ds3.mla is not None and ds3.mla.q_lora_rank == 48 and ds3.moes[0].score_bias
    assert (ds3.moes[0].scoring, ds3.moes[0].n_group, ds3.moes[0].group_score) == ("sigmoid", 4, "top2_sum")
    assert ds2.mla.q_lora_rank == 0 and ds2.moes[0].group_score == "max" and not ds2.moes[0].normalize_topk
    text = spec_text(import_checkpoint(checkpoints["mixtral"][0]))
    assert "MixtralForCausalLM" in text and "# num_local_experts" in text


def test_written_specs_parse_back_to_the_same_spec(checkpoints) -> None:
    specs = [import_checkpoint(path).spec for path, _ in checkpoints.values()]
    specs += [load_spec(p) for p in sorted(EXAMPLES.glob("*.moe"))]
    for spec in specs:
        again = parse_spec(write_spec(spec, header=["a header"]), "written.moe")
        assert replace(again, source="") == replace(spec, source=""), spec.name


def test_sharded_checkpoint_has_an_index(checkpoints) -> None:
    path, _ = checkpoints[SHARDED]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3


def test_import_hf_writes_spec_and_weights_that_reproduce_the_model(checkpoints, tmp_path, capsys) -> None:
    path, model = checkpoints[SHARDED]
    spec_file, weights = tmp_path / "ds.moe", tmp_path / "ds.safetensors"
    assert cli.main(["import-hf", str(path), "-o", str(spec_file), "--weights", str(weights)]) == 0
    assert "DeepseekV3ForCausalLM" in capsys.readouterr().out
    ours = build_model(load_spec(spec_file), weights=weights)
    ids = np.random.default_rng(3).integers(0, VOCAB, (2, 11), dtype=np.int64)
    with torch.no_grad():
        got = ours(torch.from_numpy(ids)).numpy()
    assert np.abs(got - _hf_logits(model, ids)).max() <= 1e-4


def test_the_importer_needs_no_transformers(checkpoints, tmp_path) -> None:
    path, _ = checkpoints["qwen3_moe"]
    code = (
        "import sys\n"
        "from mocompile.cli import main\n"
        f"assert main(['import-hf', {str(path)!r}, '-o', {str(tmp_path / 'q.moe')!r}, "
        f"'--weights', {str(tmp_path / 'q.safetensors')!r}]) == 0\n"
        "assert 'transformers' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---- errors: one line, exit 1, naming what is wrong ------------------------------------------------
def _copy(checkpoints, family: str, tmp_path: Path) -> Path:
    dst = tmp_path / family
    shutil.copytree(checkpoints[family][0], dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _drop_tensor(path: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    del tensors[name]
    save_file(tensors, str(file), metadata={"format": "pt"})


def _add_tensor(path: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    save_file({**load_file(str(file)), name: torch.zeros(4, 4)}, str(file), metadata={"format": "pt"})


def _damage(kind: str, checkpoints, tmp_path: Path) -> Path:
    if kind == "missing shard":
        path = _copy(checkpoints, SHARDED, tmp_path)
        (path / "model-00003-of-00010.safetensors").unlink()
    elif kind == "missing tensor":
        path = _copy(checkpoints, "mixtral", tmp_path)
        _drop_tensor(path, "model.layers.1.self_attn.k_proj.weight")
    elif kind == "shape mismatch":
        path = _copy(checkpoints, "mixtral", tmp_path)
        _edit_config(path, intermediate_size=80)
    elif kind == "unknown model_type":
        path = _copy(checkpoints, "mixtral", tmp_path)
        _edit_config(path, model_type="jamba")
    elif kind == "rope scaling":
        path = _copy(checkpoints, "qwen3_moe", tmp_path)
        _edit_config(path, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    elif kind == "sliding window":
        path = _copy(checkpoints, "mixtral", tmp_path)
        _edit_config(path, sliding_window=16)
    elif kind == "qkv clipping":
        path = _copy(checkpoints, "olmoe", tmp_path)
        _edit_config(path, clip_qkv=8.0)
    elif kind == "unknown key":
        path = _copy(checkpoints, "mixtral", tmp_path)
        _edit_config(path, attn_logit_softcapping=30.0)
    elif kind == "qwen sliding window":
        path = _copy(checkpoints, "qwen2_moe", tmp_path)
        _edit_config(path, use_sliding_window=True, sliding_window=16)
    elif kind == "quantized":
        path = _copy(checkpoints, "mixtral", tmp_path)
        _edit_config(path, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    elif kind == "latent attention bias":
        path = _copy(checkpoints, "deepseek_v2", tmp_path)
        _edit_config(path, attention_bias=True)
    elif kind == "unknown tensor":
        path = _copy(checkpoints, "mixtral", tmp_path)
        _add_tensor(path, "model.layers.0.block_sparse_moe.experts.0.w4.weight")
    else:
        raise ValueError(kind)
    return path


ERRORS = {
    "missing shard": "missing shard model-00003-of-00010.safetensors (listed in model.safetensors.index.json",
    "missing tensor": "missing tensor 'model.layers.1.self_attn.k_proj.weight'",
    "shape mismatch": "has shape (96, 64), but config.json implies (80, 64)",
    "unknown model_type": "model_type: 'jamba' is not a supported MoE family",
    "rope scaling": "rope_parameters: rope type 'yarn' is not supported",
    "sliding window": "sliding_window: 16 is shorter than max_position_embeddings",
    "qkv clipping": "clip_qkv: 8.0 is not supported (clipping q/k/v activations)",
    "unknown key": "attn_logit_softcapping: unknown Mixtral config key",
    "qwen sliding window": "use_sliding_window: True is not supported (sliding-window attention is not supported)",
    "quantized": "quantization_config: {'quant_method': 'fp8', 'weight_block_size': [128, 128]} is not supported "
                 "(quantized checkpoints are not supported)",
    "latent attention bias": "attention_bias: True is not supported (biased latent-attention projections)",
    "unknown tensor": "unexpected tensor 'model.layers.0.block_sparse_moe.experts.0.w4.weight'; the importer does "
                      "not know what it does in a Mixtral model",
}


@pytest.mark.parametrize("kind", list(ERRORS))
def test_damaged_checkpoints_fail_in_one_line(kind: str, checkpoints, tmp_path, capsys) -> None:
    path = _damage(kind, checkpoints, tmp_path)
    assert cli.main(["import-hf", str(path), "-o", str(tmp_path / "x.moe")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mocompile: error: ") and err.count("\n") == 1, err
    assert ERRORS[kind] in err, err
    assert not (tmp_path / "x.moe").exists()


def test_compile_of_a_damaged_checkpoint_fails_without_traceback(checkpoints, tmp_path, capsys) -> None:
    path = _damage("missing shard", checkpoints, tmp_path)
    assert cli.main(["compile", str(path), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # after the progress lines
    assert last.startswith("mocompile: error: ") and "missing shard" in last
    assert sum(line.startswith("mocompile:") for line in err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_layer_plans_of_the_families(tmp_path) -> None:
    """Which layers are MoE, from the config keys alone (no weights needed)."""
    def layers(model_type: str, **config) -> tuple[str, ...]:
        base = dict(model_type=model_type, vocab_size=32, hidden_size=16, num_attention_heads=2,
                    num_hidden_layers=6, max_position_embeddings=64, num_experts_per_tok=1, intermediate_size=24)
        path = tmp_path / model_type
        path.mkdir(exist_ok=True)
        (path / "config.json").write_text(json.dumps({**base, **config}))
        return tuple(name[0] for name in import_checkpoint(path).spec.layers)

    qwen = dict(num_experts=2, moe_intermediate_size=8)
    assert layers("qwen3_moe", **qwen, decoder_sparse_step=2, mlp_only_layers=[3]) == tuple("dsddds")
    assert layers("qwen2_moe", **qwen, mlp_only_layers=[0, 5]) == tuple("dssssd")
    deepseek = dict(n_routed_experts=2, moe_intermediate_size=8, kv_lora_rank=8, q_lora_rank=None,
                    qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_group=1, topk_group=1)
    assert layers("deepseek_v3", **deepseek, first_k_dense_replace=2) == tuple("ddssss")
    assert layers("deepseek_v2", **deepseek, first_k_dense_replace=1, moe_layer_freq=2) == tuple("ddsdsd")


def test_kernels_of_the_new_ops_are_scheduled(checkpoints) -> None:
    """Latent attention, per-head norms and the biased router lower to parallel, vectorized kernels."""
    from tvm import tirx

    from mocompile.backends.tvm_cpu import lower
    from mocompile.backends.tvm_cpu.schedule import loop_kinds
    from mocompile.frontend import lower_source, source_for

    wanted = {"deepseek_v3": ("latent_keys", "latent_attention"), "qwen3_moe": ("rmsnorm_h24",)}
    for family, prefixes in wanted.items():
        program = lower(lower_source(source_for(checkpoints[family][0], None, None, 0)))
        funcs = {gv.name_hint: f for gv, f in program.mod.functions.items() if isinstance(f, tirx.PrimFunc)}
        for prefix in prefixes:
            names = [n for n in funcs if n.startswith(prefix)]
            assert names, (family, prefix, sorted(funcs))
            for name in names:
                kinds = loop_kinds(funcs[name])
                assert int(tirx.ForKind.PARALLEL) in kinds and int(tirx.ForKind.VECTORIZED) in kinds, name
