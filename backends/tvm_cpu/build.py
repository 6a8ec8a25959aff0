"""Build a lowered program into a native library and run it.

`build` compiles the Relax module with relax.build for an LLVM CPU target; the result is a
shared library (`export_library`) that the runtime loads with
`tvm.runtime.load_module(path)` + `tvm.relax.VirtualMachine(lib, tvm.cpu())` and calls as
`vm["main"](*inputs, *weights)` (program.py documents the order).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import tvm
from tvm import relax

from mocompile.backends.tvm_common.program import LoweredProgram
from mocompile.backends.tvm_cpu.target import VNNI, CpuTarget, as_cpu_target
from mocompile.threads import configure_tvm_threads

configure_tvm_threads()  # before TVM's pool starts; see mocompile/threads.py


class Executable:
    """A built program: the compiled VM executable plus its calling convention."""

    def __init__(self, exe: tvm.runtime.Executable, program: LoweredProgram) -> None:
        self.exe = exe
        self.program = program
        self._vm: relax.VirtualMachine | None = None
        self._weights: list[tvm.runtime.Tensor] | None = None

    def export_library(self, path: str) -> None:
        """Write the shared library (weights are not in it; see LoweredProgram.arrays)."""
        self.exe.export_library(path)

    @property
    def vm(self) -> relax.VirtualMachine:
        if self._vm is None:
            self._vm = relax.VirtualMachine(self.exe, tvm.cpu())
        return self._vm

    def load_weights(self, arrays: Mapping[str, np.ndarray] | None = None) -> None:
        """Upload the weights once (default: the program's own packed arrays)."""
        arrays = arrays if arrays is not None else self.program.arrays
        self._weights = [tvm.runtime.tensor(np.ascontiguousarray(arrays[n])) for n in self.program.weight_names]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `main` on numpy inputs; returns {output name: array}."""
        if self._weights is None:
            self.load_weights()
        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[n])) for n in self.program.input_names]
        return unpack_outputs(self.vm["main"](*args, *self._weights), self.program.output_names)


def unpack_outputs(result, names: Sequence[str]) -> dict[str, np.ndarray]:
    """VM result (one tensor or a tuple of them) -> {name: numpy array}."""
    items = [result] if len(names) == 1 else [result[i] for i in range(len(names))]
    return {n: t.numpy() for n, t in zip(names, items)}


def relax_pipeline() -> tvm.transform.Pass:
    """TVM's default Relax build pipeline minus LegalizeOps / RewriteDataflowReshape.

    The lowered module holds only call_tir's to kernels this backend scheduled, plus
    `relax.reshape` views; legalizing would turn those reshapes into (unscheduled) copy
    kernels only to turn them back, and the reshape-pattern analysis cannot read
    hand-written (non-block) TIR. The VM lowers the remaining reshapes to free views.
    DeadCodeElimination drops the views no kernel reads (the lowerings give every result
    its IR shape, and most consumers read the 2-D form): each costs the VM two builtin
    calls per step, a tenth of a tiny model's decode step in all.
    """
    t = relax.transform
    return tvm.transform.Sequential([
        t.DeadCodeElimination(),
        t.ToNonDataflow(),
        t.RemovePurityChecking(),
        t.CallTIRRewrite(),
        t.StaticPlanBlockMemory(),
        t.LowerAllocTensor(),
        t.KillAfterLastUse(),
        t.LowerRuntimeBuiltin(),
        t.ComputePrimValue(),
        t.VMShapeLower(),
        t.AttachGlobalSymbol(),
    ], name="mocompile_tvm_cpu")


def build(program: LoweredProgram, target: CpuTarget | str | tvm.target.Target | None = None) -> Executable:
    """Compile a lowered program for `target` (a CpuTarget, its text or a TVM LLVM target;
    default: the target the program was lowered for, all cores). A target other than the
    one the kernels were shaped for is the caller's choice (e.g. another thread count)."""
    if isinstance(target, tvm.target.Target):
        cpu = as_cpu_target(target)
    else:
        cpu = as_cpu_target(target if target is not None else program.target)
        target = cpu.llvm()
    if program.target is not None and program.target.integer_matmuls and not cpu.integer_matmuls:
        raise ValueError(f"the program's integer kernels need {VNNI}, which {cpu.text()} lacks; lower it for that "
                         "target instead")
    with target:
        exe = relax.build(program.mod, target, relax_pipeline=relax_pipeline())
    return Executable(exe, program)
