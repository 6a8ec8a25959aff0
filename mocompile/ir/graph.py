"""The mocompile IR: a typed dataflow graph whose weights are named constants.

A node is `(op, inputs, attrs) -> outputs`; values are produced once (SSA), nodes are kept
in topological order, and the graph owns its weights as numpy arrays so passes can rewrite
them (quantize, prune) without touching torch. Output types come from the op registry's
shape inference when a node is added, so a graph is well typed by construction and the
verifier re-checks it after every pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from mocompile.ir.registry import get_op
from mocompile.ir.types import TensorType
from mocompile.ir.weights import LazyWeight, WeightStore


@dataclass(eq=False)
class Value:
    """One tensor. `producer` is None for graph inputs and weights."""

    name: str
    type: TensorType
    producer: "Node | None" = None

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


@dataclass(eq=False)
class Node:
    op: str
    inputs: list[Value]
    attrs: dict[str, Any]
    outputs: list[Value] = field(default_factory=list)
    loc: str = ""  # where in the source model this came from (module path), for reports

    def __repr__(self) -> str:
        return f"Node({self.op} @ {self.loc or '?'})"


class Graph:
    """A whole model: inputs, weights (params), nodes in topological order, outputs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.params: dict[str, Value] = {}
        self.weights: WeightStore = WeightStore()  # arrays, or lazy handles onto checkpoint files
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self.meta: dict[str, Any] = {}  # e.g. spec hash, variant, source of the graph
        self._names: set[str] = set()

    # ---- construction --------------------------------------------------------------
    def fresh_name(self, hint: str) -> str:
        base = hint or "v"
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def add_input(self, name: str, type: TensorType) -> Value:
        if name in self._names:
            raise ValueError(f"duplicate value name {name!r}")
        self._names.add(name)
        v = Value(name, type)
        self.inputs.append(v)
        return v

    def add_param(self, name: str, array: np.ndarray | LazyWeight) -> Value:
        """A named constant (a weight). The name is the weight's name in the artifact; a
        LazyWeight is read from its file whenever a reader asks for it (see weights.py)."""
        if name in self.params:
            raise ValueError(f"duplicate weight {name!r}")
        if not isinstance(array, LazyWeight):
            array = np.ascontiguousarray(array)
        self._names.add(name)
        v = Value(name, TensorType(tuple(int(d) for d in array.shape), str(array.dtype)))
        self.params[name] = v
        self.weights[name] = array
        return v

    def add_node(
        self, op: str, inputs: Sequence[Value], attrs: dict[str, Any] | None = None, loc: str = "", name: str = ""
    ) -> list[Value]:
        """Append a node; its output types are inferred by the op's registered rule."""
        attrs = dict(attrs or {})
        opdef = get_op(op)
        opdef.check_attrs(attrs, loc)
        out_types = opdef.infer([v.type for v in inputs], attrs)
        node = Node(op, list(inputs), attrs, [], loc)
        hint = name or (loc.split(".")[-1] if loc else "")
        if not hint or hint.isdigit():  # "layers.0" says nothing about the value
            hint = op.replace(".", "_")
        for i, t in enumerate(out_types):
            node.outputs.append(Value(self.fresh_name(hint if i == 0 else f"{hint}_{i}"), t, node))
        self.nodes.append(node)
        return node.outputs

    def add(self, op: str, *inputs: Value, loc: str = "", name: str = "", **attrs: Any) -> Value:
        """Single-output shorthand for add_node."""
        outs = self.add_node(op, inputs, attrs, loc=loc, name=name)
        if len(outs) != 1:
            raise ValueError(f"{op} has {len(outs)} outputs; use add_node")
        return outs[0]

    # ---- queries -------------------------------------------------------------------
    def users(self) -> dict[int, list[Node]]:
        """id(value) -> nodes that read it."""
        out: dict[int, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(id(v), []).append(n)
        return out

    def nodes_of(self, op: str) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    def values(self) -> Iterable[Value]:
        yield from self.inputs
        yield from self.params.values()
        for n in self.nodes:
            yield from n.outputs

    def weight_bytes(self) -> int:
        return int(sum(self.weights.nbytes(n) for n in self.weights))

    def replace_uses(self, old: Value, new: Value) -> None:
        for n in self.nodes:
            n.inputs = [new if v is old else v for v in n.inputs]
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove_param(self, name: str) -> None:
        del self.params[name]
        del self.weights[name]

    def clone(self) -> "Graph":
        """A deep copy of the structure; weight arrays are shared (passes replace, never mutate, them)."""
        memo: dict[int, Any] = {id(a): a for a in (self.weights.raw(n) for n in self.weights)}
        return copy.deepcopy(self, memo)
