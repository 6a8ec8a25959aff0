"""Matmul kernels over panel-packed weights (see layout.py): dense linear / GLU and the
grouped (per-expert) GEMMs of the sparse MoE block.

Schedule (the measured CPU recipe): each parallel task owns one weight panel of TJ output
columns; rows are processed TI at a time with a TI x W register tile (W = TJ, or 2*TJ for
a fused gate|up panel), the reduction unrolled by KU, the W lanes vectorized, and the
epilogue (bias, activation, GLU, per-row scale, residual) applied while the tile is written
back. Rows left over after the last full tile (all rows for a single token) go through a
GEMV path that splits the reduction over several accumulators to hide FMA latency.

The same row-range routine serves dense layers (rows [0, m)) and experts (rows
[indptr[e], indptr[e+1]) of the expert-sorted token copies): an expert with no rows runs
zero iterations and never touches its weights, which is what makes the MoE block sparse.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

from tvm import tirx

from mocompile.backends.tvm_cpu import tir_util as U
from mocompile.backends.tvm_cpu.kernels_math import activation

F32_BYTES = 4


@dataclass(frozen=True)
class Epilogue:
    """What the write-back does with an accumulated tile (applied in this order)."""

    glu: bool = False  # accumulator has 2*TJ lanes: out = act(gate lanes) * up lanes
    activation: str | None = None  # "silu" | "gelu" | None
    bias: bool = False  # + b[col]           (extra input bias[N])
    row_scale: bool = False  # * s[row]      (extra input scale[rows])
    residual: bool = False  # + r[row, col]  (extra input residual[rows, N])

    def tag(self) -> str:
        parts = ["glu" if self.glu else ""] + [self.activation or ""]
        parts += [n for n in ("bias", "row_scale", "residual") if getattr(self, n)]
        return "_".join(p for p in parts if p) or "plain"


@dataclass(frozen=True)
class Tiling:
    """Tile sizes for a panel of `width` accumulator lanes and a reduction of length k."""

    rows: int  # TI: rows per register tile
    k_unroll: int  # KU: reduction unroll (tile path) / accumulator split (GEMV path)

    @staticmethod
    def for_panel(width: int, k: int) -> "Tiling":
        # Largest tile (<= 4 rows) and GEMV split (power of two <= 4) that stay in registers.
        rows = max(1, min(4, (U.STACK_BYTES - 1) // (width * F32_BYTES)))
        split = 1
        while split * 2 <= 4 and split * 2 * width * F32_BYTES < U.STACK_BYTES and k % (split * 2) == 0:
            split *= 2
        return Tiling(rows, split)


def _emit_panel_rows(x, w, panel, row_begin, row_end, tj: int, width: int, k: int, write) -> None:
    """Emit code for rows [row_begin, row_end) of x against weight panel `panel`.

    `write(row, acc, a)` emits the write-back of accumulator row `a` of `acc` (a buffer
    [*, width]) as output row `row`.
    """
    tiling = Tiling.for_panel(width, k)
    ti, ku = tiling.rows, tiling.k_unroll
    n_rows = row_end - row_begin
    n_full = n_rows // ti
    # Full TI-row tiles: the weight panel row w[panel, kk, :] is loaded once per TI rows.
    with U.serial(0, n_full) as i0:
        r0 = row_begin + i0 * ti
        acc = U.scratch((ti, width))
        with U.unroll(0, ti) as i1:
            with U.vectorized(0, width) as j:
                U.store(acc, (i1, j), U.f32(0))
        with U.serial(0, k // ku) as k0:
            with U.unroll(0, ku) as k1:
                with U.unroll(0, ti) as i1:
                    with U.vectorized(0, width) as j:
                        kk = k0 * ku + k1
                        U.store(acc, (i1, j), acc[i1, j] + x[r0 + i1, kk] * w[panel, kk, j])
        with U.unroll(0, ti) as i1:
            write(r0 + i1, acc, i1)
    # Leftover rows one at a time (a GEMV). They sum over k in exactly the order the full
    # tiles do (one accumulator, k ascending), so a row's result never depends on whether it
    # landed in a tile or in the leftover, i.e. on how many other rows there are: the grouped
    # expert GEMM stays batch-invariant (bit for bit), which the isolation check's
    # differential test relies on. Split accumulators would be faster only when the weights
    # sit in cache; a decode step streams them from memory.
    with U.serial(0, n_rows - n_full * ti) as i:
        r = row_begin + n_full * ti + i
        acc = U.scratch((1, width))
        with U.vectorized(0, width) as j:
            U.store(acc, (0, j), U.f32(0))
        with U.serial(0, k // ku) as k0:
            with U.unroll(0, ku) as k1:
                with U.vectorized(0, width) as j:
                    kk = k0 * ku + k1
                    U.store(acc, (0, j), acc[0, j] + x[r, kk] * w[panel, kk, j])
        write(r, acc, 0)


def _writer(y, n: int, tj: int, jb, epi: Epilogue, bias=None, scale=None, residual=None):
    """The write-back of one accumulator row into output columns [jb*TJ, jb*TJ + TJ)."""

    def write(row, acc, a) -> None:
        def emit(jt):
            col = jb * tj + jt
            v = acc[a, jt]
            if epi.glu:
                v = activation(epi.activation, v) * acc[a, tj + jt]
            elif epi.activation:
                v = activation(epi.activation, v)
            if epi.bias:
                v = v + bias[col]
            if epi.row_scale:
                v = v * scale[row]
            if epi.residual:
                v = v + residual[row, col]
            U.store(y, (row, col), v)

        with U.vectorized(0, tj) as jt:
            if n % tj:  # last panel is zero-padded: store real columns only
                with U.when(jb * tj + jt < n):
                    emit(jt)
            else:
                emit(jt)

    return write


@functools.cache
def dense_matmul(k: int, n: int, tj: int, epi: Epilogue) -> tirx.PrimFunc:
    """y[m, n] = epilogue(x[m, k] @ W) with W packed as panels [NB, k, TJ or 2*TJ]."""
    nb = -(-n // tj)
    width = 2 * tj if epi.glu else tj
    m = U.dim("m")
    with U.kernel(f"dense_{k}x{n}_tj{tj}_{epi.tag()}") as kern:
        x = U.arg("x", (m, k))
        w = U.arg("w", (nb, k, width))
        bias = U.arg("bias", (n,)) if epi.bias else None
        residual = U.arg("residual", (m, n)) if epi.residual else None
        y = U.arg("y", (m, n))
        if epi.row_scale:
            raise ValueError("dense_matmul has no per-row scale")
        def panel(jb):
            write = _writer(y, n, tj, jb, epi, bias=bias, residual=residual)
            _emit_panel_rows(x, w, jb, 0, m, tj, width, k, write)

        U.parallel_for(nb, F32_BYTES * (nb * k * width + m * (k + n)) + m * k * nb * width, panel)
    return kern.func


@functools.cache
def grouped_matmul(experts: int, k: int, n: int, tj: int, epi: Epilogue) -> tirx.PrimFunc:
    """Per-expert GEMM over expert-sorted rows: rows [indptr[e], indptr[e+1]) of x use
    expert e's panels (weights [experts*NB, k, width]). Experts without rows read nothing.

    Tasks are ordered panel-major (task = jb * experts + e) so a static split of the
    parallel loop gives every thread a share of every expert's columns, whatever the routing.
    """
    nb = -(-n // tj)
    width = 2 * tj if epi.glu else tj
    rows = U.dim("rows")
    with U.kernel(f"grouped_e{experts}_{k}x{n}_tj{tj}_{epi.tag()}") as kern:
        x = U.arg("x", (rows, k))
        indptr = U.arg("indptr", (experts + 1,), "int32")
        w = U.arg("w", (experts * nb, k, width))
        scale = U.arg("scale", (rows,)) if epi.row_scale else None
        y = U.arg("y", (rows, n))
        if epi.bias or epi.residual:
            raise ValueError("grouped_matmul supports glu/activation/row_scale epilogues only")
        def task(t):
            jb, e = t // experts, t % experts
            write = _writer(y, n, tj, jb, epi, scale=scale)
            _emit_panel_rows(x, w, e * nb + jb, U.i64(indptr[e]), U.i64(indptr[e + 1]), tj, width, k, write)

        # weights read: at most min(rows, experts) experts' panels
        weight_bytes = F32_BYTES * tirx.min(rows, experts) * nb * k * width
        U.parallel_for(nb * experts, weight_bytes + F32_BYTES * rows * (k + n) + rows * k * nb * width, task)
    return kern.func
