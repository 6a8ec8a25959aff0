"""Symbolic sizes of an exported program, and where a sample's positions lie along an axis.

torch.export is run with the batch dimension as a symbol (`torch.export.Dim`), so every
fake tensor in the graph (`node.meta["val"]`) carries sizes such as `s0` or `5*s0`. They are
read here as the IR's monomials (`mocompile.ir.ops.layout.mono`: coefficient x symbols), which
is all the arithmetic a reshape needs, and the isolation rules reuse the IR's reshape
grouping. An axis carries the sample index in the layout `outer` x N x `rows` (N the batch
symbol): position p belongs to sample (p // rows) % N. A plain batch axis has rows = outer = 1;
[batch, seq] flattened has rows = seq; MultiheadAttention's [seq, batch] flattened has
outer = seq. With packed sequences N is the token count and a label input says which sample
each token belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from mocompile.ir.ops.layout import Mono, mono, mono_div, mono_mul, mono_prod, reshape_groups
from mocompile.ir.types import Dim

ONE: Mono = (1, ())


def dim_of(size: Any) -> Dim:
    """An int, or a SymInt's expression as the IR's dim text ("5*s0")."""
    if isinstance(size, int):
        return size
    expr = getattr(getattr(size, "node", None), "expr", size)
    if getattr(expr, "is_Integer", False):
        return int(expr)
    return str(expr).replace(" ", "")


def dims_of(value: Any) -> tuple[Dim, ...]:
    """The sizes of a fake tensor (a scalar has none)."""
    shape = getattr(value, "shape", None)
    return tuple(dim_of(s) for s in shape) if shape is not None else ()


def static_int(m: Mono) -> int | None:
    """The value of a monomial without symbols."""
    return m[0] if not m[1] and m[0] > 0 else None


@dataclass(frozen=True)
class Batch:
    """The symbol of the sample axis (N): the batch size, or the token count when samples
    are packed along one axis; `fixed` when torch.export had to specialise it to a number."""

    symbol: Dim
    packed: bool = False
    fixed: bool = False

    def extent(self, rows: int, outer: int) -> Mono:
        return mono_mul((rows * outer, ()), mono(self.symbol))

    def fits(self, size: Dim, rows: int, outer: int) -> bool:
        """Whether an axis of `size` holds outer x N x rows positions."""
        return mono(size) == self.extent(rows, outer)

    def layout(self, size: Dim) -> tuple[int, int] | None:
        """(rows, outer=1) of an axis whose size is a multiple of N (an arange over it)."""
        q = mono_div(mono(size), mono(self.symbol))
        rows = static_int(q) if q is not None else None
        return (rows, 1) if rows else None


def regroup(src: Sequence[Dim], dst: Sequence[Dim], axis: int, rows: int, outer: int,
            batch: Batch) -> tuple[int, int, int] | str:
    """Where a reshape src -> dst puts the sample axis `axis` (layout outer x N x rows):
    (output axis, rows, outer), or why it cannot say."""
    groups = reshape_groups(src, dst)
    if groups is None:
        return f"cannot tell how the reshape {tuple(src)} -> {tuple(dst)} regroups the batch axis"
    gi, gj = next(g for g in groups if axis in g[0])
    k = gi.index(axis)
    big_outer = mono_mul(mono_prod(src[a] for a in gi[:k]), (outer, ()))
    big_rows = mono_mul(mono_prod(src[a] for a in gi[k + 1:]), (rows, ()))
    for n, c in enumerate(gj):
        after, before = mono_prod(dst[a] for a in gj[n + 1:]), mono_prod(dst[a] for a in gj[:n])
        r, o = mono_div(big_rows, after), mono_div(big_outer, before)
        r_int, o_int = (static_int(r) if r else None), (static_int(o) if o else None)
        if r_int and o_int and batch.fits(dst[c], r_int, o_int):
            return c, r_int, o_int
    return f"the reshape {tuple(src)} -> {tuple(dst)} splits one sample's positions across several output positions"


def keeps_axis_whole(src: Sequence[Dim], dst: Sequence[Dim], axis: int) -> int | None:
    """The output axis a reshape maps input axis `axis` to unchanged (only size-1 axes merged
    into or split off it), or None: for rows in a batch-wide order, which must not be regrouped."""
    groups = reshape_groups(src, dst)
    if groups is None:
        return None
    gi, gj = next(g for g in groups if axis in g[0])
    if any(mono(src[a]) != ONE for a in gi if a != axis):
        return None
    same = [c for c in gj if mono(dst[c]) == mono(src[axis])]
    if len(same) != 1 or any(mono(dst[c]) != ONE for c in gj if c != same[0]):
        return None
    return same[0]
