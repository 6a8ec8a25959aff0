"""TVM CPU backend: mocompile IR -> Relax module with hand-scheduled TIR kernels -> shared
library run by the Relax VM.

    program = lower(graph)            # LoweredProgram: module + weights in backend layout
    exe = build(program, host_target(num_cores=2))
    exe.export_library("model.so")    # runtime: load_module + relax.VirtualMachine
    outputs = exe.run({"ids": ids})

`emit(graph, out_dir)` does all of it for the compiler (artifact.py). `lower`, `build` and
`emit` take a `target` (target.py's CpuTarget or its text, default this host, e.g.
`lower(graph, target=CpuTarget.parse("cpu -mcpu=haswell"))`): it decides how the kernels
are shaped and what they are built for. See program.py for the calling convention and
layout.py for the weight layouts.
"""

from mocompile.backends.tvm_cpu.artifact import emit
from mocompile.backends.tvm_cpu.build import Executable, build
from mocompile.backends.tvm_common.layout import WeightLayout
from mocompile.backends.tvm_cpu.lower import LoweringError, lower
from mocompile.backends.tvm_common.program import LoweredProgram
from mocompile.backends.tvm_cpu.target import CpuTarget, host_cpu, host_target, missing_features, runs_here
from mocompile.backends.tvm_cpu.tuning import TuningDB, tune

__all__ = ["emit", "CpuTarget", "Executable", "LoweredProgram", "LoweringError", "TuningDB", "WeightLayout", "build",
           "host_cpu", "host_target", "lower", "missing_features", "runs_here", "tune"]
