"""Row-wise GPU kernels: one block per row (or per token position), the block's threads
across the row's features.

- `gather_rows`: table rows by index (embedding, MoE token copies); indices clamped; a 16-bit
  table widened to float32 as it is copied;
- `norm`: RMSNorm / LayerNorm, the row's statistics by a block reduction in shared memory;
- `quantize_rows`: activation rounding (quantize_act), the row's scale by a block max;
- `moe_combine`: a token's top-k expert rows summed in slot order (+ residuals);
- `rope_table`: cos/sin of positions past..past+s-1, one block per position;
- `cache_rows`: value rows written into the cache at positions past.. (in place).
"""

from __future__ import annotations

import functools

from tvm import tirx

from mocompile.backends.tvm_common import contracts as C
from mocompile.backends.tvm_common.panel_math import table_value
from mocompile.backends.tvm_common.specs import Epilogue
from mocompile.backends.tvm_gpu import gpu_util as G


@functools.cache
def gather_rows(hidden: int, index_dtype: str = "int32", table_rows: int | None = None,
                table_dtype: str = "float32") -> tirx.PrimFunc:
    """table[n, hidden], index[p] -> out[p, hidden]; a "bfloat16" / "float16" table (uint16
    bits) is widened to float32 as its rows are copied (float16 by integer ops, G.HALF_TYPE)."""
    threads = G.threads_for(hidden)
    with G.kernel(C.gather_rows_name(hidden, index_dtype, table_rows, table_dtype)) as kern:
        n, p, table, index, out = C.gather_rows(hidden, index_dtype, table_rows, table_dtype)
        with G.grid(p) as r:
            with G.block(threads) as tid:
                src = tirx.min(tirx.max(G.i64(index[r]), 0), n - 1)
                G.strided(tid, hidden, threads,
                          lambda c: G.store(out, (r, c), table_value(table_dtype, table[src, c], G.HALF_TYPE)))
    return kern.func


def _add(a, b):
    return a + b


@functools.cache
def norm(kind: str, hidden: int, eps: float) -> tirx.PrimFunc:
    """kind "rms": y = x / sqrt(mean(x^2) + eps) * w;  "layer": (x - mean) / sqrt(var + eps) * w + b."""
    threads = G.threads_for(hidden)
    inv_h = G.f32(1.0 / hidden)
    with G.kernel(C.norm_name(kind, hidden, eps)) as kern:
        m, x, w, b, y = C.norm(kind, hidden)
        with G.grid(m) as i:
            part = G.shared((threads,))
            with G.block(threads) as tid:
                acc = G.local((1,))

                def row_sum(value):
                    G.store(acc, (0,), G.f32(0))
                    G.strided(tid, hidden, threads, lambda c: G.store(acc, (0,), acc[0] + value(c)))
                    G.store(part, (tid,), acc[0])
                    return G.block_reduce(part, tid, threads, _add)

                mean = G.local((1,))
                if kind == "layer":
                    G.store(mean, (0,), row_sum(lambda c: x[i, c]) * inv_h)
                    G.barrier()  # every thread has read part[0] before it is reused
                    total = row_sum(lambda c: (x[i, c] - mean[0]) * (x[i, c] - mean[0]))
                else:
                    total = row_sum(lambda c: x[i, c] * x[i, c])
                G.store(acc, (0,), G.f32(1) / tirx.sqrt(total * inv_h + G.f32(eps)))
                if kind == "layer":
                    G.strided(tid, hidden, threads,
                              lambda c: G.store(y, (i, c), (x[i, c] - mean[0]) * acc[0] * w[c] + b[c]))
                else:
                    G.strided(tid, hidden, threads, lambda c: G.store(y, (i, c), x[i, c] * acc[0] * w[c]))
    return kern.func


@functools.cache
def moe_combine(hidden: int, top_k: int, residuals: int = 0) -> tirx.PrimFunc:
    """out[i, :] = sum_j ys[pair_row[i*k + j], :]  (+ residual[i, :] (+ residual2[i, :]))."""
    threads = G.threads_for(hidden)
    epi = Epilogue(residual=residuals)
    with G.kernel(f"moe_combine_h{hidden}_k{top_k}{'_' + epi.tag() if residuals else ''}") as kern:
        t, ys, pair_row, res, out = C.moe_combine(hidden, top_k, residuals)
        with G.grid(t) as i:
            with G.block(threads) as tid:
                def column(c):
                    v = ys[G.i64(pair_row[i * top_k]), c]
                    for j in range(1, top_k):  # fixed order: slot 0 first, then the residuals
                        v = v + ys[G.i64(pair_row[i * top_k + j]), c]
                    for r in res:
                        v = v + r[i, c]
                    G.store(out, (i, c), v)

                G.strided(tid, hidden, threads, column)
    return kern.func


@functools.cache
def rope_table(head_dim: int) -> tirx.PrimFunc:
    """inv_freq[D/2], past, s -> cs[s, 2, D/2] (cos, sin of (past + position) * inv_freq)."""
    half = head_dim // 2
    threads = G.threads_for(half)
    with G.kernel(f"rope_table_d{head_dim}") as kern:
        past, s, inv_freq, cs = C.rope_table(head_dim)
        with G.grid(s) as pos:
            with G.block(threads) as tid:
                def entry(i):
                    angle = tirx.Cast("float32", past + pos) * inv_freq[i]
                    G.store(cs, (pos, 0, i), tirx.cos(angle))
                    G.store(cs, (pos, 1, i), tirx.sin(angle))

                G.strided(tid, half, threads, entry)
    return kern.func


@functools.cache
def cache_rows(width: int) -> tirx.PrimFunc:
    """x[B, S, W], past -> cache[B, L, W] with rows past..past+S-1 replaced (in place)."""
    threads = G.threads_for(width)
    with G.kernel(f"cache_rows_w{width}") as kern:
        b, s, past, x, cache = C.cache_rows(width)
        with G.grid(b * s) as task:
            with G.block(threads) as tid:
                bi, j = task // s, task % s
                G.strided(tid, width, threads, lambda c: G.store(cache, (bi, past + j, c), x[bi, j, c]))
    return kern.func
