"""The data-movement kernels of the sparse MoE block (the GEMMs are in kernels_matmul.py).

Dispatch, per call (t tokens, k experts each, P = t*k (token, slot) pairs):
1. `moe_plan`    counts pairs per expert, exclusive cumsum -> indptr[E+1], and assigns each
                 pair a row in expert-sorted order (stable: token order within an expert):
                 row_token[r], row_weight[r] (routing weight) and pair_row[p] (its inverse).
2. gather       xs[r] = x[row_token[r]]: the token copies, grouped by expert
                 (kernels_gather.gather_rows).
3. grouped GEMMs (kernels_matmul.grouped_matmul): h = act(xs W_gate_e) * (xs W_up_e) and
                 ys = row_weight * (h W_down_e), each expert over its own rows only.
4. `moe_combine` out[t] = sum_j ys[pair_row[t*k + j]] (+ residual): a gather, so no atomics
                 and a deterministic summation order.
"""

from __future__ import annotations

import functools

from tvm import tirx

from mocompile.backends.tvm_common import contracts as C
from mocompile.backends.tvm_cpu import tir_util as U
from mocompile.backends.tvm_cpu.kernels_matmul import Epilogue


@functools.cache
def moe_plan(experts: int, top_k: int) -> tirx.PrimFunc:
    """indices[t, k] int32, weights[t, k] -> indptr[E+1], row_token[P], row_weight[P], pair_row[P].

    O(t*k + E) sequential work: a counting sort. It is the only serial kernel; it reads no
    activations or weights, so it stays negligible next to the GEMMs it plans.
    """
    with U.kernel(f"moe_plan_e{experts}_k{top_k}", serial=True) as kern:
        t, indices, weights, indptr, row_token, row_weight, pair_row = C.moe_plan(experts, top_k)
        cursor = U.local((experts,), "int32")

        def expert(i, j):  # clamped: a corrupt index must not write out of bounds
            return tirx.min(tirx.max(indices[i, j], 0), experts - 1)

        # count per expert (shifted by one), then exclusive cumsum -> indptr; cursor = starts
        with U.serial(0, experts + 1) as e:
            U.store(indptr, (e,), tirx.IntImm("int32", 0))
        with U.serial(0, t) as i:
            with U.serial(0, top_k) as j:
                e = expert(i, j)
                U.store(indptr, (e + 1,), indptr[e + 1] + 1)
        with U.serial(0, experts) as e:
            U.store(indptr, (e + 1,), indptr[e + 1] + indptr[e])
            U.store(cursor, (e,), indptr[e])
        # place every pair at its expert's cursor (token order within an expert)
        with U.serial(0, t) as i:
            with U.serial(0, top_k) as j:
                e = expert(i, j)
                r = cursor[e]
                U.store(row_token, (r,), tirx.Cast("int32", i))
                U.store(row_weight, (r,), weights[i, j])
                U.store(pair_row, (i * top_k + j,), r)
                U.store(cursor, (e,), r + 1)
    return kern.func


@functools.cache
def moe_combine(hidden: int, top_k: int, residuals: int = 0) -> tirx.PrimFunc:
    """out[i, :] = sum_j ys[pair_row[i*k + j], :]  (+ residual[i, :] (+ residual2[i, :]))."""
    lanes = U.lanes_for(hidden)
    epi = Epilogue(residual=residuals)
    with U.kernel(f"moe_combine_h{hidden}_k{top_k}{'_' + epi.tag() if residuals else ''}") as kern:
        t, ys, pair_row, res, out = C.moe_combine(hidden, top_k, residuals)

        def row(i):
            with U.serial(0, hidden // lanes) as c:
                with U.vectorized(0, lanes) as l:
                    col = c * lanes + l
                    v = ys[U.i64(pair_row[i * top_k]), col]
                    for j in range(1, top_k):  # fixed order: slot 0 first, then the residuals
                        v = v + ys[U.i64(pair_row[i * top_k + j]), col]
                    for r in res:
                        v = v + r[i, col]
                    U.store(out, (i, col), v)

        U.parallel_for(t, 4 * t * hidden * (top_k + 2), row)
    return kern.func
