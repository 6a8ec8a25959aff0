"""The MoE block's two halves: `router.topk` (who serves each token) and `experts` (the
sparse dispatch: each token runs only through the experts it was routed to).

Both keep any leading token axes ([batch, seq, ...]); routing is per token unless
`capacity_factor` is set, in which case an expert serves at most
ceil(capacity_factor * tokens * top_k / experts) assignments of the whole batch, taken in
order (slot by slot, token by token) and the rest are dropped: GShard-style token
dropping, which makes one sample's output depend on the others. `routing` selects two
more batch-level schemes, both leaks by design: "expert_choice" (each expert picks its
top-capacity tokens of the whole batch) and "balanced" (batch-level load balancing at
inference: a greedy assignment that gives each expert at most ceil(tokens * top_k /
experts) assignments, best scores first).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from mocompile.ir.batch_flow import Flow, FlowArgs, Out, combine, identity_map
from mocompile.ir.ops.elementwise import ACTIVATIONS, sigmoid
from mocompile.ir.contextual import check_keep, column_norms, kept_channels, per_token_rowwise
from mocompile.ir.ops.nn import check_hidden_quant, ffn, ffn_hidden, ffn_weight_types
from mocompile.ir.registry import OPTIONAL, REQUIRED, Cost, ExpertPools, OpDef, register_op
from mocompile.ir.rounding import top_k_choices
from mocompile.ir.types import Dim, TensorType

if TYPE_CHECKING:
    from mocompile.ir.graph import Node

ROUTER_ATTRS = {
    "top_k": REQUIRED,
    "scoring": "softmax",
    "normalize": True,
    "routed_scale": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "groups": (),  # ((modality_id, start, end), ...): route a token only within its modality's experts
    "score_bias": False,  # an input [experts] added to the scores to choose experts only (DeepSeek-V3)
    "group_score": "top2_sum",  # n_group > 1: a group's score is the sum of its top-2 choice scores | "max"
    "capacity_factor": None,
    "routing": "token_choice",  # | "expert_choice" | "balanced" (see the module docstring)
}
ROUTINGS = ("token_choice", "expert_choice", "balanced")
GROUP_SCORES = ("top2_sum", "max")


def router_inputs(attrs: Mapping[str, Any]) -> tuple[str, ...]:
    """Names of router.topk's inputs, in order: x, w_router[, score_bias][, modality_ids]."""
    bias = ("score_bias",) if attrs["score_bias"] else ()
    return ("x", "w", *bias) + (("modality_ids",) if attrs["groups"] else ())


def _infer_router(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    x, w = ts[0], ts[1]
    if w.rank != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(f"router weight {w} does not match input {x}")
    experts, k = w.shape[0], attrs["top_k"]
    if isinstance(experts, int) and not 1 <= k <= experts:
        raise ValueError(f"top_k {k} not in 1..{experts}")
    if attrs["scoring"] not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown scoring {attrs['scoring']!r}")
    if attrs["routing"] not in ROUTINGS:
        raise ValueError(f"unknown routing {attrs['routing']!r} (known: {', '.join(ROUTINGS)})")
    if attrs["group_score"] not in GROUP_SCORES:
        raise ValueError(f"unknown group_score {attrs['group_score']!r} (known: {', '.join(GROUP_SCORES)})")
    names = router_inputs(attrs)
    if len(ts) != len(names):
        raise ValueError(f"router.topk takes {', '.join(names)}; got {len(ts)} inputs")
    given = dict(zip(names, ts))
    if "score_bias" in given and given["score_bias"].shape != (experts,):
        raise ValueError(f"score_bias {given['score_bias']} should be [{experts}]")
    mods = given.get("modality_ids")
    if mods is not None and (mods.shape != x.shape[:-1] or mods.dtype != "int32"):
        raise ValueError(f"modality_ids {mods} should be int32{list(x.shape[:-1])}")
    lead = x.shape[:-1]
    return [TensorType(lead + (k,), "float32"), TensorType(lead + (k,), "int32")]


def route(
    logits: np.ndarray, attrs: Mapping[str, Any], modality_ids: np.ndarray | None = None,
    score_bias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k routing of [tokens, experts] logits -> (weights [tokens, k], indices [tokens, k]).
    `score_bias` shifts the scores experts are chosen by, never the weights they get."""
    t, e = logits.shape
    k = attrs["top_k"]
    if attrs["groups"]:
        allowed = np.ones((t, e), dtype=bool)
        for mod_id, start, end in attrs["groups"]:
            rows = modality_ids == mod_id
            allowed[rows] = False
            allowed[np.ix_(rows, np.arange(start, end))] = True
        logits = np.where(allowed, logits, -np.inf)
    if attrs["scoring"] == "softmax":
        z = np.exp(logits - logits.max(-1, keepdims=True))
        scores = z / z.sum(-1, keepdims=True)
    else:
        scores = np.where(np.isneginf(logits), 0.0, sigmoid(logits))
    choice = scores if score_bias is None else (scores + score_bias).astype(np.float32)
    if attrs["n_group"] > 1:
        g = attrs["n_group"]
        grouped = choice.reshape(t, g, e // g)
        if attrs["group_score"] == "top2_sum":
            group_score = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
        else:
            group_score = grouped.max(-1)
        keep = np.argsort(-group_score, axis=-1, kind="stable")[:, : attrs["topk_group"]]
        mask = np.zeros((t, g), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        fill = 0.0 if score_bias is None else -np.inf  # biased choice scores may be negative
        choice = np.where(np.repeat(mask, e // g, axis=-1), choice, fill)
    if attrs["groups"]:
        choice = np.where(allowed, choice, -np.inf)
    if attrs["routing"] == "token_choice":
        idx = top_k_choices(choice, k)
        served = np.ones(idx.shape, dtype=bool)
    else:
        idx, served = BATCH_ROUTINGS[attrs["routing"]](choice, k, attrs["capacity_factor"] or 1.0)
    weights = np.where(served, np.take_along_axis(scores, idx, axis=-1), 0.0)
    if attrs["normalize"]:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * attrs["routed_scale"]
    if attrs["capacity_factor"] is not None and attrs["routing"] == "token_choice":
        weights = drop_over_capacity(weights, idx, e, attrs["capacity_factor"])
    return weights.astype(np.float32), idx.astype(np.int32)


def _slots(choice: np.ndarray, assigned: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per token, its assigned experts best first in k slots; empty slots are not served."""
    ranked = np.where(assigned, choice, -np.inf)
    idx = np.argsort(-ranked, axis=-1, kind="stable")[:, :k]
    return idx, np.take_along_axis(assigned, idx, axis=-1)


def expert_choice(choice: np.ndarray, k: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Each expert takes its ceil(factor * tokens * k / experts) best tokens of the whole batch;
    a token keeps at most k of the experts that took it."""
    t, e = choice.shape
    capacity = min(t, math.ceil(factor * t * k / e))
    best = np.argsort(-choice, axis=0, kind="stable")[:capacity]  # [capacity, experts]
    assigned = np.zeros((t, e), dtype=bool)
    assigned[best, np.arange(e)[None, :]] = True
    return _slots(choice, assigned, k)


def balanced(choice: np.ndarray, k: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Batch-level load balancing: (token, expert) pairs best score first, each token up to k
    experts, each expert up to ceil(factor * tokens * k / experts) tokens."""
    t, e = choice.shape
    capacity = math.ceil(factor * t * k / e)
    assigned = np.zeros((t, e), dtype=bool)
    per_token, load = np.zeros(t, dtype=np.int64), np.zeros(e, dtype=np.int64)
    for flat in np.argsort(-choice, axis=None, kind="stable"):
        i, j = divmod(int(flat), e)
        if per_token[i] < k and load[j] < capacity and np.isfinite(choice[i, j]):
            assigned[i, j] = True
            per_token[i] += 1
            load[j] += 1
    return _slots(choice, assigned, k)


BATCH_ROUTINGS = {"expert_choice": expert_choice, "balanced": balanced}


def drop_over_capacity(weights: np.ndarray, idx: np.ndarray, experts: int, factor: float) -> np.ndarray:
    """Zero the assignments beyond each expert's capacity (slot-major, then token order)."""
    t, k = idx.shape
    capacity = math.ceil(factor * t * k / experts)
    load = np.zeros(experts, dtype=np.int64)
    out = weights.copy()
    for j in range(k):
        for i in range(t):
            ex = idx[i, j]
            if load[ex] >= capacity:
                out[i, j] = 0.0
            else:
                load[ex] += 1
    return out


def _router(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    given = dict(zip(router_inputs(attrs), xs))
    x, w = given["x"], given["w"]
    lead = x.shape[:-1]
    logits = x.reshape(-1, x.shape[-1]) @ w.T
    mods = given["modality_ids"].reshape(-1) if "modality_ids" in given else None
    weights, idx = route(logits.astype(np.float32), attrs, mods, given.get("score_bias"))
    k = attrs["top_k"]
    return [weights.reshape(lead + (k,)), idx.reshape(lead + (k,))]


def _router_cost(ins, outs, attrs, env) -> Cost:
    tokens = outs[0].numel(env) // attrs["top_k"]
    e, h = ins[1].concrete(env)
    return Cost(flops=2 * tokens * e * h, bytes=4 * (e * h + tokens * h))


def _router_flow(args: FlowArgs) -> Flow:
    """Per token along the leading axes, unless the routing looks at the whole batch."""
    x = args.in_types[0]
    maps = [identity_map(x.rank, drop=[-1]), None] + [
        identity_map(x.rank - 1) if name == "modality_ids" else None for name in router_inputs(args.attrs)[2:]]
    out = combine(args, maps, why="routes on the last axis, and that axis carries the batch (sample) index")
    routing, factor = args.attrs["routing"], args.attrs["capacity_factor"]
    if routing == "expert_choice":
        why = "expert-choice routing: each expert picks its top tokens among all tokens of the batch"
        return Flow((Out(out.axes, out.mixes or why),) * 2)
    if routing == "balanced":
        why = ("batch-level load balancing: which experts serve a token depends on the load the other tokens "
               "of the batch put on them")
        return Flow((Out(out.axes, out.mixes or why),) * 2)
    if factor is not None:
        why = (f"capacity_factor={factor:g}: each expert serves at most ceil({factor:g} * tokens * top_k / experts) "
               "assignments of the whole batch and drops the rest, so whether a token is served depends on the "
               "other tokens")
        return Flow((Out(out.axes, out.mixes or why), out))
    return Flow((out, out))


def _router_positions(node: Node, segments: Sequence[Dim]) -> str | None:
    """Token-choice routing without capacity routes each position on its own."""
    if node.attrs.get("capacity_factor") is not None or node.attrs.get("routing", "token_choice") != "token_choice":
        return f"{node.op} at {node.loc or '?'} routes each token by the others (capacity or batch-level routing)"
    return None


def _router_expert_inputs(node: Node) -> tuple[int, ...]:
    """The scoring weight's rows and the score bias are per expert."""
    names = router_inputs(node.attrs)
    return tuple(i for i, n in enumerate(names) if n in ("w", "score_bias"))


def _router_pools(node: Node) -> ExpertPools:
    """Modality groups are pools of their own (a token routes within its group: top_k there);
    DeepSeek's routing groups are an equal split (each group keeps as many, and the groups a
    token may use must still hold top_k); else all experts are one pool."""
    attrs, experts = node.attrs, int(node.inputs[1].type.shape[0])
    k = attrs["top_k"]
    if attrs["groups"]:
        listed = [tuple(range(a, b)) for _, a, b in attrs["groups"]]
        rest = tuple(sorted(set(range(experts)) - {e for p in listed for e in p}))
        return ExpertPools(tuple(listed) + ((rest,) if rest else ()), False, k)
    if attrs["n_group"] > 1:
        g = attrs["n_group"]
        size = experts // g
        return ExpertPools(tuple(tuple(range(i * size, (i + 1) * size)) for i in range(g)), True,
                           -(-k // attrs["topk_group"]))
    return ExpertPools((tuple(range(experts)),), False, k)


def _router_keep(attrs: Mapping[str, Any], keep: Sequence[int]) -> dict[str, Any]:
    """Modality group ranges renumbered over the kept experts (kept ids stay in order, so each
    group is still one contiguous range); routing groups keep their count."""
    new = dict(attrs)
    if attrs["groups"]:
        position = {e: i for i, e in enumerate(sorted(keep))}
        groups = []
        for mod, a, b in attrs["groups"]:
            kept = [position[e] for e in range(a, b) if e in position]
            groups.append((mod, kept[0], kept[-1] + 1) if kept else (mod, 0, 0))
        new["groups"] = tuple(groups)
    return new


register_op(OpDef("router.topk", _infer_router, _router, ROUTER_ATTRS, cost=_router_cost, batch_flow=_router_flow,
                  position_check=_router_positions, weight_slots=slice(1, 2), weight_role="router", routing_choices=1,
                  routing_weights=0, per_expert_inputs=_router_expert_inputs, expert_pools=_router_pools,
                  keep_experts=_router_keep, top_k_attr="top_k",
                  doc="(weights, indices) of the top_k experts per token; inputs x, w_router[, score_bias]"
                      "[, modality_ids]"))

EXPERTS_ATTRS = {"activation": "silu", "gated": True, "hidden_quant": None, "keep": OPTIONAL}  # as mlp's


def _infer_experts(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    gated = attrs["gated"]
    if len(ts) != (6 if gated else 5):
        raise ValueError(f"experts (gated={gated}) takes x, weights, indices, {'gate, ' if gated else ''}up, down")
    if attrs["activation"] not in ACTIVATIONS:
        raise ValueError(f"unknown activation {attrs['activation']!r}")
    check_hidden_quant(attrs)
    x, w, idx = ts[:3]
    if w.shape != idx.shape or w.shape[:-1] != x.shape[:-1] or idx.dtype != "int32":
        raise ValueError(f"experts: routing {w} / {idx} does not match tokens {x}")
    up = ts[4] if gated else ts[3]
    ffn_weight_types(ts[3:], gated, x.shape[-1], experts=up.shape[0])
    check_keep(attrs.get("keep"))
    if attrs.get("keep") is not None and attrs["hidden_quant"] is not None:
        raise ValueError("experts: keep (contextual sparsity) and hidden_quant (W8A8) do not combine")
    return [x]


def _experts(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    """Sparse reference: only the experts some token chose are computed, and a token's output
    takes only its own experts' rows (an unchosen expert's weights are never read).

    Each chosen expert runs over all rows, not only its own tokens: BLAS rounds a row
    differently depending on how many rows it is given, so a subset sized by the routing
    would let one sample's routing move another sample's last bits (the interpreter is the
    reference the batch-isolation witness search compares bit for bit)."""
    x, w, idx = xs[:3]
    gate, up, down = xs[3:] if attrs["gated"] else (None, *xs[3:])
    h = x.shape[-1]
    flat_x, flat_w, flat_i = x.reshape(-1, h), w.reshape(-1, w.shape[-1]), idx.reshape(-1, idx.shape[-1])
    out = np.zeros_like(flat_x, dtype=np.float32)
    keep = attrs.get("keep")
    if keep is not None:  # contextual sparsity, per token and expert: its channels by this expert's column norms
        x_norms, h_norms = column_norms([w for w in (gate, up) if w is not None]), column_norms([down])
    for e in np.unique(flat_i):
        tok, slot = np.nonzero(flat_i == e)
        y = ffn(flat_x, None if gate is None else gate[e], up[e], down[e], attrs["activation"], attrs["hidden_quant"],
                keep, None if keep is None else (x_norms[e], h_norms[e]))[tok]
        np.add.at(out, tok, y * flat_w[tok, slot][:, None])
    return [out.reshape(x.shape)]


def _experts_shares(node: "Node") -> dict[int, float]:
    """Gate and up: the kept input channels; down: the kept hidden neurons (of each expert)."""
    keep = node.attrs.get("keep")
    if keep is None:
        return {}
    widths = {i: int(node.inputs[i].type.shape[-1]) for i in range(3, len(node.inputs))}
    return {i: kept_channels(w, keep) / w for i, w in widths.items()}


def _experts_cost(ins, outs, attrs, env) -> Cost:
    """Active work only: each token reads top_k experts' weights (not all of them)."""
    tokens, k = ins[1].numel(env) // ins[1].concrete(env)[-1], ins[1].concrete(env)[-1]
    per_expert = sum(t.numel(env) // t.concrete(env)[0] for t in ins[3:])
    active = min(tokens * k, ins[-1].concrete(env)[0])  # distinct experts touched, at most
    if attrs.get("keep") is not None:  # contextual sparsity: each token reads its kept share of them
        width = ins[0].concrete(env)[-1]
        per_expert = per_expert * kept_channels(width, attrs["keep"]) // width
    return Cost(flops=2 * tokens * k * per_expert, bytes=4 * (active * per_expert + 2 * outs[0].numel(env)))


def _experts_hidden_abs_sum(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per expert, |hidden activation| summed per neuron over the tokens routed to it."""
    x, _, idx = xs[:3]
    gate, up = (xs[3], xs[4]) if attrs["gated"] else (None, xs[3])
    flat_x, flat_i = x.reshape(-1, x.shape[-1]), idx.reshape(-1, idx.shape[-1])
    sums = np.zeros(up.shape[:2], np.float64)
    counts = np.zeros(up.shape[0], np.int64)
    for e in np.unique(flat_i):
        tok = np.nonzero((flat_i == e).any(-1))[0]
        h = ffn_hidden(flat_x[tok], None if gate is None else gate[e], up[e], attrs["activation"])
        sums[e] += np.abs(h).sum(0)
        counts[e] += tok.size
    return sums, counts


def _experts_params(args: FlowArgs) -> list:
    lead = identity_map(args.in_types[0].rank - 1)  # routing weights/indices: per token, slots read whole
    return [lead + [None], lead + [None], *[None] * (len(args.ins) - 3)]


# Sparse dispatch by per-token indices: a token's output reads only its own row, its own
# routing and the expert weights, whichever other tokens share the experts.
register_op(OpDef("experts", _infer_experts, _experts, EXPERTS_ATTRS, cost=_experts_cost,
                  batch_flow=per_token_rowwise(_experts_params), positionwise=True, weight_slots=slice(3, None),
                  down_projection=True, act_quant_input=True, weight_role="experts",
                  per_expert_inputs=lambda node: tuple(range(3, len(node.inputs))),
                  hidden_abs_sum=_experts_hidden_abs_sum, contextual_shares=_experts_shares,
                  doc="sum_j weights[t,j] * FFN_{indices[t,j]}(x[t]) (FFN as mlp's, hidden_quant included); inputs x, "
                      "weights, indices, [gate], up, down; with keep=R each (token, expert) reads only its kept input "
                      "channels and hidden neurons by that expert's column norms, as mlp's keep"))
