"""Group scales in float16: the quantize pass rounds the scales of group-quantized weights to
float16 values (and computes the codes against them), and the CPU kernels store those scales
in 2 bytes and widen them as they read them (int4 in groups of 32: 4.5 bits per weight, as
GGUF's Q4_0, instead of 5). The values are the same in either storage, so a kernel reading
float16 scale panels computes the same bits as one reading float32 panels of them."""

from __future__ import annotations

import os
import re

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np
import pytest

from mocompile.backends.tvm_common.layout import pack
from mocompile.backends.tvm_cpu import build, lower
from mocompile.ir.graph import Graph
from mocompile.ir.interpreter import run
from mocompile.ir.ops.quant import HALF_RANGE, dequantize_weight, quantize_weight
from mocompile.ir.types import TensorType
from mocompile.pass_manager import PassManager

from cpu_targets import PATHS, TARGETS, skip_unless_runs_here


@pytest.mark.parametrize("bits", [8, 4])
def test_float16_scales_are_exact_and_the_codes_fit_them(bits: int) -> None:
    """Every scale is a float16 value, and each weight is within half a step of its group's
    rounded scale (the codes are computed against the rounded scale, not the exact one);
    groups too small or too large for float16 get its smallest / largest scale."""
    r = np.random.default_rng(0)
    w = (r.standard_normal((6, 64)) * 10.0 ** r.uniform(-3, 3, (6, 1))).astype(np.float32)
    w[0, :32] = 1e-12  # below float16's range: codes round towards 0
    w[1, :32] = 0.0
    q, s = quantize_weight(w, bits, 32, "float16")
    assert s.dtype == np.float32
    np.testing.assert_array_equal(s.astype(np.float16).astype(np.float32), s)
    assert s[0, 0] == np.float32(HALF_RANGE[0]) and s[1, 0] == 1.0
    err = np.abs(dequantize_weight(q, s, bits) - w).reshape(6, 2, 32)
    assert (err <= s[..., None] / 2 * (1 + 1e-6) + 1e-12).all()
    q32, s32 = quantize_weight(w, bits, 32)
    assert not np.array_equal(s32, s)  # the float32 scales are not float16 values: rounding happened
    with pytest.raises(ValueError, match="scales must be one of"):
        quantize_weight(w, bits, 32, "bfloat16")


def test_the_quantize_pass_keeps_group_scales_in_float16_and_row_scales_in_float32() -> None:
    g = Graph("q")
    x = g.add_input("x", TensorType(("rows", 64), "float32"))
    w = g.add_param("w", np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32))
    g.outputs = [g.add("linear", x, w)]
    for passes, scales, scale_bytes in (("quantize(w=int4,group=32)", "float16", 2),
                                        ("quantize(w=int8)", "float32", 4)):
        out, reports = PassManager(passes).run(g.clone())
        deq = next(n for n in out.nodes if n.op == "dequantize")
        assert deq.attrs["scales"] == scales
        tensor = reports[0]["tensors"][0]
        codes, s = (out.weights[v.name] for v in deq.inputs)
        assert tensor["scales"] == scales and tensor["bytes_after"] == codes.nbytes + s.size * scale_bytes


def test_a_layout_stores_float16_only_what_float16_holds() -> None:
    exact = np.array([[0.5, 1.0 / 1024, 3.0, 65504.0]], np.float32)
    packed = pack("panels", [exact], 4, "float16")
    assert packed.dtype == np.float16 and np.array_equal(packed.astype(np.float32), pack("panels", [exact], 4))
    with pytest.raises(ValueError, match="not exact in float16"):
        pack("panels", [exact + np.float32(1e-4)], 4, "float16")


def _graph(bits: int, glu: bool) -> Graph:
    """A linear (or a gated feed-forward block) with group-quantized weights from the pass."""
    r = np.random.default_rng(2)
    g = Graph("half")
    x = g.add_input("x", TensorType(("rows", 128), "float32"))
    if glu:
        ws = [g.add_param(n, (r.standard_normal(shape) * 0.2).astype(np.float32))
              for n, shape in (("gate", (64, 128)), ("up", (64, 128)), ("down", (128, 64)))]
        g.outputs = [g.add("mlp", x, *ws)]
    else:
        g.outputs = [g.add("linear", x, g.add_param("w", (r.standard_normal((48, 128)) * 0.2).astype(np.float32)))]
    out, _ = PassManager(f"quantize(w=int{bits},group=32)").run(g)
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits,glu", [(4, False), (4, True), (8, False)])
def test_kernels_read_float16_scale_panels_and_compute_the_same_bits(bits: int, glu: bool, path: str) -> None:
    """On every CPU kernel path (integer VNNI, float AVX-512, AVX2) the scale panels are
    float16, widened by vector conversions (never one value at a time), and the results equal
    bit for bit those of the same graph lowered with float32 scale panels (same values)."""
    cpu = TARGETS[path]
    g = _graph(bits, glu)
    wide = g.clone()
    for n in wide.nodes:
        if n.op == "dequantize":
            n.attrs["scales"] = "float32"
    half_program, wide_program = lower(g, target=cpu), lower(wide, target=cpu)
    scale_dtypes = {w.dtype for w in half_program.weights if ".scale" in w.name}
    assert scale_dtypes == {"float16"}, scale_dtypes
    assert {w.dtype for w in wide_program.weights if ".scale" in w.name} == {"float32"}
    half_bytes = sum(a.nbytes for a in half_program.weight_arrays())
    assert half_bytes < sum(a.nbytes for a in wide_program.weight_arrays())
    exe = build(half_program, cpu.llvm(num_cores=2))
    asm = exe.exe.mod.imports[0].inspect_source("asm")
    assert re.search(r"vcvtph2ps\s", asm)
    assert not re.search(r"call\w*\s+\S*extendhfsf2", asm) and "vcvtsh2ss" not in asm
    skip_unless_runs_here(cpu)
    xs = np.random.default_rng(3).standard_normal((5, 128)).astype(np.float32)
    got = exe.run({"x": xs})[g.outputs[0].name]
    want = build(wide_program, cpu.llvm(num_cores=2)).run({"x": xs})[g.outputs[0].name]
    np.testing.assert_array_equal(got, want)
    ref = run(g, {"x": xs})[g.outputs[0].name]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
