"""The differential witness of the ATen path: run the exported program on batches that differ
only in sample j, and watch sample i's outputs (and each leaking op's output) change.

It is the search of `mocompile.witness.find_witness` (same perturbations: sample j scaled,
made a copy of sample i, redrawn; both orders of (i, j)) with the exported program as the
model, run by torch.fx's interpreter so that the output of any node can be read. It also
runs where the static verdict is "unknown": an op without a rule that really mixes samples
then shows as a leak with its numbers. Random ops are seeded identically for every run.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.fx

from mocompile.aten.analysis import Analysis
from mocompile.aten.shapes import dims_of
from mocompile.aten.state import Axis, State
from mocompile.isolation import Finding, IsolationReport
from mocompile.witness import PERTURBATIONS, max_change, perturb, score_trial


class ProgramRunner:
    """Runs an exported program's graph on user inputs, keeping the values of chosen nodes."""

    def __init__(self, program: Any, seed: int = 0) -> None:
        from torch.export.graph_signature import InputKind

        self.program, self.seed = program, seed
        self.lifted: list[Any] = []  # per placeholder: a parameter, buffer or constant, or None for a user input
        for spec in program.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                self.lifted.append(None)
            elif spec.target in program.constants:
                self.lifted.append(program.constants[spec.target])
            else:
                self.lifted.append(program.state_dict[spec.target])

    def run(self, inputs: Sequence[torch.Tensor], watch: Sequence[torch.fx.Node] = ()) -> dict[torch.fx.Node, Any]:
        """Every watched node's value (outputs included when watched)."""
        it = iter(inputs)
        args = [next(it) if v is None else v for v in self.lifted]
        interp = torch.fx.Interpreter(self.program.graph_module, garbage_collect_values=False)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            interp.run(*args)
        return {n: interp.env[n] for n in watch if n in interp.env}


def positions(size: int, b: Any, sample: int, labels: np.ndarray | None) -> np.ndarray | None:
    """Which positions along an axis of `size` (layout b: rows, outer) belong to `sample`."""
    rows, outer = b.rows, getattr(b, "outer", 1)
    n = size // max(rows * outer, 1)
    owner = (np.arange(size) // rows) % max(n, 1)
    if labels is None:
        return owner == sample
    if labels.shape[0] != n:
        return None
    return labels[owner] == sample


def observed_axis(analysis: Analysis, node: torch.fx.Node) -> Axis | None:
    """The axis of a node's output that holds the samples, for watching it: the one its state
    names, else (after an op without a rule) the first whose symbolic size is a multiple of
    the batch; None: the whole value is watched."""
    s = analysis.states.get(node)
    s = s[0] if isinstance(s, tuple) and s else s
    plain = [b for b in (s.axes if isinstance(s, State) else ()) if not b.moved]
    if plain:
        return plain[0]
    val = node.meta.get("val")
    dims = dims_of(val[0] if isinstance(val, (tuple, list)) and val else val)
    layout = next(((a, analysis.batch.layout(d)) for a, d in enumerate(dims) if analysis.batch.layout(d)), None)
    return Axis(layout[0], layout[1][0]) if layout and not analysis.batch.fixed else None


def part(value: Any, b: Axis | None, sample: int, labels: np.ndarray | None) -> np.ndarray:
    """Sample `sample`'s part of a value along axis b (the whole value for None)."""
    a = value.detach().to(torch.float64).numpy() if isinstance(value, torch.Tensor) else np.asarray(value, float)
    if b is None or a.ndim <= b.axis:
        return a
    pick = positions(a.shape[b.axis], b, sample, labels)
    return a if pick is None else np.compress(pick, a, axis=b.axis)


def _tensor_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype).numpy()


def _perturbed(analysis: Analysis, inputs: Sequence[torch.Tensor], names: Sequence[str], i: int, j: int, kind: str,
               labels: np.ndarray | None, rng: np.random.Generator,
               sample_ids: str | None) -> tuple[list[torch.Tensor], str] | None:
    out, how = list(inputs), []
    for k, (name, t) in enumerate(zip(names, inputs)):
        state = analysis.report.states.get(analysis.inputs[k].name)
        if name == sample_ids or state is None or not state.axes:
            continue
        b = state.axes[0]
        a = _tensor_numpy(t)
        pick_j, pick_i = positions(a.shape[b.axis], b, j, labels), positions(a.shape[b.axis], b, i, labels)
        if pick_j is None or pick_i is None:
            return None
        sel_j, sel_i = (slice(None),) * b.axis + (pick_j,), (slice(None),) * b.axis + (pick_i,)
        changed = perturb(a, sel_j, sel_i, kind, rng, None)
        if changed is None:
            return None
        out[k] = torch.from_numpy(np.ascontiguousarray(changed[0])).to(t.dtype)
        how.append(f"{name} {changed[1].format(i=i)}")
    return (out, f"only sample {j} changed ({', '.join(how)})") if how else None


def _samples(analysis: Analysis, inputs: Sequence[torch.Tensor], labels: np.ndarray | None) -> list[int]:
    if labels is not None:
        return sorted(int(s) for s in np.unique(labels))
    for node, t in zip(analysis.inputs, inputs):
        s = analysis.report.states.get(node.name)
        if s is not None and s.axes:
            return list(range(int(t.shape[s.axes[0].axis])))
    return []


def _change(base: Any, new: Any, axis: Axis | None, i: int, labels: np.ndarray | None) -> tuple[float, float]:
    a, b = part(base, axis, i, labels), part(new, axis, i, labels)
    if a.shape != b.shape:
        return float("inf"), 1.0
    finite = np.abs(a[np.isfinite(a)])
    return max_change(a, b), float(finite.max()) if finite.size else 0.0


def find_witness(analysis: Analysis, runner: ProgramRunner, inputs: Sequence[torch.Tensor], names: Sequence[str],
                 sample_ids: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Perturb sample j until sample i's output changes; the numbers go to `report.witness`
    and, per leak, to the finding (the change right at its op's output)."""
    report: IsolationReport = analysis.report
    labels = _tensor_numpy(inputs[list(names).index(sample_ids)]).reshape(-1) if sample_ids else None
    samples = _samples(analysis, inputs, labels)
    if len(samples) < 2:
        report.witness = {"changed": False, "note": "needs a batch of at least 2 samples"}
        return report.witness
    by_name = {n.name: n for n in analysis.states}
    leaks = [f for f in report.leaks if f.value in by_name]
    watch = list(analysis.outputs) + [by_name[f.value] for f in leaks]
    try:
        base = runner.run(inputs, watch)
    except Exception as e:  # the program cannot run here (a kernel missing on CPU): no witness, still a verdict
        report.witness = {"changed": False, "note": f"the exported program did not run: {type(e).__name__}: {e}"}
        return report.witness
    rng = np.random.default_rng(seed)
    best: dict[str, Any] = {"changed": False, "max_change": 0.0}
    pending, tried = list(leaks), []
    for i, j in ((samples[-1], samples[0]), (samples[0], samples[-1])):
        for kind in PERTURBATIONS:
            trial = _perturbed(analysis, inputs, names, i, j, kind, labels, rng, sample_ids)
            if trial is None:
                continue
            try:
                new = runner.run(trial[0], watch)
            except Exception as e:  # a perturbation the program rejects (an index out of range) shows nothing
                tried.append(f"{trial[1]}: the run failed ({type(e).__name__})")
                continue
            tried.append(trial[1])

            def change_at(node: Any) -> tuple[float, float] | None:
                if node not in base or node not in new:
                    return None
                return _change(_first(base[node]), _first(new[node]), observed_axis(analysis, node), i, labels)

            best = score_trial(best, pending, [(out.name, out) for out in analysis.outputs],
                               lambda f: by_name[f.value], change_at, i, j, trial[1], kind)
            if best["changed"] and not pending:
                break
        if best["changed"] and not pending:
            break
    if not best["changed"]:
        best["note"] = "tried: " + "; ".join(tried) if tried else "no perturbation applies to these inputs"
    report.witness = best
    return best


def _first(value: Any) -> Any:
    """A node's first tensor output (sort gives values and indices)."""
    return value[0] if isinstance(value, (tuple, list)) else value


def shown_leak(report: IsolationReport) -> None:
    """An "unknown" verdict whose witness changed another sample: a leak through an op the
    analysis could not tell; the unknown op that reaches that output becomes the leak."""
    w = report.witness or {}
    if report.verdict != "unknown" or not w.get("changed"):
        return
    reaching = [f for f in report.unknowns if w["output"] in f.outputs]
    shown = (f"the differential run shows samples mixing: {w['perturbation']} changed sample "
             f"{w['observed_sample']}'s {w['output']} by {w['max_change']:.3g}")
    if len(reaching) == 1:
        f = reaching[0]
        f.kind, f.reason = "leak", f"{f.reason}; {shown}"
        f.witness = {k: w[k] for k in ("observed_sample", "perturbed_sample", "perturbation", "changed",
                                        "max_change", "relative_change")}
    else:
        ops = ", ".join(sorted({f.op for f in reaching if f.op})) or "?"
        report.findings.insert(0, Finding("leak", "", "", "", f"{shown}, through one of the ops the analysis "
                                                              f"could not tell ({ops})", [w["output"]], []))
    report.verdict = "leaks"
