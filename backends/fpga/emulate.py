"""The IR interpreter at the design's fixed-point precision: every node computed by its FPGA
kernel's integer emulation (the same rounding and saturation at the same points as the
generated C++), so the C simulation must match it bit for bit. Sequences run from position
0, every position at once (the C++ runs them one at a time through its KV cache; each
position's arithmetic is the same)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from mocompile.backends.fpga.design import Design, Tensor
from mocompile.backends.fpga.lowerings import kernel_for
from mocompile.backends.fpga.fixed import quantize, to_float


def emulate(design: Design, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's outputs (float32, as the C simulation returns them) on `inputs`."""
    graph = design.graph
    env: dict[int, Tensor] = {}
    for v in graph.inputs:
        a = np.asarray(inputs[v.name])
        env[id(v)] = (quantize(a, design.fmt(v)), design.fmt(v)) if v.type.dtype.startswith("float") \
            else (a.astype(np.int64), None)
    params = {id(p) for p in graph.params.values()}
    for node in graph.nodes:
        args = [env[id(v)] if id(v) not in params else (np.empty(0, np.int64), None) for v in node.inputs]
        for v, result in zip(node.outputs, kernel_for(node).emulate(node, args, design)):
            env[id(v)] = result
    out = {}
    for v in graph.outputs:
        codes, fmt = env[id(v)]
        out[v.name] = to_float(codes, fmt) if fmt is not None else codes.astype(v.type.dtype)
    return out
