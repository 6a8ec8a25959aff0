"""What a batch-flow rule sees of one ATen call: its arguments bound to the op's schema
names, their abstract states and fake values, the fake outputs, and the batch symbol.

Rules read `call.state("self")`, `call.dims("self")`, `call.arg("dim")` instead of
positions, so one rule serves every overload of an op whose arguments share names.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch.fx

from mocompile.aten.shapes import Batch, dims_of
from mocompile.aten.state import CONST, State
from mocompile.ir.types import Dim

VALUE_TYPES = ("Tensor", "Optional[Tensor]", "number", "Optional[number]")  # as str(schema argument type) spells them


def bind(node: torch.fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (positional for targets
    without a schema: Python operators on symbolic sizes)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {f"arg{i}": a for i, a in enumerate(node.args)} | dict(node.kwargs)
    out: dict[str, Any] = {}
    positional = list(node.args)
    for a in schema.arguments:
        if positional and not a.kwarg_only:
            out[a.name] = positional.pop(0)
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


class Call:
    """One call_function node under analysis (module docstring)."""

    def __init__(self, node: torch.fx.Node, states: Mapping[torch.fx.Node, Any], batch: Batch,
                 subgraph: Callable[[torch.fx.Graph, list[State]], list[State]] | None = None) -> None:
        self.node = node
        self.subgraph = subgraph  # the analysis of a subgraph (torch.cond's branches) from its inputs' states
        self.batch = batch
        self.args = bind(node)
        self._states = states
        schema = getattr(node.target, "_schema", None)
        self.types = {a.name: str(a.type) for a in schema.arguments} if schema is not None else {}
        val = node.meta.get("val")
        self.outs: list[Any] = list(val) if isinstance(val, (tuple, list)) else ([] if val is None else [val])

    @property
    def tag(self) -> str:
        """The node's name: unique, so it also names a permutation the node creates."""
        return self.node.name

    def arg(self, name: str, default: Any = None) -> Any:
        return self.args.get(name, default)

    def state_of(self, a: Any) -> State:
        if isinstance(a, torch.fx.Node):
            s = self._states.get(a, CONST)
            return s if isinstance(s, State) else CONST
        return State(fill=a) if isinstance(a, (int, float, bool)) else CONST

    def state(self, name: str) -> State:
        return self.state_of(self.args.get(name))

    def states(self, name: str) -> list[State | None]:
        """A list argument (Tensor[], Tensor?[]): each element's state, None for a None entry."""
        return [None if a is None else self.state_of(a) for a in self.args.get(name) or []]

    def val(self, name: str) -> Any:
        a = self.args.get(name)
        return a.meta.get("val") if isinstance(a, torch.fx.Node) else a

    def dims(self, name: str) -> tuple[Dim, ...]:
        return dims_of(self.val(name))

    def rank(self, name: str) -> int:
        return len(self.dims(name))

    def out_dims(self, i: int = 0) -> tuple[Dim, ...]:
        return dims_of(self.outs[i]) if i < len(self.outs) else ()

    def out_rank(self, i: int = 0) -> int:
        return len(self.out_dims(i))

    def dim(self, name: str, rank: int, default: Any = None) -> int:
        """A dim argument made non-negative."""
        d = self.args.get(name, default)
        return int(d) % rank if rank else 0

    def dim_list(self, name: str, rank: int) -> list[int]:
        """A dim-list argument (None or [] meaning every axis), non-negative."""
        d = self.args.get(name)
        if d is None or (isinstance(d, Sequence) and len(d) == 0):
            return list(range(rank))
        d = [d] if isinstance(d, int) else d
        return sorted({int(x) % rank for x in d}) if rank else []

    def value_args(self) -> list[str]:
        """The arguments an elementwise op reads as values: tensors and scalars (graph nodes
        or Python numbers), in schema order."""
        return [n for n, t in self.types.items() if t in VALUE_TYPES
                and isinstance(self.args.get(n), (torch.fx.Node, int, float, bool))]
