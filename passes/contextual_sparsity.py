"""contextual-sparsity: per token, read only the input channels that matter most (WINA).

    contextual-sparsity(keep=0.5)   each token reads half of every matmul's input channels

Training-free contextual (activation) sparsity as in WINA: for each token, a `linear` keeps
the kept_channels(in, keep) input channels i with the largest |x_i| * ||W[:, i]|| and reads
only those rows of its weight (stored transposed, [in, out], by the backend); a feed-forward
block (`mlp`, dense or shared expert) does the same for its gate and up (their columns scored
together) and again for its down projection over the hidden neurons, and routed experts
(`experts`) do so per (token, expert) with that expert's column norms. The selection depends
on the token itself, so, unlike pruning, no channel is gone for good and nothing is learned
from calibration: it is used only to measure the quality cost on held-out sequences. The
ops that can do this say so where they are registered (`contextual_shares`); this pass sets
their `keep` attribute.

Where reading the kept rows one by one is not faster than the dense kernel on this machine
(measured by the backend at compile time, per matmul shape), the backend computes the same
selection and runs the dense kernel on the masked input instead, and the compile's summary
line says which.
"""

from __future__ import annotations

from typing import Any

from mocompile.calibration import Calibration
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.ir.registry import get_op
from mocompile.pass_manager import PassContext, register_pass
from mocompile.passes.calibrated import CalibratedPass, param_input, reinfer


@register_pass("contextual-sparsity")
class ContextualSparsity(CalibratedPass):
    """Per token, read only the input channels with the largest |x_i| * ||W[:, i]|| of every linear, FFN and expert."""

    def __init__(self, keep: float = 0.5, calib: int = 16, seq: int = 32, seed: int = 0,
                 held_out: float = 0.25) -> None:
        if not 0 < float(keep) <= 1:
            raise MocompileError(f"contextual-sparsity: keep (the share of input channels a token reads) must be in "
                                 f"(0, 1], got {keep}")
        self.keep = float(keep)
        self.init_calibration(calib, seq, seed, held_out)

    def describe(self) -> str:
        return f"contextual-sparsity(keep={self.keep:g})"

    def transform(self, graph: Graph, fit: Calibration, ctx: PassContext) -> tuple[dict[str, Any], str]:
        nodes = [n for n in graph.nodes if get_op(n.op).contextual_shares is not None]
        if not nodes:
            raise MocompileError(f"contextual-sparsity: {graph.name} has no linear, feed-forward or experts ops")
        for node in nodes:  # refuse before any change
            for i in range(len(node.inputs))[get_op(node.op).weight_slots]:
                param_input(graph, node, i, self.name)
            if node.attrs.get("hidden_quant") is not None:
                raise MocompileError(f"{self.name}: {node.op} at {node.loc or '?'} rounds its hidden activation "
                                     "(W8A8); run contextual-sparsity before quantize, on float weights")
        for node in nodes:
            node.attrs["keep"] = self.keep
            reinfer(node)
        ops = sorted({n.op for n in nodes})
        return ({"keep": self.keep, "ops": [{"op": n.op, "loc": n.loc} for n in nodes]},
                f"each token reads {self.keep:.0%} of the input channels of {len(nodes)} {'/'.join(ops)} op(s)")
