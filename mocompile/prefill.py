"""The last-position form of a graph that decodes with a KV cache: what a prompt step
computes when only the next token's logits are wanted (llama.cpp's llama-bench prompt case,
MLC-LLM's `prefill`, vLLM all compute the last token's logits only).

`last_position_graph(g)` keeps every output that has a positions axis ([batch, positions,
...], positions = the segments' sequence axis) for the last position only ([batch, 1, ...])
and pushes that cut as early as it can: walking back from the outputs, a node moves after the
cut when it computes each position alone (its op is `positionwise`, ir/registry.py, or its
`position_check` passes and nothing joins positions), all its outputs carry the positions on
axis 1, and every reader of them is already after the cut (or is a graph output being cut).
The inputs of the moved nodes that carry positions and come from before the cut go through
the `last_position` op (ir/ops/shape.py). So everything after the last attention (its output
projection, the last block's router and experts, the final norm and the LM head) runs on one
row per sample instead of every position; the attention itself still reads every position's
keys, values and queries, which the cache needs. Outputs without a positions axis (and the KV
cache a cached graph returns) are unchanged; `cached_last_position_graph` is the cut of the
cached graph (kv_cache.py), what the compiled `prefill` function computes.

A multimodal graph's positions are its segments joined along the sequence in the model's
order (the `concat` that joins them), so the last position is the last of the joined sequence:
the one whose logits `generate` reads for the next token, whichever segment it belongs to. A
value that carries one segment's positions only (before the join) is never cut: its last
position is not the sequence's.

The result computes the same numbers as the original's outputs at the last position
(the interpreter shows it; the compiled `prefill` is checked bit for bit against the `step`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mocompile.ir.graph import Graph, Node, Value
from mocompile.ir.registry import get_op
from mocompile.ir.types import PositionsAxis, TensorType
from mocompile.kv_cache import CachedGraph, cached_graph, decode_support

CUT_OP = "last_position"
# the functions a decoding artifact runs besides its forward, as messages and reports name them
DECODING_FUNCTIONS = {"step": "KV-cached step", "prefill": "prompt prefill"}


@dataclass
class LastPositionGraph:
    """The transformed graph; `cut`: the names of the outputs kept for the last position only;
    `moved`: the places (op@loc) of the nodes that run after the cut, in order."""

    graph: Graph
    cut: list[str]
    moved: list[str] = field(default_factory=list)


def last_position_graph(graph: Graph) -> LastPositionGraph | str:
    """The last-position form of `graph` (module doc), or why there is none: the graph does
    not decode with a KV cache, an output counts positions other than on axis 1, or no output
    has a positions axis."""
    why = decode_support(graph)
    if why is not None:
        return f"the graph does not decode with a KV cache ({why})"
    return _cut(graph, _positions(graph), set())


def cached_last_position_graph(graph: Graph, cached: CachedGraph | None = None) -> LastPositionGraph | str:
    """The last-position form of the KV-cached graph (kv_cache.cached_graph; `cached`: that
    form, already built): what the compiled `prefill` computes, the cache included (its
    `present.*` outputs stay whole). The isolation analysis proves from it that a prompt step
    through the cut keeps samples apart."""
    if cached is None:
        why = decode_support(graph)
        if why is not None:
            return f"the graph does not decode with a KV cache ({why})"
        cached = cached_graph(graph)
    return _cut(cached.graph, _positions(graph), {e.present for e in cached.entries})


def _positions(graph: Graph) -> PositionsAxis:
    return PositionsAxis(v.type.shape for v in graph.inputs)


def _cut(graph: Graph, pos: PositionsAxis, keep: set[str]) -> LastPositionGraph | str:
    cut: list[Value] = []
    for v in graph.outputs:
        if v.name in keep or pos.free(v.type.shape):
            continue
        if not pos.carries(v.type.shape):
            return f"output {v.name} {v.type} counts positions elsewhere than as axis 1 [batch, positions, ...]"
        cut.append(v)
    if not cut:
        return "no output has a positions axis to keep the last position of"
    g = graph.clone()
    index = {id(v): i for i, v in enumerate(graph.outputs)}
    cut_ids = {id(g.outputs[index[id(v)]]) for v in cut}
    users = g.users()
    moved: set[int] = set()
    for node in reversed(g.nodes):
        if _movable(node, pos, users, moved, cut_ids):
            moved.add(id(node))
    why = _rebuild(g, moved, cut_ids, pos)
    if why is not None:
        return why
    return LastPositionGraph(g, [v.name for v in cut], [f"{n.op}@{n.loc}" for n in g.nodes if id(n) in moved])


def _movable(node: Node, pos: PositionsAxis, users: dict[int, list[Node]], moved: set[int], cut_ids: set[int]) -> bool:
    """Can `node` run after the cut: positionwise, every output [batch, positions, ...] read only
    by nodes already after the cut (or cut as a graph output), every input carrying the
    positions on axis 1 or none at all?"""
    if not _positionwise_here(node, pos):
        return False
    for out in node.outputs:
        readers = users.get(id(out), [])
        if not pos.carries(out.type.shape) or not (readers or id(out) in cut_ids):
            return False
        if any(id(r) not in moved for r in readers):
            return False
    return all(pos.carries(v.type.shape) or pos.free(v.type.shape) for v in node.inputs)


def _positionwise_here(node: Node, pos: PositionsAxis) -> bool:
    """Whether `node` computes each position from that position alone: its op is positionwise,
    or keeps positions apart for this node's attributes (its `position_check` passes: a
    quantize_act rounding per token or per tensor constant, a token-choice router) without
    joining or reading other positions (no cached keys; at one position its outputs are at
    one position). Moving such a node with its readers keeps fused pairs together (the
    integer kernels read a quantize_act's codes in the matmul after it)."""
    op = get_op(node.op)
    if op.positionwise:
        return True
    if op.position_check is None or op.cached_inputs or op.position_check(node, pos.segments) is not None:
        return False
    at_one = [TensorType((v.type.shape[0], 1, *v.type.shape[2:]), v.type.dtype)
              if pos.carries(v.type.shape) else v.type for v in node.inputs]
    try:
        types = op.infer(at_one, node.attrs)
    except ValueError:
        return False
    return all(t.shape[1] == 1 for t, out in zip(types, node.outputs) if pos.carries(out.type.shape))


def _rebuild(g: Graph, moved: set[int], cut_ids: set[int], pos: PositionsAxis) -> str | None:
    """Reorder `g` in place: the nodes before the cut, one `last_position` per value crossing
    it, then the moved nodes with their output types at one position; None, or why not."""
    before = [n for n in g.nodes if id(n) not in moved]
    after = [n for n in g.nodes if id(n) in moved]
    last: dict[int, Value] = {}

    def crossing(v: Value) -> Value:
        if id(v) not in last:
            last[id(v)] = g.add(CUT_OP, v, loc=v.producer.loc if v.producer else "", name=f"{v.name}.last")
        return last[id(v)]

    def before_cut(v: Value) -> bool:
        return v.producer is None or id(v.producer) not in moved

    g.nodes = before
    for node in after:
        node.inputs = [crossing(v) if pos.carries(v.type.shape) and before_cut(v) else v for v in node.inputs]
        types = get_op(node.op).infer([v.type for v in node.inputs], node.attrs)
        for out, t in zip(node.outputs, types):
            want = TensorType((out.type.shape[0], 1, *out.type.shape[2:]), out.type.dtype)
            if t != want:  # an attribute that names the positions (none of today's positionwise ops)
                return f"{node.op} at {node.loc or '?'}: at one position its output is {t}, not {want}"
            out.type = t
    outputs = []
    for v in g.outputs:
        if id(v) in cut_ids and before_cut(v):  # cut right where it is made: the copy keeps the output's name
            name, v.name = v.name, g.fresh_name(f"{v.name}.all")
            v = crossing(v)
            v.name = name
        outputs.append(v)
    g.nodes = g.nodes + after
    g.outputs = outputs
    return None
