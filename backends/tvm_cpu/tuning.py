"""`compile --tune N`: measure tilings of the model's matmul kernels on this machine, keep
the fastest per kernel in a tuning database, and reuse it on the next compile.

What is searched: for every matmul the lowered program uses (`MatmulShape`: dense or
per-expert, k x n, fused GLU, weight format), the panel width TJ (which also fixes the
weight layout) and the register tile (rows TI, reduction unroll KU) of
kernels_matmul's hand-written kernels. Each candidate is built on its own and timed with
TVM's time_evaluator at a single-token shape and a 64-row shape (random data; for a
per-expert kernel, rows spread over the experts the way top-k routing spreads them); its
score is the geometric mean of its two times over the default tiling's. N trials are shared
across the kernels, the default is always measured first, and a kernel keeps the default
unless a candidate beats it.

Why not MetaSchedule: its schedule rules rewrite block-structured TIR of static shape. These
kernels have symbolic row counts (batch x positions) and, in the MoE, loop bounds read from
data (an expert's rows, from `indptr`), which is what keeps the MoE sparse; MetaSchedule
skips such workloads. The measured search here tunes exactly the knobs those kernels expose
(the ones the fast-CPU recipe says matter 2-4x), with the same measure-and-record loop.

The database is JSON (`tuning.json` in the artifact): the target it was measured on and,
per kernel key, the chosen TJ/TI/KU and the measured times. A database measured for another
CPU is ignored (with a note in the report).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tvm

from mocompile.backends.tvm_cpu.kernels_matmul import (F32_BYTES, Epilogue, MatmulConfig, MatmulShape, Tiling,
                                                       dense_matmul, grouped_matmul)
from mocompile.backends.tvm_cpu.layout import panel_width
from mocompile.backends.tvm_cpu.lower import lower
from mocompile.backends.tvm_cpu.tir_util import STACK_BYTES
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph

DB_VERSION = 1
PANEL_WIDTHS = (8, 16, 32, 64)
TILE_ROWS = (1, 2, 3, 4, 8)  # 3: 12 of AVX2's 16 ymm registers at 32 lanes, the int4 GLU default
UNROLLS = (1, 2, 4, 8)
MEASURE_ROWS = (1, 64)  # tokens: a decode step and a prefill chunk
TOP_K = 2  # routed copies per token when timing a per-expert kernel


def _target_key(target: tvm.target.Target) -> str:
    return f"{target.kind.name}:{target.attrs.get('mcpu', '')}:{target.attrs.get('num-cores', '')}"


class TuningDB:
    """Tuned matmul configs by MatmulShape key, for one target."""

    def __init__(self, target: str, records: dict[str, dict] | None = None) -> None:
        self.target = target
        self.records: dict[str, dict] = dict(records or {})

    @staticmethod
    def load(path: str | Path, target: tvm.target.Target) -> tuple["TuningDB", str]:
        """The database at `path` if it was measured on `target`, else an empty one; plus a note."""
        key = _target_key(target)
        path = Path(path)
        if not path.is_file():
            return TuningDB(key), f"{path}: no tuning database"
        try:
            data = json.loads(path.read_text())
            if data.get("version") != DB_VERSION or not isinstance(data.get("records"), dict):
                raise ValueError("not a tuning database of this version")
        except (ValueError, OSError) as e:
            raise MocompileError(f"{path}: unreadable tuning database ({e})") from None
        if data.get("target") != key:
            return TuningDB(key), f"{path}: measured on {data.get('target')}, not {key}; ignored"
        return TuningDB(key, data["records"]), f"{path}: {len(data['records'])} tuned kernels reused"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"version": DB_VERSION, "target": self.target, "records": self.records},
                                         indent=1, sort_keys=True) + "\n")


def candidates(shape: MatmulShape) -> list[MatmulConfig]:
    """Every tiling of `shape` whose accumulators fit in registers."""
    depth = shape.fmt.depth(shape.k)
    out = []
    for tj, ti, ku in itertools.product(PANEL_WIDTHS, TILE_ROWS, UNROLLS):
        width = 2 * tj if shape.glu else tj
        if tj > max(shape.n, 8) or ti * width * F32_BYTES >= STACK_BYTES or depth % ku:
            continue
        out.append(MatmulConfig(shape, tj, Tiling(ti, ku)))
    return out


def default_config(shape: MatmulShape) -> MatmulConfig:
    tj = panel_width(shape.n)
    return MatmulConfig(shape, tj, Tiling.for_panel(2 * tj if shape.glu else tj, shape.fmt.depth(shape.k), shape.fmt))


def _kernel(config: MatmulConfig):
    s = config.shape
    epi = Epilogue(glu=s.glu, activation="silu" if s.glu else None, row_scale=bool(s.experts))
    if s.experts:
        return grouped_matmul(s.experts, s.k, s.n, config.tj, epi, s.fmt, config.tiling)
    return dense_matmul(s.k, s.n, config.tj, epi, s.fmt, config.tiling)


def _arguments(config: MatmulConfig, tokens: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random arguments of the kernel for `tokens` tokens, in its parameter order."""
    s = config.shape
    width = 2 * config.tj if s.glu else config.tj
    panels = -(-s.n // config.tj) * max(s.experts, 1)
    depth = s.fmt.depth(s.k)
    if s.fmt.quantized:
        w = rng.integers(0, 256 if s.fmt.bits == 4 else 128, (panels, depth, width)).astype(s.fmt.dtype)
        weights = [w, rng.random((panels, s.fmt.groups, width), dtype=np.float32)]
    else:
        weights = [rng.standard_normal((panels, depth, width), dtype=np.float32)]
    rows = tokens * TOP_K if s.experts else tokens
    x = rng.standard_normal((rows, s.k), dtype=np.float32)
    y = np.zeros((rows, s.n), np.float32)
    if not s.experts:
        return [x, *weights, y]
    chosen = np.sort(rng.choice(s.experts, size=min(rows, s.experts), replace=False))
    counts = np.bincount(chosen[np.arange(rows) % len(chosen)], minlength=s.experts)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return [x, indptr, *weights, rng.random(rows, dtype=np.float32), y]


def measure(config: MatmulConfig, target: tvm.target.Target, repeat: int = 5) -> list[float]:
    """Median seconds of one kernel call at each of MEASURE_ROWS tokens."""
    func = _kernel(config)
    lib = tvm.compile(tvm.IRModule({"kernel": func.with_attr("global_symbol", "kernel")}), target=target).mod
    timer = lib.time_evaluator("kernel", tvm.cpu(), number=20, repeat=repeat)
    rng = np.random.default_rng(0)
    return [float(timer(*[tvm.runtime.tensor(a) for a in _arguments(config, rows, rng)]).median)
            for rows in MEASURE_ROWS]


def _score(times: list[float], base: list[float]) -> float:
    """Geometric mean of the time ratios to the default (below 1: faster)."""
    return math.exp(sum(math.log(t / b) for t, b in zip(times, base)) / len(times))


def tune(graph: Graph, trials: int, db: TuningDB, target: tvm.target.Target,
         say: Callable[[str], None] = lambda m: None, seed: int = 0) -> dict[str, Any]:
    """Spend up to `trials` kernel measurements on the graph's matmuls not yet in `db`
    (at least the default and one candidate each while trials last); record the winners."""
    shapes = [s for s in lower(graph, cached_step=False).matmuls if s.key() not in db.records]
    report: dict[str, Any] = {"trials": 0, "kernels": len(shapes), "tuned": {}}
    if not shapes or trials < 2:
        return report
    per_shape = max(2, trials // len(shapes))
    rand = random.Random(seed)
    budget = trials
    for shape in shapes:
        if budget < 2:
            break
        default = default_config(shape)
        base = measure(default, target)
        pool = [c for c in candidates(shape) if c != default]
        rand.shuffle(pool)
        best, best_score, best_times = default, 1.0, base
        for config in pool[:min(per_shape, budget) - 1]:
            times = measure(config, target)
            score = _score(times, base)
            if score < best_score:
                best, best_score, best_times = config, score, times
        used = 1 + min(len(pool), min(per_shape, budget) - 1)
        budget -= used
        db.records[shape.key()] = {"tj": best.tj, "ti": best.tiling.rows, "ku": best.tiling.k_unroll,
                                   "us": [round(t * 1e6, 3) for t in best_times],
                                   "default_us": [round(t * 1e6, 3) for t in base], "trials": used}
        report["tuned"][shape.key()] = round(1 / best_score, 3)
        say(f"      tuned {shape.key()}: {1 / best_score:.2f}x over the default ({used} trials)")
    report["trials"] = trials - budget
    return report

