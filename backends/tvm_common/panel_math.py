"""Reading panel-packed weights and writing a matmul's outputs, as TIR expressions shared by
every target's matmul kernels (layout.py has the panel layouts): the float value of a panel
entry (float32, bfloat16 or float16, int8 codes, or int4 codes two per byte, with per-channel or group-wise
scales), and the epilogue (GLU, activation, bias, row scale, residuals) in one order."""

from __future__ import annotations

from tvm import tirx

from mocompile.backends.tvm_common.kernel_math import activation
from mocompile.backends.tvm_common.specs import Epilogue, WeightFormat


def _int4(byte, high):
    """The signed value of one nibble of a uint8 code byte (stored with an offset of 8);
    `high`: a Python bool, or an expression (1: the high nibble) when the input index is a
    loop variable (the te workload of metaschedule.py)."""
    if isinstance(high, bool):
        nibble = (tirx.shift_right(byte, tirx.const(4, "uint8")) if high
                  else tirx.bitwise_and(byte, tirx.const(15, "uint8")))
    else:
        shift = tirx.Cast("uint8", high * 4)
        nibble = tirx.bitwise_and(tirx.shift_right(byte, shift), tirx.const(15, "uint8"))
    return tirx.Cast("float32", tirx.Cast("int32", nibble) - 8)


def widen(half: str, bits, half_type: bool = True):
    """The float32 value of a 16-bit float weight held as uint16 `bits`: bfloat16 is the upper
    half of a float32, so zero-extend and shift by 16 (integer vector ops every SIMD target
    has, which LLVM vectorizes with the load); float16 converts through the target's half
    type where it has one (`half_type`: F16C's vcvtph2ps on x86, CUDA's __half), else by
    integer ops (`_fp16_bits`: OpenCL's `half` needs cl_khr_fp16, which a device may lack)."""
    if half == "bfloat16":
        return tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("uint32", bits), tirx.const(16, "uint32")))
    if half == "float16":
        if half_type:
            return tirx.Cast("float32", tirx.reinterpret("float16", bits))
        return _fp16_bits(bits)
    raise ValueError(f"unknown 16-bit weight format {half!r}")


def table_value(table_dtype: str, v, half_type: bool = True):
    """An entry `v` of a table stored as `table_dtype` (a gather's: float32, or the uint16 bits
    of "bfloat16" / "float16") as float32."""
    return v if table_dtype == "float32" else widen(table_dtype, v, half_type)


def _u32(value: int):
    return tirx.const(value, "uint32")


def _fp16_bits(bits):
    """float16 bits as float32 by integer ops, exactly (IEEE 754 binary16 into binary32): the
    exponent and mantissa move up 13 bits and the exponent is rebiased by 112 (inf / NaN,
    exponent 31, by 224 to 255); a subnormal (exponent 0) is its mantissa m times 2^-24: m
    converted to float32 (exact) with 24 taken from its exponent; zero stays zero; the sign
    bit moves up 16. No float constant is involved (TVM's OpenCL C prints those in decimal,
    rounded)."""
    word = tirx.Cast("uint32", bits)
    magnitude = tirx.shift_left(tirx.bitwise_and(word, _u32(0x7FFF)), _u32(13))
    exponent = tirx.bitwise_and(word, _u32(0x7C00))
    rebias = tirx.Select(exponent == _u32(0x7C00), _u32(224 << 23), _u32(112 << 23))
    mantissa = tirx.bitwise_and(word, _u32(0x3FF))
    tiny = tirx.reinterpret("uint32", tirx.Cast("float32", mantissa)) - _u32(24 << 23)
    small = tirx.Select(mantissa == _u32(0), _u32(0), tiny)
    unsigned = tirx.Select(exponent == _u32(0), small, magnitude + rebias)
    sign = tirx.shift_left(tirx.bitwise_and(word, _u32(0x8000)), _u32(16))
    return tirx.reinterpret("float32", tirx.bitwise_or(unsigned, sign))


def _widen_pair(word, high):
    """Input 2i (low half) or 2i+1 (high half) of a word of two bfloat16 bit patterns, as
    float32: the low half shifted up, or the high half masked in place (one vector op each).
    `high`: a Python bool, or an expression (1: the high half) when the input index is a
    loop variable (the te workload of metaschedule.py): the word shifted down by 16 * high,
    then up by 16."""
    if not isinstance(high, bool):
        down = tirx.shift_right(word, tirx.Cast("uint32", high * 16))
        return tirx.reinterpret("float32", tirx.shift_left(down, tirx.const(16, "uint32")))
    if high:
        return tirx.reinterpret("float32", tirx.bitwise_and(word, tirx.const(0xFFFF0000, "uint32")))
    return tirx.reinterpret("float32", tirx.shift_left(word, tirx.const(16, "uint32")))


def weight_value(fmt: WeightFormat, k: int, w, scale, panel, kk, j, high=False, half_type: bool = True):
    """The float weight of panel row kk, lane j (int4: of input 2*kk + high): a 16-bit float
    widened (float16 through a half type or not, see `widen`), or the code converted and, for
    group-wise scales, multiplied by its group's scale (a per-channel scale is applied once
    in the write-back instead, see `column_scale`)."""
    if fmt.bits == 16:
        return _widen_pair(w[panel, kk, j], high) if fmt.pairs else widen(fmt.half, w[panel, kk, j], half_type)
    if not fmt.quantized:
        return w[panel, kk, j]
    source = kk * 2 if fmt.bits == 4 else kk  # both nibbles of a byte are in one group (groups are even)
    v = tirx.Cast("float32", w[panel, kk, j]) if fmt.bits == 8 else _int4(w[panel, kk, j], high)
    return v * scale_value(scale, panel, source // (k // fmt.groups), j) if fmt.groups > 1 else v


def scale_value(scale, panel, group, j):
    """A weight scale as float32 (float16 scale panels are widened as they are read)."""
    v = scale[panel, group, j]
    return tirx.Cast("float32", v) if str(scale.dtype) == "float16" else v


def epilogue_value(epi: Epilogue, lane, jt, row, col, bias=None, scale=None, residuals=()):
    """Output (row, col) from accumulator lanes (`lane(half, jt)`: lane jt of the row's tile,
    or of its up half (half 1) for GLU, already scaled by its weight scale; col = panel * TJ
    + jt), applied in Epilogue's order."""
    v = lane(0, jt)
    if epi.glu:
        v = activation(epi.activation, v) * lane(1, jt)
    elif epi.activation:
        v = activation(epi.activation, v)
    if epi.bias:
        v = v + bias[col]
    if epi.row_scale:
        v = v * scale[row]
    for r in residuals:
        v = v + r[row, col]
    return v


def weight_shapes(fmt: WeightFormat, panels, k: int, width: int) -> list[tuple[tuple, str]]:
    """(shape, dtype) of the weight panels and, for low-bit weights, of their scale panels."""
    shapes = [((panels, fmt.depth(k), width), fmt.dtype)]
    return shapes + [((panels, fmt.groups, width), fmt.scales)] if fmt.quantized else shapes


def column_scale(fmt: WeightFormat, scale, panel):
    """The write-back scale of a per-channel quantized weight (None otherwise)."""
    if not fmt.quantized or fmt.groups > 1:
        return None
    return lambda lane: scale_value(scale, panel, 0, lane)
