"""The CPU kernels of contextual sparsity (tvm_common/contextual.py has the scheme and the
lowering), and the measurement that decides, per matmul shape and kept count, whether the
gathered kernel beats the dense one on this machine.

`select_channels`: per token (row), the scores |x_i| * norms_i as float32 bit patterns
(non-negative floats order as their int32 bits), the m-th largest found by a 31-step binary
search over the bits (each step counts the scores at or above a candidate, vectorized), then
one pass in channel order takes every score above it and the first ties at it: exactly the
channels a stable descending sort takes first (mocompile.ir.contextual.select_channels).

`gathered_matmul`: a task per (token, block of output columns) accumulates
xs[j] * panel[idx[j], :] over the token's m kept channels, each a contiguous row of the
block's transposed panel read in ascending channel order, in registers, then applies the
epilogue (GLU, activation, bias, row scale, residuals) as the dense kernels do.
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import tirx
from tvm.script.ir_builder import tirx as T

from mocompile.backends.tvm_common import contextual as C
from mocompile.backends.tvm_common.kernel_math import activation
from mocompile.backends.tvm_common.specs import Epilogue, MatmulShape
from mocompile.backends.tvm_cpu import tir_util as U

INT_BITS = 31  # bits of a non-negative float32's pattern below the sign


def expert_of(row, indptr, experts: int) -> tirx.PrimExpr:
    """Emit: the expert whose rows (indptr[e]..indptr[e+1]) hold `row`, clamped to 0..E-1."""
    e = U.scratch((1,), "int32")
    U.store(e, (0,), tirx.IntImm("int32", 0))
    with U.serial(1, experts) as j:
        with U.when(U.i64(indptr[j]) <= row):
            U.store(e, (0,), tirx.Cast("int32", j))
    return T.bind(U.i64(e[0]))  # a variable: the vector loops reading by it stay contiguous loads


@functools.cache
def select_channels(k: int, m: int, mask: bool, experts: int = 0) -> tirx.PrimFunc:
    """x[rows, k], norms[k] (or norms[E, k], indptr[E+1]: each row scored by its expert's
    norms) -> idx[rows, m] int32 (ascending), xs[rows, m]; or with `mask` xm[rows, k] (x with
    the other channels zeroed)."""
    lanes = U.lanes_for(k)
    with U.kernel(f"select_channels_k{k}_m{m}{f'_e{experts}' if experts else ''}{'_mask' if mask else ''}") as kern:
        rows, x, norms, indptr, outs = C.select_channels_args(k, m, mask, experts)

        def row(i):
            e = expert_of(i, indptr, experts) if experts else None

            def bits(ch):  # recomputed where read: no per-row buffer (a heap workspace for wide rows)
                return tirx.reinterpret("int32", tirx.abs(x[i, ch]) * (norms[e, ch] if experts else norms[ch]))

            lo, count, found = U.scratch((1,), "int32"), U.scratch((1,)), U.scratch((1,), "int32")
            U.store(lo, (0,), tirx.IntImm("int32", 0))
            U.store(found, (0,), tirx.IntImm("int32", 0))
            with U.serial(0, INT_BITS) as b:
                with U.when(found[0] == 0):  # a candidate with exactly m at or above it ends the search
                    cand = T.bind(lo[0] | tirx.shift_left(tirx.IntImm("int32", 1), tirx.Cast("int32", INT_BITS - 1 - b)))
                    U.emit_reduce(count, (0,), lambda ch: tirx.Select(bits(ch) >= cand, U.f32(1), U.f32(0)), k,
                                  lambda a, c: a + c, lanes)
                    with U.when(count[0] >= U.f32(m)):
                        U.store(lo, (0,), cand)
                        with U.when(count[0] == U.f32(m)):
                            U.store(found, (0,), tirx.IntImm("int32", 1))
            # lo: the m-th largest score, or a bound with exactly m scores at or above it; take
            # the scores above it, then the first ties at it (all of them in the second case)
            U.emit_reduce(count, (0,), lambda ch: tirx.Select(bits(ch) > lo[0], U.f32(1), U.f32(0)), k,
                          lambda a, c: a + c, lanes)
            taken, ties = U.scratch((2,), "int32"), U.scratch((1,), "int32")
            U.store(ties, (0,), tirx.IntImm("int32", m) - tirx.Cast("int32", count[0]))
            U.store(taken, (0,), tirx.IntImm("int32", 0))
            if mask:
                with U.serial(0, k // lanes) as c:
                    with U.vectorized(0, lanes) as l:
                        U.store(outs[0], (i, c * lanes + l), U.f32(0))
            with U.serial(0, k) as ch:
                tie = tirx.all(bits(ch) == lo[0], ties[0] > 0)
                with U.when(tirx.any(bits(ch) > lo[0], tie)):
                    if mask:
                        U.store(outs[0], (i, ch), x[i, ch])
                    else:
                        U.store(outs[0], (i, U.i64(taken[0])), tirx.Cast("int32", ch))
                        U.store(outs[1], (i, U.i64(taken[0])), x[i, ch])
                    U.store(taken, (0,), taken[0] + 1)
                    with U.when(bits(ch) == lo[0]):
                        U.store(ties, (0,), ties[0] - 1)

        U.parallel_for(rows, 16 * rows * k, row)  # compute on a row in cache: parallel from ~64K row-channels
    return kern.func


@functools.cache
def gathered_matmul(k: int, n: int, m: int, epi: Epilogue, experts: int = 0) -> tirx.PrimFunc:
    """y[rows, n] = epilogue(sum_j xs[:, j] * wt[idx[:, j], :]) (see the module docstring);
    per expert, each row reads its expert's transposed weight (rows sorted by expert, indptr)."""
    block = C.column_block(n, epi.glu)
    width = 2 * block if epi.glu else block
    blocks = n // block
    with U.kernel(f"gathered_matmul_k{k}_n{n}_m{m}{f'_e{experts}' if experts else ''}_{epi.tag()}") as kern:
        rows, xs, idx, indptr, wt, bias, scale, residuals, y = C.gathered_matmul_args(k, n, m, epi, experts)

        def task(t):
            i, b = t // blocks, t % blocks
            panel = T.bind(expert_of(i, indptr, experts) * blocks + b) if experts else b
            acc = U.scratch((width,))
            with U.vectorized(0, width) as l:
                U.store(acc, (l,), U.f32(0))
            with U.serial(0, m) as j:
                ch = tirx.min(tirx.max(U.i64(idx[i, j]), 0), k - 1)  # a corrupt index reads a wrong row, in bounds
                a = xs[i, j]
                with U.vectorized(0, width) as l:
                    U.store(acc, (l,), acc[l] + a * wt[panel, ch, l])
            with U.vectorized(0, block) as l:
                col = b * block + l
                v = activation(epi.activation, acc[l]) * acc[block + l] if epi.glu else activation(epi.activation, acc[l])
                if bias is not None:
                    v = v + bias[col]
                if scale is not None:
                    v = v * scale[i]
                for r in residuals:
                    v = v + r[i, col]
                U.store(y, (i, col), v)

        U.parallel_for(rows * blocks, 4 * rows * m * n * (2 if epi.glu else 1), task)
    return kern.func


ROUNDS = 3  # alternating timings of the two ways; each way's best round counts (a busy host only adds time)


def _timer(funcs: list[tirx.PrimFunc], target: tvm.target.Target, cold: bool):
    """A time_evaluator of funcs[0] (the rest: kernels it calls); `cold`: 20 calls each after
    the caches are flushed, else 3 rounds of 20 warm calls (tuning.kernel_timer)."""
    from mocompile.backends.tvm_cpu.tuning import kernel_timer

    return kernel_timer(funcs, target, cold, 20 if cold else 3)


@functools.cache
def measure(k: int, n: int, m: int, glu: bool, target_text: str, cold: bool) -> dict:
    """One token's matmul both ways on this machine: the gathered kernel (after its
    selection) against the dense kernel (after the masking selection), in microseconds, the
    two timed in alternating rounds, the fastest call of each kernel counted. For routed
    experts the same shape stands for the per-expert kernels (a decode row reads one
    expert's weight either way)."""
    from mocompile.backends.tvm_cpu.metaschedule import dense_kernels
    from mocompile.backends.tvm_cpu.tuning import default_config

    target = tvm.target.Target(target_text)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, k), dtype=np.float32)
    norms = rng.random(k, dtype=np.float32)
    epi = Epilogue(glu=glu, activation="silu" if glu else None)
    idx = np.sort(rng.choice(k, m, replace=False)).astype(np.int32)[None]
    block = C.column_block(n, glu)
    wt = rng.standard_normal((n // block, k, 2 * block if glu else block), dtype=np.float32)
    config = default_config(MatmulShape(0, k, n, glu))
    panels = rng.standard_normal((-(-n // config.tj), k, 2 * config.tj if glu else config.tj), dtype=np.float32)
    y = np.zeros((1, n), np.float32)
    ways = {  # way -> its kernels: (timer, arguments)
        "gathered": [(_timer([select_channels(k, m, False)], target, False), [x, norms, idx, x[:, :m].copy()]),
                     (_timer([gathered_matmul(k, n, m, epi)], target, cold), [x[:, :m].copy(), idx, wt, y])],
        "dense": [(_timer([select_channels(k, m, True)], target, False), [x, norms, x.copy()]),
                  (_timer(dense_kernels(config, epi), target, cold), [x, panels, y])],
    }
    ways = {w: [(timer, [tvm.runtime.tensor(a) for a in args]) for timer, args in calls] for w, calls in ways.items()}
    best = {w: float("inf") for w in ways}
    for _ in range(ROUNDS):
        for way, calls in ways.items():
            best[way] = min(best[way], sum(min(timer(*args).results) for timer, args in calls))
    return {"gathered_us": round(best["gathered"] * 1e6, 1), "dense_us": round(best["dense"] * 1e6, 1)}
