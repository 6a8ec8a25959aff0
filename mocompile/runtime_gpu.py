"""Loading a GPU artifact (program kind "gpu-launch-plan", backends/tvm_gpu): the same API as
a CPU artifact (`run`, `new_cache` / `step` / `run_cached` / `generate`, the same input
checks), with the weights and the KV cache in device memory and every call replayed from the
artifact's launch plan (gpu_plan.py) on an OpenCL device (runtime_opencl.py) or an NVIDIA GPU
(runtime_cuda.py). No TVM and no torch are imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mocompile.errors import ArtifactError
from mocompile.gpu_plan import DeviceArray, PlanRunner
from mocompile.runtime import LoadedArtifact, register_program_kind
from mocompile.signature import Signature

PROGRAM_KIND = "gpu-launch-plan"


def open_device(path: Path, program: dict[str, Any]) -> Any:
    """The device that runs the artifact's code (its "api": opencl or cuda)."""
    api = program.get("api")
    if api == "opencl":
        from mocompile.runtime_opencl import OpenclDevice

        return OpenclDevice((path / program["source"]).read_text())
    if api == "cuda":
        from mocompile.runtime_cuda import CudaDevice

        return CudaDevice((path / program["binary"]).read_bytes())
    raise ArtifactError(f"{path}: GPU program api {api!r} is neither opencl nor cuda")


class GpuArtifact(LoadedArtifact):
    """A loaded GPU artifact (see the module docstring); `device` overrides the one the
    program's api opens (a test's, say)."""

    def __init__(self, path: Path, manifest: dict[str, Any], driver: bool = True, device: Any = None) -> None:
        self.path = path
        self.manifest = manifest
        self.signature = Signature.from_json(manifest["signature"])
        program = manifest["program"]
        if program.get("kind") != PROGRAM_KIND:
            raise ArtifactError(f"{path}: program kind {program.get('kind')!r} is not a GPU launch plan")
        self.max_seq = (manifest.get("model") or {}).get("max_seq") or (program.get("step") or {}).get("max_positions")
        self._highs = {t.name: t.high for t in self.signature.inputs if t.high is not None}
        plan = json.loads((path / program["plan"]).read_text())
        self._runner = PlanRunner(device or open_device(path, program), plan["functions"], plan["kernels"])
        self.device_name = getattr(self._runner.device, "name", program.get("api"))
        from safetensors import safe_open

        names = program["weight_order"] + program.get("constants", [])
        with safe_open(str(path / program["weights"]), "np") as f:
            missing = [n for n in names if n not in f.keys()]
            if missing:
                raise ArtifactError(f"{path / program['weights']}: missing weight {missing[0]!r}")
            self._device_weights = {n: self._runner.array(f.get_tensor(n)) for n in names}
        self._weights = [self._device_weights[n] for n in program["weight_order"]]
        self._tensor = self._runner.array
        self._from_dlpack = _identity
        self._shape = int
        self._plans = {}
        self._output_names = [t.name for t in self.signature.outputs]
        self._empties = {}
        self._staging = {}
        self._driver = self._driver_positions = None
        self._fn = lambda *args: self._call("main", args)
        self._step = (lambda *args: self._call("step", args)) if program.get("step") else None
        self._prefill = (lambda *args: self._call("prefill", args)) if program.get("step") and \
            program.get("prefill") else None

    def _call(self, function: str, args: Sequence[Any]) -> Any:
        """A Relax-style call (inputs, [past, caches,] weights) replayed from the plan."""
        plan = self._runner.functions[function]
        tensors = dict(self._device_weights)
        position = 0
        past = 0
        for p in plan["params"]:
            if p["role"] == "past":
                past = int(args[position])
                position += 1
            elif p["role"] in ("input", "cache"):
                a = args[position]
                tensors[p["name"]] = a if isinstance(a, DeviceArray) else self._runner.array(np.asarray(a))
                position += 1
        outs = [self._runner.fetch(r) for r in self._runner.run(function, tensors, past)]
        return outs[0] if len(outs) == 1 else outs


def _identity(a: Any) -> Any:
    return a


register_program_kind(PROGRAM_KIND, GpuArtifact)
