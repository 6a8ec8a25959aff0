"""GPU matmuls over panel-packed weights (tvm_common/layout.py): dense (linear, GLU, LM head)
and grouped per expert (the MoE GEMMs), float32 or low-bit weights dequantised in registers.

Schedule: a block owns one weight panel of TJ output columns (blockIdx.x) and a tile of R rows;
thread (j, r) accumulates output column j of row r over the whole reduction, so the TJ threads
of a row read one contiguous panel row per input (coalesced: the panel layout stores a panel's
TJ columns of each input side by side) and share the input x[r, kk] (one broadcast load).
Low-bit codes are converted (and group-scaled) as they are loaded, in registers; a
per-channel scale multiplies the accumulator once in the write-back (panel_math.py).

The grouped GEMM runs a variable number of rows per expert without padding (as MLC-LLM's
moe_matmul does): block (panel, expert) walks its expert's rows indptr[e]..indptr[e+1] in tiles
of R, so an expert no token chose launches a block that returns at once and reads no weights.
"""

from __future__ import annotations

import functools

from tvm import tirx

from mocompile.backends.tvm_common import contracts as C
from mocompile.backends.tvm_common.panel_math import column_scale, epilogue_value, weight_value
from mocompile.backends.tvm_common.specs import Epilogue, WeightFormat
from mocompile.backends.tvm_gpu import gpu_util as G

ROWS = 4  # R: rows per block (threadIdx.y); TJ x R threads per block


def _emit_column(x, w, w_scale, fmt: WeightFormat, k: int, tj: int, glu: bool, panel, row, j, acc) -> None:
    """acc[0] (and acc[1], the up half of a GLU panel) = row `row` of x times panel column j."""
    halves = (0, 1) if glu else (0,)
    for h in halves:
        G.store(acc, (h,), G.f32(0))
    with G.serial(0, fmt.depth(k)) as kk:
        for h in halves:
            lane = j + h * tj
            if fmt.bits == 4:
                lo, hi = (weight_value(fmt, k, w, w_scale, panel, kk, lane, high) for high in (False, True))
                G.store(acc, (h,), acc[h] + x[row, 2 * kk] * lo + x[row, 2 * kk + 1] * hi)
            else:
                G.store(acc, (h,), acc[h] + x[row, kk] * weight_value(fmt, k, w, w_scale, panel, kk, lane))


def _write(y, n: int, tj: int, epi: Epilogue, fmt: WeightFormat, w_scale, panel, jb, row, j, acc,
           bias=None, scale=None, residuals=()) -> None:
    col_scale = column_scale(fmt, w_scale, panel)

    def lane(half, jt):
        v = acc[half]
        return v * col_scale(jt + half * tj) if col_scale is not None else v

    col = jb * tj + j
    with G.when(col < n):
        G.store(y, (row, col), epilogue_value(epi, lane, j, row, col, bias, scale, residuals))


@functools.cache
def dense(k: int, n: int, tj: int, epi: Epilogue, fmt: WeightFormat) -> tirx.PrimFunc:
    """y[m, n] = epilogue(x[m, k] @ W), W as panels [NB, depth, TJ or 2*TJ] (+ scale panels)."""
    nb = -(-n // tj)
    with G.kernel(f"dense_{k}x{n}_tj{tj}_{epi.tag()}{fmt.tag()}") as kern:
        m, x, w, w_scale, bias, residuals, y = C.dense_matmul(k, n, tj, epi, fmt)
        with G.grid(nb) as jb:
            with G.grid_y((m + ROWS - 1) // ROWS) as rb:
                with G.block(tj) as j:
                    with G.block_y(ROWS) as r:
                        acc = G.local((2,))
                        row = rb * ROWS + r
                        with G.when(row < m):
                            _emit_column(x, w, w_scale, fmt, k, tj, epi.glu, jb, row, j, acc)
                            _write(y, n, tj, epi, fmt, w_scale, jb, jb, row, j, acc, bias=bias, residuals=residuals)
    return kern.func


@functools.cache
def grouped(experts: int, k: int, n: int, tj: int, epi: Epilogue, fmt: WeightFormat) -> tirx.PrimFunc:
    """Rows [indptr[e], indptr[e+1]) of x times expert e's panels (weights [experts*NB, ...])."""
    nb = -(-n // tj)
    with G.kernel(f"grouped_e{experts}_{k}x{n}_tj{tj}_{epi.tag()}{fmt.tag()}") as kern:
        rows, x, indptr, w, w_scale, scale, y = C.grouped_matmul(experts, k, n, tj, epi, fmt)
        with G.grid(nb) as jb:
            with G.grid_y(experts) as e:
                with G.block(tj) as j:
                    with G.block_y(ROWS) as r:
                        acc = G.local((2,))
                        begin, end = G.i64(indptr[e]), G.i64(indptr[e + 1])
                        panel = e * nb + jb
                        with G.serial(0, (end - begin + ROWS - 1) // ROWS) as t:
                            row = begin + t * ROWS + r
                            with G.when(row < end):
                                _emit_column(x, w, w_scale, fmt, k, tj, epi.glu, panel, row, j, acc)
                                _write(y, n, tj, epi, fmt, w_scale, panel, jb, row, j, acc, scale=scale)
    return kern.func
