"""Scheduling the GPU module's te kernels, and the check that every kernel is a real GPU launch.

Hand-written kernels (gpu_util) carry their thread bindings where they are written. The te
kernels (tvm_common/injective.py: elementwise ops, concat, segment ids) get TVM's dlight GPU
rules: Fallback, which binds an injective block's fused loops to blocks and threads. The
check itself runs on the lowered code (codegen.py's `check_launches`): no loop may be left on
the host and no launch may run a single thread.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import dlight as dl

from mocompile.backends.tvm_common.kernels import HAND_SCHEDULED_ATTR
from mocompile.backends.tvm_gpu.target import GpuTarget


def _hand_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs is not None and HAND_SCHEDULED_ATTR in func.attrs and func.attrs[HAND_SCHEDULED_ATTR])


def schedule_module(mod: tvm.IRModule, target: GpuTarget) -> tvm.IRModule:
    """Bind the te kernels of `mod` with dlight's GPU rules (hand-written kernels are kept)."""
    te_funcs = {gv: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc) and not _hand_scheduled(f)}
    if not te_funcs:
        return mod
    part = tvm.IRModule({gv: f for gv, f in te_funcs.items()})
    with target.tvm():
        part = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                       dl.gpu.Fallback())(part)
    for gv in te_funcs:
        mod.update_func(gv, part[gv.name_hint])
    return mod
