"""check-isolation: report whether any sample of a batch can influence another sample's output.

Report-only (the graph is returned unchanged): the verdict, and for each leak its op,
location and chain to the outputs, land in the pass report. Placed late in a pipeline it
checks the graph the backend will see, after every rewrite; `compile --require-isolation`
turns a leak into a failed compile. See `mocompile.isolation` for the analysis.
"""

from __future__ import annotations

from mocompile.ir.graph import Graph
from mocompile.isolation import analyze
from mocompile.pass_manager import Pass, PassContext, PassResult, register_pass


@register_pass("check-isolation")
class CheckIsolation(Pass):
    """Report whether any sample of a batch can influence another's output (graph unchanged)."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return PassResult(graph, {"isolation": analyze(graph).to_json()})
