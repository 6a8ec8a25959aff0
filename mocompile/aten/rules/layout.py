"""Views and data movement: where the batch axis goes when elements only change places.

A view keeps a sample's positions together as long as the batch axis is not split across
output positions; the reshape arithmetic is in `mocompile.aten.shapes`. Cutting, flipping,
padding or tiling the batch axis itself moves one sample's values to another sample's
position: a slice that keeps part of the batch (x[1:] - x[:-1]), a flip, a pad. Slicing the
full axis is the identity. nonzero's output ("coords") has one column of positions along
the batch axis: slicing out that column gives positions, the others are per-row data.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from mocompile.aten.call import Call
from mocompile.aten.registry import rule
from mocompile.aten.rules.common import label_kept, moved, relayout
from mocompile.aten.shapes import dim_of, keeps_axis_whole, regroup
from mocompile.aten.state import COORDS, DATA, INDEX_ROLES, LABEL, PERM, Axis, Flow, Out, State, combine
from mocompile.ir.ops.layout import mono

aten = torch.ops.aten
FULL = 2 ** 62  # torch.export writes an open slice end as a huge int


@rule(aten.permute.default)
def permute(call: Call) -> Flow:
    dims = [int(d) % call.rank("self") for d in call.arg("dims")]
    return moved(call, "self", [dims.index(a) for a in range(len(dims))])


@rule(aten.transpose.int, aten.t.default)
def transpose(call: Call) -> Flow:
    """Not core (exports keep it where torch cannot decompose the graph): a permute of two axes."""
    r = call.rank("self")
    d0, d1 = (call.dim("dim0", r), call.dim("dim1", r)) if call.node.target is aten.transpose.int else (0, r - 1)
    swap = {d0: d1, d1: d0}
    return moved(call, "self", [swap.get(a, a) for a in range(r)])


@rule(aten.unsqueeze.default)
def unsqueeze(call: Call) -> Flow:
    d = call.dim("dim", call.out_rank())
    return moved(call, "self", [a if a < d else a + 1 for a in range(call.rank("self"))])


@rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def squeeze(call: Call) -> Flow:
    """Only axes of size 1 go, and a batch axis never has size 1 (the batch is symbolic)."""
    src, r = call.dims("self"), call.rank("self")
    dims = call.dim_list("dim", r) if call.arg("dim") is not None else list(range(r))
    gone = [a for a in dims if src[a] == 1]
    return moved(call, "self", [None if a in gone else a - sum(g < a for g in gone) for a in range(r)])


@rule(aten.expand.default)
def expand(call: Call) -> Flow:
    shift = call.out_rank() - call.rank("self")
    return Flow((relayout(call, "self", [a + shift for a in range(call.rank("self"))]),), frozenset({"self", "size"}))


@rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def view(call: Call) -> Flow:
    """The batch axis survives a reshape while each output position along it still holds one
    sample's positions; rows in a batch-wide order may not be regrouped at all."""
    s, src, dst = call.state("self"), call.dims("self"), call.out_dims()
    axes = []
    for b in s.axes:
        if b.moved:
            c = keeps_axis_whole(src, dst, b.axis)
            if c is None:
                return Flow((Out(mixes=f"regroups rows that are in the batch-wide order of {b.moved}: one output "
                                       "position may hold rows of different samples"),))
            axes.append(replace(b, axis=c))
            continue
        got = regroup(src, dst, b.axis, b.rows, b.outer, call.batch)
        if isinstance(got, str):
            return Flow((Out(unknown=got),))
        axes.append(Axis(got[0], got[1], None, got[2]))
    if len({b.axis for b in axes}) < len(axes):
        return Flow((Out(mixes="merges the two batch axes of a pair into one"),))
    whole = len(s.axes) == 1 and keeps_axis_whole(src, dst, s.axes[0].axis) is not None
    keep_index = s.role in INDEX_ROLES and whole
    out = Out(axes=tuple(sorted(axes, key=lambda b: b.axis)), offblock=s.offblock if len(axes) == 2 else None,
              role=s.role if keep_index or s.role == LABEL else DATA, target=s.target if keep_index else None,
              perm=s.perm if keep_index else "", fill=s.fill,
              carried=s.latent if len(axes) == 2 else frozenset())
    return Flow((out,), frozenset({"self", "size"}))


def _full(start: Any, end: Any, step: Any, size: Any) -> bool:
    """Whether slice(start, end, step) covers an axis of `size` whole."""
    if start not in (None, 0) or step not in (None, 1):
        return False
    return end is None or (isinstance(end, int) and end >= FULL) or mono(dim_of(_value(end))) == mono(size)


def _value(a: Any) -> Any:
    return a.meta.get("val") if isinstance(a, torch.fx.Node) else a


def _column(call: Call, s: State, lo: int, hi: int) -> Out:
    """Columns lo:hi of nonzero's coordinates: positions if that is the batch column alone."""
    if (lo, hi) == (s.column, s.column + 1):
        return Out(axes=s.axes, role=PERM, target=s.target)
    if s.column is not None and lo <= s.column < hi:
        return Out(axes=s.axes, role=COORDS, target=s.target, column=s.column - lo)
    return Out(axes=s.axes)


@rule(aten.slice.Tensor)
def slice_(call: Call) -> Flow:
    s, r = call.state("self"), call.rank("self")
    d = call.dim("dim", r, 0)
    start, end, step = call.arg("start"), call.arg("end"), call.arg("step", 1)
    b = s.axis(d)
    if b is not None and not _full(start, end, step, call.dims("self")[d]):
        if b.moved:
            why = ("keeps only part of the rows of a batch-wide order (a capacity limit): whether a sample's row is "
                   "kept depends on the rows of the other samples before it")
        else:
            why = (f"keeps positions {start}:{end}:{step} of the batch axis: the output's positions then hold other "
                   "samples than the input's at the same place")
        if b.moved:  # still positions and rows of that order; the selection itself is the mixing
            return Flow((replace(relayout(call, "self", list(range(r))), mixes=why),), frozenset({"self"}))
        return Flow((Out(axes=tuple(a for a in s.axes if a.axis != d), mixes=why),))
    if s.role == COORDS and r == 2 and d == 1 and isinstance(start, int) and isinstance(end, int):
        return Flow((_column(call, s, start, min(end, int(call.dims("self")[1]))),), frozenset({"self"}))
    return moved(call, "self", list(range(r)))


@rule(aten.select.int)
def select(call: Call) -> Flow:
    s, r = call.state("self"), call.rank("self")
    d, index = call.dim("dim", r), call.arg("index")
    if s.role == COORDS and r == 2 and d == 1 and isinstance(index, int):
        return Flow((_column(call, s, index, index + 1),), frozenset({"self"}))
    amap = [None if a == d else a - (a > d) for a in range(r)]
    return moved(call, "self", amap, why="picks one position of the batch axis: the result is that sample's alone")


@rule(aten.split_with_sizes.default, aten.split.Tensor)
def split(call: Call) -> Flow:
    r = call.rank("self")
    d = call.dim("dim", r, 0)
    why = "splits the batch axis into pieces: each piece holds some samples at other samples' positions"
    out = relayout(call, "self", [None if a == d else a for a in range(r)], why=why) \
        if call.state("self").axis(d) else relayout(call, "self", list(range(r)))
    return Flow(tuple(out for _ in call.outs), frozenset({"self"}))


@rule(aten.unfold.default)
def unfold(call: Call) -> Flow:
    """Windows of `size` along `dimension` become a new last axis."""
    r = call.rank("self")
    d = call.dim("dimension", r)
    why = "takes windows along the batch axis: a window holds positions of several samples"
    return moved(call, "self", [None if a == d else a for a in range(r)], why=why)


@rule(aten.cat.default)
def cat(call: Call) -> Flow:
    parts = [s for s in call.states("tensors") if s is not None]
    r = call.out_rank()
    d = call.dim("dim", r, 0)
    if any(s.axis(d) for s in parts):
        return Flow((Out(unknown="concatenates along the batch axis: the output holds more positions than samples"),))
    out = label_kept(combine(parts, [list(range(r))] * len(parts)), *parts)
    return Flow((out,))


@rule(aten.constant_pad_nd.default)
def pad(call: Call) -> Flow:
    s, r, widths = call.state("self"), call.rank("self"), list(call.arg("pad"))
    padded = {r - 1 - i // 2 for i, w in enumerate(widths) if w != 0}
    if any(b.axis in padded for b in s.axes):
        return Flow((Out(unknown="pads the batch axis: positions that belong to no sample appear along it"),))
    return Flow((relayout(call, "self", list(range(r))),))


@rule(aten.flip.default)
def flip(call: Call) -> Flow:
    r = call.rank("self")
    dims = call.dim_list("dims", r)
    why = "reverses the batch axis: each position then holds the values of another sample"
    return Flow((relayout(call, "self", [None if a in dims else a for a in range(r)], why=why),))


@rule(aten.repeat.default)
def repeat(call: Call) -> Flow:
    s, r, reps = call.state("self"), call.rank("self"), list(call.arg("repeats"))
    shift = len(reps) - r
    if any(reps[b.axis + shift] != 1 for b in s.axes):
        return Flow((Out(unknown="tiles the batch axis: the output holds the batch several times over"),))
    return Flow((relayout(call, "self", [a + shift for a in range(r)]),))


@rule(aten.diagonal.default)
def diagonal(call: Call) -> Flow:
    s, r = call.state("self"), call.rank("self")
    d1, d2 = call.dim("dim1", r, 0), call.dim("dim2", r, 1)
    if any(b.axis in (d1, d2) for b in s.axes):
        return Flow((Out(unknown="takes a diagonal across the batch axis"),))
    rest = [a for a in range(r) if a not in (d1, d2)]
    return Flow((relayout(call, "self", [rest.index(a) if a in rest else None for a in range(r)]),))


@rule(aten.as_strided.default)
def as_strided(call: Call) -> Flow:
    """Followed only when it is a plain view of a contiguous input whose batch axis is its
    outermost: an output axis that steps through whole samples, the rest within one."""
    s, x, y = call.state("self"), _value(call.arg("self")), call.outs[0]
    if not s.axes:
        return Flow((Out(),), frozenset({"self"}))
    b = s.axes[0]
    try:
        sizes, strides = [int(v) for v in x.shape[b.axis + 1:]], [int(v) for v in x.stride()[b.axis + 1:]]
        out_sizes, out_strides = list(y.shape), [int(v) for v in y.stride()]
        offset = int(call.arg("storage_offset") or 0)
    except (TypeError, ValueError):
        return Flow((Out(unknown="as_strided with symbolic strides"),))
    contiguous = all(st == _prod(sizes[i + 1:]) for i, st in enumerate(strides))
    if len(s.axes) != 1 or b.moved or b.outer != 1 or offset or not contiguous or any(
            int(v) != 1 for v in x.shape[:b.axis]):
        return Flow((Out(unknown="as_strided over the batch axis of a non-contiguous or offset input"),))
    block = _prod(sizes) * b.rows  # elements of one sample
    for c, size in enumerate(out_sizes):
        rows = call.batch.layout(dim_of(size))
        if rows is None or out_strides[c] * rows[0] != block:
            continue
        span = (rows[0] - 1) * out_strides[c] + sum((int(n) - 1) * st for i, (n, st) in
                                                   enumerate(zip(out_sizes, out_strides)) if i != c)
        if span < block and min(out_strides) >= 0:
            return Flow((Out(axes=(Axis(c, rows[0]),)),), frozenset({"self"}))
    return Flow((Out(unknown="as_strided lays positions of several samples along one output axis"),))


def _prod(xs: list[int]) -> int:
    out = 1
    for v in xs:
        out *= v
    return out


@rule(aten.resize_.default)
def resize(call: Call) -> Flow:
    """In-place resize: a no-op when the shape stays, else storage the analysis cannot follow."""
    if call.dims("self") == call.out_dims():
        return moved(call, "self", list(range(call.rank("self"))))
    return Flow((Out(unknown="resize_ to another shape: which sample's storage ends up where is not followed"),))


@rule(aten.select_scatter.default, aten.slice_scatter.default)
def write_into(call: Call) -> Flow:
    """self with src written at one position (select_scatter) or a slice (slice_scatter) of
    axis `dim`: within a non-batch axis each sample writes its own rows."""
    base, src, r = call.state("self"), call.state("src"), call.rank("self")
    d = call.dim("dim", r, 0)
    whole = call.node.target is aten.slice_scatter.default and _full(
        call.arg("start"), call.arg("end"), call.arg("step", 1), call.dims("self")[d])
    if (base.axis(d) or (src.axis(d) and call.node.target is aten.slice_scatter.default)) and not whole:
        return Flow((Out(mixes="writes into part of the batch axis: the written positions then hold other "
                               "samples' values"),))
    src_map = list(range(r)) if call.node.target is aten.slice_scatter.default else \
        [a if a < d else a + 1 for a in range(call.rank("src"))]
    return Flow((combine([base, src], [list(range(r)), src_map]),))
