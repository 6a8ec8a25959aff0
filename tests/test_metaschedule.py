"""MetaSchedule tuning of the dense matmuls: the static-row workloads, their design space,
the tuned kernels the hand-written kernel calls, and their database."""

from __future__ import annotations

import json
import os

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np
import pytest
import tvm
from tvm.s_tir import Schedule

from mocompile.backends.tvm_cpu import metaschedule
from mocompile.backends.tvm_cpu.kernels_matmul import Epilogue, MatmulConfig, MatmulShape, WeightFormat
from mocompile.backends.tvm_cpu.target import host_target
from mocompile.backends.tvm_cpu.tuning import TuningDB
from mocompile.backends.tvm_cpu.lower import lower
from mocompile.backends.tvm_cpu.tuning import tuned_epilogue
from mocompile.compiler import compile
from mocompile.frontend import lower_source, source_for
from mocompile.runtime import random_inputs

from conftest import EXAMPLE_SHAPE, EXAMPLES


def _sampled_trace(k, n, tj, epi, fmt, rows, seed, parallel=True) -> str:
    """A trace of the design space with decisions drawn at random (what MetaSchedule measures)."""
    spaces = metaschedule.design_space(Schedule(metaschedule.dense_workload(k, n, tj, epi, fmt, rows), seed=seed))
    return json.dumps(metaschedule.trace_json(spaces[0 if parallel else 1].trace))


def _arguments(func, m, rng):
    out = []
    for p in func.params:
        shape = [m if not isinstance(d, tvm.tirx.IntImm) else int(d) for d in p.ty.shape]
        dtype = str(p.ty.dtype)
        out.append(rng.integers(0, 120, shape).astype(dtype) if "int" in dtype else rng.standard_normal(shape).astype(dtype))
    return out


@pytest.mark.parametrize("fmt,epi", [(WeightFormat(), Epilogue(glu=True, activation="silu")),
                                     (WeightFormat(8), Epilogue(bias=True, residual=1)),
                                     (WeightFormat(4, 4), Epilogue(activation="gelu"))])
def test_tuned_row_kernels_give_the_hand_written_kernels_bits(fmt, epi):
    """The dense kernel with tuned kernels for 1 and 64 rows (called for m == 1 and per block
    of 64 rows, the rest hand-written) computes every row bit for bit like the hand-written
    kernel alone: same sums in the same order, whichever path a row takes."""
    k, n, tj = 128, 256, 32
    shape = MatmulShape(0, k, n, epi.glu, fmt)
    traces = tuple((rows, _sampled_trace(k, n, tj, epi, fmt, rows, seed=3 + rows, parallel=rows > 1))
                   for rows in metaschedule.ROW_BUCKETS)
    tuned, *callees = metaschedule.dense_kernels(MatmulConfig(shape, tj, None, traces), epi)
    plain, = metaschedule.dense_kernels(MatmulConfig(shape, tj), epi)
    assert len(callees) == 2 and tuned.attrs["mocompile.kernel"] != plain.attrs["mocompile.kernel"]
    mod = tvm.IRModule({"tuned": tuned.with_attr("global_symbol", "tuned"), "plain": plain.with_attr("global_symbol", "plain"),
                        **{str(f.attrs["global_symbol"]): f for f in callees}})
    lib = tvm.compile(mod, target=host_target())
    rng = np.random.default_rng(0)
    for m in (1, 2, 64, 130):  # the 1-row kernel; hand-written only; one block; two blocks + 2 rows
        args = _arguments(plain, m, rng)
        results = []
        for name in ("tuned", "plain"):
            tensors = [tvm.runtime.tensor(a) for a in args]
            lib[name](*tensors)
            results.append(tensors[-1].numpy())
        assert np.array_equal(results[0], results[1]), f"m={m}"
        assert np.isfinite(results[0]).all() and np.abs(results[0]).max() > 0


def test_metaschedule_tunes_and_continues_from_its_database():
    """A real MetaSchedule run (evolutionary search, cost model, builder and runner
    subprocesses) records measured candidates in the database lines it is given; a second run
    with no trials finds the same best record there."""
    epi = Epilogue()
    workloads = {f"r{rows}": metaschedule.dense_workload(64, 128, 32, epi, WeightFormat(), rows)
                 for rows in metaschedule.ROW_BUCKETS}
    database: dict = {}
    best = metaschedule.tune(workloads, 6, host_target(), database)
    assert set(best) == set(workloads) and database["workloads"] and len(database["records"]) >= 2
    for name, found in best.items():
        # a measured run, not MetaSchedule's 1e10 s for a candidate that failed to build or run
        # (how fast it was is the host's business: no bound on the time itself)
        assert 0 < found["s"] < metaschedule.FAILED_RUN_SECS
        rows = int(name[1:])
        kernel = metaschedule.row_kernel(f"k{rows}", 64, 128, 32, epi, WeightFormat(), rows, found["trace"])
        assert kernel.attrs["global_symbol"] == f"k{rows}"
    again = metaschedule.tune(workloads, 0, host_target(), database)
    assert {k: v["trace"] for k, v in again.items()} == {k: v["trace"] for k, v in best.items()}


def test_compile_with_tuned_row_kernels_verifies_and_decodes(tmp_path, artifact_cache):
    """A tuning database whose dense records carry MetaSchedule traces compiles into an
    artifact whose dense kernels call the tuned ones (prompts and the decode driver alike);
    it matches the eager model and the untuned artifact bit for bit."""
    spec = EXAMPLES / "mixtral_tiny.moe"
    records = {}
    for shape in lower(lower_source(source_for(spec, None, None, 0)), cached_step=False).matmuls:
        if shape.experts or shape.n % 32:
            continue
        traces = {str(rows): json.loads(_sampled_trace(shape.k, shape.n, 32, tuned_epilogue(shape), shape.fmt, rows, seed=7))
                  for rows in metaschedule.ROW_BUCKETS}
        records[shape.key()] = {"tj": 32, "ti": 2, "ku": 2, "us": [1, 1], "default_us": [1, 1], "trials": 1,
                                "metaschedule": traces}
    assert len(records) >= 2
    TuningDB(TuningDB.load(tmp_path / "none.json", host_target())[0].target, records).save(tmp_path / "db.json")
    art = compile(spec, out_dir=tmp_path / "tuned", tuning_db=tmp_path / "db.json", **EXAMPLE_SHAPE)
    plain = artifact_cache.load(spec, **EXAMPLE_SHAPE)  # untuned (shared with test_compile.py in one worker)
    assert set(art.manifest["program"]["tuned_kernels"]) == set(records)
    assert art.manifest["verification"]["max_rel_error"] <= 1e-4
    assert art.manifest["program"]["step"].get("driver")  # decode steps run through the driver
    inputs = random_inputs(art.signature, 2, 70, seed=1)  # 140 rows: two 64-row blocks, 12 hand-written
    assert np.array_equal(art.run(inputs)["logits"], plain.run(inputs)["logits"])
    one = random_inputs(art.signature, 1, 6, seed=2)
    assert np.array_equal(art.run_cached(one, 3)["logits"], plain.run_cached(one, 3)["logits"])
