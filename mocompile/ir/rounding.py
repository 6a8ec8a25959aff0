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

Flip = tuple[int, int]  # (rounding event, flat index of the element in that event's array)


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


_TRACE: ContextVar[RoundingTrace | None] = ContextVar("mocompile_rounding_trace", default=None)


def round_half_even(v: np.ndarray) -> np.ndarray:
    """v rounded to the nearest integer (ties to even), as every run-time rounding point of
    the IR's arithmetic computes it; under a RoundingTrace, recorded and possibly flipped."""
    rounded = np.round(v)
    trace = _TRACE.get()
    return rounded if trace is None else trace.visit(v, rounded)


@contextmanager
def tracing(trace: RoundingTrace) -> Iterator[RoundingTrace]:
    """Run the interpreter inside this block to record and steer its rounding points."""
    token = _TRACE.set(trace)
    try:
        yield trace
    finally:
        _TRACE.reset(token)
