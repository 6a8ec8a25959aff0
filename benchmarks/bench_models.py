"""Side-by-side timing of each example: mocompile artifact vs eager PyTorch vs torch.compile vs ONNX Runtime vs MLIR + IREE.

Run:  python benchmarks/bench_models.py [--threads N] [--models M ...] [--out PATH]
(all examples by default; writes the "models" section of benchmarks/RESULTS.md). Never run
by the tests. Every column gets the same inputs in the same process and the same thread
count, set for each engine and read back (engines.py); the torch baselines are described in
baselines.py. What is measured: "prefill" rows are a forward over all positions; "decode"
rows are one single-token step after a prompt of PAST positions held in a KV cache, on every
side (artifact: its `step` function; torch: the reference model with a Hugging Face style
cache, dsl/kv_cache.py). A multimodal model (whose artifact decodes text after an
image/audio prompt; the cached torch step here takes token ids only) gets "forward" rows: a
one-position forward without cache on every side. The section holds only what the run
measured and verdicts computed from it; analysis and history are in benchmarks/NOTES.md.
The iree column is the same model compiled by `--target mlir` (linalg through torch-mlir,
IREE llvm-cpu for this CPU) and run through runtime.load, its decode rows through the same
`step` API: where our own CPU code stands against an MLIR compiler.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

import mocompile
from baselines import COMPILED_MODEL, TokenStep, check_close, compiled_runner, loop_free, ort_runner
from engines import THREADS, set_iree_threads
from harness import PAST, ROUNDS, artifact_step, cell, copy_bandwidth, cpu_name, figure, fit_positions, ratio, \
    rows_text, start_run, time_columns, versions
from llamacpp_column import add_option, write_llamacpp_section
from mocompile.dsl import build_model, load_spec
from mocompile.dsl.summary import parameter_counts
from mocompile.progress import Bar
from mocompile.runtime import load, random_inputs
from results import write_section
from vm_profile import kernel_launch_us, kernel_profile, profile_lines

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"
EXAMPLES = ["mixtral_tiny", "deepseek_tiny", "unified_tiny"]
CASES = [("decode", 1, 1), ("decode", 8, 1), ("prefill", 1, 64), ("prefill", 1, 512)]  # (kind, batch, tokens)
# a case longer than a model's max_seq runs at max_seq (harness.fit_positions)
COLUMNS = ["artifact", "eager", "torch.compile", "onnxruntime", "iree"]


def checked(run, want: np.ndarray, what: str):
    """`run` after one call of it matched eager (as every column is checked before it is timed)."""
    check_close(run()["logits"], want, what)
    return run


def decode_row(name: str, art, iree, model: torch.nn.Module, twin: torch.nn.Module, batch: int, segments: int) -> dict:
    """One single-token step after ~PAST cached positions (a multimodal prompt splits them over
    its segments), on every side; `twin` is the loop-free model of the graph baselines."""
    token_name = art.token_input.name
    per_segment = PAST // segments
    cached = per_segment * segments
    prompt = random_inputs(art.signature, batch, per_segment, seed=1)
    token = random_inputs(art.signature, batch, 1, seed=2)[token_name]
    step, graph_step = TokenStep(model, token_name), TokenStep(twin, token_name)
    with torch.no_grad():
        _, *past = step.step.segments({k: torch.from_numpy(v) for k, v in prompt.items()})
        args = (torch.from_numpy(token), *past)
        want = step(*args)[0].numpy()
        timed = artifact_step(art, prompt, {token_name: token})
        check_close(timed()["logits"], want, f"{name}: the artifact's step")
        row = {"case": f"decode b{batch} x1 (+{cached} cached)", "cached": cached}
        names = [token_name] + [f"past{i}" for i in range(len(past))]
        onnx_path = CACHE / f"{name}-decode-b{batch}.onnx"
        time_columns(row, {"artifact": lambda: timed, "eager": lambda: (lambda: step(*args)),
                           "torch.compile": lambda: compiled_runner(graph_step, args, {}, want, row),
                           "onnxruntime": lambda: ort_runner(graph_step, args, names, onnx_path, want),
                           "iree": lambda: checked(artifact_step(iree, prompt, {token_name: token}), want,
                                                   f"{name}: the IREE step")})
    return row


def forward_row(name: str, art, iree, model: torch.nn.Module, twin: torch.nn.Module, kind: str, batch: int, seq: int,
                segments: int) -> dict:
    """A forward over all positions (no cache), on every side."""
    inputs = random_inputs(art.signature, batch, seq, seed=1)
    torch_in = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        want = model(**torch_in).numpy()
        check_close(art.run(inputs)["logits"], want, f"{name}: the artifact")
        row = {"case": f"{kind} b{batch} x{seq * segments}"}
        args, names = tuple(torch_in.values()), list(torch_in)
        onnx_path = CACHE / f"{name}-{kind}-b{batch}-s{seq}.onnx"
        time_columns(row, {"artifact": lambda: (lambda: art.run(inputs)), "eager": lambda: (lambda: model(**torch_in)),
                           "torch.compile": lambda: compiled_runner(twin, (), torch_in, want, row),
                           "onnxruntime": lambda: ort_runner(twin, args, names, onnx_path, want),
                           "iree": lambda: checked(lambda: iree.run(inputs), want, f"{name}: the IREE module")})
    return row


def bench_example(name: str) -> list[dict]:
    spec = load_spec(ROOT / "examples" / f"{name}.moe")
    segments = len(spec.modalities)
    t0 = time.perf_counter()
    art = mocompile.compile(spec, out_dir=CACHE / name, batch=2, seq=4)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    iree = mocompile.compile(spec, target="mlir", out_dir=CACHE / f"{name}-mlir", batch=2, seq=4)
    iree_compile_s = time.perf_counter() - t0
    model = build_model(spec, seed=0)
    twin = loop_free(model)
    rows = []
    bar = Bar(f"benchmarking {name}", len(CASES), unit="cases", delay=0)
    for kind, batch, tokens in CASES:
        bar.update(0, f"{kind} batch {batch}")
        if kind == "decode" and art.can_decode:
            row = decode_row(name, art, iree, model, twin, batch, segments)
        else:
            seq = max(1, fit_positions(art, tokens) // segments)  # a multimodal model splits them over its segments
            row = forward_row(name, art, iree, model, twin, "forward" if kind == "decode" else kind, batch, seq,
                              segments)
        bar.print(f"{name} {row['case']}: " + ", ".join(f"{c} {cell(row, c)}" for c in COLUMNS))
        bar.update(1)
        function = "step" if row["case"].startswith("decode") else "main"
        rows.append({"model": name, "compile_s": compile_s, "iree_compile_s": iree_compile_s, **row,
                     "roof_ms": roofline_ms(spec, art, row["bandwidth"], row.get("cached", 0)),
                     "kernels": art.manifest["program"]["kernel_calls"][function], "path": art.path})
    bar.close()
    return rows


def roofline_ms(spec, art, bandwidth: float, cached: int) -> float:
    """Time to read what one single-token step must read at `bandwidth`: the weights it uses
    (active experts only) and, with a cache, the keys and values of the `cached` positions."""
    active = parameter_counts(spec)["active_per_token"]
    step = art.manifest["program"].get("step")
    per_position = 0
    for t in (step or {}).get("cache", []) if cached else []:
        per_position += int(np.prod([d for d in t["shape"] if isinstance(d, int)]))
    return 1e3 * 4 * (active + per_position * (cached + 1)) / bandwidth


def is_single(row: dict) -> bool:
    return row["case"].startswith(("decode b1 ", "forward b1 "))


def breaks_summary(rows: list[dict]) -> str:
    """How many graph breaks torch._dynamo.explain counted, over the rows of this run."""
    counted = [r for r in rows if "graph_breaks" in r]
    clean = [r for r in counted if r["graph_breaks"] == 0]
    parts = [f"0 in {len(clean)} of {rows_text(len(rows))}"]
    parts += [f"{r['graph_breaks']} in {r['model']} {r['case']}" for r in counted if r["graph_breaks"]]
    if len(counted) < len(rows):
        parts.append(f"not counted in {len(rows) - len(counted)} (the baseline failed before)")
    return ", ".join(parts)


def header(rows: list[dict], bandwidth: float, launch_us: float, argv: list[str], stamp: str) -> list[str]:
    return [
        "## Models side by side (`python benchmarks/bench_models.py`)", "",
        f"Run of `python benchmarks/bench_models.py{''.join(' ' + a for a in argv)}` ({stamp}): {cpu_name()}, "
        f"{versions()}; {THREADS.header(COLUMNS)}. Medians in ms, the columns of a row timed in {ROUNDS} alternating "
        "rounds; ratio = artifact / column (below 1 means the artifact is faster).",
        "",
        "Columns: artifact = the mocompile artifact (decode rows: its cached `step` function); eager = the reference "
        "model (`dsl/`) as built, its experts in a Python loop over the experts hit; torch.compile = "
        f"{COMPILED_MODEL}, graph breaks counted by `torch._dynamo.explain` first ({breaks_summary(rows)}; a row with "
        "any is not timed); onnxruntime = a torch.onnx (dynamo) export per shape of that same loop-free model; iree = "
        "the same compiled model (after the same passes: none) exported by `--target mlir` (torch-mlir, linalg, "
        "dynamic shapes; experts gathered per token) and compiled by IREE for llvm-cpu on this CPU, run through "
        "`runtime.load` (decode rows: its `step`, the cache passed in and out). Every baseline is checked against "
        "eager before it is timed. `decode` rows: one single-token step after "
        f"the {PAST} positions (a multimodal prompt: as many as its segments share evenly; the row gives the count) "
        "held in a KV cache on every side (torch: the reference model with a Hugging Face style cache, "
        "`dsl/kv_cache.py`, the cache passed as inputs). `forward` rows (multimodal inputs: the cached torch step "
        "here takes token ids only): a one-position forward without cache on every side. `prefill` rows: a forward "
        "over all positions (a case longer than the model's max_seq runs at max_seq; the row gives the count).",
        "",
        f"Measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s at the start; each row's roofline uses the bandwidth "
        f"measured around its own timing ({min(r['bandwidth'] for r in rows) / 1e9:.1f}-"
        f"{max(r['bandwidth'] for r in rows) / 1e9:.1f} GB/s in this run). One kernel launch through the Relax VM: "
        f"{launch_us:.2f} us; `kernels x launch` multiplies it by the step's kernel calls (from the manifest).",
        "",
        "| model | case | artifact | eager | torch.compile | onnxruntime | iree | artifact/eager | artifact/compile "
        "| artifact/ORT | artifact/IREE | roofline (b1) | kernels x launch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]


def table_row(r: dict, launch_us: float) -> str:
    roof = f"{r['artifact'] / r['roof_ms']:.1f}x of {r['roof_ms']:.4f} ms" if is_single(r) else ""
    launches = f"{r['kernels']} x {launch_us:.2f} us = {r['kernels'] * launch_us / 1e3:.3f} ms" if is_single(r) else ""
    return (f"| {r['model']} | {r['case']} | " + " | ".join(cell(r, c) for c in COLUMNS) + " | "
            + " | ".join(ratio(r["artifact"], r[c]) for c in COLUMNS[1:]) + f" | {roof} | {launches} |")


def target_verdicts(rows: list[dict]) -> list[str]:
    """One line per target of the fast-CPU issue: met or missed in this run, and by how much."""
    def verdict(label: str, ratios: list[float], limit: float) -> str:
        measured = [r for r in ratios if r == r]  # NaN: a baseline not measured (listed below the table)
        if not measured:
            return f"- {label} (<= {limit}): not measured in any row"
        worst = max(measured)
        state = "met" if worst <= limit else f"MISSED by {worst / limit:.2f}x"
        missing = len(ratios) - len(measured)
        unmeasured = f"; {missing} of {len(ratios)} rows not measured" if missing else ""
        return f"- {label} (<= {limit}): worst {figure(worst)} over {rows_text(len(measured))}, {state}{unmeasured}"

    decode = [r for r in rows if r["case"].startswith(("decode", "forward"))]
    prefill = [r for r in rows if r["case"].startswith("prefill")]
    single = [r for r in decode if is_single(r)]
    lengths = sorted({int(r["case"].rsplit("x", 1)[1]) for r in prefill})
    return [
        verdict("decode step, artifact / eager", [r["artifact"] / r["eager"] for r in decode], 0.8),
        verdict("decode step, artifact / torch.compile", [r["artifact"] / r["torch.compile"] for r in decode], 1.0),
        verdict("decode step, artifact / ONNX Runtime", [r["artifact"] / r["onnxruntime"] for r in decode], 1.0),
        verdict("batch-1 step, artifact / bandwidth roofline", [r["artifact"] / r["roof_ms"] for r in single], 1.5),
        verdict(f"prefill x{', x'.join(map(str, lengths))}, artifact / eager",
                [r["artifact"] / r["eager"] for r in prefill], 1.0),
        verdict("compile seconds without tuning", [r["compile_s"] for r in single], 30.0),
    ]


def main() -> None:
    args, clock, _ = start_run(__doc__.splitlines()[0], EXAMPLES, measure=False, add_options=add_option)
    if args.llamacpp != "skip":  # fp32 against llama.cpp's F32, in a section of its own
        specs = {name: load_spec(ROOT / "examples" / f"{name}.moe") for name in args.models}
        write_llamacpp_section("models-llamacpp", "bench_models.py", specs, {"fp32": {"passes": "", "dtype": "fp32"}},
                               args.threads,
                               CACHE / "llamacpp", args.out, sys.argv[1:],
                               {"fp32": 4})
        if args.llamacpp == "only":
            return
    set_iree_threads()
    bandwidth = copy_bandwidth()
    launch_us = kernel_launch_us()
    rows = [r for name in args.models for r in bench_example(name)]
    body = [table_row(r, launch_us) for r in rows]
    body += ["", "Compile time without tuning (s): " + ", ".join(
        f"{r['model']} {r['compile_s']:.1f}" for r in rows if is_single(r))]
    body += ["", "Compile time of the mlir target (export, IREE, verification; s): " + ", ".join(
        f"{r['model']} {r['iree_compile_s']:.1f}" for r in rows if is_single(r))]
    body += ["", "### Targets in this run", *target_verdicts(rows)]
    for r in sorted([r for r in rows if is_single(r)], key=lambda r: -r["artifact"] / r["roof_ms"])[:2]:
        prof = kernel_profile(load(r["path"], driver=False))  # the VM path: the driver is not instrumented
        body += profile_lines(r["model"], r["case"], r["artifact"], prof)
    errors = [f"{r['model']} {r['case']}: {e}" for r in rows for e in r.get("errors", [])]
    if errors:
        body += ["", "Baselines not measured (their cells above say why):", *[f"- {e}" for e in errors]]
    body += ["", "Notes on this and earlier runs, written by hand and dated: `benchmarks/NOTES.md`."]
    lines = header(rows, bandwidth, launch_us, sys.argv[1:], clock.stamp()) + body
    write_section("models", "\n".join(lines), args.out)
    print("\n".join(lines))
    print(f"\nwritten to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
