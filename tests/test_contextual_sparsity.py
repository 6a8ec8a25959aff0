"""contextual-sparsity(keep=R): the per-token channel selection on constructed cases (the IR's
and the CPU kernel's, ties included), the pass on the IR (shares read, verifier, isolation),
and the TVM CPU artifact: it matches the modified graph's interpreter forward and with the KV
cache (the step's gathered kernels), its summary line says which kernels decode measured
faster, and at keep=1.0 it is bit-identical to the dense artifact."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import numpy as np
import pytest
import tvm

import mocompile
from conftest import EXAMPLES
from mocompile import cli, runtime
from mocompile.errors import MocompileError
from mocompile.ir.active_params import active_params
from mocompile.ir.contextual import column_norms, kept_channels, select_channels, sparsify
from mocompile.ir.interpreter import run as interpret
from mocompile.ir.verifier import verify
from mocompile.isolation import analyze
from mocompile.pass_manager import PassContext, PassManager
from sparsity_models import text_calibration, trained

SPEC, WEIGHTS = EXAMPLES / "deepseek_tiny.moe", EXAMPLES / "weights" / "deepseek_tiny.safetensors"


def test_the_chosen_channels_are_the_top_scores() -> None:
    # channel 0 has the largest |x| but a zero column: it scores 0 and is never chosen
    w = np.array([[0.0, 1.0, 2.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.5, 1.0]], np.float32)  # [out 2, in 5]
    x = np.array([[9.0, -3.0, 1.0, 4.0, 0.1], [9.0, 0.5, -2.0, 0.1, 1.0]], np.float32)
    norms = column_norms([w])
    np.testing.assert_allclose(norms, [0, 1, 2, np.sqrt(0.5), np.sqrt(2)], rtol=1e-6)
    # scores row 0: 0, 3, 2, 2.83, 0.14 -> top 2 = channels 1, 3; row 1: 0, .5, 4, .07, 1.41 -> 2, 4
    assert select_channels(x, norms, 2).tolist() == [[1, 3], [2, 4]]
    expect = np.array([[0, -3.0, 0, 4.0, 0], [0, 0, -2.0, 0, 1.0]], np.float32)
    np.testing.assert_array_equal(sparsify(x, [w], 0.4), expect)
    assert kept_channels(5, 0.4) == 2 and kept_channels(5, 0.01) == 1 and sparsify(x, [w], 1.0) is x


def _run_kernel(func, args):
    lib = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target="llvm")
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["k"](*tensors)
    return [t.numpy() for t in tensors]


def test_column_norms_are_computed_once_per_weight_array_and_never_served_stale() -> None:
    """The interpreter's norms are cached per weight array: the same array gives the same
    norms without recomputing, a replaced weight (a new array, even at a reused address)
    its own norms, and a stacked expert weight every expert's norms, bit for bit as one
    expert's own."""
    import gc

    from mocompile.ir import contextual

    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    first = contextual._squared_column_sums(w)
    assert contextual._squared_column_sums(w) is first  # a hit: not recomputed
    np.testing.assert_allclose(column_norms([w]), np.sqrt((w.astype(np.float64) ** 2).sum(0)), rtol=1e-7)
    key = id(w)
    del w
    gc.collect()
    assert key not in contextual._SQUARES  # the entry left with its array
    for _ in range(20):  # new arrays, some at a reused address, each served its own norms
        v = np.random.default_rng(_).standard_normal((3, 4)).astype(np.float32)
        np.testing.assert_array_equal(column_norms([v]), np.sqrt((v.astype(np.float64) ** 2).sum(0)).astype(np.float32))
    stacked = np.random.default_rng(7).standard_normal((4, 6, 5)).astype(np.float32)
    for e in range(4):
        np.testing.assert_array_equal(column_norms([stacked])[e], column_norms([stacked[e].copy()]))


def test_the_cpu_selection_kernel_takes_the_same_channels_ties_included() -> None:
    from mocompile.backends.tvm_cpu.kernels_contextual import select_channels as kernel

    rng = np.random.default_rng(0)
    k, m = 64, 20
    x = rng.standard_normal((5, k)).astype(np.float32)
    x[1, :] = 1.0  # every score ties: the lowest channels go first
    x[2, 10:] = 0.0  # fewer non-zero scores than m: zeros tie, lowest first
    x[3, ::2] = x[3, 1::2] = 2.0  # ties at the threshold among distinct scores
    norms = rng.random(k).astype(np.float32)
    norms[::3] = 1.0
    expect = select_channels(x, norms, m)
    _, _, idx, xs = _run_kernel(kernel(k, m, False), [x, norms, np.zeros((5, m), np.int32), np.zeros((5, m), np.float32)])
    np.testing.assert_array_equal(idx, expect)
    np.testing.assert_array_equal(xs, np.take_along_axis(x, expect, axis=-1))
    _, _, xm = _run_kernel(kernel(k, m, True), [x, norms, np.full_like(x, 7.0)])
    np.testing.assert_array_equal(xm, sparsify(x, [np.diag(norms)], m / k))


def test_the_pass_sets_keep_and_counts_the_weights_read() -> None:
    dense = trained("deepseek_tiny")
    calib = text_calibration("deepseek_tiny", sequences=4, seq=8)
    graph, (report,) = PassManager("contextual-sparsity(keep=0.5)").run(dense, PassContext(calibration=calib))
    verify(graph)
    nodes = [n for n in graph.nodes if n.op in ("linear", "mlp", "experts")]
    assert {n.op for n in nodes} == {"linear", "mlp", "experts"}
    assert nodes and all(n.attrs["keep"] == 0.5 for n in nodes) and len(report["ops"]) == len(nodes)
    assert not any("keep" in n.attrs for n in dense.nodes)  # the input graph is untouched
    assert active_params(graph) < 0.7 * active_params(dense)
    assert "each token reads 50% of the input channels" in report["summary"] and "held-out KL" in report["summary"]
    assert analyze(graph).verdict == analyze(dense).verdict == "isolated"
    ids = np.random.default_rng(1).integers(0, 512, (2, 6))
    assert np.abs(interpret(graph, {"text": ids})["logits"] - interpret(dense, {"text": ids})["logits"]).max() > 1e-3
    from mocompile.backends.base import get_backend

    why = get_backend("fpga").unsupported(graph)  # a target without the kernels refuses in one line
    assert why and "does not compile contextual sparsity" in why and get_backend("cpu").unsupported(graph) is None
    with pytest.raises(MocompileError, match=r"keep .* must be in \(0, 1\]"):
        PassManager("contextual-sparsity(keep=0)")


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    root = tmp_path_factory.mktemp("contextual")
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(["compile", str(SPEC), "-o", str(root / "art"), "--weights", str(WEIGHTS), "--passes",
                         "contextual-sparsity(keep=0.5)", "--seq", "6"])
    assert code == 0
    return root / "art", out.getvalue()


def test_the_artifact_reads_the_kept_rows_and_matches_the_modified_graph(half) -> None:
    path, printed = half
    art = runtime.load(path)
    (report,) = art.manifest["passes"]
    assert f"contextual-sparsity(keep=0.5): {report['summary']}" in printed
    decisions = art.manifest["program"]["contextual"]
    assert decisions and all("gathered" in d for d in decisions)
    assert all(d["kept"] == kept_channels(d["k"], 0.5) for d in decisions)
    assert ("decode uses the gathered kernels" in report["summary"]) == all(d["gathered"] for d in decisions)
    assert ("falls back to the dense kernels" in report["summary"]) == (not any(d["gathered"] for d in decisions))
    kinds = {w["kind"] for w in art.manifest["program"]["weight_layouts"]}
    # the gathered kernels' panels are 64 or 128 columns wide (the dense kernels' 32 here)
    wide = any(w["kind"].endswith("panels") and w["panel"] in (64, 128) for w in art.manifest["program"]["weight_layouts"])
    assert "column_norms" in kinds and wide == any(d["gathered"] for d in decisions)
    ir = (path / "ir.txt").read_text()
    assert "keep=0.5" in ir
    v, dec = art.manifest["verification"], art.manifest["decode_verification"]
    assert v["status"] == "verified" and v["reference"] == "IR interpreter" and v["max_rel_error"] < 1e-4
    assert dec["max_rel_error"] < 1e-4 and dec["isolation"] == "isolated"
    assert art.manifest["isolation"]["verdict"] == "isolated"
    dense = trained("deepseek_tiny")
    graph, _ = PassManager("contextual-sparsity(keep=0.5)").run(dense, PassContext(calibration=text_calibration(
        "deepseek_tiny", sequences=4, seq=8)))
    ids = np.random.default_rng(3).integers(0, 512, (2, 7))
    got = art.run({"text": ids})["logits"]
    np.testing.assert_allclose(got, interpret(graph, {"text": ids})["logits"], rtol=1e-4, atol=1e-4)
    cache = art.new_cache(batch=2, capacity=16)
    steps = [art.step({"text": ids[:, :5]}, cache)["logits"]] + [art.step({"text": ids[:, t:t + 1]}, cache)["logits"]
                                                                 for t in (5, 6)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), got, rtol=1e-4, atol=1e-4)


def test_keep_one_is_bit_identical_to_the_dense_artifact(tmp_path) -> None:
    kw = dict(weights=WEIGHTS, seq=6)
    dense = mocompile.compile(SPEC, out_dir=tmp_path / "dense", **kw)
    full = mocompile.compile(SPEC, passes="contextual-sparsity(keep=1.0)", out_dir=tmp_path / "full", **kw)
    ids = np.random.default_rng(5).integers(0, 512, (2, 7))
    assert np.array_equal(full.run({"text": ids})["logits"], dense.run({"text": ids})["logits"])
    caches = [a.new_cache(batch=2, capacity=16) for a in (dense, full)]
    for span in ((0, 5), (5, 6), (6, 7)):
        a, b = (art.step({"text": ids[:, span[0]:span[1]]}, c)["logits"] for art, c in zip((dense, full), caches))
        assert np.array_equal(a, b)


@pytest.mark.parametrize("glu,experts", [(False, 0), (True, 0), (True, 3), (False, 3)])
def test_the_gathered_kernel_reads_the_kept_rows_of_the_transposed_panels(glu, experts) -> None:
    from mocompile.backends.tvm_common.contextual import column_block
    from mocompile.backends.tvm_common.layout import pack
    from mocompile.backends.tvm_common.specs import Epilogue
    from mocompile.backends.tvm_cpu.kernels_contextual import gathered_matmul, select_channels as select_kernel
    from mocompile.ir.ops.nn import ffn_hidden

    rng = np.random.default_rng(2)
    k, n, m, rows = 48, 96, 13, 5
    lead = (experts,) if experts else ()
    ws = [rng.standard_normal((*lead, n, k)).astype(np.float32) for _ in range(2 if glu else 1)]
    x = rng.standard_normal((rows, k)).astype(np.float32)
    # rows sorted by expert: 2 rows of expert 0, none of expert 1, 3 of expert 2
    indptr, owner = np.array([0, 2, 2, 5], np.int32), np.array([0, 0, 2, 2, 2])
    per_row = [[w[owner[r]] if experts else w for w in ws] for r in range(rows)]
    norms = pack("column_norms", ws, 0)
    plan = [indptr] if experts else []
    _, _, *_, idx, xs = _run_kernel(select_kernel(k, m, False, experts), [x, norms, *plan, np.zeros((rows, m), np.int32),
                                                                           np.zeros((rows, m), np.float32)])
    expect_idx = np.concatenate([select_channels(x[r:r + 1], column_norms(per_row[r]), m) for r in range(rows)])
    np.testing.assert_array_equal(idx, expect_idx)
    epi = Epilogue(glu=glu, activation="silu" if glu else None, bias=not glu and not experts,
                   row_scale=bool(experts), residual=0 if glu else 1)
    wt = pack(("expert_" if experts else "") + ("glu_panels" if glu else "panels"), ws, column_block(n, glu))
    extra = ([rng.standard_normal(n).astype(np.float32)] if epi.bias else []) + \
        ([rng.random(rows).astype(np.float32)] if epi.row_scale else []) + \
        ([rng.standard_normal((rows, n)).astype(np.float32)] if epi.residual else [])
    *_, y = _run_kernel(gathered_matmul(k, n, m, epi, experts), [xs, idx, *plan, wt, *extra,
                                                                np.zeros((rows, n), np.float32)])
    for r in range(rows):
        xm = sparsify(x[r:r + 1], per_row[r], m / k)
        expect = ffn_hidden(xm, per_row[r][0], per_row[r][1], "silu") if glu else xm @ per_row[r][0].T
        rest = list(extra)
        if epi.bias:
            expect = expect + rest.pop(0)
        if epi.row_scale:
            expect = expect * rest.pop(0)[r]
        if epi.residual:
            expect = expect + rest.pop(0)[r]
        np.testing.assert_allclose(y[r:r + 1], expect, rtol=1e-5, atol=1e-5)
