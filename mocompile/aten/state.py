"""The abstract values of the ATen isolation analysis, and `combine`, which most rules are.

They extend the IR's vocabulary (`mocompile.ir.batch_flow`): a value's `axes` say which of
its axes carry the sample index, `taints` the mixing points it depends on, `role` what an
index-like value is. ATen graphs need a little more:

- `Axis.outer`: the layout of the sample index along an axis (see `mocompile.aten.shapes`),
  so a reshape of MultiheadAttention's [seq, batch] into one axis is still followed;
- roles beyond data and sample labels: "iota" (an arange over a batch axis: each value is
  its own position, so indexing by it is the identity), "perm" (values are positions along
  the batch axis described by `target`: a sort's indices, in an order the whole batch
  decided, or those divided by top_k: each sorted copy's token),
  "coords" (nonzero's output: column `column` holds positions along the batch axis), "count"
  (the size of such a selection: a number every sample has a say in);
- pairs: a value with two batch axes (attention scores over packed sequences, q @ k^T over
  the token axis) holds at (i, j) something of sample(i) and sample(j). It is no leak while
  the elements that pair two different samples (the off-block) hold a constant: `offblock`
  is that constant (a block-diagonal mask makes it False, a masked score -inf, its softmax
  0), or OFFBLOCK_DATA when they depend on the data; then `latent` holds where the pair was
  formed, which becomes the leak if the off-block reaches an output.
- `fill`: the constant every element of a data-independent tensor holds (full, scalar
  literals), so masks built from constants can be evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from mocompile.ir.batch_flow import DATA, LABEL, PERM, AxisMap, BatchAxis, BatchState, Out as IROut, Taint

IOTA, COORDS, COUNT = "iota", "coords", "count"
OFFBLOCK_DATA = "data"
INDEX_ROLES = (IOTA, PERM, COORDS)  # values that are positions along a batch axis
PAIRED = ("pairs positions of different samples (element (i, j) holds data of sample i and of sample j), and "
          "that reaches here unmasked")
__all__ = ["DATA", "LABEL", "PERM", "IOTA", "COORDS", "COUNT", "OFFBLOCK_DATA", "Axis", "State", "Out", "Flow",
           "CONST", "combine", "with_axes", "Taint", "AxisMap"]


@dataclass(frozen=True)
class Axis(BatchAxis):
    """A batch axis: `rows` consecutive positions per sample, the whole batch `outer` times."""

    rows: int = 1  # type: ignore[assignment]
    outer: int = 1

    @property
    def layout(self) -> tuple[int, int, str | None]:
        """What a position index along this axis means: compared between an index's target
        and the axis it indexes."""
        return self.rows, self.outer, self.moved


@dataclass(frozen=True)
class State(BatchState):
    """The abstract value of one fx node output (module docstring)."""

    fill: Any = None
    offblock: Any = None
    target: tuple[int, int, str | None] | None = None  # index roles: the layout of the axis the values index
    column: int | None = None  # coords: the column holding positions along the batch axis

    @property
    def is_pair(self) -> bool:
        return len(self.axes) == 2


CONST = State()


@dataclass(frozen=True)
class Out(IROut):
    """One output as a rule gives it: the IR's Out (axes, mixes, unknown, role, perm,
    latent: why a value this op creates will mix once read) plus the fields of `State`, and
    `carried`, taints kept latent from the inputs (a pair's origin), and `taints`, mixing
    points inside the op itself (a torch.cond branch)."""

    fill: Any = None
    offblock: Any = None
    target: tuple[int, int, str | None] | None = None
    column: int | None = None
    carried: frozenset[Taint] = frozenset()
    taints: frozenset[Taint] = frozenset()


@dataclass(frozen=True)
class Flow:
    """A rule's answer: one Out per output of the node, and the arguments (by schema name)
    read for their role or shape rather than as data: their latent mixing is not taken on."""

    outs: tuple[Out, ...]
    structural: frozenset[str] = field(default_factory=frozenset)


def with_axes(s: State, axes: Sequence[Axis]) -> State:
    return replace(s, axes=tuple(sorted(axes, key=lambda b: b.axis)))


def _pairs_up(landed: list[Axis]) -> bool:
    """Two distinct output axes with the same plain layout: a pair, not a misalignment."""
    by_axis = {b.axis: b for b in landed}
    if len(by_axis) != 2 or any(b.moved for b in landed):
        return False
    a, b = by_axis.values()
    return (a.rows, a.outer) == (b.rows, b.outer) and all(by_axis[x.axis] == x for x in landed)


def combine(states: Sequence[State], maps: Sequence[AxisMap], reduce: Sequence[int] = (), why: str = "",
            pair_offblock: Any = OFFBLOCK_DATA) -> Out:
    """The output of an op given by its axis map (as in `mocompile.ir.batch_flow.combine`):
    maps[i][a] is the output axis input i's axis a lands on, None where every output element
    reads that axis whole; `reduce` are output axes along which each element also reads all
    positions. A batch axis read whole mixes samples; batch axes landing on two output axes
    make a pair (its off-block `pair_offblock`, data unless the caller evaluated it); any
    other disagreement pairs elements of different samples."""
    reduce_set = set(reduce)
    landed: list[Axis] = []
    mixes = ""
    carried: set[Taint] = set()
    for i, (s, m) in enumerate(zip(states, maps)):
        if s.is_pair and s.offblock == OFFBLOCK_DATA:
            carried |= s.latent
        for b in s.axes:
            o = None if m is None else m[b.axis]
            if o is None or o in reduce_set:
                mixes = mixes or why or (f"reads all positions of axis {b.axis} of input {i} together, and that "
                                         "axis carries the batch (sample) index")
                if o is None:
                    continue
            landed.append(replace(b, axis=o))
    axes = tuple(sorted(set(landed), key=lambda b: b.axis))
    if len(axes) <= 1:
        return Out(axes=axes, mixes=mixes)
    if not mixes and _pairs_up(landed):
        if pair_offblock != OFFBLOCK_DATA:
            return Out(axes=axes, offblock=pair_offblock)
        return Out(axes=axes, offblock=pair_offblock, carried=frozenset(carried),
                   latent="" if carried else PAIRED)
    return Out(mixes=mixes or "combines elements of different samples: the inputs' batch axes do not line up")


def drop_axis(s: State, axis: int) -> State:
    """A pair with one of its axes accounted for by the caller (a masked reduction or
    contraction over it): what is left is an ordinary value with one batch axis."""
    return State(tuple(b for b in s.axes if b.axis != axis), s.taints)
