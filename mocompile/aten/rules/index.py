"""Gathers and scatters: index, index_put (x[i] = v, index_add), index_select, gather,
scatter, embedding lookups.

Indexing a non-batch axis with indices from the same sample is per sample (a per-token
expert's weights, take_along_axis of a sample's own argsort). Indexing the batch axis reads
or writes another sample's positions, unless the indices are positions along that very axis
("iota", "perm", the batch column of nonzero; see `mocompile.aten.state`): then the rows only
change places, the gathered rows take the index's own layout (in a batch-wide order when the
index is a sort's), and scattering rows back by the same positions puts each where it came
from (MoE dispatch: gather tokens by the sort or the mask's nonzero, run the experts,
index_add the results back).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mocompile.aten.call import Call
from mocompile.aten.registry import rule
from mocompile.aten.state import INDEX_ROLES, Axis, Flow, Out, State, combine, with_axes
from mocompile.ir.batch_flow import identity_map

aten = torch.ops.aten
BY_VALUE = "selects positions along the batch axis by index values: a position may come from another sample"
WRITE_BY_VALUE = ("writes at positions given by index values: a sample's value may land in another sample's place, or "
                  "several samples' in one")

Entry = tuple[int, str, State, int]  # (indexed axis of self, argument name, index state, index rank)


def _entries(call: Call, name: str) -> list[Entry]:
    """The non-None index tensors of a Tensor?[] argument, with the axis each indexes."""
    out = []
    for d, node in enumerate(call.arg(name) or []):
        if node is not None:
            val = node.meta.get("val")
            out.append((d, name, call.state_of(node), val.dim() if val is not None else 0))
    return out


def _layout(r: int, entries: list[Entry]) -> tuple[list[int | None], int, int]:
    """numpy advanced indexing: the output axis of each non-indexed axis of self (None for
    indexed ones), where the block of broadcast index axes starts, and its rank."""
    indexed = [e[0] for e in entries]
    block = max(e[3] for e in entries)
    adjacent = indexed == list(range(indexed[0], indexed[-1] + 1))
    start = indexed[0] if adjacent else 0
    rest = [d for d in range(r) if d not in indexed]
    amap: list[int | None] = [None] * r
    for k, d in enumerate(rest):
        amap[d] = (d if d < start else d - len(indexed) + block) if adjacent else block + k
    return amap, start, block


def _index_map(rank: int, start: int, block: int) -> list[int | None]:
    return [start + block - rank + a for a in range(rank)]


def _positions(index: State, b: Axis | None) -> bool:
    """Whether `index` holds positions along axis `b` (whose layout it was made for)."""
    return b is not None and index.role in INDEX_ROLES and index.target == b.layout and len(index.axes) == 1


def gather_rows(call: Call, base: State, r: int, entries: list[Entry]) -> Flow:
    """x[i0, i1, ...] (numpy advanced indexing, None entries left out)."""
    amap, start, block = _layout(r, entries)
    states, maps, structural = [base], [amap], set()
    for d, name, index, rank in entries:
        b = base.axis(d)
        if _positions(index, b):
            states[0] = with_axes(states[0], [a for a in states[0].axes if a.axis != d])
            structural.add(name)
            index = State(axes=index.axes)
        states.append(index)
        maps.append(_index_map(rank, start, block))
    return Flow((combine(states, maps, why=BY_VALUE),), frozenset(structural))


@rule(aten.index.Tensor)
def index(call: Call) -> Flow:
    return gather_rows(call, call.state("self"), call.rank("self"), _entries(call, "indices"))


@rule(aten.index_select.default)
def index_select(call: Call) -> Flow:
    r = call.rank("self")
    entry = (call.dim("dim", r), "index", call.state("index"), 1)
    return gather_rows(call, call.state("self"), r, [entry])


Placed = dict[int, tuple[int, Axis, Axis]]  # index-block axis -> (axis of self, index's own axis, where it points)


def _into_self(s: State, amap: list[int | None], back: dict[int, int], placed: Placed) -> State | None:
    """A state laid out like x[indices] expressed in x's own axes (None: it lands where the
    index values decide): axes of the non-indexed part go back where they came from, an
    axis of the index block aligned with positions along a batch axis goes to that axis."""
    axes = []
    for b in s.axes:
        o = amap[b.axis]
        if o in back:
            axes.append(replace(b, axis=back[o]))
        elif o in placed and b.layout == placed[o][1].layout:
            axes.append(placed[o][2])
        else:
            return None
    return with_axes(s, axes)


@rule(aten.index_put.default, aten.index_put_.default, aten._unsafe_index_put.default)
def index_put(call: Call) -> Flow:
    """x[indices] = values (accumulate: +=, which index_add becomes)."""
    base, r = call.state("self"), call.rank("self")
    entries = _entries(call, "indices")
    amap, start, block = _layout(r, entries)
    back = {o: d for d, o in enumerate(amap) if o is not None}
    placed: Placed = {}
    data_indices = []
    for d, _, idx, rank in entries:
        b = base.axis(d)
        if idx.role in INDEX_ROLES and len(idx.axes) == 1 and idx.target and (b is None or _positions(idx, b)):
            rows, outer, order = idx.target
            own = idx.axes[0]
            placed[_index_map(rank, start, block)[own.axis]] = (d, own, Axis(d, rows, order, outer))
        elif b is not None:
            return Flow((Out(mixes=WRITE_BY_VALUE),))
        else:
            data_indices.append((idx, rank))
    res_rank = r - len(entries) + block
    vr = call.rank("values")
    parts = [_into_self(call.state("values"), [a + res_rank - vr for a in range(vr)], back, placed)]
    parts += [_into_self(State(axes=idx.axes), _index_map(rank, start, block), back, placed)
              for idx, rank in data_indices]
    if any(p is None for p in parts):
        return Flow((Out(mixes=WRITE_BY_VALUE),))
    written = [State(axes=(target,)) for _, _, target in placed.values()]  # which rows get written: their own data
    states = [base, *parts, *written]
    return Flow((combine(states, [identity_map(r)] * len(states)),), frozenset({"indices"}) if placed else frozenset())


@rule(aten.scatter.src, aten.scatter.value, aten.scatter_add.default, aten.scatter_reduce.two,
      aten.scatter.reduce, aten.scatter.value_reduce)
def scatter(call: Call) -> Flow:
    """self with src[..., j, ...] put at index[..., j, ...] along `dim`: per sample unless
    `dim` is the batch axis."""
    r = call.rank("self")
    d = call.dim("dim", r)
    names = [n for n in ("self", "index", "src", "value") if call.arg(n) is not None]
    states = [call.state(n) for n in names]
    if any(s.axis(d) for s in states):
        return Flow((Out(mixes=WRITE_BY_VALUE),))
    return Flow((combine(states, [identity_map(call.rank(n)) for n in names]),))


@rule(aten.gather.default)
def gather(call: Call) -> Flow:
    """self[..., index[..., j, ...], ...] along `dim`, elementwise along the other axes."""
    r = call.rank("self")
    d = call.dim("dim", r)
    return Flow((combine([call.state("self"), call.state("index")], [identity_map(r, drop=[d]), identity_map(r)],
                         why=BY_VALUE),))


@rule(aten.masked_scatter.default)
def masked_scatter(call: Call) -> Flow:
    """The masked positions take source's elements in order over the whole tensor: with a
    batch axis in the mask or the source, a sample gets elements counted past the others'."""
    mask, source = call.state("mask"), call.state("source")
    if mask.axes or source.axes:
        return Flow((Out(mixes="masked_scatter hands out the source's elements in order across the whole "
                               "batch: which ones a sample gets depends on the other samples' masks"),))
    r = call.out_rank()
    return Flow((combine([call.state("self"), mask], [identity_map(r), list(range(r - call.rank("mask"), r))]),))


@rule(aten.embedding.default)
def embedding(call: Call) -> Flow:
    """A table lookup: the output has the indices' axes and the table's row width."""
    r = call.out_rank()
    return Flow((combine([call.state("weight"), call.state("indices")], [[None, r - 1], identity_map(r - 1)]),))


@rule(aten._embedding_bag.default, aten._embedding_bag_forward_only.default)
def embedding_bag(call: Call) -> Flow:
    """Bags of a 2-D index are its rows (per sample); bags given by offsets into a flat index
    are data the analysis does not follow."""
    indices = call.state("indices")
    if call.rank("indices") == 2:
        out = combine([call.state("weight"), indices], [[None, 1], [0, None]])
    elif indices.axes:
        out = Out(unknown="embedding_bag with bags given by offsets into a flat index over the batch")
    else:
        out = combine([call.state("weight")], [[None, 1]])
    return Flow(tuple(out for _ in call.outs))


@rule(aten.embedding_dense_backward.default)
def embedding_backward(call: Call) -> Flow:
    """The table's gradient sums the gradients of every position that looked a row up."""
    r = call.rank("grad_output")
    return Flow((combine([call.state("grad_output"), call.state("indices")], [[None] * (r - 1) + [1], None],
                         why="sums the gradients of every position of the batch into the table"),))
