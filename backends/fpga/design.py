"""What the FPGA target decided about a graph before writing any code: the fixed-point
format of every activation, of every value inside a kernel and of every weight array
(`Design`), the reuse factor of every dense product, and the dense products each kernel
instantiates (`DenseUnit`, what the estimator costs)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from mocompile.backends.fpga.fixed import Fmt, quantize
from mocompile.ir.graph import Graph, Node, Value
from mocompile.ir.registry import get_op

Tensor = tuple[np.ndarray, "Fmt | None"]  # integer codes [batch, seq, features] and their format (None: plain ints)


def ident(name: str) -> str:
    """A C++ identifier for an IR name (`layers.0.attn.q_proj.weight` -> `layers_0_attn_q_proj_weight`)."""
    return re.sub(r"\W", "_", name)


@dataclass
class Design:
    """Formats and weight codes of one graph at one bit width."""

    graph: Graph
    bits: int
    fmts: dict[str, Fmt] = field(default_factory=dict)  # value name, or "value:role" inside a kernel
    weight_fmts: dict[str, Fmt] = field(default_factory=dict)
    reuse: dict[str, int] = field(default_factory=dict)  # dense product name -> reuse factor
    _codes: dict[str, np.ndarray] = field(default_factory=dict)
    _expanded: dict[str, np.ndarray] = field(default_factory=dict)

    def fmt(self, v: Value) -> Fmt:
        return self.fmts[v.name]

    def inner(self, node: Node, role: str) -> Fmt:
        return self.fmts[f"{node.outputs[0].name}:{role}"]

    def wfmt(self, v: Value) -> Fmt:
        return self.weight_fmts[self.param_name(v)]

    def param_name(self, v: Value) -> str:
        """The name of a weight: a graph weight's, or the value name of a low-bit weight's
        expansion (the quantize pass's `dequantize` of codes and scales, which the design
        reads as the values it gives)."""
        name = next((k for k, p in self.graph.params.items() if p is v), None)
        if name is not None:
            return name
        if expands_low_bit(v):
            return v.name
        raise KeyError(f"{v.name} is not a weight")

    def weight(self, v: Value) -> np.ndarray:
        """A weight's float values (a low-bit weight's: its expansion by the op that reads it)."""
        name = self.param_name(v)
        if name in self.graph.weights:
            return self.graph.weights[name]
        if name not in self._expanded:
            node = v.producer
            self._expanded[name] = get_op(node.op).compute([self.weight(x) for x in node.inputs], node.attrs)[0]
        return self._expanded[name]

    def weights(self) -> dict[str, np.ndarray]:
        """Every weight the design stores, by name: the graph's float weights and the expansions
        of its low-bit ones (their codes and scales are not stored apart)."""
        out = {k: self.weight(p) for k, p in self.graph.params.items() if self.graph.weights[k].dtype.kind == "f"}
        out |= {v.name: self.weight(v) for n in self.graph.nodes for v in n.outputs if expands_low_bit(v)}
        return out

    def codes(self, v: Value) -> np.ndarray:
        """The weight's integer codes in its format (int64, the weight's shape)."""
        name = self.param_name(v)
        if name not in self._codes:
            self._codes[name] = quantize(self.weight(v), self.weight_fmts[name])
        return self._codes[name]

    def rf(self, key: str, n_in: int) -> int:
        """The reuse factor the estimate chose for dense product `key` (n_in before it has)."""
        return self.reuse.get(ident(key), n_in)


def expands_low_bit(v: Value) -> bool:
    """v is a low-bit weight's expansion (made by an op that keeps weights low-bit from weights alone)."""
    node = v.producer
    return node is not None and get_op(node.op).keeps_weights_low_bit and all(x.producer is None for x in node.inputs)


def accum_fmt(x: Fmt, w: Fmt, n_in: int) -> Fmt:
    """The exact accumulator of n_in products x * w (no rounding, no overflow)."""
    width = x.width + w.width + max(1, math.ceil(math.log2(max(n_in, 2)))) + 1
    return Fmt(width, width - (x.frac + w.frac))


@dataclass(frozen=True)
class DenseUnit:
    """One hls4ml dense product the design instantiates (per weight matrix, or one shared by
    all routed experts of a layer): what the estimator costs."""

    key: str
    n_in: int
    n_out: int
    x: Fmt
    w: Fmt
    weights: int  # weight values stored for it (all experts' for a shared unit)
    calls: int  # times it runs per token (top_k for routed experts)
    role: str  # "experts" for routed experts (streamable), else "dense"
