"""Expert placement on the cost model: the plan against EPLB and round-robin over many loads.

Run:  python benchmarks/bench_placement.py [--seeds N] [--out PATH]
(rewrites the "placement" section of benchmarks/RESULTS.md). Never run by the tests.

For every device preset and load family (uniform random, Dirichlet(0.3), Zipf with exponents
0.8 to 1.5) and every seed, one layer's statistics are drawn and placed three ways with the
same redundant-replica budget (one per device, DeepSeek's setting), and the modelled step
times compared: plan / EPLB (at most 1 by construction) and plan / round-robin. The step
times are the cost model's (mocompile/placement/cost.py), not measurements on the devices;
what is measured here is the planning time on this host.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import RESULTS, write_section  # noqa: E402

from mocompile.placement.cost import ExpertShape  # noqa: E402
from mocompile.placement.plan import make_plan  # noqa: E402
from mocompile.placement.presets import preset  # noqa: E402
from mocompile.placement.stats import ExpertStats, LayerStats, zipf_stats  # noqa: E402

# (preset, experts, top_k, groups, topk_group, expert shape, seeds scale)
SETUPS = [
    ("1node-8gpu", 64, 6, 8, 4, ExpertShape(2048, 1408), 1.0),  # DeepSeek-V2-Lite-sized layer
    ("2node-4gpu", 64, 6, 8, 4, ExpertShape(2048, 1408), 1.0),
    ("gpu+cpu", 64, 6, 8, 4, ExpertShape(2048, 1408), 1.0),
    ("gpu+fpga", 64, 6, 8, 4, ExpertShape(2048, 1408), 1.0),
    ("8node-64gpu", 256, 8, 8, 4, ExpertShape(7168, 2048), 0.4),  # DeepSeek-V3-sized layer
]
LOADS = ["uniform", "dirichlet0.3", "zipf0.8", "zipf1.0", "zipf1.2", "zipf1.5"]
TOKENS = 8192


def load(kind: str, experts: int, top_k: int, groups: int, topk_group: int, seed: int) -> ExpertStats:
    if kind.startswith("zipf"):
        return zipf_stats(experts, top_k, TOKENS, float(kind[4:]), seed=seed, n_group=groups, topk_group=topk_group)
    rng = np.random.default_rng(seed)
    share = rng.uniform(0.2, 1.0, experts) if kind == "uniform" else rng.dirichlet(np.full(experts, 0.3))
    tokens = np.round(share / share.sum() * TOKENS * top_k)
    return ExpertStats({0: LayerStats(tokens)}, {"top_k": top_k, "n_group": groups})


def cpu_model() -> str:
    """The CPU's model name (Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="loads per family and setup (default 5)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    start, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    load_start = os.getloadavg()[0]
    rows, worst = [], 0.0
    for name, experts, k, groups, kg, shape, scale in SETUPS:
        cluster = preset(name)
        seeds = max(1, round(args.seeds * scale))
        for kind in LOADS:
            vs_eplb, vs_rr, imb, imb_eplb, imb_rr, seconds = [], [], [], [], [], []
            for seed in range(seeds):
                stats = load(kind, experts, k, groups, kg, seed)
                t = time.perf_counter()
                plan = make_plan(stats, cluster, shape, replicas=len(cluster.devices))
                seconds.append(time.perf_counter() - t)
                vs_eplb.append(plan.placed.step_time_s / plan.eplb.step_time_s)
                vs_rr.append(plan.placed.step_time_s / plan.round_robin.step_time_s)
                imb += [plan.placed.imbalance]
                imb_eplb += [plan.eplb.imbalance]
                imb_rr += [plan.round_robin.imbalance]
            worst = max(worst, max(vs_eplb))
            rows.append(f"| {name} | {experts} top-{k} | {kind} | {seeds} | {statistics.median(vs_eplb):.3f} "
                        f"({min(vs_eplb):.3f}-{max(vs_eplb):.3f}) | {statistics.median(vs_rr):.3f} "
                        f"({min(vs_rr):.3f}-{max(vs_rr):.3f}) | {statistics.median(imb):.3f} | "
                        f"{statistics.median(imb_eplb):.3f} | {statistics.median(imb_rr):.3f} | "
                        f"{statistics.median(seconds):.2f} |")
            print(rows[-1], flush=True)
    took = (time.perf_counter() - t0) / 60
    host = f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    text = "\n".join([
        "## Expert placement on the cost model (`python benchmarks/bench_placement.py`)",
        "",
        f"Run of `python benchmarks/bench_placement.py {' '.join(sys.argv[1:])}`".rstrip() + f" (began {start}, took "
        f"{took:.1f} min; 1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end) "
        f"on {host}.",
        "",
        f"One layer per load, {TOKENS} tokens, as many redundant replicas as devices for every placement. "
        "Step times are modelled (mocompile/placement/cost.py: slowest device's expert compute + slowest "
        "device's all-to-all), not measured on the devices; the planning time is measured here. Ratio columns: "
        "median (min-max) of plan step time / baseline step time (below 1: the plan is faster). Imbalance: "
        "max/mean tokens per device (a plan on unequal devices is uneven on purpose).",
        "",
        "| setup | layer | load | loads | plan / EPLB | plan / round-robin | imbalance plan | EPLB | "
        "round-robin | plan s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Worst plan / EPLB over all {sum(max(1, round(args.seeds * s[-1])) for s in SETUPS) * len(LOADS)} loads: "
        f"{worst:.4f}.",
    ])
    write_section("placement", text, args.out)
    print(text)


if __name__ == "__main__":
    main()
