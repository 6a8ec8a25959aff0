"""Matmuls over int8 activations in integer arithmetic: int8 activation codes x int8 (or
int4) weight codes, exact int32 sums with AVX-512 VNNI (vpdpbusd: 64 byte products summed
into 16 int32 lanes per instruction), one float multiply-add per output and scale group.

- `quantize_packed`: x[m, k] float32 -> int8 codes q = clamp(round(x / s), -127, 127) stored
  as unsigned bytes q + 128 (vpdpbusd multiplies unsigned by signed bytes), four per int32,
  and the scale s per row (static: the calibrated constant; token: max |row| / 127);
- `int8_matmul`: y = epilogue(s_row * sum_g s_col,g * (sum_{k in g} (q+128) * w - 128 *
  sum_{k in g} w)), weights in the `vnni_panels` layout (layout.py) with their `vnni_colsum`
  correction and scale panels; g runs over the weight's scale groups (one for per-channel
  int8). int4 codes are unpacked to signed bytes in registers (mask, shift, subtract 8);
  the weights stay 4-bit in memory. A dense layer (linear, or a feed-forward block's GLU /
  down projection) or, with `experts`, the per-expert GEMMs of the sparse MoE block over
  expert-sorted rows (as grouped_matmul).

The arithmetic is exactly the quantize_act -> linear(dequantize) pair of the IR
(mocompile/ir/ops/quant.py): same codes, same scales; the integer sums are exact where the
IR's float sum rounds, so the two agree to float32 rounding.

Why the integer path is fast even when the weights sit in cache: a float GEMV is one chain
of dependent FMAs per accumulator (its summation order is fixed, so that a row's result
never depends on the batch), i.e. bound by FMA latency. Integer sums are exact in any
order, so a lone row (a decode step) splits each group's reduction over several
independent accumulators and still gives the same bits as a row in a 4-row tile (the
groups' float sums keep one order everywhere): latency hidden, batch invariance kept, 64
products per instruction instead of 16.
"""

from __future__ import annotations

import functools

from tvm import tirx

from mocompile.backends.tvm_cpu import tir_util as U
from mocompile.backends.tvm_cpu.kernels_matmul import Epilogue, WeightFormat, _writer, residual_args
from mocompile.backends.tvm_cpu.kernels_quant import emit_row_scale, int8_code
from mocompile.backends.tvm_cpu.layout import VNNI_LANES

LANES = VNNI_LANES
ROWS = 4  # rows per register tile: each weight vector loaded serves 4 rows
SPLITS = 4  # independent accumulators of a row reduced alone (hides vpdpbusd's latency)
INT8_PER_CHANNEL = WeightFormat(8, 1)


def _vpdpbusd(acc, a_bytes, b_bytes):
    """acc[i32 x16] + per lane the dot product of 4 unsigned bytes of a with 4 signed bytes of b."""
    return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                      tirx.reinterpret("int8x64", a_bytes), tirx.reinterpret("int8x64", b_bytes))


def _int4_bytes(word, high: bool):
    """Signed bytes of the 4 low (or high) nibbles of each int32 lane: codes stored + 8."""
    nibbles = tirx.shift_right(word, tirx.Broadcast(tirx.IntImm("int32", 4), LANES)) if high else word
    masked = tirx.bitwise_and(nibbles, tirx.Broadcast(tirx.IntImm("int32", 0x0F0F0F0F), LANES))
    return tirx.reinterpret("int8x64", masked) - tirx.Broadcast(tirx.IntImm("int8", 8), 4 * LANES)


def k_per_word(fmt: WeightFormat) -> int:
    """Inputs one int32 panel word holds per output column: 4 int8 codes, or 8 int4 codes."""
    return 4 if fmt.bits == 8 else 8


def supports(fmt: WeightFormat, k: int) -> bool:
    """Whether int8_matmul reads weights of this format and input width: int8 or int4
    codes whose scale groups hold whole panel words."""
    return fmt.bits in (8, 4) and k % fmt.groups == 0 and (k // fmt.groups) % k_per_word(fmt) == 0


@functools.cache
def quantize_packed(k: int, mode: str) -> tirx.PrimFunc:
    """x[m, k] (+ scale[1] for "static") -> codes[m, k/4] int32 (4 unsigned bytes), s[m]."""
    if mode not in ("static", "token") or k % 4:
        raise ValueError(f"packed int8 activations need a static or per-token scale and k % 4 == 0 ({mode}, {k})")
    m = U.dim("m")
    with U.kernel(f"quantize_packed_{mode}_k{k}") as kern:
        x = U.arg("x", (m, k))
        static = U.arg("scale", (1,)) if mode == "static" else None
        codes = U.arg("codes", (m, k // 4), "int32")
        scale = U.arg("s", (m,))

        def row(i):
            s = U.scratch((1,))
            emit_row_scale(s, x, i, k, mode, static)
            U.store(scale, (i,), s[0])
            with U.serial(0, k // 4) as c4:
                word = tirx.IntImm("int32", 0)
                for t in range(4):  # byte t of the word: code of input 4*c4 + t, offset to unsigned
                    byte = tirx.Cast("int32", int8_code(x[i, c4 * 4 + t], s[0])) + 128
                    word = word | tirx.shift_left(byte, tirx.IntImm("int32", 8 * t))
                U.store(codes, (i, c4), word)

        U.parallel_for(m, 8 * m * k, row)
    return kern.func


def _splits(words: int) -> int:
    """Accumulators of a lone row: the most (<= SPLITS) dividing a group's words."""
    return next(s for s in (SPLITS, 2, 1) if words % s == 0)


def _emit_int8_rows(codes, xs, w, colsum, ws, panel, row_begin, row_end, fmt: WeightFormat, words: int, width: int,
                    write) -> None:
    """Rows [row_begin, row_end) against VNNI panel `panel` ([*, words, width] int32 words,
    scale groups of words / groups words): ROWS-row register tiles, then each row left alone
    with each group's reduction split over independent accumulators. `write(row, tile, a)`
    writes float row `a` of a tile."""
    vectors = width // LANES
    per_group = words // fmt.groups

    def products(acc, row, c, wv):
        """acc + the products of weight word c (vector wv) with row's activation codes."""
        if fmt.bits == 8:
            pairs = [(codes[row, c], wv)]
        else:  # low nibbles: inputs 8c..8c+3 (activation word 2c); high: 8c+4.. (word 2c+1)
            pairs = [(codes[row, 2 * c + h], _int4_bytes(wv, bool(h))) for h in (0, 1)]
        value = acc
        for word, weights in pairs:
            value = _vpdpbusd(value, tirx.Broadcast(word, LANES), weights)
        return value

    def reduce(r0, count: int, splits: int) -> None:
        total = U.scratch((count, width))
        for i in range(count):
            with U.vectorized(0, width) as j:
                U.store(total, (i, j), U.f32(0))
        with U.serial(0, fmt.groups) as g:
            acc = U.scratch((count * splits, width), "int32")
            for a in range(count * splits):
                with U.vectorized(0, width) as j:
                    U.store(acc, (a, j), tirx.IntImm("int32", 0))
            with U.serial(0, per_group // splits) as c0:
                for s in range(splits):
                    c = g * per_group + c0 * splits + s
                    for v in range(vectors):
                        lanes = tirx.Ramp(v * LANES, 1, LANES)
                        wv = w[panel, c, lanes]
                        for i in range(count):
                            a = i * splits + s
                            U.store(acc, (a, lanes), products(acc[a, lanes], r0 + i, c, wv))
            for i in range(count):  # the group's exact sum, corrected and scaled, in group order
                with U.vectorized(0, width) as j:
                    exact = acc[i * splits, j]
                    for s in range(1, splits):
                        exact = exact + acc[i * splits + s, j]
                    scaled = tirx.Cast("float32", exact - colsum[panel, g, j]) * ws[panel, g, j]
                    U.store(total, (i, j), total[i, j] + scaled)
        for i in range(count):
            with U.vectorized(0, width) as j:
                U.store(total, (i, j), total[i, j] * xs[r0 + i])
            write(r0 + i, total, i)

    full = (row_end - row_begin) // ROWS
    with U.serial(0, full) as t:
        reduce(row_begin + t * ROWS, ROWS, 1)
    with U.serial(row_begin + full * ROWS, row_end) as r:
        reduce(r, 1, _splits(per_group))


@functools.cache
def int8_matmul(k: int, n: int, epi: Epilogue, experts: int = 0, fmt: WeightFormat = INT8_PER_CHANNEL) -> tirx.PrimFunc:
    """y = epilogue(int8 activations x low-bit weights); see the module docstring.

    Dense (experts = 0): codes[m, k/4], x_scale[m], w[NB, words, W], w_colsum[NB, G, W],
    w_scale[NB, G, W] (+ bias[n], + residuals) -> y[m, n]; words = k/4 (int8) or k/8
    (int4), G scale groups. Grouped: the same over expert-sorted rows, rows [indptr[e],
    indptr[e+1]) against expert e's panels ([experts*NB, ...]), + a per-row scale (the
    routing weight). W = 16, or 32 for a GLU panel (gate lanes, then up lanes)."""
    if not supports(fmt, k) or (experts and (epi.bias or epi.residual)) or (not experts and epi.row_scale):
        raise ValueError(f"int8_matmul: {fmt.bits}-bit weights in {fmt.groups} groups of a {k}-wide input, or an "
                         "epilogue it lacks (bias/residual are dense-only, row_scale grouped-only)")
    nb = -(-n // LANES)
    words = k // k_per_word(fmt)
    width = 2 * LANES if epi.glu else LANES
    rows = U.dim("rows")
    kind = f"grouped_e{experts}" if experts else "dense"
    with U.kernel(f"int8_{kind}_{k}x{n}_{epi.tag()}{fmt.tag() if fmt != INT8_PER_CHANNEL else ''}") as kern:
        codes = U.arg("codes", (rows, k // 4), "int32")
        xs = U.arg("x_scale", (rows,))
        indptr = U.arg("indptr", (experts + 1,), "int32") if experts else None
        panels = max(experts, 1) * nb
        w = U.arg("w", (panels, words, width), "int32")
        colsum = U.arg("w_colsum", (panels, fmt.groups, width), "int32")
        ws = U.arg("w_scale", (panels, fmt.groups, width))
        bias = U.arg("bias", (n,)) if epi.bias else None
        row_scale = U.arg("scale", (rows,)) if epi.row_scale else None
        residuals = residual_args(epi, rows, n)
        y = U.arg("y", (rows, n))

        def task(t):
            jb, e = (t // experts, t % experts) if experts else (t, 0)
            p = e * nb + jb
            begin, end = (U.i64(indptr[e]), U.i64(indptr[e + 1])) if experts else (0, rows)
            write = _writer(y, n, LANES, jb, epi, bias=bias, scale=row_scale, residuals=residuals)
            _emit_int8_rows(codes, xs, w, colsum, ws, p, begin, end, fmt, words, width, write)

        weight_bytes = (tirx.min(rows, experts) if experts else 1) * nb * width * k * fmt.bits // 8
        U.parallel_for(panels, weight_bytes + 4 * rows * (k + n) + rows * k * nb * width // 8, task)
    return kern.func
