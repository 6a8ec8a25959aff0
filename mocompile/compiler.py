"""The road every compile takes, from the CLI or from Python:

spec -> reference torch model -> torch.fx -> IR -> passes -> backend -> staged artifact ->
verified against the reference -> atomically renamed into place.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mocompile.artifact import check_output_dir, finalize, staging_dir
from mocompile.backends.base import Backend, get_backend
from mocompile.calibration import Calibration, for_graph, load_token_file
from mocompile.dtype_option import resolve_dtype, stored_weight_dtype
from mocompile.errors import ArtifactError, MocompileError
from mocompile.frontend import COMPILE_BYTES_PER_PARAM, Source, lower_source, source_for, source_from_module
from mocompile.ir.graph import Graph
from mocompile.ir.printer import format_graph
from mocompile.ir.types import TensorType
from mocompile.isolation import IsolationReport
from mocompile.latency import PROBE, latency_probe
from mocompile.pass_manager import PassContext, PassManager, load_plugin
from mocompile.prefill import DECODING_FUNCTIONS
from mocompile.runtime import open_artifact
from mocompile.signature import random_inputs, signature_of
from mocompile.streamed_compile import LayerChain, artifact_bytes_per_param, mark_layer_states, spill_weights
from mocompile.threads import configure_tvm_threads
from mocompile.verification import (Reference, compare_to_reference, eager_reference, interpreter_reference,
                                    verify_prefill, verify_with_decode)

Progress = Callable[[str], None]


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_batch_isolation(graph: Graph, src: Source, batch: int, seq: int, seed: int) -> IsolationReport:
    """The isolation verdict of the IR a backend will get; a leak is witnessed on random inputs."""
    from mocompile.isolation_check import check_graph

    inputs = random_inputs(signature_of(graph, src.int_high), max(batch, 2), seq, seed)
    return check_graph(graph, inputs, int_high=src.int_high, seed=seed)


def cached_isolation(graph: Graph, prefill: bool = True) -> dict[str, str]:
    """The isolation verdicts of what a decoding artifact runs besides the forward: its
    KV-cached `step` (the cache rows are per sample, so a step is isolated when the forward
    is; this proves it rather than assumes it) and, with `prefill` (a target that builds
    one), its `prefill` (the cached graph cut to the last position, mocompile/prefill.py),
    both from one cached graph. Empty for a graph that cannot decode with a cache; no
    "prefill" where the graph has no last-position form."""
    from mocompile.isolation import analyze
    from mocompile.kv_cache import cached_graph, decode_support
    from mocompile.prefill import cached_last_position_graph

    if decode_support(graph) is not None:
        return {}
    cached = cached_graph(graph)
    verdicts = {"step": analyze(cached.graph).verdict}
    if not prefill:
        return verdicts
    cut = cached_last_position_graph(graph, cached)
    if not isinstance(cut, str):
        verdicts["prefill"] = analyze(cut.graph).verdict
    return verdicts


def _decoding_verdicts(verdicts: dict[str, str], program: dict[str, Any]) -> dict[str, str]:
    """The cached verdicts of the functions the backend compiled (the manifest program's
    `step` and `prefill` entries): recorded for every artifact, whether it runs here or not."""
    return {k: v for k, v in verdicts.items() if program.get(k)}


def _witness_note(report: IsolationReport) -> str:
    w = report.witness
    if not w or not w.get("changed"):
        return ""
    return (f" (witness: sample {w['observed_sample']}'s {w['output']} changes by {w['max_change']:.3g} when only "
            f"sample {w['perturbed_sample']} changes)")


def load_tuning(backend: Backend, graph: Graph, out_dir: Path, trials: int, db_path: str | Path | None,
                say: Progress) -> tuple[Any, dict[str, Any] | None]:
    """The tuning database to compile with (None: untuned), after `trials` tuning trials."""
    previous = out_dir / "tuning.json"  # options were checked by check_options and compile
    if not backend.can_tune or not (trials or db_path or previous.is_file()):
        return None, None
    db, note = backend.load_tuning(Path(db_path or previous))
    report: dict[str, Any] = {"database": note}
    if trials:
        say(f"      tuning matmul kernels ({trials} trials)")
        report.update(backend.tune(graph, trials, db, say))
        if db_path is not None:
            db.save(db_path)
    return db, report


def given_calibration(calibration: Any, graph: Graph, int_high: Mapping[str, int],
                      model: Any = None) -> Calibration | None:
    """The user's calibration data checked against the model (None: nothing given); plain
    text is read with the tokenizer.json of a checkpoint directory `model`."""
    if calibration is None:
        return None
    if isinstance(calibration, (str, Path)):
        tokenizer = Path(model) / "tokenizer.json" if isinstance(model, (str, Path)) else None
        return load_token_file(calibration, signature_of(graph, int_high),
                               tokenizer if tokenizer is not None and tokenizer.is_file() else None,
                               graph.meta.get("max_seq"))
    return for_graph(graph, list(calibration), int_high, 0, 0, 0)


def _input_paths(model: Any, weights: Any, tuning_db: Any, plugins: tuple[str, ...],
                 calibration: Any = None) -> tuple[str | Path, ...]:
    """The files a compile reads, which its output must not replace."""
    given = (model if isinstance(model, (str, Path)) else None, weights, tuning_db, *plugins,
             calibration if isinstance(calibration, (str, Path)) else None)
    return tuple(p for p in given if p is not None)


def check_options(model: Any, out_dir: str | Path | None, *, weights: str | Path | None, batch: int, seq: int,
                  plugins: tuple[str, ...], tune: int, tuning_db: str | Path | None,
                  calibration: Any = None) -> None:
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
    if isinstance(calibration, (str, Path)) and not Path(calibration).is_file():
        raise MocompileError(f"{calibration}: --calib file not found")
    if tuning_db is not None and not tune and not Path(tuning_db).is_file():
        raise MocompileError(f"{tuning_db}: tuning database not found")
    if out_dir is not None:
        check_output_dir(out_dir, _input_paths(model, weights, tuning_db, plugins, calibration))


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


@dataclass
class UnrunnableArtifact:
    """A compiled artifact that cannot run on the machine that compiled it (`reason`), as
    `compile` returns it: its path and manifest, whose verification says what was checked."""

    path: Path
    manifest: dict[str, Any]
    reason: str

    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        raise ArtifactError(f"{self.path}: cannot run on this machine ({self.reason})")


def verify_here(backend: Backend, stage: Path, manifest: dict[str, Any], graph: Graph, reference: Reference,
                exact_reference: Reference | None, shapes: list[tuple[int, int]], seed: int,
                opened: Any = None) -> Any:
    """Verify a staged artifact into its manifest: loaded through the runtime's loader of its
    program kind and compared with the reference where it runs here; else the backend's
    static checks, and the manifest says plainly that it was not run. Returns the loaded
    artifact (`opened`: already loaded), or an UnrunnableArtifact."""
    why_not = backend.cannot_run_here(manifest)
    if why_not is not None:
        manifest["verification"] = {"status": "not run", "reason": why_not,
                                    "checked": backend.static_checks(stage, manifest)}
        return UnrunnableArtifact(stage, manifest, why_not)
    staged = opened or open_artifact(stage, manifest)
    manifest["verification"], decode = verify_with_decode(staged, graph, reference, shapes, seed, DECODE_CHECK_TOKENS)
    verdicts = manifest.get("isolation", {}).get("decoding", {})
    if decode is not None:
        manifest["decode_verification"] = {**decode, "isolation": verdicts.get("step")}
        if getattr(staged, "has_prefill", False):
            batch, seq = shapes[-1]
            manifest["prefill_verification"] = {**verify_prefill(staged, batch, seq, seed),
                                                "isolation": verdicts.get("prefill")}
    if exact_reference is not None:  # what the approximating passes cost against the unmodified model
        manifest["drift_from_fp32"] = compare_to_reference(staged, exact_reference, shapes, seed)
    return staged



def _append_pass_notes(reports: list[dict[str, Any]], notes: dict[str, str | None]) -> None:
    """Add what the backend decided for a pass (by the pass's name: which kernels it runs,
    measured on this machine) to that pass's one-line summary."""
    for report in reports:
        note = notes.get(str(report.get("pass", "")).split("(")[0])
        if note and report.get("summary"):
            report["summary"] += f"; {note}"

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
    calibration: str | Path | Sequence[Mapping[str, Any]] | None = None,
    ep: bool = False,
    dtype: str | None = None,
    stream: bool = False,
) -> Any:
    """Compile a spec (object or `.moe` path), a Hugging Face checkpoint directory or a torch
    module into an artifact directory for `target` (a backend name and its options, e.g.
    "cpu"), verify it against the eager model, and return it loaded through the runtime's
    loader of its program kind. An artifact that cannot run on this machine is checked as far
    as its backend can without running it, and returned as an UnrunnableArtifact; its
    manifest's verification says "not run" and why.

    The artifact is checked at batch 1 and at `batch`, with `seq` positions per segment.
    `tune` > 0 spends that many kernel measurements tuning the matmuls (backend-specific);
    the tuning database is `tuning_db`, else the one a previous compile left in `out_dir`,
    and is saved into the artifact (and back to `tuning_db` when given).
    `calibration`: what data-driven passes learn from: a `.npy` file of token ids [n, seq],
    plain text (a checkpoint directory's tokenizer.json encodes it), or a list of input dicts
    (random inputs when None; the manifest says which).
    `ep`: also write and verify the expert-parallel pieces `mocompile run-ep` runs (ep_build.py).
    `dtype`: how the matmul and embedding weights are stored, "bf16", "fp16" or "fp32"
    (None: bf16 for a bf16 checkpoint, else fp32; see mocompile.dtype_option).
    The batch-isolation verdict of the final IR is recorded in the manifest; with
    `require_isolation`, a leak or an unknown fails the compile before code generation.
    `stream` (a checkpoint directory only): the weights stay in the checkpoint's files and are
    read one tensor at a time by the passes, the backend and the verification, which then
    checks the artifact layer by layer against the IR interpreter (streamed_compile.py); the
    memory a compile needs is then about the artifact's, not the float32 model's.
    """
    say = progress or (lambda m: None)
    t0 = time.perf_counter()
    check_options(model, out_dir, weights=weights, batch=batch, seq=seq, plugins=plugins, tune=tune,
                  tuning_db=tuning_db, calibration=calibration)
    backend = get_backend(target)
    if ep:
        from mocompile.ep_build import check_ep_target

        check_ep_target(backend)
        if stream:
            raise MocompileError("--ep with --stream: the expert-parallel pieces are verified against the whole "
                                 "model's reference, which a streamed compile never builds; compile without one")
    if (tune or tuning_db) and not backend.can_tune:
        raise MocompileError(f"the {backend.name} target has no tuning (drop --tune / --tuning-db)")
    configure_tvm_threads()
    for plugin in plugins:
        load_plugin(plugin)
    passes = resolve_dtype(model, dtype, passes, backend, float_experts=ep)
    manager = PassManager(passes)  # the pipeline text is checked before any model is built
    say("[1/6] building the reference model" + (" (streamed: weights stay in the checkpoint)" if stream else ""))
    if isinstance(model, (str, Path)) or type(model).__name__ == "Spec":
        src = source_for(model, variant, weights, seed,
                         artifact_bytes_per_param(manager) if stream else COMPILE_BYTES_PER_PARAM, stream)
    elif stream:
        raise MocompileError(f"{type(model).__name__}: only a Hugging Face checkpoint directory can be streamed")
    else:
        src = source_from_module(model, input_types)
    say("[2/6] tracing with torch.fx and lowering to IR")
    graph = lower_source(src)
    check_verification_length(graph, seq)
    float_graph = graph.clone() if src.streamed else None  # lazy weights: a clone costs no weight memory
    say(f"[3/6] running passes: {passes or '(none)'}")
    calib = given_calibration(calibration, graph, src.int_high, model)
    ctx = PassContext(calibration=calib, input_ranges=dict(src.int_high), target=backend.name,
                      options={PROBE: latency_probe(backend, src.int_high)})
    graph, reports = manager.run(graph, ctx)
    ep_experts = None
    if ep:  # what the cut refuses (no routed experts, quantized ones), before any code is generated
        from mocompile.ep_build import routed_experts

        ep_experts = routed_experts(graph)
    isolation = check_batch_isolation(graph, src, batch, seq, seed)
    say(f"      batch isolation: {isolation.summary()}")
    if require_isolation and isolation.verdict != "isolated":
        raise MocompileError(f"batch isolation required, but {isolation.summary()}{_witness_note(isolation)}")
    cached_verdicts = cached_isolation(graph, prefill=backend.builds_prefill)  # without one, prompts run the step
    for key, verdict in cached_verdicts.items():
        if require_isolation and verdict != "isolated":
            raise MocompileError(f"batch isolation required, but the {DECODING_FUNCTIONS[key]}'s verdict is {verdict}")
    refused = backend.unsupported(graph)
    if refused:
        raise MocompileError(refused)
    exact = all(getattr(p, "preserves_semantics", True) for p in manager.passes)
    backend.prepare(graph, calib, src.int_high, seed)
    own = backend.reference(graph)  # a backend computing something else by design (fixed point) has its own
    reference = Reference(own[1], own[0], tolerance=0.0) if own else eager_reference(src.module) if exact and \
        not src.streamed else interpreter_reference(graph)
    out_dir = check_output_dir(out_dir or f"build/{src.name}",
                               _input_paths(model, weights, tuning_db, plugins, calibration))
    tuning, tuning_report = load_tuning(backend, graph, out_dir, tune, tuning_db, say)
    scratch = None
    if src.streamed:
        mark_layer_states(graph)  # the artifact then returns each layer's output too
        scratch = Path(tempfile.mkdtemp(prefix=".mocompile-scratch-", dir=out_dir.parent))
        spill_weights(graph, scratch)
    stage = staging_dir(out_dir)
    try:
        say(f"[4/6] generating code for {backend.target_text}")
        program = backend.emit(graph, stage, tuning=tuning)
        (stage / "ir.txt").write_text(format_graph(graph) + "\n")
        _append_pass_notes(reports, program.get("pass_notes", {}))
        manifest: dict[str, Any] = {
            "model": graph.meta,
            "target": {"name": backend.name, "text": backend.target_text, **program.pop("target_info", {})},
            "signature": signature_of(graph, src.int_high).to_json(),
            "program": program,
            "weight_dtype": stored_weight_dtype(graph),
            "passes": reports,
            **({"calibration": calib.to_json()} if calib is not None else {}),
            "isolation": {**isolation.to_json(), "decoding": _decoding_verdicts(cached_verdicts, program)},
            **({"tuning": tuning_report} if tuning_report else {}),
        }
        say(f"[5/6] verifying against the {reference.name}")
        shapes = [(1, seq)] + ([(batch, seq)] if batch != 1 else [])
        exact_reference = None if exact and not own else \
            interpreter_reference(float_graph) if float_graph is not None else eager_reference(src.module)
        opened = chain = None
        if src.streamed and backend.cannot_run_here(manifest) is None and program.get("layers"):
            # checked layer by layer, each layer against its reference on the artifact's own hidden state
            opened = open_artifact(stage, manifest)
            chain = LayerChain(opened, graph)
            reference, exact_reference = chain.reference(reference), None  # the drift is reported per layer
            if reference.graph is not None:  # the rounding-aware check runs the plain interpreter: check layers first
                chain.run(random_inputs(signature_of(graph, src.int_high), 1, seq, seed))
        verify_here(backend, stage, manifest, graph, reference, exact_reference, shapes, seed, opened)
        if chain is not None:
            manifest["layer_verification"] = chain.report(None if exact else float_graph)
        if ep:
            from mocompile.ep_build import build_ep, verify_ep

            if manifest["verification"]["status"] != "verified":
                raise MocompileError(f"--ep: the expert-parallel pieces are verified by running them, and this "
                                     f"artifact cannot run here ({manifest['verification']['reason']})")

            manifest["ep"] = build_ep(graph, ep_experts, backend, stage, say)
            manifest["ep"]["verification"] = verify_ep(stage, manifest, graph, reference, shapes, seed,
                                                       DECODE_CHECK_TOKENS)
        # the artifact loaded for verification (the chain and its reference hold it) goes before
        # the finished one is loaded: a real-size artifact is gigabytes
        del opened, chain, reference, exact_reference
        manifest["compile_seconds"] = round(time.perf_counter() - t0, 3)
        say("[6/6] writing the artifact")
        final = finalize(stage, out_dir, manifest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if manifest["verification"]["status"] != "verified":
        return UnrunnableArtifact(final, manifest, manifest["verification"]["reason"])
    return open_artifact(final, manifest)
