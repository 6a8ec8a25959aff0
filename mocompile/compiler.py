"""The road every compile takes, from the CLI or from Python:

spec -> reference torch model -> torch.fx -> IR -> passes -> backend -> staged artifact ->
verified against the reference -> atomically renamed into place.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from mocompile.artifact import check_output_dir, finalize, staging_dir
from mocompile.dsl.hf_import import is_checkpoint
from mocompile.errors import MocompileError, VerificationError
from mocompile.ir.graph import Graph
from mocompile.ir.interpreter import run as interpret
from mocompile.ir.printer import format_graph
from mocompile.ir.types import TensorType
from mocompile.ir.verifier import VerifyError, verify
from mocompile.isolation import IsolationReport
from mocompile.pass_manager import PassContext, PassManager, load_plugin
from mocompile.threads import configure_tvm_threads
from mocompile.runtime import LoadedArtifact, Signature, TensorSpec, random_inputs

TOLERANCE = 1e-4  # relative error (max abs error / max abs reference) allowed in fp32

Progress = Callable[[str], None]


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


ROUNDING_NOISE = 1e-6  # relative float32 noise at rounding points for the envelope of a Reference
NOISY_RUNS = 4


def interpreter_reference(graph: Graph) -> Reference:
    """The IR interpreter as the reference of a graph that passes changed numerically."""
    rounding = {id(n) for n in graph.nodes if n.op == "quantize_act" or n.attrs.get("hidden_quant")}

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


@dataclass
class Source:
    """A model ready to lower: the torch module, its input types, and where it came from."""

    module: Any  # torch.nn.Module
    input_types: dict[str, TensorType]
    name: str
    meta: dict[str, Any] = field(default_factory=dict)
    int_high: dict[str, int] = field(default_factory=dict)  # token inputs: ids are in [0, high)


def source_from_spec(spec_or_path: Any, variant: str | None, weights: str | Path | None, seed: int) -> Source:
    from mocompile.dsl import build_model, load_spec
    from mocompile.dsl.spec import Spec

    spec = spec_or_path if isinstance(spec_or_path, Spec) else load_spec(spec_or_path)
    if variant is not None and variant not in {v.name for v in spec.variants}:
        known = ", ".join(v.name for v in spec.variants) or "none"
        raise MocompileError(f"{spec.source or spec.name}: no variant {variant!r} (known: {known})")
    model = build_model(spec, seed=seed, variant=variant, weights=weights)
    high = {m.name: int(m.vocab) for m in model.spec.modalities if m.is_tokens}
    meta = {"name": spec.name, "spec_hash": spec.digest(), "variant": variant, "source": spec.source,
            "weights": str(weights) if weights else f"seed {seed}", "max_seq": spec.max_seq}
    return Source(model, model.input_types(), model.spec.name, meta, high)


def source_from_hf(path: str | Path) -> Source:
    """A Hugging Face checkpoint directory: its config imported as a spec, its weights
    streamed into the reference model."""
    from mocompile.dsl.hf_import import import_checkpoint
    from mocompile.dsl.hf_weights import build_hf_model

    ckpt = import_checkpoint(path)
    model = build_hf_model(ckpt)
    spec = ckpt.spec
    meta = {"name": spec.name, "spec_hash": spec.digest(), "variant": None, "source": str(ckpt.config_path),
            "weights": str(ckpt.path), "hf_architecture": ckpt.architecture, "hf_model_type": ckpt.family.model_type,
            "hf_source": str(Path(path).resolve()), "max_seq": spec.max_seq}
    return Source(model, model.input_types(), spec.name, meta, {"text": spec.vocab})


def source_for(model: Any, variant: str | None, weights: str | Path | None, seed: int) -> Source:
    """A spec (object or `.moe` path) or a Hugging Face checkpoint directory, ready to lower."""
    if isinstance(model, (str, Path)) and is_checkpoint(model):
        for option, value in (("weights", weights), ("variant", variant)):
            if value is not None:
                raise MocompileError(f"{model}: a Hugging Face checkpoint brings its own weights and has no variants "
                                     f"(drop --{option})")
        return source_from_hf(model)
    return source_from_spec(model, variant, weights, seed)


def source_from_module(module: Any, input_types: Mapping[str, TensorType] | None) -> Source:
    types = dict(input_types) if input_types is not None else getattr(module, "input_types", lambda: None)()
    if types is None:
        raise MocompileError(f"{type(module).__name__}: pass input_types={{name: TensorType}} to compile a plain torch module")
    high = {m.name: int(m.vocab) for m in getattr(getattr(module, "spec", None), "modalities", ()) if m.is_tokens}
    return Source(module, types, type(module).__name__, {"name": type(module).__name__}, high)


def lower_source(src: Source) -> Graph:
    from mocompile.lower_fx import lower_module

    graph = lower_module(src.module, src.input_types, src.name, ("logits",))
    try:
        verify(graph)
    except VerifyError as e:
        raise MocompileError(f"lowering {src.name} produced an invalid graph: {e}") from None
    graph.meta.update(src.meta)
    return graph


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


def _shape_checks(artifact: LoadedArtifact, reference: Reference, batch: int, seq: int,
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


def compare_to_reference(artifact: LoadedArtifact, reference: Reference, shapes: list[tuple[int, int]],
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


def verify_artifact(artifact: LoadedArtifact, reference: Reference, shapes: list[tuple[int, int]],
                    seed: int) -> dict[str, Any]:
    """compare_to_reference, failing beyond TOLERANCE (or, for a reference with rounding
    points, beyond the larger of TOLERANCE and twice its own rounding envelope)."""
    checks = []
    for batch, seq in shapes:
        shape_checks, inputs, ref = _shape_checks(artifact, reference, batch, seq, seed)
        for check in shape_checks:
            check["allowed"] = TOLERANCE
        if reference.noisy is not None and not all(c["rel_error"] <= TOLERANCE for c in shape_checks):
            for check, envelope in zip(shape_checks, rounding_envelope(reference, inputs, ref)):
                check["rounding_envelope"] = envelope
                check["allowed"] = max(TOLERANCE, 2 * envelope)
        checks += shape_checks
    result = {"tolerance": TOLERANCE, **_summary(reference, checks)}
    bad = [c for c in checks if not c["rel_error"] <= c["allowed"]]
    if bad:
        c = max(bad, key=lambda c: c["rel_error"] / c["allowed"])
        beyond = f"> {c['allowed']:.3g}" + (" (twice the reference's rounding envelope)" if c["allowed"] > TOLERANCE else "")
        raise VerificationError(
            f"artifact disagrees with the {reference.name}: relative error {c['rel_error']:.3g} {beyond} "
            f"(output {c['output']}, batch {c['batch']}, seq {c['seq']})")
    return result


def verify_decode(artifact: LoadedArtifact, graph: Graph, reference: Reference, batch: int, prompt: int,
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
    allowed = TOLERANCE
    if reference.noisy is not None and not worst <= TOLERANCE:  # rounding points: see Reference
        whole = whole if whole is not None else list(reference.run(full).values())[0]
        allowed = max(TOLERANCE, 2 * rounding_envelope(reference, full, [whole])[0])
    result = {"reference": against, "batch": batch, "prompt": prompt, "new_tokens": new_tokens,
              "max_rel_error": worst, "allowed": allowed}
    if not worst <= allowed:
        raise VerificationError(f"cached decoding disagrees with {against}: relative error {worst:.3g} > "
                                f"{allowed:.3g} at {where}")
    return result


def signature_of(graph: Graph, int_high: Mapping[str, int]) -> Signature:
    return Signature(
        tuple(TensorSpec(v.name, v.type.dtype, v.type.shape, int_high.get(v.name)) for v in graph.inputs),
        tuple(TensorSpec(v.name, v.type.dtype, v.type.shape) for v in graph.outputs),
    )


def check_batch_isolation(graph: Graph, src: Source, batch: int, seq: int, seed: int) -> IsolationReport:
    """The isolation verdict of the IR a backend will get; a leak is witnessed on random inputs."""
    from mocompile.isolation_check import check_graph

    inputs = random_inputs(signature_of(graph, src.int_high), max(batch, 2), seq, seed)
    return check_graph(graph, inputs, int_high=src.int_high, seed=seed)


def cached_step_isolation(graph: Graph) -> str | None:
    """The isolation verdict of the graph's KV-cached form (the cache rows are per sample, so
    a step is isolated when the forward is; this proves it rather than assumes it), or None
    for a graph that cannot decode with a cache."""
    from mocompile.isolation import analyze
    from mocompile.kv_cache import cached_graph, decode_support

    return None if decode_support(graph) is not None else analyze(cached_graph(graph).graph).verdict


def _witness_note(report: IsolationReport) -> str:
    w = report.witness
    if not w or not w.get("changed"):
        return ""
    return (f" (witness: sample {w['observed_sample']}'s {w['output']} changes by {w['max_change']:.3g} when only "
            f"sample {w['perturbed_sample']} changes)")


def load_tuning(backend: Any, graph: Graph, out_dir: Path, trials: int, db_path: str | Path | None,
                say: Progress) -> tuple[Any, dict[str, Any] | None]:
    """The tuning database to compile with (None: untuned), after `trials` tuning trials."""
    previous = out_dir / "tuning.json"  # options were checked by check_options
    if not (trials or db_path or previous.is_file()):
        return None, None
    db, note = backend.TuningDB.load(db_path or previous, backend.host_target())
    report: dict[str, Any] = {"database": note}
    if trials:
        say(f"      tuning matmul kernels ({trials} trials)")
        report.update(backend.tune(graph, trials, db, backend.host_target(), say))
        if db_path is not None:
            db.save(db_path)
    return db, report


def _input_paths(model: Any, weights: Any, tuning_db: Any, plugins: tuple[str, ...]) -> tuple[str | Path, ...]:
    """The files a compile reads, which its output must not replace."""
    given = (model if isinstance(model, (str, Path)) else None, weights, tuning_db, *plugins)
    return tuple(p for p in given if p is not None)


def check_options(model: Any, out_dir: str | Path | None, *, weights: str | Path | None, batch: int, seq: int,
                  plugins: tuple[str, ...], tune: int, tuning_db: str | Path | None) -> None:
    """Everything about a compile's options that can be checked before any heavy work: the
    files it reads exist, the sizes are positive, and the output may be written."""
    for name, value in (("batch", batch), ("seq", seq)):
        if not isinstance(value, int) or value < 1:
            raise MocompileError(f"--{name} must be a positive integer (got {value!r})")
    if not isinstance(tune, int) or tune < 0:
        raise MocompileError(f"--tune must be >= 0 (got {tune!r})")
    if isinstance(model, (str, Path)) and not Path(model).exists():
        raise MocompileError(f"{model}: no such spec file or checkpoint directory")
    for option, path in (("weights", weights), ("plugin", next((p for p in plugins if not Path(p).is_file()), None))):
        if path is not None and not Path(path).is_file():
            raise MocompileError(f"{path}: --{option} file not found")
    if tuning_db is not None and not tune and not Path(tuning_db).is_file():
        raise MocompileError(f"{tuning_db}: tuning database not found")
    if out_dir is not None:
        check_output_dir(out_dir, _input_paths(model, weights, tuning_db, plugins))


DECODE_CHECK_TOKENS = 4  # tokens decoded one at a time after the prompt when a compile verifies a step


def check_verification_length(graph: Graph, seq: int) -> None:
    """Refuse a --seq whose verification inputs would be longer than the model's max_seq
    (every segment gets `seq` positions, and DECODE_CHECK_TOKENS more where it decodes): the
    artifact refuses such inputs, and positions past max_seq are not what it is built for."""
    from mocompile.kv_cache import decode_support

    max_seq = graph.meta.get("max_seq")
    segments = sum(1 for v in graph.inputs if v.type.rank >= 2 and isinstance(v.type.shape[1], str)) or 1
    per_segment = seq + (DECODE_CHECK_TOKENS if decode_support(graph) is None else 0)
    if max_seq and per_segment * segments > max_seq:
        raise MocompileError(f"--seq {seq}: verifying takes {per_segment * segments} positions ({segments} segment(s) "
                             f"of {per_segment}), past the model's max_seq of {max_seq}; give a smaller --seq")


def get_backend(target: str) -> Any:
    if target == "cpu":
        from mocompile.backends import tvm_cpu

        return tvm_cpu
    raise MocompileError(f"unknown target {target!r} (available: cpu)")


def compile(
    model: Any,
    target: str = "cpu",
    passes: str = "",
    out_dir: str | Path | None = None,
    *,
    variant: str | None = None,
    weights: str | Path | None = None,
    seed: int = 0,
    batch: int = 2,
    seq: int = 8,
    plugins: tuple[str, ...] = (),
    input_types: Mapping[str, TensorType] | None = None,
    progress: Progress | None = None,
    require_isolation: bool = False,
    tune: int = 0,
    tuning_db: str | Path | None = None,
) -> LoadedArtifact:
    """Compile a spec (object or `.moe` path), a Hugging Face checkpoint directory or a torch
    module into an artifact directory, verify it against the eager model, and return it loaded.

    The artifact is checked at batch 1 and at `batch`, with `seq` positions per segment.
    `tune` > 0 spends that many kernel measurements tuning the matmuls (backend-specific);
    the tuning database is `tuning_db`, else the one a previous compile left in `out_dir`,
    and is saved into the artifact (and back to `tuning_db` when given).
    The batch-isolation verdict of the final IR is recorded in the manifest; with
    `require_isolation`, a leak or an unknown fails the compile before code generation.
    """
    say = progress or (lambda m: None)
    t0 = time.perf_counter()
    check_options(model, out_dir, weights=weights, batch=batch, seq=seq, plugins=plugins, tune=tune,
                  tuning_db=tuning_db)
    backend = get_backend(target)
    configure_tvm_threads()
    for plugin in plugins:
        load_plugin(plugin)
    manager = PassManager(passes)  # the pipeline text is checked before any model is built
    say("[1/6] building the reference model")
    if isinstance(model, (str, Path)) or type(model).__name__ == "Spec":
        src = source_for(model, variant, weights, seed)
    else:
        src = source_from_module(model, input_types)
    say("[2/6] tracing with torch.fx and lowering to IR")
    graph = lower_source(src)
    check_verification_length(graph, seq)
    say(f"[3/6] running passes: {passes or '(none)'}")
    graph, reports = manager.run(graph, PassContext(target=target, input_ranges=dict(src.int_high)))
    isolation = check_batch_isolation(graph, src, batch, seq, seed)
    say(f"      batch isolation: {isolation.summary()}")
    if require_isolation and isolation.verdict != "isolated":
        raise MocompileError(f"batch isolation required, but {isolation.summary()}{_witness_note(isolation)}")
    step_isolation = cached_step_isolation(graph)
    if require_isolation and step_isolation not in (None, "isolated"):
        raise MocompileError(f"batch isolation required, but the KV-cached step's verdict is {step_isolation}")
    exact = all(getattr(p, "preserves_semantics", True) for p in manager.passes)
    reference = eager_reference(src.module) if exact else interpreter_reference(graph)
    out_dir = check_output_dir(out_dir or f"build/{src.name}", _input_paths(model, weights, tuning_db, plugins))
    tuning, tuning_report = load_tuning(backend, graph, out_dir, tune, tuning_db, say)
    stage = staging_dir(out_dir)
    try:
        say(f"[4/6] generating code for {target}")
        program = backend.emit(graph, stage, tuning=tuning)
        (stage / "ir.txt").write_text(format_graph(graph) + "\n")
        manifest: dict[str, Any] = {
            "model": graph.meta,
            "target": {"name": target, **program.pop("target_info", {})},
            "signature": signature_of(graph, src.int_high).to_json(),
            "program": program,
            "passes": reports,
            "isolation": isolation.to_json(),
            **({"tuning": tuning_report} if tuning_report else {}),
        }
        say(f"[5/6] verifying against the {reference.name}")
        staged = LoadedArtifact(stage, manifest)
        shapes = [(1, seq)] + ([(batch, seq)] if batch != 1 else [])
        manifest["verification"] = verify_artifact(staged, reference, shapes, seed)
        if staged.can_decode:
            manifest["decode_verification"] = {**verify_decode(staged, graph, reference, batch, seq, DECODE_CHECK_TOKENS, seed),
                                               "isolation": step_isolation}
        if not exact:  # what the approximating passes cost against the unmodified model
            manifest["drift_from_fp32"] = compare_to_reference(staged, eager_reference(src.module), shapes, seed)
        manifest["compile_seconds"] = round(time.perf_counter() - t0, 3)
        say("[6/6] writing the artifact")
        final = finalize(stage, out_dir, manifest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return LoadedArtifact(final, manifest)
