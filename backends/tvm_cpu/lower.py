"""IR graph -> the CPU's lowered program: the shared lowering (tvm_common/lower.py) with the
CPU's kernels (kernels.py's CpuKernels), then the CPU's own steps: the te kernels scheduled
and every kernel checked to be (schedule.py), and the decode driver (driver.py).

The lowering registry and context live in tvm_common; they are re-exported here for the
callers that lower for the CPU (`lower`, `LoweringError`, `refusal`).
"""

from __future__ import annotations

from typing import Mapping

from mocompile.backends.tvm_common.lower import (CACHE_LEN, LOWERINGS, LowerContext,  # noqa: F401
                                                 LoweringError, _register_builtin_lowerings, lower_module)
from mocompile.backends.tvm_common.lower import refusal as shared_refusal
from mocompile.backends.tvm_common.prefill import prefill_fields
from mocompile.backends.tvm_common.program import LoweredProgram
from mocompile.backends.tvm_cpu.driver import DRIVER, Driver, decode_driver
from mocompile.backends.tvm_cpu.kernels import CpuKernels
from mocompile.backends.tvm_cpu.target import CpuTarget
from mocompile.ir.graph import Graph

BACKEND = CpuKernels.name


def refusal(graph: Graph) -> str | None:
    """Why the CPU backend cannot compile `graph`, or None (see tvm_common.lower.refusal)."""
    return shared_refusal(graph, BACKEND)


def lower(graph: Graph, cached_step: bool = True, tuning: Mapping[str, Mapping] | None = None,
          target: CpuTarget | None = None) -> LoweredProgram:
    """Lower an IR graph to a Relax module with `main(*inputs, *weights)` and, when the graph
    can decode with a KV cache (`decode_support`) and `cached_step`, `step(*inputs, past,
    *caches, *weights)`; see program.py for the calling convention. Raises LoweringError for
    ops or attributes this backend lacks. `tuning`: tuning records ({"tj", "ti", "ku"}) by
    MatmulShape key (see tuning.py); matmuls without one get the default tiling. `target`:
    the CPU the kernels are shaped for (default: this host), kept in the program for build."""
    cpu = target or CpuTarget.host()
    kernels = CpuKernels(cpu)
    lowered = lower_module(graph, kernels, cached_step, tuning)
    ctx = lowered.main
    mod = kernels.schedule(lowered.mod)
    driver = decode_driver(mod, ctx.weight_layouts)
    if isinstance(driver, Driver):
        mod[DRIVER] = driver.func
    return LoweredProgram(mod, [v.name for v in graph.inputs], [v.name for v in graph.outputs],
                          list(ctx.weight_layouts), dict(ctx.weight_arrays), lowered.cache, lowered.no_step_reason,
                          lowered.kernel_calls, list(ctx.matmuls.values()),
                          driver_constants=driver.constants if isinstance(driver, Driver) else None,
                          no_driver_reason=None if isinstance(driver, Driver) else driver, target=cpu,
                          routers=list(ctx.routers), expert_reads=dict(ctx.expert_reads),
                          kernel_flops=dict(ctx.kernel_flops), contextual=list(ctx.contextual),
                          layer_states=lowered.layer_states, **prefill_fields(lowered))
