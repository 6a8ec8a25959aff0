"""Ops whose outputs depend on shapes and constants only (full, empty, arange, random draws)
and the size queries (sym_size and friends).

None of them reads a sample's values, so none mixes; what matters is what they are: a fill
constant (masks built with `full(..., -inf)`), an arange over a batch axis (its values are
their own positions, so indexing the batch axis by it is the identity, "iota"), and the size
of a selection decided by the whole batch (nonzero's row count: a "count", harmless as a shape,
a leak once used as a number).
"""

from __future__ import annotations

import torch

from mocompile.aten.call import Call
from mocompile.aten.registry import rule
from mocompile.aten.shapes import dims_of
from mocompile.aten.state import COUNT, IOTA, Axis, Flow, Out

aten = torch.ops.aten

SELECTION_COUNT = ("the number of positions selected counts positions of every sample, so a sample's result "
                   "depends on what the others select")


@rule(aten.empty.memory_format, aten.empty_strided.default, aten.rand.default, aten.randn.default,
      aten.randperm.default, aten.zeros.default, aten.ones.default, aten.empty_like.default, aten.rand_like.default,
      aten.randn_like.default, aten.zeros_like.default, aten.ones_like.default)
def shapes_only(call: Call) -> Flow:
    """Values drawn or allocated from the shape alone: constant for the analysis (a random
    permutation of the batch is no identity, so indexing by it still mixes)."""
    fill = {aten.zeros.default: 0, aten.ones.default: 1, aten.zeros_like.default: 0,
            aten.ones_like.default: 1}.get(call.node.target)
    return Flow((Out(fill=fill),), frozenset(call.args))


@rule(aten.full.default, aten.full_like.default, aten.scalar_tensor.default, aten.fill.Scalar)
def filled(call: Call) -> Flow:
    """Every element is one constant (a Python number here; a size node is a number too)."""
    value = next(call.arg(n) for n in ("fill_value", "s", "value") if n in call.args)
    fill = value if isinstance(value, (bool, int, float)) else None
    keep = {n for n in call.args if n not in ("fill_value", "s", "value")}
    return Flow((Out(fill=fill),), frozenset(keep))


@rule(aten.arange.start_step, aten.arange.default, aten.arange.start)
def arange(call: Call) -> Flow:
    """0, 1, ..., n-1 with n a multiple of the batch: the positions along such an axis."""
    start, step = call.arg("start", 0), call.arg("step", 1)
    size = dims_of(call.outs[0])
    layout = call.batch.layout(size[0]) if len(size) == 1 and start == 0 and step == 1 else None
    if layout is None:
        return Flow((Out(),), frozenset(call.args))
    rows, outer = layout
    return Flow((Out(axes=(Axis(0, rows, None, outer),), role=IOTA, target=(rows, outer, None)),), frozenset(call.args))


@rule(aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default,
      aten.sym_is_contiguous.default)
def size_query(call: Call) -> Flow:
    """A size is no sample's data, except the length of a batch-wide selection."""
    s = call.state("self")
    d = call.arg("dim")
    axes = s.axes if d is None or call.node.target is not aten.sym_size.int else \
        [b for b in s.axes if b.axis == int(d) % max(call.rank("self"), 1)]
    if any(b.moved for b in axes):
        return Flow((Out(role=COUNT, latent=SELECTION_COUNT),), frozenset({"self"}))
    return Flow((Out(),), frozenset({"self"}))
