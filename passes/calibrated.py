"""The shared frame of the passes that change what a model computes to make it cheaper
(prune-experts, prune-neurons, top-k, skip-layers, elastic): calibration split into the part
a pass fits on and the part it is judged on, the quality report on the held-out part against
the unmodified graph, the active parameters per token before and after, dead-code cleanup,
and the one-line summary `mocompile compile` prints.

A subclass implements `transform(graph, fit, ctx) -> (report, summary words)`; the compiler
sees `preserves_semantics = False` and verifies the artifact against the interpreter of the
modified graph (and records its drift from the unmodified model).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mocompile.calibration import Calibration, for_graph
from mocompile.errors import MocompileError
from mocompile.ir.active_params import active_params
from mocompile.ir.graph import Graph, Node, Value
from mocompile.ir.registry import get_op
from mocompile.pass_manager import Pass, PassContext, PassResult
from mocompile.passes.dce import drop_dead_weights, live_values
from mocompile.quality import quality_line, quality_report, split, token_ranges


def param_input(graph: Graph, node: Node, index: int, pass_name: str) -> np.ndarray:
    """The weight array at input `index` of `node`, which must be a plain weight (a pass that
    reshapes weights runs before quantize, whose codes it could not cut)."""
    v = node.inputs[index]
    if graph.params.get(v.name) is not v:
        raise MocompileError(f"{pass_name}: {node.op} at {node.loc or '?'} reads {v.name}, which is computed, not a "
                             "stored weight (run this pass before quantize)")
    return graph.weights[v.name]


def replace_weight(graph: Graph, node: Node, index: int, array: np.ndarray, replaced: dict[int, Value]) -> None:
    """Give `node` a new weight in place of input `index` (same name, new shape); a weight read
    by several nodes is replaced once (`replaced`: id of the old value -> the new one)."""
    old = node.inputs[index]
    if id(old) not in replaced:
        graph.remove_param(old.name)
        replaced[id(old)] = graph.add_param(old.name, np.ascontiguousarray(array))
    node.inputs[index] = replaced[id(old)]


def reinfer(node: Node) -> None:
    """Recompute a node's output types after its inputs or attributes changed."""
    types = get_op(node.op).infer([v.type for v in node.inputs], node.attrs)
    for v, t in zip(node.outputs, types):
        v.type = t


def drop_dead(graph: Graph) -> None:
    """Nodes and weights nothing reads any more (after a layer or expert went)."""
    live = live_values(graph)
    graph.nodes = [n for n in graph.nodes if any(id(v) in live for v in n.outputs)]
    drop_dead_weights(graph)


class CalibratedPass(Pass):
    """Base of the passes in this module's docstring. Subclasses call `init_calibration`
    from their __init__ with their own `calib`, `seq`, `seed` and `held_out` options."""

    preserves_semantics = False  # the compiler then checks the artifact against the IR interpreter

    def init_calibration(self, calib: int, seq: int, seed: int, held_out: float) -> None:
        if int(calib) < 2 or int(seq) < 2 or not 0 < float(held_out) < 1:
            raise MocompileError(f"{self.name}: calib >= 2, seq >= 2 and 0 < held_out < 1 are needed")
        self.calib, self.seq, self.seed, self.held_out = int(calib), int(seq), int(seed), float(held_out)

    def transform(self, graph: Graph, fit: Calibration, ctx: PassContext) -> tuple[dict[str, Any], str]:
        raise NotImplementedError

    def calibration(self, graph: Graph, ctx: PassContext) -> tuple[Calibration, Calibration, Calibration]:
        """(all, fit, held-out) calibration for `graph`."""
        calibration = for_graph(graph, ctx.calibration, token_ranges(graph, ctx.input_ranges), self.calib, self.seq,
                                self.seed)
        fit, held = split(calibration, self.held_out)
        return calibration, fit, held

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        original = graph.clone()
        calibration, fit, held = self.calibration(graph, ctx)
        report, words = self.transform(graph, fit, ctx)
        drop_dead(graph)
        quality = quality_report(original, graph, held.inputs)
        before, after = active_params(original), active_params(graph)
        random = " on random calibration tokens" if calibration.random else ""
        report.update({
            "calibration": {**calibration.to_json(), "fit": len(fit.inputs), "held_out": len(held.inputs)},
            "active_params": [before, after],
            "quality": quality,
            "summary": f"{words}; active params/token {before:,} -> {after:,} ({after / max(before, 1):.0%}); "
                       f"held-out {quality_line(quality)}{random}",
        })
        return PassResult(graph, report)
