"""Readable text for a graph: one line per node, in the spirit of MLIR and torch.fx.
Values print as %name, weights as @name."""

from __future__ import annotations

from typing import Any

import numpy as np

from mocompile.ir.graph import Graph, Node


def _attr(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str):
        return v
    return repr(v)


def format_node(node: Node, weight_ids: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    outs = ", ".join(f"%{v.name}" for v in node.outputs)
    args = ", ".join(("@" if id(v) in weight_ids else "%") + v.name for v in node.inputs)
    attrs = ", ".join(f"{k}={_attr(v)}" for k, v in node.attrs.items())
    types = ", ".join(str(v.type) for v in node.outputs)
    loc = f"  # {node.loc}" if node.loc else ""
    return f"{outs} = {node.op}({args}){' {' + attrs + '}' if attrs else ''} : {types}{loc}"


def format_graph(graph: Graph, show_params: bool = True) -> str:
    weight_ids = {id(v) for v in graph.params.values()}
    ins = ", ".join(f"%{v.name}: {v.type}" for v in graph.inputs)
    outs = ", ".join(f"%{v.name}: {v.type}" for v in graph.outputs)
    lines = [f"graph {graph.name}({ins}) -> ({outs}) {{"]
    if show_params:
        total = sum(int(np.prod(graph.weights.meta(n)[0], dtype=np.int64)) for n in graph.weights)
        lines.append(f"  # {len(graph.params)} weights, {total:,} values, {graph.weight_bytes():,} bytes")
        lines.extend(f"  @{name} : {v.type}" for name, v in graph.params.items())
    lines.extend("  " + format_node(node, weight_ids) for node in graph.nodes)
    lines.append(f"  return {', '.join('%' + v.name for v in graph.outputs)}")
    lines.append("}")
    return "\n".join(lines)
