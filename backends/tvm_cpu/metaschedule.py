"""MetaSchedule tuning of the dense matmuls at static row counts (`compile --tune N`).

MetaSchedule schedules block-structured TIR of static shape. The hand-written dense kernel
(kernels_matmul.dense_matmul) takes any number of rows, so what is tuned here is the same
computation for a fixed number of rows R (ROW_BUCKETS: 1, a decode step's GEMV, and 64, a
block of a prompt), written as a te compute over the same packed panels (`dense_workload`),
with a design space that is the fast-CPU recipe with its knobs left open (`design_space`):
rows per register tile and the reduction unroll sampled, the panel loop parallel or serial.
The panel width TJ fixes the weight layout, so each TJ is a task of its own, and the choice
of TJ is made across tasks (tuning.py). MetaSchedule's evolutionary search, XGBoost cost
model, builder and runner do the search; its database lives in the tuning database.

A tuned kernel for R rows is then called by the hand-written one for m == 1 or on each full
block of R rows (see dense_matmul's `row_kernels`), so the artifact keeps one kernel per
matmul for any row count. The grouped per-expert matmuls are not tuned here: their row
ranges are read from data (`indptr`), which no static-shape workload can express.

The te compute sums a row's products in the hand-written kernels' order (one accumulator
per output, inputs ascending; weight_value and epilogue_value are shared), so the tuned
and hand-written paths give the same bits.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import types
from pathlib import Path
from typing import Callable

import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import Trace

from mocompile.backends.tvm_cpu.kernels_matmul import (F32_BYTES, Epilogue, MatmulConfig, WeightFormat, column_scale,
                                                       dense_matmul, epilogue_value, weight_shapes, weight_value)
from mocompile.backends.tvm_cpu.schedule import has_parallel_loop
from mocompile.backends.tvm_cpu.tir_util import HAND_SCHEDULED_ATTR, NAME_ATTR, SERIAL_ATTR, STACK_BYTES

ROW_BUCKETS = (1, 64)
TILE_ROWS = (1, 2, 4, 8)  # register tile rows MetaSchedule may pick (those dividing the bucket)
MAX_UNROLL = 8  # innermost reduction factor
FAILED_RUN_SECS = 1e9  # MetaSchedule records a candidate that failed to build or run as 1e10 s


def dense_workload(k: int, n: int, tj: int, epi: Epilogue, fmt: WeightFormat, rows: int) -> tirx.PrimFunc:
    """dense_matmul's computation for `rows` rows as te: parameters in its order (x, weight
    panels (, scales) (, bias), residuals, y); block "acc" accumulates a panel's lanes, block
    "y" applies the epilogue."""
    if n % tj:
        raise ValueError(f"the tuned workload needs TJ dividing n ({tj}, {n})")
    nb = n // tj
    width = 2 * tj if epi.glu else tj
    x = te.placeholder((rows, k), name="x")
    weights = [te.placeholder(shape, dtype, name=name)
               for name, (shape, dtype) in zip(("w", "w_scale"), weight_shapes(fmt, nb, k, width))]
    w, w_scale = weights[0], weights[1] if fmt.quantized else None
    bias = te.placeholder((n,), name="bias") if epi.bias else None
    residuals = [te.placeholder((rows, n), name="residual" + (str(i + 1) if i else "")) for i in range(epi.residual)]
    r = te.reduce_axis((0, k), name="r")
    halves = 2 if epi.glu else 1  # a GLU tile: gate lanes, then up lanes

    def product(i, jb, half, jt):
        j = half * tj + jt
        if fmt.paired:  # input r is half r % 2 of panel row r // 2 (an int4 nibble, a 16-bit pair)
            return x[i, r] * weight_value(fmt, k, w, w_scale, jb, r // 2, j, r % 2)
        return x[i, r] * weight_value(fmt, k, w, w_scale, jb, r, j)

    acc = te.compute((rows, nb, halves, tj), lambda *ix: te.sum(product(*ix), axis=r), name="acc")

    def output(i, jb, jt):
        scale = column_scale(fmt, w_scale, jb)

        def lane(half, jt):
            v = acc[i, jb, half, jt]
            return v * scale(half * tj + jt) if scale is not None else v

        return epilogue_value(epi, lane, jt, i, jb * tj + jt, bias, None, residuals)

    # y is computed per (row, panel, lane), which keeps the epilogue's reads of the tile
    # affine, and stored [rows, n] like the hand-written kernel's output.
    y = te.compute((rows, nb, tj), output, name="y")
    params = [x, *weights, *([bias] if bias is not None else []), *residuals, y]
    sch = Schedule(te.create_prim_func(params))
    sch.transform_layout(sch.get_sblock("y"), ("write", 0), lambda i, jb, jt: (i, jb * tj + jt))
    return sch.mod["main"]


def _tile_rows(rows: int, width: int) -> list[int]:
    """Register tiles that divide `rows` and keep their accumulators under the stack limit."""
    return [t for t in TILE_ROWS if rows % t == 0 and t * width * F32_BYTES < STACK_BYTES] or [1]


def design_space(sch: Schedule) -> list[Schedule]:
    """The recipe with sampled knobs: rows split by a sampled tile, the reduction by a sampled
    unroll, loops ordered (panel, row tile, k outer, k inner, tile row, lane), accumulators
    local and written back through the epilogue per row tile, lanes vectorized, tile rows and
    unrolled k unrolled; one space with the panel loop parallel and one with it serial
    (a small matmul at one row loses more waking the thread pool than it gains)."""
    acc, out = sch.get_sblock("acc"), sch.get_sblock("y")
    _, _, half, jt, _ = sch.get_loops(acc)
    i, jb, col = sch.get_loops(out)
    rows, width = int(sch.get(i).extent), int(sch.get(half).extent) * int(sch.get(jt).extent)
    choices = _tile_rows(rows, width)
    ti = sch.sample_categorical(choices, [1 / len(choices)] * len(choices))
    i0, i1 = sch.split(i, [None, ti])
    sch.reorder(jb, i0, i1, col)
    sch.compute_at(acc, i0, preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")
    tile_row, _, half, jt, r = sch.get_loops(acc)[2:]
    r0, r1 = sch.split(r, sch.sample_perfect_tile(r, n=2, max_innermost_factor=MAX_UNROLL))
    lane = sch.fuse(half, jt)
    sch.reorder(r0, r1, tile_row, lane)
    sch.vectorize(lane)
    sch.unroll(r1)
    sch.unroll(tile_row)
    sch.vectorize(col)
    serial = sch.copy()
    sch.parallel(jb)
    for s in (sch, serial):
        s.decompose_reduction(acc, r0)
    return [sch, serial]


def _plain(obj):
    """A trace's JSON form (TVM arrays, maps and immediates) as plain Python values."""
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, tirx.IntImm):
        return int(obj.value)
    if isinstance(obj, tirx.FloatImm):
        return float(obj.value)
    if hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    return [_plain(v) for v in obj]


def trace_json(trace: Trace) -> list:
    """A schedule trace (its decisions included) as JSON-serialisable lists."""
    return _plain(trace.as_json(remove_postproc=True))


def row_kernel(name: str, k: int, n: int, tj: int, epi: Epilogue, fmt: WeightFormat, rows: int,
               trace: list) -> tirx.PrimFunc:
    """The kernel `name` for `rows` rows, scheduled by a tuned trace (JSON) of the workload
    with the same tiles (the trace names blocks and loops only, so it applies to any
    epilogue)."""
    sch = Schedule(dense_workload(k, n, tj, epi, fmt, rows))
    try:
        Trace.apply_json_to_schedule(trace, sch)
    except Exception as e:  # a tampered or foreign record: one line, not TVM's diagnostic dump
        first = (str(e).strip().splitlines() or ["?"])[-1][:200]
        raise ValueError(f"the MetaSchedule trace of {name} in the tuning database does not apply ({first})") from None
    func = sch.mod["main"]
    attrs = {"global_symbol": name, NAME_ATTR: name, HAND_SCHEDULED_ATTR: True}
    if not has_parallel_loop(func):
        attrs[SERIAL_ATTR] = True
    for key, value in attrs.items():
        func = func.with_attr(key, value)
    return func


def dense_kernels(config: MatmulConfig, epi: Epilogue) -> list[tirx.PrimFunc]:
    """The dense matmul kernel of `config` with epilogue `epi`, then the tuned static-row
    kernels it calls (none when untuned)."""
    s = config.shape
    names = {rows: f"dense_{s.k}x{s.n}_tj{config.tj}_{epi.tag()}{s.fmt.tag()}_r{rows}" for rows, _ in config.tuned_rows}
    row_funcs = [row_kernel(names[rows], s.k, s.n, config.tj, epi, s.fmt, rows, json.loads(trace))
                 for rows, trace in config.tuned_rows]
    main = dense_matmul(s.k, s.n, config.tj, epi, s.fmt, config.tiling, tuple(sorted(names.items())), config.budget)
    return [main, *row_funcs]


def _register_x86_intrinsics() -> None:
    """Register TVM's x86 tensor intrinsics without the rest of tvm.s_tir.tensor_intrin.

    TuneContext imports that package for MetaSchedule's default x86 rules (which look up the
    VNNI dot-product intrinsics on a VNNI host), and the package parses every intrinsic it has
    (CUDA, ARM, ROCm, Hexagon...) as TVMScript: ~40 s on this machine, against 0.2 s for the
    x86 module alone. The package is entered as a namespace over its real directory, so the
    x86 module (and any other submodule imported later) loads from the installed files."""
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
        sys.modules[name] = package
    importlib.import_module(name + ".x86")


def tune(workloads: dict[str, tirx.PrimFunc], trials: int, target: tvm.target.Target, database: dict,
         cold: bool = False, say: Callable[[str], None] = lambda m: None) -> dict[str, dict]:
    """Run MetaSchedule on `workloads` (task name -> static-shape PrimFunc) for up to `trials`
    measured candidates in all, continuing from `database` ({"workloads": [...], "records":
    [...]}: a MetaSchedule JSON database's lines, updated in place); `cold`: candidates timed
    with their arguments flushed from the caches. Returns, per task that has a measured
    record, its best trace (JSON) and time in seconds."""
    from tvm.s_tir import meta_schedule as ms

    with tempfile.TemporaryDirectory(prefix="mocompile-ms-") as work:
        paths = {"workloads": Path(work) / "database_workload.json",
                 "records": Path(work) / "database_tuning_record.json"}
        for key, path in paths.items():
            path.write_text("".join(line + "\n" for line in database.get(key, [])))
        db = ms.database.JSONDatabase(path_workload=str(paths["workloads"]),
                                      path_tuning_record=str(paths["records"]), allow_missing=False)
        mods = {name: tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
                for name, func in workloads.items()}
        if trials > 0:
            per_iter = max(1, min(16, trials // max(1, len(mods))))
            _register_x86_intrinsics()  # here for TuneContext, in the builder's workers for their builds
            space = ms.space_generator.ScheduleFn(design_space, sch_rules=[], postprocs=[])
            search = ms.search_strategy.EvolutionarySearch(population_size=64, genetic_num_iters=2)
            tasks = [ms.TuneContext(mod=mod, target=target, task_name=name, num_threads="physical",
                                    space_generator=space, search_strategy=search).clone()
                     for name, mod in mods.items()]
            say(f"      MetaSchedule: {len(tasks)} dense-matmul tasks, {trials} trials")
            ms.tune_tasks(tasks=tasks, task_weights=[1.0] * len(tasks), work_dir=work, max_trials_global=trials,
                          num_trials_per_iter=per_iter, database=db,
                          builder=ms.builder.LocalBuilder(initializer=_register_x86_intrinsics),
                          runner=ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(
                              number=1 if cold else 10, repeat=12 if cold else 3, min_repeat_ms=0,
                              enable_cpu_cache_flush=cold)))
        best = {}
        for name, mod in mods.items():
            records = db.get_top_k(db.commit_workload(mod), 1) if db.has_workload(mod) else []
            secs = sorted(float(t) for t in records[0].run_secs) if records and records[0].run_secs else []
            if secs and secs[len(secs) // 2] < FAILED_RUN_SECS:
                best[name] = {"trace": trace_json(records[0].trace), "s": secs[len(secs) // 2]}
        for key, path in paths.items():
            database[key] = [line for line in path.read_text().splitlines() if line.strip()]
    return best
