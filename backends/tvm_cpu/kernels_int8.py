"""W8A8 linear layers in integer arithmetic: int8 activations x int8 weights, exact int32
sums with AVX-512 VNNI (vpdpbusd: 64 byte products summed into 16 int32 lanes per
instruction), one float multiply per output in the write-back.

- `quantize_packed`: x[m, k] float32 -> int8 codes q = clamp(round(x / s), -127, 127) stored
  as unsigned bytes q + 128 (vpdpbusd multiplies unsigned by signed bytes), four per int32,
  and the scale s per row (static: the calibrated constant; token: max |row| / 127);
- `int8_matmul`: y = (sum_k (q+128) * w - 128 * sum_k w) * s_row * s_col (+ bias, + residual),
  weights in the `vnni_panels` layout (layout.py) with their `vnni_colsum` correction.

The arithmetic is exactly the quantize_act -> linear(dequantize) pair of the IR
(mocompile/ir/ops/quant.py): same codes, same scales; the integer sum is exact where the
IR's float sum rounds, so the two agree to float32 rounding.
"""

from __future__ import annotations

import functools

from tvm import tirx

from mocompile.backends.tvm_cpu import tir_util as U
from mocompile.backends.tvm_cpu.kernels_matmul import Epilogue, _writer, residual_args
from mocompile.backends.tvm_cpu.kernels_quant import emit_row_scale, int8_code
from mocompile.backends.tvm_cpu.layout import VNNI_LANES

LANES = VNNI_LANES
ROWS = 4  # rows per register tile: each weight vector loaded serves 4 rows


def _lanes():
    return tirx.Ramp(0, 1, LANES)


def _vpdpbusd(acc, a_bytes, b_bytes):
    """acc[i32 x16] + per lane the dot product of 4 unsigned bytes of a with 4 signed bytes of b."""
    return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                      tirx.reinterpret("int8x64", a_bytes), tirx.reinterpret("int8x64", b_bytes))


@functools.cache
def quantize_packed(k: int, mode: str) -> tirx.PrimFunc:
    """x[m, k] (+ scale[1] for "static") -> codes[m, k/4] int32 (4 unsigned bytes), s[m]."""
    if mode not in ("static", "token") or k % 4:
        raise ValueError(f"packed int8 activations need a static or per-token scale and k % 4 == 0 ({mode}, {k})")
    m = U.dim("m")
    with U.kernel(f"quantize_packed_{mode}_k{k}") as kern:
        x = U.arg("x", (m, k))
        static = U.arg("scale", (1,)) if mode == "static" else None
        codes = U.arg("codes", (m, k // 4), "int32")
        scale = U.arg("s", (m,))

        def row(i):
            s = U.scratch((1,))
            emit_row_scale(s, x, i, k, mode, static)
            U.store(scale, (i,), s[0])
            with U.serial(0, k // 4) as c4:
                word = tirx.IntImm("int32", 0)
                for t in range(4):  # byte t of the word: code of input 4*c4 + t, offset to unsigned
                    byte = tirx.Cast("int32", int8_code(x[i, c4 * 4 + t], s[0])) + 128
                    word = word | tirx.shift_left(byte, tirx.IntImm("int32", 8 * t))
                U.store(codes, (i, c4), word)

        U.parallel_for(m, 8 * m * k, row)
    return kern.func


@functools.cache
def int8_matmul(k: int, n: int, epi: Epilogue) -> tirx.PrimFunc:
    """y[m, n] = epilogue(dequantized int8 x int8 product); see the module docstring."""
    if epi.glu or epi.activation or epi.row_scale or k % 4:
        raise ValueError("int8_matmul computes linear layers (bias / residual epilogues) with k % 4 == 0")
    nb = -(-n // LANES)
    k4 = k // 4
    m = U.dim("m")
    with U.kernel(f"int8_dense_{k}x{n}_{epi.tag()}") as kern:
        codes = U.arg("codes", (m, k4), "int32")
        xs = U.arg("x_scale", (m,))
        w = U.arg("w", (nb, k4, LANES), "int32")
        colsum = U.arg("w_colsum", (nb, LANES), "int32")
        ws = U.arg("w_scale", (nb, 1, LANES))
        bias = U.arg("bias", (n,)) if epi.bias else None
        residuals = residual_args(epi, m, n)
        y = U.arg("y", (m, n))

        def rows(jb, r0, count: int) -> None:
            """`count` rows from r0 against panel jb: int32 tiles, then scaled write-back."""
            acc = [U.scratch((LANES,), "int32") for _ in range(count)]
            for a in acc:
                U.store(a, (_lanes(),), tirx.Broadcast(tirx.IntImm("int32", 0), LANES))
            with U.serial(0, k4) as c:
                wv = w[jb, c, _lanes()]
                for i, a in enumerate(acc):
                    U.store(a, (_lanes(),), _vpdpbusd(a[_lanes()], tirx.Broadcast(codes[r0 + i, c], LANES), wv))
            tile = U.scratch((count, LANES))
            for i, a in enumerate(acc):
                with U.vectorized(0, LANES) as j:
                    exact = tirx.Cast("float32", a[j] - colsum[jb, j])
                    U.store(tile, (i, j), exact * xs[r0 + i] * ws[jb, 0, j])
            write = _writer(y, n, LANES, jb, Epilogue(bias=epi.bias, residual=epi.residual), bias=bias,
                            residuals=residuals)
            for i in range(count):
                write(r0 + i, tile, i)

        def panel(jb):
            with U.serial(0, m // ROWS) as t:
                rows(jb, t * ROWS, ROWS)
            with U.serial(0, m % ROWS) as t:
                rows(jb, m // ROWS * ROWS + t, 1)

        U.parallel_for(nb, nb * k * LANES + 4 * m * (k + n) + m * k * nb * LANES // 8, panel)
    return kern.func
