"""Checking an artifact against its reference before a compile reports success: the eager
torch model, or the IR interpreter for a graph that passes changed numerically; per shape the
largest error relative to the reference's scale, the next-token agreement, for a cached
`step` the prefill plus single-token decoding against one full forward, and for a `prefill`
function (the last position only) its outputs and cache against the step's, bit for bit.

`verify_artifact` and `verify_decode` take anything with the artifact's `run`, `run_cached`
and `signature` (a `runtime.Runnable` or a backend's own runner), so every backend whose
artifact runs here is checked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from mocompile.errors import VerificationError
from mocompile.ir.graph import Graph
from mocompile.ir.interpreter import run as interpret
from mocompile.ir.registry import get_op
from mocompile.ir.rounding import Flip, RoundingTrace, tracing
from mocompile.runtime_inputs import segments
from mocompile.signature import Signature, random_inputs


class Runnable(Protocol):
    """What verification needs of an artifact: its signature, a forward, and (where it
    decodes) the forward through its KV cache (`runtime.LoadedArtifact.run_cached`)."""

    signature: Signature

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def run_cached(self, inputs: Mapping[str, np.ndarray], prompt: int) -> dict[str, np.ndarray]: ...

TOLERANCE = 1e-4  # relative error (max abs error / max abs reference) allowed, for every artifact
MAX_AMBIGUOUS = 256  # ambiguous roundings (closest to a boundary first) a verification tries flipping, per round
RESOLVE_ROUNDS = 3  # rounds of flips, each from the roundings of the run with the flips chosen before


@dataclass
class Reference:
    """What a compile checks against: the eager model, or for a graph without one, the IR.

    `graph` is set where the reference is the IR interpreter of a graph with run-time rounding
    points (activation quantization): there an artifact is held to the interpreter run that
    rounds like it did at the few values that lie on a rounding boundary to within float noise
    (`mocompile.ir.rounding`, `resolve_roundings`), with the same fixed TOLERANCE."""

    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    name: str
    graph: Graph | None = None
    tolerance: float | None = None  # None: TOLERANCE; 0 for a reference to match bit for bit (a backend's own)

    @property
    def allowed(self) -> float:
        return TOLERANCE if self.tolerance is None else self.tolerance


def interpreter_reference(graph: Graph) -> Reference:
    """The IR interpreter as the reference of a graph that passes changed numerically."""
    rounds = any(get_op(n.op).rounds_input or n.attrs.get("hidden_quant") for n in graph.nodes)
    return Reference(lambda x: interpret(graph, x), "IR interpreter", graph if rounds else None)


Runner = Callable[[frozenset[Flip]], tuple[list[np.ndarray], RoundingTrace]]


def traced_runner(run: Callable[[], list[np.ndarray]]) -> Runner:
    """`run` (an interpreter computation) as a function of the roundings it flips."""
    def runner(flips: frozenset[Flip]) -> tuple[list[np.ndarray], RoundingTrace]:
        with tracing(RoundingTrace(flips)) as trace:
            return run(), trace
    return runner


def _normalised(outs: list[np.ndarray], scales: list[float]) -> np.ndarray:
    return np.concatenate([o.astype(np.float64).ravel() / s for o, s in zip(outs, scales)])


def _greedy_flips(effects: dict[Flip, np.ndarray], residual: np.ndarray) -> list[Flip]:
    """Flips taken one at a time while one brings the outputs closer to the artifact's, in
    squared error (so flips that fix different outputs each count)."""
    chosen = []
    while effects:
        best = min(effects, key=lambda f: float(np.sum(np.square(residual - effects[f]))))
        if not np.sum(np.square(residual - effects[best])) < np.sum(np.square(residual)):
            break
        chosen.append(best)
        residual = residual - effects.pop(best)
    return chosen


def resolve_roundings(got: list[np.ndarray], runner: Runner) -> tuple[list[np.ndarray], dict[str, int]]:
    """The interpreter's outputs with the ambiguous roundings flipped that explain `got`.

    The plain run records the roundings that lie on a boundary to within float noise. Where
    `got` does not already match it, each such flip's effect on the outputs is measured (one
    run each, the MAX_AMBIGUOUS closest to a boundary), flips are chosen greedily while they
    bring the outputs closer to `got`, and the interpreter is run again rounding exactly those
    the other way. A flip changes the values after it, so that run's own ambiguous roundings
    are tried the same way, for up to RESOLVE_ROUNDS rounds. An artifact that computes
    something else (a kernel 1% off) is not explained by flipping a few boundary values, so it
    still fails the fixed tolerance."""
    ref, trace = runner(frozenset())
    report = {"ambiguous_roundings": len(trace.ambiguous), "rounding_flips": 0}
    if [g.shape for g in got] != [r.shape for r in ref]:
        return ref, report
    scales = [max(float(np.max(np.abs(r))) if r.size else 1.0, 1e-30) for r in ref]
    chosen: list[Flip] = []
    tried: set[Flip] = set()
    for _ in range(RESOLVE_ROUNDS):
        if all(relative_error(g, r)[1] <= TOLERANCE for g, r in zip(got, ref)):
            break
        base = _normalised(ref, scales)
        effects = {}
        for _, flip in sorted(trace.ambiguous)[:MAX_AMBIGUOUS]:
            if flip in tried:
                continue
            tried.add(flip)
            delta = _normalised(runner(frozenset({*chosen, flip}))[0], scales) - base
            if np.any(delta):
                effects[flip] = delta
        picked = _greedy_flips(effects, _normalised(got, scales) - base)
        if not picked:
            break
        chosen += picked
        ref, trace = runner(frozenset(chosen))
    report["rounding_flips"] = len(chosen)
    return ref, report


def eager_reference(module: Any) -> Reference:
    import torch

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = module(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {f"out{i}": o.numpy() for i, o in enumerate(outs)}

    return Reference(run, "eager torch model")


def relative_error(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max abs error, max abs error / max abs reference)."""
    if got.shape != ref.shape:
        return float("inf"), float("inf")
    err = float(np.max(np.abs(got.astype(np.float64) - ref))) if got.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 1.0
    return err, err / max(scale, 1e-30)


def _shape_checks(artifact: Runnable, reference: Reference, batch: int, seq: int, seed: int,
                  resolve: bool = False) -> list[dict[str, Any]]:
    """The artifact against the reference on one shape of random inputs: per output, the
    errors and how often the largest entry of the last axis (the next token) agrees. With
    `resolve`, against the interpreter rounding like the artifact at ambiguous roundings."""
    inputs = random_inputs(artifact.signature, batch, seq, seed)
    got = list(artifact.run(inputs).values())
    flips: dict[str, int] = {}
    if resolve and reference.graph is not None:
        graph = reference.graph
        ref, flips = resolve_roundings(got, traced_runner(lambda: list(interpret(graph, inputs).values())))
    else:
        ref = list(reference.run(inputs).values())
    checks = []
    for name, g, r in zip((t.name for t in artifact.signature.outputs), got, ref):
        abs_err, rel_err = relative_error(g, r)
        check = {"batch": batch, "seq": seq, "output": name, "max_abs_error": abs_err, "rel_error": rel_err, **flips}
        if g.shape == r.shape and g.ndim and g.shape[-1] > 1:
            check["top1_agreement"] = float(np.mean(g.argmax(-1) == r.argmax(-1)))
        checks.append(check)
    return checks


def _summary(reference: Reference, checks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"reference": reference.name, "max_rel_error": max((c["rel_error"] for c in checks), default=0.0),
            "checks": checks}


def compare_to_reference(artifact: Runnable, reference: Reference, shapes: list[tuple[int, int]],
                         seed: int) -> dict[str, Any]:
    """Run the artifact and the reference on the same random inputs of each shape (see
    _shape_checks); report only."""
    return _summary(reference, [c for b, s in shapes for c in _shape_checks(artifact, reference, b, s, seed)])


def verify_artifact(artifact: Runnable, reference: Reference, shapes: list[tuple[int, int]],
                    seed: int) -> dict[str, Any]:
    """compare_to_reference, failing beyond the reference's tolerance; against an interpreter
    with rounding points, the one that rounds like the artifact at ambiguous roundings
    (resolve_roundings)."""
    checks = [c for b, s in shapes for c in _shape_checks(artifact, reference, b, s, seed, resolve=True)]
    result = {"tolerance": reference.allowed, **_summary(reference, checks)}
    bad = [c for c in checks if not c["rel_error"] <= reference.allowed]
    if bad:
        c = max(bad, key=lambda c: c["rel_error"])
        raise VerificationError(
            f"artifact disagrees with the {reference.name}: relative error {c['rel_error']:.3g} > "
            f"{reference.allowed:g} "
            f"(output {c['output']}, batch {c['batch']}, seq {c['seq']})")
    return result


def verify_decode(artifact: Runnable, graph: Graph, reference: Reference, batch: int, prompt: int,
                  new_tokens: int, seed: int) -> dict[str, Any]:
    """Prefill `prompt` tokens (and every other segment) into a KV cache, then decode
    `new_tokens` one at a time; each step's outputs must match (within TOLERANCE) the
    reference's outputs at those positions of one full-sequence forward: the cache must change
    nothing but the work done. A multimodal model's tokens follow its other segments, an order
    no single forward computes: there the reference is the IR interpreter on the cached graph
    (kv_cache.py), which tests hold to the full-sequence forward of token models."""
    from mocompile.kv_cache import cached_graph, decode_steps, run_cached_graph, token_input

    full = random_inputs(artifact.signature, batch, prompt + new_tokens, seed)
    steps = decode_steps(full, token_input(graph).name, prompt)
    got = list(artifact.run_cached(full, prompt).values())[0]
    if len(full) == 1:  # one forward over every position
        def reference_run() -> list[np.ndarray]:
            return [list(reference.run(full).values())[0]]
        against = f"the {reference.name} on the full sequence"
    else:
        def reference_run() -> list[np.ndarray]:
            outs = run_cached_graph(cached_graph(graph), steps)
            return [np.concatenate([o[graph.outputs[0].name] for o in outs], axis=1)]
        against = "the IR's cached graph"
    flips: dict[str, int] = {}
    if reference.graph is not None:  # rounding points: see Reference
        (ref,), flips = resolve_roundings([got], traced_runner(reference_run))
    else:
        (ref,) = reference_run()
    worst, where, begin = 0.0, "", 0
    for step in steps:
        end = begin + sum(a.shape[1] for a in step.values())
        rel = relative_error(got[:, begin:end], ref[:, begin:end])[1]
        if rel > worst:
            worst, where = rel, f"positions {begin}..{end - 1}"
        begin = end
    result = {"reference": against, "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
              "max_rel_error": worst, "tolerance": reference.allowed, **flips}
    if not worst <= reference.allowed:
        raise VerificationError(f"cached decoding disagrees with {against}: relative error {worst:.3g} > "
                                f"{reference.allowed:g} at {where}")
    return result


def verify_with_decode(artifact: Runnable, graph: Graph, reference: Reference, shapes: list[tuple[int, int]],
                       seed: int, decode_tokens: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The checks every artifact passes, a single program or expert-parallel pieces alike:
    verify_artifact at every shape, then, where the artifact decodes, verify_decode of
    `decode_tokens` steps after the last shape's prompt (None where it does not decode)."""
    checked = {"status": "verified", **verify_artifact(artifact, reference, shapes, seed)}
    if not getattr(artifact, "can_decode", False):
        return checked, None
    batch, seq = shapes[-1]
    return checked, verify_decode(artifact, graph, reference, batch, seq, decode_tokens, seed)


def _host(tensor: Any) -> np.ndarray | None:
    """A cache tensor's values on the host (a TVM tensor or a numpy array), or None (device memory)."""
    if isinstance(tensor, np.ndarray):
        return tensor
    return tensor.numpy() if hasattr(tensor, "numpy") else None


def verify_prefill(artifact: Any, batch: int, prompt: int, seed: int) -> dict[str, Any]:
    """The program's `prefill` (a prompt step keeping the last position only, mocompile/
    prefill.py) against its `step` on the same prompt, each from an empty cache: the outputs
    at the last position and the cache they leave must be equal bit for bit. Every kernel
    computes a row from that row alone (no reduction across rows, the same code path whatever
    the row count), so the last position cannot differ by even one rounding; any difference
    is a wrong cut or a kernel that mixes rows."""
    inputs = random_inputs(artifact.signature, batch, prompt, seed)
    positions = sum(segments(inputs).values())
    caches = [artifact.new_cache(batch, positions) for _ in range(2)]
    want = artifact.signature.last_positions(artifact.step(inputs, caches[0]))
    got = artifact.step(inputs, caches[1], last_only=True)
    for name, a in want.items():
        if got[name].shape != a.shape or not np.array_equal(got[name], a):
            diff = np.abs(got[name] - a).max() if got[name].shape == a.shape else f"shape {got[name].shape}"
            raise VerificationError(f"the prefill function's output {name} differs from the step's at the last "
                                    f"position (batch {batch}, {positions} positions: {diff})")
    compared = 0
    for i, (a, b) in enumerate(zip(*(c.tensors for c in caches))):
        a, b = _host(a), _host(b)
        if a is None or b is None:
            continue
        compared += 1
        if not np.array_equal(a, b):
            raise VerificationError(f"the prefill function leaves cache tensor {i} unlike the step does")
    return {"batch": batch, "positions": positions, "bit_exact": True, "outputs": list(got),
            "cache_tensors_compared": compared}
