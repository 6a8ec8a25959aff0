"""Activation quantization on a GPU (`quantize_act` where its readers compute in float):
x rounded to int8 codes and back, per row, with the interpreter's arithmetic (kernel_math's
act_scale and int8_code). "static" and "token" scales: one block per row, the row's max |x| by
a block reduction; "tensor" (a whole-batch max, which the isolation analysis reports): one
block over every row, so the maximum is complete before any row is rounded."""

from __future__ import annotations

import functools

from tvm import tirx

from mocompile.backends.tvm_common import contracts as C
from mocompile.backends.tvm_common.kernel_math import act_scale, int8_code
from mocompile.backends.tvm_gpu import gpu_util as G
from mocompile.ir.ops.quant import ACT_MODES


@functools.cache
def quantize_rows(k: int, mode: str) -> tirx.PrimFunc:
    """y[m, k] = fake-quantized x[m, k] (inputs x[, scale[1] for "static"])."""
    if mode not in ACT_MODES:
        raise ValueError(f"unknown activation quantization mode {mode!r}")
    threads = G.threads_for(k)
    whole = mode == "tensor"
    with G.kernel(f"quantize_act_{mode}_k{k}") as kern:
        m, x, static, y = C.quantize_rows(k, mode)
        with G.grid(1 if whole else m) as i:
            red = G.shared((threads,))
            with G.block(threads) as tid:
                amax = G.local((1,))
                G.store(amax, (0,), G.f32(0))
                if mode != "static":
                    items = m * k if whole else k
                    G.strided(tid, items, threads, lambda c: G.store(
                        amax, (0,), tirx.max(amax[0], tirx.abs(x[c // k, c % k] if whole else x[i, c]))))
                    G.store(red, (tid,), amax[0])
                    G.store(amax, (0,), act_scale(G.block_reduce(red, tid, threads, tirx.max)))
                else:
                    G.store(amax, (0,), static[0])
                if whole:
                    G.strided(tid, m * k, threads, lambda c: G.store(
                        y, (c // k, c % k), int8_code(x[c // k, c % k], amax[0]) * amax[0]))
                else:
                    G.strided(tid, k, threads, lambda c: G.store(y, (i, c), int8_code(x[i, c], amax[0]) * amax[0]))
    return kern.func
