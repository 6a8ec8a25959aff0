"""The FPGA target's lowering registry: per IR op, its `FpgaKernel` (how the op is emulated in
fixed point, written as HLS C++, calibrated and costed), registered by the kernels_*.py
modules; the rest of the target asks `kernel_for(node)`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from mocompile.backends.fpga.design import Design, DenseUnit, Tensor
from mocompile.backends.fpga.fixed import Fmt
from mocompile.ir.graph import Node


@dataclass(frozen=True)
class FpgaKernel:
    """The FPGA target's facts about one IR op.

    emulate(node, inputs, design) -> outputs: the op in fixed point on integer codes, exactly
        as the generated C++ computes it (the bit-exact reference of the C simulation);
    internals(node, float inputs) -> {role: max |value|}: ranges of the values inside the
        kernel (calibration, for their formats);
    formats(node, design) -> {role: Fmt}: formats inside the kernel not set by calibration;
    emit(node, design, cpp) -> C++: declarations (cpp.decl) and the step's statements;
    units(node, design) -> the dense products it instantiates (for the estimate);
    extra(node, design) -> (cycles, DSPs, LUTs, BRAM18) of its non-dense work per token;
    refuse(node) -> why this node's attributes have no kernel, or None;
    memories(node, design, positions) -> [(name, depth, bits)]: on-chip arrays other than dense
        weights (KV caches of `positions` positions, embedding tables);
    position_cycles(node, positions) -> its cycles at a cache of `positions` (attention)."""

    op: str
    emulate: Callable[[Node, list[Tensor], Design], list[Tensor]]
    emit: Callable[[Node, Design, Any], None]
    internals: Callable[[Node, list[np.ndarray]], dict[str, float]] | None = None
    formats: Callable[[Node, Design], dict[str, Fmt]] | None = None
    units: Callable[[Node, Design], list[DenseUnit]] | None = None
    extra: Callable[[Node, Design], tuple[int, int, int, int]] | None = None
    refuse: Callable[[Node], "str | None"] | None = None
    memories: Callable[[Node, Design, int], list[tuple[str, int, int]]] | None = None
    position_cycles: Callable[[Node, int], int] | None = None


KERNELS: dict[str, FpgaKernel] = {}


def register_kernel(kernel: FpgaKernel) -> FpgaKernel:
    if kernel.op in KERNELS:
        raise ValueError(f"fpga kernel for {kernel.op!r} registered twice")
    KERNELS[kernel.op] = kernel
    return kernel


def load_kernels() -> dict[str, FpgaKernel]:
    """Every registered kernel, by op (importing the kernels_*.py modules registers them)."""
    from mocompile.backends.fpga import (kernels_attention, kernels_dense, kernels_elementwise,  # noqa: F401
                                         kernels_router, kernels_segments)

    return KERNELS


def kernel_for(node: Node) -> FpgaKernel:
    """The FPGA kernel of a node's op (the backend refuses graphs with ops it has none for)."""
    return load_kernels()[node.op]
