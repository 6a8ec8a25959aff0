"""Top-k expert selection (router.topk after its logits matmul), one token per task.

Mirrors mocompile.ir.ops.moe.route exactly: modality groups mask logits to -inf outside the
token's group; softmax or sigmoid scores; experts are chosen by the scores plus an optional
score bias (DeepSeek-V3); group limiting (group score = sum of its top-2 choice scores, or
their max, keep the topk_group best groups, zero the rest, or -inf with a bias); top_k by
choice score with ties to the lower index; weights = chosen scores, optionally renormalized, times routed_scale.
The work per token is O(E * k) scalar code; it uses libm's exp (this kernel is not
vectorized, and the selection is sensitive to the last bit of a score).
"""

from __future__ import annotations

import functools

from tvm import tirx

from mocompile.backends.tvm_common import contracts as C
from mocompile.backends.tvm_common.routing import route_token
from mocompile.backends.tvm_common.specs import RouterSpec
from mocompile.backends.tvm_cpu import tir_util as U


@functools.cache
def router_topk(spec: RouterSpec) -> tirx.PrimFunc:
    """logits[t, E] (+ score_bias[E]) (+ modality[t] int32) -> weights[t, k] f32, indices[t, k] int32."""
    E = spec.experts
    with U.kernel(f"router_topk_{spec.tag()}") as kern:
        t, logits, bias, modality, weights, indices = C.router_topk(spec)

        def token(i):
            route_token(spec, i, logits, bias, modality, weights, indices, U.local)

        U.parallel_for(t, 4 * t * E * 16, token)  # ~16 passes over the E scores
    return kern.func
