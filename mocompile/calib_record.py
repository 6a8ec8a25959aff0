"""What the sparsity and layer-skipping passes learn from calibration runs, recorded in one
interpreter pass over the inputs with bounded memory.

- per layer (a `blocks.Block`): the block influence of ShortGPT, 1 - cos(hidden state entering
  the layer, hidden state leaving it), averaged over tokens;
- per router (an op with `routing_choices`): how often each expert is chosen and the gate
  weight it gets (its `routing_weights` output), over all tokens;
- per feed-forward block or routed experts op (an op with `hidden_abs_sum`): the mean
  |hidden activation| of each neuron (per expert: over the tokens routed to it).

Every statistic is a running sum with a count, so memory holds one vector per neuron, expert
and layer, never the activations of the tokens: a layer's input is held only until the same
forward reaches the layer's output, as the interpreter holds it anyway (the residual add
reads it). Nodes are keyed by `loc` (the module path), which survives graph clones and passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from mocompile.blocks import Block, blocks
from mocompile.calibration import Calibration, Inputs, observe
from mocompile.ir.graph import Graph, Node
from mocompile.ir.registry import get_op

KINDS = ("influence", "routing", "hidden")


def node_key(node: Node) -> str:
    """How a record names a node: its module path, else its first output's name."""
    return node.loc or node.outputs[0].name


@dataclass
class RouterUsage:
    """Running routing statistics of one router: per expert, the times chosen and the gate mass."""

    experts: int
    top_k: int
    counts: np.ndarray  # [experts] int64
    gate_mass: np.ndarray  # [experts] float64
    tokens: int = 0

    @property
    def share(self) -> np.ndarray:
        """Fraction of the routing decisions (token, slot) that went to each expert."""
        return self.counts / max(self.tokens * self.top_k, 1)

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "top_k": self.top_k, "counts": self.counts.tolist(),
                "share": [round(float(s), 4) for s in self.share],
                "gate_mass": [round(float(m), 4) for m in self.gate_mass / max(self.tokens, 1)]}


@dataclass
class HiddenActivity:
    """Running sums of |hidden activation| per expert and neuron ([1, F] for a dense block)."""

    sums: np.ndarray  # [E, F] float64
    tokens: np.ndarray  # [E] int64

    @property
    def mean(self) -> np.ndarray:
        return self.sums / np.maximum(self.tokens, 1)[:, None]


@dataclass
class Influence:
    """Running sum of 1 - cos(in, out) over the tokens through one layer."""

    total: float = 0.0
    tokens: int = 0

    @property
    def mean(self) -> float:
        return self.total / max(self.tokens, 1)


@dataclass
class CalibrationRecord:
    """Everything one recording gathered, keyed by layer name or node key."""

    influence: dict[str, Influence] = field(default_factory=dict)
    routing: dict[str, RouterUsage] = field(default_factory=dict)
    hidden: dict[str, HiddenActivity] = field(default_factory=dict)
    samples: int = 0


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cos per row, in float64; a zero row counts as unchanged when both are zero."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    cos = (a * b).sum(-1) / np.maximum(na * nb, 1e-30)
    return np.where((na == 0) & (nb == 0), 0.0, 1.0 - cos)


class Recorder:
    """Interpreter hooks filling a CalibrationRecord (see the module docstring)."""

    def __init__(self, graph: Graph, kinds: Iterable[str] = KINDS) -> None:
        self.kinds = set(kinds)
        unknown = self.kinds - set(KINDS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)} (known: {', '.join(KINDS)})")
        self.record = CalibrationRecord()
        self.blocks: list[Block] = blocks(graph) if "influence" in self.kinds else []
        self._enters = {id(b.input): b for b in self.blocks}
        self._leaves = {id(b.output): b for b in self.blocks}
        self._graph_inputs = {v.name: v for v in graph.inputs}
        self._held: dict[int, np.ndarray] = {}  # layer inputs waiting for the layer's output

    def start(self, sample: Inputs) -> None:
        """A new forward: layers whose input is a graph input get it from the sample."""
        self._held.clear()
        for b in self.blocks:
            if b.input.name in self._graph_inputs and b.input is self._graph_inputs[b.input.name]:
                self._held[id(b.input)] = np.asarray(sample[b.input.name])
        self.record.samples += 1

    def before(self, node: Node, args: Sequence[np.ndarray]) -> None:
        op = get_op(node.op)
        if "hidden" in self.kinds and op.hidden_abs_sum is not None:
            sums, tokens = op.hidden_abs_sum(args, node.attrs)
            key = node_key(node)
            if key not in self.record.hidden:
                self.record.hidden[key] = HiddenActivity(np.zeros_like(sums), np.zeros_like(tokens))
            acc = self.record.hidden[key]
            acc.sums += sums
            acc.tokens += tokens

    def after(self, node: Node, outputs: Sequence[np.ndarray]) -> None:
        op = get_op(node.op)
        if "routing" in self.kinds and op.routing_choices is not None:
            self._routing(node, op, outputs)
        for v, a in zip(node.outputs, outputs):
            if id(v) in self._leaves:
                b = self._leaves[id(v)]
                d = _cosine_distance(self._held.pop(id(b.input)), a)
                acc = self.record.influence.setdefault(b.name, Influence())
                acc.total += float(d.sum())
                acc.tokens += d.size
            if id(v) in self._enters:
                self._held[id(v)] = a

    def _routing(self, node: Node, op: Any, outputs: Sequence[np.ndarray]) -> None:
        idx = outputs[op.routing_choices].reshape(-1, outputs[op.routing_choices].shape[-1])
        experts = int(node.inputs[op.per_expert_inputs(node)[0]].type.shape[0]) if op.per_expert_inputs else \
            int(idx.max(initial=-1)) + 1
        key = node_key(node)
        if key not in self.record.routing:
            self.record.routing[key] = RouterUsage(experts, idx.shape[-1], np.zeros(experts, np.int64),
                                                   np.zeros(experts, np.float64))
        acc = self.record.routing[key]
        acc.counts += np.bincount(idx.ravel(), minlength=experts)[:experts]
        if op.routing_weights is not None:
            w = outputs[op.routing_weights].reshape(idx.shape)
            np.add.at(acc.gate_mass, idx.ravel(), w.ravel().astype(np.float64))
        acc.tokens += idx.shape[0]


def record(graph: Graph, calibration: Calibration | Sequence[Inputs], kinds: Iterable[str] = KINDS) -> CalibrationRecord:
    """Run `graph` over the calibration inputs and return the statistics of `kinds`."""
    inputs = calibration.inputs if isinstance(calibration, Calibration) else list(calibration)
    rec = Recorder(graph, kinds)
    for sample in inputs:
        rec.start(sample)
        observe(graph, [sample], [rec.after], before=[rec.before])
    return rec.record
