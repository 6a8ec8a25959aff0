"""Scalar math shared by kernels and elementwise ops, as TIR expressions (fp32).

`exp` and `erf` are written with plain arithmetic on purpose: LLVM turns tirx.exp / erf
into scalar libm calls (expf, erff) even inside vectorized loops, which made softmax and
activation epilogues the slowest part of their kernels. These versions vectorize and are
accurate to a couple of ulp (exp) / 1.5e-7 absolute (erf).
"""

from __future__ import annotations

from tvm import tirx

from mocompile.backends.tvm_cpu.tir_util import f32

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
