"""`emit`: the backend entry point of the compiler (mocompile.compiler): lower, build and
write the backend's files into an artifact directory.

Files written: `model.so` (the Relax VM executable; TVM runtime only) and
`weights.safetensors` (every runtime weight, already in backend layout, keyed by name).
The returned dict becomes the manifest's "program" entry; mocompile.runtime reads
`library`, `weights`, `weight_order` and `function` from it and calls
`vm[function](*inputs, *[weights[n] for n in weight_order])`; `step` (absent with a
`no_step_reason` for graphs that cannot decode with a KV cache) describes the cached step
function and its cache tensors (program.py has the calling convention), `prefill` (or a
`no_prefill_reason`) the step returning the last position only, and `driver` (or a
`no_driver_reason`) the decode driver that runs its single-position steps without the VM
(driver.py): its function in the library and its constants' keys in the weights file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tvm

from mocompile.backends.tvm_common.contextual import summary as contextual_summary
from mocompile.backends.tvm_common.lower import LAYERS_FUNCTION
from mocompile.backends.tvm_common.prefill import manifest_entry as prefill_entry
from mocompile.backends.tvm_cpu.build import build
from mocompile.backends.tvm_cpu.driver import DRIVER, DRIVER_POSITIONS
from mocompile.backends.tvm_cpu.kernels_attention import KB
from mocompile.backends.tvm_cpu.lower import lower
from mocompile.backends.tvm_cpu.target import CpuTarget, as_cpu_target
from mocompile.backends.tvm_cpu.tuning import TuningDB
from mocompile.ir.graph import Graph
from mocompile.safetensors_io import save_arrays

PROGRAM_KIND = "tvm-relax-vm"
LIBRARY = "model.so"
WEIGHTS = "weights.safetensors"
TUNING = "tuning.json"


def emit(graph: Graph, out_dir: str | Path, tuning: TuningDB | None = None,
         target: CpuTarget | str | tvm.target.Target | None = None) -> dict[str, Any]:
    """Compile `graph` for `target` (a CpuTarget or its text, e.g. "cpu -mcpu=haswell";
    default: this host) into `out_dir` (matmuls tiled as `tuning` says, which is then saved
    beside the library as TUNING); return the manifest's program entry, whose target_info
    says what the code is built for (CpuTarget.info(): mcpu, features, low-bit path)."""
    out_dir = Path(out_dir)
    cpu = as_cpu_target(target)
    program = lower(graph, tuning=tuning.records if tuning else None, target=cpu)
    if tuning is not None and tuning.records:
        tuning.save(out_dir / TUNING)
    llvm = cpu.llvm()
    exe = build(program, llvm)
    exe.export_library(str(out_dir / LIBRARY))
    constants = {f"{DRIVER}.const{i}": a for i, a in enumerate(program.driver_constants or [])}
    save_arrays({**{n: program.arrays[n] for n in program.weight_names}, **constants}, out_dir / WEIGHTS)
    driver = ({"driver": {"function": DRIVER, "constants": list(constants), "positions": DRIVER_POSITIONS}}
              if program.driver_constants is not None else {"no_driver_reason": program.no_driver_reason})
    return {
        "kind": PROGRAM_KIND,
        "library": LIBRARY,
        "function": "main",
        "weights": WEIGHTS,
        "weight_order": program.weight_names,
        "weight_layouts": [w.to_json() for w in program.weights],
        "kernel_calls": program.kernel_calls,
        # each router kernel call of `main` in order, its last argument the chosen experts [rows, top_k]
        "routing": [{"kernel": kernel, "router": place, "indices_arg": -1} for kernel, place in program.routers],
        # per-expert kernels: which arguments are weights read only for experts with rows (offsets [E+1])
        "expert_reads": program.expert_reads,
        # matmul kernels: flops per row of the output (the last argument), for rooflines
        "kernel_flops": program.kernel_flops,
        # contextual sparsity: which kernel each of the step's matmuls runs, measured; the
        # compiler appends the note to the pass's summary line
        **({"contextual": program.contextual,
            "pass_notes": {"contextual-sparsity": contextual_summary(program.contextual)}} if program.contextual else {}),
        "tuned_kernels": sorted(k.key() for k in program.matmuls if tuning and k.key() in tuning.records),
        # each layer's output (the residual stream leaving it), for the layer-by-layer verification
        **({"layers": {"function": LAYERS_FUNCTION, "outputs": program.layer_states}} if program.layer_states else {}),
        **({"step": {"function": "step", "cache": program.cache, "block": KB, "max_positions": graph.meta.get("max_seq"),
                     **driver}}
           if program.cache is not None else {"no_step_reason": program.no_step_reason}),
        **prefill_entry(program.prefill, program.no_prefill_reason),
        "target_info": {"backend": "tvm_cpu", "llvm_target": {k: str(v) for k, v in llvm.export().items()
                                                               if k in ("kind", "mcpu", "num-cores")},
                        **cpu.info(), "tvm_version": tvm.__version__},
    }
