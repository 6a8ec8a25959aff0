"""The token-choice routing of router.topk as TIR statements, shared by every target's router
kernel: they mirror mocompile.ir.ops.moe.route (modality groups, softmax or sigmoid scores,
DeepSeek group limiting, top-k by repeated argmax with ties to the lower index). A target's
kernel decides what runs them (a CPU task per token, a GPU thread per token) and where their
small per-token arrays live (`alloc`)."""

from __future__ import annotations

from tvm import tirx

from mocompile.backends.tvm_common import tir_build as B
from mocompile.backends.tvm_common.kernel_math import f32
from mocompile.backends.tvm_common.specs import RouterSpec

NEG_INF = tirx.FloatImm("float32", float("-inf"))


def allowed_expert(spec: RouterSpec, mod, e):
    """May a token of modality `mod` use expert `e`? (tokens of no listed modality: any expert)."""
    in_group = tirx.const(False, "bool")
    listed = tirx.const(False, "bool")
    for mod_id, start, end in spec.groups:
        is_mod = mod == mod_id
        listed = tirx.Or(listed, is_mod)
        in_group = tirx.Or(in_group, tirx.And(is_mod, tirx.And(e >= start, e < end)))
    return tirx.Or(in_group, tirx.Not(listed))


def argmax(values, taken, n: int, best) -> None:
    """best[0] = index of the largest values[i] with taken[i] == 0 (ties: lowest index)."""
    B.store(best, (0,), tirx.IntImm("int32", -1))
    with B.serial(0, n) as i:
        better = tirx.Or(best[0] < 0, values[i] > values[tirx.max(best[0], 0)])
        with B.when(tirx.And(taken[i] == 0, better)):
            B.store(best, (0,), tirx.Cast("int32", i))


def group_limit(spec: RouterSpec, choice, best, alloc) -> None:
    """Keep the topk_group groups with the best top-2 sums (or maxima) of choice scores."""
    g, size = spec.n_group, spec.experts // spec.n_group
    if spec.experts % g:
        raise ValueError(f"router: {spec.experts} experts do not split into {g} groups")
    group_score = alloc((g,))
    group_taken = alloc((g,), "int32")
    top2 = alloc((2,))
    with B.serial(0, g) as gi:
        B.store(top2, (0,), NEG_INF)
        B.store(top2, (1,), NEG_INF)
        with B.serial(0, size) as s:
            v = choice[gi * size + s]
            with B.if_else(v > top2[0]) as (then, orelse):
                with then():
                    B.store(top2, (1,), top2[0])
                    B.store(top2, (0,), v)
                with orelse():
                    with B.when(v > top2[1]):
                        B.store(top2, (1,), v)
        second = top2[1] if size > 1 and spec.group_score == "top2_sum" else f32(0)
        B.store(group_score, (gi,), top2[0] + second)
        B.store(group_taken, (gi,), tirx.IntImm("int32", 0))
    for _ in range(spec.topk_group):
        argmax(group_score, group_taken, g, best)
        B.store(group_taken, (best[0],), tirx.IntImm("int32", 1))
    with B.serial(0, spec.experts) as e:
        fill = NEG_INF if spec.score_bias else f32(0)  # biased choice scores may be negative
        B.store(choice, (e,), tirx.Select(group_taken[e // size] == 1, choice[e], fill))


def scores(spec: RouterSpec, logits, i, allowed, scores, acc) -> None:
    E = spec.experts
    if spec.scoring == "softmax":
        B.store(acc, (0,), NEG_INF)
        with B.serial(0, E) as e:
            with B.when(allowed(e)):
                B.store(acc, (0,), tirx.max(acc[0], logits[i, e]))
        B.store(acc, (1,), f32(0))
        with B.serial(0, E) as e:
            B.store(scores, (e,), tirx.Select(allowed(e), tirx.exp(logits[i, e] - acc[0]), f32(0)))
            B.store(acc, (1,), acc[1] + scores[e])
        with B.serial(0, E) as e:
            B.store(scores, (e,), scores[e] / acc[1])
    elif spec.scoring == "sigmoid":
        with B.serial(0, E) as e:
            sig = f32(1) / (f32(1) + tirx.exp(-logits[i, e]))
            B.store(scores, (e,), tirx.Select(allowed(e), sig, f32(0)))
    else:
        raise ValueError(f"unknown router scoring {spec.scoring!r}")


def route_token(spec: RouterSpec, i, logits, bias, modality, weights, indices, alloc) -> None:
    """Token i's top_k experts and weights: logits[i, :] (+ bias) (+ modality[i]) ->
    weights[i, :], indices[i, :]; `alloc(shape, dtype="float32")` makes its scratch arrays."""
    E, k = spec.experts, spec.top_k
    score, choice = alloc((E,)), alloc((E,))
    taken = alloc((E,), "int32")
    acc = alloc((2,))  # running max / sum
    best = alloc((1,), "int32")

    def allowed(e):
        return allowed_expert(spec, modality[i], e) if spec.groups else tirx.const(True, "bool")

    scores(spec, logits, i, allowed, score, acc)
    with B.serial(0, E) as e:
        B.store(choice, (e,), score[e] + bias[e] if spec.score_bias else score[e])
        B.store(taken, (e,), tirx.IntImm("int32", 0))
    # group limiting: keep the topk_group groups with the best top-2 sums (or maxima)
    if spec.n_group > 1:
        group_limit(spec, choice, best, alloc)
    if spec.groups:
        with B.serial(0, E) as e:
            B.store(choice, (e,), tirx.Select(allowed(e), choice[e], NEG_INF))
    # top-k by repeated argmax
    B.store(acc, (1,), f32(0))
    for j in range(k):
        argmax(choice, taken, E, best)
        B.store(taken, (best[0],), tirx.IntImm("int32", 1))
        B.store(indices, (i, j), best[0])
        B.store(weights, (i, j), score[best[0]])
        B.store(acc, (1,), acc[1] + score[best[0]])
    scale = f32(spec.routed_scale)
    with B.serial(0, k) as j:
        w = weights[i, j] / (acc[1] + f32(1e-20)) if spec.normalize else weights[i, j]
        B.store(weights, (i, j), w * scale)
