"""The mlir target (--target "mlir --dialect ..."): the IR after the pass pipeline exported
through torch-mlir, compiled by IREE and run through runtime.load with the CPU artifact's API.

The default tests use a small spec (one MoE layer, 4 experts, 32 wide) so that an export
takes seconds; every example in every dialect is under -m slow."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch_mlir")
pytest.importorskip("iree.compiler")

import mocompile  # noqa: E402
from mocompile import cli, runtime  # noqa: E402
from mocompile.backends.base import get_backend  # noqa: E402
from mocompile.errors import MocompileError  # noqa: E402
from mocompile.frontend import lower_source, source_for  # noqa: E402
from mocompile.ir.interpreter import run as interpret  # noqa: E402
from mocompile.kv_cache import cached_graph  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SMALL = """
model small_moe {
    hidden = 32  heads = 2  kv_heads = 1  max_seq = 64  norm = rmsnorm  norm_eps = 1e-5  rope_theta = 10000.0
    modality text { vocab = 64 }
    ffn dense { hidden = 48  activation = silu  gated = true }
    moe sparse { experts = 4  top_k = 2  expert_hidden = 32  activation = silu  gated = true
                 scoring = softmax  normalize_topk = true }
    layers = [dense, sparse]
}
"""


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "small_moe.moe"
    path.write_text(SMALL)
    return path


def _compile(spec: Path, out: Path, target: str, passes: str = "") -> object:
    return mocompile.compile(spec, target=target, passes=passes, out_dir=out, batch=2, seq=3)


@pytest.mark.parametrize("dialect", ["linalg", "stablehlo", pytest.param("torch", marks=pytest.mark.slow)])
def test_iree_runs_the_export_and_matches_eager_for_main_and_cached_decoding(spec, tmp_path, dialect) -> None:
    art = _compile(spec, tmp_path / dialect, f"mlir --dialect {dialect}")
    m = art.manifest
    assert m["program"]["kind"] == "iree-vmfb" and m["program"]["functions"] == ["main", "step"]
    assert m["program"]["vmfb"] == "model.vmfb" and "static_shapes" not in m["program"]
    assert m["verification"]["status"] == "verified" and m["verification"]["reference"] == "eager torch model"
    assert m["decode_verification"]["max_rel_error"] <= 1e-4
    assert "sparse" in m["program"]["export_notes"]["experts"]
    loaded = runtime.load(tmp_path / dialect)  # the manifest's program kind picks IREE's loader
    assert type(loaded).__name__ == "IreeArtifact"
    x = runtime.random_inputs(loaded.signature, 3, 5, seed=1)  # shapes the compile never checked
    graph = lower_source(source_for(spec, None, None, 0))
    want = interpret(graph, x)["logits"]
    np.testing.assert_allclose(loaded.run(x)["logits"], want, rtol=0, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(loaded.run_cached(x, prompt=2)["logits"], want, rtol=0, atol=1e-4 * np.abs(want).max())
    cache = loaded.new_cache(3, 8)
    loaded.step({"text": x["text"][:, :4]}, cache)
    assert cache.length == 4
    with pytest.raises(ValueError, match="more do not fit"):
        loaded.step({"text": x["text"]}, cache)
    assert loaded.generate(x["text"][:, :2], 3).shape == (3, 3)
    if dialect == "stablehlo":  # dynamic shapes kept; only the constructs IREE 3.13 cannot take are rewritten
        text = (tmp_path / dialect / "model.stablehlo.mlir").read_text()
        assert "tensor<?x?xi64>" in text and "stablehlo.dynamic_broadcast_in_dim" in text
        assert "known_nonexpanding_dimensions" in text and "tensor.reshape" in text
        assert "stablehlo.dynamic_reshape" not in text and "shape.cstr_broadcastable" not in text
        note = m["program"]["export_notes"]["dynamic shapes"]
        assert re.search(r"[1-9]\d* dynamic_reshape written as tensor.reshape", note), note


def test_a_quantized_export_carries_integer_weights_and_verifies(spec, tmp_path) -> None:
    art = _compile(spec, tmp_path / "q", "mlir", passes="quantize(w=int8)")
    assert art.manifest["verification"]["status"] == "verified"
    text = (tmp_path / "q" / "model.linalg.mlir").read_text()
    int8 = re.findall(r"dense_resource<[^>]+> : tensor<4x32x32xi8>", text)  # the experts' codes
    assert int8, "no int8 expert weights in the exported MLIR"
    assert "arith.sitofp" in text  # dequantized inside the module


@pytest.mark.slow
def test_an_int4_stablehlo_export_carries_packed_codes_and_runs_through_iree(spec, tmp_path) -> None:
    art = _compile(spec, tmp_path / "q4", "mlir --dialect stablehlo", passes="quantize(w=int4)")
    assert art.manifest["verification"]["status"] == "verified"
    assert art.manifest["decode_verification"]["max_rel_error"] <= 1e-4
    text = (tmp_path / "q4" / "model.stablehlo.mlir").read_text()
    assert re.findall(r"dense_resource<[^>]+> : tensor<4x32x16xi8>", text), "no packed int4 expert codes"
    assert "ui8" not in text  # the packed bytes are signless i8 constants, which IREE's StableHLO input takes


def test_tosa_which_this_iree_cannot_parse_is_checked_statically_and_says_not_run(spec, tmp_path, capsys) -> None:
    dialect = "tosa"
    out = tmp_path / dialect
    assert cli.main(["compile", str(spec), "-o", str(out), "--target", f"mlir --dialect {dialect}",
                     "--batch", "1", "--seq", "2"]) == 0
    said = capsys.readouterr().out
    assert "NOT VERIFIED by running it" in said and "parses and verifies" in said
    from mocompile.artifact import read_manifest

    manifest = read_manifest(out)
    assert manifest["verification"]["status"] == "not run" and "IREE" in manifest["verification"]["reason"]
    text = (out / f"model.{dialect}.mlir").read_text()
    assert f"{dialect}." in text and "func.func @main" in text and "func.func @step" in text
    assert manifest["program"]["export_notes"]["experts"].startswith("sparse")
    # routing by argmax rounds and the per-token gather of expert weights both legalise
    assert "tosa.argmax" in text and "tosa.gather" in text and "tosa.topk" not in text


def test_export_failures_name_the_op_in_one_line(spec) -> None:
    graph = lower_source(source_for(spec, None, None, 0))
    router = next(n for n in graph.nodes if n.op == "router.topk")
    router.attrs["capacity_factor"] = 1.25
    why = get_backend("mlir --dialect linalg").unsupported(graph)
    assert why is not None and "\n" not in why and "router.topk" in why and router.loc in why
    from mocompile.backends.mlir.export import one_line
    from mocompile.backends.mlir import torch_moe

    line = next(i for i, text in enumerate(Path(torch_moe.__file__).read_text().splitlines(), 1) if "F.embedding(idx" in text)
    diag = (f'loc("{torch_moe.__file__}":{line}:0): error: failed to legalize operation \'torch.aten.embedding\' '
            "that was explicitly marked illegal\nmore lines")
    assert one_line(RuntimeError(diag), "tosa") == ("torch-mlir cannot lower torch.aten.embedding (in the torch code "
                                                    "of IR op experts) to tosa")


def test_bad_target_options_are_one_line_errors(spec, tmp_path, capsys) -> None:
    with pytest.raises(MocompileError, match="cannot read option '--dialect spirv'"):
        get_backend("mlir --dialect spirv")
    assert get_backend("mlir --dialect=stablehlo").dialect == "stablehlo"
    assert cli.main(["compile", str(spec), "-o", str(tmp_path / "x"), "--target", "mlir --shape 0x3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mocompile: error: target mlir: cannot read option" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("example", ["mixtral_tiny", "deepseek_tiny", "latent_tiny", "unified_tiny"])
def test_every_example_exports_in_every_dialect(example) -> None:
    from mocompile.backends.mlir.export import export_mlir, parse_check

    graph = lower_source(source_for(EXAMPLES / f"{example}.moe", None, None, 0))
    for dialect in ("linalg", "stablehlo", "tosa", "torch"):
        exported = export_mlir(graph, cached_graph(graph), dialect, 1, 4)
        counts = parse_check(exported.text)
        prefix = {"linalg": "linalg.", "stablehlo": "stablehlo.", "tosa": "tosa.", "torch": "torch.aten."}[dialect]
        assert exported.functions == ["main", "step"] and any(op.startswith(prefix) for op in counts), dialect


@pytest.mark.slow
@pytest.mark.parametrize("dialect", ["linalg", "stablehlo"])
@pytest.mark.parametrize("example", ["mixtral_tiny", "deepseek_tiny", "latent_tiny", "unified_tiny"])
def test_every_example_runs_through_iree_and_verifies(example, dialect, tmp_path) -> None:
    art = mocompile.compile(EXAMPLES / f"{example}.moe", target=f"mlir --dialect {dialect}", out_dir=tmp_path / example,
                            batch=2, seq=3)
    assert art.manifest["verification"]["status"] == "verified"
    assert art.manifest["decode_verification"]["max_rel_error"] <= 1e-4
