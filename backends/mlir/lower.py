"""The registry of the mlir target's per-op torch code, and the context a lowering gets.

Each IR op the target exports has one function, registered with `@torch_lowering(op, ...)`,
that computes the op's outputs from torch tensors exactly as the op's numpy reference does
(mocompile/ir/ops/*.py). A graph is exported by running these functions under torch.export
(emit_torch.py), so the exported program is the IR after the pass pipeline, op by op, not
the original torch module. What a lowering refuses (an attribute it has no export for) is
said by its `refuses(node, dialect)`, asked before anything is traced, so such a graph fails
in one line naming the op and where it sits.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from mocompile.backends.base import register_lowering
from mocompile.ir.graph import Graph, Node

DIALECTS = {"linalg": "linalg-on-tensors", "stablehlo": "stablehlo", "tosa": "tosa", "torch": "torch"}
STATIC_DIALECTS = frozenset({"tosa"})  # exported at the compile's fixed shapes (no dynamic dims)


@dataclass
class LowerContext:
    """What a lowering may read besides its node and inputs: the dialect being exported
    (routing and expert dispatch differ where a dialect cannot legalise an op) and the notes
    it leaves for the manifest (what was made dense, and why)."""

    dialect: str
    notes: dict[str, str] = field(default_factory=dict)

    def note(self, what: str, why: str) -> None:
        self.notes.setdefault(what, why)


Lowering = Callable[[LowerContext, Node, Sequence[Any]], Sequence[Any]]
Refusal = Callable[[Node, str], "str | None"]
LOWERINGS: dict[str, Lowering] = {}
REFUSALS: dict[str, Refusal] = {}


def torch_lowering(*ops: str, refuses: Refusal | None = None) -> Callable[[Lowering], Lowering]:
    """Register the decorated function as the torch code of IR op(s) `ops`; `refuses(node,
    dialect)` says why a node of theirs cannot be exported to `dialect` (None: it can)."""

    def register(fn: Lowering) -> Lowering:
        register_lowering(LOWERINGS, REFUSALS, ops, fn, refuses)
        return fn

    return register


def lower_node(ctx: LowerContext, node: Node, inputs: Sequence[Any]) -> Sequence[Any]:
    """The torch values of `node`'s outputs from those of its inputs."""
    return LOWERINGS[node.op](ctx, node, inputs)


def register_builtin_lowerings() -> None:
    for module in ("torch_nn", "torch_attention", "torch_moe"):
        importlib.import_module(f"mocompile.backends.mlir.{module}")  # registers on import


def refusal(graph: Graph, dialect: str) -> str | None:
    """Why `graph` cannot be exported to `dialect`: an op without torch code, or a node its
    lowering refuses; one line naming the op and where it sits."""
    register_builtin_lowerings()
    for node in graph.nodes:
        if node.op not in LOWERINGS:
            return f"the mlir target cannot lower op {node.op} at {node.loc or '?'} (no torch export for it)"
        why = REFUSALS[node.op](node, dialect) if node.op in REFUSALS else None
        if why:
            return f"the mlir target cannot lower op {node.op} at {node.loc or '?'} to {dialect}: {why}"
    return None
