"""Data movement for plain torch code: reshape, permute, repeat, gather and scatter of rows.

These are the ops explicit MoE dispatch is written with (sort the token copies by expert,
gather them into per-expert buffers, scatter the results back), so their batch-flow rules
carry the most weight: a reshape keeps track of how many positions one sample occupies,
and a gather/scatter by a batch-wide permutation is followed until the inverse puts the
rows back in sample order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np

from mocompile.ir.batch_flow import (
    DATA,
    LABEL,
    PERM,
    BatchAxis,
    Flow,
    FlowArgs,
    Out,
    combine,
    compose,
    depends_on_shapes_only,
    identity_map,
    inverse,
    one,
)
from mocompile.ir.registry import REQUIRED, Cost, OpDef, register_op
from mocompile.ir.types import Dim, TensorType

# ---- symbolic products: a dim as coefficient x symbols --------------------------------------
Mono = tuple[int, tuple[str, ...]]


def mono(d: Dim) -> Mono:
    """4 -> (4, ()); "batch" -> (1, ("batch",)); "4*batch" -> (4, ("batch",)); a sum is one opaque symbol."""
    if isinstance(d, int):
        return d, ()
    if "+" in d:
        return 1, (d,)
    coef, syms = 1, []
    for f in d.split("*"):
        if f.lstrip("-").isdigit():
            coef *= int(f)
        else:
            syms.append(f)
    return coef, tuple(sorted(syms))


def mono_mul(a: Mono, b: Mono) -> Mono:
    return a[0] * b[0], tuple(sorted(a[1] + b[1]))


def mono_div(a: Mono, b: Mono) -> Mono | None:
    """a / b when it is a monomial, else None."""
    left = Counter(a[1])
    left.subtract(Counter(b[1]))
    if b[0] == 0 or a[0] % b[0] or any(n < 0 for n in left.values()):
        return None
    return a[0] // b[0], tuple(sorted(left.elements()))


def mono_prod(ds: Sequence[Dim]) -> Mono:
    out: Mono = (1, ())
    for d in ds:
        out = mono_mul(out, mono(d))
    return out


def to_dim(m: Mono) -> Dim:
    coef, syms = m
    if not syms:
        return coef
    if len(syms) == 1 and "+" in syms[0]:
        if coef != 1:
            raise ValueError(f"cannot multiply the symbolic sum {syms[0]} by {coef}")
        return syms[0]
    if any("+" in s for s in syms):
        raise ValueError(f"cannot multiply symbolic sums {' * '.join(syms)}")
    return "*".join(([str(coef)] if coef != 1 else []) + list(syms))


def _move_cost(ins, outs, attrs, env) -> Cost:
    """Data movement: no arithmetic, each output element read once and written once."""
    return Cost(flops=0, bytes=8 * outs[0].numel(env))


# ---- reshape --------------------------------------------------------------------------------
def _infer_reshape(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    (x,) = ts
    shape = list(attrs["shape"])
    if shape.count(-1) > 1:
        raise ValueError(f"reshape: more than one -1 in {tuple(shape)}")
    total = mono_prod(x.shape)
    if -1 in shape:
        rest = mono_div(total, mono_prod([d for d in shape if d != -1]))
        if rest is None:
            raise ValueError(f"reshape: {x} does not split into {tuple(shape)}")
        shape[shape.index(-1)] = to_dim(rest)
    if mono_prod(shape) != total:
        raise ValueError(f"reshape: {x} has a different size than {tuple(shape)}")
    return [TensorType(tuple(shape), x.dtype)]


def reshape_groups(src: Sequence[Dim], dst: Sequence[Dim]) -> list[tuple[list[int], list[int]]] | None:
    """Split a reshape into groups of consecutive axes with equal products; None if the
    symbolic dims do not say how (then nothing is known about which axes correspond)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) and j < len(dst):
        gi, gj = [i], [j]
        a, b = mono(src[i]), mono(dst[j])
        while a != b:
            if mono_div(b, a) is not None and i + 1 < len(src):
                i += 1
                gi.append(i)
                a = mono_mul(a, mono(src[i]))
            elif mono_div(a, b) is not None and j + 1 < len(dst):
                j += 1
                gj.append(j)
                b = mono_mul(b, mono(dst[j]))
            else:
                return None
        groups.append((gi, gj))
        i, j = i + 1, j + 1
    if not groups:
        return None
    groups[-1][0].extend(range(i, len(src)))  # trailing size-1 axes
    groups[-1][1].extend(range(j, len(dst)))
    return groups


def _reshape_flow(args: FlowArgs) -> Flow:
    """A batch axis survives when it is the outermost axis of its group (axes merged into it
    are inner ones) and the group's outermost output axis still holds whole samples."""
    src, dst = args.in_types[0].shape, args.out_types[0].shape
    if not args.ins[0].axes:
        return one(Out(role=_label_role(args)))
    groups = reshape_groups(src, dst)
    if groups is None:
        return one(Out(unknown=f"cannot tell how reshape {tuple(src)} -> {tuple(dst)} regroups the batch axis"))
    axes = []
    for b in args.ins[0].axes:
        gi, gj = next(g for g in groups if b.axis in g[0])
        if any(mono(src[a]) != (1, ()) for a in gi[: gi.index(b.axis)]):
            return one(Out(unknown="reshape merges the batch axis into an outer axis: samples are no longer "
                                   "contiguous along any axis"))
        c = next((a for a in gj if mono(dst[a]) != (1, ())), gj[0])
        inner_in = mono_prod([src[a] for a in gi[gi.index(b.axis) + 1:]])
        inner_out = mono_prod([dst[a] for a in gj[gj.index(c) + 1:]])
        if b.moved is not None and inner_in != inner_out:
            return one(Out(mixes=f"regroups rows that are in the batch-wide order of {b.moved}: one output row "
                                 "may hold positions of different samples"))
        if b.rows is None or b.moved is not None:
            if inner_in != inner_out:
                return one(Out(unknown="reshape regroups a batch axis whose samples are not evenly spaced"))
            axes.append(BatchAxis(c, b.rows, b.moved))
            continue
        rows = mono_div(mono_mul(mono(b.rows), inner_in), inner_out)
        if rows is None:
            return one(Out(unknown=f"reshape {tuple(src)} -> {tuple(dst)} splits samples across output positions"))
        axes.append(BatchAxis(c, to_dim(rows)))
    return one(Out(axes=tuple(axes), role=_label_role(args)))


def _label_role(args: FlowArgs) -> str:
    """Sample labels stay labels when only their layout changes (ids[:, None])."""
    return LABEL if args.ins[0].role == LABEL else DATA


register_op(OpDef("reshape", _infer_reshape, lambda xs, a: [xs[0].reshape(_concrete(a["shape"], xs[0]))],
                  {"shape": REQUIRED}, batch_flow=_reshape_flow, cost=_move_cost,
                  doc="the same elements in a new shape (row-major); one -1 is inferred"))


def _concrete(shape: Sequence[Dim], x: np.ndarray) -> tuple[int, ...]:
    """The attr shape with its symbolic dims left to numpy (at most one symbolic or -1 entry)."""
    dims = [d if isinstance(d, int) else -1 for d in shape]
    if dims.count(-1) > 1:
        raise ValueError(f"reshape of {x.shape} to {tuple(shape)}: more than one unknown dim")
    return tuple(dims)


# ---- permute --------------------------------------------------------------------------------
def _infer_permute(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    (x,) = ts
    perm = [p % x.rank for p in attrs["perm"]] if x.rank else []
    if sorted(perm) != list(range(x.rank)):
        raise ValueError(f"permute: {attrs['perm']} is not a permutation of the axes of {x}")
    return [TensorType(tuple(x.shape[p] for p in perm), x.dtype)]


def _permute_flow(args: FlowArgs) -> Flow:
    r = args.in_types[0].rank
    perm = [p % r for p in args.attrs["perm"]]
    return one(replace(combine(args, [[perm.index(a) for a in range(r)]]), role=_label_role(args)))


register_op(OpDef("permute", _infer_permute, lambda xs, a: [np.ascontiguousarray(np.transpose(xs[0], a["perm"]))],
                  {"perm": REQUIRED}, batch_flow=_permute_flow, cost=_move_cost,
                  doc="axes reordered: output axis i is input axis perm[i]"))


# ---- repeat_interleave ----------------------------------------------------------------------
def _infer_repeat(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    (x,) = ts
    axis, n = attrs["axis"] % x.rank, attrs["repeats"]
    shape = list(x.shape)
    shape[axis] = to_dim(mono_mul(mono(shape[axis]), (n, ())))
    return [TensorType(tuple(shape), x.dtype)]


def _repeat_flow(args: FlowArgs) -> Flow:
    """Each position repeated in place: a sample occupies `repeats` times as many positions."""
    axis, n = args.attrs["axis"] % args.in_types[0].rank, args.attrs["repeats"]
    axes = []
    for b in args.ins[0].axes:
        if b.axis == axis:
            if b.moved is not None:
                return one(Out(unknown="repeats positions of a batch axis in batch-wide sorted order"))
            b = BatchAxis(axis, None if b.rows is None else to_dim(mono_mul(mono(b.rows), (n, ()))))
        axes.append(b)
    return one(Out(axes=tuple(axes)))


register_op(OpDef("repeat_interleave", _infer_repeat, lambda xs, a: [np.repeat(xs[0], a["repeats"], axis=a["axis"])],
                  {"repeats": REQUIRED, "axis": REQUIRED}, batch_flow=_repeat_flow, cost=_move_cost,
                  doc="each position along `axis` repeated `repeats` times in place"))


# ---- index_select (gather rows) ---------------------------------------------------------------
def _infer_index_select(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    x, idx = ts
    if idx.rank != 1 or idx.dtype not in ("int64", "int32"):
        raise ValueError(f"index_select index must be a 1-D integer tensor, got {idx}")
    shape = list(x.shape)
    shape[attrs["axis"] % x.rank] = idx.shape[0]
    return [TensorType(tuple(shape), x.dtype)]


def _by_permutation(args: FlowArgs, data: int, index: int, index_tag: str, axis: int) -> Flow | None:
    """Rows of a batch axis moved by a batch-wide permutation: follow the order (see compose)."""
    x, perm = args.ins[data], args.ins[index]
    b = x.axis(axis)
    if b is None or perm.role != PERM or args.in_types[data].shape[axis] != args.in_types[index].shape[0]:
        return None
    ok, moved = compose(b.moved, index_tag)
    if not ok:
        return one(Out(x.axes, mixes="reorders rows that are in one batch-wide order by another permutation"))
    axes = tuple(BatchAxis(axis, b.rows, moved) if a.axis == axis else a for a in x.axes)
    return Flow((Out(axes=axes),), frozenset({index}))


def _index_select_flow(args: FlowArgs) -> Flow:
    """Gathering rows of a batch axis is a leak unless the index is a batch-wide permutation
    (rows only change places); gathering rows of a table by per-position indices is a lookup."""
    r = args.in_types[0].rank
    axis = args.attrs["axis"] % r
    moved = _by_permutation(args, 0, 1, args.ins[1].perm, axis)
    if moved is not None:
        return moved
    return one(combine(args, [identity_map(r, drop=[axis]), [axis]],
                       why="selects rows along the batch axis by index values: a row may come from another sample"))


register_op(OpDef("index_select", _infer_index_select, lambda xs, a: [np.take(xs[0], xs[1], axis=a["axis"])],
                  {"axis": REQUIRED}, batch_flow=_index_select_flow, cost=_move_cost,
                  doc="x gathered along `axis` at positions idx"))


# ---- index_copy (scatter rows) ----------------------------------------------------------------
def _infer_index_copy(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    base, idx, src = ts
    axis = attrs["axis"] % base.rank
    if idx.rank != 1 or src.shape[axis] != idx.shape[0] or src.dtype != base.dtype or any(
            a != b for i, (a, b) in enumerate(zip(base.shape, src.shape)) if i != axis):
        raise ValueError(f"index_copy: base {base}, index {idx}, source {src} do not match along axis {axis}")
    return [base]


def _index_copy(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    base, idx, src = xs
    out = np.moveaxis(base.copy(), attrs["axis"], 0)
    out[idx] = np.moveaxis(src, attrs["axis"], 0)
    return [np.ascontiguousarray(np.moveaxis(out, 0, attrs["axis"]))]


def _index_copy_flow(args: FlowArgs) -> Flow:
    """Scattering by a permutation of the whole axis overwrites every row of the base: it is
    gathering by the inverse permutation. Any other scatter along a batch axis may put one
    sample's row where another's was."""
    base, src = args.in_types[0], args.in_types[2]
    axis = args.attrs["axis"] % base.rank
    if args.ins[1].role == PERM and base.shape[axis] == src.shape[axis]:
        moved = _by_permutation(args, 2, 1, inverse(args.ins[1].perm), axis)
        if moved is not None:
            return Flow(moved.outs, frozenset({0, 1}))
    return one(combine(args, [identity_map(base.rank), [None], identity_map(base.rank, drop=[axis])],
                       why="scatters rows along the batch axis by index values: a row may land in another sample"))


register_op(OpDef("index_copy", _infer_index_copy, _index_copy, {"axis": REQUIRED}, batch_flow=_index_copy_flow,
                  cost=_move_cost,
                  doc="base with its rows idx[i] along `axis` replaced by src's row i; inputs base, idx, src"))


# ---- zeros_like -------------------------------------------------------------------------------
register_op(OpDef("zeros_like", lambda ts, a: [ts[0]], lambda xs, a: [np.zeros_like(xs[0])],
                  batch_flow=depends_on_shapes_only, doc="zeros of x's type (x's values are not read)"))
