"""The GPU targets. OpenCL: every example (fp32, and a quantized model) compiles, runs on an
OpenCL device (PoCL on a machine without a GPU) and matches the IR interpreter, forward and
cached decoding; the isolation check's differential run works on the artifact. CUDA: nvcc
compiles the generated code of every example (fp32 and int8) for sm_90 with warnings as
errors, and the artifact runs where an NVIDIA GPU is. Both: the schedule check refuses a
kernel left partly on the host or launched with a single thread, naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from tvm import tirx

import mocompile
from conftest import EXAMPLES
from mocompile.backends.tvm_gpu import gpu_util as G
from mocompile.backends.tvm_gpu.codegen import ScheduleError, generate
from mocompile.backends.tvm_gpu.nvcc import NvccError, compile_cuda, find_nvcc
from mocompile.backends.tvm_gpu.target import GpuTarget
from mocompile.frontend import lower_source, source_for
from mocompile.gpu_devices import cuda_device_problem, opencl_devices
from mocompile.ir.interpreter import run as run_graph
from mocompile.runtime import load, random_inputs

EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES.glob("*.moe"))
needs_opencl = pytest.mark.skipif(not opencl_devices(), reason="no OpenCL device (pip install pyopencl; apt-get "
                                                                "install pocl-opencl-icd)")
needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc (the CUDA toolkit) is not installed")
needs_cuda_gpu = pytest.mark.skipif(cuda_device_problem("sm_90") is not None, reason="no sm_90 NVIDIA GPU here")


def _interpreter_outputs(graph, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run_graph(graph, inputs)


def _check_against_interpreter(path: Path, spec: Path, passes: str = "") -> None:
    """The artifact's forward and cached decoding against the IR interpreter on fresh inputs."""
    art = load(path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["verification"]["status"] == "verified"
    assert manifest["program"]["kind"] == "gpu-launch-plan" and manifest["program"]["api"] == "opencl"
    graph = lower_source(source_for(spec, None, None, 0))
    if passes:
        from mocompile.pass_manager import PassManager

        graph = PassManager(passes).run(graph)[0]
    x = random_inputs(art.signature, 2, 7, seed=5)
    want = _interpreter_outputs(graph, x)
    got = art.run(x)
    # a token model's cached decoding computes its forward; a multimodal one's steps take the
    # segments in another order, which the compile checked against the IR's cached graph
    cached = art.run_cached(x, 4) if len(art.signature.inputs) == 1 else {}
    assert manifest["decode_verification"]["max_rel_error"] <= 1e-4
    for name, ref in want.items():
        scale = np.abs(ref).max()
        assert np.abs(got[name] - ref).max() <= 1e-4 * scale, name
        if cached:
            assert np.abs(cached[name] - ref).max() <= 1e-4 * scale, name


@pytest.fixture(scope="module")
def opencl_artifact(tmp_path_factory) -> Callable[[str], Path]:
    """The OpenCL artifact of an example, compiled once for the module."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = tmp_path_factory.mktemp(f"opencl_{name}") / "art"
            mocompile.compile(EXAMPLES / f"{name}.moe", target="opencl", out_dir=built[name], batch=2, seq=4)
        return built[name]

    return get


@needs_opencl
@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_opencl_artifact_of_every_example_matches_the_interpreter(opencl_artifact, name: str) -> None:
    _check_against_interpreter(opencl_artifact(name), EXAMPLES / f"{name}.moe")


@needs_opencl
@pytest.mark.parametrize("passes", ["quantize(w=int4,group=32,a=int8,dynamic=token)"])
def test_opencl_quantized_artifact_matches_the_interpreter(tmp_path, passes: str) -> None:
    """Low-bit weights stay low-bit on the device and are dequantised in the matmul kernels."""
    spec = EXAMPLES / "mixtral_tiny.moe"
    mocompile.compile(spec, target="opencl", passes=passes, out_dir=tmp_path / "art", batch=2, seq=4)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert {w["dtype"] for w in manifest["program"]["weight_layouts"]} >= {"uint8"}
    _check_against_interpreter(tmp_path / "art", spec, passes)


@needs_opencl
def test_isolation_check_runs_its_differential_on_an_opencl_artifact(opencl_artifact) -> None:
    from mocompile.artifact_isolation import check_artifact

    report = check_artifact(load(opencl_artifact("mixtral_tiny")), batch=3, seq=5)
    assert report.verdict == "isolated", report
    assert report.differential and report.differential["bitwise_identical"], report.differential
    assert report.differential["cached_step"]["bitwise_identical"], report.differential


def _kernel_with_host_loop() -> tirx.PrimFunc:
    n = G.dim("n")
    with G.kernel("host_loop") as kern:
        x = G.arg("x", (n, 64))
        with G.serial(0, n) as i:  # not bound to blocks: it would run on the host
            with G.grid(1) as _:
                with G.block(64) as t:
                    G.store(x, (i, t), x[i, t] + G.f32(1))
    return kern.func


def _kernel_with_one_thread() -> tirx.PrimFunc:
    n = G.dim("n")
    with G.kernel("one_thread") as kern:
        x = G.arg("x", (n,))
        with G.grid(n) as b:
            with G.block(1) as t:
                G.store(x, (b + t,), x[b + t] * G.f32(2))
    return kern.func


@pytest.mark.parametrize("target", ["opencl", "cuda"])
@pytest.mark.parametrize("make,message", [(_kernel_with_host_loop, "kernel host_loop: a loop over .* is not bound to GPU blocks or threads"),
                                          (_kernel_with_one_thread, "kernel one_thread: launches one_thread_kernel with a "
                                                                    "single thread")])
def test_schedule_check_refuses_host_loops_and_single_thread_launches(target: str, make, message: str) -> None:
    import tvm

    if target == "cuda" and find_nvcc() is None:
        pytest.skip("TVM's CUDA code generation calls nvcc")
    func = make()
    mod = tvm.IRModule({str(func.attrs["mocompile.kernel"]): func})
    with pytest.raises(ScheduleError, match=message):
        generate(mod, GpuTarget.parse(target))


def _cuda_compile(tmp_path: Path, name: str, passes: str) -> dict:
    mocompile.compile(EXAMPLES / f"{name}.moe", target="cuda", passes=passes, out_dir=tmp_path / "art", batch=2, seq=4)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert (tmp_path / "art" / "kernels.cubin").stat().st_size > 0
    assert manifest["target"]["arch"] == "sm_90"
    return manifest


@needs_nvcc
def test_cuda_compile_of_an_example_is_checked_by_nvcc_or_run(tmp_path) -> None:
    manifest = _cuda_compile(tmp_path, "mixtral_tiny", "")
    verification = manifest["verification"]
    if cuda_device_problem("sm_90") is None:
        assert verification["status"] == "verified"
    else:
        assert verification["status"] == "not run" and "no NVIDIA GPU" in verification["reason"]
        assert any("-Werror all-warnings" in c for c in verification["checked"])
    # the static verdicts of its cached step and prefill, recorded whether it runs here or not
    assert manifest["isolation"]["decoding"] == {"step": "isolated", "prefill": "isolated"}


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("passes", ["", "quantize(w=int8)"])
@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_cuda_of_every_example_compiles_with_nvcc_for_sm90(tmp_path, name: str, passes: str) -> None:
    _cuda_compile(tmp_path, name, passes)


@needs_nvcc
def test_nvcc_rejecting_code_fails_the_compile_in_one_line(tmp_path) -> None:
    source = tmp_path / "bad.cu"
    source.write_text('extern "C" __global__ void k(float* x) { int unused_result; x[0] = 1.0f; }\n')
    with pytest.raises(NvccError) as err:
        compile_cuda(source, tmp_path / "bad.cubin", "sm_90")
    assert "\n" not in str(err.value) and "unused_result" in str(err.value)


def test_gpu_target_options_are_checked() -> None:
    assert GpuTarget.parse("cuda").arch == "sm_90"
    assert GpuTarget.parse("cuda -arch=sm_80").arch == "sm_80"
    for bad in ("cuda -arch=sm_75", "opencl -arch=sm_90", "cuda sm_90"):
        with pytest.raises(ValueError, match="target"):
            GpuTarget.parse(bad)


@needs_cuda_gpu
def test_cuda_artifact_runs_on_the_gpu_and_matches_the_interpreter(tmp_path) -> None:
    spec = EXAMPLES / "mixtral_tiny.moe"
    mocompile.compile(spec, target="cuda", out_dir=tmp_path / "art", batch=2, seq=4)
    art = load(tmp_path / "art")
    x = random_inputs(art.signature, 2, 7, seed=5)
    want = _interpreter_outputs(lower_source(source_for(spec, None, None, 0)), x)
    for got in (art.run(x), art.run_cached(x, 4)):
        for name, ref in want.items():
            assert np.abs(got[name] - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.skipif(cuda_device_problem("sm_90") is None, reason="an NVIDIA GPU is here: the script would benchmark")
def test_bench_gpu_skips_with_a_clear_message_without_a_gpu() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    results = (root / "benchmarks" / "RESULTS.md").read_text()
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_gpu.py")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("bench_gpu: skipped, nothing measured or written: no NVIDIA GPU here"), r.stdout
    assert (root / "benchmarks" / "RESULTS.md").read_text() == results


@needs_opencl
def test_inspect_lists_a_gpu_artifacts_kernels_with_launch_shapes(opencl_artifact) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mocompile.cli", "inspect", str(opencl_artifact("mixtral_tiny")), "--kernels"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("18 kernels for opencl (source: kernels.cl")  # last_position's too (prefill)
    dense = next(line for line in lines if line.strip().startswith("dense_128x128_tj32_plain "))
    assert "grid 4 x ((m + 3) // 4) x 1" in dense and "block 32 x 4 x 1" in dense
    assert lines[-1].startswith("kernel launches per call: main ")


@needs_opencl
@pytest.mark.parametrize("experts,top_k,tokens", [(8, 2, 13), (300, 8, 5)])
def test_expert_sort_kernel_is_a_stable_counting_sort(experts: int, top_k: int, tokens: int) -> None:
    """The GPU plan kernel (one block, experts strided over its threads when there are more
    experts than threads) against numpy: indptr, and each expert's pairs in token order."""
    import tvm

    from mocompile.backends.tvm_gpu import kernels_moe
    from mocompile.gpu_plan import PlanRunner
    from mocompile.runtime_opencl import OpenclDevice

    func = kernels_moe.moe_plan(experts, top_k)
    code = generate(tvm.IRModule({"plan": func}), GpuTarget.parse("opencl"))
    runner = PlanRunner(OpenclDevice(code.source), {}, {n: e.to_json() for n, e in code.kernels.items()})
    rng = np.random.default_rng(0)
    indices = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)]).astype(np.int32)
    weights = rng.random((tokens, top_k), dtype=np.float32)
    pairs = tokens * top_k
    outs = [runner.empty((experts + 1,), "int32"), runner.empty((pairs,), "int32"), runner.empty((pairs,), "float32"),
            runner.empty((pairs,), "int32")]
    runner.call("plan", [runner.array(indices), runner.array(weights), *outs])
    indptr, row_token, row_weight, pair_row = (runner.fetch(o) for o in outs)
    flat = indices.reshape(-1)
    order = np.argsort(flat, kind="stable")  # pairs by expert, token order within one
    assert (indptr == np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=experts))])).all()
    assert (row_token == order // top_k).all() and (row_weight == weights.reshape(-1)[order]).all()
    assert (pair_row[order] == np.arange(pairs)).all()


@needs_opencl
def test_gpu_runtime_imports_neither_tvm_nor_torch(opencl_artifact) -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom mocompile.runtime import load, random_inputs\n"
            f"art = load({str(opencl_artifact('mixtral_tiny'))!r})\n"
            "art.run(random_inputs(art.signature, 1, 3))\n"
            "print(sorted(m for m in ('tvm', 'torch') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_cuda_compile_without_nvcc_fails_in_one_line(tmp_path) -> None:
    """A machine without the CUDA toolkit: nothing on PATH, CUDA_HOME or /usr/local/cuda."""
    import os
    import subprocess
    import sys

    if Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("/usr/local/cuda holds nvcc here, which the compile finds whatever PATH says")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = str(Path(sys.executable).parent)
    r = subprocess.run([sys.executable, "-m", "mocompile.cli", "compile", str(EXAMPLES / "mixtral_tiny.moe"), "--target",
                        "cuda", "-o", str(tmp_path / "art")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "mocompile: error: the cuda target needs nvcc (the CUDA toolkit) to compile its kernels; none was found on "
        "PATH, CUDA_HOME or /usr/local/cuda"]
    assert not (tmp_path / "art").exists()
