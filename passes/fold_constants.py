"""Constant folding: a node whose inputs are all weights is computed once, at compile time,
with the op's reference semantics, and replaced by a weight holding the result (e.g. a
transpose or scale applied to a weight, or what a pass left behind). Ops that declare
`keeps_weights_low_bit` (dequantization of low-bit weights) are left alone: expanding them
to fp32 would undo the quantize pass."""

from __future__ import annotations

from typing import Any

from mocompile.ir.graph import Graph
from mocompile.ir.registry import get_op
from mocompile.pass_manager import Pass, PassContext, PassResult, register_pass
from mocompile.passes.dce import drop_dead_weights


@register_pass("fold-constants")
class FoldConstants(Pass):
    """Compute nodes whose inputs are all weights at compile time; keep low-bit dequantization."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        # computed results by value id; stored weights are read only when a node folds
        constant: dict[int, Any] = {id(v): None for v in graph.params.values()}
        folded = []
        keep = []
        for node in graph.nodes:
            op = get_op(node.op)
            if node.inputs and not op.keeps_weights_low_bit and all(id(v) in constant for v in node.inputs):
                args = [graph.weights[v.name] if constant[id(v)] is None else constant[id(v)] for v in node.inputs]
                results = op.compute(args, node.attrs)
                for out, array in zip(node.outputs, results):
                    new = graph.add_param(graph.fresh_name(f"{node.loc or node.op}.folded"), array)
                    constant[id(new)] = array
                    graph.replace_uses(out, new)
                folded.append(f"{node.op}@{node.loc}")
            else:
                keep.append(node)
        graph.nodes = keep
        unused = drop_dead_weights(graph)
        return PassResult(graph, {"folded_nodes": folded, "removed_weights": unused})
