"""TVM CPU backend: built modules agree with the IR interpreter, run sparsely, and export.

Graphs are built by hand with the IR builder; every comparison is against
`mocompile.ir.interpreter.run` (relative error <= 1e-4 in fp32; integer outputs exact).
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")  # torch and TVM share the cores

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.ir.expr import TensorLoad

from mocompile.backends.tvm_cpu import LoweringError, build, host_target, lower, tir_util
from mocompile.backends.tvm_common.layout import pack, panel_width
from mocompile.backends.tvm_cpu.schedule import check_scheduled, loop_kinds
from mocompile.backends.tvm_cpu.tir_util import HAND_SCHEDULED_ATTR, SERIAL_ATTR
from mocompile.ir.graph import Graph, Node, Value
from mocompile.ir.interpreter import run
from mocompile.ir.types import TensorType

TARGET = host_target(num_cores=2)
RTOL = 1e-4


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


def assert_matches(outs: dict, refs: dict) -> None:
    assert outs.keys() == refs.keys()
    for name, ref in refs.items():
        out = outs[name]
        assert out.shape == ref.shape and out.dtype == ref.dtype, name
        if np.issubdtype(ref.dtype, np.integer):
            np.testing.assert_array_equal(out, ref, err_msg=name)
        else:
            assert np.isfinite(out).all(), name
            assert rel_err(out, ref) <= RTOL, (name, rel_err(out, ref))


class Weights:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int, scale: float = 0.1, offset: float = 0.0) -> np.ndarray:
        return (offset + self.rng.standard_normal(shape) * scale).astype(np.float32)


def tiny_moe_lm(w: Weights) -> Graph:
    """embedding -> attention block -> routed MoE block -> dense gated MLP -> lm head."""
    V, H, F, E, K, Hq, Hkv, D = 50, 64, 96, 8, 2, 4, 2, 16
    g = Graph("tiny_moe_lm")
    ids = g.add_input("ids", TensorType(("batch", "seq"), "int64"))
    x = g.add("embedding", ids, g.add_param("embed", w(V, H, scale=1.0)))
    h = g.add("rmsnorm", x, g.add_param("ln1", w(H, offset=1.0)), eps=1e-6)
    q = g.add("linear", h, g.add_param("wq", w(Hq * D, H)))
    k = g.add("linear", h, g.add_param("wk", w(Hkv * D, H)))
    v = g.add("linear", h, g.add_param("wv", w(Hkv * D, H)), g.add_param("bv", w(Hkv * D)))
    a = g.add("attention", q, k, v, heads=Hq, kv_heads=Hkv, head_dim=D, rope_theta=10000.0, causal=True)
    x = g.add("add", x, g.add("linear", a, g.add_param("wo", w(H, Hq * D))))
    h = g.add("rmsnorm", x, g.add_param("ln2", w(H, offset=1.0)), eps=1e-6)
    rw, ri = g.add_node("router.topk", [h, g.add_param("router", w(E, H, scale=1.0))], {"top_k": K})
    moe = g.add("experts", h, rw, ri, g.add_param("experts.gate", w(E, F, H)), g.add_param("experts.up", w(E, F, H)),
                g.add_param("experts.down", w(E, H, F)))
    x = g.add("add", moe, x)
    h = g.add("layernorm", x, g.add_param("ln3.w", w(H, offset=1.0)), g.add_param("ln3.b", w(H)), eps=1e-5)
    mlp = g.add("mlp", h, g.add_param("mlp.gate", w(F, H)), g.add_param("mlp.up", w(F, H)),
                g.add_param("mlp.down", w(H, F)), activation="gelu")
    x = g.add("mul", g.add("silu", mlp), g.add("sigmoid", x))
    logits = g.add("linear", x, g.add_param("lm_head", w(V, H)))
    g.outputs = [logits, ri]
    return g


@pytest.fixture(scope="module")
def tiny():
    g = tiny_moe_lm(Weights(0))
    program = lower(g)
    return g, program, build(program, TARGET)


@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 9), (3, 5), (2, 70)])
def test_tiny_model_matches_interpreter(tiny, batch, seq):
    g, _, exe = tiny
    inputs = {"ids": np.random.default_rng(batch * 100 + seq).integers(0, 50, (batch, seq)).astype(np.int64)}
    assert_matches(exe.run(inputs), run(g, inputs))


def _clear_kernel_caches() -> None:
    from mocompile.backends.tvm_cpu import (kernels_attention, kernels_gather, kernels_matmul, kernels_moe,
                                            kernels_norm, kernels_router)
    for module in (kernels_attention, kernels_gather, kernels_matmul, kernels_moe, kernels_norm, kernels_router):
        for fn in vars(module).values():
            if hasattr(fn, "cache_clear"):
                fn.cache_clear()


def test_thread_pool_branches_match_interpreter(monkeypatch):
    """Decode-sized calls take the kernels' serial branch; force the parallel one everywhere."""
    monkeypatch.setattr(tir_util, "PARALLEL_MIN_BYTES", 0)
    _clear_kernel_caches()
    try:
        g = tiny_moe_lm(Weights(0))
        exe = build(lower(g), TARGET)
        for batch, seq in [(1, 1), (2, 5)]:
            inputs = {"ids": np.random.default_rng(seq).integers(0, 50, (batch, seq)).astype(np.int64)}
            assert_matches(exe.run(inputs), run(g, inputs))
    finally:
        monkeypatch.undo()
        _clear_kernel_caches()


def test_weights_are_runtime_parameters_in_documented_order(tiny):
    g, program, _ = tiny
    main = program.mod["main"]
    assert [p.name for p in main.params] == ["ids", *program.weight_names]
    assert program.manifest()["weights"][0]["name"] == program.weight_names[0]
    functions = {gv.name_hint for gv, f in program.mod.functions.items() if isinstance(f, relax.Function)}
    # the plain forward, the cached one (one causal attention) and its last-position prompt form
    assert functions == {"main", "step", "prefill"}
    caches = [c["name"] for c in program.cache]
    assert len(caches) == 2 and caches[0].endswith(".keys") and caches[1].endswith(".values")
    assert [p.name for p in program.mod["step"].params] == ["ids", "past", *caches, *program.weight_names]
    for spec in program.weights:  # every runtime weight re-derives from the graph's weights
        np.testing.assert_array_equal(spec.pack(g.weights), program.arrays[spec.name])
    assert {s for spec in program.weights for s in spec.sources} == set(g.weights)


def test_exported_library_reloads_and_runs(tiny, tmp_path):
    g, program, exe = tiny
    path = str(tmp_path / "model.so")
    exe.export_library(path)
    vm = relax.VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())
    ids = np.random.default_rng(7).integers(0, 50, (2, 6)).astype(np.int64)
    weights = [tvm.runtime.tensor(a) for a in program.weight_arrays()]
    logits, experts = vm["main"](tvm.runtime.tensor(ids), *weights)
    ref = run(g, {"ids": ids})
    assert rel_err(logits.numpy(), ref[g.outputs[0].name]) <= RTOL
    np.testing.assert_array_equal(experts.numpy(), ref[g.outputs[1].name])


def test_every_kernel_is_scheduled(tiny):
    _, program, _ = tiny
    check_scheduled(program.mod)
    funcs = {gv.name_hint: f for gv, f in program.mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    serial = [n for n, f in funcs.items() if f.attrs is not None and SERIAL_ATTR in f.attrs]
    # the O(tokens * k) counting sort, and the decode driver (no loops: it calls the kernels)
    assert sorted(serial) == ["decode", "moe_plan_e8_k2"] and not loop_kinds(funcs["decode"])
    for name, f in funcs.items():
        if name.startswith(("dense", "grouped", "rmsnorm", "layernorm", "attention", "gather", "moe_combine", "silu",
                            "sigmoid", "mul")):
            kinds = loop_kinds(f)
            assert int(tirx.ForKind.PARALLEL) in kinds and int(tirx.ForKind.VECTORIZED) in kinds, name
    te_kernels = [n for n, f in funcs.items() if f.attrs is None or HAND_SCHEDULED_ATTR not in f.attrs]
    assert te_kernels  # the elementwise ops of the block
    for name in te_kernels:  # a parallel loop for large calls, the same loop serial for decode-sized ones
        assert {int(tirx.ForKind.PARALLEL), int(tirx.ForKind.SERIAL)} <= loop_kinds(funcs[name]), name


# ---- sparsity ----------------------------------------------------------------------------
def moe_block(w: Weights, experts: int = 8, top_k: int = 2, hidden: int = 64, ffn: int = 96, gated: bool = True,
              activation: str = "silu") -> Graph:
    g = Graph("moe")
    x = g.add_input("x", TensorType(("batch", "seq", hidden), "float32"))
    rw, ri = g.add_node("router.topk", [x, g.add_param("router", w(experts, hidden, scale=1.0))], {"top_k": top_k})
    ws = [g.add_param("up", w(experts, ffn, hidden)), g.add_param("down", w(experts, hidden, ffn))]
    if gated:
        ws.insert(0, g.add_param("gate", w(experts, ffn, hidden)))
    y = g.add("experts", x, rw, ri, *ws, activation=activation, gated=gated)
    g.outputs = [y, ri]
    return g


def _poisoned(g: Graph, keep: set[int]) -> dict[str, np.ndarray]:
    """Graph weights with every expert not in `keep` set to NaN."""
    out = dict(g.weights)
    for name in ("gate", "up", "down"):
        if name in out:
            a = out[name].copy()
            a[[e for e in range(a.shape[0]) if e not in keep]] = np.nan
            out[name] = a
    return out


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 3)])
def test_experts_read_only_routed_weights(batch, seq):
    """NaN-poison every expert no token was routed to: a kernel that touched any of their
    weights (dense "run all experts and mask", or 0 * NaN) would return NaN."""
    g = moe_block(Weights(1))
    program = lower(g)
    exe = build(program, TARGET)
    x = np.random.default_rng(3).standard_normal((batch, seq, 64)).astype(np.float32)
    ref = run(g, {"x": x})
    routed = set(np.unique(ref[g.outputs[1].name]).tolist())
    if batch * seq == 1:
        assert len(routed) == 2  # top-2 of 8: one token reads 2 experts' weights, not 8
    assert len(routed) < 8
    poisoned = _poisoned(g, routed)
    exe.load_weights({spec.name: spec.pack(poisoned) for spec in program.weights})
    out = exe.run({"x": x})
    assert_matches(out, ref)

    # Control: poisoning one routed expert does reach the output, so the test can fail.
    exe.load_weights({spec.name: spec.pack(_poisoned(g, routed - {min(routed)})) for spec in program.weights})
    assert np.isnan(exe.run({"x": x})[g.outputs[0].name]).any()


def _loads(expr, buffer_name: str) -> bool:
    found = []
    tvm_ffi.structural_walk(expr, [(TensorLoad, lambda ld: found.append(ld.source.name == buffer_name))])
    return any(found)


def test_grouped_kernels_bound_weight_reads_by_routed_rows():
    """Inspection: in the grouped GEMMs every read of the expert weights `w` sits inside a
    loop whose trip count is computed from indptr (the rows routed to that expert)."""
    program = lower(moe_block(Weights(1)))
    grouped = {gv.name_hint: f for gv, f in program.mod.functions.items() if gv.name_hint.startswith("grouped")}
    assert len(grouped) == 2
    for name, func in grouped.items():
        unguarded = []

        def visit(node, visitor, guarded=False):
            if isinstance(node, tirx.For):
                inner = guarded or _loads(node.extent, "indptr") or _loads(node.min, "indptr")
                visitor.visit(node.extent)
                tvm_ffi.structural_visit(node.body, [(object, lambda n, v: visit(n, v, inner))])
                return
            if isinstance(node, TensorLoad) and node.source.name == "w" and not guarded:
                unguarded.append(node)
            visitor.default_visit(node)

        tvm_ffi.structural_visit(func.body, [(object, lambda n, v: visit(n, v))])
        assert not unguarded, name


# ---- op coverage -------------------------------------------------------------------------
def test_router_variants_match_interpreter():
    w = Weights(2)
    g = Graph("routers")
    x = g.add_input("x", TensorType(("batch", "seq", 32), "float32"))
    mods = g.add_input("modality", TensorType(("batch", "seq"), "int32"))
    r16 = g.add_param("r16", w(16, 32, scale=1.0))
    outs = []
    for attrs, extra in [
        (dict(top_k=4, scoring="sigmoid", normalize=True, routed_scale=2.5, n_group=4, topk_group=2), []),
        (dict(top_k=3, scoring="softmax", normalize=False), []),
        (dict(top_k=2, groups=((0, 0, 10), (1, 10, 16))), [mods]),
        (dict(top_k=3, scoring="sigmoid", groups=((0, 0, 2), (1, 2, 16))), [mods]),  # top_k > group 0's size
    ]:
        outs += g.add_node("router.topk", [x, r16, *extra], attrs)
    g.outputs = outs
    exe = build(lower(g), TARGET)
    rng = np.random.default_rng(5)
    inputs = {"x": rng.standard_normal((2, 7, 32)).astype(np.float32),
              "modality": rng.integers(0, 3, (2, 7)).astype(np.int32)}  # id 2 is in no group: all experts
    assert_matches(exe.run(inputs), run(g, inputs))


@pytest.mark.parametrize("heads,kv_heads,head_dim,rope,causal", [(4, 4, 32, 0.0, False), (6, 2, 24, 500.0, True)])
def test_attention_variants_match_interpreter(heads, kv_heads, head_dim, rope, causal):
    g = Graph("attn")
    q = g.add_input("q", TensorType(("batch", "seq", heads * head_dim), "float32"))
    k = g.add_input("k", TensorType(("batch", "seq", kv_heads * head_dim), "float32"))
    v = g.add_input("v", TensorType(("batch", "seq", kv_heads * head_dim), "float32"))
    g.outputs = [g.add("attention", q, k, v, heads=heads, kv_heads=kv_heads, head_dim=head_dim, rope_theta=rope,
                       causal=causal)]
    exe = build(lower(g), TARGET)
    rng = np.random.default_rng(11)
    for b, s in [(1, 1), (2, 67)]:
        inputs = {n: rng.standard_normal((b, s, d)).astype(np.float32)
                  for n, d in [("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)]}
        assert_matches(exe.run(inputs), run(g, inputs))


def test_multimodal_concat_segments_and_ungated_blocks():
    """Early fusion with a summed symbolic length, modality-grouped routing, ungated GELU
    experts and MLP, and linears whose widths need padded panels."""
    w = Weights(4)
    H = 40
    g = Graph("mm")
    text = g.add_input("text", TensorType(("batch", "seq_text", H), "float32"))
    image = g.add_input("image", TensorType(("batch", "seq_image", 24), "float32"))
    img = g.add("linear", image, g.add_param("proj", w(H, 24)), g.add_param("proj.b", w(H)))
    x = g.add("concat", text, img, axis=1)
    mods = g.add("segment_ids", text, img, ids=(0, 1))
    rw, ri = g.add_node("router.topk", [x, g.add_param("router", w(6, H, scale=1.0)), mods],
                        {"top_k": 2, "groups": ((0, 0, 3), (1, 3, 6))})
    y = g.add("experts", x, rw, ri, g.add_param("up", w(6, 36, H)), g.add_param("down", w(6, H, 36)),
              activation="gelu", gated=False)
    y = g.add("mlp", y, g.add_param("mlp.up", w(52, H)), g.add_param("mlp.down", w(H, 52)), activation="silu",
              gated=False)
    logits = g.add("linear", y, g.add_param("head", w(21, H)))
    g.outputs = [logits, mods, ri]
    program = lower(g)
    assert panel_width(21) == 16 and program.arrays["head@panels16"].shape == (2, H, 16)
    exe = build(program, TARGET)
    rng = np.random.default_rng(9)
    for b, st, si in [(1, 3, 2), (2, 5, 9)]:
        inputs = {"text": rng.standard_normal((b, st, H)).astype(np.float32),
                  "image": rng.standard_normal((b, si, 24)).astype(np.float32)}
        assert_matches(exe.run(inputs), run(g, inputs))


def test_shared_expert_and_residual_adds_fuse_into_one_write_back():
    """routed + shared expert + residual stream: the two adds become the shared expert's
    write-back (its down GEMM adds both, in the graph's order), as do a combine's."""
    w = Weights(5)
    H, F, E = 64, 48, 6
    g = Graph("shared")
    x = g.add_input("x", TensorType(("batch", "seq", H), "float32"))
    rw, ri = g.add_node("router.topk", [x, g.add_param("router", w(E, H, scale=1.0))], {"top_k": 2})
    routed = g.add("experts", x, rw, ri, g.add_param("gate", w(E, F, H)), g.add_param("up", w(E, F, H)),
                   g.add_param("down", w(E, H, F)))
    shared = g.add("mlp", x, g.add_param("s.gate", w(F, H)), g.add_param("s.up", w(F, H)), g.add_param("s.down", w(H, F)))
    y = g.add("add", g.add("add", routed, shared), x)  # (routed + shared) + residual, as the MoE block is written
    g.outputs = [y]
    program = lower(g)
    kernels = {gv.name_hint for gv, f in program.mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    assert not any(k.startswith("add") for k in kernels), kernels
    assert any(k.endswith("_residual2") for k in kernels), kernels
    exe = build(program, TARGET)
    rng = np.random.default_rng(3)
    for b, sq in [(1, 1), (2, 7)]:
        inputs = {"x": rng.standard_normal((b, sq, H)).astype(np.float32)}
        assert_matches(exe.run(inputs), run(g, inputs))


def test_panel_layouts():
    w = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    p = pack("panels", [w], 4)
    assert p.shape == (2, 3, 4)
    np.testing.assert_array_equal(p[1, :, 0], w[4])
    np.testing.assert_array_equal(p[1, :, 1:], 0)  # padded columns
    gate, up = np.random.rand(2, 8, 3).astype(np.float32), np.random.rand(2, 8, 3).astype(np.float32)
    q = pack("expert_glu_panels", [gate, up], 4)
    assert q.shape == (4, 3, 8)  # expert 1, second panel = row 3
    np.testing.assert_array_equal(q[3, :, :4], gate[1, 4:8].T)
    np.testing.assert_array_equal(q[3, :, 4:], up[1, 4:8].T)


def test_unsupported_graphs_are_rejected_clearly():
    g = moe_block(Weights(1))
    g.nodes[0].attrs["capacity_factor"] = 1.25
    with pytest.raises(LoweringError, match="capacity_factor"):
        lower(g)
    for routing in ("expert_choice", "balanced"):
        g = moe_block(Weights(1))
        g.nodes[0].attrs["routing"] = routing
        with pytest.raises(LoweringError, match=f"routing={routing}"):
            lower(g)
    g = Graph("int8")
    x = g.add_input("x", TensorType(("batch", 8), "float32"))
    g.outputs = [g.add("linear", x, g.add_param("w", np.ones((4, 8), np.int8)))]
    with pytest.raises(LoweringError, match="float32"):
        lower(g)
    g.nodes.append(Node("fancy_op", [x], {}, [Value("y", x.type)]))
    with pytest.raises(LoweringError, match="fancy_op"):
        lower(g)
