"""Side-by-side timing of each example: mocompile artifact vs eager PyTorch vs torch.compile vs ORT.

Run:  python benchmarks/bench_models.py   (a few minutes; writes benchmarks/RESULTS.md)
Never run by the tests. Every column (artifact, eager, torch.compile, ONNX Runtime) gets the same inputs in the same
process, 2 threads each.
What is measured, exactly: a forward pass over the given positions with no KV cache (the
artifact has no decode path yet), so "decode" rows are a one-position forward.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from mocompile.threads import configure_tvm_threads

configure_tvm_threads()  # before anything starts TVM's thread pool

import numpy as np  # noqa: E402
import torch  # noqa: E402

import mocompile  # noqa: E402
from mocompile.dsl import build_model, load_spec  # noqa: E402
from mocompile.dsl.modules import Experts  # noqa: E402
from mocompile.dsl.summary import parameter_counts  # noqa: E402
from mocompile.runtime import random_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"
EXAMPLES = ["mixtral_tiny.moe", "deepseek_tiny.moe", "unified_tiny.moe"]
CASES = [("decode", 1, 1), ("decode", 8, 1), ("prefill", 1, 64), ("prefill", 1, 512)]  # (kind, batch, tokens)


def median_ms(fn: Callable[[], object], budget_s: float = 1.5, min_calls: int = 5, max_calls: int = 200) -> float:
    """Median wall time of fn() in ms after two warm-up calls, within a time budget."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a large numpy copy (read + write), best of five."""
    a = np.ones(64 * 2**20, dtype=np.float32)  # 256 MiB
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    return 2 * a.nbytes / best


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ort_runner(model: torch.nn.Module, torch_in: dict[str, torch.Tensor], path: Path) -> Callable[[], object]:
    """An ONNX Runtime session (2 threads) on an export of `model` for these input shapes,
    checked against eager first. The experts run in their loop-free gathered form for export
    (same arithmetic, only the chosen experts read), then the model is switched back."""
    import onnxruntime as ort

    experts = [m for m in model.modules() if isinstance(m, Experts)]
    for m in experts:
        m.export_friendly = True
    try:
        torch.onnx.export(model, (), str(path), kwargs=torch_in, input_names=list(torch_in), dynamo=True,
                          verbose=False)
    finally:
        for m in experts:
            m.export_friendly = False
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in torch_in.items()}
    with torch.no_grad():
        ref = model(**torch_in).numpy()
    got = session.run(None, feeds)[0]
    if not np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max():
        raise RuntimeError("ONNX Runtime output disagrees with eager")
    return lambda: session.run(None, feeds)


def bench_example(name: str) -> list[dict]:
    spec = load_spec(ROOT / "examples" / name)
    segments = len(spec.modalities)
    t0 = time.perf_counter()
    art = mocompile.compile(spec, out_dir=CACHE / name.removesuffix(".moe"), batch=2, seq=4)
    compile_s = time.perf_counter() - t0
    model = build_model(spec, seed=0)
    compiled = torch.compile(model)
    rows = []
    for kind, batch, tokens in CASES:
        seq = max(1, tokens // segments)  # a multimodal model splits the positions over its segments
        inputs = random_inputs(art.signature, batch, seq, seed=1)
        torch_in = {k: torch.from_numpy(v) for k, v in inputs.items()}
        with torch.no_grad():
            ref = model(**torch_in).numpy()
            got = art.run(inputs)["logits"]
            assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), f"{name}: artifact disagrees with eager"
            row = {"model": name.removesuffix(".moe"), "case": f"{kind} b{batch} x{seq * segments}",
                   "artifact": median_ms(lambda: art.run(inputs)),
                   "eager": median_ms(lambda: model(**torch_in)),
                   "compile_s": compile_s}
            onnx_path = CACHE / f"{row['model']}-{kind}-b{batch}-s{seq}.onnx"
            baselines = {"torch.compile": lambda: (lambda: compiled(**torch_in)),
                         "onnxruntime": lambda: ort_runner(model, torch_in, onnx_path)}
            for column, make in baselines.items():
                try:
                    row[column] = median_ms(make())
                except Exception as e:  # record, don't hide, a baseline's failure
                    row[column] = float("nan")
                    row.setdefault("errors", []).append(f"{column}: {type(e).__name__}: {str(e)[:100]}")
        rows.append(row)
    return rows


def roofline_ms(name: str, bandwidth: float) -> float:
    """Time to read the weights one single-token step needs (active experts only) at `bandwidth`."""
    active = parameter_counts(load_spec(ROOT / "examples" / name))["active_per_token"]
    return 1e3 * 4 * active / bandwidth


def main() -> None:
    torch.set_num_threads(2)
    bandwidth = copy_bandwidth()
    rows = [r for name in EXAMPLES for r in bench_example(name)]
    roof = {name.removesuffix(".moe"): roofline_ms(name, bandwidth) for name in EXAMPLES}
    lines = [
        "# Benchmarks",
        "",
        f"Run of `python benchmarks/bench_models.py` on {datetime.date.today()}: "
        f"{_cpu_name()}, {torch.get_num_threads()} threads for every column, Python {platform.python_version()}, "
        f"torch {torch.__version__}, tvm {_tvm_version()}. Medians in ms; ratio = artifact / column "
        "(below 1 means the artifact is faster). Every case is a forward pass over all its positions "
        "without a KV cache (the artifact has no decode path yet), so `decode` rows are one-position forwards. "
        "ONNX Runtime runs a torch.onnx (dynamo) export per shape, with the experts in their loop-free gathered "
        "form (`Experts.forward_gathered`: same arithmetic, only the chosen experts read), checked against eager.",
        "",
        f"Measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s.",
        "",
        "| model | case | artifact | eager | torch.compile | onnxruntime | artifact/eager | artifact/compile "
        "| artifact/ORT | roofline (b1) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        single = r["case"].startswith("decode b1 ")
        roof_cell = f"{r['artifact'] / roof[r['model']]:.0f}x of {roof[r['model']]:.4f} ms" if single else ""
        lines.append(f"| {r['model']} | {r['case']} | {r['artifact']:.3f} | {r['eager']:.3f} | {r['torch.compile']:.3f} "
                     f"| {r['onnxruntime']:.3f} | {r['artifact'] / r['eager']:.2f} "
                     f"| {r['artifact'] / r['torch.compile']:.2f} | {r['artifact'] / r['onnxruntime']:.2f} | {roof_cell} |")
    lines += ["", "Compile time without tuning (s): " + ", ".join(
        f"{r['model']} {r['compile_s']:.1f}" for r in rows if r["case"].startswith("decode b1"))]
    lines += ["", "## Targets in this run", *target_verdicts(rows, roof)]
    errors = [f"{r['model']} {r['case']}: {e}" for r in rows for e in r.get("errors", [])]
    if errors:
        lines += ["", "Baseline failures (NaN in the table):", *[f"- {e}" for e in errors]]
    out = ROOT / "benchmarks" / "RESULTS.md"
    out.write_text("\n".join(lines) + "\n" + TARGETS_NOTE)
    print("\n".join(lines))
    print(f"\nwritten to {out}", file=sys.stderr)


def target_verdicts(rows: list[dict], roof: dict[str, float]) -> list[str]:
    """One line per target of the fast-CPU issue: met or missed in this run, and by how much."""
    def verdict(label: str, ratios: list[float], limit: float) -> str:
        worst = max(ratios)
        state = "met" if worst <= limit else f"MISSED by {worst / limit:.2f}x"
        return f"- {label} (<= {limit}): worst {worst:.2f}, {state}"

    decode = [r for r in rows if r["case"].startswith("decode")]
    prefill = [r for r in rows if r["case"].startswith("prefill")]
    single = [r for r in decode if r["case"].startswith("decode b1 ")]
    return [
        verdict("one-position forward, artifact / eager", [r["artifact"] / r["eager"] for r in decode], 0.8),
        verdict("one-position forward, artifact / torch.compile", [r["artifact"] / r["torch.compile"] for r in decode], 1.0),
        verdict("one-position forward, artifact / ONNX Runtime", [r["artifact"] / r["onnxruntime"] for r in decode], 1.0),
        verdict("batch-1 step, artifact / bandwidth roofline", [r["artifact"] / roof[r["model"]] for r in single], 1.5),
        verdict("prefill 64 and 512, artifact / eager", [r["artifact"] / r["eager"] for r in prefill], 1.0),
        verdict("compile seconds without tuning", [r["compile_s"] for r in single], 30.0),
    ]


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


TARGETS_NOTE = """
## Against the fast-CPU issue's targets

Read the ratios above; they are from one run on a shared 2-core machine. What this run does not cover:
- **ONNX Runtime:** the HF-style expert loop cannot be exported, so ORT runs the gathered form, which copies
  each (token, slot)'s expert weights: fine for decode, memory-heavy for long prefill. Against ORT the artifact
  is at parity for deepseek_tiny's batch-8 one-position forward (about 1.0-1.1x across runs; 16 fine-grained
  experts, group-limited sigmoid routing and a shared expert per layer): not yet profiled.
- **Decode with a KV cache: missing.** The artifact has no cache yet, so the decode rows compare one-position
  forwards on both sides; a real decode step (prefix cached) is still to be built (IR op, kernel, runtime API).
- **Roofline:** bytes = active parameters per token (every dense weight, top-k experts per MoE layer, one
  embedding row) x 4 bytes, over the measured copy bandwidth. The example models are tiny (0.4-0.5 M active
  parameters, ~2 MB, which sit in cache), so a batch-1 step (~25 kernel calls through the Relax VM) is bound by
  per-call overhead, not by bandwidth: ~0.1 ms of weight traffic against 0.2-0.3 ms per step. unified_tiny has
  the most small kernels per step (three segment embeddings, a concat, segment ids, modality-masked routing)
  and the elementwise/concat kernels always wake the thread pool (no small-work shortcut yet; see
  backends/tvm_cpu/README.md): it swung from 3x to 12x of its roofline between two runs on this shared machine.
  A per-kernel profile is the next step.
"""

if __name__ == "__main__":
    main()
