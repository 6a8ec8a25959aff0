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


def _runner(mod, target: str = "opencl"):
    from mocompile.gpu_plan import PlanRunner
    from mocompile.runtime_opencl import OpenclDevice

    code = generate(mod, GpuTarget.parse(target))
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
