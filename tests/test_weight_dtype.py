"""bf16 and fp16 weights: a bf16 Hugging Face checkpoint (a tiny Mixtral written by transformers
in the test, no downloads) compiles by default to an artifact whose matmul and embedding
weights stay bf16, widened to float32 inside the kernels; --dtype fp16 / bf16 / fp32 on
checkpoints and specs; the one-line refusals.

Tolerances. The artifact computes in float32 with the weights exactly as stored, so against
transformers run in float32 on the same bf16 weights it must agree as tightly as every fp32
artifact does (1e-4). transformers' own bf16 model also rounds every activation to bf16
(unit roundoff u = 2^-8, about a dozen roundings per layer); its logits drift from the
float32 computation by about 1-2% of the largest logit here, so the artifact is held to
8u = 3.1% of the largest logit, and to no more than transformers' own float32-vs-bf16 gap.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import mocompile  # noqa: E402
from mocompile import cli  # noqa: E402
from mocompile.errors import MocompileError  # noqa: E402
from mocompile.ir.ops.widen import from_bits, to_bits  # noqa: E402
from mocompile.runtime import load  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VOCAB = 128
BF16_U = 2.0 ** -8  # bfloat16's unit roundoff (8 significant bits)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 2-layer Mixtral with 4 experts saved in bfloat16 (weights large enough that norms and
    routing show in the logits)."""
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4,
                                        max_position_embeddings=256, num_hidden_layers=2, num_key_value_heads=2,
                                        intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if p.dim() == 1 else noise / p.shape[-1] ** 0.5)
    path = tmp_path_factory.mktemp("bf16") / "mixtral"
    model.to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def artifacts(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The checkpoint compiled with no --dtype (bf16 by default) and with --dtype fp32."""
    root = tmp_path_factory.mktemp("bf16_artifacts")
    mocompile.compile(checkpoint, out_dir=root / "default", batch=3, seq=6)
    mocompile.compile(checkpoint, out_dir=root / "fp32", batch=3, seq=6, dtype="fp32")
    return {"bf16": root / "default", "fp32": root / "fp32"}


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _transformers_logits(checkpoint: Path, dtype: torch.dtype, ids: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


def test_bf16_checkpoint_keeps_bf16_weights(artifacts) -> None:
    bf16, fp32 = _manifest(artifacts["bf16"]), _manifest(artifacts["fp32"])
    assert (bf16["weight_dtype"], fp32["weight_dtype"]) == ("bfloat16", "float32")
    layouts = bf16["program"]["weight_layouts"]
    # every matmul weight (panels: two bf16 inputs per uint32 word) and the embedding table are
    # 16-bit; only norms stay float32
    sixteen = [w for w in layouts if w["dtype"] == "uint16" or w.get("store") == "k_pairs"]
    assert all(w.get("store") == "k_pairs" and w["dtype"] == "uint32" for w in layouts if w["kind"] != "identity")
    assert any("embed" in w["name"] for w in sixteen) and any(w["kind"] == "expert_glu_panels" for w in sixteen)
    assert {w["name"] for w in layouts if w["dtype"] == "float32"} <= {w["name"] for w in layouts if "norm" in w["name"]}
    ratio = (artifacts["bf16"] / "weights.safetensors").stat().st_size / (artifacts["fp32"] / "weights.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55, ratio
    assert bf16["verification"]["status"] == "verified" and bf16["verification"]["max_rel_error"] <= 1e-4
    # the checkpoint's values are bf16 already: storing them so rounds nothing
    report = next(r for r in bf16["passes"] if r["pass"] == "weight-dtype(dtype=bf16)")
    assert report["total"]["max_rounding"] == 0.0 and bf16["drift_from_fp32"]["max_rel_error"] <= 1e-4


def test_bf16_artifact_matches_transformers(checkpoint, artifacts) -> None:
    art = load(artifacts["bf16"])
    ids = np.random.default_rng(7).integers(0, VOCAB, (3, 9), dtype=np.int64)
    got = art.run({"text": ids})["logits"]
    fp32_on_bf16 = _transformers_logits(checkpoint, torch.float32, ids)
    pure_bf16 = _transformers_logits(checkpoint, torch.bfloat16, ids)
    assert np.abs(fp32_on_bf16).max() > 0.5  # not a comparison of near-zero logits
    assert np.abs(got - fp32_on_bf16).max() <= 1e-4
    gap = np.abs(fp32_on_bf16 - pure_bf16).max()
    assert gap > 0  # transformers' bf16 really rounds activations
    assert np.abs(got - pure_bf16).max() <= min(8 * BF16_U * np.abs(pure_bf16).max(), gap + 1e-4)


def test_cached_decode_and_isolation_of_bf16_artifact(artifacts) -> None:
    from mocompile.artifact_isolation import check_artifact

    manifest = _manifest(artifacts["bf16"])
    decode = manifest["decode_verification"]
    assert decode["max_rel_error"] <= 1e-4 and decode["new_tokens"] > 0
    art = load(artifacts["bf16"])
    assert art.can_decode
    report = check_artifact(art, batch=3, seq=8, seed=0)
    assert report.verdict == "isolated"
    assert all(d["bitwise_identical"] for d in (report.differential, report.differential["cached_step"]))


def test_spec_compiles_with_fp16_weights(tmp_path, capsys) -> None:
    out = tmp_path / "fp16"
    assert cli.main(["compile", str(EXAMPLES / "mixtral_tiny.moe"), "-o", str(out), "--dtype", "fp16"]) == 0
    printed = capsys.readouterr().out
    assert "(weights float16)" in printed and "cached decoding verified" in printed
    assert "prompt prefill (last position only) verified: equal bit for bit" in printed
    manifest = _manifest(out)
    assert manifest["weight_dtype"] == "float16"
    report = next(r for r in manifest["passes"] if r["pass"] == "weight-dtype(dtype=fp16)")
    assert 0 < report["total"]["max_rounding"] < 1e-2  # a float32 model's weights were rounded
    assert manifest["verification"]["max_rel_error"] <= 1e-4
    assert 0 < manifest["drift_from_fp32"]["max_rel_error"] < 1e-2


def test_rounding_matches_torch() -> None:
    x = np.concatenate([np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 10,
                        np.float32([0.0, -0.0, 1e-40, 3.0e38, np.inf, -np.inf, 1 + 2 ** -8, 1 + 3 * 2 ** -8])])
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        want = torch.from_numpy(x).to(torch_dtype).float().numpy()
        got = from_bits(to_bits(x, dtype), dtype)
        assert np.array_equal(got, want, equal_nan=True), dtype
    assert np.isnan(from_bits(to_bits(np.float32([np.nan]), "bfloat16"), "bfloat16")).all()


@pytest.mark.parametrize("args, message", [
    (["--passes", "contextual-sparsity(keep=0.5)", "--dtype", "bf16"], "--dtype bf16: contextual-sparsity(keep=0.5) in"),
    (["--target", "mlir", "--dtype", "bf16"], "--dtype bf16: the mlir target does not read bfloat16 weights"),
    (["--passes", "weight-dtype(dtype=bf16)", "--dtype", "fp16"], "--dtype fp16: weight-dtype(dtype=bf16) in the"),
])
def test_refusals_are_one_line(tmp_path, capsys, args, message) -> None:
    out = tmp_path / "never"
    assert cli.main(["compile", str(EXAMPLES / "mixtral_tiny.moe"), "-o", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mocompile: error: {message}") and err.count("\n") == 1, err
    assert not out.exists()


def test_bad_dtype_value_is_refused(tmp_path) -> None:
    with pytest.raises(MocompileError, match=r"^--dtype must be one of bf16, fp16, fp32 \(got 'bf8'\)$"):
        mocompile.compile(EXAMPLES / "mixtral_tiny.moe", out_dir=tmp_path / "x", dtype="bf8")


@pytest.fixture(scope="module")
def mixtral_graph():
    from mocompile.frontend import lower_source, source_for

    return lower_source(source_for(EXAMPLES / "mixtral_tiny.moe", None, None, 0))


def test_a_target_without_16_bit_reads_refuses_a_bf16_graph(mixtral_graph) -> None:
    """A pipeline written by hand (no --dtype) reaches the target's own check, which names the
    format (the fpga target reads float32 and low-bit weights only); the GPU targets read it."""
    from mocompile.backends.base import get_backend
    from mocompile.pass_manager import PassManager

    graph, _ = PassManager("weight-dtype(dtype=bf16)").run(mixtral_graph)
    why = get_backend("fpga").unsupported(graph)
    assert why is not None and why.startswith("the fpga target does not read bfloat16 weights")
    assert get_backend("cuda").unsupported(graph) is None and get_backend("opencl").unsupported(graph) is None


@pytest.mark.parametrize("pipeline, stored", [("", "float32"), ("weight-dtype(dtype=fp16)", "float16"),
                                              ("quantize(w=int4,group=32,calib=1)", "float32+int4"),
                                              ("quantize(w=int8,router=true,calib=1)", "float32+int8")])
def test_manifest_weight_dtype_says_how_weights_are_stored(mixtral_graph, pipeline: str, stored: str) -> None:
    """What the manifest records, from the graph: a default int4 pipeline leaves the router and
    the embedding float32; with the router quantized only the embedding table is."""
    from mocompile.dtype_option import stored_weight_dtype
    from mocompile.pass_manager import PassManager

    assert stored_weight_dtype(PassManager(pipeline).run(mixtral_graph)[0]) == stored


@pytest.mark.parametrize("dtype, widening", [("bf16", r"vpslld\s+\$16, %ymm"),
                                             ("fp16", r"vcvtph2ps\s.*%ymm")])
def test_kernels_widen_in_vector_registers(dtype: str, widening: str) -> None:
    """Cross-compiled for an AVX2 CPU whatever this host is: the matmul and the embedding
    gather widen their 16-bit weights eight lanes at a time (bf16: the matmul's paired words
    shifted by 16 or masked, the gather's rows zero-extended and shifted; fp16: F16C), never
    one value at a time."""
    import re

    from mocompile.backends.tvm_cpu import CpuTarget, build, lower
    from mocompile.ir.graph import Graph
    from mocompile.ir.types import TensorType
    from mocompile.pass_manager import PassManager

    g = Graph("widen")
    ids = g.add_input("ids", TensorType(("rows",), "int64"))
    rng = np.random.default_rng(0)
    table = g.add_param("table", rng.standard_normal((100, 64)).astype(np.float32))
    w = g.add_param("w", rng.standard_normal((48, 64)).astype(np.float32))
    g.outputs = [g.add("linear", g.add("embedding", ids, table), w)]
    g, _ = PassManager(f"weight-dtype(dtype={dtype})").run(g)
    program = lower(g, target=CpuTarget.parse("cpu -mcpu=haswell"))
    assert {w.dtype for w in program.weights} == ({"uint16", "uint32"} if dtype == "bf16" else {"uint16"})
    asm = build(program).exe.mod.imports[0].inspect_source("asm")
    assert re.search(widening, asm), dtype
    # no value converted one at a time: no call of the half-precision helpers (which TVM's module
    # carries whether or not anything calls them), no scalar conversion
    assert not re.search(r"call\w*\s+\S*(extendhfsf2|truncsfhf2)", asm) and "vcvtsh2ss" not in asm


def test_the_bf16_default_stays_float32_for_expert_parallel_pieces(checkpoint) -> None:
    """--ep's expert programs read float32 weights: a bf16 checkpoint compiled with it defaults
    to float32 storage instead of failing on the widened experts; without --ep it keeps bf16."""
    from mocompile.backends.base import get_backend
    from mocompile.dtype_option import resolve_dtype

    cpu = get_backend("cpu")
    assert resolve_dtype(checkpoint, None, "", cpu) == "weight-dtype(dtype=bf16)"
    assert resolve_dtype(checkpoint, None, "", cpu, float_experts=True) == ""


def test_a_quantized_bf16_checkpoint_keeps_the_weights_quantize_leaves_float_bf16(checkpoint, tmp_path) -> None:
    """quantize stores the matmul weights it quantizes as codes; weight-dtype after it stores
    the rest (the embedding table, the router) as the checkpoint has them, not widened to
    float32. Explicit --dtype fp16 does the same in float16, and a float32 model's compile
    without --dtype keeps them float32."""
    from mocompile.backends.base import get_backend
    from mocompile.dtype_option import resolve_dtype

    cpu, q = get_backend("cpu"), "quantize(w=int8)"
    assert resolve_dtype(checkpoint, None, q, cpu) == f"{q},weight-dtype(dtype=bf16)"
    assert resolve_dtype(checkpoint, "fp16", q, cpu) == f"{q},weight-dtype(dtype=fp16)"
    assert resolve_dtype(EXAMPLES / "mixtral_tiny.moe", None, q, cpu) == q
    out = tmp_path / "q"
    mocompile.compile(checkpoint, out_dir=out, batch=2, seq=6, passes=q)
    manifest = _manifest(out)
    assert manifest["weight_dtype"] == "bfloat16+int8"
    layouts = {w["name"]: w for w in manifest["program"]["weight_layouts"]}
    embed = [w for name, w in layouts.items() if "embed" in name]
    assert embed and all(w["dtype"] == "uint16" for w in embed)
    assert any(".q8" in name for name in layouts)  # the codes
    router = [w for name, w in layouts.items() if "router" in name]
    assert router and all(w.get("store") == "k_pairs" for w in router)  # bf16, two per word
    report = next(r for r in manifest["passes"] if r["pass"] == "weight-dtype(dtype=bf16)")
    assert report["total"]["tensors"] >= 2 and report["total"]["max_rounding"] == 0.0  # embedding and router
    assert manifest["verification"]["status"] == "verified"


def test_the_streamed_memory_estimate_counts_the_stored_format() -> None:
    """What a streamed compile is refused on: the bytes per parameter the pipeline's weights
    are stored in (16-bit weights half of float32; int4 in groups of 32 with float16 scales,
    Q4_0's 4.5 bits)."""
    from mocompile.pass_manager import PassManager
    from mocompile.streamed_compile import artifact_bytes_per_param

    assert artifact_bytes_per_param(PassManager("")) == 4.0
    assert artifact_bytes_per_param(PassManager("weight-dtype(dtype=bf16)")) == 2.0
    assert artifact_bytes_per_param(PassManager("quantize(w=int4,group=32),weight-dtype(dtype=bf16)")) == 4.5 / 8
    assert artifact_bytes_per_param(PassManager("quantize(w=int8)")) == 1.0


@pytest.mark.parametrize("k", [64, 63])
def test_bf16_matmul_panels_pair_two_inputs_per_word(k: int) -> None:
    """bf16 matmul panels hold inputs 2i and 2i+1 in one uint32 word (an even input width), so
    an AVX-512 kernel widens 32 weights of one 64-byte load by a shift and a mask, with no
    zero-extension shuffle; an odd width keeps one input per uint16. Either way the artifact
    computes the interpreter's result."""
    import re

    from mocompile.backends.tvm_cpu import CpuTarget, build, lower
    from mocompile.ir.graph import Graph
    from mocompile.ir.interpreter import run
    from mocompile.ir.types import TensorType
    from mocompile.pass_manager import PassManager

    g = Graph("pairs")
    x = g.add_input("x", TensorType(("rows", k), "float32"))
    w = g.add_param("w", np.random.default_rng(4).standard_normal((48, k)).astype(np.float32))
    g.outputs = [g.add("linear", x, w)]
    g, _ = PassManager("weight-dtype(dtype=bf16)").run(g)
    paired = k % 2 == 0
    asm = build(lower(g, target=CpuTarget.parse("cpu -mcpu=znver4"))).exe.mod.imports[0].inspect_source("asm")
    assert bool(re.search(r"vpandq?\s.*%zmm", asm)) == paired and bool(re.search(r"vpmovzxwd\s", asm)) != paired
    program = lower(g, target=CpuTarget.host())
    assert {w.dtype for w in program.weights} == {"uint32" if paired else "uint16"}
    xs = np.random.default_rng(5).standard_normal((3, k)).astype(np.float32)
    got = build(program).run({"x": xs})[g.outputs[0].name]
    np.testing.assert_allclose(got, run(g, {"x": xs})[g.outputs[0].name], rtol=1e-5, atol=1e-5)
