"""Activation quantization (`quantize_act`): x rounded to int8 codes and back, per row.

The scale is a calibrated constant ("static"), the max |x| of each row ("token"), or the
max |x| of the whole tensor ("tensor": a whole-batch reduction, so samples influence each
other; the isolation analysis reports it). Same arithmetic as the interpreter
(mocompile/ir/ops/quant.py): s = amax / 127 (1 if amax is 0), q = clamp(round-half-even(x / s),
-127, 127), y = q * s.
"""

from __future__ import annotations

import functools

from tvm import tirx

from mocompile.backends.tvm_common import contracts as C
from mocompile.backends.tvm_common.kernel_math import act_scale, int8_code
from mocompile.backends.tvm_cpu import tir_util as U
from mocompile.ir.ops.quant import ACT_MODES


def emit_row_scale(s, x, i, k: int, mode: str, static=None, whole=None) -> None:
    """s[0] = the scale row i of x[m, k] is quantized with: the static one, its own max |x| /
    127 ("token"), or the whole tensor's (`whole[0]` holds its max |x|, "tensor")."""
    if mode == "static":
        U.store(s, (0,), static[0])
    elif mode == "token":
        U.emit_reduce(s, (0,), lambda c: tirx.abs(x[i, c]), k, tirx.max)
        U.store(s, (0,), act_scale(s[0]))
    else:
        U.store(s, (0,), act_scale(whole[0]))


@functools.cache
def quantize_rows(k: int, mode: str) -> tirx.PrimFunc:
    """y[m, k] = fake-quantized x[m, k] (inputs x[, scale[1] for "static"])."""
    if mode not in ACT_MODES:
        raise ValueError(f"unknown activation quantization mode {mode!r}")
    lanes = U.lanes_for(k)
    with U.kernel(f"quantize_act_{mode}_k{k}") as kern:
        m, x, static, y = C.quantize_rows(k, mode)
        whole = U.local((1,))
        if mode == "tensor":  # one max over every row first (this is the cross-sample read)
            row_max = U.scratch((1,))
            U.store(whole, (0,), U.f32(0))
            with U.serial(0, m) as i:
                U.emit_reduce(row_max, (0,), lambda c: tirx.abs(x[i, c]), k, tirx.max)
                U.store(whole, (0,), tirx.max(whole[0], row_max[0]))

        def row(i):
            s = U.scratch((1,))
            emit_row_scale(s, x, i, k, mode, static, whole)
            with U.serial(0, k // lanes) as c:
                with U.vectorized(0, lanes) as l:
                    col = c * lanes + l
                    U.store(y, (i, col), int8_code(x[i, col], s[0]) * s[0])

        U.parallel_for(m, 8 * m * k, row)
    return kern.func
