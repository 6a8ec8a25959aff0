"""`emit` for the GPU targets: lower with the GPU kernels, generate the device code, write
the launch plan, and (CUDA) compile the code with nvcc.

Files written:
- `kernels.cl` (OpenCL C) or `kernels.cu` (CUDA C++, kept for inspection) and, for CUDA,
  `kernels.cubin` (nvcc for the target's arch);
- `launch_plan.json`: per Relax function (`main`, `step`, `prefill`) its allocations, views and kernel
  calls (plan.py), and per kernel its parameters and device launches (codegen.py);
- `weights.safetensors`: the runtime weights in the shared panel layouts, and the functions'
  constants.
The returned program entry ("gpu-launch-plan") is what mocompile.runtime_gpu loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tvm
from safetensors.numpy import save_file

from mocompile.backends.tvm_common.lower import lower_module
from mocompile.backends.tvm_common.prefill import PREFILL_FUNCTION, prefill_fields
from mocompile.backends.tvm_common.prefill import manifest_entry as prefill_entry
from mocompile.backends.tvm_gpu.codegen import generate
from mocompile.backends.tvm_gpu.kernels import GpuKernels
from mocompile.backends.tvm_gpu.kernels_attention import KB
from mocompile.backends.tvm_gpu.nvcc import compile_cuda, require_nvcc
from mocompile.backends.tvm_gpu.plan import function_plan
from mocompile.backends.tvm_gpu.target import GpuTarget
from mocompile.ir.graph import Graph

PROGRAM_KIND = "gpu-launch-plan"
PLAN = "launch_plan.json"
WEIGHTS = "weights.safetensors"
SOURCE = {"opencl": "kernels.cl", "cuda": "kernels.cu"}
BINARY = "kernels.cubin"


def emit(graph: Graph, out_dir: str | Path, target: GpuTarget) -> dict[str, Any]:
    out_dir = Path(out_dir)
    if target.kind == "cuda":
        require_nvcc()
    kernels = GpuKernels(target)
    lowered = lower_module(graph, kernels)
    mod = kernels.schedule(lowered.mod)
    code = generate(mod, target)
    weights = list(lowered.main.weight_layouts)
    inputs = len(graph.inputs)
    functions, constants = {}, {}
    for name, ctx in (("main", lowered.main), ("step", lowered.step), (PREFILL_FUNCTION, lowered.prefill)):
        if ctx is not None:  # the cached functions exist where the graph decodes with a cache
            functions[name], consts = function_plan(mod, name, weights, inputs, len(ctx.cache or ()))
            constants.update({f"{name}.const{i}": a for i, a in enumerate(consts)})
    source = out_dir / SOURCE[target.kind]
    source.write_text(code.source)
    binary = {}
    if target.kind == "cuda":
        compile_cuda(source, out_dir / BINARY, target.arch)
        binary = {"binary": BINARY}
    (out_dir / PLAN).write_text(json.dumps({"functions": functions,
                                            "kernels": {n: e.to_json() for n, e in code.kernels.items()}}, indent=1))
    arrays = lowered.main.weight_arrays
    save_file({**{w.name: arrays[w.name] for w in weights}, **constants}, str(out_dir / WEIGHTS))
    return {
        "kind": PROGRAM_KIND,
        "api": target.kind,
        "source": source.name,
        **binary,
        "plan": PLAN,
        "weights": WEIGHTS,
        "weight_order": [w.name for w in weights],
        "weight_layouts": [w.to_json() for w in weights],
        "constants": list(constants),
        "kernel_calls": lowered.kernel_calls,
        "kernels": {n: [launch.to_json() for launch in e.launches] for n, e in code.kernels.items()},
        **({"step": {"function": "step", "cache": lowered.cache, "block": KB,
                     "max_positions": graph.meta.get("max_seq")}}
           if lowered.step is not None else {"no_step_reason": lowered.no_step_reason}),
        **prefill_entry(**prefill_fields(lowered)),
        "target_info": {"backend": "tvm_gpu", **target.info(), "tvm_version": tvm.__version__},
    }
