"""prune-experts: drop the routed experts calibration data uses least, and shrink the router.

    prune-experts(keep=6)          keep 6 experts per MoE block
    prune-experts(ratio=0.75)      keep 75% of them (rounded)
    prune-experts(min_share=0.02)  keep the experts that get at least 2% of the routing decisions

Per router (an op with `routing_choices`), calibration counts how often each expert is chosen
and the gate weight it gets; experts are ranked by that count (gate mass breaks ties) and the
lowest go. The router's scoring rows (and score bias) and the experts op's stacked weights
keep only the remaining experts (the op's `per_expert_inputs`), so the router's output size
and the artifact's expert tensors shrink; the gate renormalises over what is left as the
router's own `normalize` says. The router's `expert_pools` keep routing well defined: each
modality group keeps its own share (at least top_k), DeepSeek's routing groups keep equal
numbers, and the group ranges are renumbered (`keep_experts`). The report gives per layer the
experts kept and the usage before (fit part) and after (held-out part).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mocompile.calib_record import RouterUsage, node_key, record
from mocompile.calibration import Calibration
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph, Node
from mocompile.ir.registry import ExpertPools, get_op
from mocompile.pass_manager import PassContext, register_pass
from mocompile.passes.calibrated import CalibratedPass, param_input, reinfer, replace_weight
from mocompile.quality import EXPERT_IDS


def _per_pool(pools: ExpertPools, experts: int, keep: int | None, ratio: float | None) -> list[int]:
    """How many experts each pool keeps for a target of `keep` (or a share `ratio`)."""
    sizes = [len(p) for p in pools.pools]
    if pools.equal:
        target = keep if keep is not None else round(experts * ratio)
        n = max(pools.min_keep, target // len(sizes))
        return [min(n, s) for s in sizes]
    share = (keep / experts) if keep is not None else ratio
    return [min(s, max(pools.min_keep, round(s * share))) for s in sizes]


def choose_experts(usage: RouterUsage, pools: ExpertPools, keep: int | None, ratio: float | None,
                   min_share: float | None) -> list[int]:
    """The experts to keep (sorted ids): in each pool the most used, by routing count then gate mass."""
    order = np.lexsort((usage.gate_mass, usage.counts))[::-1]  # most used first
    rank = {int(e): r for r, e in enumerate(order)}
    kept: list[int] = []
    if min_share is not None:
        for pool in pools.pools:
            ranked = sorted(pool, key=rank.__getitem__)
            wanted = [e for e in ranked if usage.share[e] >= min_share]
            kept += ranked[:max(len(wanted), pools.min_keep)]
        if pools.equal:  # routing groups stay an equal split: each keeps as many as the largest wants
            n = max(sum(1 for e in p if e in kept) for p in pools.pools)
            kept = [e for p in pools.pools for e in sorted(p, key=rank.__getitem__)[:n]]
    else:
        for pool, n in zip(pools.pools, _per_pool(pools, usage.experts, keep, ratio)):
            kept += sorted(pool, key=rank.__getitem__)[:n]
    return sorted(kept)


def prune_router(graph: Graph, router: Node, keep: list[int], pass_name: str) -> None:
    """Keep only the experts `keep` in `router` and in every op its choices feed."""
    op = get_op(router.op)
    choices = router.outputs[op.routing_choices]
    readers = [n for n in graph.nodes if choices in n.inputs and get_op(n.op).per_expert_inputs is not None]
    experts = int(router.inputs[op.per_expert_inputs(router)[0]].type.shape[0])
    replaced: dict[int, Any] = {}
    for node in [router, *readers]:
        for i in get_op(node.op).per_expert_inputs(node):
            replace_weight(graph, node, i, param_input(graph, node, i, pass_name)[keep], replaced)
    router.attrs = op.keep_experts(router.attrs, keep)
    for node in [router, *readers]:
        reinfer(node)
    ids = graph.meta.setdefault(EXPERT_IDS, {})
    key = node_key(router)
    old = ids.get(key, list(range(experts)))
    ids[key] = [int(old[e]) for e in keep]


@register_pass("prune-experts")
class PruneExperts(CalibratedPass):
    """Drop the least-used routed experts (calibration counts) and shrink each router to the rest."""

    def __init__(self, keep: int | None = None, ratio: float | None = None, min_share: float | None = None,
                 calib: int = 16, seq: int = 32, seed: int = 0, held_out: float = 0.25) -> None:
        given = [name for name, v in (("keep", keep), ("ratio", ratio), ("min_share", min_share)) if v is not None]
        if len(given) != 1:
            raise MocompileError(f"prune-experts: give exactly one of keep=N, ratio=R, min_share=S (got "
                                 f"{', '.join(given) or 'none'})")
        if keep is not None and keep < 1 or ratio is not None and not 0 < ratio <= 1 or \
                min_share is not None and not 0 <= min_share < 1:
            raise MocompileError("prune-experts: keep must be >= 1, ratio in (0, 1], min_share in [0, 1)")
        self.keep, self.ratio, self.min_share = keep, ratio, min_share
        self.init_calibration(calib, seq, seed, held_out)

    def describe(self) -> str:
        what = next(f"{k}={v}" for k, v in (("keep", self.keep), ("ratio", self.ratio), ("min_share", self.min_share))
                    if v is not None)
        return f"prune-experts({what})"

    def transform(self, graph: Graph, fit: Calibration, ctx: PassContext) -> tuple[dict[str, Any], str]:
        routers = [n for n in graph.nodes if get_op(n.op).expert_pools is not None]
        if not routers:
            raise MocompileError(f"prune-experts: {graph.name} has no routed experts")
        usage = record(graph, fit, ["routing"]).routing
        layers = []
        for router in routers:
            key = node_key(router)
            u = usage[key]
            pools = get_op(router.op).expert_pools(router)
            keep = choose_experts(u, pools, self.keep, self.ratio, self.min_share)
            if len(keep) < u.experts:
                prune_router(graph, router, keep, self.name)
            layers.append({"router": key, "experts": [u.experts, len(keep)], "kept": keep,
                           "usage_before": u.to_json(),
                           "pruned_share": round(float(u.share[[e for e in range(u.experts) if e not in keep]].sum()), 4)})
        before = sum(layer["experts"][0] for layer in layers)
        after = sum(layer["experts"][1] for layer in layers)
        return {"layers": layers}, f"experts {before} -> {after} over {len(layers)} MoE block(s)"

    def run(self, graph: Graph, ctx: PassContext):  # type: ignore[override]
        result = super().run(graph, ctx)
        _, _, held = self.calibration(result.graph, ctx)
        after = record(result.graph, held, ["routing"]).routing
        for layer in result.report["layers"]:
            if layer["router"] in after:
                layer["usage_after"] = after[layer["router"]].to_json()
        return result
