"""Evidence for the isolation verdict, by running the model: two lines, both dynamic.

- The witness of a leak: two batches that differ only in sample j, run through the IR
  interpreter; sample i's output changes. It is tried with a few perturbations of sample j
  (scaled up, made a copy of sample i so the two compete for the same experts, redrawn)
  in both orders of (i, j), and the first that shows the leak is reported with its numbers.
- The differential check of a compiled artifact: replace one sample, compare every other
  sample's outputs bit for bit (catches a backend that batches samples into one kernel
  unsafely, which the IR-level proof cannot see).

Neither is a proof of isolation: that is the static analysis (`mocompile.isolation`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mocompile.ir.batch_flow import BatchAxis
from mocompile.ir.graph import Graph
from mocompile.ir.interpreter import bind_inputs, run
from mocompile.ir.types import eval_dim
from mocompile.isolation import RELATIVE_ROUNDING, IsolationReport
PERTURBATIONS = ("scale", "copy", "random")

Selector = tuple[Any, ...]


def sample_selector(shape: Sequence[int], b: BatchAxis, sample: int, env: Mapping[str, int],
                    labels: np.ndarray | None) -> Selector | None:
    """numpy index of one sample's positions along its batch axis (None: cannot tell)."""
    if b.rows is None:
        if labels is None or labels.shape[0] != shape[b.axis]:
            return None
        pick: Any = labels == sample
    else:
        r = eval_dim(b.rows, env)
        pick = slice(sample * r, (sample + 1) * r)
    return (slice(None),) * b.axis + (pick,)


def max_change(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b|, with equal non-finite values counting as no change."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a64 - b64))
    return float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0


def perturb(a: np.ndarray, sel_j: Selector, sel_i: Selector, kind: str, rng: np.random.Generator,
            high: int | None) -> tuple[np.ndarray, str] | None:
    """Sample j of `a` changed by `kind`; None if this kind does not apply."""
    out = a.copy()
    part = a[sel_j]
    if kind == "copy":
        if a[sel_i].shape != part.shape:
            return None
        out[sel_j] = a[sel_i]
        return out, "made a copy of sample {i}"
    if a.dtype == bool:
        out[sel_j] = ~part
        return out, "flipped"
    if a.dtype.kind in "iu":
        top = high or max(2, int(a.max()) + 1)
        out[sel_j] = rng.integers(0, top, size=part.shape).astype(a.dtype)
        return out, "redrawn"
    if kind == "scale":
        out[sel_j] = part * 100 + (part == 0)
        return out, "scaled by 100"
    out[sel_j] = (3 * rng.standard_normal(part.shape)).astype(a.dtype)
    return out, "redrawn"


def _batch_size(report: IsolationReport, inputs: Mapping[str, np.ndarray], labels: np.ndarray | None) -> list[int]:
    if labels is not None:
        return sorted(int(s) for s in np.unique(labels))
    for name, a in inputs.items():
        state = report.states.get(name)
        if state is not None and state.axes:
            return list(range(a.shape[state.axes[0].axis]))
    return []


def _changed_inputs(report: IsolationReport, inputs: Mapping[str, np.ndarray], i: int, j: int, kind: str,
                    env: Mapping[str, int], labels: np.ndarray | None, rng: np.random.Generator,
                    int_high: Mapping[str, int]) -> tuple[dict[str, np.ndarray], str] | None:
    out, how = dict(inputs), []
    for name, a in inputs.items():
        state = report.states.get(name)
        if name == report.sample_ids or state is None or not state.axes:
            continue
        sel_j = sample_selector(a.shape, state.axes[0], j, env, labels)
        sel_i = sample_selector(a.shape, state.axes[0], i, env, labels)
        if sel_j is None or sel_i is None:
            return None
        changed = perturb(a, sel_j, sel_i, kind, rng, int_high.get(name))
        if changed is None:
            return None
        out[name] = changed[0]
        how.append(f"{name} {changed[1].format(i=i)}")
    return (out, f"only sample {j} changed ({', '.join(how)})") if how else None


def _sample_change(report: IsolationReport, name: str, base: np.ndarray, new: np.ndarray, i: int,
                   env: Mapping[str, int], labels: np.ndarray | None) -> tuple[float, float]:
    """(max change, scale) of sample i's part of a value (the whole value if it has no batch axis)."""
    state = report.states.get(name)
    sel = sample_selector(base.shape, state.axes[0], i, env, labels) if state and state.axes else None
    a, b = (base, new) if sel is None else (base[sel], new[sel])
    finite = np.abs(a[np.isfinite(a)]) if a.size else np.zeros(0)
    return max_change(a, b), float(finite.max()) if finite.size else 0.0


def find_witness(graph: Graph, report: IsolationReport, inputs: Mapping[str, np.ndarray], seed: int = 0,
                 int_high: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Run the interpreter on batches that differ only in sample j until sample i's output
    changes; record the numbers in `report.witness` (and per leak, the change right at its op)."""
    env = bind_inputs(graph, inputs)
    labels = np.asarray(inputs[report.sample_ids]).reshape(-1) if report.sample_ids else None
    samples = _batch_size(report, inputs, labels)
    if len(samples) < 2:
        report.witness = {"changed": False, "note": "needs a batch of at least 2 samples"}
        return report.witness
    by_name = {v.name: v for v in graph.values()}
    watch = [by_name[f.value] for f in report.leaks if f.value in by_name]
    with np.errstate(all="ignore"):  # perturbed samples may overflow; that is not the point
        base = run(graph, inputs, watch)
    rng = np.random.default_rng(seed)
    best: dict[str, Any] = {"changed": False, "max_change": 0.0, "note": "tried every perturbation"}
    for i, j in ((samples[-1], samples[0]), (samples[0], samples[-1])):
        for kind in PERTURBATIONS:
            trial = _changed_inputs(report, inputs, i, j, kind, env, labels, rng, int_high or {})
            if trial is None:
                continue
            with np.errstate(all="ignore"):
                new = run(graph, trial[0], watch)
            for out in graph.outputs:
                change, scale = _sample_change(report, out.name, base[out.name], new[out.name], i, env, labels)
                if change > best["max_change"] or not best.get("perturbation"):
                    best = {"changed": change > RELATIVE_ROUNDING * max(scale, 1e-30), "perturbed_sample": j,
                            "observed_sample": i, "perturbation": trial[1], "output": out.name,
                            "max_change": change, "relative_change": change / max(scale, 1e-30)}
            if best["changed"]:
                for f in report.leaks:
                    if f.value in base:
                        change, _ = _sample_change(report, f.value, base[f.value], new[f.value], i, env, labels)
                        f.witness = {"observed_sample": i, "max_change": change}
                report.witness = best
                return best
    report.witness = best
    return best


def differential_check(run_fn: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
                       inputs: Mapping[str, np.ndarray], input_axes: Mapping[str, int | None],
                       output_axes: Mapping[str, int | None], perturbed: int = 0, seed: int = 0,
                       int_high: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Replace sample `perturbed` of every batched input and compare every other sample's
    outputs bit for bit (for a compiled artifact; `run_fn` maps inputs to outputs)."""
    rng = np.random.default_rng(seed)
    changed = dict(inputs)
    batch = next(a.shape[input_axes[n]] for n, a in inputs.items() if input_axes.get(n) is not None)
    for name, a in inputs.items():
        axis = input_axes.get(name)
        if axis is not None:
            sel = sample_selector(a.shape, BatchAxis(axis), perturbed, {}, None)
            changed[name] = perturb(a, sel, sel, "random", rng, (int_high or {}).get(name))[0]
    base, new = run_fn(dict(inputs)), run_fn(changed)
    others = [s for s in range(batch) if s != perturbed]
    diffs, scale = {}, 0.0
    for name, a in base.items():
        axis = output_axes.get(name)
        if axis is None:
            continue
        keep = np.take(a, others, axis=axis), np.take(new[name], others, axis=axis)
        diffs[name] = max_change(*keep)
        finite = np.abs(keep[0][np.isfinite(keep[0])])
        scale = max(scale, float(finite.max()) if finite.size else 0.0)
    worst = max(diffs.values(), default=0.0)
    return {"perturbed_sample": perturbed, "compared_samples": others, "outputs": diffs,
            "bitwise_identical": all(d == 0.0 for d in diffs.values()) and bool(diffs),
            "max_abs_diff": worst, "relative_diff": worst / max(scale, 1e-30)}
