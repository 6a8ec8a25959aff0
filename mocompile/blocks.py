"""The residual blocks (decoder layers) of a graph: which nodes make up layer i, the hidden
state entering it and the one leaving it.

A model's layers are the numbered children of one module list (`layers.0`, `layers.1`, ...),
which the lowering keeps as each node's `loc`. A layer is a *block* when the nodes under one
number read exactly one value of the residual stream from outside and give exactly one value
of the same type back: then the layer computes `out = in + f(in)` (or any `out = g(in)`) and
removing it means reading `in` wherever `out` was read. Layer skipping and block influence
(1 - cos(in, out)) work on blocks; a graph whose layers are not blocks is refused by them with
the reason.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph, Node, Value

# graph.meta key: names of values (each layer's output) a backend also returns from a function
# of their own, so a verification can compare the artifact with a reference layer by layer
LAYER_STATES = "layer_states"

_NUMBERED = re.compile(r"^(?P<prefix>[A-Za-z_][\w.]*?)\.(?P<index>\d+)(?:\.|$)")


@dataclass
class Block:
    """Layer `index` of the graph: its nodes, the residual value entering and leaving it."""

    index: int
    name: str  # "layers.3"
    nodes: list[Node]
    input: Value
    output: Value


def _layer_of(loc: str) -> tuple[str, int] | None:
    m = _NUMBERED.match(loc or "")
    return (m.group("prefix"), int(m.group("index"))) if m else None


def layer_groups(graph: Graph) -> tuple[str, dict[int, list[Node]]]:
    """The module list the layers live in (the numbered prefix most nodes share) and its nodes
    by layer number."""
    prefixes = Counter(p for p in (_layer_of(n.loc) for n in graph.nodes) if p)
    if not prefixes:
        return "", {}
    prefix = Counter(p for p, _ in prefixes.elements()).most_common(1)[0][0]
    groups: dict[int, list[Node]] = {}
    for node in graph.nodes:
        where = _layer_of(node.loc)
        if where and where[0] == prefix:
            groups.setdefault(where[1], []).append(node)
    return prefix, dict(sorted(groups.items()))


def _block(graph: Graph, prefix: str, index: int, nodes: list[Node], users: dict[int, list[Node]]) -> Block | str:
    """The block of one layer, or why the layer is not one."""
    name = f"{prefix}.{index}"
    inside = {id(n) for n in nodes}
    made = {id(v) for n in nodes for v in n.outputs}
    outputs = {id(v) for v in graph.outputs}
    leaving = [v for n in nodes for v in n.outputs
               if id(v) in outputs or any(id(u) not in inside for u in users.get(id(v), []))]
    if len(leaving) != 1:
        return f"{name} gives {len(leaving)} values to the rest of the graph, not one hidden state"
    out = leaving[0]
    params = {id(v) for v in graph.params.values()}
    entering = {id(v): v for n in nodes for v in n.inputs if id(v) not in made and id(v) not in params}
    residual = [v for v in entering.values() if v.type == out.type]
    if len(residual) != 1:
        return f"{name} reads {len(residual)} values of its output's type {out.type}, not one hidden state"
    return Block(index, name, nodes, residual[0], out)


def blocks(graph: Graph) -> list[Block]:
    """Every layer of the graph as a Block, in order; one clear line when a layer is not one
    (or the graph has no numbered layers)."""
    prefix, groups = layer_groups(graph)
    if not groups:
        raise MocompileError(f"{graph.name}: no numbered layers (nodes at e.g. layers.0, layers.1) to work on")
    users = graph.users()
    out = []
    for index, nodes in groups.items():
        b = _block(graph, prefix, index, nodes, users)
        if isinstance(b, str):
            raise MocompileError(f"{graph.name}: {b}")
        out.append(b)
    return out


def remove_blocks(graph: Graph, chosen: list[Block]) -> None:
    """Remove the chosen layers: whatever read a layer's output reads its input instead (the
    residual stream passes it by), and the layers' nodes go (their weights and any node left
    unread are for dead-code elimination)."""
    for b in sorted(chosen, key=lambda b: b.index):
        graph.replace_uses(b.output, b.input)
        for later in chosen:  # a removed layer right after this one reads what this one read
            if later.input is b.output:
                later.input = b.input
    gone = {id(n) for b in chosen for n in b.nodes}
    graph.nodes = [n for n in graph.nodes if id(n) not in gone]
