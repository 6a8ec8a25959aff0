"""Tuned against untuned artifacts: what `compile --tune N` buys on this machine.

Run:  python benchmarks/bench_tune.py [TRIALS] [--threads N] [--models M ...] [--out PATH]
(TRIALS per model, default 160; rewrites the "tuning" section of benchmarks/RESULTS.md). Never run
by the tests. For each model: an untuned compile and one with `--tune N` (MetaSchedule for
the dense matmuls, the tile search for the per-expert ones, see backends/tvm_cpu/tuning.py),
the per-kernel speed-ups the tuner measured and which kernels kept MetaSchedule's, then both
artifacts timed side by side in one process (one thread count, engines.py; alternating
rounds): decode steps at batch 1 and 8, prefill of 64 and 512 tokens (or max_seq). The section holds only
what the run measured; analysis and history are in benchmarks/NOTES.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mocompile
from engines import THREADS, set_threads
from harness import ROUNDS, RunClock, artifact_rows, cpu_name, options, versions
from mocompile.backends.tvm_cpu.tuning import MEASURE_ROWS
from mocompile.dsl import load_spec
from results import write_section

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache" / "tune"
MODELS = {"mixtral_tiny": ROOT / "examples" / "mixtral_tiny.moe",
          "moe_medium": ROOT / "benchmarks" / "specs" / "moe_medium.moe"}
CASES = [("decode", 1, 1), ("decode", 8, 1), ("prefill", 1, 64), ("prefill", 1, 512)]  # (kind, batch, tokens)
# a case longer than a model's max_seq runs at max_seq (harness.fit_positions)


def compile_pair(path: Path, trials: int) -> tuple[dict, dict]:
    """The untuned and the tuned artifact of `path` (fresh directories), and the tuning facts."""
    spec = load_spec(path)
    arts, info = {}, {}
    for name, tune in (("untuned", 0), ("tuned", trials)):
        out = CACHE / f"{spec.name}-{name}"
        if (out / "tuning.json").exists():
            (out / "tuning.json").unlink()  # start from no database: this measures one tuning run
        t0 = time.perf_counter()
        arts[name] = mocompile.compile(spec, out_dir=out, tune=tune, batch=2, seq=4)
        info[f"{name}_s"] = time.perf_counter() - t0
    records = json.loads((arts["tuned"].path / "tuning.json").read_text())["records"]
    info["report"] = arts["tuned"].manifest["tuning"]
    info["records"] = records
    return arts, info


def bench_model(path: Path, trials: int) -> tuple[list[dict], dict]:
    arts, info = compile_pair(path, trials)
    return artifact_rows(path.stem, arts, CASES), info


def kernel_lines(model: str, info: dict) -> list[str]:
    out = []
    for key, record in sorted(info["records"].items()):
        how = ("MetaSchedule for " + ", ".join(sorted(record["metaschedule"])) + " rows" if record.get("metaschedule")
               else f"hand-written TJ {record['tj']} TI {record['ti']} KU {record['ku']}")
        us = " / ".join(f"{d:.1f} -> {t:.1f}" for d, t in zip(record["default_us"], record["us"]))
        out.append(f"| {model} | {key} | {us} | {info['report']['tuned'].get(key, 1.0):.2f} | {how} |")
    return out


def main() -> None:
    parser = options(__doc__.splitlines()[0], list(MODELS))
    parser.add_argument("trials", nargs="?", type=int, default=160, help="tuning trials per model (default 160)")
    args = parser.parse_args()
    clock = RunClock()
    set_threads(args.threads)
    trials = args.trials
    rows_label = " / ".join(map(str, MEASURE_ROWS))
    lines = [f"| model | kernel | us at {rows_label} rows | speed-up | chosen |", "|---|---|---|---|---|"]
    timing = ["", "| model | case | untuned | tuned | untuned / tuned |", "|---|---|---|---|---|"]
    summary = [""]
    ratios = []
    for name in args.models:
        rows, info = bench_model(MODELS[name], trials)
        lines += kernel_lines(name, info)
        timing += [f"| {r['model']} | {r['case']} | {r['untuned']:.3f} | {r['tuned']:.3f} | {r['untuned'] / r['tuned']:.2f} |"
                   for r in rows]
        ratios += [r["untuned"] / r["tuned"] for r in rows]
        kept = sum(1 for r in info["records"].values() if r.get("metaschedule"))
        summary.append(f"- {name}: compile {info['untuned_s']:.1f} s untuned, {info['tuned_s']:.1f} s with "
                       f"`--tune {trials}` ({info['report']['trials']} trials over {info['report']['kernels']} kernels; "
                       f"{kept} dense kernels kept MetaSchedule's row kernels)")
    summary += [f"- untuned / tuned over the {len(ratios)} rows: {min(ratios):.2f}-{max(ratios):.2f}"]
    head = ["## Tuning (`python benchmarks/bench_tune.py`)", "",
            f"Run of `python benchmarks/bench_tune.py{''.join(' ' + a for a in sys.argv[1:])}` ({clock.stamp()}): "
            f"{cpu_name()}, {versions()}; `--tune {trials}` per model from an empty database; "
            f"{THREADS.header(['artifact'])}. Per kernel: the tuner's own measurement (us at {rows_label} rows, default "
            f"-> chosen) and what it chose; then both artifacts side by side (medians in ms, {ROUNDS} alternating rounds).",
            ""]
    text = "\n".join(head + lines + timing + summary
                     + ["", "Notes on this and earlier runs, written by hand and dated: `benchmarks/NOTES.md`."])
    write_section("tuning", text, args.out)
    print(text)


if __name__ == "__main__":
    main()
