"""The differential run of `mocompile check-isolation ARTIFACT_DIR` (mocompile.artifact_isolation):
targeted replacements show a proven leak in the compiled code, every replacement is bit for
bit identical on an isolated artifact, and a leaky verdict without a witness in the compiled
code is never reported as "identical"; plus the per-leak witness text at compile time."""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np
import pytest

from conftest import EXAMPLE_SHAPE, EXAMPLES
from mocompile.artifact_isolation import MAX_REPLACEMENTS, check_artifact, replacement_plan, witness_replacement
from mocompile.compiler import compile
from mocompile.isolation import Finding, IsolationReport
from mocompile.runtime import LoadedArtifact
from mocompile.witness import Replacement

LEAKY_PASSES = "quantize(w=int8,a=int8,dynamic=tensor,allow_batch_leak=true)"
ZERO_CHANGE = re.compile(r"changed by 0(?![.\de])")  # "changed by 0", not "changed by 0.02"


@pytest.fixture(scope="module")
def leaky(tmp_path_factory) -> LoadedArtifact:
    """Per-tensor dynamic activation scales: the max |x| over the whole batch sets every sample's rounding."""
    return compile(EXAMPLES / "mixtral_tiny.moe", passes=LEAKY_PASSES,
                   out_dir=tmp_path_factory.mktemp("leaky") / "art")


@pytest.fixture(scope="module")
def isolated(artifact_cache) -> LoadedArtifact:
    return artifact_cache.load(EXAMPLES / "mixtral_tiny.moe", **EXAMPLE_SHAPE)


def counting(fn: Callable[..., Any], calls: list[int]) -> Callable[..., Any]:
    def wrapped(*args: Any) -> Any:
        calls[0] += 1
        return fn(*args)
    return wrapped


def per_sample(fn: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]) -> Callable[..., dict]:
    """`fn` run on each sample alone (batch 1) and the outputs stacked: the artifact made
    isolated in fact whatever its recorded verdict, so no replacement can change another sample."""
    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = next(iter(inputs.values())).shape[0]
        outs = [fn({k: v[b:b + 1] for k, v in inputs.items()}) for b in range(batch)]
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    return run


def differential_lines(report: IsolationReport) -> list[str]:
    return [line for line in report.format().splitlines() if line.lstrip().startswith("differential run")]


# ---- compiled artifacts ---------------------------------------------------------------------
def test_leaky_artifact_shows_the_leak_in_the_differential_run(leaky, monkeypatch) -> None:
    """One random redraw of sample 0 missed this leak (the batch-wide max is held by another
    sample); the targeted replacements, the recorded witness's first, show it."""
    calls = [0]
    monkeypatch.setattr(leaky, "run", counting(leaky.run, calls))
    report = check_artifact(leaky, batch=3, seq=8, seed=0)
    assert report.verdict == "leaks"
    d = report.differential
    assert not d["bitwise_identical"] and d["max_abs_diff"] > 0.1 and d["relative_diff"] > 1e-3
    assert d["observed_sample"] != d["perturbed_sample"] and d["output"] == "logits"
    first = witness_replacement(report.witness, 3)  # the compile-time witness, e.g. sample 0 made a copy of sample 1
    assert first is not None and d["tried"][0] == first.label(integer=True)
    assert calls[0] == 1 + len(d["tried"]) <= 1 + MAX_REPLACEMENTS
    (line,) = differential_lines(report)
    assert (f"differential run: replacing sample {d['perturbed_sample']} ({d['phrase']}) changes sample "
            f"{d['observed_sample']}'s logits by {d['max_abs_diff']:.3g}") in line
    assert "DIFFERENT" in line and "identical" not in line.split("(before it")[0]


def test_leaky_artifact_records_a_change_at_every_leak_op(leaky) -> None:
    """The compile-time witness keeps perturbing until each leak's own op moves: no leak reads "changed by 0"."""
    report = IsolationReport.from_json(leaky.manifest["isolation"])
    assert report.witness["changed"] and report.witness["kind"] in ("scale", "copy", "random")
    assert report.leaks and all(f.witness and f.witness["changed"] and f.witness["max_change"] > 0
                                for f in report.leaks)
    text = report.format()
    assert not ZERO_CHANGE.search(text) and text.count("at this op: sample") == len(report.leaks)


def test_isolated_artifact_every_targeted_replacement_is_identical(isolated, monkeypatch) -> None:
    calls = [0]
    monkeypatch.setattr(isolated, "run", counting(isolated.run, calls))
    monkeypatch.setattr(isolated, "run_cached", counting(isolated.run_cached, calls))
    report = check_artifact(isolated, batch=3, seq=8, seed=0)
    assert report.verdict == "isolated" and isolated.can_decode
    runs = [report.differential, report.differential["cached_step"]]
    assert all(d["bitwise_identical"] and d["max_abs_diff"] == 0.0 for d in runs)
    expected = {f"sample {s} copied from {o}" for s in range(3) for o in range(3) if o != s}
    expected |= {f"sample {s} redrawn" for s in range(3)}  # token ids: scaling is a redraw, so it is not repeated
    assert all(set(d["tried"]) == expected for d in runs)
    assert calls[0] == 2 * (1 + len(expected)) <= 2 * (1 + MAX_REPLACEMENTS)
    lines = differential_lines(report)
    assert len(lines) == 2 and all("every replacement left the other samples bit for bit identical (tried on "
                                   "random inputs (batch 3, seq 8, seed 0): sample 0 copied from 1, sample 0 "
                                   "copied from 2," in line for line in lines)


def test_leak_without_a_witness_in_the_compiled_code_is_never_plain_identical(leaky, monkeypatch) -> None:
    """The recorded verdict says leaks, but the run (each sample alone) cannot show it: the
    text says no replacement changed another sample, lists them, and names the inputs."""
    monkeypatch.setattr(leaky, "run", per_sample(leaky.run))
    report = check_artifact(leaky, batch=3, seq=8, seed=0)
    d = report.differential
    assert report.verdict == "leaks" and d["bitwise_identical"]  # the CLI still exits 3 on the verdict
    assert len(d["tried"]) == len(set(d["tried"])) >= 3 * 3  # every sample: two copies and redraws at least
    (line,) = differential_lines(report)
    assert line.strip().startswith("differential run: no replacement changed another sample (tried on random "
                                   "inputs (batch 3, seq 8, seed 0): sample 0 copied from 1, ")
    assert "although the static analysis found a leak" in line and "identical" not in line
    assert all(t in line for t in d["tried"])


# ---- plan and texts, without compiling ------------------------------------------------------
def test_replacement_plan_is_bounded_and_puts_the_recorded_witness_first() -> None:
    witness = {"changed": True, "perturbed_sample": 2, "observed_sample": 0, "kind": "copy"}
    plan = replacement_plan(3, integer=False, leaks=True, witness=witness)
    assert plan[0] == Replacement(2, "copy", source=0) and len(plan) == len(set(plan)) <= MAX_REPLACEMENTS
    assert [r.kind for r in plan[:7]] == ["copy"] * 6 + ["scale"]  # the witness's kind for every sample first
    assert {r.sample for r in plan if r.kind == "random"} == {0, 1, 2}
    assert all(r.kind != "scale" for r in replacement_plan(3, integer=True, leaks=False))
    assert len(replacement_plan(64, integer=False, leaks=True)) == MAX_REPLACEMENTS
    # a witness of a larger batch, or none shown: no replacement from it
    assert witness_replacement({**witness, "perturbed_sample": 5}, 3) is None
    assert witness_replacement({"changed": False, "max_change": 0.0}, 3) is None
    # manifests from before `kind` was recorded name the perturbation only in words
    legacy = {"changed": True, "perturbed_sample": 0, "observed_sample": 1,
              "perturbation": "only sample 0 changed (text made a copy of sample 1)"}
    assert witness_replacement(legacy, 3) == Replacement(0, "copy", source=1)


def test_a_leak_op_that_did_not_move_says_so() -> None:
    chain = ["quantize_act@lm_head", "linear@lm_head"]
    findings = [Finding("leak", "quantize_act", "lm_head", "norm_q8", "per-tensor scale", ["logits"], chain,
                        {"observed_sample": 1, "max_change": 0.0}),  # a manifest from before `changed`
                Finding("leak", "quantize_act", "lm_head", "norm_q8", "per-tensor scale", ["logits"], chain,
                        {"observed_sample": 1, "max_change": 0.0, "changed": False, "relative_change": 0.0}),
                Finding("leak", "quantize_act", "lm_head", "norm_q8", "per-tensor scale", ["logits"], chain,
                        {"observed_sample": 1, "max_change": 4.8e-7, "changed": False, "relative_change": 1e-7})]
    text = IsolationReport("leaks", findings, {"text": "axis 0"}, {"logits": "axis 0"}).format()
    assert not ZERO_CHANGE.search(text)
    assert "sample 1 did not change under the witness's perturbation" in text
    assert "sample 1 did not change under any perturbation tried" in text
    assert "sample 1 changed only by 4.8e-07 (relative 1e-07), float-rounding level" in text
