"""Elementwise ATen ops: each output element reads the broadcast-aligned element of every
input, so the batch axis stays where it is.

Two things need values, not only axes. A pair (two batch axes, see `mocompile.aten.state`)
stays harmless while its off-block holds a constant, so when an elementwise op makes or
transforms a pair, the op itself is evaluated on scalars: the off-block constants of pair
inputs, the fills of constant inputs, a few probe values for everything else (and distinct
sample ids for labels on the two axes: off-block means "different samples"). If every probe
gives the same number, that is the new off-block (`where(same_sample, scores, -inf)` gives
-inf, `scores + mask` too, `mask == 0` on a 0 off-block True); otherwise the off-block is
data. This takes finite values for the probed inputs: -inf + x is -inf only for finite x.

Positions along a batch axis divided by k (`order // top_k`: a sorted copy's token) stay
positions, of an axis with k times fewer rows per sample.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import torch
import torch.fx

from mocompile.aten.call import Call
from mocompile.aten.registry import rule
from mocompile.aten.rules.common import values_of
from mocompile.aten.state import INDEX_ROLES, LABEL, OFFBLOCK_DATA, PERM, Flow, Out, combine

aten = torch.ops.aten

POINTWISE = [
    aten.abs.default, aten.acos.default, aten.acosh.default, aten.add.Tensor, aten.add.Scalar, aten.asin.default,
    aten.asinh.default, aten.atan.default, aten.atan2.default, aten.atan2.out, aten.atanh.default,
    aten.bitwise_and.Tensor, aten.bitwise_and.Scalar, aten.bitwise_not.default, aten.bitwise_or.Tensor,
    aten.bitwise_or.Scalar, aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar, aten.ceil.default, aten.clamp.default,
    aten.clamp.Tensor, aten.copy.default, aten.cos.default, aten.cosh.default, aten.div.Tensor, aten.div.Scalar,
    aten.div.Tensor_mode, aten.div.Scalar_mode, aten.elu.default, aten.eq.Tensor, aten.eq.Scalar, aten.erf.default,
    aten.exp.default, aten.expm1.default, aten.floor.default, aten.fmod.Tensor, aten.fmod.Scalar, aten.ge.Tensor,
    aten.ge.Scalar, aten.gelu.default, aten.gt.Tensor, aten.gt.Scalar, aten.hardtanh.default, aten.isinf.default,
    aten.isnan.default, aten.le.Tensor, aten.le.Scalar, aten.leaky_relu.default, aten.log.default, aten.log10.default,
    aten.log1p.default, aten.log2.default, aten.logical_and.default, aten.logical_not.default,
    aten.logical_or.default, aten.logical_xor.default, aten.lt.Tensor, aten.lt.Scalar, aten.maximum.default,
    aten.minimum.default, aten.mul.Tensor, aten.mul.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.neg.default,
    aten.pow.Tensor_Tensor, aten.pow.Tensor_Scalar, aten.pow.Scalar, aten.reciprocal.default, aten.relu.default,
    aten.remainder.Tensor, aten.remainder.Scalar, aten.round.default, aten.rsqrt.default, aten.sigmoid.default,
    aten.sign.default, aten.sin.default, aten.sinh.default, aten.sqrt.default, aten.sub.Tensor, aten.sub.Scalar,
    aten.tan.default, aten.tanh.default, aten.trunc.default, aten.where.self,
    # not core, but left in exported graphs by some decompositions
    aten.silu.default, aten.where.ScalarOther, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.erfinv.default,
]
# Ops that copy values unchanged (or only change their dtype): an index stays an index, a label a label.
VALUE_PRESERVING = [aten.clone.default, aten._to_copy.default, aten.alias.default, aten.lift_fresh_copy.default,
                    aten.detach.default]

PROBES: dict[str, tuple[Any, ...]] = {"f": (-1.5, 0.0, 2.0, 1000.0), "i": (-2, 0, 3, 7), "b": (False, True)}
LABEL_SIDES = ((0, 1), (1, 0), (3, 7))  # sample ids of the two axes of a pair: always different
MAX_PROBES = 512


def _kind(value: Any) -> str:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return "b" if isinstance(value, bool) else "i" if isinstance(value, int) else "f"
    return "b" if dtype == torch.bool else "f" if dtype.is_floating_point or dtype.is_complex else "i"


def _evaluate(node: torch.fx.Node, values: dict[torch.fx.Node, Any]) -> Any:
    """The op at one point: each input node replaced by a 0-d tensor (or a number) of its value."""

    def sub(a: Any) -> Any:
        if not isinstance(a, torch.fx.Node):
            return a
        v, meta = values[a], a.meta.get("val")
        return torch.tensor(v, dtype=meta.dtype) if isinstance(meta, torch.Tensor) else v

    args = torch.fx.node.map_aggregate(node.args, sub)
    kwargs = torch.fx.node.map_aggregate(dict(node.kwargs), sub)
    out = node.target(*args, **kwargs)
    return out.item() if isinstance(out, torch.Tensor) else out


def constant_result(call: Call, names: list[str], pair_axes: tuple[int, int] | None) -> Any:
    """The op's value when it is the same at every probe point (the off-block of a pair when
    `pair_axes` are its two output axes, else the fill of an all-constant op), or OFFBLOCK_DATA."""
    r = call.out_rank()
    choices: list[tuple[torch.fx.Node, tuple[Any, ...] | str]] = []
    for n in names:
        a = call.arg(n)
        if not isinstance(a, torch.fx.Node):
            continue
        s, meta = call.state(n), a.meta.get("val")
        side = None
        if pair_axes and s.role == LABEL and len(s.axes) == 1:
            landed = s.axes[0].axis + r - call.rank(n)
            side = pair_axes.index(landed) if landed in pair_axes else None
        if s.is_pair and s.offblock != OFFBLOCK_DATA:
            choices.append((a, (s.offblock,)))
        elif s.fill is not None:
            choices.append((a, (s.fill,)))
        elif side is not None:
            choices.append((a, "ab"[side]))
        else:
            choices.append((a, PROBES[_kind(meta)]))
    free = [c for _, c in choices if not isinstance(c, str)]
    grid = list(itertools.product(*free, LABEL_SIDES))
    if len(grid) > MAX_PROBES:
        return OFFBLOCK_DATA
    results = set()
    for point in grid:
        it, (u, v) = iter(point[:-1]), point[-1]
        values = {a: (u if c == "a" else v) if isinstance(c, str) else next(it) for a, c in choices}
        try:
            results.add(_evaluate(call.node, values))
        except Exception:  # an op that cannot run on scalars: nothing is known of its value
            return OFFBLOCK_DATA
        if len(results) > 1:
            return OFFBLOCK_DATA
    value = results.pop() if results else OFFBLOCK_DATA
    return value if isinstance(value, (bool, int, float)) and value == value else OFFBLOCK_DATA


def _floor_positions(call: Call, names: list[str]) -> Out | None:
    """positions // k: positions along an axis of rows r become positions along the axis of
    rows r / k (a copy's token), for k dividing r."""
    if call.node.target not in (aten.div.Tensor_mode, aten.div.Scalar_mode) or call.arg("rounding_mode") != "floor":
        return None
    s, k = call.state("self"), call.state("other").fill
    if s.role not in INDEX_ROLES or s.target is None or not isinstance(k, int) or k <= 0:
        return None
    rows, outer, order = s.target
    if rows % k:
        return None
    return Out(axes=s.axes, role=PERM, target=(rows // k, outer, order))


def pointwise(call: Call) -> Flow:
    """Broadcast elementwise: see the module docstring for pairs, fills and positions."""
    names = call.value_args()
    positions = _floor_positions(call, names)
    if positions is not None:
        return Flow((positions,), frozenset(names))
    states, maps = values_of(call, names)
    out = combine(states, maps)
    if len(out.axes) == 2:
        off = constant_result(call, names, (out.axes[0].axis, out.axes[1].axis))
        out = combine(states, maps, pair_offblock=off)
    elif not any(s.axes for s in states) and all(s.fill is not None for s in states):
        fill = constant_result(call, names, None)
        out = replace(out, fill=None if fill == OFFBLOCK_DATA else fill)
    return Flow(tuple(out for _ in call.outs) or (out,))


def value_preserving(call: Call) -> Flow:
    """A copy (or dtype cast) of `self`: its role, positions and fill come along."""
    s = call.state("self")
    out = combine([s], [list(range(call.rank("self")))], pair_offblock=s.offblock)
    return Flow((replace(out, role=s.role, perm=s.perm, target=s.target, column=s.column, fill=s.fill),),
                frozenset({"self"}))


def dropout(call: Call) -> Flow:
    """Dropout in training mode: the input times a random mask drawn from the shapes alone
    (the same draws whatever the samples hold); the mask depends on no sample."""
    out = combine([call.state("input")], [list(range(call.rank("input")))])
    return Flow((out, Out()))


for _op in POINTWISE:
    rule(_op)(pointwise)
for _op in VALUE_PRESERVING:
    rule(_op)(value_preserving)
rule(aten.native_dropout.default)(dropout)


@rule(aten.dropout.default)
def dropout_composite(call: Call) -> Flow:
    """aten.dropout, kept whole where the graph is not decomposed: native_dropout's output."""
    return Flow(dropout(call).outs[:1])


@rule(aten.bucketize.Tensor, aten.searchsorted.Tensor)
def lookup_in_boundaries(call: Call) -> Flow:
    """Each element's place among boundaries read whole (per row of a batched sorted_sequence)."""
    table = "boundaries" if call.node.target is aten.bucketize.Tensor else "sorted_sequence"
    r, tr = call.out_rank(), call.rank(table)
    table_map = None if tr == 1 else list(range(tr - 1)) + [None]
    return Flow((combine([call.state("self"), call.state(table)], [list(range(r)), table_map],
                         why="looks values up in boundaries that carry the batch axis"),))
