"""prune-neurons: remove the hidden neurons of feed-forward blocks and experts that matter least.

    prune-neurons(ratio=0.25)             remove 25% of every block's hidden neurons
    prune-neurons(ratio=0.5,multiple=16)  ... keeping a multiple of 16 per block

A neuron j of a block computing down @ h, h = act(x @ gate.T) * (x @ up.T), is scored as in
WINA: the mean |h_j| over the calibration tokens that reach the block (per expert: the tokens
routed to it; the op's `hidden_abs_sum`) times the norm of its down-projection column
||down[:, j]||, the size of what it adds to the output. The lowest-scoring neurons go: rows of
the gate and up weights (axis -2) and columns of the down weight (axis -1) are cut, so every
matmul of the block shrinks. Routed experts are stacked tensors: each expert keeps the same
number of neurons (its own best ones). Ops found by their `down_projection` facet: dense
blocks, shared experts and routed experts alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mocompile.calib_record import node_key, record
from mocompile.calibration import Calibration
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph, Node
from mocompile.ir.registry import get_op, weight_inputs
from mocompile.pass_manager import PassContext, register_pass
from mocompile.passes.calibrated import CalibratedPass, param_input, reinfer, replace_weight


def neuron_scores(mean_abs: np.ndarray, down: np.ndarray) -> np.ndarray:
    """WINA scores [E, F]: mean |hidden activation| times the down column's norm."""
    down = down.reshape((-1,) + down.shape[-2:])
    return mean_abs * np.linalg.norm(down.astype(np.float64), axis=-2)


def kept_count(width: int, ratio: float, multiple: int) -> int:
    """Neurons a block of `width` keeps: width * (1 - ratio), rounded up to `multiple`, at least one."""
    keep = max(1, width - int(round(width * ratio)))
    if multiple > 1 and width >= multiple:
        keep = min(width, -(-keep // multiple) * multiple)
    return keep


def shrink_block(graph: Graph, node: Node, keep: np.ndarray, pass_name: str) -> None:
    """Cut the block's weights to the neurons `keep` ([E, F'] indices, sorted per row)."""
    slots = get_op(node.op).weight_slots
    indices = list(range(len(node.inputs)))[slots]
    replaced: dict[int, Any] = {}
    for n, i in enumerate(indices):
        w = param_input(graph, node, i, pass_name)
        stacked = w.reshape((-1,) + w.shape[-2:])
        if n == len(indices) - 1:  # the down projection: its columns are the neurons
            cut = np.stack([stacked[e][:, keep[e]] for e in range(stacked.shape[0])])
        else:
            cut = np.stack([stacked[e][keep[e], :] for e in range(stacked.shape[0])])
        replace_weight(graph, node, i, cut.reshape(w.shape[:-2] + cut.shape[-2:]), replaced)
    reinfer(node)


def ffn_blocks(graph: Graph) -> list[Node]:
    """The feed-forward blocks and experts ops (`down_projection` with `hidden_abs_sum`)."""
    return [n for n in graph.nodes if get_op(n.op).hidden_abs_sum is not None and get_op(n.op).down_projection]


def prune_neurons(graph: Graph, hidden: dict[str, np.ndarray], ratio: float, multiple: int,
                  pass_name: str) -> list[dict[str, Any]]:
    """Remove the share `ratio` of each block's neurons by WINA score, from the mean
    |hidden activation| per block (`hidden`: node key -> [E, F]); a report per block."""
    blocks = ffn_blocks(graph)
    for node in blocks:
        for i in range(len(node.inputs))[get_op(node.op).weight_slots]:
            param_input(graph, node, i, pass_name)  # refuse before any change
    report = []
    for node in blocks:
        down = graph.weights[weight_inputs(node)[-1].name]
        scores = neuron_scores(hidden[node_key(node)], down)
        width = scores.shape[-1]
        n = kept_count(width, ratio, multiple)
        keep = np.sort(np.argsort(-scores, axis=-1, kind="stable")[:, :n], axis=-1)
        if n < width:
            shrink_block(graph, node, keep, pass_name)
        removed = np.sort(scores, axis=-1)[:, :width - n].sum()
        report.append({"block": node_key(node), "neurons": [width, n], "experts": int(scores.shape[0]),
                       "score_share_removed": round(float(removed / max(scores.sum(), 1e-30)), 4)})
    return report


@register_pass("prune-neurons")
class PruneNeurons(CalibratedPass):
    """Remove the lowest-scoring hidden neurons (WINA: mean |activation| x down-column norm) of every FFN and expert."""

    def __init__(self, ratio: float = 0.25, multiple: int = 8, calib: int = 16, seq: int = 32, seed: int = 0,
                 held_out: float = 0.25) -> None:
        if not 0 <= ratio < 1 or multiple < 1:
            raise MocompileError("prune-neurons: ratio (the share of neurons removed) must be in [0, 1), multiple >= 1")
        self.ratio, self.multiple = float(ratio), int(multiple)
        self.init_calibration(calib, seq, seed, held_out)

    def describe(self) -> str:
        return f"prune-neurons(ratio={self.ratio:g})"

    def transform(self, graph: Graph, fit: Calibration, ctx: PassContext) -> tuple[dict[str, Any], str]:
        if not ffn_blocks(graph):
            raise MocompileError(f"prune-neurons: {graph.name} has no feed-forward blocks")
        hidden = {k: h.mean for k, h in record(graph, fit, ["hidden"]).hidden.items()}
        report = prune_neurons(graph, hidden, self.ratio, self.multiple, self.name)
        before = sum(r["neurons"][0] * r["experts"] for r in report)
        after = sum(r["neurons"][1] * r["experts"] for r in report)
        return {"blocks": report}, f"hidden neurons {before:,} -> {after:,} in {len(report)} block(s)"
