"""Quantization: the number formats, the low-bit kernels against a numpy reference of the
same quantized arithmetic, the quantize pass (options, report, accuracy, isolation), and
compiled artifacts (low-bit on disk and in memory, checked against the quantized IR)."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np
import pytest
from safetensors import safe_open

from mocompile.backends.tvm_cpu import build, host_target, lower
from mocompile.backends.tvm_cpu.target import host_has_vnni
from mocompile.compiler import compile
from mocompile.frontend import lower_source, source_for
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.ir.interpreter import run
from mocompile.ir.ops.quant import dequantize_weight, fake_quant, pack_int4, quantize_weight, unpack_int4
from mocompile.ir.types import TensorType
from mocompile.ir.verifier import VerifyError, verify
from mocompile.isolation import analyze
from mocompile.pass_manager import PassContext, PassManager, parse_pipeline
from mocompile.calibration import for_graph
from mocompile.passes.quantize import Quantize, effective_group, token_ranges

from conftest import EXAMPLE_SHAPE, EXAMPLES
from cpu_targets import PATHS, TARGETS, skip_unless_runs_here

TARGET = host_target(num_cores=2)
SCHEMES = [(8, 0), (8, 32), (4, 0), (4, 32)]  # (bits, group); group 0: per output channel


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- the number formats --------------------------------------------------------------------
def test_int4_packing_is_two_nibbles_per_byte():
    q = rng(0).integers(-8, 8, (5, 12)).astype(np.int8)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (5, 6)
    np.testing.assert_array_equal(packed & 15, q[:, 0::2] + 8)  # even inputs in the low nibble
    np.testing.assert_array_equal(packed >> 4, q[:, 1::2] + 8)
    np.testing.assert_array_equal(unpack_int4(packed), q)


@pytest.mark.parametrize("bits,group", SCHEMES)
def test_weight_quantization_rounds_to_nearest_code(bits, group):
    w = rng(1).standard_normal((3, 16, 64)).astype(np.float32)
    q, s = quantize_weight(w, bits, group)
    groups = 64 // (group or 64)
    assert s.shape == (3, 16, groups) and s.dtype == np.float32
    assert q.dtype == (np.int8 if bits == 8 else np.uint8) and q.shape == (3, 16, 64 if bits == 8 else 32)
    codes = q if bits == 8 else unpack_int4(q)
    qmax = 127 if bits == 8 else 7
    assert np.abs(codes).max() <= (qmax if bits == 8 else 8)
    err = np.abs(dequantize_weight(q, s, bits) - w).reshape(3, 16, groups, -1)
    assert (err <= s[..., None] / 2 + 1e-6).all()  # round to nearest: at most half a step
    # the largest magnitude of each group maps to the largest code
    assert (np.abs(codes).reshape(3, 16, groups, -1).max(-1) == qmax).all()


def test_effective_group_divides_the_input_width():
    assert effective_group(32, 48, 4) == 24 and effective_group(32, 48, 8) == 24
    assert effective_group(128, 64, 4) == 0  # group covers the row: per channel
    assert effective_group(32, 128, 4) == 32


# ---- kernels against a numpy reference of the quantized arithmetic ---------------------------
def reference_dequant(q: np.ndarray, s: np.ndarray, bits: int) -> np.ndarray:
    """Independent of mocompile: codes from the bits, times the scale of their group."""
    if bits == 4:
        lo, hi = (q & 15).astype(np.int32) - 8, (q >> 4).astype(np.int32) - 8
        codes = np.empty(q.shape[:-1] + (2 * q.shape[-1],), np.int32)
        codes[..., 0::2], codes[..., 1::2] = lo, hi
    else:
        codes = q.astype(np.int32)
    group = codes.shape[-1] // s.shape[-1]
    return codes.astype(np.float64) * np.repeat(s.astype(np.float64), group, axis=-1)


def quantized_param(g: Graph, name: str, w: np.ndarray, bits: int, group: int):
    q, s = quantize_weight(w, bits, group)
    deq = g.add("dequantize", g.add_param(f"{name}.q", q), g.add_param(f"{name}.s", s), bits=bits)
    return deq, reference_dequant(q, s, bits)


def silu(x):
    return x / (1 + np.exp(-x))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits,group", SCHEMES)
def test_low_bit_linear_and_mlp_kernels(bits, group, path):
    """linear (+bias) and gated mlp with low-bit weights: 1 row (GEMV path) and 7 rows
    (register tiles + leftover rows) against float64 numpy on the dequantized codes, for
    each kernel path (cpu_targets.py: integer VNNI, float with AVX-512 or AVX2 tiles)."""
    cpu = TARGETS[path]
    r = rng(bits + group)
    H, F, N = 64, 96, 40  # N: not a multiple of the panel width (padded last panel)
    g = Graph("q")
    x = g.add_input("x", TensorType(("rows", H), "float32"))
    w, w_ref = quantized_param(g, "w", r.standard_normal((N, H)).astype(np.float32), bits, group)
    b = r.standard_normal(N).astype(np.float32)
    y = g.add("linear", x, w, g.add_param("b", b))
    gate, gate_ref = quantized_param(g, "gate", r.standard_normal((F, H)).astype(np.float32) * 0.2, bits, group)
    up, up_ref = quantized_param(g, "up", r.standard_normal((F, H)).astype(np.float32) * 0.2, bits, group)
    down, down_ref = quantized_param(g, "down", r.standard_normal((H, F)).astype(np.float32) * 0.2, bits, group)
    z = g.add("mlp", x, gate, up, down)
    g.outputs = [y, z]
    program = lower(g, target=cpu)
    codes = {str(a.dtype) for a in program.arrays.values()} - {"float32"}
    # VNNI words (4 or 8 codes each) for the integer kernels, else the codes as stored
    assert codes == ({"int32"} if cpu.integer_matmuls else {"int8" if bits == 8 else "uint8"})
    low_bit = sum(a.nbytes for a in program.arrays.values() if str(a.dtype) != "float32")
    raw = sum(a.nbytes for a in g.weights.values() if a.dtype != np.float32)
    assert raw <= low_bit < 1.5 * raw  # the codes stay low-bit in any layout (padding, column sums aside)
    exe = build(program, cpu.llvm(num_cores=2))
    skip_unless_runs_here(cpu)
    for rows in (1, 7):
        xs = r.standard_normal((rows, H)).astype(np.float32)
        out = exe.run({"x": xs})
        x64 = xs.astype(np.float64)
        want_y = x64 @ w_ref.T + b
        want_z = (silu(x64 @ gate_ref.T) * (x64 @ up_ref.T)) @ down_ref.T
        for got, want in zip(out.values(), (want_y, want_z)):
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32)])
def test_low_bit_experts_stay_sparse_and_match(bits, group, path):
    """Routed experts with low-bit weights: exact expert math, and only routed experts' codes
    are read (every other expert's scales are NaN), on each kernel path."""
    cpu = TARGETS[path]
    r = rng(5)
    E, H, F, K = 8, 64, 32, 2
    g = Graph("qmoe")
    x = g.add_input("x", TensorType(("rows", H), "float32"))
    rw, ri = g.add_node("router.topk", [x, g.add_param("router", r.standard_normal((E, H)).astype(np.float32))],
                        {"top_k": K})
    ws, refs = [], []
    for name, shape in (("gate", (E, F, H)), ("up", (E, F, H)), ("down", (E, H, F))):
        deq, ref = quantized_param(g, name, (r.standard_normal(shape) * 0.2).astype(np.float32), bits, group)
        ws.append(deq)
        refs.append(ref)
    g.outputs = [g.add("experts", x, rw, ri, *ws), ri]
    program = lower(g, target=cpu)
    exe = build(program, cpu.llvm(num_cores=2))
    skip_unless_runs_here(cpu)
    xs = r.standard_normal((3, H)).astype(np.float32)
    interp = run(g, {"x": xs}, watch=[rw])
    weights, routing_i = interp[rw.name].astype(np.float64), interp[ri.name]
    routed = set(np.unique(routing_i).tolist())
    assert len(routed) < E
    # float64 reference of the same arithmetic
    want = np.zeros((3, H))
    for t in range(3):
        for j in range(K):
            e = routing_i[t, j]
            h = silu(xs[t] @ refs[0][e].T) * (xs[t] @ refs[1][e].T)
            want[t] += weights[t, j] * (h @ refs[2][e].T)
    poisoned = dict(g.weights)
    for name in ("gate.s", "up.s", "down.s"):
        a = poisoned[name].copy()
        a[[e for e in range(E) if e not in routed]] = np.nan
        poisoned[name] = a
    exe.load_weights({spec.name: spec.pack(poisoned) for spec in program.weights})
    got = exe.run({"x": xs})[g.outputs[0].name]
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("mode", ["static", "token", "tensor"])
def test_activation_quantization_kernel_is_exact(mode):
    r = rng(9)
    g = Graph("qa")
    x = g.add_input("x", TensorType(("rows", 48), "float32"))
    extra = [g.add_param("s", np.array([0.02], np.float32))] if mode == "static" else []
    g.outputs = [g.add("quantize_act", x, *extra, mode=mode)]
    exe = build(lower(g), TARGET)
    xs = (r.standard_normal((5, 48)) * np.array([[0.1], [1], [3], [0], [10]])).astype(np.float32)
    got = exe.run({"x": xs})[g.outputs[0].name]
    want = fake_quant(xs, mode, np.array([0.02], np.float32) if extra else None)
    np.testing.assert_array_equal(got, want)
    if mode == "token":  # an all-zero row stays zero; other rows use their own max
        assert (got[3] == 0).all() and np.abs(got[4]).max() == pytest.approx(np.abs(xs[4]).max(), rel=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["static", "token"])
def test_w8a8_linear_is_integer_arithmetic(mode, path):
    """W8A8: int8 activation codes times int8 weight codes, summed exactly in int32, scaled
    by the activation scale (per tensor or per token) and the weight's per-channel scale;
    the float kernels (no VNNI) compute the same from the rounded activations."""
    cpu = TARGETS[path]
    r = rng(13)
    K, N = 96, 48
    w = r.standard_normal((N, K)).astype(np.float32)
    q, s = quantize_weight(w, 8)
    g = Graph("w8a8")
    x = g.add_input("x", TensorType(("rows", K), "float32"))
    act_scale = np.array([0.03], np.float32)
    extra = [g.add_param("x.scale", act_scale)] if mode == "static" else []
    xq = g.add("quantize_act", x, *extra, mode=mode)
    g.outputs = [g.add("linear", xq, g.add("dequantize", g.add_param("w.q", q), g.add_param("w.s", s), bits=8))]
    program = lower(g, target=cpu)
    kernels = {gv.name_hint for gv in program.mod.functions}
    int8, fake_quant = (any(k.startswith(p) for k in kernels) for p in ("int8_dense", "quantize_act"))
    # integer kernels (VNNI dot products) and no float fake-quant pass, or the float ones after it
    assert (int8, fake_quant) == (cpu.integer_matmuls, not cpu.integer_matmuls)
    exe = build(program, cpu.llvm(num_cores=2))
    skip_unless_runs_here(cpu)
    xs = r.standard_normal((5, K)).astype(np.float32)
    got = exe.run({"x": xs})[g.outputs[0].name]
    if mode == "static":
        sx = np.full((5, 1), act_scale[0], np.float32)
    else:
        sx = (np.abs(xs).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    codes = np.clip(np.round(xs / sx), -127, 127).astype(np.int32)
    want = (codes @ q.astype(np.int32).T).astype(np.float64) * sx * s[:, 0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def int8_codes(x: np.ndarray, mode: str, static: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Independent of mocompile: (int32 codes, float32 scale per row) of x's rows."""
    if mode == "static":
        s = np.full((x.shape[0], 1), static, np.float32)
    else:
        amax = np.abs(x).max(-1, keepdims=True)
        s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    return np.clip(np.round(x / s), -127, 127).astype(np.int32), s


def integer_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Independent of mocompile: the signed weight codes of int8, or packed int4, codes."""
    if bits == 8:
        return q.astype(np.int64)
    codes = np.empty(q.shape[:-1] + (2 * q.shape[-1],), np.int64)
    codes[..., 0::2], codes[..., 1::2] = (q & 15).astype(np.int64) - 8, (q >> 4).astype(np.int64) - 8
    return codes


def integer_matmul(codes: np.ndarray, s_row: np.ndarray, weight) -> np.ndarray:
    """int8 activation codes x low-bit weight codes: exact integer sums per scale group,
    times the group's scale, summed over groups, times the row's scale (float64)."""
    q, s, bits = weight
    w = integer_codes(q, bits)
    groups = s.shape[-1]
    size = w.shape[-1] // groups
    out = 0.0
    for g in range(groups):
        part = codes[:, g * size:(g + 1) * size].astype(np.int64) @ w[:, g * size:(g + 1) * size].T
        out = out + part.astype(np.float64) * s[:, g]
    return out * s_row


def int8_activation_ffn(x: np.ndarray, gate, up, down, mode: str, static: float = 0.0) -> np.ndarray:
    """A feed-forward block over int8 activations in numpy: all three matmuls in integers,
    the hidden activation requantized per row; weights (codes, scales, bits)."""
    xc, xs = int8_codes(x, mode, static)
    h = silu(integer_matmul(xc, xs, gate)) * integer_matmul(xc, xs, up)
    return integer_matmul(*int8_codes(h.astype(np.float32), "token"), down)


def int8_activation_block_graph(mode: str, hidden: int, ffn: int, experts: int, seed: int, bits: int = 8,
                                group: int = 0):
    """x -> quantize_act -> mlp (or routed experts) with low-bit weights and a per-row hidden
    scale, as `quantize(w=int8|int4,a=int8)` leaves a block; returns the graph, the weights
    (codes, scales, bits) and the routing outputs (experts)."""
    r = rng(seed)
    g = Graph("int8_activation_block")
    x = g.add_input("x", TensorType(("rows", hidden), "float32"))
    extra = [g.add_param("x.scale", np.array([0.03], np.float32))] if mode == "static" else []
    xq = g.add("quantize_act", x, *extra, mode=mode)
    lead = (experts,) if experts else ()
    ws, deqs = [], []
    for name, shape in (("gate", (ffn, hidden)), ("up", (ffn, hidden)), ("down", (hidden, ffn))):
        q, s = quantize_weight((r.standard_normal(lead + shape) * 0.2).astype(np.float32), bits, group)
        ws.append((q, s, bits))
        deqs.append(g.add("dequantize", g.add_param(f"{name}.q", q), g.add_param(f"{name}.s", s), bits=bits))
    if experts:
        router = r.standard_normal((experts, hidden)).astype(np.float32)
        rw, ri = g.add_node("router.topk", [x, g.add_param("router", router)], {"top_k": 2})
        out = g.add("experts", xq, rw, ri, *deqs, hidden_quant="token")
    else:
        out = g.add("mlp", xq, *deqs, hidden_quant="token")
    g.outputs = [out]
    return g, ws, (rw, ri) if experts else None


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode,experts,bits,group", [("static", 0, 8, 0), ("token", 0, 8, 0), ("static", 8, 8, 0),
                                                     ("token", 8, 8, 0), ("token", 0, 4, 32), ("static", 8, 4, 16),
                                                     ("token", 8, 8, 16)])
def test_int8_activation_blocks_are_integer_arithmetic(mode, experts, bits, group, path):
    """A feed-forward block (dense or routed experts) over int8 activations runs all its
    matmuls on integer codes (int8 weights, or int4 unpacked in registers; exact int32 sums
    per scale group), the hidden activation requantized per row, matching numpy's integer
    arithmetic; a row's result is the same bits alone or among others (integer sums are
    exact, so a lone row's split reduction changes nothing). For a target without VNNI the
    float kernels read the rounded activations (input and hidden) and match the same
    reference to float32 rounding, batch-invariant too (one summation order per row)."""
    cpu = TARGETS[path]
    H, F = 64, 96 if not experts else 32
    g, ws, routing = int8_activation_block_graph(mode, H, F, experts, 21 + experts, bits, group)
    program = lower(g, target=cpu)
    kernels = {gv.name_hint for gv in program.mod.functions}
    if cpu.integer_matmuls:
        prefix = f"int8_grouped_e{experts}" if experts else "int8_dense"
        assert {k.removesuffix("_gathered").split("_q")[0] for k in kernels if k.startswith("int8_")} == {
            f"{prefix}_{H}x{F}_glu_silu", f"{prefix}_{F}x{H}_{'row_scale' if experts else 'plain'}"}
        assert not any(k.startswith(("quantize_act", "grouped_")) for k in kernels)  # no float matmul left
        if experts:  # the tokens are quantized once; the up GEMM reads each sorted row's codes through the plan
            assert any(k.startswith(f"{prefix}_{H}x{F}") and k.endswith("_gathered") for k in kernels)
            assert not any(k.startswith("gather_rows") for k in kernels)
        assert all(k.startswith(f"dense_{H}x{experts}_") for k in kernels if k.startswith("dense_"))  # but the router's
    else:  # float low-bit matmuls after the input's and the hidden activation's rounding kernels
        assert not any(k.startswith("int8_") for k in kernels)
        assert {k for k in kernels if k.startswith("quantize_act")} == {f"quantize_act_{mode}_k{H}",
                                                                         f"quantize_act_token_k{F}"}
        kind = f"grouped_e{experts}" if experts else "dense"
        assert sum(k.startswith(kind) and f"_q{bits}" in k for k in kernels) == 2
    exe = build(program, cpu.llvm(num_cores=2))
    skip_unless_runs_here(cpu)
    xs = rng(7).standard_normal((7, H)).astype(np.float32)
    got = exe.run({"x": xs})[g.outputs[0].name]
    if experts:
        interp = run(g, {"x": xs}, watch=list(routing))
        weights, chosen = interp[routing[0].name], interp[routing[1].name]
        want = np.zeros((7, H), np.float64)
        for t in range(7):
            for j, e in enumerate(chosen[t]):
                per_expert = [(q[e], s[e], b) for q, s, b in ws]
                want[t] += weights[t, j] * int8_activation_ffn(xs[t:t + 1], *per_expert, mode, 0.03)[0]
    else:
        want = int8_activation_ffn(xs, *ws, mode, 0.03)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    alone = exe.run({"x": xs[:1]})[g.outputs[0].name]
    np.testing.assert_array_equal(alone[0], got[0])
    np.testing.assert_allclose(run(g, {"x": xs})[g.outputs[0].name], got, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32)])
def test_weight_only_integer_matmul_keeps_float32_precision(bits, group, path):
    """Weight-only matmuls for a VNNI target split each float activation into three int8
    digits relative to its row's max |x| (s = max/127): each activation is then off by at
    most s / 2 / 254^2 (float32's precision at the row's largest element), however small it
    is, so even rows mixing 1e-3 and 1e3 stay within that bound times sum |w| (plus float32
    rounding of the combine), while a lost digit would be 254x over it. The float kernels
    (no VNNI) multiply the float activations: float32 rounding alone."""
    cpu = TARGETS[path]
    r = rng(31)
    K, N = 256, 48
    g = Graph("digits")
    x = g.add_input("x", TensorType(("rows", K), "float32"))
    w, w_ref = quantized_param(g, "w", r.standard_normal((N, K)).astype(np.float32), bits, group)
    g.outputs = [g.add("linear", x, w)]
    program = lower(g, target=cpu)
    digits = any(gv.name_hint.startswith("int8_dense") and "_d" in gv.name_hint for gv in program.mod.functions)
    assert digits == cpu.integer_matmuls
    exe = build(program, cpu.llvm(num_cores=2))
    skip_unless_runs_here(cpu)
    magnitude = np.float32(10) ** r.uniform(-3, 3, (5, K)).astype(np.float32)
    xs = (r.choice([-1, 1], (5, K)) * magnitude).astype(np.float32)
    got = exe.run({"x": xs})[g.outputs[0].name].astype(np.float64)
    x64 = xs.astype(np.float64)
    want = x64 @ w_ref.T
    step = np.abs(x64).max(1, keepdims=True) / 127
    rounding = 1e-6 * (np.abs(x64) @ np.abs(w_ref).T)
    bound = (step / 2 / 254 ** 2 * np.abs(w_ref).sum(1) if digits else 0) + rounding
    assert (np.abs(got - want) <= bound).all()
    assert np.abs(got - want).max() > 0  # not float64 by accident: the bound is what is tested


def test_hidden_quant_rounds_the_hidden_activation_per_row():
    """The IR's hidden_quant=token: the block's hidden activation is fake-quantized per row
    between the GLU and the down projection (the interpreter is the compile's reference)."""
    g, ws, _ = int8_activation_block_graph("token", 32, 48, 0, seed=4)
    node = g.nodes_of("mlp")[0]
    assert node.attrs["hidden_quant"] == "token"
    xs = rng(8).standard_normal((3, 32)).astype(np.float32)
    (got,) = run(g, {"x": xs}).values()
    gate, up, down = (dequantize_weight(q, s, bits) for q, s, bits in ws)
    xq = fake_quant(xs, "token")
    h = fake_quant((silu(xq @ gate.T) * (xq @ up.T)).astype(np.float32), "token")
    np.testing.assert_allclose(got, h @ down.T, rtol=1e-5, atol=1e-6)
    node.attrs["hidden_quant"] = "tensor"  # a whole-batch scale is not offered here
    with pytest.raises(VerifyError, match="hidden_quant"):
        verify(g)


# ---- the pass ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixtral_graph():
    return lower_source(source_for(EXAMPLES / "mixtral_tiny.moe", None, None, 0))


def quantize(graph: Graph, pipeline: str):
    out, reports = PassManager(pipeline).run(graph, PassContext())
    return out, reports[0]


def test_pipeline_options_and_errors():
    (p,) = parse_pipeline("quantize(w=int4,group=64,skip=router|attention)")
    assert isinstance(p, Quantize) and p.scheme.bits == 4 and p.scheme.group == 64
    assert "attention" not in p.roles and "router" not in p.roles and "experts" in p.roles
    for bad, msg in [("quantize(w=int3)", "int8 or int4"), ("quantize(skip=embedding)", "unknown skip"),
                     ("quantize(a=int8,dynamic=tensor)", "allow_batch_leak"), ("quantize(dynamic=token)", "a=int8"),
                     ("quantize(w=int8,smooth=0.5)", "W8A8"), ("quantize(bogus=1)", "bad options")]:
        with pytest.raises(MocompileError, match=msg):
            parse_pipeline(bad)


def test_weight_only_int8_report_and_sizes(mixtral_graph):
    g, report = quantize(mixtral_graph, "quantize(w=int8)")
    tensors = {t["tensor"]: t for t in report["tensors"]}
    experts = [t for name, t in tensors.items() if ".experts." in name]
    assert experts and all(t["bits"] == 8 for t in experts)
    ratio = sum(t["bytes_before"] for t in experts) / sum(t["bytes_after"] for t in experts)
    assert 3.8 < ratio <= 4.0  # int8 codes + one fp32 scale per output channel
    assert not any("router" in name for name in tensors)  # the router stays fp32 by default
    assert any(name == "lm_head.weight" for name in tensors)
    assert g.weights[next(n for n in g.params if n.startswith("layers.0.ffn.router"))].dtype == np.float32
    assert {str(a.dtype) for a in g.weights.values()} == {"float32", "int8"}
    acc = report["accuracy"]
    assert acc["samples"] == 16 and 0 < acc["mean_abs_error"] < acc["max_abs_error"]
    assert 0 < acc["kl_mean"] < 0.05 and 0.8 < acc["top1_agreement"] <= 1
    assert 0.95 < acc["routing_agreement"] <= 1 and acc["median_top1_margin"] > 0
    assert acc["max_flipped_margin"] > 0  # some near-tied positions flipped (report says how close)
    assert report["breaks_batch_isolation"] is False


TRAINED = sorted(p.stem for p in (EXAMPLES / "weights").glob("*.safetensors"))


def test_every_example_ships_trained_weights():
    assert TRAINED == sorted(p.stem for p in EXAMPLES.glob("*.moe"))


@pytest.mark.parametrize("name", TRAINED)
def test_int8_keeps_top1_of_the_trained_examples(name):
    """The accuracy bar: int8 weight-only keeps >= 99% of next-token top-1 choices against fp32
    on random-token inputs (64 sequences of 16 positions), on the examples with their trained
    weights (examples/train_synthetic.py). On random weights the logits are nearly flat and no
    quantizer can (the benchmark reports both)."""
    g = lower_source(source_for(EXAMPLES / f"{name}.moe", None, EXAMPLES / "weights" / f"{name}.safetensors", 0))
    _, report = quantize(g, "quantize(w=int8,calib=64)")
    acc = report["accuracy"]
    assert acc["samples"] == 64
    assert acc["top1_agreement"] >= 0.99, acc
    assert acc["median_top1_margin"] > 0.5  # a trained model: its top-1 stands clear of the rest


def test_int4_groups_shrink_experts_about_seven_times(mixtral_graph):
    g, report = quantize(mixtral_graph, "quantize(w=int4,group=32)")
    experts = [t for t in report["tensors"] if ".experts." in t["tensor"]]
    ratio = sum(t["bytes_before"] for t in experts) / sum(t["bytes_after"] for t in experts)
    assert 6.0 < ratio < 8.0  # 4 bits per weight + one fp32 scale per 32 weights: 32 bits / 5 bits = 6.4
    assert {t["group"] for t in experts} == {32}


def test_skip_keeps_roles_in_float32(mixtral_graph):
    _, report = quantize(mixtral_graph, "quantize(w=int8,skip=attention|lm_head)")
    names = [t["tensor"] for t in report["tensors"]]
    assert names and not any(".attn." in n or n == "lm_head.weight" for n in names)
    _, report = quantize(mixtral_graph, "quantize(w=int8,router=true)")
    assert any("router" in t["tensor"] for t in report["tensors"])


def test_quantized_graph_is_the_dequantized_model(mixtral_graph):
    """The interpreter of the quantized graph computes the fp32 model with every weight
    replaced by its dequantized value, and constant folding keeps the codes low-bit."""
    g, _ = quantize(mixtral_graph, "quantize(w=int4,group=32)")
    folded, _ = PassManager("fold-constants").run(g, PassContext())
    assert len(folded.nodes_of("dequantize")) == len(g.nodes_of("dequantize")) > 0
    ref = mixtral_graph.clone()
    for node in g.nodes_of("dequantize"):
        original = node.outputs[0].name.removesuffix(".deq")
        ref.weights[original] = dequantize_weight(g.weights[node.inputs[0].name], g.weights[node.inputs[1].name], 4)
    inputs = for_graph(g, None, token_ranges(g, {}), 1, 6, 3).inputs[0]
    (a,), (b,) = run(g, inputs).values(), run(ref, inputs).values()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_smoothing_is_exact_before_rounding(mixtral_graph):
    """SmoothQuant only moves scale between a norm and the weights reading it."""
    q = Quantize(w="int8", a="int8", smooth=0.5)
    g = mixtral_graph.clone()
    inputs = for_graph(g, None, token_ranges(g, {}), 2, 6, 0).inputs
    targets = [n for n in g.nodes if n.op in ("linear", "mlp", "experts", "router.topk")]
    smoothed = q._smooth(g, targets, inputs)
    assert smoothed and all(s["factor_range"][0] != s["factor_range"][1] for s in smoothed)
    for x in inputs:
        (a,), (b,) = run(g, x).values(), run(mixtral_graph, x).values()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_activation_modes_and_batch_isolation(mixtral_graph):
    g, report = quantize(mixtral_graph, "quantize(w=int8,a=int8,calib=4)")
    acts = report["activations"]
    assert acts and all(a["mode"] == "static" and a["scale"] > 0 for a in acts)
    assert analyze(g).verdict == "isolated"
    blocks = [n for n in g.nodes if n.op in ("mlp", "experts")]
    assert blocks and all(n.attrs["hidden_quant"] == "token" for n in blocks)  # down projections read int8 too
    assert report["hidden_per_token"] == [n.loc for n in blocks]
    g, _ = quantize(mixtral_graph, "quantize(w=int8,a=int8,dynamic=token)")
    assert analyze(g).verdict == "isolated"
    g, _ = quantize(mixtral_graph, "quantize(w=int8)")
    assert all(n.attrs["hidden_quant"] is None for n in g.nodes if n.op in ("mlp", "experts"))
    g, report = quantize(mixtral_graph, "quantize(w=int8,a=int8,dynamic=tensor,allow_batch_leak=true)")
    assert report["breaks_batch_isolation"] and "whole batch" in report["warning"]
    verdict = analyze(g)
    assert verdict.verdict == "leaks" and any(l.op == "quantize_act" for l in verdict.leaks)


# ---- compiled artifacts --------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifacts(artifact_cache):
    return {name: artifact_cache.load(EXAMPLES / "mixtral_tiny.moe", **options)
            for name, options in (("fp32", EXAMPLE_SHAPE), ("int8", {"passes": "quantize(w=int8)"}),
                                  ("int4", {"passes": "quantize(w=int4,group=32)"}))}


def expert_bytes(path) -> int:
    with safe_open(str(path / "weights.safetensors"), "np") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys() if "experts" in k)


def test_artifacts_are_verified_against_the_quantized_ir_and_report_drift(artifacts):
    for name in ("int8", "int4"):
        m = artifacts[name].manifest
        assert m["verification"]["reference"] == "IR interpreter" and m["verification"]["max_rel_error"] <= 1e-4
        drift = m["drift_from_fp32"]
        assert drift["reference"] == "eager torch model" and 0 < drift["max_rel_error"] < 1
        assert all("top1_agreement" in c for c in drift["checks"])
    assert "drift_from_fp32" not in artifacts["fp32"].manifest


@pytest.mark.parametrize("passes,integer", [("quantize(w=int8,a=int8,dynamic=token)", True),
                                            ("quantize(w=int4,group=32,a=int8,calib=4)", True),
                                            ("quantize(w=int4,group=4,a=int8,calib=4)", False)])
def test_int8_activation_artifacts_verify_decode_and_stay_isolated(passes, integer, tmp_path):
    """A whole model over int8 activations compiles and matches the quantized IR (plain
    forward and cached decoding), per-token scales keeping batch isolation: in integers on a
    VNNI host where the weights' scale groups hold whole panel words (int8, or int4 in
    groups of 8 or more); otherwise the float kernels read the rounded activations, the
    hidden one included (the rounding still happens, only not in integers)."""
    art = compile(EXAMPLES / "mixtral_tiny.moe", passes=passes, out_dir=tmp_path / "art")
    m = art.manifest
    assert m["verification"]["reference"] == "IR interpreter"
    assert m["decode_verification"]["reference"].startswith("the IR interpreter")
    assert m["isolation"]["verdict"] == "isolated"
    with safe_open(str(art.path / "weights.safetensors"), "np") as f:
        layouts = {k.split("@")[-1].rstrip("0123456789") for k in f.keys() if "experts" in k}
    assert ("vnni_panels" in layouts) == (integer and host_has_vnni()) and ("expert_glu_panels" in layouts)


SMOOTH_SPEC = """
model smooth_tiny {
    hidden = 64  heads = 4  kv_heads = 2  max_seq = 64
    modality text { vocab = 96 }
    moe sparse { experts = 4  top_k = 2  expert_hidden = 64 }
    layers = [sparse]
}
"""


def test_smoothquant_end_to_end(tmp_path):
    """quantize(w=int8,a=int8,smooth=0.5) compiled: every norm feeding matmuls is smoothed
    (report), and the artifact computes the smoothed W8A8 model, recomputed here with the IR
    interpreter on fresh inputs. Per position: a rounding step or routing flip may move a few
    positions, so most (not all) must match to 1e-4; the same scheme without smoothing
    matches at none, so a compile that dropped the smoothing fails."""
    from mocompile.runtime import random_inputs

    spec = tmp_path / "smooth.moe"
    spec.write_text(SMOOTH_SPEC)
    pipeline = "quantize(w=int8,a=int8,smooth=0.5)"
    art = compile(spec, passes=pipeline, out_dir=tmp_path / "art", batch=1, seq=3)
    smoothed = art.manifest["passes"][0]["smoothed"]
    assert [s["value"] for s in smoothed] == ["attn_norm", "ffn_norm", "norm"]
    assert smoothed[2]["readers"] == ["lm_head"] and "layers.0.ffn.experts" in smoothed[1]["readers"]
    assert all(lo < hi for lo, hi in (s["factor_range"] for s in smoothed))  # per-channel factors
    graph = lower_source(source_for(spec, None, None, 0))
    ctx = lambda: PassContext(target="cpu", input_ranges={"text": 96})  # what compile gives the pass
    want, _ = PassManager(pipeline).run(graph, ctx())
    plain, _ = PassManager("quantize(w=int8,a=int8)").run(graph, ctx())

    def positions_matching(got, ref):
        return float(np.mean(np.abs(got - ref).max(-1) <= 1e-4 * np.abs(ref).max()))

    for batch, seq, seed in ((1, 5, 9), (3, 7, 9), (4, 8, 1)):
        inputs = random_inputs(art.signature, batch, seq, seed=seed)
        got, ref = art.run(inputs)["logits"], run(want, inputs)["logits"]
        assert positions_matching(got, ref) >= 0.75, (batch, seq)  # measured: 95-100%
        assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.9
        assert positions_matching(run(plain, inputs)["logits"], ref) <= 0.1  # measured: 0%


def test_artifacts_keep_weights_low_bit(artifacts):
    fp32, int8, int4 = (expert_bytes(artifacts[n].path) for n in ("fp32", "int8", "int4"))
    assert 3.8 < fp32 / int8 <= 4.0 and 6.0 < fp32 / int4 < 8.0
    with safe_open(str(artifacts["int4"].path / "weights.safetensors"), "np") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys() if "experts" in k}
    # codes (on a VNNI host packed 8 int4 codes per int32 word, see layout.py) and their group
    # scales, in float16 (test_half_scales.py)
    assert dtypes == {"int32" if host_has_vnni() else "uint8", "float16"}


LOAD_PEAK = """
import sys
from mocompile.runtime import import_tvm_without_torch, load, random_inputs


def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))


import_tvm_without_torch()
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
before = status("VmRSS")
art = load(sys.argv[1])
art.run(random_inputs(art.signature, 1, 4))
print(status("VmHWM") - before)
"""


def test_loading_does_not_inflate_memory(artifacts):
    """Peak RSS growth from loading and running an artifact, in a fresh process: low-bit
    weights are never expanded to fp32, so the int8 artifact costs a fraction of fp32's."""
    growth = {}
    for name in ("fp32", "int8"):
        out = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(artifacts[name].path)], capture_output=True,
                             text=True, check=True, env={**os.environ, "TVM_THREAD_POOL_SPIN_COUNT": "0"})
        growth[name] = int(out.stdout.strip().splitlines()[-1])
    weights = {n: (artifacts[n].path / "weights.safetensors").stat().st_size for n in growth}
    assert growth["fp32"] >= weights["fp32"]  # the measurement sees the weights
    # Peak RSS does not depend on how busy the machine is, and repeats to ~0.2 MB between
    # runs (measured: fp32 17.7 MB, int8 6.6 MB of growth for 6.9 / 2.0 MB of weights). What
    # the runtime costs besides the weights (its library, thread pool, workspace) is the same
    # for both artifacts and cancels in the difference, so no absolute bound that depends on
    # the host (its core count) is needed. An int8 artifact whose codes were expanded to fp32
    # at load would grow at least as much as the fp32 one; asking it to save only half of the
    # bytes its codes save leaves ~2.5 MB of headroom, over ten times the run-to-run spread.
    assert growth["fp32"] - growth["int8"] >= 0.5 * (weights["fp32"] - weights["int8"]), growth
