"""Batch isolation: prove that no sample of a batch can influence another sample's output.

When a served model batches requests from different users, an op that mixes data across
the batch lets one request read or steer another's output (within-batch data stealing;
accidental leaks from per-tensor dynamic quantization, capacity-limited MoE routing, batch
statistics). This is an abstract interpretation of the IR: each op's registered
`batch_flow` rule (vocabulary in `mocompile.ir.batch_flow`) says which axes of its outputs
carry the sample index and whether the op mixes samples. It runs per axis, so it holds for
every batch size and every value of the symbolic dims at once.

The verdict is "isolated" (a proof: every output row depends only on its own sample's
input rows), "leaks" (each mixing point that reaches an output, with its op, location in
the model and the chain of ops to the output), or "unknown" (an op without a rule, or a
rule that could not tell): never "isolated" by default. Evidence that a leak is real (a
witness run of the interpreter) lives in `mocompile.witness`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from mocompile.ir.batch_flow import (
    LABEL,
    PERM,
    BatchAxis,
    BatchState,
    Flow,
    FlowArgs,
    Out,
    Taint,
    inverse,
)
from mocompile.ir.graph import Graph, Node
from mocompile.ir.registry import get_op

BATCH_SYMBOL = "batch"
RELATIVE_ROUNDING = 1e-5  # a differential difference this small is float rounding, not a value crossing samples
VERDICTS = ("isolated", "leaks", "unknown")


@dataclass
class Finding:
    """One point where samples mix (kind "leak") or where the analysis cannot tell ("unknown")."""

    kind: str
    op: str
    loc: str
    value: str
    reason: str
    outputs: list[str]
    chain: list[str]  # "op@loc" from this point to the first affected output
    witness: dict[str, Any] | None = None  # for a leak: how much sample i changes right at this op's output

    def to_json(self) -> dict[str, Any]:
        d = {"kind": self.kind, "op": self.op, "loc": self.loc, "value": self.value, "reason": self.reason,
             "outputs": self.outputs, "chain": self.chain}
        return d if self.witness is None else {**d, "witness": self.witness}


@dataclass
class IsolationReport:
    verdict: str
    findings: list[Finding]
    inputs: dict[str, str]  # input -> which axis carries the sample
    outputs: dict[str, str]  # output -> which axis carries the sample
    sample_ids: str | None = None
    seconds: float = 0.0  # the static analysis alone
    witness: dict[str, Any] | None = None  # leaks: sample i's output changes when only sample j changes
    differential: dict[str, Any] | None = None  # compiled artifact: the others bit for bit as each sample changes
    states: dict[str, BatchState] = field(default_factory=dict, repr=False)  # every value's abstract state

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "IsolationReport":
        """A report as recorded in an artifact's manifest (without the per-value states)."""
        return IsolationReport(d["verdict"], [Finding(**f) for f in d.get("findings", [])], dict(d.get("inputs", {})),
                               dict(d.get("outputs", {})), d.get("sample_ids"), d.get("seconds", 0.0),
                               d.get("witness"), d.get("differential"))

    @property
    def leaks(self) -> list[Finding]:
        return [f for f in self.findings if f.kind == "leak"]

    @property
    def unknowns(self) -> list[Finding]:
        return [f for f in self.findings if f.kind == "unknown"]

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"verdict": self.verdict, "findings": [f.to_json() for f in self.findings],
                             "inputs": self.inputs, "outputs": self.outputs, "seconds": round(self.seconds, 4)}
        if self.sample_ids:
            d["sample_ids"] = self.sample_ids
        for key in ("witness", "differential"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    def summary(self) -> str:
        """One line: the verdict and the first finding."""
        if self.verdict == "isolated":
            return "isolated: every output row depends only on its own sample's input rows"
        f = (self.leaks or self.findings)[0]
        where = f"{f.op} at {f.loc or '?'}" if f.op else "the graph"
        more = f" (+{len(self.findings) - 1} more)" if len(self.findings) > 1 else ""
        return f"{self.verdict}: {where}: {f.reason}{more}"

    def format(self) -> str:
        """A short human report: verdict, each finding's op, location, chain, witness numbers."""
        lines = [f"batch isolation: {self.verdict.upper()}  ({self.seconds * 1e3:.1f} ms static analysis)"]
        lines.append("  sample axis: " + ", ".join(f"{k} {v}" for k, v in self.inputs.items()))
        if self.verdict == "isolated":
            lines.append("  proof: every output row depends only on its own sample's input rows "
                         "(for every batch size and every value of the symbolic dims)")
        for f in self.findings:
            head = f"{f.op} at {f.loc or '?'} (%{f.value})" if f.op else "graph"
            lines.append(f"  {f.kind}: {head}")
            lines.append(f"    why: {f.reason}")
            if f.chain:
                lines.append(f"    chain to output %{f.outputs[0]}: {' -> '.join(f.chain)}")
            if f.witness:
                lines.append(f"    at this op: {_op_change(f.witness)}")
        if self.witness:
            w = self.witness
            if w.get("changed"):
                lines.append(f"  witness: {w['perturbation']}; output %{w['output']} of sample {w['observed_sample']} "
                             f"changed by {w['max_change']:.4g} (relative {w['relative_change']:.3g})")
            else:
                lines.append(f"  witness: no change of another sample's output found ({w.get('note', '')})")
        if self.differential:
            d = self.differential
            lines.append(f"  differential run: {_differential_outcome(d, self.verdict)}")
            step = d.get("cached_step")
            if step:
                lines.append(f"  differential run, cached step (KV cache: prefill of {step['prompt']} tokens and any "
                             f"other segments, then one token at a time): {_differential_outcome(step, self.verdict)}")
        return "\n".join(lines)


def _op_change(w: Mapping[str, Any]) -> str:
    """How much a leak's own op output moved in the witness runs. A leak op that did not
    move (its batch-wide statistic held by an unchanged sample) says so instead of
    printing a change of 0; manifests written before `changed` was recorded count any
    nonzero change as one."""
    i, change = w["observed_sample"], w["max_change"]
    when = f" when {w['perturbation']}" if w.get("perturbation") else ""
    if w.get("changed", change > 0):
        return f"sample {i} changed by {change:.3g}{when}"
    if change == 0:
        tried = "any perturbation tried" if "changed" in w else "the witness's perturbation"
        return (f"sample {i} did not change under {tried} (the static analysis still finds that it depends on "
                "the other samples; these inputs do not show it)")
    return (f"sample {i} changed only by {change:.3g} (relative {w.get('relative_change', 0.0):.2g}), "
            f"float-rounding level{when}")


def _differential_outcome(d: Mapping[str, Any], verdict: str) -> str:
    """One sentence on a differential run (`witness.differential_search`): which replacement
    changed which sample by how much, or every replacement tried when none changed anything.
    A model the static analysis found leaky is never reported plain "identical"."""
    tried = d.get("tried")
    if tried is None:  # one replacement of `perturbed_sample` (`differential_check` of an older record)
        tried = [f"sample {d['perturbed_sample']} replaced"]
    if not tried:
        return "no replacement applies to these inputs, nothing was compared"
    if not d.get("outputs"):
        return "no output has a batch axis, nothing was compared"
    listed = ", ".join(tried)
    on = f" on {d['inputs']}" if d.get("inputs") else ""
    if d["bitwise_identical"]:
        if verdict == "leaks":
            return (f"no replacement changed another sample (tried{on}: {listed}), although the static analysis "
                    "found a leak: these replacements are no witness of it in the compiled code")
        return f"every replacement left the other samples bit for bit identical (tried{on}: {listed})"
    rel = d.get("relative_diff", 1.0)
    what = f"replacing sample {d['perturbed_sample']}" + (f" ({d['phrase']})" if d.get("phrase") else "")
    whom = (f"sample {d['observed_sample']}'s {d['output']}" if d.get("output") else
            f"samples {d['compared_samples']}")
    text = f"{what} changes {whom} by {d['max_abs_diff']:.3g} (relative {rel:.2g}): DIFFERENT"
    if rel < RELATIVE_ROUNDING:
        text += (", rounding-level: the summation order of some kernel depends on the rest of the batch (e.g. how "
                 "many tokens each expert gets), though no value flows between samples")
    elif verdict == "isolated":
        text += ", although the static analysis proved isolation: the compiled code mixes samples"
    elif verdict == "leaks":
        text += ", the leak the static analysis found shows in the compiled code"
    if len(tried) > 1:  # the replacements before it changed nothing
        text += f" (before it, {', '.join(tried[:-1])} left the other samples identical)"
    return text


def describe_axes(state: BatchState) -> str:
    if not state.axes:
        return "none" if not state.taints else "none (mixed)"
    parts = []
    for b in state.axes:
        rows = "" if b.rows == 1 else (" (packed)" if b.rows is None else f" ({b.rows} positions per sample)")
        parts.append(f"axis {b.axis}{rows}{' in batch-wide sorted order' if b.moved else ''}")
    return ", ".join(parts)


def input_states(graph: Graph, batch_axes: Mapping[str, int | None] | None,
                 sample_ids: str | None) -> dict[str, BatchState]:
    """Each input's sample axis: given, or the axis whose dim is the symbol `batch`."""
    out = {}
    for v in graph.inputs:
        if batch_axes is not None and v.name in batch_axes:
            axis = batch_axes[v.name]
        else:
            axis = next((a for a, d in enumerate(v.type.shape) if d == BATCH_SYMBOL), None)
        if axis is None:
            out[v.name] = BatchState()
            continue
        rows = None if sample_ids else 1
        out[v.name] = BatchState((BatchAxis(axis % v.type.rank, rows),), role=LABEL if v.name == sample_ids else "data")
    return out


def _flow(node: Node, ins: tuple[BatchState, ...], tag: str) -> Flow:
    rule = get_op(node.op).batch_flow
    if rule is None:
        return Flow(tuple(Out(unknown=f"op {node.op!r} declares no batch-flow rule") for _ in node.outputs))
    try:
        flow = rule(FlowArgs(ins, tuple(v.type for v in node.inputs), tuple(v.type for v in node.outputs),
                             node.attrs, tag))
    except Exception as e:  # a rule that cannot handle its inputs must not pass for a proof
        return Flow(tuple(Out(unknown=f"batch-flow rule failed: {type(e).__name__}: {e}") for _ in node.outputs))
    if len(flow.outs) != len(node.outputs):
        return Flow(tuple(Out(unknown="batch-flow rule gave the wrong number of outputs") for _ in node.outputs))
    return flow


def _chain(graph: Graph, start: int, targets: set[int]) -> tuple[list[Node], int | None]:
    """Shortest dataflow path from node `start` to a node producing one of `targets` (value ids)."""
    users = graph.users()
    prev: dict[int, Node | None] = {id(graph.nodes[start]): None}
    queue = deque([graph.nodes[start]])
    while queue:
        node = queue.popleft()
        hit = next((id(v) for v in node.outputs if id(v) in targets), None)
        if hit is not None:
            path = []
            cur: Node | None = node
            while cur is not None:
                path.append(cur)
                cur = prev[id(cur)]
            return path[::-1], hit
        for v in node.outputs:
            for u in users.get(id(v), []):
                if id(u) not in prev:
                    prev[id(u)] = node
                    queue.append(u)
    return [], None


def analyze(graph: Graph, batch_axes: Mapping[str, int | None] | None = None,
            sample_ids: str | None = None) -> IsolationReport:
    """The isolation verdict of `graph`.

    `batch_axes` maps input names to the axis carrying the sample index (None: the input is
    shared by all samples); by default it is the axis whose dim is the symbol "batch".
    `sample_ids` names an input holding each position's sample id when several samples are
    packed along one axis (continuous batching); the sample axes are then of varying length.
    """
    start = time.perf_counter()
    if sample_ids is not None and sample_ids not in {v.name for v in graph.inputs}:
        raise ValueError(f"sample_ids {sample_ids!r} is not an input of {graph.name}")
    seeds = input_states(graph, batch_axes, sample_ids)
    states: dict[int, BatchState] = {id(v): seeds[v.name] for v in graph.inputs}
    states.update({id(v): BatchState() for v in graph.params.values()})
    perm_origin: dict[str, Taint] = {}
    for i, node in enumerate(graph.nodes):
        ins = tuple(states[id(v)] for v in node.inputs)
        value = node.outputs[0].name
        flow = _flow(node, ins, f"%{value}")
        inherited = frozenset().union(*(s.taints for s in ins),
                                      *(s.latent for k, s in enumerate(ins) if k not in flow.index_inputs))
        for v, out in zip(node.outputs, flow.outs):
            taints = set(inherited)
            for kind, reason in (("leak", out.mixes), ("unknown", out.unknown)):
                if reason:
                    taints.add(Taint(kind, node.op, node.loc, value, reason, i))
            latent: frozenset[Taint] = frozenset()
            if out.role == PERM:
                own = {Taint("leak", node.op, node.loc, value, out.latent, i)} if out.latent else set()
                latent = frozenset(own).union(*(ins[k].latent for k in flow.index_inputs if ins[k].role == PERM))
                for t in own:
                    perm_origin[out.perm] = perm_origin[inverse(out.perm)] = t
            states[id(v)] = BatchState(out.axes, frozenset(taints), out.role, out.perm, latent)

    reaching: dict[Taint, list[str]] = {}
    for v in graph.outputs:
        s = states[id(v)]
        taints = set(s.taints) | (set(s.latent) if s.role == PERM else set())
        for b in s.axes:
            if b.moved:
                origin = perm_origin.get(b.moved)
                taints.add(replace(origin, reason="the output's rows stay in the order of this batch-wide sort "
                                                  "(never put back in sample order), so a row's position depends on "
                                                  "the other samples") if origin else
                           Taint("unknown", "", "", v.name, "rows in an order of unknown origin", -1))
        for t in taints:
            reaching.setdefault(t, []).append(v.name)

    findings = []
    for t, outs in sorted(reaching.items(), key=lambda kv: (kv[0].kind != "leak", kv[0].node, kv[0].reason)):
        chain: list[str] = []
        if t.node >= 0:
            targets = {id(v) for v in graph.outputs if v.name in outs}
            path, _ = _chain(graph, t.node, targets)
            chain = [f"{n.op}@{n.loc or '?'}" for n in path]
        findings.append(Finding(t.kind, t.op, t.loc, t.value, t.reason, outs, chain))
    if not any(s.axes for s in seeds.values()):
        findings.append(Finding("unknown", "", "", "", f"no input has a batch axis (name one dim {BATCH_SYMBOL!r} or "
                                                      "pass batch_axes)", [], []))
    kinds = {f.kind for f in findings}
    verdict = "leaks" if "leak" in kinds else "unknown" if kinds else "isolated"
    names = {id(v): v.name for v in graph.values()}
    return IsolationReport(
        verdict, findings,
        inputs={v.name: describe_axes(seeds[v.name]) + (" (sample ids)" if v.name == sample_ids else "")
                for v in graph.inputs},
        outputs={v.name: describe_axes(states[id(v)]) for v in graph.outputs},
        sample_ids=sample_ids, seconds=time.perf_counter() - start,
        states={names[k]: s for k, s in states.items() if k in names})


def input_axes_of(shapes: Mapping[str, Sequence[Any]]) -> dict[str, int | None]:
    """The batch axis of each tensor of a signature: where its dim is the symbol "batch"."""
    return {n: next((a for a, d in enumerate(s) if d == BATCH_SYMBOL), None) for n, s in shapes.items()}
