"""The isolation check of a compiled artifact: the verdict recorded at compile time, and a
differential run of the compiled code (`mocompile check-isolation ARTIFACT_DIR`).

The differential run replaces one sample of a batch at a time and compares every other
sample's outputs bit for bit, through `art.run` and, for an artifact that decodes, through
its KV-cached steps. Which replacements are run depends on the recorded verdict:

- leaks: the point is to show the leak in the compiled code, so the witness recorded at
  compile time goes first (its perturbation, its perturbed sample), then every sample with
  each kind of witness perturbation (copies of its neighbours, scaled, a few redraws) until
  one changes another sample. A single random redraw is not enough: a batch-wide statistic
  (a per-tensor max) only moves when the sample holding it changes. When none shows it,
  the report says so and lists what was tried; it never reads as plain "identical".
- isolated (or unknown): every planned replacement must leave the other samples bit for bit
  identical (a backend that batches samples into one kernel unsafely shows here).

Either way the runs are bounded: at batch 3, about a dozen to twenty artifact calls per
path (forward, cached steps).
"""

from __future__ import annotations

from typing import Any, Mapping

from mocompile.errors import MocompileError
from mocompile.isolation import Finding, IsolationReport, input_axes_of
from mocompile.runtime import LoadedArtifact, random_inputs
from mocompile.witness import PERTURBATIONS, Replacement, differential_search, is_integer_batch

LEAK_DRAWS = 3  # redraws of each sample when hunting a leak's witness in the compiled code
ISOLATED_DRAWS = 1
MAX_REPLACEMENTS = 40  # per differential run, whatever the batch size


def recorded_report(manifest: Mapping[str, Any]) -> IsolationReport:
    """The isolation report the compile recorded, or an "unknown" one for an artifact without it."""
    recorded = manifest.get("isolation")
    if recorded:
        return IsolationReport.from_json(recorded)
    return IsolationReport("unknown", [Finding("unknown", "", "", "", "the artifact records no isolation verdict",
                                               [], [])], {}, {})


def witness_replacement(witness: Mapping[str, Any] | None, batch: int) -> Replacement | None:
    """The compile-time witness as a replacement at this batch size: the same sample changed
    the same way (a copy of the sample it was observed on), or None when there is no shown
    witness or its samples do not exist in this batch. Manifests written before the witness
    recorded its `kind` name it only in words, which are read back here."""
    if not witness or not witness.get("changed"):
        return None
    j, i = witness.get("perturbed_sample"), witness.get("observed_sample")
    if not isinstance(j, int) or not isinstance(i, int) or not (0 <= j < batch and 0 <= i < batch):
        return None
    kind = witness.get("kind")
    if kind not in PERTURBATIONS:
        words = str(witness.get("perturbation", ""))
        kind = "copy" if "copy of" in words else "scale" if "scaled" in words else "random"
    return Replacement(j, kind, source=i if kind == "copy" else None)


def replacement_plan(batch: int, integer: bool, leaks: bool,
                     witness: Mapping[str, Any] | None = None) -> list[Replacement]:
    """The replacements a differential run tries, in order, without repeats.

    Every sample in turn, as a copy of each of its (up to two) neighbours, scaled (not for
    integer inputs, where scaling is a redraw), and redrawn; hunting a leak (`leaks`), the
    recorded witness's replacement first, then its kind of perturbation for every sample
    before the other kinds, and more redraws."""
    first = witness_replacement(witness, batch) if leaks else None
    kinds = [k for k in PERTURBATIONS if not (integer and k == "scale")]
    if first is not None and first.kind in kinds:
        kinds.remove(first.kind)
        kinds.insert(0, first.kind)
    plan: list[Replacement] = [first] if first is not None else []
    for kind in kinds:
        for s in range(batch):
            if kind == "copy":
                sources = sorted({x % batch for x in (s - 1, s + 1)} - {s})
                candidates = [Replacement(s, "copy", source=src) for src in sources]
            elif kind == "random":
                candidates = [Replacement(s, "random", draw=d) for d in range(LEAK_DRAWS if leaks else ISOLATED_DRAWS)]
            else:
                candidates = [Replacement(s, kind)]
            plan.extend(r for r in candidates if r not in plan)
    return plan[:MAX_REPLACEMENTS]


def check_artifact(art: LoadedArtifact, batch: int = 3, seq: int = 8, seed: int = 0) -> IsolationReport:
    """The recorded isolation report of `art` with `differential` filled in by running it.

    `differential` is the forward's run (`witness.differential_search`'s result, plus
    `inputs`, a description of the random inputs it started from); for an artifact that
    decodes, `differential["cached_step"]` is the same through the KV cache (a prefill of
    seq - 3 tokens, then one token at a time), with its `prompt`. Each has
    `bitwise_identical`: True when every replacement left every other sample bit for bit
    identical; a caller accepts the artifact only when that holds for both and the recorded
    verdict is "isolated". A run the artifact refuses (ValueError) is a MocompileError."""
    if batch < 2:
        raise MocompileError(f"--batch must be at least 2 to compare samples (got {batch})")
    report = recorded_report(art.manifest)
    sig = art.signature
    inputs = random_inputs(sig, batch, seq, seed)
    input_axes = input_axes_of({t.name: t.shape for t in sig.inputs})
    output_axes = input_axes_of({t.name: t.shape for t in sig.outputs})
    high = {t.name: t.high for t in sig.inputs if t.high}
    plan = replacement_plan(batch, is_integer_batch(inputs, input_axes), report.verdict == "leaks", report.witness)
    described = f"random inputs (batch {batch}, seq {seq}, seed {seed})"
    try:
        report.differential = {**differential_search(art.run, inputs, input_axes, output_axes, plan, seed, high),
                               "inputs": described}
        if art.can_decode:  # the same through the KV cache: prefill, then the last positions one at a time
            prompt = max(1, seq - 3)
            step = differential_search(lambda x: art.run_cached(x, prompt), inputs, input_axes, output_axes, plan,
                                       seed, high)
            report.differential["cached_step"] = {"prompt": prompt, **step, "inputs": described}
    except ValueError as e:
        raise MocompileError(f"{getattr(art, 'path', 'artifact')}: {e}") from None
    return report
