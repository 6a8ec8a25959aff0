"""Reductions and ops along one axis (softmax, cumsum, sort, topk), and nonzero.

Over a non-batch axis they are per sample; over the batch axis every result depends on the
whole batch (batch statistics, per-tensor quantisation scales, expert choice's top-k over
tokens). Two exceptions are exact:

- a pair's axis whose off-block is the reduction's identity (a sum over a row of masked
  probabilities whose other-sample entries are 0, a max over -inf): the other samples add
  nothing; softmax over -inf off-block gives 0 there, log_softmax -inf;
- sorting a 1-D batch axis (the token copies of a MoE, by expert) moves its rows into a
  batch-wide order without mixing their values: the values come out "moved" (tagged with
  the sort), the indices are positions along the sorted axis, which a later gather or scatter
  by them (or their inverse: the argsort of a permutation) puts back. nonzero selects the
  positions of true elements, in a batch-wide order, the same way.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from mocompile.aten.call import Call
from mocompile.aten.registry import rule
from mocompile.aten.state import COORDS, IOTA, OFFBLOCK_DATA, PERM, Axis, Flow, Out, State, combine, drop_axis
from mocompile.ir.batch_flow import identity_map, inverse

aten = torch.ops.aten
INF = float("inf")

# kind -> (identity: the off-block a reduction over a pair axis may ignore, idempotent: c op c == c)
KINDS: dict[str, tuple[Any, bool]] = {"sum": (0, False), "mean": (None, True), "amax": (-INF, True),
                                      "amin": (INF, True), "any": (False, True), "prod": (1, False),
                                      "var": (None, False), "argmax": (None, False), "item": (None, False),
                                      "norm": (0, False), "median": (None, True)}
# op -> (kind, the dims argument or None for all axes)
REDUCTIONS = {
    aten.sum.dim_IntList: ("sum", "dim"), aten.sum.default: ("sum", None), aten.mean.dim: ("mean", "dim"),
    aten.mean.default: ("mean", None), aten.amax.default: ("amax", "dim"), aten.amin.default: ("amin", "dim"),
    aten.any.default: ("any", None), aten.any.dim: ("any", "dim"), aten.any.dims: ("any", "dim"),
    aten.argmax.default: ("argmax", "dim"), aten.argmin.default: ("argmax", "dim"),
    aten.prod.default: ("prod", None), aten.prod.dim_int: ("prod", "dim"), aten.var.dim: ("var", "dim"),
    aten.var.correction: ("var", "dim"), aten.max.dim: ("amax", "dim"), aten.min.dim: ("amin", "dim"),
    aten._local_scalar_dense.default: ("item", None), aten.item.default: ("item", None),
    # not core, but left in exported graphs by the decompositions
    aten.linalg_vector_norm.default: ("norm", "dim"), aten.var_mean.correction: ("var", "dim"),
    aten.median.dim: ("median", "dim"), aten.median.default: ("median", None),
}


def _pair_reduced(s: State, dims: list[int], kind: str) -> tuple[State, Any] | None:
    """A pair reduced over one of its axes whose off-block the reduction ignores: the state
    left over; or over neither axis: the pair with its new off-block. None: it mixes."""
    identity, idempotent = KINDS[kind]
    inside = [b for b in s.axes if b.axis in dims]
    if len(inside) == 1 and identity is not None and s.offblock == identity:
        return drop_axis(s, inside[0].axis), None
    if not inside:
        same = s.offblock != OFFBLOCK_DATA and (idempotent or s.offblock == identity)
        return s, s.offblock if same else OFFBLOCK_DATA
    return None


def reduction(call: Call) -> Flow:
    kind, dims_arg = REDUCTIONS[call.node.target]
    s, r = call.state("self"), call.rank("self")
    dims = call.dim_list(dims_arg, r) if dims_arg and call.arg(dims_arg) is not None else list(range(r))
    keep = bool(call.arg("keepdim", False))
    amap = [None if a in dims else (a if keep else a - sum(d < a for d in dims)) for a in range(r)]
    off: Any = OFFBLOCK_DATA
    pair = s.is_pair
    if pair:
        got = _pair_reduced(s, dims, kind)
        if got is not None:
            s, off = got
    what = {"item": "reads a tensor holding the batch as one number (.item())"}.get(
        kind, f"takes the {kind} over the batch axis")
    out = combine([s], [amap], why=f"{what}: each sample's result depends on every sample", pair_offblock=off)
    if pair and not s.is_pair:  # max.dim / min.dim over a masked pair axis: the values are the sample's own
        positions = replace(out, mixes=out.mixes or "the position of the extreme along a packed axis counts the "
                                                    "other samples' positions before it")
        return Flow((out, positions)[:len(call.outs)])
    return Flow(tuple(out for _ in call.outs) or (out,))


# op -> (what it does along the axis, the pair off-block it ignores, the off-block it gives then)
SOFTMAX, LOG_SOFTMAX = ("softmax normalises", -INF, 0.0), ("log_softmax normalises", -INF, -INF)
ALONG = {aten._softmax.default: SOFTMAX, aten.softmax.int: SOFTMAX, aten._log_softmax.default: LOG_SOFTMAX,
         aten.log_softmax.int: LOG_SOFTMAX, aten.cumsum.default: ("the cumulative sum runs", None, None),
         aten.cumprod.default: ("the cumulative product runs", None, None),
         aten.logcumsumexp.default: ("the cumulative sum runs", None, None),
         aten.cummax.default: ("the running maximum runs", None, None),
         aten.cummin.default: ("the running minimum runs", None, None)}


def along_axis(call: Call) -> Flow:
    """softmax, log_softmax, cumsum, cummax: same shape, each element reads its axis `dim`."""
    what, ignored, result = ALONG[call.node.target]
    s, r = call.state("self"), call.rank("self")
    d = call.dim("dim", r)
    b = s.axis(d)
    if s.is_pair and b is not None and ignored is not None and s.offblock == ignored:
        return Flow((Out(axes=s.axes, offblock=result),))
    out = combine([s], [identity_map(r)], reduce=[d], pair_offblock=s.offblock,
                  why=f"{what} along the batch axis (axis {d}): each sample's result depends on the others")
    return Flow(tuple(out for _ in call.outs))


@rule(aten.sort.default, aten.sort.stable)
def sort(call: Call) -> Flow:
    s, r = call.state("self"), call.rank("self")
    d = call.dim("dim", r, -1)
    b = s.axis(d)
    if b is None:  # per sample: the indices are positions along a non-batch axis
        out = combine([s], [identity_map(r)])
        return Flow((out, out))
    if s.role == PERM and s.perm and r == 1 and s.target is not None:
        # sorting a permutation: the sorted values are 0..n-1 along the target axis, the indices its inverse
        rows, outer, order = s.target
        back = Axis(0, rows, order, outer)
        return Flow((Out(axes=(back,), role=IOTA, target=back.layout),
                     Out(axes=(back,), role=PERM, perm=inverse(s.perm), target=b.layout)), frozenset({"self"}))
    if r == 1 and not b.moved and not s.is_pair:
        rows_moved = replace(b, moved=call.tag)
        return Flow((Out(axes=(rows_moved,)), Out(axes=(rows_moved,), role=PERM, perm=call.tag, target=b.layout)))
    out = Out(mixes=f"sorts along the batch axis (axis {d}): each position then holds a value of some other sample")
    return Flow((out, out))


@rule(aten.topk.default)
def topk(call: Call) -> Flow:
    s, r = call.state("self"), call.rank("self")
    d = call.dim("dim", r, -1)
    out = combine([s], [identity_map(r)], reduce=[d],
                  why=f"picks the top {call.arg('k')} along the batch axis: which positions are picked, and so each "
                      "sample's result, depends on the other samples")
    if out.mixes:
        out = Out(mixes=out.mixes)
    return Flow((out, out))


@rule(aten.nonzero.default)
def nonzero(call: Call) -> Flow:
    """The coordinates of the true elements, row by row in a batch-wide order; the column of
    the batch axis holds positions along it."""
    s = call.state("self")
    if not s.axes:
        return Flow((Out(),))
    if len(s.axes) != 1 or s.axes[0].moved:
        return Flow((Out(unknown="nonzero of a tensor with rows in a batch-wide order or two batch axes"),))
    b = s.axes[0]
    return Flow((Out(axes=(Axis(0, 1, call.tag),), role=COORDS, column=b.axis, target=b.layout),))


@rule(aten.masked_select.default)
def masked_select(call: Call) -> Flow:
    """The true elements, flattened in a batch-wide order (a selection, like nonzero's rows)."""
    s = call.state("self")
    mask = call.state("mask")
    if not (s.axes or mask.axes):
        return Flow((Out(),))
    return Flow((Out(axes=(Axis(0, 1, call.tag),)),))


for _op in REDUCTIONS:
    rule(_op)(reduction)
for _op in ALONG:
    rule(_op)(along_axis)
