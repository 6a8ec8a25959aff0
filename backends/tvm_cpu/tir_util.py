"""Helpers for hand-writing TIR kernels with TVMScript's IR builder.

The kernels of this backend are written as explicit loop nests ("scheduled by
construction": every loop is declared parallel, vectorized, unrolled or serial where it is
written) rather than as tensor expressions scheduled afterwards, because their loop bounds
are often data-dependent (the rows an expert serves), which schedule primitives do not
handle. The IR builder (instead of the @T.prim_func decorator) lets plain Python decide the
parameter list, the epilogue and the unrolling of a kernel, so one function emits every
variant. Inside `with kernel(...)`, Python code *emits* TIR: `with serial(0, n) as i:`
opens a loop, `store(buf, idx, value)` writes, `buf[idx]` reads.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from mocompile.backends.tvm_common.kernel_math import f32  # noqa: F401  (kernels write U.f32)
# parameters, stores and conditionals (kernels write U.arg, U.store, U.when, ...)
from mocompile.backends.tvm_common.tir_build import (arg, dim, i64, if_else, residual_args, scalar_arg,  # noqa: F401
                                                     store, when)
# every hand-written kernel is HAND_SCHEDULED_ATTR (its loops are scheduled where written) and named by NAME_ATTR
from mocompile.backends.tvm_common.kernels import HAND_SCHEDULED_ATTR, NAME_ATTR

# Loop kinds (context managers yielding the loop variable): `with parallel(0, n) as i:`.
serial, parallel, vectorized, unroll = T.serial, T.parallel, T.vectorized, T.unroll


# Function attribute marking a kernel that is deliberately single-threaded (tiny,
# inherently sequential bookkeeping). Every other kernel must contain a parallel loop;
# `schedule.check_scheduled` enforces it.
SERIAL_ATTR = "mocompile.serial"

# LLVM keeps an accumulator in registers only if TVM allocates it on the stack, which it
# does for "global"-scope allocations strictly below this many bytes (larger ones go to a
# heap workspace that every iteration then reads and writes).
STACK_BYTES = 1024

# Below this much work, waking the thread pool's workers (they sleep between kernels; the
# wake-up and the caller's wait for them cost 10-20 us on a 2-vCPU VM) costs more than it
# saves: the loop runs on the calling thread. Work is counted in bytes moved, plus FLOPs / 2
# for compute-bound kernels (one core streams ~25 GB/s from memory, more from L3, and computes
# ~50 GFLOP/s), so 1 MiB is ~40 us of single-core time from memory and ~20 us from cache.
# Measured: a decode step of mixtral_tiny, whose two routed experts' GLU panels (~0.5 MB, in
# cache) went parallel at the former 512 KiB, is 15-40% faster; larger models' decode kernels
# (MBs per matmul) stay parallel.
PARALLEL_MIN_BYTES = 1024 * 1024


class Kernel:
    """Result holder for `kernel()`: `.func` is the PrimFunc once the block exits."""

    func: tirx.PrimFunc


@contextmanager
def kernel(name: str, serial: bool = False) -> Iterator[Kernel]:
    """Build one private PrimFunc named `name`; declare args with `arg()` inside the block."""
    out = Kernel()
    attrs = {"tir.noalias": True, HAND_SCHEDULED_ATTR: True, NAME_ATTR: name}
    if serial:
        attrs[SERIAL_ATTR] = True
    with IRBuilder() as ib:
        with T.prim_func(private=True):
            T.func_name(name)
            T.func_attr(attrs)
            yield out
    out.func = ib.get()


def nbytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes of a buffer of static `shape`."""
    n = 1
    for d in shape:
        n *= int(d)
    return n * tvm.DataType(dtype).bits // 8


def scratch(shape: Sequence[int], dtype: str = "float32") -> tirx.Buffer:
    """A small per-iteration buffer LLVM can keep in registers (see STACK_BYTES)."""
    size = nbytes(shape, dtype)
    if size >= STACK_BYTES:
        raise ValueError(f"scratch buffer {tuple(shape)} {dtype} is {size} bytes; keep it under {STACK_BYTES}")
    return T.alloc_buffer(tuple(shape), dtype, scope="global")


def local(shape: Sequence[int], dtype: str = "float32") -> tirx.Buffer:
    """A per-iteration buffer: on the stack when small enough, else a heap workspace."""
    return T.alloc_buffer(tuple(shape), dtype, scope="global")


def row_view(buf: tirx.Buffer, row0, rows: int) -> tirx.Buffer:
    """Rows [row0, row0 + rows) of a row-major buffer as a buffer of its own (a pointer into
    the same data: a kernel called with it sees an ordinary tensor, byte offset 0)."""
    ptr = T.bind(T.address_of(buf[(row0,) + (0,) * (len(buf.shape) - 1)]),
                 tvm.ir.PointerType(tvm.ir.PrimType(buf.dtype)))
    return T.decl_buffer((rows, *buf.shape[1:]), buf.dtype, data=ptr)


def reshaped(buf: tirx.Buffer, shape: Sequence) -> tirx.Buffer:
    """The data of `buf` seen with another shape of the same size (e.g. a storage layout
    behind the shape a calling convention fixes)."""
    return T.decl_buffer(tuple(shape), buf.dtype, data=buf.data)


def call_kernel(name: str, args: Sequence) -> None:
    """A direct call of kernel `name` of the same library (its packed entry, no lookup) with
    buffers and scalars."""
    T.evaluate(T.call_cpacked(name, *args))


# ---- expressions ---------------------------------------------------------------------------
def lanes_for(n: int, widest: int = 16) -> int:
    """The widest vector width (<= widest, power of two) dividing a static extent n."""
    lanes = widest
    while lanes > 1 and n % lanes:
        lanes //= 2
    return lanes


# ---- loop patterns -----------------------------------------------------------------------
def parallel_for(extent, work_bytes, body: Callable[[tirx.Var], None]) -> None:
    """Emit `for i in range(extent): body(i)` as a parallel loop when the kernel's work is at
    least PARALLEL_MIN_BYTES (`work_bytes`, an expression of its shapes), else as a serial
    loop: decode-sized calls run without a thread-pool round trip."""
    with if_else(work_bytes >= PARALLEL_MIN_BYTES) as (then, orelse):
        with then():
            with parallel(0, extent) as i:
                body(i)
        with orelse():
            with serial(0, extent) as i:
                body(i)


def emit_reduce(dst: tirx.Buffer, dst_index: Sequence, load, n: int, combine, lanes: int | None = None) -> None:
    """dst[dst_index] = combine-reduction of load(0..n-1) (static n): `lanes` partial results
    combined with vector ops, then folded (fold_lanes)."""
    lanes = lanes or lanes_for(n)
    part = scratch((lanes,))
    with vectorized(0, lanes) as l:
        store(part, (l,), load(l))
    with serial(1, n // lanes) as c:
        with vectorized(0, lanes) as l:
            store(part, (l,), combine(part[l], load(c * lanes + l)))
    store(dst, dst_index, fold_lanes(part, (), lanes, combine))


def fold_lanes(buf: tirx.Buffer, index: tuple, lanes: int, combine) -> tirx.PrimExpr:
    """The combine-fold of buf[index + (0..lanes-1)] (a scratch row, overwritten), as a halving
    tree: log2(lanes) dependent vector steps where a serial fold takes lanes - 1 scalar ones."""
    width = lanes
    while width > 1:
        half = width // 2
        with vectorized(0, half) as l:
            store(buf, index + (l,), combine(buf[index + (l,)], buf[index + (l + half,)]))
        width = half
    return buf[index + (0,)]