"""Expert load statistics of a graph, collected on calibration inputs.

Every node whose op declares `routing_choices` (the router) is watched through the
calibration hooks: after it runs, the experts it chose for each token are counted, and the
pairs chosen for the same token are added to that layer's co-activation matrix. Only the
counts are kept (E + E x E numbers per layer), whatever the number of tokens. Slots a
capacity-limited or batch-level routing did not serve (weight 0) are not counted.

What one expert is (hidden size, inner size, gating, weight dtype) is read from the experts
op that consumes the choices, for the cost model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mocompile.calibration import Calibration, observe
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph, Node
from mocompile.ir.registry import get_op
from mocompile.placement.stats import ExpertStats, LayerStats, from_choices, layer_index

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8", "int4": "int4"}


def routing_nodes(graph: Graph) -> list[tuple[int, Node]]:
    """(layer index, router node) of every routing node, in graph order."""
    out = []
    for i, node in enumerate(n for n in graph.nodes if get_op(n.op).routing_choices is not None):
        layer = layer_index(node.loc)
        out.append((i if layer is None else layer, node))
    layers = [layer for layer, _ in out]
    if len(set(layers)) != len(layers):  # locations that do not tell layers apart: number them in order
        out = [(i, node) for i, (_, node) in enumerate(out)]
    return out


def _expert_shape(graph: Graph, router: Node) -> dict[str, Any]:
    """hidden, expert_hidden, gated and weight dtype of the experts op fed by `router`."""
    choices = router.outputs[get_op(router.op).routing_choices]
    users = graph.users().get(id(choices), [])
    experts = next((n for n in users if get_op(n.op).weight_role == "experts"), None)
    if experts is None:
        return {}
    gated = bool(experts.attrs.get("gated", True))
    up = experts.inputs[4 if gated else 3]
    dtype = _DTYPES.get(up.type.dtype, "fp32")
    stored_as = get_op(up.producer.op).weight_format if up.producer is not None else None
    if stored_as is not None:  # low-bit codes or 16-bit floats, expanded in the kernel
        dtype = _DTYPES.get(stored_as(up.producer.attrs), dtype)
    return {"hidden": int(experts.inputs[0].type.shape[-1]), "expert_hidden": int(up.type.shape[1]),
            "gated": gated, "dtype": dtype}


def collect(graph: Graph, calibration: Calibration) -> ExpertStats:
    """Per-layer expert load and co-activation of `graph` on the calibration inputs."""
    routers = routing_nodes(graph)
    if not routers:
        raise MocompileError(f"{graph.name}: no routing node (router.topk): nothing to place")
    layer_of = {id(node): layer for layer, node in routers}
    counts: dict[int, LayerStats] = {}

    def hook(node: Node, outputs: list[np.ndarray]) -> None:
        layer = layer_of.get(id(node))
        if layer is None:
            return
        op = get_op(node.op)
        idx = outputs[op.routing_choices]
        k = idx.shape[-1]
        ids = idx.reshape(-1, k).astype(np.int64)
        served = outputs[0].reshape(-1, k) != 0 if outputs[0].shape == idx.shape else np.ones(ids.shape, bool)
        ids = np.where(served, ids, -1)
        experts = int(node.inputs[1].type.shape[0])
        got = from_choices(ids, experts)
        if layer in counts:
            counts[layer].tokens += got.tokens
            counts[layer].coactivation += got.coactivation  # type: ignore[operator]
        else:
            counts[layer] = got

    observe(graph, calibration, [hook])
    first = routers[0][1]
    model = {**_expert_shape(graph, first), "top_k": int(first.attrs["top_k"]),
             "n_group": int(first.attrs.get("n_group", 1))}
    return ExpertStats(counts, model, calibration.source)
