"""What a streamed compile (a checkpoint whose weights stay in its files) adds to the road:
the memory it is refused on, and the layer-by-layer verification of its artifact.

Memory. A streamed compile never holds the float32 model: the passes read one float weight at
a time (stream_source.py), so what it holds is about the artifact: the quantize pass's low-bit
codes, which are then spilled to scratch files (`spill_weights`) so that the backend's packed
copy and later the artifact loaded for verification are the only whole copies, plus one op's
float32 weights while the interpreter runs it. It is refused up front where twice the
artifact would not fit (`artifact_bytes_per_param`, frontend.STREAMED_ARTIFACT_COPIES).

Verification. The artifact is run once with its `layers` function (the residual stream leaving
every layer, which the backend builds where graph.meta[LAYER_STATES] asks), and the reference
is chained onto it: the IR interpreter runs the graph node by node, reading each node's
weights from the checkpoint (or the graph's codes) as it goes, and at the end of layer i it
compares its layer-i output with the artifact's, then continues from the artifact's value.
So every layer is checked against the reference of that layer on the hidden state the
artifact itself gave it: an error does not accumulate into the next layers, the first layer
that is wrong is the one named, and the reference never holds more than one node's weights.
(A verification-only program per layer would need one compiled function per layer and its
own weights file; the chained reference needs one extra function sharing main's kernels and
weights.) Where passes changed the numerics (quantize), each layer's drift from the float
model is recorded the same way, against the float graph, and reported, not judged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mocompile.blocks import LAYER_STATES, blocks
from mocompile.errors import VerificationError
from mocompile.ir.graph import Graph, Node
from mocompile.ir.interpreter import run as interpret
from mocompile.ir.weights import LazyWeight
from mocompile.pass_manager import PassManager
from mocompile.verification import Reference

# Relative error (max |artifact - reference| / max |reference| of the layer's output) a layer
# may show against the reference of the same graph: float32 reordering is 1e-6 here; a wrong
# kernel or weight is far above it.
LAYER_TOLERANCE = 1e-3


def artifact_bytes_per_param(manager: PassManager) -> float:
    """Bytes per parameter of the artifact's weights under the pipeline: what its first pass
    that stores weights otherwise says (Pass.stored_bytes_per_param: a quantize pass's codes
    and scales, 16-bit weights), else float32."""
    return next((b for p in manager.passes if (b := p.stored_bytes_per_param()) is not None), 4.0)


SPILL_BYTES = 1 << 20  # weights from this size up are spilled to the scratch directory


def _spilled(path: Path):
    """A function reading the array saved at `path` (a plain read into a new array: no mapped
    pages counted as resident beside it)."""
    def load() -> np.ndarray:
        return np.load(path)
    return load


def spill_weights(graph: Graph, scratch: Path) -> int:
    """Move the graph's in-memory weights (the passes' results: low-bit codes, scales) of
    SPILL_BYTES or more to .npy files in `scratch`, each replaced by a LazyWeight reading it
    back: the artifact's weights are then held once, by the backend or the loaded artifact,
    not a second time by the graph. Returns the bytes moved."""
    moved = 0
    for i, name in enumerate(list(graph.weights)):
        if graph.weights.is_lazy(name) or graph.weights.nbytes(name) < SPILL_BYTES:
            continue
        array = graph.weights[name]
        path = scratch / f"w{i}.npy"
        np.save(path, array)
        graph.weights[name] = LazyWeight(tuple(array.shape), str(array.dtype), _spilled(path), str(path))
        moved += array.nbytes
    return moved


def mark_layer_states(graph: Graph) -> list[str]:
    """Ask the backend for each layer's output (graph.meta[LAYER_STATES]); returns the names."""
    names = [b.output.name for b in blocks(graph)]
    graph.meta[LAYER_STATES] = names
    return names


def _chained(graph: Graph, inputs: Mapping[str, np.ndarray], states: Mapping[str, np.ndarray],
             layer_of: Mapping[str, str]) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Run the interpreter on `graph`, comparing each layer's output with the artifact's and
    continuing from the artifact's; per layer the errors, and the graph's outputs."""
    rows: list[dict[str, Any]] = []

    def after(node: Node, results: list[np.ndarray]) -> None:
        for j, v in enumerate(node.outputs):
            if v.name in states:
                got, ref = states[v.name], results[j]
                err = float(np.abs(got.astype(np.float64) - ref).max(initial=0))
                scale = float(np.abs(ref).max(initial=0))
                rows.append({"layer": layer_of[v.name], "value": v.name, "max_abs_error": err,
                             "rel_error": err / max(scale, 1e-30)})
                results[j] = got.copy()  # the next layer starts from the artifact's hidden state (a copy: the
                # states are read again for the drift report)

    outs = interpret(graph, inputs, after=after)
    return rows, outs


class LayerChain:
    """The reference of a streamed compile's artifact: `run(inputs)` runs the artifact's
    `layers` function, checks every layer against `graph`'s interpreter chained on the
    artifact's hidden states (the module docstring), raising a VerificationError that names
    the first layer beyond LAYER_TOLERANCE, and returns the graph's outputs computed from the
    artifact's last hidden state, which the artifact's own `main` must then match."""

    name = "IR interpreter, layer by layer on the artifact's hidden states"

    def __init__(self, artifact: Any, graph: Graph) -> None:
        self.artifact, self.graph = artifact, graph
        self.layer_of = {b.output.name: b.name for b in blocks(graph)}
        self.worst: dict[str, dict[str, Any]] = {}  # layer -> its largest error over every run
        self.inputs: Mapping[str, np.ndarray] | None = None  # the first inputs checked, and
        self.states: Mapping[str, np.ndarray] | None = None  # the artifact's layer states on them

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = self.inputs is None  # the first run's states serve the drift report; later ones are read here only
        states = self.artifact.run_layers(inputs, copy=keep)
        rows, outs = _chained(self.graph, inputs, states, self.layer_of)
        for row in rows:
            if not row["rel_error"] <= LAYER_TOLERANCE:
                raise VerificationError(
                    f"layer-by-layer verification: {row['layer']} of the artifact disagrees with the reference of "
                    f"that layer: relative error {row['rel_error']:.3g} > {LAYER_TOLERANCE:g} (output {row['value']}, "
                    "computed from the artifact's own input to the layer)")
            if row["rel_error"] >= self.worst.get(row["layer"], {"rel_error": -1.0})["rel_error"]:
                self.worst[row["layer"]] = row
        if keep:
            self.inputs, self.states = inputs, states
        return outs

    def reference(self, base: Reference) -> Reference:
        """`base` (the interpreter reference of the graph) with this chain as its run."""
        return Reference(self.run, self.name, base.graph, base.tolerance)

    def report(self, float_graph: Graph | None) -> dict[str, Any]:
        """Every layer's largest error; with `float_graph` (passes changed the numerics), each
        layer's drift from it on the first inputs checked, chained the same way (report only)."""
        rows = list(self.worst.values())
        out: dict[str, Any] = {"status": "verified", "tolerance": LAYER_TOLERANCE, "reference": self.name,
                               "layers": rows, "max_rel_error": max((r["rel_error"] for r in rows), default=0.0)}
        if float_graph is not None and self.inputs is not None:
            float_of = {b.output.name: b.name for b in blocks(float_graph)}
            if set(float_of) == set(self.layer_of):
                drift, _ = _chained(float_graph, self.inputs, self.states, float_of)
                out["drift_from_fp32"] = [{"layer": r["layer"], "rel_error": r["rel_error"]} for r in drift]
        return out
