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
from mocompile.ir.types import TensorType

PAST = "past"  # the symbol of the cached positions

# Ops whose output at a position depends only on the inputs at that position (and weights):
# with them, a forward over new positions needs the earlier ones only through attention's
# keys and values, which is what makes a KV cache exact.
# segment_ids gives each position its segment's id; concat is checked on its own (features, or
# segments joined along the sequence).
POSITIONWISE_OPS = frozenset({"embedding", "linear", "rmsnorm", "layernorm", "mlp", "router.topk", "experts", "add",
                              "mul", "sub", "div", "silu", "gelu", "sigmoid", "relu", "tanh", "dequantize",
                              "segment_ids"})
# The attention ops and which of their inputs hold keys/values (cached), by short name.
CACHED_INPUTS = {"attention": {1: "k", 2: "v"}, "attention.mla": {1: "k_nope", 2: "v", 3: "k_rope"}}


def token_input(graph: Graph) -> Value | None:
    """The input that decoding feeds chosen tokens back into: the first of ids [batch, seq]."""
    return next((v for v in graph.inputs if v.type.rank == 2 and v.type.dtype.startswith("int")), None)


def _is_symbol(d: object) -> bool:
    return isinstance(d, str) and not any(c in d for c in "+*")


def decode_support(graph: Graph) -> str | None:
    """None if the graph can run token by token with a KV cache, else why not."""
    if token_input(graph) is None:
        return "decoding needs a token input, ids [batch, seq], to feed the chosen tokens back"
    batch = graph.inputs[0].type.shape[0]
    segments = [v.type.shape[1] for v in graph.inputs if v.type.rank >= 2]
    for v in graph.inputs:
        if v.type.rank < 2 or v.type.shape[0] != batch or not _is_symbol(v.type.shape[1]) \
                or segments.count(v.type.shape[1]) > 1:
            return f"input {v.name} {v.type} is not a segment [batch, positions, ...] with positions of its own"
    if not any(n.op in CACHED_INPUTS for n in graph.nodes):
        return "the graph has no attention to cache"
    for n in graph.nodes:
        if n.op in CACHED_INPUTS:
            if n.op == "attention" and not n.attrs["causal"]:
                return f"attention at {n.loc or '?'} is not causal"
            if n.inputs[1].type.shape[1] != n.inputs[0].type.shape[1]:
                return f"{n.op} at {n.loc or '?'} already reads cached keys"
        elif n.op == "concat":
            rank, axis = n.outputs[0].type.rank, n.attrs["axis"] % n.outputs[0].type.rank
            joined = [t.type.shape[1] if t.type.rank > 1 else None for t in n.inputs]
            segments_joined = axis == 1 and len(set(joined)) == len(joined) and all(d in segments for d in joined)
            if axis != rank - 1 and not segments_joined:
                return f"concat at {n.loc or '?'} joins along axis {axis}, which is neither the features nor segments"
        elif n.op == "router.topk" and (n.attrs.get("capacity_factor") is not None
                                        or n.attrs.get("routing", "token_choice") != "token_choice"):
            return f"router.topk at {n.loc or '?'} routes each token by the others (capacity or batch-level routing)"
        elif n.op == "quantize_act":
            if n.attrs["mode"] == "tensor":
                return f"quantize_act at {n.loc or '?'} takes its scale over all positions"
        elif n.op not in POSITIONWISE_OPS:
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
        if node.op not in CACHED_INPUTS:
            continue
        layer = node.loc or node.outputs[0].name
        for index, what in CACHED_INPUTS[node.op].items():
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
