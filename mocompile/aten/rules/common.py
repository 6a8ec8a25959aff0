"""Rule builders several rule modules share: moving an input's axes (layout ops keep the
input's role and a pair's off-block), and ops that read their last k axes in windows."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from mocompile.aten.call import Call
from mocompile.aten.registry import Rule
from mocompile.aten.state import LABEL, AxisMap, Flow, Out, State, combine
from mocompile.ir.batch_flow import broadcast_map, identity_map


def relayout(call: Call, name: str, amap: AxisMap, why: str = "") -> Out:
    """The output of an op that only moves the elements of input `name` (no arithmetic):
    its axes go where `amap` says, its role and pair off-block come along."""
    s = call.state(name)
    out = combine([s], [amap], why=why, pair_offblock=s.offblock)
    if out.mixes or out.unknown:
        return out
    return replace(out, role=s.role, perm=s.perm, target=s.target, column=s.column, fill=s.fill)


def moved(call: Call, name: str, amap: AxisMap, why: str = "") -> Flow:
    """relayout as the whole answer of a one-output op, the input read for its role."""
    return Flow((relayout(call, name, amap, why),), frozenset({name}))


def label_kept(out: Out, *states: State) -> Out:
    """Sample labels stay labels when only their positions change."""
    return replace(out, role=LABEL) if states and all(s.role == LABEL for s in states) and not out.mixes else out


def values_of(call: Call, names: Sequence[str]) -> tuple[list[State], list[AxisMap]]:
    """The states of `names` with numpy broadcasting maps onto the output."""
    r = call.out_rank()
    return [call.state(n) for n in names], [broadcast_map(call.rank(n), r) for n in names]


def windowed(k: int, inputs: Sequence[str] = ("self",), what: str = "reads a window") -> Rule:
    """Rule of an op computing each output element from a window of the last k axes of its
    inputs (pooling, padding, interpolation): the leading axes pass through, a batch axis
    among the last k is read across samples."""

    def rule(call: Call) -> Flow:
        r = call.rank(inputs[0])
        amap = identity_map(r, drop=range(r - k, r)) if r >= k else [None] * r
        present = [n for n in inputs if call.arg(n) is not None]
        out = combine([call.state(n) for n in present], [amap] * len(present),
                      why=f"{what} across the last {k} axes, and one of them carries the batch (sample) index")
        return Flow(tuple(out for _ in call.outs))

    return rule
