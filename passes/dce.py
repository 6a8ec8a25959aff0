"""Dead-code elimination: drop nodes and weights no graph output depends on."""

from __future__ import annotations

from mocompile.ir.graph import Graph
from mocompile.pass_manager import Pass, PassContext, PassResult, register_pass


def live_values(graph: Graph) -> set[int]:
    """ids of every value some output depends on."""
    live = {id(v) for v in graph.outputs}
    for node in reversed(graph.nodes):
        if any(id(v) in live for v in node.outputs):
            live.update(id(v) for v in node.inputs)
    return live


def drop_dead_weights(graph: Graph) -> list[str]:
    """Remove the weights no output depends on; returns their names."""
    live = live_values(graph)
    dead = [name for name, v in graph.params.items() if id(v) not in live]
    for name in dead:
        graph.remove_param(name)
    return dead


@register_pass("dce")
class DeadCodeElimination(Pass):
    """Drop the nodes and weights no graph output depends on."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        live = live_values(graph)
        dead_nodes = [n for n in graph.nodes if not any(id(v) in live for v in n.outputs)]
        graph.nodes = [n for n in graph.nodes if any(id(v) in live for v in n.outputs)]
        dead_weights = drop_dead_weights(graph)
        return PassResult(graph, {
            "removed_nodes": [f"{n.op}@{n.loc}" for n in dead_nodes],
            "removed_weights": dead_weights,
        })
