"""bf16 and fp16 weights on the GPU targets: the weights stay 16-bit in device memory and the
kernels widen them to float32 in registers (bf16 by a shift, fp16 by integer ops, since
OpenCL's `half` needs cl_khr_fp16, which PoCL on a CPU lacks, and TVM's CUDA half prelude
fails nvcc's warnings-as-errors), accumulating in float32 as the float32 kernels do.

- every one of the 65536 bit patterns widens exactly as numpy converts it (the gather kernel
  on the OpenCL device);
- matmuls over paired (even k) and single (odd k) bf16 panels, and fp16 panels, match the IR
  interpreter;
- a bf16 Hugging Face checkpoint compiles for opencl with bf16 weights by default (half the
  weight bytes of float32), runs on the OpenCL device, matches transformers run in float32 on
  the same bf16 weights within 1e-4, and decodes with its cache; fp16 weights do too;
- the CUDA compile of bf16 and fp16 weights passes nvcc (warnings as errors).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

import mocompile  # noqa: E402
from conftest import EXAMPLES  # noqa: E402
from mocompile.backends.tvm_gpu.codegen import generate  # noqa: E402
from mocompile.backends.tvm_gpu.nvcc import find_nvcc  # noqa: E402
from mocompile.backends.tvm_gpu.target import GpuTarget  # noqa: E402
from mocompile.gpu_devices import opencl_devices  # noqa: E402
from mocompile.runtime import load  # noqa: E402
from test_weight_dtype import VOCAB, _manifest, _transformers_logits, checkpoint  # noqa: E402,F401

needs_opencl = pytest.mark.skipif(not opencl_devices(), reason="no OpenCL device (pip install pyopencl; apt-get "
                                                                "install pocl-opencl-icd)")
needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc (the CUDA toolkit) is not installed")


def _runner(mod):
    """The kernels of `mod` built for the OpenCL device, and their OpenCL C."""
    from mocompile.gpu_plan import PlanRunner
    from mocompile.runtime_opencl import OpenclDevice

    code = generate(mod, GpuTarget.parse("opencl"))
    return PlanRunner(OpenclDevice(code.source), {}, {n: e.to_json() for n, e in code.kernels.items()}), code.source


@needs_opencl
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_16_bit_pattern_widens_exactly(dtype: str) -> None:
    """The embedding gather over a table of all 65536 bit patterns (zeros, subnormals, normals,
    infinities, NaNs) returns numpy's float32 for each, bit for bit; the OpenCL C has no
    `half` type, so no device extension is needed."""
    import tvm

    from mocompile.backends.tvm_gpu import kernels_rows

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(1024, 64)
    want = (bits.view(np.float16).astype(np.float32) if dtype == "float16"
            else (bits.astype(np.uint32) << 16).view(np.float32))
    runner, source = _runner(tvm.IRModule({"gather": kernels_rows.gather_rows(64, "int32", 1024, dtype)}))
    assert "half" not in source and "cl_khr_fp16" not in source
    index = np.arange(1024, dtype=np.int32)[::-1].copy()
    out = runner.empty((1024, 64), "float32")
    runner.call("gather", [runner.array(bits), runner.array(index), out])
    got = runner.fetch(out)
    want = want[index]
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])


@needs_opencl
@pytest.mark.parametrize("dtype, k", [("bf16", 64), ("bf16", 63), ("fp16", 64)])
def test_gpu_matmul_reads_16_bit_panels(tmp_path, dtype: str, k: int) -> None:
    """A linear over 16-bit weights (bf16 with an even k: two inputs per uint32 word; odd k or
    fp16: one per uint16) on the OpenCL device against the IR interpreter."""
    from safetensors.numpy import load_file

    from mocompile.backends.tvm_gpu.artifact import emit
    from mocompile.gpu_plan import PlanRunner
    from mocompile.ir.graph import Graph
    from mocompile.ir.interpreter import run
    from mocompile.ir.types import TensorType
    from mocompile.pass_manager import PassManager
    from mocompile.runtime_opencl import OpenclDevice

    g = Graph("widen")
    x = g.add_input("x", TensorType(("rows", k), "float32"))
    w = g.add_param("w", np.random.default_rng(4).standard_normal((48, k)).astype(np.float32))
    g.outputs = [g.add("linear", x, w)]
    g, _ = PassManager(f"weight-dtype(dtype={dtype})").run(g)
    program = emit(g, tmp_path, GpuTarget.parse("opencl"))
    paired = dtype == "bf16" and k % 2 == 0
    assert {w["dtype"] for w in program["weight_layouts"]} == {"uint32" if paired else "uint16"}
    plan = json.loads((tmp_path / program["plan"]).read_text())
    runner = PlanRunner(OpenclDevice((tmp_path / program["source"]).read_text()), plan["functions"], plan["kernels"])
    xs = np.random.default_rng(5).standard_normal((3, k)).astype(np.float32)
    tensors = {n: runner.array(a) for n, a in load_file(str(tmp_path / program["weights"])).items()}
    (y,) = runner.run("main", {**tensors, "x": runner.array(xs)})
    np.testing.assert_allclose(runner.fetch(y), run(g, {"x": xs})[g.outputs[0].name], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def opencl_artifacts(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The bf16 checkpoint compiled for opencl with no --dtype (bf16 by default) and with
    --dtype fp32 (each compile verifies its artifact against the IR interpreter on the device)."""
    if not opencl_devices():
        pytest.skip("no OpenCL device")
    root = tmp_path_factory.mktemp("gpu_bf16")
    mocompile.compile(checkpoint, target="opencl", out_dir=root / "default", batch=2, seq=5)
    mocompile.compile(checkpoint, target="opencl", out_dir=root / "fp32", batch=2, seq=5, dtype="fp32")
    return {"bf16": root / "default", "fp32": root / "fp32"}


def test_bf16_checkpoint_keeps_bf16_weights_on_opencl(opencl_artifacts) -> None:
    bf16, fp32 = _manifest(opencl_artifacts["bf16"]), _manifest(opencl_artifacts["fp32"])
    assert (bf16["weight_dtype"], fp32["weight_dtype"]) == ("bfloat16", "float32")
    assert bf16["program"]["kind"] == "gpu-launch-plan" and bf16["program"]["api"] == "opencl"
    layouts = bf16["program"]["weight_layouts"]
    # every matmul weight two bf16 inputs per uint32 word, the embedding table uint16; only norms float32
    assert all(w.get("store") == "k_pairs" and w["dtype"] == "uint32" for w in layouts if w["kind"] != "identity")
    assert any("embed" in w["name"] and w["dtype"] == "uint16" for w in layouts)
    norms = {w["name"] for w in layouts if "norm" in w["name"]}
    assert {w["name"] for w in layouts if w["dtype"] == "float32"} <= norms
    ratio = ((opencl_artifacts["bf16"] / "weights.safetensors").stat().st_size
             / (opencl_artifacts["fp32"] / "weights.safetensors").stat().st_size)
    assert 0.45 < ratio < 0.55, ratio
    assert bf16["verification"]["status"] == "verified" and bf16["verification"]["max_rel_error"] <= 1e-4
    assert bf16["decode_verification"]["max_rel_error"] <= 1e-4 and bf16["decode_verification"]["new_tokens"] > 0


def test_bf16_opencl_artifact_matches_transformers_and_decodes(checkpoint, opencl_artifacts) -> None:
    """The artifact's logits against transformers in float32 on the same bf16 weights, and its
    cached decoding (a step per token after the prompt) against its own forward."""
    import torch

    art = load(opencl_artifacts["bf16"])
    assert art.can_decode
    ids = np.random.default_rng(7).integers(0, VOCAB, (2, 9), dtype=np.int64)
    got = art.run({"text": ids})["logits"]
    want = _transformers_logits(checkpoint, torch.float32, ids)
    assert np.abs(want).max() > 0.5  # not a comparison of near-zero logits
    assert np.abs(got - want).max() <= 1e-4
    cached = art.run_cached({"text": ids}, 4)["logits"]
    assert np.abs(cached - want).max() <= 1e-4


@needs_opencl
def test_spec_compiles_for_opencl_with_fp16_weights(tmp_path) -> None:
    """fp16 weights on OpenCL (widened by integer ops: PoCL here has no cl_khr_fp16)."""
    out = tmp_path / "fp16"
    mocompile.compile(EXAMPLES / "mixtral_tiny.moe", target="opencl", out_dir=out, batch=2, seq=4, dtype="fp16")
    manifest = _manifest(out)
    assert manifest["weight_dtype"] == "float16"
    assert {w["dtype"] for w in manifest["program"]["weight_layouts"] if "norm" not in w["name"]} == {"uint16"}
    assert manifest["verification"]["status"] == "verified" and manifest["verification"]["max_rel_error"] <= 1e-4
    assert manifest["decode_verification"]["max_rel_error"] <= 1e-4
    assert "half" not in (out / "kernels.cl").read_text()


@needs_nvcc
@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_cuda_compile_of_16_bit_weights_passes_nvcc(checkpoint, tmp_path, dtype: str | None) -> None:
    """The bf16 checkpoint (bf16 by default, or stored fp16) for cuda: nvcc compiles the widening
    kernels with warnings as errors; without an NVIDIA GPU the compile says it did not run them."""
    from mocompile.gpu_devices import cuda_device_problem

    out = tmp_path / "art"
    mocompile.compile(checkpoint, target="cuda", out_dir=out, batch=2, seq=5, dtype=dtype)
    manifest = _manifest(out)
    assert manifest["weight_dtype"] == ("float16" if dtype else "bfloat16")
    assert (out / "kernels.cubin").stat().st_size > 0
    assert {w["dtype"] for w in manifest["program"]["weight_layouts"] if "norm" not in w["name"]} == (
        {"uint16"} if dtype else {"uint16", "uint32"})
    verification = manifest["verification"]
    if cuda_device_problem("sm_90") is None:
        assert verification["status"] == "verified" and verification["max_rel_error"] <= 1e-4
    else:
        assert verification["status"] == "not run" and "no NVIDIA GPU" in verification["reason"]
        assert any("nvcc compiled" in c and "-Werror all-warnings" in c for c in verification["checked"])
