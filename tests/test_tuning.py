"""compile --tune: measured tilings of the matmul kernels, kept in a database beside the
artifact and reused by the next compile; the default compile stays untuned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np
import pytest

from mocompile.backends.tvm_cpu.kernels_matmul import ACCUMULATOR_BYTES, MatmulShape, Tiling, WeightFormat
from mocompile.backends.tvm_cpu.target import host_target, last_level_cache_bytes, vector_register_bytes
from mocompile.backends.tvm_cpu.tir_util import STACK_BYTES
from mocompile.backends.tvm_cpu.tuning import TuningDB, candidates, default_config, measure
from mocompile.compiler import compile
from mocompile.errors import MocompileError

from conftest import EXAMPLE_SHAPE, EXAMPLES

SPEC = EXAMPLES / "mixtral_tiny.moe"


@pytest.mark.parametrize("shape", [MatmulShape(0, 128, 512, False), MatmulShape(8, 128, 256, True),
                                   MatmulShape(0, 64, 40, False, WeightFormat(4, 2))])
def test_candidates_fit_in_registers(shape):
    configs = candidates(shape)
    assert len(configs) > 10
    for c in configs:
        width = 2 * c.tj if shape.glu else c.tj
        assert c.tiling.rows * width * 4 < STACK_BYTES and shape.fmt.depth(shape.k) % c.tiling.k_unroll == 0
    default = default_config(shape)
    default.tiling.check(2 * default.tj if shape.glu else default.tj, shape.fmt.depth(shape.k))


def test_untuned_tiles_fill_at_most_half_the_register_file():
    """The default register tile follows the ISA: the fast-CPU recipe's 4 x 32 lanes with
    AVX-512's 32 zmm registers; on AVX2's 16 ymm, 2 x 32 and one row of a 64-lane GLU panel
    (measured 1.5-2.2x faster there than the AVX-512 tiles, which spill); int4 panels, whose
    unpacking costs more than spills, keep the largest tile."""
    avx512, avx2 = 32 * 64 // 2, 16 * 32 // 2
    assert Tiling.for_panel(32, 128, budget=avx512) == Tiling(4, 4)
    assert Tiling.for_panel(64, 128, budget=avx512).rows == 3  # below the stack limit (STACK_BYTES)
    assert Tiling.for_panel(32, 128, budget=avx2).rows == 2
    assert Tiling.for_panel(64, 128, budget=avx2).rows == 1
    assert Tiling.for_panel(16, 128, budget=avx2).rows == 4
    int4 = WeightFormat(4, 4)  # unpacking dominates: the stack limit on every ISA
    assert Tiling.for_panel(32, 64, int4) == Tiling.for_panel(32, 64, budget=avx512) == Tiling(4, 4)
    assert ACCUMULATOR_BYTES == vector_register_bytes() // 2
    flags = open("/proc/cpuinfo").read()
    assert vector_register_bytes() == (2048 if " avx512f" in flags else 512 if " avx2" in flags else 256)


def test_cold_timing_flushes_the_weights(monkeypatch):
    """A model larger than the last-level cache is tuned with the caches flushed before each
    call. Checked by what is asked of TVM's time evaluator, not by comparing times (how much
    slower a cold call is depends on the host and on what else runs on it): a cold measurement
    flushes every argument but the input before each call, a warm one does not."""
    import tvm

    assert 256 * 1024 <= last_level_cache_bytes() <= 4 * 1024 ** 3
    flush = "cache_flush_cpu_non_first_arg"  # TVM's flush of every argument but the first (the input)
    assert tvm.get_global_func(flush, allow_missing=True) is not None
    evaluators: list[dict] = []
    real_compile = tvm.compile

    class Recording:
        def __init__(self, lib):
            self._lib = lib

        def time_evaluator(self, name, dev, **kwargs):
            evaluators.append(kwargs)
            return self._lib.time_evaluator(name, dev, **kwargs)

    monkeypatch.setattr(tvm, "compile", lambda *a, **k: SimpleNamespace(mod=Recording(real_compile(*a, **k).mod)))
    config = default_config(MatmulShape(0, 64, 128, False))
    warm, cold = measure(config, host_target(), repeat=1), measure(config, host_target(), repeat=1, cold=True)
    assert len(warm) == len(cold) == 2 and all(t > 0 for t in warm + cold)  # a decode and a prefill size
    assert [e.get("f_preproc") for e in evaluators] == [None, flush]
    assert evaluators[1]["number"] == 1  # one call per flush: every timed call starts cold


def test_only_a_model_larger_than_the_cache_is_tuned_cold(monkeypatch):
    from mocompile.backends.tvm_cpu import tuning
    from mocompile.frontend import lower_source, source_for

    graph = lower_source(source_for(SPEC, None, None, 0))  # ~7 MB of fp32 weights
    for cache_bytes, cold in ((1 << 20, True), (1 << 30, False)):
        monkeypatch.setattr(tuning, "last_level_cache_bytes", lambda: cache_bytes)
        report = tuning.tune(graph, 0, TuningDB("llvm::", {}), host_target())  # no trials: only the plan
        assert report["cold_caches"] is cold and report["trials"] == 0


# The trials of the tuned compile every test below reads: 2 by default (the dense matmuls'
# MetaSchedule search gets its one trial, each tuned kernel is measured and recorded, the
# database reused, refused, tampered with), 10 with -m slow (the per-expert tile search as well).
@pytest.fixture(scope="module", params=[2, pytest.param(10, marks=pytest.mark.slow)], ids=lambda n: f"tune{n}")
def tuned(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "art"
    return out, compile(SPEC, out_dir=out, tune=request.param)


def test_tune_measures_records_and_verifies(tuned, request):
    out, art = tuned
    report = art.manifest["tuning"]
    asked = request.node.callspec.params["tuned"]
    assert min(2, asked - 1) <= report["trials"] <= asked and report["tuned"]
    db = json.loads((out / "tuning.json").read_text())
    assert set(report["tuned"]) <= set(db["records"])
    for record in db["records"].values():
        assert len(record["us"]) == len(record["default_us"]) == 2  # a decode-sized and a prefill-sized call
    assert art.manifest["program"]["tuned_kernels"]
    assert art.manifest["verification"]["max_rel_error"] <= 1e-4  # tuned kernels are checked like any other


def test_next_compile_reuses_the_database(tuned):
    out, art = tuned
    again = compile(SPEC, out_dir=out)  # no --tune: the database in the old artifact is reused
    assert "reused" in again.manifest["tuning"]["database"]
    assert "trials" not in again.manifest["tuning"]
    assert again.manifest["program"]["tuned_kernels"] == art.manifest["program"]["tuned_kernels"]
    assert (out / "tuning.json").is_file()


def test_untuned_compile_has_no_tuning(artifact_cache):
    art = artifact_cache.load(SPEC, **EXAMPLE_SHAPE)
    assert "tuning" not in art.manifest and not (art.path / "tuning.json").exists()


def test_database_of_another_machine_is_ignored(tuned, tmp_path):
    out, _ = tuned
    db = json.loads((out / "tuning.json").read_text())
    db["target"] = "llvm:some-other-cpu:64"
    path = tmp_path / "other.json"
    path.write_text(json.dumps(db))
    art = compile(SPEC, out_dir=tmp_path / "a", tuning_db=path)
    assert "ignored" in art.manifest["tuning"]["database"] and not art.manifest["program"]["tuned_kernels"]


def test_bad_databases_fail_with_one_line(tuned, tmp_path):
    out, _ = tuned
    db = json.loads((out / "tuning.json").read_text())
    key = next(iter(db["records"]))
    db["records"][key]["ti"] = 64  # a tile that cannot stay in registers
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(db))
    with pytest.raises(MocompileError, match="does not fit in registers"):
        compile(SPEC, out_dir=tmp_path / "b", tuning_db=path)
    db = json.loads((out / "tuning.json").read_text())
    dense = next(k for k in db["records"]  # a dense matmul whose panel width divides its n (dense_KxN...)
                 if k.startswith("dense_") and int(k.split("_")[1].split("x")[1]) % db["records"][k]["tj"] == 0)
    db["records"][dense]["metaschedule"] = {"1": [["GetSBlock", "no such block"]]}  # a tampered trace
    path.write_text(json.dumps(db))
    with pytest.raises(MocompileError, match="MetaSchedule trace of dense_.* does not apply"):
        compile(SPEC, out_dir=tmp_path / "b2", tuning_db=path)
    assert not (tmp_path / "b2").exists()
    path.write_text("{not json")
    with pytest.raises(MocompileError, match="unreadable tuning database"):
        compile(SPEC, out_dir=tmp_path / "c", tuning_db=path)
    proc = subprocess.run([sys.executable, "-m", "mocompile.cli", "compile", str(SPEC), "-o", str(tmp_path / "d"),
                           "--tuning-db", str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().endswith("missing.json: tuning database not found")
    assert not (tmp_path / "d").exists()


def test_tuned_artifact_matches_untuned(tuned, artifact_cache):
    out, art = tuned
    plain = artifact_cache.load(SPEC, **EXAMPLE_SHAPE)
    from mocompile.runtime import random_inputs

    inputs = random_inputs(art.signature, 3, 9, seed=5)
    a, b = art.run(inputs)["logits"], plain.run(inputs)["logits"]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_kernels_of_paired_bf16_weights_are_tuned(tmp_path):
    """The tuner times bf16 kernels on panels of paired words and MetaSchedule's workload reads
    input r as half r % 2 of a word (a loop expression, not a Python bool); the tuned
    artifact verifies like any other."""
    art = compile(SPEC, out_dir=tmp_path / "art", tune=2, dtype="bf16", batch=1, seq=4)
    report = art.manifest["tuning"]
    assert art.manifest["weight_dtype"] == "bfloat16" and report["trials"] >= 1
    assert report["tuned"] and all(key.endswith("_bf16p") for key in report["tuned"])
    assert art.manifest["verification"]["max_rel_error"] <= 1e-4
