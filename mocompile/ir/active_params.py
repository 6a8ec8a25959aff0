"""Parameters one token reads: the figure the sparsity passes trade quality against and every
pass report states before and after.

A routed experts op reads top_k of its E experts (its stacked per-expert weights count k/E),
an embedding table one row, a matmul with contextual sparsity the share of its weight's
columns a token keeps (its op's `contextual_shares`), every other weight whole. A low-bit weight counts as the float
tensor it stands for (the output of the op that expands it, `keeps_weights_low_bit`), so the
figure means the same before and after quantization.
"""

from __future__ import annotations

import math

import numpy as np

from mocompile.ir.graph import Graph, Value
from mocompile.ir.registry import get_op


def _stored_weight(graph: Graph, v: Value, made_by: dict[int, object]) -> tuple[int, int] | None:
    """(parameters, identity) of a weight input: a stored weight, or the expansion of stored
    low-bit codes; None for a computed value."""
    if graph.params.get(v.name) is v:
        return int(np.prod(graph.weights.meta(v.name)[0], dtype=np.int64)), id(v)
    node = made_by.get(id(v))
    if node is None or not get_op(node.op).keeps_weights_low_bit:  # type: ignore[attr-defined]
        return None
    if not all(graph.params.get(i.name) is i for i in node.inputs):  # type: ignore[attr-defined]
        return None
    shape = v.type.shape
    if not all(isinstance(d, int) for d in shape):
        return None
    return math.prod(shape), id(v)


def active_params(graph: Graph) -> int:
    """Weights read per token (see the module docstring)."""
    made_by = {id(out): node for node in graph.nodes for out in node.outputs}
    total = 0.0
    counted: set[int] = set()
    for node in graph.nodes:
        op = get_op(node.op)
        if op.keeps_weights_low_bit:
            continue  # its codes are counted where the expanded weight is read
        share: dict[int, float] = {}
        if op.per_expert_inputs is not None and op.routing_choices is None:
            k = node.inputs[2].type.shape[-1] if node.inputs[2].type.rank else 1
            for i in op.per_expert_inputs(node):
                e = node.inputs[i].type.shape[0]
                share[i] = min(1.0, k / e) if isinstance(e, int) and isinstance(k, int) else 1.0
        if op.contextual_shares is not None:
            for i, kept in op.contextual_shares(node).items():
                share[i] = share.get(i, 1.0) * kept
        if op.embeds_tokens:
            share[1] = 1.0 / max(int(node.inputs[1].type.shape[0]), 1)
        for i, v in enumerate(node.inputs):
            weight = _stored_weight(graph, v, made_by)
            if weight is not None and weight[1] not in counted:
                counted.add(weight[1])
                total += weight[0] * share.get(i, 1.0)
    return int(round(total))
