"""top-k: route each token to fewer experts.

    top-k(k=1)    every router sends a token to its single best expert

Each router (the attribute its op names in `top_k_attr`) keeps its k best choices, so the
artifact's routing tensors are [tokens, k] and each token reads k experts' weights. A router
that renormalises (`normalize`) spreads the gate over the kept experts (the weights sum to
what they summed to before); one that does not keeps the scores the kept experts had. A
router already at or below k is left alone. ERNIE 5.0 trains its models for exactly this.
"""

from __future__ import annotations

from typing import Any

from mocompile.calibration import Calibration
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.ir.registry import get_op
from mocompile.pass_manager import PassContext, register_pass
from mocompile.passes.calibrated import CalibratedPass, reinfer


def set_top_k(graph: Graph, k: int) -> list[dict[str, Any]]:
    """Lower every router's k to `k`; the routers changed (loc, k before, k after)."""
    changed = []
    for node in graph.nodes:
        attr = get_op(node.op).top_k_attr
        if attr is None:
            continue
        before = int(node.attrs[attr])
        if k < before:
            node.attrs[attr] = k
            reinfer(node)
            for reader in graph.nodes:  # the ops reading the routing see [tokens, k] now
                if any(v in reader.inputs for v in node.outputs):
                    reinfer(reader)
        changed.append({"router": node.loc, "top_k": [before, min(before, k)],
                        "renormalised": bool(node.attrs.get("normalize", False))})
    return changed


@register_pass("top-k")
class TopK(CalibratedPass):
    """Route each token to at most k experts (the kept gate weights renormalise where the router normalises)."""

    def __init__(self, k: int = 1, calib: int = 16, seq: int = 32, seed: int = 0, held_out: float = 0.25) -> None:
        if k < 1:
            raise MocompileError(f"top-k: k must be >= 1 (got {k})")
        self.k = int(k)
        self.init_calibration(calib, seq, seed, held_out)

    def describe(self) -> str:
        return f"top-k(k={self.k})"

    def transform(self, graph: Graph, fit: Calibration, ctx: PassContext) -> tuple[dict[str, Any], str]:
        routers = set_top_k(graph, self.k)
        if not routers:
            raise MocompileError(f"top-k: {graph.name} has no routers")
        ks = sorted({r["top_k"][0] for r in routers})
        return {"routers": routers}, f"experts per token {'/'.join(map(str, ks))} -> {min(self.k, max(ks))}"
