"""Fixed-point arithmetic as the generated HLS C++ does it, in numpy integers.

A value of format `Fmt(width, integer)` is stored as an integer code c meaning c / 2**frac
(frac = width - integer), exactly as `ap_fixed<width, integer, AP_RND, AP_SAT>` stores it.
Every narrowing in the C++ is a conversion to such a type, which rounds half towards plus
infinity (AP_RND: floor(x + 1/2)) and then clamps to the type's range (AP_SAT);
`requant` is that conversion on codes. Products and sums are exact in the C++ (ap_fixed
widens them), and exact here as int64. The nonlinear functions are tables of codes with
linear interpolation between entries (`Lut`), the reciprocals integer divisions, the square
root an integer square root: each has one integer definition here and one in
`hls/mocompile_hls.h`, so the C simulation and this emulation agree bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Fmt:
    """A signed fixed-point format: `width` bits of which `integer` (sign included) before the point."""

    width: int
    integer: int

    @property
    def frac(self) -> int:
        return self.width - self.integer

    @property
    def lo(self) -> int:
        return -(1 << (self.width - 1))

    @property
    def hi(self) -> int:
        return (1 << (self.width - 1)) - 1

    def cpp(self) -> str:
        return f"ap_fixed<{self.width}, {self.integer}, AP_RND, AP_SAT>"

    def text(self) -> str:
        return f"ap_fixed<{self.width},{self.integer}>"

    def to_json(self) -> list[int]:
        return [self.width, self.integer]

    @staticmethod
    def covering(amax: float, width: int, headroom: float = 1.25) -> "Fmt":
        """The format of `width` bits whose range holds `amax * headroom` with the most
        fraction bits (at least one integer bit besides the sign)."""
        need = max(float(amax) * headroom, 2.0 ** -(width - 2))
        return Fmt(width, max(2, math.ceil(math.log2(need)) + 1))


def requant(code: np.ndarray, frac_from: int, fmt: Fmt) -> np.ndarray:
    """`code` (int64, `frac_from` fraction bits) converted to `fmt` (round half up, saturate)."""
    code = np.asarray(code, dtype=np.int64)
    shift = frac_from - fmt.frac
    if shift > 0:
        code = (code + (1 << (shift - 1))) >> shift
    elif shift < 0:
        code = code << -shift
    return np.clip(code, fmt.lo, fmt.hi)


def quantize(x: np.ndarray, fmt: Fmt) -> np.ndarray:
    """Float values converted to `fmt` as `ap_fixed(double)` does (round half up, saturate)."""
    scaled = np.asarray(x, dtype=np.float64) * (2.0 ** fmt.frac)
    return np.clip(np.floor(scaled + 0.5), fmt.lo, fmt.hi).astype(np.int64)


def to_float(code: np.ndarray, fmt: Fmt) -> np.ndarray:
    return (np.asarray(code, dtype=np.float64) * 2.0 ** -fmt.frac).astype(np.float32)


def trunc_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Integer division rounding towards zero (C's `/` on int64; `den` > 0)."""
    num, den = np.asarray(num, dtype=np.int64), np.asarray(den, dtype=np.int64)
    return np.sign(num) * (np.abs(num) // den)


def isqrt(v: np.ndarray) -> np.ndarray:
    """floor(sqrt(v)) of non-negative int64 values (mocompile_hls.h's bit-serial isqrt)."""
    flat = np.asarray(v, dtype=np.int64).reshape(-1)
    return np.array([math.isqrt(int(x)) for x in flat], dtype=np.int64).reshape(np.shape(v))


LUT_FRAC = 16  # fraction bits of every table's entries


@dataclass(frozen=True)
class Lut:
    """f tabulated at lo + i * 2**-step_bits (i = 0..size, and size + 1 = size), entries with LUT_FRAC fraction
    bits; between entries linear interpolation on the input's remaining bits, outside the
    range the end entries."""

    name: str
    lo: int
    size: int
    step_bits: int
    fn: Callable[[np.ndarray], np.ndarray]

    def table(self) -> np.ndarray:
        x = self.lo + np.arange(self.size + 1, dtype=np.float64) * 2.0 ** -self.step_bits
        t = np.floor(self.fn(x) * 2.0 ** LUT_FRAC + 0.5).astype(np.int64)
        return np.append(t, t[-1])  # entry size + 1 repeats the last: the top end interpolates to it

    def __call__(self, code: np.ndarray, frac: int) -> np.ndarray:
        """f(code / 2**frac) with LUT_FRAC fraction bits."""
        t = self.table()
        u = np.asarray(code, dtype=np.int64) - (self.lo << frac)
        shift = frac - self.step_bits
        if shift >= 0:
            u = np.clip(u, 0, self.size << shift)
            i, r = u >> shift, u & ((1 << shift) - 1)
            return t[i] + (((t[i + 1] - t[i]) * r) >> shift)
        u = np.clip(u << -shift, 0, self.size)
        return t[u]


EXP = Lut("exp", -16, 1024, 6, np.exp)  # exp on [-16, 0]: softmax of x - max(x)
SIGMOID = Lut("sigmoid", -16, 2048, 6, lambda x: 1.0 / (1.0 + np.exp(-x)))  # on [-16, 16]
LUTS = (EXP, SIGMOID)
