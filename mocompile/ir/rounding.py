"""The interpreter's run-time rounding points, made observable and steerable.

An activation-quantized model rounds values to an integer grid while it runs. Two correct
implementations of it that add the same floats in a different order (the interpreter and a
compiled kernel) land within a few float32 ulps of each other before rounding, and where such a
value lies that close to the middle between two grid points the two round it to neighbouring
codes. One such flip moves the output by a whole quantization step, far beyond any float
tolerance, though neither side is wrong.

Verification handles this in the interpreter itself rather than by widening its bound: under
a `RoundingTrace` every rounding point (`round_half_even`, which the ops' arithmetic calls)
records the elements that lie within `margin` of a rounding boundary, and can be told to round
chosen ones of them the other way. The verifier then finds the set of such flips that explains
an artifact's outputs and requires the artifact to match, within the fp32 tolerance, the
interpreter run that rounds exactly those elements the other way (`mocompile.verification`).

Each rounding event is numbered in the order the interpreter reaches it; that order is fixed
for a graph and its inputs (a flip that changed a later routing choice would change it, and
the verification then fails rather than passes).

A router's top-k choice is such a point too: where the k-th and (k+1)-th scores tie to within
float noise, the two implementations may pick different experts (`top_k_choices`).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

# How close (in units of the grid step) to the middle between two grid points a value must lie
# to count as ambiguous: float32 sums of a few hundred terms in another order differ by a few
# ulps of the row's largest value, and codes reach 127, so 1e-4 of a step leaves room for
# ~30 ulps of 127 (2^-17 each) without making ordinary values ambiguous.
DEFAULT_MARGIN = 1e-4
# How close (relative to the row's largest score) a router's k-th and (k+1)-th scores must be
# for the choice between them to count as ambiguous: scores computed in another float order
# differ by a few float32 ulps.
CHOICE_MARGIN = 1e-5

Flip = tuple[int, int]  # (event, flat index of the element rounded; or the row whose k-th choice is swapped)


@dataclass
class RoundingTrace:
    """Records ambiguous roundings (within `margin` of a boundary) and applies `flips`."""

    flips: frozenset[Flip] = frozenset()
    margin: float = DEFAULT_MARGIN
    events: int = 0
    ambiguous: list[tuple[float, Flip]] = field(default_factory=list)  # (distance to the boundary, flip)

    def visit(self, v: np.ndarray, rounded: np.ndarray) -> np.ndarray:
        event = self.events
        self.events += 1
        distance = np.abs(np.abs(v - np.floor(v)) - 0.5)
        near = np.flatnonzero(distance <= self.margin)
        self.ambiguous += [(float(distance.flat[i]), (event, int(i))) for i in near]
        mine = [i for (e, i) in self.flips if e == event]
        if not mine:
            return rounded
        out = rounded.copy()
        flat_v, flat_out = v.reshape(-1), out.reshape(-1)
        for i in mine:  # the other neighbour of v: one step towards v from the code it got
            flat_out[i] += 1.0 if flat_v[i] > flat_out[i] else -1.0
        return out


    def visit_choice(self, choice: np.ndarray, order: np.ndarray, k: int) -> np.ndarray:
        """The first k of each row of `order` (columns by descending `choice`); a row whose k-th
        and (k+1)-th scores tie to within CHOICE_MARGIN is recorded, and when flipped takes
        its (k+1)-th column in place of its k-th."""
        event = self.events
        self.events += 1
        kth = np.take_along_axis(choice, order[:, k - 1:k], -1)[:, 0]
        nxt = np.take_along_axis(choice, order[:, k:k + 1], -1)[:, 0]
        scale = np.maximum(np.where(np.isfinite(choice), np.abs(choice), 0).max(-1), 1e-30)
        with np.errstate(invalid="ignore"):
            gap = np.where(np.isfinite(nxt), (kth - nxt) / scale, np.inf)
        self.ambiguous += [(float(gap[r]) / CHOICE_MARGIN * self.margin, (event, int(r)))  # on the roundings' scale
                           for r in np.flatnonzero(gap <= CHOICE_MARGIN)]
        idx = order[:, :k].copy()
        for e, r in self.flips:
            if e == event:
                idx[r, k - 1] = order[r, k]
        return idx


_TRACE: ContextVar[RoundingTrace | None] = ContextVar("mocompile_rounding_trace", default=None)


def round_half_even(v: np.ndarray) -> np.ndarray:
    """v rounded to the nearest integer (ties to even), as every run-time rounding point of
    the IR's arithmetic computes it; under a RoundingTrace, recorded and possibly flipped."""
    rounded = np.round(v)
    trace = _TRACE.get()
    return rounded if trace is None else trace.visit(v, rounded)


def top_k_choices(choice: np.ndarray, k: int) -> np.ndarray:
    """The k best-scoring columns of each row of `choice` [rows, n], best first (ties: the
    lower column), as a router takes them; under a RoundingTrace a near-tie at the k-th place
    is recorded and may be flipped like a rounding."""
    order = np.argsort(-choice, axis=-1, kind="stable")
    trace = _TRACE.get()
    if trace is None or k >= choice.shape[-1]:
        return order[:, :k]
    return trace.visit_choice(choice, order, k)


@contextmanager
def tracing(trace: RoundingTrace) -> Iterator[RoundingTrace]:
    """Run the interpreter inside this block to record and steer its rounding points."""
    token = _TRACE.set(trace)
    try:
        yield trace
    finally:
        _TRACE.reset(token)
