"""GPU matmuls over panel-packed weights (tvm_common/layout.py): dense (linear, GLU, LM head)
and grouped per expert (the MoE GEMMs), float32 weights, bfloat16 / float16 weights widened in
registers, or low-bit weights dequantised in registers.

Schedule: a block owns one weight panel of TJ output columns (blockIdx.x) and a tile of rows;
thread j accumulates output column j, so the TJ threads of a row read one contiguous panel
row per input (coalesced: the panel layout stores a panel's TJ columns of each input side by
side) and share the input x[r, kk] (one broadcast load). Dense: SPLIT threads per column split
the reduction and meet in shared memory (a decode step's one row uses every thread); grouped:
threadIdx.y is the row within a tile of an expert's rows.
16-bit weights (uint16, or two bfloat16 inputs per uint32 word) are widened to float32 as they
are loaded (float16 by integer ops, gpu_util.HALF_TYPE) and accumulate in float32 exactly as
float32 weights do.
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

ROWS = 4  # rows per block: the grouped matmul's threadIdx.y, the dense matmul's rows in turn
SPLIT = 4  # the dense matmul's threads per column (threadIdx.y), each a share of the reduction


def _emit_column(x, w, w_scale, fmt: WeightFormat, k: int, tj: int, glu: bool, panel, row, j, acc,
                 part=0, parts: int = 1) -> None:
    """acc[0] (and acc[1], the up half of a GLU panel) = row `row` of x times panel column j,
    over the panel rows part, part + parts, ... (all of them for parts = 1)."""
    halves = (0, 1) if glu else (0,)
    depth = fmt.depth(k)
    for h in halves:
        G.store(acc, (h,), G.f32(0))
    with G.serial(0, (depth + parts - 1) // parts) as i:
        kk = i * parts + part
        with G.when(kk < depth):
            for h in halves:
                lane = j + h * tj
                if fmt.paired:
                    lo, hi = (weight_value(fmt, k, w, w_scale, panel, kk, lane, high, G.HALF_TYPE)
                              for high in (False, True))
                    G.store(acc, (h,), acc[h] + x[row, 2 * kk] * lo + x[row, 2 * kk + 1] * hi)
                else:
                    G.store(acc, (h,), acc[h] + x[row, kk] * weight_value(fmt, k, w, w_scale, panel, kk, lane,
                                                                              half_type=G.HALF_TYPE))


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
    """y[m, n] = epilogue(x[m, k] @ W), W as panels [NB, depth, TJ or 2*TJ] (+ scale panels).

    A block owns one panel and ROWS rows; its SPLIT threads of a column split the reduction
    (panel rows q, q + SPLIT, ...), so a decode step's single row keeps every thread busy; the
    partial sums meet in shared memory and thread q = 0 adds them in order and writes."""
    nb = -(-n // tj)
    halves = 2 if epi.glu else 1
    with G.kernel(f"dense_{k}x{n}_tj{tj}_{epi.tag()}{fmt.tag()}") as kern:
        m, x, w, w_scale, bias, residuals, y = C.dense_matmul(k, n, tj, epi, fmt)
        with G.grid(nb) as jb:
            with G.grid_y((m + ROWS - 1) // ROWS) as rb:
                part = G.shared((SPLIT, halves, tj))
                with G.block(tj) as j:
                    with G.block_y(SPLIT) as q:
                        acc = G.local((2,))
                        with G.serial(0, ROWS) as r:
                            row = rb * ROWS + r
                            with G.when(row < m):
                                _emit_column(x, w, w_scale, fmt, k, tj, epi.glu, jb, row, j, acc, q, SPLIT)
                                for h in range(halves):
                                    G.store(part, (q, h, j), acc[h])
                            G.barrier()
                            with G.when(tirx.all(row < m, q == 0)):
                                for h in range(halves):
                                    total = part[0, h, j]
                                    for other in range(1, SPLIT):
                                        total = total + part[other, h, j]
                                    G.store(acc, (h,), total)
                                _write(y, n, tj, epi, fmt, w_scale, jb, jb, row, j, acc, bias=bias,
                                       residuals=residuals)
                            G.barrier()  # part is rewritten for the next row
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
