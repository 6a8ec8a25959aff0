"""Checking an artifact against its reference before a compile reports success: the eager
torch model, or the IR interpreter for a graph that passes changed numerically; per shape the
largest error relative to the reference's scale, the next-token agreement, and for a cached
`step` the prefill plus single-token decoding against one full forward.

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
from mocompile.signature import Signature, random_inputs


class Runnable(Protocol):
    """What verification needs of an artifact: its signature, a forward, and (where it
    decodes) the forward through its KV cache (`runtime.LoadedArtifact.run_cached`)."""

    signature: Signature

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def run_cached(self, inputs: Mapping[str, np.ndarray], prompt: int) -> dict[str, np.ndarray]: ...

TOLERANCE = 1e-4  # relative error (max abs error / max abs reference) allowed in fp32

@dataclass
class Reference:
    """What a compile checks against: the eager model, or for a graph without one, the IR.

    `noisy(inputs, seed)`, for a reference with rounding points (activation quantization):
    the same reference with float32-level noise added where it rounds. Rounding amplifies
    any float difference that lands near a rounding boundary into a whole quantization step
    (and a step can flip a routing choice), so an artifact that computes the same function
    in a different float order may differ by more than TOLERANCE; it must then differ no more
    than the reference differs from itself under such noise (see verify_artifact)."""

    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    name: str
    noisy: Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]] | None = None
    tolerance: float | None = None  # None: TOLERANCE; 0 for a reference to match bit for bit (a backend's own)

    @property
    def allowed(self) -> float:
        return TOLERANCE if self.tolerance is None else self.tolerance


ROUNDING_NOISE = 1e-6  # relative float32 noise at rounding points for the envelope of a Reference
NOISY_RUNS = 4


def interpreter_reference(graph: Graph) -> Reference:
    """The IR interpreter as the reference of a graph that passes changed numerically."""
    rounding = {id(n) for n in graph.nodes if get_op(n.op).rounds_input or n.attrs.get("hidden_quant")}

    def noisy(inputs: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)

        def perturb(node: Any, args: list[np.ndarray]) -> list[np.ndarray]:
            if id(node) not in rounding:  # a block rounding its hidden activation: noise on its input
                return args
            x = args[0]
            jitter = 1 + ROUNDING_NOISE * rng.standard_normal(x.shape).astype(np.float32)
            return [(x * jitter).astype(np.float32), *args[1:]]

        return interpret(graph, inputs, perturb=perturb)

    return Reference(lambda x: interpret(graph, x), "IR interpreter", noisy if rounding else None)


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


def _shape_checks(artifact: Runnable, reference: Reference, batch: int, seq: int,
                  seed: int) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], list[np.ndarray]]:
    """The artifact against the reference on one shape of random inputs: per output, the
    errors and how often the largest entry of the last axis (the next token) agrees; also
    the inputs and the reference's outputs."""
    inputs = random_inputs(artifact.signature, batch, seq, seed)
    got = list(artifact.run(inputs).values())
    ref = list(reference.run(inputs).values())
    checks = []
    for name, g, r in zip((t.name for t in artifact.signature.outputs), got, ref):
        abs_err, rel_err = relative_error(g, r)
        check = {"batch": batch, "seq": seq, "output": name, "max_abs_error": abs_err, "rel_error": rel_err}
        if g.shape == r.shape and g.ndim and g.shape[-1] > 1:
            check["top1_agreement"] = float(np.mean(g.argmax(-1) == r.argmax(-1)))
        checks.append(check)
    return checks, inputs, ref


def _summary(reference: Reference, checks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"reference": reference.name, "max_rel_error": max((c["rel_error"] for c in checks), default=0.0),
            "checks": checks}


def compare_to_reference(artifact: Runnable, reference: Reference, shapes: list[tuple[int, int]],
                         seed: int) -> dict[str, Any]:
    """Run the artifact and the reference on the same random inputs of each shape (see
    _shape_checks); report only."""
    return _summary(reference, [c for b, s in shapes for c in _shape_checks(artifact, reference, b, s, seed)[0]])


def rounding_envelope(reference: Reference, inputs: dict[str, np.ndarray], ref: list[np.ndarray]) -> list[float]:
    """Per output, the largest relative change of the reference under rounding-point noise."""
    out = [0.0] * len(ref)
    for seed in range(NOISY_RUNS):
        for i, (a, r) in enumerate(zip(reference.noisy(inputs, seed).values(), ref)):
            out[i] = max(out[i], relative_error(a, r)[1])
    return out


def verify_artifact(artifact: Runnable, reference: Reference, shapes: list[tuple[int, int]],
                    seed: int) -> dict[str, Any]:
    """compare_to_reference, failing beyond TOLERANCE (or, for a reference with rounding
    points, beyond the larger of TOLERANCE and twice its own rounding envelope)."""
    checks = []
    for batch, seq in shapes:
        shape_checks, inputs, ref = _shape_checks(artifact, reference, batch, seq, seed)
        for check in shape_checks:
            check["allowed"] = reference.allowed
        if reference.noisy is not None and not all(c["rel_error"] <= reference.allowed for c in shape_checks):
            for check, envelope in zip(shape_checks, rounding_envelope(reference, inputs, ref)):
                check["rounding_envelope"] = envelope
                check["allowed"] = max(reference.allowed, 2 * envelope)
        checks += shape_checks
    result = {"tolerance": reference.allowed, **_summary(reference, checks)}
    bad = [c for c in checks if not c["rel_error"] <= c["allowed"]]
    if bad:
        c = max(bad, key=lambda c: c["rel_error"] / max(c["allowed"], 1e-30))
        beyond = f"> {c['allowed']:.3g}" + (" (twice the reference's rounding envelope)"
                                            if c["allowed"] > reference.allowed else "")
        raise VerificationError(
            f"artifact disagrees with the {reference.name}: relative error {c['rel_error']:.3g} {beyond} "
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
    whole = list(reference.run(full).values())[0] if len(full) == 1 else None  # one forward over every position
    if whole is not None:
        ref, against = whole, f"the {reference.name} on the full sequence"
    else:
        outs = run_cached_graph(cached_graph(graph), steps)
        ref, against = np.concatenate([o[graph.outputs[0].name] for o in outs], axis=1), "the IR's cached graph"
    worst, where, begin = 0.0, "", 0
    for step in steps:
        end = begin + sum(a.shape[1] for a in step.values())
        rel = relative_error(got[:, begin:end], ref[:, begin:end])[1]
        if rel > worst:
            worst, where = rel, f"positions {begin}..{end - 1}"
        begin = end
    allowed = reference.allowed
    if reference.noisy is not None and not worst <= allowed:  # rounding points: see Reference
        whole = whole if whole is not None else list(reference.run(full).values())[0]
        allowed = max(reference.allowed, 2 * rounding_envelope(reference, full, [whole])[0])
    result = {"reference": against, "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
              "max_rel_error": worst, "allowed": allowed}
    if not worst <= allowed:
        raise VerificationError(f"cached decoding disagrees with {against}: relative error {worst:.3g} > "
                                f"{allowed:.3g} at {where}")
    return result
