"""Matmuls in integer arithmetic with AVX-512 VNNI: int8 activation codes x int8 or int4
weight codes, exact int32 sums (vpdpbusd: 64 byte products summed into 16 int32 lanes per
instruction), one float multiply-add per output and scale group.

- `quantize_packed`: x[m, k] float32 -> signed int8 codes and a scale per row, with the
  codes' sum over each group of `group` inputs (what undoes the weights' offset, below):
  "static" / "token": q = clamp(round(x / s), -127, 127) as quantize_act rounds it (s the
  calibrated constant, or max |row| / 127); "float": the float activations of a weight-only
  matmul as DIGITS int8 digits relative to the row's max |x|, x ~ s * (q1 + q2/254 +
  q3/254^2) (block floating point with a 3-byte mantissa: the residual is under float32's
  own precision at the row's largest element);
- `int8_matmul`: y = epilogue(s_row * sum_g s_w,g * sum_d 254^-d * (sum_{k in g} u_k q_dk -
  offset * sum_{k in g} q_dk)): vpdpbusd multiplies unsigned by signed bytes, so the
  weights are stored unsigned, u = w + offset (int8: + 128; int4: the nibble, + 8), in the
  `vnni_panels` layout (layout.py), and the offset comes back out through the activation
  codes' group sums, one multiply per row and group (no per-column correction to store).
  int4 codes are unpacked in registers (mask, shift) and stay 4-bit in memory. A dense
  layer (linear, a feed-forward block's GLU / down projection, an LM head) or, with
  `experts`, the per-expert GEMMs of the sparse MoE block over expert-sorted rows (as
  grouped_matmul).

With "static"/"token" codes this is exactly the IR's quantize_act -> linear(dequantize):
same codes, same scales, integer sums exact where the IR's float sum rounds. With "float"
digits it computes a weight-only matmul to float32 precision.

Why it is fast even when the weights sit in cache: a float GEMV is one chain of dependent
FMAs per accumulator (its summation order is fixed, so that a row's result never depends on
the batch), i.e. bound by FMA latency, and weight-only float kernels convert every code
before its FMA. Integer sums are exact in any order, so a lone row (a decode step) splits
each group's reduction over independent accumulators and still gives the same bits as a row
in a tile (the groups' float sums keep one order everywhere): latency hidden, batch
invariance kept, 64 products per instruction, no conversions.
"""

from __future__ import annotations

import functools

from tvm import tirx

from mocompile.backends.tvm_cpu import tir_util as U
from mocompile.backends.tvm_cpu.kernels_matmul import Epilogue, WeightFormat, _writer, residual_args
from mocompile.backends.tvm_cpu.kernels_quant import emit_row_scale
from mocompile.ir.ops.quant import INT8_MAX
from mocompile.backends.tvm_common.layout import VNNI_LANES, vnni_offset
from mocompile.backends.tvm_common.panel_math import scale_value

LANES = VNNI_LANES
ROWS = 4  # rows per register tile at most: each weight vector loaded serves them all
SPLITS = 4  # independent accumulators of a row reduced alone (hides vpdpbusd's latency)
ACCUMULATOR_VECTORS = 16  # int32 accumulator registers a tile may fill: half of AVX-512's 32
DIGITS = 3  # int8 digits of a float activation (mode "float"): 3 x ~8 bits, float32's mantissa
DIGIT_BASE = 254  # a digit's weight relative to the one before: residuals in [-0.5, 0.5] -> [-127, 127]
INT8_PER_CHANNEL = WeightFormat(8, 1)


def _vpdpbusd(acc, unsigned_bytes, signed_bytes):
    """acc[i32 x16] + per lane the dot product of 4 unsigned bytes with 4 signed bytes."""
    return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                      tirx.reinterpret("int8x64", unsigned_bytes),
                                      tirx.reinterpret("int8x64", signed_bytes))


def _int4_bytes(word, high: bool):
    """The 4 low (or high) nibbles of each int32 lane as bytes (codes stored + 8)."""
    nibbles = tirx.shift_right(word, tirx.Broadcast(tirx.IntImm("int32", 4), LANES)) if high else word
    return tirx.bitwise_and(nibbles, tirx.Broadcast(tirx.IntImm("int32", 0x0F0F0F0F), LANES))


def k_per_word(fmt: WeightFormat) -> int:
    """Inputs one int32 panel word holds per output column: 4 int8 codes, or 8 int4 codes."""
    return 4 if fmt.bits == 8 else 8


def supports(fmt: WeightFormat, k: int) -> bool:
    """Whether int8_matmul reads weights of this format and input width: int8 or int4
    codes whose scale groups hold whole panel words."""
    return fmt.bits in (8, 4) and k % fmt.groups == 0 and (k // fmt.groups) % k_per_word(fmt) == 0


def _round_to_int32(v):
    """round-half-even(v) as int32 (|v| < 2^22), through the bits of v + 1.5 * 2^23, which
    the float addition rounds to an integer in the low mantissa bits: unlike nearbyint and
    a float -> int cast, TVM keeps this vectorized."""
    return tirx.reinterpret("int32", v + U.f32(1.5 * 2 ** 23)) - tirx.IntImm("int32", 0x4B400000)


def digits_of(mode: str) -> int:
    """int8 codes per activation: one for rounded activations, DIGITS for float ones."""
    return DIGITS if mode == "float" else 1


@functools.cache
def quantize_packed(k: int, mode: str, group: int) -> tirx.PrimFunc:
    """x[m, k] (+ scale[1] for "static") -> codes[m, D*k] int8, s[m], sums[m, D*k/group] int32
    (D = digits_of(mode) planes, one after another in a row; see the module docstring)."""
    if mode not in ("static", "token", "float") or k % group or group % 4:
        raise ValueError(f"packed int8 activations: mode static, token or float, groups of 4*n dividing k "
                         f"({mode}, {group}, {k})")
    digits, groups = digits_of(mode), k // group
    m = U.dim("m")
    lanes = U.lanes_for(group)
    with U.kernel(f"quantize_packed_{mode}_k{k}_g{group}") as kern:
        x = U.arg("x", (m, k))
        static = U.arg("scale", (1,)) if mode == "static" else None
        codes = U.arg("codes", (m, digits * k), "int8")
        scale = U.arg("s", (m,))
        sums = U.arg("sums", (m, digits * groups), "int32")

        def row(i):
            s = U.scratch((2,))  # the scale, and (float digits) what x is multiplied by for the first digit
            emit_row_scale(s, x, i, k, "token" if mode == "float" else mode, static)
            U.store(scale, (i,), s[0])
            if digits > 1:
                U.store(s, (1,), U.f32(1) / s[0])
            with U.serial(0, groups) as g:
                part = U.scratch((digits, lanes), "int32")
                for d in range(digits):
                    with U.vectorized(0, lanes) as l:
                        U.store(part, (d, l), tirx.IntImm("int32", 0))
                with U.serial(0, group // lanes) as c:
                    with U.vectorized(0, lanes) as l:
                        col = g * group + c * lanes + l
                        # rounded codes as int8_code computes them (x / s); float digits need not
                        rest = x[i, col] * s[1] if digits > 1 else x[i, col] / s[0]
                        for d in range(digits):  # each digit takes the rounding residual of the one before
                            # (a residual digit lies in [-127, 127] already: |rest - round(rest)| <= 1/2)
                            clamped = tirx.min(tirx.max(rest, U.f32(-INT8_MAX)), U.f32(INT8_MAX)) if d == 0 else rest
                            code = _round_to_int32(clamped)
                            U.store(codes, (i, d * k + col), tirx.Cast("int8", code))
                            U.store(part, (d, l), part[d, l] + code)
                            rest = (rest - tirx.Cast("float32", code)) * U.f32(DIGIT_BASE)
                for d in range(digits):
                    U.store(sums, (i, d * groups + g), U.fold_lanes(part, (d,), lanes, lambda a, b: a + b))

        U.parallel_for(m, 8 * m * k * digits, row)
    return kern.func


def _splits(words: int, budget: int) -> int:
    """Accumulators of a lone row: the most (<= SPLITS, within `budget`) dividing a group's words."""
    return next(s for s in (SPLITS, 2, 1) if words % s == 0 and s <= budget)


def _emit_int8_rows(codes, xs, sums, w, ws, panel, row_begin, row_end, fmt: WeightFormat, k: int, width: int,
                    digits: int, write, source=lambda row: row) -> None:
    """Rows [row_begin, row_end) against VNNI panel `panel` ([*, words, width] int32 words,
    scale groups of words / groups words): register tiles of several rows, then each row left
    alone with each group's reduction split over independent accumulators. Row r's
    activations are row source(r) of codes / xs / sums. `write(row, tile, a)` writes float
    row `a` of a tile."""
    vectors = width // LANES
    words = k // k_per_word(fmt)
    per_group = words // fmt.groups
    per_split = digits * vectors  # int32 accumulator vectors per row and split
    tile_rows = max(1, min(ROWS, ACCUMULATOR_VECTORS // per_split))
    offset = vnni_offset(fmt.bits)

    def activation_word(row, d, c4):
        """Activation word c4 (4 codes) of digit plane d of a row, broadcast to every lane."""
        return tirx.Broadcast(tirx.reinterpret("int32", codes[source(row), tirx.Ramp(d * k + 4 * c4, 1, 4)]), LANES)

    def products(acc, row, d, c, wv):
        """acc + the products of weight word c (vector wv) with digit d of row's codes."""
        if fmt.bits == 8:
            pairs = [(wv, activation_word(row, d, c))]
        else:  # low nibbles: inputs 8c..8c+3 (activation word 2c); high: 8c+4.. (word 2c+1)
            pairs = [(_int4_bytes(wv, bool(h)), activation_word(row, d, 2 * c + h)) for h in (0, 1)]
        value = acc
        for weights, word in pairs:
            value = _vpdpbusd(value, weights, word)
        return value

    def reduce(r0, count: int, splits: int) -> None:
        total = U.scratch((count, width))
        for i in range(count):
            with U.vectorized(0, width) as j:
                U.store(total, (i, j), U.f32(0))
        with U.serial(0, fmt.groups) as g:
            acc = U.scratch((count * digits * splits, width), "int32")

            def slot(i, d, s):
                return (i * digits + d) * splits + s

            for a in range(count * digits * splits):
                with U.vectorized(0, width) as j:
                    U.store(acc, (a, j), tirx.IntImm("int32", 0))
            with U.serial(0, per_group // splits) as c0:
                for s in range(splits):
                    c = g * per_group + c0 * splits + s
                    for v in range(vectors):
                        lanes = tirx.Ramp(v * LANES, 1, LANES)
                        wv = w[panel, c, lanes]
                        for i in range(count):
                            for d in range(digits):
                                a = slot(i, d, s)
                                U.store(acc, (a, lanes), products(acc[a, lanes], r0 + i, d, c, wv))
            for i in range(count):  # the group's exact sums, offset removed, scaled, in group order
                with U.vectorized(0, width) as j:
                    value = None
                    for d in reversed(range(digits)):  # smallest digit first: sum at the precision it needs
                        exact = acc[slot(i, d, 0), j]
                        for s in range(1, splits):
                            exact = exact + acc[slot(i, d, s), j]
                        exact = exact - offset * sums[source(r0 + i), d * fmt.groups + g]
                        term = tirx.Cast("float32", exact)
                        value = term if value is None else term + value * U.f32(1 / DIGIT_BASE)
                    U.store(total, (i, j), total[i, j] + value * scale_value(ws, panel, g, j))
        for i in range(count):
            with U.vectorized(0, width) as j:
                U.store(total, (i, j), total[i, j] * xs[source(r0 + i)])
            write(r0 + i, total, i)

    full = (row_end - row_begin) // tile_rows
    with U.serial(0, full) as t:
        reduce(row_begin + t * tile_rows, tile_rows, 1)
    with U.serial(row_begin + full * tile_rows, row_end) as r:
        reduce(r, 1, _splits(per_group, max(1, ACCUMULATOR_VECTORS // per_split)))


@functools.cache
def int8_matmul(k: int, n: int, epi: Epilogue, experts: int = 0, fmt: WeightFormat = INT8_PER_CHANNEL,
                digits: int = 1, gathered: bool = False) -> tirx.PrimFunc:
    """y = epilogue(int8 activations x low-bit weights); see the module docstring.

    Dense (experts = 0): codes[m, D*k], x_scale[m], sums[m, D*G] (quantize_packed with
    D = `digits` and groups of k/G), w[NB, words, W], w_scale[NB, G, W] (+ bias[n],
    + residuals) -> y[m, n]; words = k/4 (int8) or k/8 (int4), G scale groups. Grouped: the
    same over expert-sorted rows, rows [indptr[e], indptr[e+1]) against expert e's panels
    ([experts*NB, ...]), + a per-row scale (the routing weight). W = 16, or 32 for a GLU
    panel (gate lanes, then up lanes).

    `gathered` (grouped only): codes, x_scale and sums hold the tokens' activations
    [tokens, ...], and an index row_token[rows] (after indptr) says which token each
    expert-sorted row copies: the MoE dispatch reads the tokens' codes, quantized once,
    instead of a quantized copy per (token, expert) pair (the same codes either way)."""
    if gathered and not experts:
        raise ValueError("int8_matmul: gathered rows are the grouped (experts) form's")
    if not supports(fmt, k) or (experts and (epi.bias or epi.residual)) or (not experts and epi.row_scale):
        raise ValueError(f"int8_matmul: {fmt.bits}-bit weights in {fmt.groups} groups of a {k}-wide input, or an "
                         "epilogue it lacks (bias/residual are dense-only, row_scale grouped-only)")
    nb = -(-n // LANES)
    words = k // k_per_word(fmt)
    width = 2 * LANES if epi.glu else LANES
    rows = U.dim("rows")
    tokens = U.dim("tokens") if gathered else rows
    kind = f"grouped_e{experts}" if experts else "dense"
    tags = (fmt.tag() if fmt != INT8_PER_CHANNEL else "") + (f"_d{digits}" if digits > 1 else "")
    with U.kernel(f"int8_{kind}_{k}x{n}_{epi.tag()}{tags}{'_gathered' if gathered else ''}") as kern:
        codes = U.arg("codes", (tokens, digits * k), "int8")
        xs = U.arg("x_scale", (tokens,))
        sums = U.arg("sums", (tokens, digits * fmt.groups), "int32")
        indptr = U.arg("indptr", (experts + 1,), "int32") if experts else None
        row_token = U.arg("row_token", (rows,), "int32") if gathered else None
        panels = max(experts, 1) * nb
        w = U.arg("w", (panels, words, width), "int32")
        ws = U.arg("w_scale", (panels, fmt.groups, width), fmt.scales)
        bias = U.arg("bias", (n,)) if epi.bias else None
        row_scale = U.arg("scale", (rows,)) if epi.row_scale else None
        residuals = residual_args(epi, rows, n)
        y = U.arg("y", (rows, n))

        def task(t):
            jb, e = (t // experts, t % experts) if experts else (t, 0)
            p = e * nb + jb
            begin, end = (U.i64(indptr[e]), U.i64(indptr[e + 1])) if experts else (0, rows)
            write = _writer(y, n, LANES, jb, epi, bias=bias, scale=row_scale, residuals=residuals)
            source = (lambda r: tirx.min(tirx.max(U.i64(row_token[r]), 0), tokens - 1)) if gathered else (lambda r: r)
            _emit_int8_rows(codes, xs, sums, w, ws, p, begin, end, fmt, k, width, digits, write, source)

        weight_bytes = (tirx.min(rows, experts) if experts else 1) * nb * width * k * fmt.bits // 8
        U.parallel_for(panels, weight_bytes + 4 * rows * (k + n) + digits * rows * k * nb * width // 8, task)
    return kern.func
