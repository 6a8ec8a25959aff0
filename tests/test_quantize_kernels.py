"""Quantization's arithmetic: the number formats (int8 per channel, int4 in groups, two nibbles
a byte) and the low-bit kernels (weight-only, W8A8 / W4A8 blocks, experts) on every CPU path,
each against a numpy reference of the same quantized arithmetic."""

from __future__ import annotations

import os

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np
import pytest

from mocompile.backends.tvm_cpu import build, host_target, lower
from mocompile.ir.graph import Graph
from mocompile.ir.interpreter import run
from mocompile.ir.ops.quant import dequantize_weight, fake_quant, pack_int4, quantize_weight, unpack_int4
from mocompile.ir.types import TensorType
from mocompile.ir.verifier import VerifyError, verify
from mocompile.passes.quantize import effective_group

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
