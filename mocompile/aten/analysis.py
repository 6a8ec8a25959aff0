"""The isolation analysis of an exported program: each fx node's abstract state from its
op's rule (`mocompile.aten.registry`), in graph order, and the report.

It is the abstract interpretation of `mocompile.isolation` run over an ATen graph instead of
the IR: the same verdicts ("isolated" a proof for every batch size, "leaks" with each mixing
point that reaches an output, "unknown" where an op has no rule or a rule cannot tell) and
the same `IsolationReport`, so the CLI and `format()` print it as they print the IR's. A
finding's location is the submodule that called the op (nn_module_stack) and the line of the
model's source (the node's stack trace).
"""

from __future__ import annotations

import operator
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.fx

from mocompile.aten.call import Call
from mocompile.aten.registry import op_name, rule_for
from mocompile.aten.shapes import Batch, dims_of
from mocompile.aten.state import LABEL, Axis, Flow, Out, State, Taint
from mocompile.isolation import Finding, IsolationReport

UNSORTED = ("the output's rows stay in the order of this batch-wide sort or selection (never put back in "
            "sample order), so a row's position depends on the other samples")


@dataclass
class Analysis:
    """The report and what the witness search needs to run and read the program."""

    report: IsolationReport
    states: dict[torch.fx.Node, Any]
    batch: Batch
    inputs: list[torch.fx.Node]  # user inputs, in forward order
    outputs: list[torch.fx.Node]  # user outputs


def _where(node: torch.fx.Node) -> tuple[str, str]:
    """(the submodule that called the op, "file.py:line" of the model's source)."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    return path, f"{frames[-1][0].rsplit('/', 1)[-1]}:{frames[-1][1]}" if frames else ""


def location(node: torch.fx.Node) -> str:
    """Where in the model the op was called: "submodule (file.py:line)"."""
    path, line = _where(node)
    return f"{path} ({line})" if path and line else path or line


def _short_location(node: torch.fx.Node) -> str:
    """For a chain: the submodule, or the source line at the model's top level."""
    path, line = _where(node)
    return path or line or "?"


def describe(s: State, packed: bool = False) -> str:
    """Which axes of a value carry the sample, in words (for the report's inputs and outputs)."""
    if not s.axes:
        return "none" if not s.taints else "none (mixed)"
    parts = []
    for b in s.axes:
        rows = "" if b.rows == 1 else f" ({b.rows} positions per sample)"
        outer = "" if getattr(b, "outer", 1) == 1 else f" (the batch {b.outer} times over)"
        parts.append(f"axis {b.axis}{' (packed)' if packed else ''}{rows}{outer}"
                     f"{' in batch-wide sorted order' if b.moved else ''}")
    return ", ".join(parts) + (" (a pair: entries of two different samples constant)" if s.is_pair else "")


def _flow(call: Call) -> Flow:
    fn = rule_for(call.node.target)
    n = len(call.outs)
    name = op_name(call.node.target)
    if fn is None:
        return Flow(tuple(Out(unknown=f"no batch-flow rule for {name}") for _ in range(max(n, 1))))
    try:
        flow = fn(call)
    except Exception as e:  # a rule that cannot handle its inputs must not pass for a proof
        return Flow(tuple(Out(unknown=f"the batch-flow rule of {name} failed: {type(e).__name__}: {e}")
                          for _ in range(max(n, 1))))
    if len(flow.outs) != n and not (n == 0 and len(flow.outs) <= 1):
        return Flow(tuple(Out(unknown=f"the batch-flow rule of {name} gave {len(flow.outs)} outputs, not {n}")
                          for _ in range(max(n, 1))))
    return flow


def _misplaced(out: Out, val: Any, batch: Batch) -> str:
    """A guard on every rule: each batch axis it names must have the size of the batch."""
    dims = dims_of(val)
    for b in out.axes:
        if b.axis >= len(dims) or (not b.moved and not batch.fits(dims[b.axis], b.rows, getattr(b, "outer", 1))):
            size = dims[b.axis] if b.axis < len(dims) else "none"
            return f"cannot tell where the batch axis went (the rule names axis {b.axis}, of size {size})"
    return ""


def _node_states(node: torch.fx.Node, call: Call, flow: Flow, states: Mapping[torch.fx.Node, Any], index: int,
                 batch: Batch) -> list[State]:
    inherited: set[Taint] = set()
    for name, a in call.args.items():
        for n in _nodes_in(a):
            s = states.get(n)
            for part in (s if isinstance(s, tuple) else (s,)):
                if isinstance(part, State):
                    inherited |= part.taints
                    if part.latent and not part.is_pair and name not in flow.structural:
                        inherited |= part.latent
    op, loc, value = op_name(node.target), location(node), node.name
    out = []
    for k, o in enumerate(flow.outs):
        unknown = o.unknown or (_misplaced(o, call.outs[k], batch) if k < len(call.outs) else "")
        taints = set(inherited)
        if o.mixes:
            taints.add(Taint("leak", op, loc, value, o.mixes, index))
        if unknown:
            taints.add(Taint("unknown", op, loc, value, unknown, index))
        taints |= o.taints
        latent = set(o.carried)
        if o.latent:
            latent.add(Taint("leak", op, loc, value, o.latent, index))
        axes = () if unknown else o.axes
        out.append(State(axes, frozenset(taints), o.role, o.perm, frozenset(latent), o.fill,
                         o.offblock if len(axes) == 2 else None, o.target, o.column))
    return out


def _nodes_in(a: Any) -> list[torch.fx.Node]:
    if isinstance(a, torch.fx.Node):
        return [a]
    if isinstance(a, (list, tuple)):
        return [n for x in a for n in _nodes_in(x)]
    return []


def _chain(start: torch.fx.Node, targets: set[torch.fx.Node]) -> list[torch.fx.Node]:
    """Shortest dataflow path from `start` to one of `targets`."""
    prev: dict[torch.fx.Node, torch.fx.Node | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node in targets:
            path: list[torch.fx.Node] = []
            cur: torch.fx.Node | None = node
            while cur is not None:
                path.append(cur)
                cur = prev[cur]
            return path[::-1]
        for u in node.users:
            if u not in prev and u.op != "output":
                prev[u] = node
                queue.append(u)
    return []


def propagate(nodes: list[torch.fx.Node], states: dict[torch.fx.Node, Any], batch: Batch,
              at: int | None = None) -> None:
    """Every node's state in graph order (placeholders already in `states` keep theirs). A
    subgraph (a torch.cond branch) is propagated with `at`, the index of the node that calls
    it, which is where its taints are traced to the outputs from."""
    for i, node in enumerate(nodes):
        if node.op != "call_function":
            states.setdefault(node, State())
        elif node.target is operator.getitem:
            src = states.get(node.args[0])
            states[node] = src[node.args[1]] if isinstance(src, tuple) else State(taints=getattr(src, "taints",
                                                                                               frozenset()))
        else:
            call = Call(node, states, batch, subgraph=lambda g, ins, k=(i if at is None else at): _subgraph(
                g, ins, batch, k))
            outs = _node_states(node, call, _flow(call), states, i if at is None else at, batch)
            multi = isinstance(node.meta.get("val"), (tuple, list))
            states[node] = tuple(outs) if multi else (outs[0] if outs else State())


def _subgraph(graph: torch.fx.Graph, inputs: list[State], batch: Batch, at: int) -> list[State]:
    """The states of a subgraph's outputs given its placeholders' states."""
    nodes = list(graph.nodes)
    states: dict[torch.fx.Node, Any] = dict(zip((n for n in nodes if n.op == "placeholder"), inputs))
    propagate(nodes, states, batch, at)
    out = next(n for n in nodes if n.op == "output").args[0]
    return [s if isinstance(s := states.get(a), State) else State() for a in (out if isinstance(out, (list, tuple))
                                                                           else [out])]


def analyze_program(program: Any, batch: Batch, input_axes: Mapping[str, int | None],
                    sample_ids: str | None = None) -> Analysis:
    """The verdict of an exported program (core ATen) whose user inputs are, in order, the
    forward arguments named in `input_axes` (each with its batch axis, or None)."""
    from torch.export.graph_signature import InputKind, OutputKind

    start = time.perf_counter()
    graph = program.graph
    sig = program.graph_signature
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    user = [n for n, spec in zip(placeholders, sig.input_specs) if spec.kind == InputKind.USER_INPUT]
    names = list(input_axes)
    states: dict[torch.fx.Node, Any] = {}
    seeds: dict[str, State] = {}
    for node, name in zip(user, names):
        axis = input_axes[name]
        seeds[name] = State() if axis is None else State((Axis(axis),), role=LABEL if name == sample_ids else "data")
        states[node] = seeds[name]
    nodes = list(graph.nodes)
    propagate(nodes, states, batch)
    out_node = next(n for n in nodes if n.op == "output")
    outputs = [n for n, spec in zip(out_node.args[0], sig.output_specs) if spec.kind == OutputKind.USER_OUTPUT]
    report = _report(nodes, states, outputs, seeds, batch, sample_ids, start)
    return Analysis(report, states, batch, user, outputs)


def _reaching(nodes: list[torch.fx.Node], states: Mapping[torch.fx.Node, Any],
              outputs: list[torch.fx.Node]) -> dict[Taint, list[str]]:
    """Every taint that reaches an output, with the outputs it reaches."""
    by_name = {n.name: (i, n) for i, n in enumerate(nodes)}
    reaching: dict[Taint, list[str]] = {}
    for v in outputs:
        s = states.get(v)
        if not isinstance(s, State):
            continue
        taints = set(s.taints) | set(s.latent)  # a latent mixing is real once it is an output's value
        for b in s.axes:
            if b.moved:
                i, origin = by_name.get(b.moved.removesuffix("^-1"), (-1, None))
                taints.add(Taint("leak", op_name(origin.target), location(origin), origin.name, UNSORTED, i)
                           if origin is not None else Taint("unknown", "", "", v.name, "rows in an order of "
                                                                                      "unknown origin", -1))
        for t in taints:
            reaching.setdefault(t, []).append(v.name)
    return reaching


def _report(nodes: list[torch.fx.Node], states: Mapping[torch.fx.Node, Any], outputs: list[torch.fx.Node],
            seeds: Mapping[str, State], batch: Batch, sample_ids: str | None, start: float) -> IsolationReport:
    findings = []
    reaching = _reaching(nodes, states, outputs)
    for t, outs in sorted(reaching.items(), key=lambda kv: (kv[0].kind != "leak", kv[0].node, kv[0].reason)):
        chain: list[str] = []
        if t.node >= 0:
            path = _chain(nodes[t.node], {v for v in outputs if v.name in outs})
            chain = [f"{op_name(n.target)}@{_short_location(n)}" for n in path]
        findings.append(Finding(t.kind, t.op, t.loc, t.value, t.reason, outs, chain))
    if not any(s.axes for s in seeds.values()):
        findings.append(Finding("unknown", "", "", "", "no input has a batch axis (pass batch_dim)", [], []))
    kinds = {f.kind for f in findings}
    verdict = "leaks" if "leak" in kinds else "unknown" if kinds else "isolated"
    fixed = f" (for batch size {batch.symbol} only: the model's code depends on the batch size)" if batch.fixed else ""
    inputs = {name: describe(s, batch.packed and name != sample_ids) + (" (sample ids)" if name == sample_ids else "")
              + (fixed if s.axes else "") for name, s in seeds.items()}
    out_states = {v.name: describe(states[v], batch.packed) if isinstance(states.get(v), State) else "none"
                  for v in outputs}
    flat = {n.name: s for n, s in states.items() if isinstance(s, State)}
    return IsolationReport(verdict, findings, inputs, out_states, sample_ids, time.perf_counter() - start,
                           states=flat)
