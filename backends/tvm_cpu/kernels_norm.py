"""RMSNorm and LayerNorm over the last axis: one row per task, vector lanes across the
hidden dimension, fp32 statistics (same math as the interpreter)."""

from __future__ import annotations

import functools

from tvm import tirx

from mocompile.backends.tvm_common import contracts as C
from mocompile.backends.tvm_cpu import tir_util as U


def _add(a, b):
    return a + b


@functools.cache
def norm(kind: str, hidden: int, eps: float) -> tirx.PrimFunc:
    """kind "rms": y = x / sqrt(mean(x^2) + eps) * w;  kind "layer": (x - mean) / sqrt(var + eps) * w + b."""
    lanes = U.lanes_for(hidden)
    inv_h = U.f32(1.0 / hidden)
    with U.kernel(C.norm_name(kind, hidden, eps)) as kern:
        m, x, w, b, y = C.norm(kind, hidden)

        def row(i):
            stats = U.scratch((3,))  # mean, 1/std, sum
            if kind == "layer":
                U.emit_reduce(stats, (2,), lambda c: x[i, c], hidden, _add)
                U.store(stats, (0,), stats[2] * inv_h)
                mean = stats[0]
                U.emit_reduce(stats, (2,), lambda c: (x[i, c] - mean) * (x[i, c] - mean), hidden, _add)
            else:
                U.emit_reduce(stats, (2,), lambda c: x[i, c] * x[i, c], hidden, _add)
            U.store(stats, (1,), U.f32(1) / tirx.sqrt(stats[2] * inv_h + U.f32(eps)))
            with U.serial(0, hidden // lanes) as c:
                with U.vectorized(0, lanes) as l:
                    col = c * lanes + l
                    if kind == "layer":
                        U.store(y, (i, col), (x[i, col] - stats[0]) * stats[1] * w[col] + b[col])
                    else:
                        U.store(y, (i, col), x[i, col] * stats[1] * w[col])

        U.parallel_for(m, 8 * m * hidden, row)
    return kern.func
