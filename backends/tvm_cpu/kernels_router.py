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
import typing
from dataclasses import dataclass, fields
from typing import Any, Mapping

from tvm import tirx

from mocompile.backends.tvm_cpu import tir_util as U
from mocompile.ir.ops.moe import ROUTER_ATTRS
from mocompile.ir.registry import REQUIRED

NEG_INF = tirx.FloatImm("float32", float("-inf"))


@dataclass(frozen=True)
class RouterSpec:
    """What a router kernel is specialised on: the expert count, and the router.topk
    attributes of the same names (their meaning and defaults: mocompile.ir.ops.moe's
    ROUTER_ATTRS), as the hashable, typed values `of` reads from a node's attributes."""

    experts: int
    top_k: int
    scoring: str
    normalize: bool
    routed_scale: float
    n_group: int
    topk_group: int
    groups: tuple[tuple[int, int, int], ...]  # (modality_id, start, end)
    score_bias: bool  # extra input bias[E]: experts are chosen by score + bias (DeepSeek-V3)
    group_score: str  # a routing group's score: sum of its top-2 choice scores | "max"

    @classmethod
    def of(cls, experts: int, attrs: Mapping[str, Any]) -> RouterSpec:
        """The spec of a router over `experts` experts with router.topk attributes `attrs`
        (absent ones take the op's defaults), each converted to its field's type."""
        given = {**{k: v for k, v in ROUTER_ATTRS.items() if v is not REQUIRED}, **attrs}
        hints = typing.get_type_hints(cls)
        return cls(int(experts), **{f.name: _as_type(hints[f.name], given[f.name]) for f in fields(cls)[1:]})

    def tag(self) -> str:
        groups = "".join(f"_m{m}r{a}to{b}" for m, a, b in self.groups)
        scale = str(self.routed_scale).replace(".", "p").replace("-", "m")
        extra = ("_bias" if self.score_bias else "") + ("_gmax" if self.group_score == "max" else "")
        return (f"e{self.experts}_k{self.top_k}_{self.scoring}{'_norm' if self.normalize else ''}"
                f"_g{self.n_group}x{self.topk_group}{groups}_s{scale}{extra}")


def _as_type(hint: Any, value: Any) -> Any:
    """`value` as the type `hint` names: a scalar type's constructor, tuples element by element."""
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_as_type(args[0], v) for v in value)
        return tuple(_as_type(a, v) for a, v in zip(args, value, strict=True))
    return hint(value)


def _allowed(spec: RouterSpec, mod, e):
    """May a token of modality `mod` use expert `e`? (tokens of no listed modality: any expert)."""
    in_group = tirx.const(False, "bool")
    listed = tirx.const(False, "bool")
    for mod_id, start, end in spec.groups:
        is_mod = mod == mod_id
        listed = tirx.Or(listed, is_mod)
        in_group = tirx.Or(in_group, tirx.And(is_mod, tirx.And(e >= start, e < end)))
    return tirx.Or(in_group, tirx.Not(listed))


def _emit_argmax(values, taken, n: int, best) -> None:
    """best[0] = index of the largest values[i] with taken[i] == 0 (ties: lowest index)."""
    U.store(best, (0,), tirx.IntImm("int32", -1))
    with U.serial(0, n) as i:
        better = tirx.Or(best[0] < 0, values[i] > values[tirx.max(best[0], 0)])
        with U.when(tirx.And(taken[i] == 0, better)):
            U.store(best, (0,), tirx.Cast("int32", i))


@functools.cache
def router_topk(spec: RouterSpec) -> tirx.PrimFunc:
    """logits[t, E] (+ score_bias[E]) (+ modality[t] int32) -> weights[t, k] f32, indices[t, k] int32."""
    E, k = spec.experts, spec.top_k
    t = U.dim("t")
    with U.kernel(f"router_topk_{spec.tag()}") as kern:
        logits = U.arg("logits", (t, E))
        bias = U.arg("score_bias", (E,)) if spec.score_bias else None
        modality = U.arg("modality", (t,), "int32") if spec.groups else None
        weights = U.arg("weights", (t, k))
        indices = U.arg("indices", (t, k), "int32")

        def token(i):
            scores = U.local((E,))
            choice = U.local((E,))
            taken = U.local((E,), "int32")
            acc = U.scratch((2,))  # running max / sum
            best = U.scratch((1,), "int32")

            def allowed(e):
                return _allowed(spec, modality[i], e) if spec.groups else tirx.const(True, "bool")

            # scores
            if spec.scoring == "softmax":
                U.store(acc, (0,), NEG_INF)
                with U.serial(0, E) as e:
                    with U.when(allowed(e)):
                        U.store(acc, (0,), tirx.max(acc[0], logits[i, e]))
                U.store(acc, (1,), U.f32(0))
                with U.serial(0, E) as e:
                    U.store(scores, (e,), tirx.Select(allowed(e), tirx.exp(logits[i, e] - acc[0]), U.f32(0)))
                    U.store(acc, (1,), acc[1] + scores[e])
                with U.serial(0, E) as e:
                    U.store(scores, (e,), scores[e] / acc[1])
            elif spec.scoring == "sigmoid":
                with U.serial(0, E) as e:
                    sig = U.f32(1) / (U.f32(1) + tirx.exp(-logits[i, e]))
                    U.store(scores, (e,), tirx.Select(allowed(e), sig, U.f32(0)))
            else:
                raise ValueError(f"unknown router scoring {spec.scoring!r}")
            with U.serial(0, E) as e:
                U.store(choice, (e,), scores[e] + bias[e] if spec.score_bias else scores[e])
                U.store(taken, (e,), tirx.IntImm("int32", 0))
            # group limiting: keep the topk_group groups with the best top-2 sums (or maxima)
            if spec.n_group > 1:
                _emit_group_limit(spec, choice, best)
            if spec.groups:
                with U.serial(0, E) as e:
                    U.store(choice, (e,), tirx.Select(allowed(e), choice[e], NEG_INF))
            # top-k by repeated argmax
            U.store(acc, (1,), U.f32(0))
            for j in range(k):
                _emit_argmax(choice, taken, E, best)
                U.store(taken, (best[0],), tirx.IntImm("int32", 1))
                U.store(indices, (i, j), best[0])
                U.store(weights, (i, j), scores[best[0]])
                U.store(acc, (1,), acc[1] + scores[best[0]])
            scale = U.f32(spec.routed_scale)
            with U.serial(0, k) as j:
                w = weights[i, j] / (acc[1] + U.f32(1e-20)) if spec.normalize else weights[i, j]
                U.store(weights, (i, j), w * scale)

        U.parallel_for(t, 4 * t * E * 16, token)  # ~16 passes over the E scores
    return kern.func


def _emit_group_limit(spec: RouterSpec, choice, best) -> None:
    g, size = spec.n_group, spec.experts // spec.n_group
    if spec.experts % g:
        raise ValueError(f"router: {spec.experts} experts do not split into {g} groups")
    group_score = U.scratch((g,))
    group_taken = U.scratch((g,), "int32")
    top2 = U.scratch((2,))
    with U.serial(0, g) as gi:
        U.store(top2, (0,), NEG_INF)
        U.store(top2, (1,), NEG_INF)
        with U.serial(0, size) as s:
            v = choice[gi * size + s]
            with U.if_else(v > top2[0]) as (then, orelse):
                with then():
                    U.store(top2, (1,), top2[0])
                    U.store(top2, (0,), v)
                with orelse():
                    with U.when(v > top2[1]):
                        U.store(top2, (1,), v)
        second = top2[1] if size > 1 and spec.group_score == "top2_sum" else U.f32(0)
        U.store(group_score, (gi,), top2[0] + second)
        U.store(group_taken, (gi,), tirx.IntImm("int32", 0))
    for _ in range(spec.topk_group):
        _emit_argmax(group_score, group_taken, g, best)
        U.store(group_taken, (best[0],), tirx.IntImm("int32", 1))
    with U.serial(0, spec.experts) as e:
        fill = NEG_INF if spec.score_bias else U.f32(0)  # biased choice scores may be negative
        U.store(choice, (e,), tirx.Select(group_taken[e // size] == 1, choice[e], fill))
