"""The MoE routing kernels on a GPU: router top-k and the dispatch plan (token sort by expert).

`router_topk`: one thread per token (blocks of WARP tokens), mirroring mocompile.ir.ops.moe.route
exactly as the CPU kernel does: modality groups mask logits to -inf outside the token's group;
softmax or sigmoid scores; choice = score (+ score bias); group limiting; top-k by repeated
argmax with ties to the lower index; weights renormalised and scaled. A token's work is
O(E * k), small next to its logits matmul.

`moe_plan`: the counting sort of (token, slot) pairs by expert, as one block with a thread per
expert: thread e counts its pairs, the block's counts become indptr by a prefix sum in shared
memory, and thread e writes its pairs' rows in token order (so the order within an expert is
the CPU plan's and the interpreter's). Every expert's walk over the pairs runs in parallel.
"""

from __future__ import annotations

import functools

from tvm import tirx

from mocompile.backends.tvm_common import contracts as C
from mocompile.backends.tvm_common.routing import route_token
from mocompile.backends.tvm_common.specs import RouterSpec
from mocompile.backends.tvm_gpu import gpu_util as G

@functools.cache
def router_topk(spec: RouterSpec) -> tirx.PrimFunc:
    """logits[t, E] (+ score_bias[E]) (+ modality[t] int32) -> weights[t, k] f32, indices[t, k] int32."""
    with G.kernel(f"router_topk_{spec.tag()}") as kern:
        t, logits, bias, modality, weights, indices = C.router_topk(spec)
        with G.grid((t + G.WARP - 1) // G.WARP) as tb:
            with G.block(G.WARP) as tid:
                i = tb * G.WARP + tid
                with G.when(i < t):
                    route_token(spec, i, logits, bias, modality, weights, indices, G.local)
    return kern.func


@functools.cache
def moe_plan(experts: int, top_k: int) -> tirx.PrimFunc:
    """indices[t, k] int32, weights[t, k] -> indptr[E+1], row_token[P], row_weight[P], pair_row[P].

    One block of up to 256 threads (every OpenCL GPU takes that many); thread i serves experts
    i, i + threads, ... in each phase: count its experts' pairs into shared memory, then after a
    barrier write their indptr entries (the counts of every expert before) and place their
    pairs in token order."""
    threads = G.threads_for(experts + 1)
    with G.kernel(f"moe_plan_e{experts}_k{top_k}") as kern:
        t, indices, weights, indptr, row_token, row_weight, pair_row = C.moe_plan(experts, top_k)
        with G.grid(1) as _:
            counts = G.shared((experts,), "int32")
            with G.block(threads) as tid:
                cursor = G.local((1,), "int32")

                def expert(p):  # clamped: a corrupt index must not write out of bounds
                    return tirx.min(tirx.max(indices[p // top_k, p % top_k], 0), experts - 1)

                def count(e):
                    G.store(cursor, (0,), tirx.IntImm("int32", 0))
                    with G.serial(0, t * top_k) as p:
                        with G.when(expert(p) == e):
                            G.store(cursor, (0,), cursor[0] + 1)
                    G.store(counts, (e,), cursor[0])

                def start(e):  # rows of the experts before e: indptr[e], and e's cursor
                    G.store(cursor, (0,), tirx.IntImm("int32", 0))
                    with G.serial(0, e) as f:
                        G.store(cursor, (0,), cursor[0] + counts[f])

                def place(e):
                    start(e)
                    with G.if_else(e < experts) as (then, orelse):
                        with then():
                            G.store(indptr, (e,), cursor[0])
                            with G.serial(0, t * top_k) as p:
                                with G.when(expert(p) == e):
                                    r = cursor[0]
                                    G.store(row_token, (r,), tirx.Cast("int32", p // top_k))
                                    G.store(row_weight, (r,), weights[p // top_k, p % top_k])
                                    G.store(pair_row, (p,), r)
                                    G.store(cursor, (0,), r + 1)
                        with orelse():
                            G.store(indptr, (e,), cursor[0])

                G.strided(tid, experts, threads, count)
                G.barrier()
                G.strided(tid, experts + 1, threads, place)
    return kern.func
