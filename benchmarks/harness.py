"""What every benchmark script shares: its command line, the timing of a row's columns, the
decode-step set-up of an artifact, and the description of the host.

The scripts compare columns measured in one process on the same inputs; what makes such a
comparison fair (interleaved rounds, the same cached step on every side, and through
engines.py one thread count) lives here once, so that no script can drift from the others.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

import engines
from results import RESULTS

PAST = 64  # cached positions before a decode step
ROUNDS = 5  # alternating timing rounds per row


def options(description: str, models: list[str]) -> argparse.ArgumentParser:
    """The options every script takes: the thread count of every column, which models to run
    (a subset makes a quick end-to-end check) and where the section is written (a reduced run
    is best written somewhere other than RESULTS.md, whose sections are full runs)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=2, metavar="N",
                        help="threads of every column: torch, torch.compile, ONNX Runtime and TVM (default 2)")
    parser.add_argument("--models", nargs="+", choices=models, default=models, metavar="MODEL",
                        help=f"models to run (default: all of {', '.join(models)})")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"the results file (default {RESULTS})")
    return parser


def median_ms(fn: Callable[[], object], budget_s: float = 1.5, min_calls: int = 5, max_calls: int = 200) -> float:
    """Median wall time of fn() in ms after two warm-up calls, within a time budget."""
    return interleaved_ms({"fn": fn}, rounds=1, budget_s=budget_s, min_calls=min_calls, max_calls=max_calls)["fn"]


def interleaved_ms(fns: dict[str, Callable[[], object]], rounds: int = ROUNDS, budget_s: float = 0.3,
                   min_calls: int = 3, max_calls: int = 200) -> dict[str, float]:
    """Median wall time in ms of each fn, timed in `rounds` alternating rounds (each fn about
    `budget_s` per round) after two warm-up calls each: on a shared VM whose load drifts during
    a row, every column of the row then sees the same mix of quiet and busy moments."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start, calls = time.perf_counter(), 0
            while calls < max_calls and (calls < min_calls or time.perf_counter() - start < budget_s):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
                calls += 1
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def copy_bandwidth() -> float:
    """Bytes per second of a 256 MiB numpy copy (read + write), best of five."""
    from mocompile.vm_trace import memory_bandwidth

    return memory_bandwidth(megabytes=256)


class NotMeasured(Exception):
    """A baseline that could be built but must not be timed; `cell` is what its table cell says."""

    def __init__(self, cell: str, detail: str) -> None:
        super().__init__(detail)
        self.cell = cell


def time_columns(row: dict, runners: dict[str, Callable[[], Callable[[], object]]]) -> None:
    """Make each column's timed call, then time them all interleaved; the copy bandwidth is
    measured around the timing (a row's roofline uses it: it drifts with the host's load).

    A baseline that fails to build, or refuses to be timed (NotMeasured), gets NaN, a cell
    text in row["cells"] and a line in row["errors"]: it is recorded, not hidden. The engines'
    thread counts are read back before every row, so a pool resized mid-run stops it."""
    engines.THREADS.check()
    fns = {}
    for column, make in runners.items():
        try:
            fns[column] = make()
        except Exception as e:  # a failing baseline is a result of the run
            row[column] = float("nan")
            row.setdefault("cells", {})[column] = e.cell if isinstance(e, NotMeasured) else "not measured: failed"
            row.setdefault("errors", []).append(f"{column}: {type(e).__name__}: {str(e)[:300]}")
    before = copy_bandwidth()
    row.update(interleaved_ms(fns))
    row["bandwidth"] = (before + copy_bandwidth()) / 2


def cell(row: dict, column: str, fmt: str = ".3f") -> str:
    """A table cell: the column's median, or what stood in for it."""
    return row.get("cells", {}).get(column) or format(row[column], fmt)


def figure(x: float) -> str:
    """A ratio as text: two decimals, or two significant digits below 0.1 (where two decimals
    would round it to 0.00)."""
    return format(x, ".2f" if abs(x) >= 0.1 else ".2g")


def ratio(a: float, b: float) -> str:
    """a / b for a table, '-' where either side was not measured."""
    return figure(a / b) if a == a and b == b else "-"


def rows_text(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def fit_positions(art, tokens: int) -> int:
    """`tokens`, or the artifact's max_seq where that is smaller: the runtime refuses longer
    inputs (the model is built for max_seq positions), so a longer case runs at max_seq and
    its row's label says so."""
    max_seq = getattr(art, "max_seq", None)
    return min(tokens, max_seq) if max_seq else tokens


def artifact_step(art, prompt: dict[str, np.ndarray], token: dict[str, np.ndarray]) -> Callable[[], dict]:
    """Prefill `prompt` into a fresh cache; return the timed call: the step of `token` (the
    same step each call: the cache is rewound, stale rows past the prompt are never read)."""
    cached = sum(a.shape[1] for a in prompt.values())
    cache = art.new_cache(next(iter(prompt.values())).shape[0], cached + 1)
    art.step(prompt, cache)

    def step() -> dict:
        cache.length = cached
        return art.step(token, cache)

    return step


def artifact_columns(arts: dict, kind: str, batch: int, tokens: int) -> tuple[str, dict, dict[str, np.ndarray]]:
    """One case of text-model artifacts timed side by side: its row label, each artifact's
    timed-call maker for time_columns, and the token ids they get (a decode case: PAST cached
    positions then the one token a step appends; a prefill case: `tokens` positions)."""
    from mocompile.runtime import random_inputs

    first = next(iter(arts.values()))
    if kind == "decode":
        ids = random_inputs(first.signature, batch, PAST + 1, seed=1)["text"]
        prompt, token = {"text": ids[:, :PAST]}, {"text": ids[:, PAST:]}
        makers = {n: (lambda a=a: artifact_step(a, prompt, token)) for n, a in arts.items()}
        return f"decode b{batch} x1 (+{PAST} cached)", makers, {"text": ids}
    inputs = random_inputs(first.signature, batch, tokens, seed=1)
    return f"{kind} b{batch} x{tokens}", {n: (lambda a=a: (lambda: a.run(inputs))) for n, a in arts.items()}, inputs


def artifact_rows(model: str, arts: dict, cases: list[tuple[str, int, int]]) -> list[dict]:
    """A row per case (kind, batch, tokens) with each artifact of `arts` as a column, timed
    interleaved (time_columns); every row is printed to stderr as it is measured."""
    first = next(iter(arts.values()))
    rows = []
    for kind, batch, tokens in cases:
        case, makers, _ = artifact_columns(arts, kind, batch, fit_positions(first, tokens))
        row = {"model": model, "case": case}
        time_columns(row, makers)
        rows.append(row)
        print(f"{model} {case}: " + ", ".join(f"{name} {row[name]:.3f}" for name in arts), file=sys.stderr)
    return rows


def start_run(description: str, models: list[str], measure: bool = True,
              add_options: Callable[[argparse.ArgumentParser], None] | None = None,
              ) -> tuple[argparse.Namespace, "RunClock", float | None]:
    """The options parsed (`add_options` adds a script's own to the common ones), the run's
    clock started, every engine's threads set and, with `measure`, the copy bandwidth at the
    start measured: what a script does before its first model. A script that first runs
    something else (the llama.cpp column: a build and its own timings) passes measure=False,
    gets None, and calls copy_bandwidth right before its own tables."""
    parser = options(description, models)
    if add_options is not None:
        add_options(parser)
    args = parser.parse_args()
    clock = RunClock()
    engines.set_threads(args.threads)
    return args, clock, copy_bandwidth() if measure else None


def cpu_name() -> str:
    """The CPU's model name and its widest vector extension (the kernels' speed depends on it)."""
    from mocompile.backends.tvm_cpu.target import cpu_flags

    name, flags = platform.processor() or "unknown CPU", cpu_flags()
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    isa = "AVX-512" + (" VNNI" if "avx512_vnni" in flags else "") if "avx512f" in flags else \
        "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa})"


def versions() -> str:
    """Python, torch and TVM versions, as the header of a section states them."""
    import torch
    import tvm

    return f"Python {platform.python_version()}, torch {torch.__version__}, tvm {tvm.__version__}"


class RunClock:
    """When a run began (UTC), how long it took and how busy the host was: the date a note in
    NOTES.md cites, and the load that the timings of a shared machine depend on."""

    def __init__(self) -> None:
        self.start, self.load = time.time(), _load()

    def stamp(self) -> str:
        began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.start))
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        load = f"; 1-minute load average {self.load:.1f} at the start, {_load():.1f} at the end, on {cpus} CPUs" \
            if self.load == self.load else ""
        return f"began {began}, took {(time.time() - self.start) / 60:.1f} min{load}"


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
