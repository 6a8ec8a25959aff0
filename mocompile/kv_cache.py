"""KV caching at the IR level: which graphs can decode token by token, and the cached form
of a graph, in which earlier positions enter only as the keys and values of each attention.

`cached_graph(g)` gives every attention node the keys/values of `past` earlier positions as
new graph inputs (`past.<layer>.<k|v|...>`, [batch, past, width], concatenated in front of
this call's along the sequence) and returns the concatenations as new graph outputs
(`present.<layer>...`, [batch, past+seq, width]): the cache after the call. The attention ops
read the longer keys as positions 0..past+seq-1 and put the queries at past.. (ir/ops/
attention.py). Prefill is past = 0 (zero-size arrays, fine for the interpreter), decode
seq = 1. The result is what a cached step computes, so the interpreter is the reference for
past > 0 (`run_cached_graph`) and the isolation analysis can prove a step keeps samples apart
(each cache row belongs to its sample). The TVM backend does not lower this graph: its `step`
function keeps the same cache in place, in its own layout (backends/tvm_cpu/kernels_attention.py).

A multimodal graph (one input per segment, joined along the sequence) decodes too: each call's
positions are its segments in the model's order, after the cached ones, so text tokens can
follow an image/audio prompt with the other segments empty (zero positions). No single forward
puts text after audio, so for such graphs the cached graph is the reference of a decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mocompile.ir.graph import Graph, Node, Value
from mocompile.ir.interpreter import run as interpret
from mocompile.ir.registry import get_op
from mocompile.ir.types import TensorType

PAST = "past"  # the symbol of the cached positions


def token_input(graph: Graph) -> Value | None:
    """The input that decoding feeds chosen tokens back into: the first of ids [batch, seq]."""
    return next((v for v in graph.inputs if v.type.rank == 2 and v.type.dtype.startswith("int")), None)


def _is_symbol(d: object) -> bool:
    return isinstance(d, str) and not any(c in d for c in "+*")


def decode_support(graph: Graph) -> str | None:
    """None if the graph can run token by token with a KV cache, else why not.

    A KV cache is exact when a forward over new positions needs the earlier ones only
    through the keys and values of attention: every op must be declared `positionwise`,
    keep positions apart by its `position_check`, or be an attention op (`cached_inputs`)
    whose keys are this call's (ir/registry.py)."""
    if token_input(graph) is None:
        return "decoding needs a token input, ids [batch, seq], to feed the chosen tokens back"
    batch = graph.inputs[0].type.shape[0]
    segments = [v.type.shape[1] for v in graph.inputs if v.type.rank >= 2]
    for v in graph.inputs:
        if v.type.rank < 2 or v.type.shape[0] != batch or not _is_symbol(v.type.shape[1]) \
                or segments.count(v.type.shape[1]) > 1:
            return f"input {v.name} {v.type} is not a segment [batch, positions, ...] with positions of its own"
    if not any(get_op(n.op).cached_inputs for n in graph.nodes):
        return "the graph has no attention to cache"
    for n in graph.nodes:
        op = get_op(n.op)
        why = op.position_check(n, segments) if op.position_check is not None else None
        if why is not None:
            return why
        if op.cached_inputs:
            if n.inputs[min(op.cached_inputs)].type.shape[1] != n.inputs[0].type.shape[1]:
                return f"{n.op} at {n.loc or '?'} already reads cached keys"
        elif op.position_check is None and not op.positionwise:
            return f"{n.op} at {n.loc or '?'} may mix positions"
    return None


def decode_steps(inputs: Mapping[str, np.ndarray], token: str, prompt: int) -> list[dict[str, np.ndarray]]:
    """The calls that decode `inputs` through a cache: first every segment, the token segment
    cut to its first `prompt` positions (the prefill), then each later token alone (the other
    segments empty). For a token model the outputs line up with one forward over `inputs`."""
    ids = inputs[token]
    if not 1 <= prompt <= ids.shape[1]:
        raise ValueError(f"the prompt must cover 1..{ids.shape[1]} positions (got {prompt})")
    first = {k: a[:, :prompt] if k == token else a for k, a in inputs.items()}
    return [first, *({k: a[:, t:t + 1] if k == token else a[:, :0] for k, a in inputs.items()}
                     for t in range(prompt, ids.shape[1]))]


@dataclass(frozen=True)
class CacheEntry:
    """One cached tensor: the graph input it is read from and the output it is returned in."""

    past: str
    present: str


@dataclass
class CachedGraph:
    graph: Graph
    entries: list[CacheEntry]  # in graph order; `present` of one call is `past` of the next


def cached_graph(graph: Graph) -> CachedGraph:
    """The cached form of `graph` (see the module doc); refuses, with the reason, a graph
    whose outputs at new positions could depend on earlier ones other than through attention."""
    why = decode_support(graph)
    if why is not None:
        raise ValueError(f"{graph.name}: cannot cache keys and values: {why}")
    g = graph.clone()
    before: dict[int, list[Node]] = {}
    entries: list[CacheEntry] = []
    for node in list(g.nodes):
        cached_inputs = get_op(node.op).cached_inputs
        if not cached_inputs:
            continue
        layer = node.loc or node.outputs[0].name
        for index, what in cached_inputs.items():
            new: Value = node.inputs[index]
            batch, _, width = new.type.shape
            past = g.add_input(f"past.{layer}.{what}", TensorType((batch, PAST, width), new.type.dtype))
            present = g.add("concat", past, new, axis=1, loc=node.loc, name=f"present.{layer}.{what}")
            before.setdefault(id(node), []).append(g.nodes.pop())  # placed in front of `node` below
            node.inputs[index] = present
            g.outputs.append(present)
            entries.append(CacheEntry(past.name, present.name))
    g.nodes = [m for n in g.nodes for m in (*before.get(id(n), ()), n)]
    return CachedGraph(g, entries)


def run_cached_graph(cached: CachedGraph, steps: list[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Interpret the cached graph over successive calls from an empty cache (past = 0); each
    call's outputs other than the cache."""
    types = {v.name: v.type for v in cached.graph.inputs}
    batch = next(iter(steps[0].values())).shape[0]
    cache = {e.past: np.zeros((batch, 0, types[e.past].shape[2]), types[e.past].dtype) for e in cached.entries}
    presents = {e.present for e in cached.entries}
    outs = []
    for step in steps:
        result = interpret(cached.graph, {**step, **cache})
        cache = {e.past: result[e.present] for e in cached.entries}
        outs.append({k: a for k, a in result.items() if k not in presents})
    return outs
