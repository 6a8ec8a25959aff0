"""Batch-flow rules: how the sample (batch) index of an op's inputs reaches its outputs.

The isolation analysis proves that no sample of a batch can influence another sample's
output. It works per axis, never per element, so symbolic shapes are no obstacle. Every
value gets an abstract `BatchState`:

- `axes`: the axes whose index says which sample an element belongs to. A `BatchAxis` also
  says how many consecutive positions one sample occupies along it (`rows`: 1 for a plain
  batch axis, S once [batch, S] is flattened, None for packed sequences of varying length)
  and, when the positions were put in an order computed from the whole batch (argsort of
  expert ids to build per-expert buffers), the tag of that permutation (`moved`);
- `taints`: the points this value depends on where samples were mixed (kind "leak") or
  where the analysis could not tell (kind "unknown": an op without a rule);
- `role`: what an index-like value is beyond its numbers: "label" (each position's sample
  id, e.g. the sequence ids of packed sequences), "same_sample" (a boolean mask true only
  where two positions belong to the same sample: a block-diagonal attention mask) or
  "perm" (a permutation of a batch axis computed from the whole batch). A perm's numbers
  depend on every sample (`latent` holds that mixing), but an op that only moves rows by
  it, and a later op that moves them back by the inverse, mixes nothing.

A value with no batch axes and no taints depends on no sample at all (weights, shapes).

An op's rule is `batch_flow(args: FlowArgs) -> Flow`, registered with the op's other
facets: one `Out` per output, from the input states, types and attrs. An `Out` may declare
`mixes="why"` (the op makes this output depend on other samples: a leak source) or
`unknown="why"`. Taints already on the inputs are added by the analysis, not by rules, so a
rule describes only what its op does. Most rules are one call to `combine`, which takes
the op's axis map (which output axis each input axis lands on, None for axes every output
element reads whole) and checks that the batch axes of all inputs line up.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

from mocompile.ir.types import Dim, TensorType

DATA, LABEL, SAME_SAMPLE, PERM = "data", "label", "same_sample", "perm"


@dataclass(frozen=True)
class BatchAxis:
    axis: int
    rows: Dim | None = 1  # positions per sample along the axis; None: varies (packed sequences)
    moved: str | None = None  # tag of the batch-wide permutation the positions were reordered by


@dataclass(frozen=True)
class Taint:
    """A point where samples get mixed ("leak") or where the analysis cannot tell ("unknown")."""

    kind: str
    op: str
    loc: str
    value: str  # the node's first output, as the printer names it
    reason: str
    node: int  # index of the node in graph.nodes (to trace the chain to the outputs)


@dataclass(frozen=True)
class BatchState:
    axes: tuple[BatchAxis, ...] = ()
    taints: frozenset[Taint] = frozenset()
    role: str = DATA
    perm: str = ""  # role perm: the permutation's tag
    latent: frozenset[Taint] = frozenset()  # role perm: the mixing that is real once its numbers are read as data

    def axis(self, a: int) -> BatchAxis | None:
        return next((b for b in self.axes if b.axis == a), None)


CONST = BatchState()


@dataclass(frozen=True)
class Out:
    """What an op does to the batch index of one output (see the module docstring)."""

    axes: tuple[BatchAxis, ...] = ()
    mixes: str = ""
    unknown: str = ""
    role: str = DATA
    perm: str = ""
    latent: str = ""  # role perm created here: why its numbers depend on every sample


@dataclass(frozen=True)
class Flow:
    outs: tuple[Out, ...]
    index_inputs: frozenset[int] = frozenset()  # inputs read for their role (to move rows, as a mask), not as data


@dataclass(frozen=True)
class FlowArgs:
    ins: tuple[BatchState, ...]
    in_types: tuple[TensorType, ...]
    out_types: tuple[TensorType, ...]
    attrs: Mapping[str, Any]
    tag: str  # unique name of the node (the tag of a permutation it creates)


BatchFlowFn = Callable[[FlowArgs], Flow]
# input axis -> output axis (None: that axis is read whole); None instead of a list: the whole input is read whole
AxisMap = Sequence[int | None] | None


def inverse(tag: str) -> str:
    return tag[:-3] if tag.endswith("^-1") else tag + "^-1"


def compose(moved: str | None, index_tag: str) -> tuple[bool, str | None]:
    """Rows ordered by `moved`, gathered by permutation `index_tag`: (ok, new order).
    Gathering plain rows reorders them; gathering by the inverse puts them back."""
    if moved is None:
        return True, index_tag
    if moved == inverse(index_tag):
        return True, None
    return False, None


def combine(args: FlowArgs, maps: Sequence[AxisMap], reduce: Iterable[int] = (), why: str = "",
            states: Sequence[BatchState] | None = None) -> Out:
    """The output state of an op described by its axis map.

    maps[i][a] is the output axis that input i's axis a lands on (broadcast, transpose,
    gather along another axis), or None when every output element reads that axis whole
    (a contraction, reduction, lookup). `reduce` are output axes along which every element
    also reads all positions (softmax, cumsum, norms). A batch axis read whole mixes
    samples; inputs whose batch axes land on different output axes pair elements of
    different samples. `why` replaces the generic reason for the first case.
    """
    states = args.ins if states is None else states
    reduce = set(reduce)
    landed: list[tuple[BatchAxis, ...]] = []
    mixes = ""
    for i, (s, m) in enumerate(zip(states, maps)):
        mapped = []
        for b in s.axes:
            o = None if m is None else m[b.axis]
            if o is None or o in reduce:
                mixes = mixes or why or (f"reads all positions of axis {b.axis} of input {i} together, and that axis "
                                         "carries the batch (sample) index")
                if o is None:
                    continue
            mapped.append(replace(b, axis=o))
        if mapped:
            landed.append(tuple(sorted(mapped, key=lambda b: b.axis)))
    axes = landed[0] if landed else ()
    if any(a != axes for a in landed[1:]):
        mixes = mixes or "combines elements of different samples: the inputs' batch axes do not line up"
    return Out(axes=axes, mixes=mixes)


def identity_map(rank: int, drop: Iterable[int] = ()) -> list[int | None]:
    drop = {d % rank for d in drop} if rank else set()
    return [None if a in drop else a for a in range(rank)]


def broadcast_map(in_rank: int, out_rank: int) -> list[int | None]:
    """numpy broadcasting: axes align from the right."""
    return [a + out_rank - in_rank for a in range(in_rank)]


def one(out: Out, n: int = 1) -> Flow:
    return Flow((out,) * n)


# ---- ready-made rules -------------------------------------------------------------------------
def elementwise(args: FlowArgs) -> Flow:
    """Each output element reads the broadcast-aligned element of every input."""
    r = args.out_types[0].rank
    return one(combine(args, [broadcast_map(t.rank, r) for t in args.in_types]))


def depends_on_shapes_only(args: FlowArgs) -> Flow:
    """Outputs computed from the inputs' shapes, never their values (ids of segments, zeros)."""
    return Flow(tuple(Out() for _ in args.out_types), frozenset(range(len(args.ins))))


def rowwise(params: Callable[[FlowArgs], Sequence[AxisMap]] | None = None, reduce_last: bool = False,
            why: str = "") -> BatchFlowFn:
    """Rule of an op that maps input 0's last axis to the output's last axis as a whole
    (linear, mlp, router, experts) or in place (`reduce_last`: norms); the other inputs are
    weights read whole unless `params` maps them."""

    def rule(args: FlowArgs) -> Flow:
        x = args.in_types[0]
        first = identity_map(x.rank) if reduce_last else identity_map(x.rank, drop=[-1])
        rest = params(args) if params else [None] * (len(args.ins) - 1)
        out = combine(args, [first, *rest], reduce=[x.rank - 1] if reduce_last else (),
                      why=why or "reads the whole last axis, and that axis carries the batch (sample) index")
        return one(out, len(args.out_types))

    return rule


def last_axis_params(args: FlowArgs) -> list[AxisMap]:
    """Per-feature parameters ([hidden]) of a norm or bias: they line up with the last axis."""
    r = args.in_types[0].rank
    return [[r - 1] if t.rank == 1 else None for t in args.in_types[1:]]
