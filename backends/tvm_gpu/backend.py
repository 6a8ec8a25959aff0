"""The GPU targets as Backends: `--target opencl` and `--target "cuda [-arch=sm_90]"`. Both
lower through the shared TVM layer with the GPU kernels (kernels.py) and write a launch-plan
artifact (artifact.py) that mocompile.runtime_gpu runs. Where this machine has no device for
the artifact, the compile checks what it can without one (for CUDA: nvcc compiled every
kernel with warnings as errors) and says plainly that it was not run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mocompile.backends.base import Backend, register_backend
from mocompile.backends.tvm_common.lower import LOWERINGS, _register_builtin_lowerings, refusal
from mocompile.backends.tvm_gpu.artifact import PROGRAM_KIND, emit
from mocompile.backends.tvm_gpu.nvcc import find_nvcc, nvcc_command
from mocompile.backends.tvm_gpu.target import GpuTarget
from mocompile.gpu_devices import cuda_device_problem, opencl_devices
from mocompile.ir.graph import Graph


class _GpuBackend(Backend):
    program_kind = PROGRAM_KIND
    weight_formats = frozenset({"float32", "bfloat16", "float16", "int8", "int4"})
    builds_prefill = True  # tvm_common/prefill.py

    def parse_options(self, words: list[str]) -> dict[str, Any]:
        return {"gpu": GpuTarget.parse(" ".join([self.name, *words]))}

    @property
    def gpu(self) -> GpuTarget:
        return self.options["gpu"]

    def ops(self) -> frozenset[str]:
        _register_builtin_lowerings()
        return frozenset(LOWERINGS)

    def unsupported(self, graph: Graph) -> str | None:
        return refusal(graph, f"{self.name} (tvm_gpu)") or super().unsupported(graph)

    def emit(self, graph: Graph, out_dir: Path, *, tuning: Any = None) -> dict[str, Any]:
        return emit(graph, out_dir, self.gpu)


@register_backend
class OpenclBackend(_GpuBackend):
    name = "opencl"
    description = "OpenCL C from GPU-scheduled TIR (thread bindings, local memory), run through pyopencl"

    def cannot_run_here(self, manifest: dict[str, Any]) -> str | None:
        return None if opencl_devices() else "no OpenCL device here (pyopencl and a driver: a GPU's, or PoCL)"

    def static_checks(self, stage: Path, manifest: dict[str, Any]) -> list[str]:
        program = manifest["program"]
        return [f"TVM generated OpenCL C for {len(program['kernels'])} kernels ({program['source']}); every launch "
                "is bound to blocks and threads"]


@register_backend
class CudaBackend(_GpuBackend):
    name = "cuda"
    description = "CUDA C++ from GPU-scheduled TIR, compiled by nvcc to a cubin, run through the CUDA driver API"

    def cannot_run_here(self, manifest: dict[str, Any]) -> str | None:
        return cuda_device_problem(manifest["target"].get("arch"))

    def static_checks(self, stage: Path, manifest: dict[str, Any]) -> list[str]:
        program = manifest["program"]
        nvcc = find_nvcc() or "nvcc"
        command = " ".join(nvcc_command(Path(nvcc).name, Path(program["source"]), Path(program["binary"]),
                                        self.gpu.arch))
        return [f"nvcc compiled {len(program['kernels'])} kernels to {program['binary']} "
                f"({(stage / program['binary']).stat().st_size:,} bytes) with warnings as errors: {command}",
                "every launch is bound to blocks and threads (no single-thread launch, no loop left on the host)"]
