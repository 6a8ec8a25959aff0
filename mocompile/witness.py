"""Evidence for the isolation verdict, by running the model: two lines, both dynamic.

- The witness of a leak: two batches that differ only in sample j, run through the IR
  interpreter; sample i's output changes. It is tried with a few perturbations of sample j
  (scaled up, made a copy of sample i so the two compete for the same experts, redrawn)
  in both orders of (i, j), and the first that shows the leak is reported with its numbers.
- The differential check of a compiled artifact: replace one sample at a time (the same
  kinds of perturbation, planned by `mocompile.artifact_isolation`), compare every other
  sample's outputs bit for bit (shows a proven leak in the compiled code, and catches a
  backend that batches samples into one kernel unsafely, which the IR-level proof cannot see).

Neither is a proof of isolation: that is the static analysis (`mocompile.isolation`).
"""

from __future__ import annotations

from dataclasses import dataclass
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


Change = Callable[[Any], "tuple[float, float] | None"]


def score_trial(best: dict[str, Any], pending: list[Any], outputs: Sequence[tuple[str, Any]],
                key_of: Callable[[Any], Any], change_at: Change, i: int, j: int, perturbation: str,
                kind: str) -> dict[str, Any]:
    """One trial of a witness search (sample j perturbed, sample i watched), scored: the
    search's best output change (until one shows the leak), and each pending leak finding's
    change right at its op (a finding leaves `pending` once its op moved, or when its value
    was not observed: `change_at` None). `outputs` are (name, key) pairs, `key_of(finding)`
    the key of a finding's value; `change_at(key)` gives sample i's (max change, scale)."""
    if not best["changed"]:
        for name, key in outputs:
            change, scale = change_at(key)
            if change > best["max_change"] or not best.get("perturbation"):
                best = {"changed": change > RELATIVE_ROUNDING * max(scale, 1e-30), "perturbed_sample": j,
                        "observed_sample": i, "perturbation": perturbation, "kind": kind, "output": name,
                        "max_change": change, "relative_change": change / max(scale, 1e-30)}
    for f in list(pending):
        measured = change_at(key_of(f))
        if measured is None:
            pending.remove(f)
            continue
        change, scale = measured
        changed = change > RELATIVE_ROUNDING * max(scale, 1e-30)
        if changed or f.witness is None or change > f.witness["max_change"]:
            f.witness = {"observed_sample": i, "perturbed_sample": j, "perturbation": perturbation,
                         "changed": changed, "max_change": change, "relative_change": change / max(scale, 1e-30)}
        if changed:
            pending.remove(f)
    return best


def find_witness(graph: Graph, report: IsolationReport, inputs: Mapping[str, np.ndarray], seed: int = 0,
                 int_high: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Run the interpreter on batches that differ only in sample j until sample i's output
    changes; record the numbers in `report.witness` (and per leak, the change right at its op).

    A leak's own op may not move under the perturbation that shows the output change (a
    batch-wide max stays put when the sample holding it is not the one changed), so the
    remaining perturbations keep running until every leak's op has changed or all were
    tried; a leak whose op never changed records `changed: False` rather than a bare 0."""
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
    best: dict[str, Any] = {"changed": False, "max_change": 0.0}
    pending = [f for f in report.leaks if f.value in base]  # leaks whose op has not changed yet
    tried: list[str] = []
    for i, j in ((samples[-1], samples[0]), (samples[0], samples[-1])):
        for kind in PERTURBATIONS:
            trial = _changed_inputs(report, inputs, i, j, kind, env, labels, rng, int_high or {})
            if trial is None:
                continue
            tried.append(trial[1])
            with np.errstate(all="ignore"):
                new = run(graph, trial[0], watch)
            best = score_trial(best, pending, [(out.name, out.name) for out in graph.outputs], lambda f: f.value,
                               lambda name: _sample_change(report, name, base[name], new[name], i, env, labels),
                               i, j, trial[1], kind)
            if best["changed"] and not pending:
                break
        if best["changed"] and not pending:
            break
    if not best["changed"]:
        best["note"] = "tried: " + "; ".join(tried) if tried else "no perturbation applies to these inputs"
    report.witness = best
    return best


@dataclass(frozen=True)
class Replacement:
    """One sample of a batch changed, every other sample left alone: `kind` is one of
    PERTURBATIONS; a copy takes the rows of sample `source` (so the two compete for the same
    experts and batch-wide statistics); `draw` tells redraws of the same sample apart."""

    sample: int
    kind: str
    source: int | None = None
    draw: int = 0

    def label(self, integer: bool) -> str:
        """For a list of what was tried: "sample 0 scaled", "sample 0 copied from 1"."""
        if self.kind == "copy":
            return f"sample {self.sample} copied from {self.source}"
        if self.kind == "scale" and not integer:
            return f"sample {self.sample} scaled"
        return f"sample {self.sample} redrawn" + (f" (draw {self.draw + 1})" if self.draw else "")

    def phrase(self, integer: bool) -> str:
        """What sample `sample` became: "copy of sample 0", "scaled by 100", "redrawn"."""
        if self.kind == "copy":
            return f"copy of sample {self.source}"
        return "scaled by 100" if self.kind == "scale" and not integer else "redrawn"


def is_integer_batch(inputs: Mapping[str, np.ndarray], input_axes: Mapping[str, int | None]) -> bool:
    """Whether every batched input is integer or boolean (token ids): "scale" then redraws, like "random"."""
    batched = [a for n, a in inputs.items() if input_axes.get(n) is not None]
    return bool(batched) and all(np.asarray(a).dtype.kind in "biu" for a in batched)


def replace_sample(inputs: Mapping[str, np.ndarray], input_axes: Mapping[str, int | None], r: Replacement,
                   seed: int = 0, int_high: Mapping[str, int] | None = None,
                   rng: np.random.Generator | None = None) -> dict[str, np.ndarray] | None:
    """`inputs` with sample `r.sample` of every batched input changed as `r` says (integer
    inputs stay in [0, high)); None when the replacement does not apply (a copy of rows of
    another length). Redraws come from `rng`, by default one seeded by `seed` and the
    replacement itself, so a plan's draws do not depend on what ran before them."""
    rng = rng or np.random.default_rng([seed, r.sample, r.draw, PERTURBATIONS.index(r.kind)])
    out = dict(inputs)
    for name, a in inputs.items():
        axis = input_axes.get(name)
        if axis is None:
            continue
        sel = sample_selector(a.shape, BatchAxis(axis), r.sample, {}, None)
        src = sel if r.source is None else sample_selector(a.shape, BatchAxis(axis), r.source, {}, None)
        changed = perturb(a, sel, src, r.kind, rng, (int_high or {}).get(name))
        if changed is None:
            return None
        out[name] = changed[0]
    return out


def compare_others(base: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray],
                   output_axes: Mapping[str, int | None], perturbed: int, batch: int) -> dict[str, Any]:
    """Every sample but `perturbed`, output by output, before and after: whether all are bit
    for bit identical, the largest change and which sample and output it is in."""
    others = [s for s in range(batch) if s != perturbed]
    diffs: dict[str, float] = {}
    scale, worst, where = 0.0, 0.0, (others[0] if others else None, None)
    for name, a in base.items():
        axis = output_axes.get(name)
        if axis is None:
            continue
        for s in others:
            before, after = np.take(a, s, axis=axis), np.take(new[name], s, axis=axis)
            change = max_change(before, after)
            diffs[name] = max(diffs.get(name, 0.0), change)
            if change > worst or where[1] is None:
                worst, where = max(worst, change), (s, name)
            finite = np.abs(before[np.isfinite(before)])
            scale = max(scale, float(finite.max()) if finite.size else 0.0)
    return {"perturbed_sample": perturbed, "compared_samples": others, "outputs": diffs,
            "bitwise_identical": all(d == 0.0 for d in diffs.values()) and bool(diffs),
            "max_abs_diff": worst, "relative_diff": worst / max(scale, 1e-30),
            "observed_sample": where[0], "output": where[1]}


def differential_search(run_fn: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
                        inputs: Mapping[str, np.ndarray], input_axes: Mapping[str, int | None],
                        output_axes: Mapping[str, int | None], plan: Sequence[Replacement], seed: int = 0,
                        int_high: Mapping[str, int] | None = None,
                        rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Run `inputs` once, then each replacement of `plan` in turn, until one changes another
    sample's outputs (a compiled artifact's leak shown, or a backend bug) or the plan is done.

    The result is the compare_others() entry of the replacement that changed something (the
    last one tried when none did), with `replacement` (its label), `phrase` (what the sample
    became) and `tried` (the labels of every replacement run, in order); `bitwise_identical`
    is True only when every replacement left every other sample bit for bit identical.
    `rng`, if given, draws every replacement's random values in turn (see replace_sample)."""
    batch = next(a.shape[input_axes[n]] for n, a in inputs.items() if input_axes.get(n) is not None)
    integer = is_integer_batch(inputs, input_axes)
    base = run_fn(dict(inputs))
    tried: list[str] = []
    result: dict[str, Any] = {"bitwise_identical": False, "outputs": {}, "max_abs_diff": 0.0, "relative_diff": 0.0}
    for r in plan:
        changed = replace_sample(inputs, input_axes, r, seed, int_high, rng)
        if changed is None:
            continue
        tried.append(r.label(integer))
        result = {**compare_others(base, run_fn(changed), output_axes, r.sample, batch),
                  "replacement": r.label(integer), "phrase": r.phrase(integer)}
        if not result["bitwise_identical"]:
            break
    return {**result, "tried": tried}


def differential_check(run_fn: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
                       inputs: Mapping[str, np.ndarray], input_axes: Mapping[str, int | None],
                       output_axes: Mapping[str, int | None], perturbed: int = 0, seed: int = 0,
                       int_high: Mapping[str, int] | None = None) -> dict[str, Any]:
    """One random replacement of sample `perturbed` (drawn from numpy's generator seeded by
    `seed`), every other sample's outputs compared bit for bit. A single random redraw can
    miss a leak (a batch-wide max held by another sample does not move); artifacts are
    checked with a targeted plan instead (`mocompile.artifact_isolation`)."""
    return differential_search(run_fn, inputs, input_axes, output_axes, [Replacement(perturbed, "random")],
                               seed, int_high, np.random.default_rng(seed))
