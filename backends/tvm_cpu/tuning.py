"""`compile --tune N`: tune the model's matmul kernels on this machine, keep the fastest per
kernel in a tuning database, and reuse it on the next compile.

Dense matmuls (attention projections, shared experts, dense FFNs, the LM head) are tuned by
MetaSchedule (metaschedule.py): per panel width TJ, a static-shape workload at each of
MEASURE_ROWS rows is searched by MetaSchedule's evolutionary search over the recipe's design
space; the dense kernel built with the tuned row kernels is then timed against the
hand-written kernel at the same TJ, and a row count keeps its tuned kernel only where it is
faster. The TJ with the best geometric mean over the default tiling wins, among those no
slower than the default at either row count.

Per-expert (grouped) matmuls read their row ranges from data (`indptr`, what keeps the MoE
sparse), which MetaSchedule cannot express; for them, and for dense matmuls too narrow for a
panel of 16 (a router's few columns), the search is over the hand-written
kernels' own knobs: the panel width TJ and the register tile (rows TI, reduction unroll KU),
each candidate built on its own and timed with TVM's time_evaluator at MEASURE_ROWS tokens
(rows spread over the experts the way top-k routing spreads them); its score is the
geometric mean of its times over the default tiling's, and it must be no slower than the
default at either row count (a tuned kernel never trades prompts for decode steps).

Candidates are timed warm for a model whose weights fit in the last-level cache and with the
caches flushed before each call for one whose weights do not (a decode step of such a model
streams its weights from memory: a tile that wins with them in cache may lose there).

N trials are shared between the two by their number of kernels (MetaSchedule's share counts
its measured candidates; the grouped share counts tilings, the default always measured
first); a kernel keeps the default unless a candidate beats it.

The database is JSON (`tuning.json` in the artifact): the target it was measured on; per
kernel key the chosen TJ/TI/KU, for dense kernels the traces of the tuned row kernels, and
the measured times; and MetaSchedule's own database (workloads and tuning records, as its
JSON database writes them), from which a later `--tune` continues. A database measured for
another CPU is ignored (with a note in the report).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tvm

from tvm import tirx

from mocompile.backends.tvm_cpu import metaschedule
from mocompile.backends.tvm_cpu.kernels_matmul import (F32_BYTES, Epilogue, MatmulConfig, MatmulShape, Tiling,
                                                       grouped_matmul)
from mocompile.backends.tvm_common.layout import pair_rows, panel_width
from mocompile.backends.tvm_cpu.lower import lower
from mocompile.backends.tvm_cpu.metaschedule import ROW_BUCKETS, dense_kernels
from mocompile.backends.tvm_cpu.target import as_cpu_target, last_level_cache_bytes
from mocompile.backends.tvm_cpu.tir_util import NAME_ATTR, STACK_BYTES
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.ir.ops.widen import to_bits
from mocompile.progress import Bar

DB_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no MetaSchedule database
PANEL_WIDTHS = (8, 16, 32, 64)
TILE_ROWS = (1, 2, 3, 4, 8)  # 3: 12 of AVX2's 16 ymm registers at 32 lanes, the int4 GLU default
UNROLLS = (1, 2, 4, 8)
MEASURE_ROWS = ROW_BUCKETS  # tokens: a decode step and a prefill chunk
TOP_K = 2  # routed copies per token when timing a per-expert kernel
COLD_CACHE = "cache_flush_cpu_non_first_arg"  # time_evaluator's flush of every argument but the input


def _target_key(target: tvm.target.Target) -> str:
    """What a database was measured on: kind, mcpu, cores, and any mattr changes."""
    mattr = ",".join(str(a) for a in target.attrs.get("mattr", ()))
    return f"{target.kind.name}:{target.attrs.get('mcpu', '')}:{target.attrs.get('num-cores', '')}" + (
        f":{mattr}" if mattr else "")


class TuningDB:
    """Tuned matmul configs by MatmulShape key, for one target."""

    def __init__(self, target: str, records: dict[str, dict] | None = None,
                 metaschedule: dict[str, list[str]] | None = None) -> None:
        self.target = target
        self.records: dict[str, dict] = dict(records or {})
        # MetaSchedule's JSON database: {"workloads": [line], "records": [line]}
        self.metaschedule: dict[str, list[str]] = dict(metaschedule or {})

    @staticmethod
    def load(path: str | Path, target: tvm.target.Target) -> tuple["TuningDB", str]:
        """The database at `path` if it was measured on `target`, else an empty one; plus a note."""
        key = _target_key(target)
        path = Path(path)
        if not path.is_file():
            return TuningDB(key), f"{path}: no tuning database"
        try:
            data = json.loads(path.read_text())
            if data.get("version") not in READABLE_VERSIONS or not isinstance(data.get("records"), dict):
                raise ValueError("not a tuning database of this version")
        except (ValueError, OSError) as e:
            raise MocompileError(f"{path}: unreadable tuning database ({e})") from None
        if data.get("target") != key:
            return TuningDB(key), f"{path}: measured on {data.get('target')}, not {key}; ignored"
        return (TuningDB(key, data["records"], data.get("metaschedule")),
                f"{path}: {len(data['records'])} tuned kernels reused")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"version": DB_VERSION, "target": self.target, "records": self.records,
                                          "metaschedule": self.metaschedule}, indent=1, sort_keys=True) + "\n")


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


def default_tiling(shape: MatmulShape, tj: int) -> Tiling:
    """The untuned register tile of `shape` at panel width `tj`."""
    return Tiling.for_panel(2 * tj if shape.glu else tj, shape.fmt.depth(shape.k), shape.fmt)


def default_config(shape: MatmulShape) -> MatmulConfig:
    tj = panel_width(shape.n)
    return MatmulConfig(shape, tj, default_tiling(shape, tj))


def tuned_epilogue(shape: MatmulShape) -> Epilogue:
    """The epilogue a kernel of `shape` is tuned with (the tiling does not depend on it)."""
    return Epilogue(glu=shape.glu, activation="silu" if shape.glu else None, row_scale=bool(shape.experts))


def _kernels(config: MatmulConfig) -> list[tirx.PrimFunc]:
    """The kernel of `config`, then the kernels it calls."""
    s = config.shape
    if s.experts:
        return [grouped_matmul(s.experts, s.k, s.n, config.tj, tuned_epilogue(s), s.fmt, config.tiling)]
    return dense_kernels(config, tuned_epilogue(s))


def _arguments(config: MatmulConfig, tokens: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random arguments of the kernel for `tokens` tokens, in its parameter order."""
    s = config.shape
    width = 2 * config.tj if s.glu else config.tj
    panels = -(-s.n // config.tj) * max(s.experts, 1)
    depth = s.fmt.depth(s.k)
    if s.fmt.quantized:
        w = rng.integers(0, 256 if s.fmt.bits == 4 else 128, (panels, depth, width)).astype(s.fmt.dtype)
        weights = [w, rng.random((panels, s.fmt.groups, width), dtype=np.float32)]
    elif s.fmt.bits == 16:  # bit patterns of normal values (the kernel's widening needs no special case)
        bits = to_bits(rng.standard_normal((panels, s.k, width), dtype=np.float32), s.fmt.half)
        weights = [pair_rows("tuning", bits) if s.fmt.pairs else bits]
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


def kernel_timer(funcs: list[tirx.PrimFunc], target: tvm.target.Target, cold: bool, repeat: int) -> Any:
    """A time_evaluator of funcs[0] (the rest: kernels it calls) built for `target`: `repeat`
    rounds of 20 calls, or with `cold` `repeat` single calls each after the caches are
    flushed (weights streamed from memory, as a large model's decode step reads them)."""
    func, *called = funcs
    mod = tvm.IRModule({"kernel": func.with_attr("global_symbol", "kernel"),
                        **{str(f.attrs[NAME_ATTR]): f for f in called}})
    lib = tvm.compile(mod, target=target).mod
    return (lib.time_evaluator("kernel", tvm.cpu(), number=1, repeat=repeat, f_preproc=COLD_CACHE) if cold
            else lib.time_evaluator("kernel", tvm.cpu(), number=20, repeat=repeat))


def measure(config: MatmulConfig, target: tvm.target.Target, repeat: int = 5, cold: bool = False) -> list[float]:
    """Median seconds of one kernel call at each of MEASURE_ROWS tokens; `cold`: with the
    arguments flushed from the caches before each call (weights streamed from memory)."""
    timer = kernel_timer(_kernels(config), target, cold, 4 * repeat if cold else repeat)
    rng = np.random.default_rng(0)
    return [float(timer(*[tvm.runtime.tensor(a) for a in _arguments(config, rows, rng)]).median)
            for rows in MEASURE_ROWS]


def _improves(times: list[float], best: list[float], base: list[float]) -> bool:
    """Whether `times` beats the best so far: no slower than the default at any measured row
    count (tuning must not trade prompts for decode steps or back) and a better score."""
    return all(t <= b for t, b in zip(times, base)) and _score(times, base) < _score(best, base)


def _score(times: list[float], base: list[float]) -> float:
    """Geometric mean of the time ratios to the default (below 1: faster)."""
    return math.exp(sum(math.log(t / b) for t, b in zip(times, base)) / len(times))


Timer = Callable[[MatmulConfig], list[float]]  # seconds of a config's kernel at each of MEASURE_ROWS


def _tile_search(shape: MatmulShape, trials: int, timer: Timer, rand: random.Random,
                 bar: Bar | None = None) -> tuple[dict, int]:
    """The best of the default and up to trials - 1 random tilings of the hand-written kernel
    (each measurement counted on `bar`)."""
    default = default_config(shape)
    base = timer(default)
    pool = [c for c in candidates(shape) if c != default]
    rand.shuffle(pool)
    best, best_times = default, base
    if bar is not None:
        bar.update(1, shape.key())
    for config in pool[:trials - 1]:
        times = timer(config)
        if bar is not None:
            bar.update(1)
        if _improves(times, best_times, base):
            best, best_times = config, times
    used = 1 + min(len(pool), trials - 1)
    return _record(best, best_times, base, used), used


def _record(config: MatmulConfig, times: list[float], base: list[float], trials: int) -> dict:
    tiling = config.tiling or default_tiling(config.shape, config.tj)
    record = {"tj": config.tj, "ti": tiling.rows, "ku": tiling.k_unroll, "us": [round(t * 1e6, 3) for t in times],
              "default_us": [round(t * 1e6, 3) for t in base], "trials": trials}
    if config.tuned_rows:
        record["metaschedule"] = {str(rows): json.loads(trace) for rows, trace in config.tuned_rows}
    return record


def _panel_widths(shape: MatmulShape) -> list[int]:
    """Panel widths a MetaSchedule workload of `shape` may use (dividing n: no padded panel)."""
    return [tj for tj in PANEL_WIDTHS if tj >= 16 and shape.n % tj == 0]


def _task(shape: MatmulShape, tj: int, rows: int) -> str:
    return f"{shape.key()}_tj{tj}_r{rows}"


def _metaschedule_search(shapes: list[MatmulShape], trials: int, db: TuningDB, target: tvm.target.Target,
                         timer: Timer, cold: bool, say: Callable[[str], None]) -> dict[str, dict]:
    """Records for the dense `shapes`: MetaSchedule-tuned row kernels where they beat the
    hand-written kernel at the same TJ (see the module docstring)."""
    workloads = {_task(s, tj, rows): metaschedule.dense_workload(s.k, s.n, tj, tuned_epilogue(s), s.fmt, rows)
                 for s in shapes for tj in _panel_widths(s) for rows in MEASURE_ROWS}
    best = metaschedule.tune(workloads, trials, target, db.metaschedule, cold, say)
    records = {}
    for shape in shapes:
        default = default_config(shape)
        base = timer(default)
        choice, choice_times, measured = default, base, 1
        for tj in _panel_widths(shape):
            traces = {rows: best[_task(shape, tj, rows)]["trace"] for rows in MEASURE_ROWS
                      if _task(shape, tj, rows) in best}
            if not traces:
                continue
            hand = default if tj == default.tj else MatmulConfig(shape, tj, default_tiling(shape, tj))
            hand_times = base if hand is default else timer(hand)
            tuned = MatmulConfig(shape, tj, hand.tiling, tuple(sorted((r, json.dumps(t)) for r, t in traces.items())))
            tuned_times = timer(tuned)
            measured += 1 + (hand is not default)
            faster = {r for r, tuned_t, hand_t in zip(MEASURE_ROWS, tuned_times, hand_times) if tuned_t < hand_t}
            times = [min(a, b) for a, b in zip(tuned_times, hand_times)]
            if _improves(times, choice_times, base):
                choice = MatmulConfig(shape, tj, hand.tiling, tuple(rt for rt in tuned.tuned_rows if rt[0] in faster))
                choice_times = times
        records[shape.key()] = _record(choice, choice_times, base, measured)
    return records


def tune(graph: Graph, trials: int, db: TuningDB, target: tvm.target.Target,
         say: Callable[[str], None] = lambda m: None, seed: int = 0) -> dict[str, Any]:
    """Spend up to `trials` measurements on the graph's matmuls not yet in `db` (dense ones
    through MetaSchedule, grouped and too-narrow dense ones through the tile search, each of
    those getting at least the default and one candidate while trials last); record the winners.
    `target` is measured on, so it must run here; the graph is lowered for it (the matmuls it
    gets: a VNNI target's integer ones are not tuned), the baseline tiles are the host's."""
    program = lower(graph, cached_step=False, target=as_cpu_target(target))
    shapes = [s for s in program.matmuls if s.key() not in db.records]
    # A model whose weights outgrow the last-level cache reads them from memory on every step:
    # time its kernels that way (what the tuner then picks is what is fast there).
    cold = sum(a.nbytes for a in program.arrays.values()) > last_level_cache_bytes()
    timer = functools.partial(measure, target=target, cold=cold)
    report: dict[str, Any] = {"trials": 0, "kernels": len(shapes), "tuned": {}, "cold_caches": cold}
    if not shapes or trials < 2:
        return report
    dense = [s for s in shapes if not s.experts and _panel_widths(s)]
    grouped = [s for s in shapes if s not in dense]
    budget = trials - (trials * len(dense) // len(shapes) if grouped else trials)
    records = _metaschedule_search(dense, trials - budget, db, target, timer, cold, say) if dense else {}
    spent = trials - budget
    per_shape = max(2, budget // len(grouped)) if grouped else 0
    rand = random.Random(seed)
    with Bar("tuning per-expert matmuls", budget, unit="trials") as bar:
        for shape in grouped:
            if budget < 2:
                break
            records[shape.key()], used = _tile_search(shape, min(per_shape, budget), timer, rand, bar)
            budget -= used
            spent += used
    for key, record in records.items():
        db.records[key] = record
        speedup = _score(record["default_us"], record["us"])
        report["tuned"][key] = round(speedup, 3)
        if record.get("metaschedule"):
            how = f"MetaSchedule kernels for {', '.join(sorted(record['metaschedule']))} rows"
        else:
            how = f"hand-written, TJ {record['tj']} TI {record['ti']} KU {record['ku']}"
        say(f"      tuned {key}: {speedup:.2f}x over the default ({how})")
    report["trials"] = spent
    return report
