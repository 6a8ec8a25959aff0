"""Scalar math shared by kernels and elementwise ops, as TIR expressions (fp32).

`exp` and `erf` are written with plain arithmetic on purpose: LLVM turns tirx.exp / erf
into scalar libm calls (expf, erff) even inside vectorized loops, which made softmax and
activation epilogues the slowest part of their kernels. These versions vectorize and are
accurate to a couple of ulp (exp) / 1.5e-7 absolute (erf). Every target evaluates the same
expressions, so the CPU and GPU kernels round alike.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx

from mocompile.ir.ops.quant import INT8_MAX



def f32(x: float) -> tirx.PrimExpr:
    """A float32 constant, rounded to float32 here: the code generators print the value they
    hold, and a constant with more digits than float32 has is a warning in CUDA C++."""
    return tirx.FloatImm("float32", float(np.float32(x)))


_LOG2E = 1.44269504088896341
_EXP_LO, _EXP_HI = -87.3, 88.0  # keeps 2^n a normal float; beyond: 0 (exact for -inf) and inf
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def exp(v):
    """e^v: Cody-Waite reduction v = n ln2 + r, Cephes degree-6 polynomial for e^r, 2^n built
    from exponent bits. NaN propagates; v < -87.3 gives 0 and v > 88 gives inf."""
    x = tirx.min(tirx.max(v, f32(_EXP_LO)), f32(_EXP_HI))
    n = tirx.floor(x * f32(_LOG2E) + f32(0.5))
    r = x - n * f32(0.693359375) - n * f32(-2.12194440e-4)
    p = f32(_EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        p = p * r + f32(c)
    y = p * r * r + r + f32(1)
    two_n = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n) + 127, 23))
    out = y * two_n
    out = tirx.Select(v < f32(_EXP_LO), f32(0), tirx.Select(v > f32(_EXP_HI), f32(float("inf")), out))
    return tirx.Select(_is_nan(v), v, out)


def _is_nan(v):
    """Bit test (LLVM may assume `v != v` is false under TVM's fast-math flags)."""
    bits = tirx.reinterpret("int32", v)
    return tirx.bitwise_and(bits, tirx.IntImm("int32", 0x7FFFFFFF)) > tirx.IntImm("int32", 0x7F800000)


_ERF_P = 0.3275911
_ERF_A = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


def erf(v):
    """Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7)."""
    a = tirx.abs(v)
    t = f32(1) / (f32(1) + f32(_ERF_P) * a)
    p = f32(_ERF_A[0])
    for c in _ERF_A[1:]:
        p = p * t + f32(c)
    y = f32(1) - p * t * exp(-a * a)
    return tirx.Select(v < f32(0), -y, y)


def sigmoid(v):
    return f32(1) / (f32(1) + exp(-v))


def silu(v):
    return v / (f32(1) + exp(-v))


def gelu(v):
    """Exact GELU (erf form), torch's default."""
    return f32(0.5) * v * (f32(1) + erf(v * f32(0.7071067811865476)))


ACTIVATIONS = {"silu": silu, "gelu": gelu}


def activation(name: str | None, v):
    if name is None:
        return v
    try:
        return ACTIVATIONS[name](v)
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}") from None


def rope(load, d, head_dim: int, cs, pos):
    """Element d of the rotated head vector x (x[c] = load(c)) at position pos, with the
    cos/sin table cs[pos, 0|1, head_dim/2] (the rotate-half form the interpreter computes)."""
    half = head_dim // 2
    i = tirx.floormod(d, half)
    rotated = tirx.Select(d < half, -load(tirx.min(d + half, head_dim - 1)), load(tirx.max(d - half, 0)))
    return load(d) * cs[pos, 0, i] + rotated * cs[pos, 1, i]


def latent_channel(nope, rope_part, d, dn: int, dr: int, cs, pos):
    """Channel d of a latent-attention head [nope | rope(rope part)] (dn + dr channels):
    nope(c) and rope_part(c) load the two parts."""
    rotated = rope(rope_part, tirx.max(d - dn, 0), dr, cs, pos)
    return tirx.Select(d < dn, nope(tirx.min(d, dn - 1)), rotated)


def act_scale(amax):
    """The int8 scale of activations whose largest magnitude is amax: amax / 127 (1 for 0),
    as the interpreter's quantize_act (mocompile/ir/ops/quant.py)."""
    return tirx.Select(amax > f32(0), amax / f32(INT8_MAX), f32(1))


def int8_code(value, scale):
    """The int8 code of value under scale, as a float: round half to even, saturate at +-127."""
    return tirx.min(tirx.max(tirx.nearbyint(value / scale), f32(-INT8_MAX)), f32(INT8_MAX))
