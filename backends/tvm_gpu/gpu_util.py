"""Helpers for hand-writing GPU kernels with TVMScript's IR builder.

A GPU kernel here is one PrimFunc whose body is one launch: `with grid(n) as b:` binds a loop
to blockIdx.x (grid2 adds blockIdx.y), `with block(t) as i:` binds one to threadIdx.x; every
loop outside them would run on the host, which the schedule check (schedule.py) refuses.
Inside a block, `shared(...)` is the block's shared (OpenCL: __local) memory, `local(...)` a
thread's registers, `barrier()` synchronises the block's threads, and `block_reduce` folds one
value per thread into shared memory as a halving tree (log2(threads) steps, deterministic).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from mocompile.backends.tvm_common.kernel_math import f32  # noqa: F401  (kernels write G.f32)
from mocompile.backends.tvm_common.kernels import HAND_SCHEDULED_ATTR, NAME_ATTR
from mocompile.backends.tvm_common.tir_build import (arg, dim, i64, if_else, residual_args, scalar_arg,  # noqa: F401
                                                     store, when)

serial, unroll = T.serial, T.unroll
WARP = 32  # threads of one warp (CUDA) / the width a block's thread count is a multiple of
# float16 weights widen by integer ops (panel_math.widen), not through a half type: OpenCL's
# `half` needs cl_khr_fp16, which a device may lack (PoCL on a CPU does), and TVM's CUDA half
# prelude defines helpers nothing calls, which nvcc's warnings-as-errors rejects. One exact
# integer path serves both targets, so PoCL runs the arithmetic the CUDA kernels run.
HALF_TYPE = False


class Kernel:
    """Result holder for `kernel()`: `.func` is the PrimFunc once the block exits."""

    func: tirx.PrimFunc


@contextmanager
def kernel(name: str) -> Iterator[Kernel]:
    """Build one private PrimFunc named `name`; declare args with `arg()` inside the block."""
    out = Kernel()
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name(name)
            T.func_attr({"tir.noalias": True, HAND_SCHEDULED_ATTR: True, NAME_ATTR: name})
            yield out
    out.func = ib.get()


def grid(extent) -> Iterator[tirx.Var]:
    """The blocks of the launch (blockIdx.x)."""
    return T.thread_binding(0, extent, thread="blockIdx.x")


def grid_y(extent) -> Iterator[tirx.Var]:
    """A second grid axis (blockIdx.y)."""
    return T.thread_binding(0, extent, thread="blockIdx.y")


def block(threads: int) -> Iterator[tirx.Var]:
    """The threads of each block (threadIdx.x); a static count."""
    return T.thread_binding(0, threads, thread="threadIdx.x")


def block_y(threads: int) -> Iterator[tirx.Var]:
    return T.thread_binding(0, threads, thread="threadIdx.y")


def shared(shape: Sequence[int], dtype: str = "float32") -> tirx.Buffer:
    """Memory of the block, visible to all its threads (allocate inside `grid`)."""
    return T.alloc_buffer(tuple(shape), dtype, scope="shared")


def local(shape: Sequence[int], dtype: str = "float32") -> tirx.Buffer:
    """A thread's own small array (registers; allocate inside `block`)."""
    return T.alloc_buffer(tuple(shape), dtype, scope="local")


def barrier() -> None:
    """Every thread of the block reaches this point before any goes on (and sees the shared
    memory writes made before it)."""
    T.evaluate(T.tvm_storage_sync("shared"))


def threads_for(n: int, most: int = 256) -> int:
    """A block's thread count for n items per block: a multiple of WARP, at most `most`, at
    least WARP (a launch never runs a single thread)."""
    t = WARP
    while t < most and t < n:
        t *= 2
    return t


def strided(tid, n, threads: int, body: Callable[[tirx.PrimExpr], None]) -> None:
    """body(i) for i = tid, tid + threads, ... < n (each thread its share of n items)."""
    with serial(0, (n + threads - 1) // threads) as c:
        i = c * threads + tid
        with when(i < n):
            body(i)


def block_reduce(buf: tirx.Buffer, tid, threads: int, combine) -> tirx.PrimExpr:
    """Fold buf[0..threads) (one value per thread, written before the call) with `combine`
    into buf[0]: a halving tree with a barrier per level; returns buf[0], valid for every
    thread after the final barrier."""
    barrier()
    width = threads
    while width > 1:
        half = width // 2
        with when(tid < half):
            store(buf, (tid,), combine(buf[tid], buf[tid + half]))
        barrier()
        width = half
    return buf[0]
