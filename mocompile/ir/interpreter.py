"""The IR interpreter: runs a graph on numpy arrays with each op's reference semantics.

It is the oracle: every pass and every backend is checked against it.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from mocompile.ir.graph import Graph, Node, Value
from mocompile.ir.registry import get_op
from mocompile.ir.types import bind_shape


def bind_inputs(graph: Graph, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Check the inputs against the graph signature; return the symbol bindings."""
    env: dict[str, int] = {}
    missing = [v.name for v in graph.inputs if v.name not in inputs]
    if missing:
        raise ValueError(f"missing input(s): {', '.join(missing)}")
    for v in graph.inputs:
        a = np.asarray(inputs[v.name])
        if str(a.dtype) != v.type.dtype:
            raise ValueError(f"input {v.name}: expected {v.type.dtype}, got {a.dtype}")
        bind_shape(v.type, a.shape, env, f"input {v.name}")
    return env


Perturb = Callable[[Node, list[np.ndarray]], list[np.ndarray]]
AfterNode = Callable[[Node, list[np.ndarray]], None]


def last_uses(graph: Graph) -> dict[int, list[Value]]:
    """Node index -> the values no later node reads (freed once that node has run)."""
    last: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            last[id(v)] = i
    by_node: dict[int, list[Value]] = {}
    values = {id(v): v for node in graph.nodes for v in node.inputs}
    for key, i in last.items():
        by_node.setdefault(i, []).append(values[key])
    return by_node


def run(graph: Graph, inputs: Mapping[str, np.ndarray], watch: Sequence[Value] = (),
        perturb: Perturb | None = None, after: AfterNode | None = None,
        before: AfterNode | None = None) -> dict[str, np.ndarray]:
    """Evaluate the graph; returns {output name: array}, plus the intermediate values in
    `watch` by name (e.g. the output of one op, to see where a difference starts).
    `perturb(node, inputs)` may replace a node's inputs before it computes (to measure how
    sensitive the outputs are to float noise at that node); `after(node, outputs)` sees each
    node's results as they are made (calibration statistics), `before(node, inputs)` the
    arrays a node reads (statistics of what happens inside an op, e.g. a feed-forward
    block's hidden activation, recomputed from its inputs). An intermediate is dropped as
    soon as no later node reads it, so memory holds the live values only, not every
    activation of the model."""
    bind_inputs(graph, inputs)
    env: dict[int, np.ndarray] = {id(v): np.asarray(inputs[v.name]) for v in graph.inputs}
    # Weights are looked up as each node runs: a lazy weight (weights.py) is then read from
    # its file for that node only, so a graph too big for memory in float32 still runs.
    weights = {id(v): name for name, v in graph.params.items()}
    keep = {id(v) for v in (*graph.outputs, *watch, *graph.inputs, *graph.params.values())}
    frees = last_uses(graph)
    read = {id(v) for n in graph.nodes for v in n.inputs}
    for i, node in enumerate(graph.nodes):
        args = [graph.weights[weights[id(v)]] if id(v) in weights else env[id(v)] for v in node.inputs]
        if perturb is not None:
            args = perturb(node, args)
        if before is not None:
            before(node, args)
        results = get_op(node.op).compute(args, node.attrs)
        if after is not None:
            after(node, results)
        for v, r in zip(node.outputs, results):
            if id(v) in keep or id(v) in read:
                env[id(v)] = r
        del args
        for v in frees.get(i, ()):
            if id(v) not in keep:
                env.pop(id(v), None)
    return {v.name: graph.weights[weights[id(v)]] if id(v) in weights else env[id(v)]
            for v in (*graph.outputs, *watch)}
