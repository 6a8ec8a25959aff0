"""The verifier: checks a graph is well formed. Runs after every pass, so a pass that
breaks the graph is caught at the pass, not three stages later in a backend."""

from __future__ import annotations

from mocompile.ir.graph import Graph
from mocompile.ir.registry import get_op
from mocompile.ir.types import TensorType


class VerifyError(Exception):
    """A malformed IR graph (a compiler bug or a bad pass, never user input)."""


def verify(graph: Graph) -> None:
    """Raise VerifyError naming the first problem found."""
    defined: set[int] = set()
    names: set[str] = set()

    def define(v, where: str) -> None:
        if v.name in names:
            raise VerifyError(f"{where}: value name {v.name!r} defined twice")
        names.add(v.name)
        defined.add(id(v))

    for v in graph.inputs:
        define(v, "inputs")
    for name, v in graph.params.items():
        define(v, "params")
        if name != v.name:
            raise VerifyError(f"param {name!r} holds value {v.name!r}")
        if name not in graph.weights:
            raise VerifyError(f"param {name!r} has no weight array")
        shape, dtype = graph.weights.meta(name)  # a lazy weight is checked without reading it
        if TensorType(shape, dtype) != v.type:
            raise VerifyError(f"param {name!r}: array {dtype}{list(shape)} does not match type {v.type}")
    if set(graph.weights) != set(graph.params):
        raise VerifyError(f"weights without a param: {sorted(set(graph.weights) - set(graph.params))}")
    for node in graph.nodes:
        where = f"{node.op} at {node.loc or '?'}"
        try:
            opdef = get_op(node.op)
        except KeyError as e:
            raise VerifyError(f"{where}: {e.args[0]}") from None
        for v in node.inputs:
            if id(v) not in defined:
                raise VerifyError(f"{where}: input %{v.name} used before it is defined")
        attrs = dict(node.attrs)
        try:
            opdef.check_attrs(attrs, node.loc)
            expected = opdef.infer([v.type for v in node.inputs], attrs)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise VerifyError(f"{where}: {e}") from None
        got = [v.type for v in node.outputs]
        if expected != got:
            raise VerifyError(f"{where}: outputs typed {[str(t) for t in got]}, inference says {[str(t) for t in expected]}")
        for v in node.outputs:
            if v.producer is not node:
                raise VerifyError(f"{where}: output %{v.name} does not point back at its node")
            define(v, where)
    for v in graph.outputs:
        if id(v) not in defined:
            raise VerifyError(f"graph output %{v.name} is not defined")
