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

    def fmt(self, v: Value) -> Fmt:
        return self.fmts[v.name]

    def inner(self, node: Node, role: str) -> Fmt:
        return self.fmts[f"{node.outputs[0].name}:{role}"]

    def wfmt(self, v: Value) -> Fmt:
        return self.weight_fmts[self.param_name(v)]

    def param_name(self, v: Value) -> str:
        return next(k for k, p in self.graph.params.items() if p is v)

    def codes(self, v: Value) -> np.ndarray:
        """The weight's integer codes in its format (int64, the weight's shape)."""
        name = self.param_name(v)
        if name not in self._codes:
            self._codes[name] = quantize(self.graph.weights[name], self.weight_fmts[name])
        return self._codes[name]

    def rf(self, key: str, n_in: int) -> int:
        """The reuse factor the estimate chose for dense product `key` (n_in before it has)."""
        return self.reuse.get(ident(key), n_in)


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
