"""Per-layer fixed-point formats from calibration ranges.

The interpreter runs the graph over the calibration inputs (mocompile.calibration: the
user's data, else random tokens, which the manifest then says); a hook after each node keeps
the largest |value| of every activation, and a hook before each node asks the op's FPGA
kernel for the ranges inside it (an FFN's gate, up and hidden activations, attention's
rotated queries and keys and its scores, the router's logits). Each range gets the format of
the target's width with the most fraction bits that still holds it with 25% headroom
(`Fmt.covering`); weights get the format that holds their largest entry. A weight the quantize
pass made low-bit is stored as the values its codes and scales give, so its format holds
max(scale) x the largest code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mocompile.backends.fpga.design import Design
from mocompile.backends.fpga.lowerings import kernel_for
from mocompile.backends.fpga.fixed import Fmt
from mocompile.calibration import Calibration
from mocompile.ir.graph import Graph, Node
from mocompile.ir.interpreter import run as interpret


def choose_formats(graph: Graph, calibration: Calibration, bits: int) -> Design:
    """The Design of `graph` at `bits` bits with formats from `calibration`."""
    amax: dict[str, float] = {}

    def keep(key: str, m: float) -> None:
        amax[key] = max(amax.get(key, 0.0), m)

    def before(node: Node, args: list[np.ndarray]) -> list[np.ndarray]:
        kernel = kernel_for(node)
        if kernel.internals is not None:
            for role, m in kernel.internals(node, args).items():
                keep(f"{node.outputs[0].name}:{role}", m)
        return args

    def after(node: Node, outputs: list[Any]) -> None:
        for v, a in zip(node.outputs, outputs):
            if v.type.dtype.startswith("float") and np.size(a):
                keep(v.name, float(np.abs(a).max()))

    for sample in calibration.inputs:
        for v in graph.inputs:
            if v.type.dtype.startswith("float"):
                keep(v.name, float(np.abs(sample[v.name]).max()))
        interpret(graph, sample, perturb=before, after=after)
    design = Design(graph, bits)
    design.fmts = {k: Fmt.covering(m, bits) for k, m in amax.items()}
    design.weight_fmts = {name: Fmt.covering(float(np.abs(w).max()) if w.size else 0.0, bits, headroom=1.0)
                          for name, w in design.weights().items()}
    for node in graph.nodes:
        formats = kernel_for(node).formats
        if formats is not None:
            design.fmts.update({f"{node.outputs[0].name}:{role}": f for role, f in formats(node, design).items()})
    return design


def describe(design: Design) -> dict[str, Any]:
    """The formats as the manifest records them: per activation and inner value, per weight."""
    return {"bits": design.bits,
            "activations": {k: f.text() for k, f in design.fmts.items()},
            "weights": {k: f.text() for k, f in design.weight_fmts.items()}}
