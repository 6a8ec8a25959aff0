"""Sparsity and layer skipping: per pass and setting, the measured decode and prefill speed-up of
the artifact over the dense artifact, next to the quality the pass report measured on held-out
calibration sequences, and the elastic pass's Pareto front as a plot.

Run:  python benchmarks/bench_sparsity.py [--threads N] [--models M ...] [--out PATH]
(all models by default; rewrites the "sparsity" section of benchmarks/RESULTS.md). Never run
by the tests. The examples use their trained weights and calibration sequences of the language
they were trained on (examples/train_synthetic.py); `benchmarks/specs/moe_medium.moe` has no
trained weights, so its quality figures are on random tokens and random weights (the section
says so) and only its speed-ups mean much. Every artifact is timed in one process, interleaved
with the dense one, with the same inputs and thread count.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

import mocompile
from mocompile.errors import MocompileError
from engines import set_threads
from harness import RunClock, artifact_columns, cpu_name, fit_positions, options, ratio, time_columns, versions
from mocompile.dsl import load_spec
from results import write_section

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache" / "sparsity"
PLOT = ROOT / "benchmarks" / "sparsity_pareto.png"
MODELS = {"mixtral_tiny": ROOT / "examples" / "mixtral_tiny.moe", "deepseek_tiny": ROOT / "examples" / "deepseek_tiny.moe",
          "moe_medium": ROOT / "benchmarks" / "specs" / "moe_medium.moe"}
SETTINGS = ["prune-experts(ratio=0.5)", "prune-neurons(ratio=0.25)", "prune-neurons(ratio=0.5)", "top-k(k=1)",
            "skip-layers(speedup=1.5)", "skip-layers(n=1,by=influence)", "elastic(budget=0.6)",
            "contextual-sparsity(keep=0.5)", "contextual-sparsity(keep=0.3)"]
# `--only SETTING ...` runs the dense artifact and these settings alone and writes them into the
# subsection ONLY_SECTION inside the sparsity section (a partial run next to the full one)
ONLY_SECTION = "sparsity-partial"
CASES = [("decode", 1, 1), ("prefill", 1, 64)]
REPEATS = 3  # interleaved timings per case; each column's figure is the median of their medians
ELASTIC_GRID = {"moe_medium": "skip=0|1,experts=1|0.5,k=2|1,neurons=0|0.5"}  # 16 candidates of a 420 MB model


def calibration(name: str, path: Path) -> Path | None:
    """Held-out-able calibration ids of the language an example was trained on (None: random)."""
    weights = ROOT / "examples" / "weights" / f"{name}.safetensors"
    if not weights.is_file():
        return None
    spec = importlib.util.spec_from_file_location("train_synthetic", ROOT / "examples" / "train_synthetic.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    out = CACHE / f"{name}-calib.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, trainer.calibration_tokens(load_spec(path), 16, 32))
    return out


def bench_model(name: str, path: Path, settings: list[str] = SETTINGS) -> list[dict]:
    weights = ROOT / "examples" / "weights" / f"{name}.safetensors"
    calib = calibration(name, path)
    common = dict(batch=2, seq=4, weights=weights if weights.is_file() else None, calibration=calib)
    arts, rows = {}, []
    for setting in ["dense", *settings]:
        passes = "" if setting == "dense" else setting
        if setting.startswith("elastic"):
            extra = [f"plot={PLOT}"] if name == "deepseek_tiny" else []
            passes = setting[:-1] + "".join("," + e for e in extra + ([ELASTIC_GRID[name]] if name in ELASTIC_GRID
                                                                       else [])) + ")"
        t0 = time.perf_counter()
        try:
            arts[setting] = mocompile.compile(path, passes=passes, out_dir=CACHE / f"{name}-{len(arts)}", **common)
        except MocompileError as e:  # a setting the model cannot take (too few layers)
            rows.append({"setting": setting, "refused": str(e)})
            print(f"{name} {setting}: refused: {e}", file=sys.stderr)
            continue
        report = next(iter(arts[setting].manifest["passes"]), {})
        rows.append({"setting": setting, "summary": report.get("summary", ""), "quality": report.get("quality", {}),
                     "active": report.get("active_params"), "compile_s": time.perf_counter() - t0})
        print(f"compiled {name} {setting} in {rows[-1]['compile_s']:.1f} s", file=sys.stderr)
    for kind, batch, tokens in CASES:
        case, makers, _ = artifact_columns(arts, kind, batch, fit_positions(arts["dense"], tokens))
        repeats = []
        for _ in range(REPEATS):
            timed: dict = {}
            time_columns(timed, makers)
            repeats.append(timed)
        timed = {s: float(np.median([t[s] for t in repeats])) for s in makers}
        for row in rows:
            if row["setting"] in timed:
                row[kind] = timed[row["setting"]]
                row[f"{kind}_case"] = case
        print(f"{name} {case}: " + ", ".join(f"{s} {timed[s]:.3f}" for s in arts), file=sys.stderr)
    return rows


def table(name: str, rows: list[dict], random: bool) -> list[str]:
    dense = next(r for r in rows if r["setting"] == "dense")
    lines = [f"### {name}" + (" (random weights, random calibration tokens: quality figures are not meaningful)"
                               if random else " (trained weights, held-out calibration of the training language)"),
             "", f"| setting | decode speed-up ({dense.get('decode_case', '')}) | prefill speed-up "
                 f"({dense.get('prefill_case', '')}) | active params/token | held-out KL | top-1 agreement | "
                 "routing kept |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| `{r['setting']}` | refused: {r['refused']} | | | | | |")
            continue
        q = r["quality"]
        active = f"{r['active'][1] / r['active'][0]:.0%}" if r.get("active") else "100%"
        lines.append(f"| `{r['setting']}` | {ratio(dense['decode'], r['decode'])} | {ratio(dense['prefill'], r['prefill'])}"
                     f" | {active} | {q.get('kl_mean', 0):.3g} | {100 * q.get('top1_agreement', 1):.1f}% | "
                     f"{100 * q.get('routing_agreement', 1):.1f}% |")
    lines += ["", "Summary lines printed by `mocompile compile`:", "", "```"]
    lines += [f"{r['setting']}: {r['summary']}" for r in rows if r.get("summary")] + ["```", ""]
    return lines


def main() -> None:
    parser = options(__doc__.splitlines()[0], list(MODELS))
    parser.add_argument("--only", nargs="+", choices=SETTINGS, metavar="SETTING",
                        help=f"run these settings (and dense) alone, into the {ONLY_SECTION} subsection")
    args = parser.parse_args()
    set_threads(args.threads)
    clock = RunClock()
    sections = []
    for name in args.models:
        rows = bench_model(name, MODELS[name], args.only or SETTINGS)
        sections += table(name, rows, not (ROOT / "examples" / "weights" / f"{name}.safetensors").is_file())
    if args.only:
        head = [f"### Settings run on their own: {', '.join(args.only)}", "",
                f"{cpu_name()}; {versions()}; {args.threads} threads; {clock.stamp()}; models: {', '.join(args.models)}. "
                "Same measurement as above, against a dense artifact timed in the same run.", ""]
        write_section(ONLY_SECTION, "\n".join(head + [line.replace("### ", "#### ", 1) for line in sections]), args.out)
        print(f"wrote the {ONLY_SECTION} subsection of {args.out}", file=sys.stderr)
        return
    head = ["## Sparsity and layer skipping (`bench_sparsity.py`)", "",
            f"{cpu_name()}; {versions()}; {args.threads} threads; {clock.stamp()}; models: {', '.join(args.models)}.",
            "Speed-up: median time of the dense artifact / the pruned one (decode: one token after 64 cached; "
            f"prefill: 64 tokens; {REPEATS} interleaved timings, median of their medians). Quality: the pass report's figures on held-out calibration sequences against the "
            "dense model (for elastic, the chosen candidate).", ""]
    if PLOT.is_file() and "deepseek_tiny" in args.models:
        head += [f"Elastic Pareto front of deepseek_tiny (budget 0.6 of the active parameters): "
                 f"![pareto]({PLOT.name})", ""]
    write_section("sparsity", "\n".join(head + sections), args.out)
    print(f"wrote the sparsity section of {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
