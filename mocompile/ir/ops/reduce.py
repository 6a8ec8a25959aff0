"""Reductions, scans and sorts for plain torch code: sum/mean/amax, softmax, cumsum, topk, argsort.

Their batch-flow rules are where most accidental leaks show: a reduction, softmax, scan or
top-k that runs along the batch axis makes every sample's result depend on the others
(per-tensor dynamic quantization is an amax over all axes). argsort along a batch axis is
the exception the MoE dispatch relies on: its result is a batch-wide permutation, harmless
as long as it only moves rows and is undone (see `mocompile.ir.ops.layout`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mocompile.ir.batch_flow import PERM, BatchAxis, Flow, FlowArgs, Out, combine, identity_map, inverse, one
from mocompile.ir.registry import REQUIRED, Cost, OpDef, register_op
from mocompile.ir.types import TensorType


def _axes(attrs: Mapping[str, Any], rank: int) -> list[int]:
    return list(range(rank)) if attrs["axes"] is None else sorted({a % rank for a in attrs["axes"]})


def _read_cost(ins, outs, attrs, env) -> Cost:
    n = ins[0].numel(env)
    return Cost(flops=n, bytes=4 * (n + sum(t.numel(env) for t in outs)))


# ---- sum / mean / amax --------------------------------------------------------------------
def _infer_reduce(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    (x,) = ts
    axes = _axes(attrs, x.rank)
    shape = [1 if a in axes else d for a, d in enumerate(x.shape)] if attrs["keepdim"] else [
        d for a, d in enumerate(x.shape) if a not in axes]
    return [TensorType(tuple(shape), x.dtype)]


def _reduce_flow(args: FlowArgs) -> Flow:
    r = args.in_types[0].rank
    axes = _axes(args.attrs, r)
    kept = [a for a in range(r) if a not in axes]
    m = [None if a in axes else (a if args.attrs["keepdim"] else kept.index(a)) for a in range(r)]
    return one(combine(args, [m], why=f"reduces over axes {tuple(axes)}, which include the batch axis"))


def _reducer(name: str, fn: Callable[..., np.ndarray], doc: str) -> None:
    def compute(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
        axes = None if attrs["axes"] is None else tuple(attrs["axes"])
        return [np.asarray(fn(xs[0], axis=axes, keepdims=attrs["keepdim"])).astype(xs[0].dtype)]

    register_op(OpDef(name, _infer_reduce, compute, {"axes": None, "keepdim": False}, batch_flow=_reduce_flow,
                      cost=_read_cost, doc=doc))


_reducer("sum", np.sum, "sum over `axes` (None: all)")
_reducer("mean", np.mean, "mean over `axes` (None: all)")
_reducer("amax", np.max, "maximum over `axes` (None: all)")


# ---- softmax / cumsum: every element reads its whole line along one axis -------------------------
def _along_axis_flow(what: str) -> Callable[[FlowArgs], Flow]:
    def rule(args: FlowArgs) -> Flow:
        r = args.in_types[0].rank
        axis = args.attrs["axis"] % r
        return one(combine(args, [identity_map(r)], reduce=[axis], why=f"{what} along the batch axis (axis {axis})"))

    return rule


def _softmax(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    x = xs[0]
    z = np.exp(x - x.max(attrs["axis"], keepdims=True))
    return [(z / z.sum(attrs["axis"], keepdims=True)).astype(np.float32)]


register_op(OpDef("softmax", lambda ts, a: [ts[0]], _softmax, {"axis": REQUIRED},
                  batch_flow=_along_axis_flow("softmax normalises"), cost=_read_cost, doc="softmax along `axis`"))
register_op(OpDef("cumsum", lambda ts, a: [ts[0]], lambda xs, a: [np.cumsum(xs[0], axis=a["axis"]).astype(xs[0].dtype)],
                  {"axis": REQUIRED}, batch_flow=_along_axis_flow("cumulative sum runs"), cost=_read_cost,
                  doc="running sum along `axis`"))


# ---- topk ---------------------------------------------------------------------------------------
def _infer_topk(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    (x,) = ts
    shape = list(x.shape)
    shape[attrs["axis"] % x.rank] = attrs["k"]
    return [TensorType(tuple(shape), x.dtype), TensorType(tuple(shape), "int64")]


def _topk(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    x, axis, k = xs[0], attrs["axis"], attrs["k"]
    idx = np.take(np.argsort(-x, axis=axis, kind="stable"), np.arange(k), axis=axis)
    return [np.take_along_axis(x, idx, axis=axis), idx.astype(np.int64)]


def _topk_flow(args: FlowArgs) -> Flow:
    r = args.in_types[0].rank
    axis = args.attrs["axis"] % r
    out = combine(args, [identity_map(r, drop=[axis])], why=f"picks the top {args.attrs['k']} along the batch axis")
    if out.mixes:  # the picked positions keep the axis but no longer one sample each
        out = Out(tuple(b for b in args.ins[0].axes if b.axis != axis), out.mixes)
    return Flow((out, out))


register_op(OpDef("topk", _infer_topk, _topk, {"k": REQUIRED, "axis": -1}, batch_flow=_topk_flow, cost=_read_cost,
                  doc="(values, int64 indices) of the k largest along `axis`, largest first (stable)"))


# ---- argsort ------------------------------------------------------------------------------------
def _argsort_flow(args: FlowArgs) -> Flow:
    """Sorting along a non-batch axis is per sample. Sorting a 1-D batch axis gives a
    batch-wide permutation (tagged, so the rows it moves can be followed); sorting a
    permutation gives its inverse."""
    x, t = args.ins[0], args.in_types[0]
    axis = args.attrs["axis"] % t.rank
    b = x.axis(axis)
    if x.role == PERM and t.rank == 1:
        if b is None or b.moved not in (x.perm, None):
            return one(Out(unknown="sorts a permutation whose positions are in another batch-wide order"))
        moved = None if b.moved == x.perm else inverse(x.perm)  # P (sorted positions) <-> P^-1 (sample order)
        return Flow((Out((BatchAxis(0, b.rows, moved),), role=PERM, perm=inverse(x.perm)),), frozenset({0}))
    if b is not None and t.rank == 1 and b.moved is None:
        why = "its numbers (which row goes where) are computed by sorting across the whole batch"
        return one(Out((BatchAxis(0, b.rows, args.tag),), role=PERM, perm=args.tag, latent=why))
    return one(combine(args, [identity_map(t.rank)], reduce=[axis], why=f"sorts along the batch axis (axis {axis})"))


register_op(OpDef("argsort", lambda ts, a: [TensorType(ts[0].shape, "int64")],
                  lambda xs, a: [np.argsort(xs[0], axis=a["axis"], kind="stable").astype(np.int64)],
                  {"axis": -1}, batch_flow=_argsort_flow, cost=_read_cost,
                  doc="int64 positions that sort x ascending along `axis` (stable)"))
