"""The decode driver: the `step` function's kernel calls as one TIR function, no Relax VM.

Why: a tiny model's decode step is a few microseconds of arithmetic per kernel, and the
Relax VM spends ~0.4 us around every kernel call on symbolic shapes (make_shape,
alloc_storage, alloc_tensor, reshape views, argument checks): a quarter of such a step
(profile in benchmarks/RESULTS.md). The driver makes the same calls, in the same order, to
the same kernels, so its results are the step's bit for bit, but each call is a direct C
call of the kernel's packed entry (`call_cpacked`, ~20 ns) and each intermediate a
workspace buffer (TVMBackendAllocWorkspace, a per-thread pool), with reshapes as views of
the same data. All intermediates live for the whole call (there is no memory planning),
which is fine for a decode step's few rows and is why the runtime uses the driver only for
steps of one position (`DRIVER_POSITIONS`); prompts go through the VM's `step`.

Calling convention (`decode`):

    decode(*inputs, past, *caches, *weights, *constants, *outputs) -> None

- inputs, caches, weights: as `step` (program.py); `past` an int64 scalar (not a shape);
- constants: the step's compile-time constants (rope frequencies), in `constants` order;
- outputs: caller-allocated tensors of the graph outputs' shapes, written by the call.

`decode_driver(mod, weights)` builds it from the module's Relax `step`; a step using
anything beyond the kernel calls, in-place kernel calls, reshapes and tuple items the
lowering emits returns the reason instead (the artifact then has no driver).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from mocompile.backends.tvm_common.call_plan import CallPlan as _Plan
from mocompile.backends.tvm_common.call_plan import PlanTensor as _Tensor
from mocompile.backends.tvm_common.call_plan import Unsupported as _Unsupported
from mocompile.backends.tvm_common.layout import WeightLayout
from mocompile.backends.tvm_cpu.tir_util import (HAND_SCHEDULED_ATTR, NAME_ATTR, SERIAL_ATTR, STACK_BYTES, call_kernel,
                                                 nbytes)

DRIVER = "decode"
DRIVER_POSITIONS = 1  # positions per sequence of the steps the runtime runs through the driver


@dataclass
class Driver:
    func: tirx.PrimFunc
    constants: list[np.ndarray]  # values of the constant parameters, in order


def _workspace(t: _Tensor) -> tirx.Buffer:
    """A buffer for `t` in the workspace pool (64-byte aligned, as the kernels assume). TVM puts
    allocations of a constant size under STACK_BYTES on the stack instead, aligned to fewer
    bytes (a vectorized kernel reading one of those faulted, depending on the stack address):
    those are padded to that size and `t` declared as a view of the padding."""
    if all(isinstance(d, (tirx.IntImm, int)) for d in t.shape) and nbytes(t.shape, t.dtype) < STACK_BYTES:
        padded = T.alloc_buffer((STACK_BYTES // nbytes([1], t.dtype),), t.dtype)
        return T.decl_buffer(tuple(t.shape), t.dtype, data=padded.data)
    return T.alloc_buffer(tuple(t.shape), t.dtype)


def _emit(plan: _Plan) -> tirx.PrimFunc:
    """The plan as a TIR function: parameters in the calling convention's order, then the
    allocations, views and calls in the step's order."""
    roots = [r.root or r for r in plan.results]
    if any(r.param for r in roots) or len(set(map(id, roots))) < len(roots):
        raise _Unsupported("an output of the step is an input, a cache, a weight or another output")
    buffers: dict[int, tirx.Buffer] = {}
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(DRIVER)
            T.func_attr({"global_symbol": DRIVER, HAND_SCHEDULED_ATTR: True, SERIAL_ATTR: True, NAME_ATTR: DRIVER})
            for name, p in plan.params:
                if isinstance(p, _Tensor):
                    buffers[id(p)] = T.arg(name, T.Buffer(tuple(p.shape), p.dtype, buffer_name=name))
                else:
                    T.arg(name, p)
            for t, _ in plan.constants:
                buffers[id(t)] = T.arg(t.name, T.Buffer(tuple(t.shape), t.dtype, buffer_name=t.name))
            outs = {}
            for i, r in enumerate(plan.results):
                out = T.arg(f"out{i}", T.Buffer(tuple(r.shape), r.dtype, buffer_name=f"out{i}"))
                outs[id(r.root or r)] = out
                if r.root is not None:  # the output is a view: its root lives in the output tensor
                    buffers[id(r)] = out
            for op in plan.ops:
                if op[0] == "alloc":
                    t = op[1]
                    if any(t is r for r in plan.results):  # an output itself: the caller's tensor
                        buffers[id(t)] = outs[id(t)]
                    elif id(t) in outs:  # reshaped into an output: a view of the caller's tensor
                        buffers[id(t)] = T.decl_buffer(tuple(t.shape), t.dtype, data=outs[id(t)].data)
                    else:
                        buffers[id(t)] = _workspace(t)
                elif op[0] == "view":
                    t = op[1]
                    if id(t) not in buffers:
                        buffers[id(t)] = T.decl_buffer(tuple(t.shape), t.dtype, data=buffers[id(t.root)].data)
                else:
                    _, kernel, args = op
                    call_kernel(kernel, [buffers[id(a)] if isinstance(a, _Tensor) else a for a in args])
    return ib.get()


def decode_driver(mod: tvm.IRModule, weights: list[WeightLayout]) -> Driver | str:
    """The decode driver of `mod`'s Relax `step` function, or why there is none."""
    if not any(gv.name_hint == "step" for gv in mod.functions):
        return "the module has no step function"
    try:
        plan = _Plan(mod["step"], weights)
        return Driver(_emit(plan), [array for _, array in plan.constants])
    except _Unsupported as e:
        return str(e)
