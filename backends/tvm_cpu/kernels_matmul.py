"""Matmul kernels over panel-packed weights (see layout.py): dense linear / GLU and the
grouped (per-expert) GEMMs of the sparse MoE block.

Schedule (the measured CPU recipe): each parallel task owns one weight panel of TJ output
columns; rows are processed TI at a time with a TI x W register tile (W = TJ, or 2*TJ for
a fused gate|up panel), the reduction unrolled by KU, the W lanes vectorized, and the
epilogue (bias, activation, GLU, per-row scale, residual) applied while the tile is written
back. Rows left over after the last full tile (all rows for a single token) go through a
GEMV path that splits the reduction over several accumulators to hide FMA latency.

Weights are float32 panels, or low-bit panels that stay low-bit in memory (`WeightFormat`;
for a target with AVX-512 VNNI the lowering sends the low-bit formats kernels_int8.py takes there):
int8 codes, or int4 codes two per byte, with float32 scales (float16 for groups) laid out as panels too. The
codes are converted inside the reduction loop; a per-output-channel scale multiplies the
accumulator once in the write-back, a group-wise (int4) scale multiplies each code as it is
loaded (its group changes along the reduction).

The same row-range routine serves dense layers (rows [0, m)) and experts (rows
[indptr[e], indptr[e+1]) of the expert-sorted token copies): an expert with no rows runs
zero iterations and never touches its weights, which is what makes the MoE block sparse.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

from tvm import tirx

from mocompile.backends.tvm_common import contracts as C
from mocompile.backends.tvm_common.panel_math import (column_scale, epilogue_value, weight_shapes,  # noqa: F401
                                                      weight_value)
from mocompile.backends.tvm_common.specs import F32_WEIGHTS, Epilogue, MatmulShape, WeightFormat  # noqa: F401
from mocompile.backends.tvm_cpu import tir_util as U
from mocompile.backends.tvm_cpu.target import vector_register_bytes

F32_BYTES = 4
# What an untuned register tile may fill on the host target: the budget of kernels built
# outside a lowering (the tuner measures on the host); a lowering passes its target's.
ACCUMULATOR_BYTES = vector_register_bytes() // 2


def residual_args(epi: Epilogue, rows, n: int) -> list:
    """The residual inputs of an epilogue, [rows, n] each, added in this order."""
    return U.residual_args(epi.residual, rows, n)


def _mac(fmt: WeightFormat, k: int, x, r, w, scale, panel, kk, j, acc):
    """acc + the contribution of panel row kk (one input, or two for int4) for output lane j,
    one input at a time in ascending order (the order every kernel path shares)."""
    if not fmt.paired:
        return acc + x[r, kk] * weight_value(fmt, k, w, scale, panel, kk, j)
    lo, hi = (weight_value(fmt, k, w, scale, panel, kk, j, high) for high in (False, True))
    return acc + x[r, 2 * kk] * lo + x[r, 2 * kk + 1] * hi


@dataclass(frozen=True)
class Tiling:
    """Tile sizes for a panel of `width` accumulator lanes and a reduction of length k."""

    rows: int  # TI: rows per register tile
    k_unroll: int  # KU: reduction unroll

    @staticmethod
    def for_panel(width: int, k: int, fmt: WeightFormat = F32_WEIGHTS, budget: int | None = None) -> "Tiling":
        """The untuned choice: the largest tile (<= 4 rows) and unroll (power of two <= 4)
        whose accumulators stay in registers, filling at most half the register file
        (`budget` bytes: the target's accumulator_bytes; default: the host target's).
        Measured at 64 rows on AVX2 (16 ymm), 2 x 32 lanes ran 1.5-1.6x faster than 4 x 32
        (fp32, int8) and 1 x 64 (a GLU panel) 1.7-2.2x faster than 2-3 x 64; on AVX-512 the
        budget is the stack limit, 4 x 32 (the fast-CPU recipe's tile). int4 panels always
        take the stack limit, whatever the budget: unpacking a panel row costs more than the
        spills, so unpacking it once for more rows wins (4 x 32 ran 1.2-1.5x faster than
        2 x 32 there)."""
        if fmt.bits == 4:
            budget = U.STACK_BYTES
        elif budget is None:
            budget = ACCUMULATOR_BYTES
        rows = max(1, min(4, min(budget, U.STACK_BYTES - 1) // (width * F32_BYTES)))
        split = 1
        while split * 2 <= 4 and split * 2 * width * F32_BYTES < U.STACK_BYTES and k % (split * 2) == 0:
            split *= 2
        return Tiling(rows, split)

    def check(self, width: int, depth: int) -> None:
        """Refuse tiles whose accumulators would spill, or an unroll not dividing the reduction."""
        if self.rows < 1 or self.rows * width * F32_BYTES >= U.STACK_BYTES:
            raise ValueError(f"a {self.rows}-row tile of {width} lanes does not fit in registers")
        if self.k_unroll < 1 or depth % self.k_unroll:
            raise ValueError(f"unroll {self.k_unroll} does not divide the reduction ({depth})")

    def tag(self) -> str:
        return f"_t{self.rows}u{self.k_unroll}"


@dataclass(frozen=True)
class MatmulConfig:
    """How a matmul kernel is tiled: the panel width TJ (which also fixes the weight layout),
    the register tile (None: Tiling.for_panel's untuned choice within `budget`, the target's
    accumulator bytes, None: the host target's) and, for a dense matmul, the MetaSchedule
    traces of its static-row kernels ((rows, trace JSON text), metaschedule.py)."""

    shape: MatmulShape
    tj: int
    tiling: Tiling | None = None
    tuned_rows: tuple[tuple[int, str], ...] = ()
    budget: int | None = None


def _emit_panel_rows(x, w, panel, row_begin, row_end, tj: int, width: int, k: int, write,
                     fmt: WeightFormat = F32_WEIGHTS, scale=None, tiling: Tiling | None = None,
                     budget: int | None = None) -> None:
    """Emit code for rows [row_begin, row_end) of x against weight panel `panel`.

    `write(row, acc, a)` emits the write-back of accumulator row `a` of `acc` (a buffer
    [*, width]) as output row `row`. `tiling`: tuned tile sizes (default Tiling.for_panel
    within the target's accumulator `budget`).
    """
    depth = fmt.depth(k)
    tiling = tiling or Tiling.for_panel(width, depth, fmt, budget)
    tiling.check(width, depth)
    ti, ku = tiling.rows, tiling.k_unroll
    n_rows = row_end - row_begin
    n_full = n_rows // ti

    def reduce_rows(acc, r0, n: int) -> None:
        """acc[a, :] = x[r0 + a, :] @ the panel, for a < n: the weight panel row w[panel, kk, :]
        is loaded once per n rows. One accumulator per lane, k ascending, for every n."""
        with U.unroll(0, n) as a:
            with U.vectorized(0, width) as j:
                U.store(acc, (a, j), U.f32(0))
        with U.serial(0, depth // ku) as k0:
            with U.unroll(0, ku) as k1:
                with U.unroll(0, n) as a:
                    with U.vectorized(0, width) as j:
                        kk = k0 * ku + k1
                        U.store(acc, (a, j), _mac(fmt, k, x, r0 + a, w, scale, panel, kk, j, acc[a, j]))

    # Full TI-row tiles.
    with U.serial(0, n_full) as i0:
        r0 = row_begin + i0 * ti
        acc = U.scratch((ti, width))
        reduce_rows(acc, r0, ti)
        with U.unroll(0, ti) as i1:
            write(r0 + i1, acc, i1)
    # Leftover rows (fewer than TI) in pairs, then one alone (a GEMV), through the same
    # reduction in the same order, so a row's result never depends on whether it landed in a
    # tile, a pair or alone, i.e. on how many other rows there are: the grouped expert GEMM
    # stays batch-invariant (bit for bit), which the isolation check's differential test relies
    # on. Pairs halve the weight loads (and low-bit unpacking) of an expert serving 2-3 rows,
    # as most do in a batch-8 decode step. Split accumulators would be faster only when the
    # weights sit in cache; a decode step streams them from memory.
    left_begin, left = row_begin + n_full * ti, n_rows - n_full * ti
    pairs = left // 2 if ti > 2 else 0  # TI <= 2 leaves at most one row
    if ti > 2:
        with U.serial(0, pairs) as i2:
            r = left_begin + 2 * i2
            acc = U.scratch((2, width))
            reduce_rows(acc, r, 2)
            with U.unroll(0, 2) as i1:
                write(r + i1, acc, i1)
    if ti == 1:
        return  # one-row tiles leave no rows over
    with U.serial(0, left - 2 * pairs) as i:
        r = left_begin + 2 * pairs + i
        acc = U.scratch((1, width))
        reduce_rows(acc, r, 1)
        write(r, acc, 0)


def _writer(y, n: int, tj: int, jb, epi: Epilogue, bias=None, scale=None, residuals=(), column_scale=None):
    """The write-back of one accumulator row into output columns [jb*TJ, jb*TJ + TJ).
    `column_scale(lane)`: the per-output-channel weight scale of an accumulator lane."""

    def write(row, acc, a) -> None:
        def lane(half, jt):
            i = tj + jt if half else jt
            return acc[a, i] * column_scale(i) if column_scale is not None else acc[a, i]

        def emit(jt):
            col = jb * tj + jt
            U.store(y, (row, col), epilogue_value(epi, lane, jt, row, col, bias, scale, residuals))

        with U.vectorized(0, tj) as jt:
            if n % tj:  # last panel is zero-padded: store real columns only
                with U.when(jb * tj + jt < n):
                    emit(jt)
            else:
                emit(jt)

    return write


@functools.cache
def dense_matmul(k: int, n: int, tj: int, epi: Epilogue, fmt: WeightFormat = F32_WEIGHTS,
                 tiling: Tiling | None = None, row_kernels: tuple[tuple[int, str], ...] = (),
                 budget: int | None = None) -> tirx.PrimFunc:
    """y[m, n] = epilogue(x[m, k] @ W) with W packed as panels [NB, k, TJ or 2*TJ]
    (low-bit: codes [NB, depth, width] and scales [NB, groups, width]). `budget`: the
    target's accumulator bytes, which shape the untuned tile (None: the host target's).

    `row_kernels`: (rows, name) of MetaSchedule-tuned kernels of the same computation for a
    static number of rows (metaschedule.py), called by name: the one for 1 row when m == 1,
    the one for R > 1 rows on each full block of R rows; the rows left go through the
    hand-written tiles. Every path sums a row's products in the same order, so a row's result
    does not depend on which path it took."""
    nb = -(-n // tj)
    width = 2 * tj if epi.glu else tj
    tuned = dict(row_kernels)
    tag = "".join(f"_ms{rows}" for rows in sorted(tuned))
    with U.kernel(f"dense_{k}x{n}_tj{tj}_{epi.tag()}{fmt.tag()}{tiling.tag() if tiling else ''}{tag}") as kern:
        m, x, w, w_scale, bias, residuals, y = C.dense_matmul(k, n, tj, epi, fmt)
        if epi.row_scale:
            raise ValueError("dense_matmul has no per-row scale")

        def rows_from(row_begin) -> None:
            def panel(jb):
                write = _writer(y, n, tj, jb, epi, bias=bias, residuals=residuals,
                                column_scale=column_scale(fmt, w_scale, jb))
                _emit_panel_rows(x, w, jb, row_begin, m, tj, width, k, write, fmt, w_scale, tiling, budget)

            weight_bytes = nb * k * width * fmt.bits // 8
            U.parallel_for(nb, weight_bytes + F32_BYTES * m * (k + n) + m * k * nb * width, panel)

        def call_tuned(rows: int, row0) -> None:
            per_row = [x, *residuals, y]
            views = {id(b): U.row_view(b, row0, rows) for b in per_row}
            args = [x, w, *([w_scale] if w_scale is not None else []), *([bias] if bias is not None else []),
                    *residuals, y]
            U.call_kernel(tuned[rows], [views.get(id(b), b) for b in args])

        block = max((r for r in tuned if r > 1), default=0)

        def blocks_then_rest() -> None:
            if not block:
                rows_from(0)
                return
            with U.serial(0, m // block) as b:
                call_tuned(block, b * block)
            rows_from(m // block * block)

        if 1 in tuned:
            with U.if_else(m == 1) as (then, orelse):
                with then():
                    call_tuned(1, 0)
                with orelse():
                    blocks_then_rest()
        else:
            blocks_then_rest()
    return kern.func


@functools.cache
def grouped_matmul(experts: int, k: int, n: int, tj: int, epi: Epilogue, fmt: WeightFormat = F32_WEIGHTS,
                   tiling: Tiling | None = None, budget: int | None = None) -> tirx.PrimFunc:
    """Per-expert GEMM over expert-sorted rows: rows [indptr[e], indptr[e+1]) of x use
    expert e's panels (weights [experts*NB, k, width]). Experts without rows read nothing.
    `budget`: as dense_matmul's.

    Tasks are ordered panel-major (task = jb * experts + e) so a static split of the
    parallel loop gives every thread a share of every expert's columns, whatever the routing.
    """
    nb = -(-n // tj)
    width = 2 * tj if epi.glu else tj
    with U.kernel(f"grouped_e{experts}_{k}x{n}_tj{tj}_{epi.tag()}{fmt.tag()}{tiling.tag() if tiling else ''}") as kern:
        rows, x, indptr, w, w_scale, scale, y = C.grouped_matmul(experts, k, n, tj, epi, fmt)
        def task(t):
            jb, e = t // experts, t % experts
            p = e * nb + jb
            write = _writer(y, n, tj, jb, epi, scale=scale, column_scale=column_scale(fmt, w_scale, p))
            _emit_panel_rows(x, w, p, U.i64(indptr[e]), U.i64(indptr[e + 1]), tj, width, k, write, fmt, w_scale,
                             tiling, budget)

        # weights read: at most min(rows, experts) experts' panels
        weight_bytes = tirx.min(rows, experts) * (nb * k * width * fmt.bits // 8)
        U.parallel_for(nb * experts, weight_bytes + F32_BYTES * rows * (k + n) + rows * k * nb * width, task)
    return kern.func
