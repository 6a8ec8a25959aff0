"""FPGA kernels of the per-element ops and RMSNorm: `add`, `mul` (exact in ap_fixed, rounded
once to the output), `sigmoid` (its table), `rmsnorm` (mocompile_hls.h's integer square
root and one division per row)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mocompile.backends.fpga.design import Design, Tensor
from mocompile.backends.fpga.lowerings import FpgaKernel, register_kernel
from mocompile.backends.fpga.fixed import LUT_FRAC, SIGMOID, Fmt, isqrt, requant
from mocompile.ir.graph import Node

NORM_WIDTH = 24  # bits of x / rms before the gain multiplies it
INV_WIDTH = 32  # bits of the unsigned inverse RMS


def _size(v: Any) -> int:
    return int(v.type.shape[-1])


def _index(v: Any, out: Any) -> str:
    return "0" if _size(v) == 1 and _size(out) != 1 else "i"


def _refuse_broadcast(node: Node) -> str | None:
    a, b = node.inputs
    out = node.outputs[0]
    ok = all(len(v.type.shape) == len(out.type.shape) and v.type.shape[:-1] == out.type.shape[:-1]
             and _size(v) in (1, _size(out)) for v in (a, b))
    if not ok:
        return f"{node.op} at {node.loc or '?'}: the fpga target broadcasts only a last axis of size 1 " \
               f"({a.type} and {b.type})"
    return None


def _binary(node: Node, xs: list[Tensor], design: Design) -> list[Tensor]:
    (a, af), (b, bf) = xs
    out = design.fmt(node.outputs[0])
    if node.op == "mul":
        return [(requant(a * b, af.frac + bf.frac, out), out)]
    f = max(af.frac, bf.frac)
    return [(requant((a << (f - af.frac)) + (b << (f - bf.frac)), f, out), out)]


def _binary_emit(node: Node, design: Design, cpp: Any) -> None:
    a, b = node.inputs
    y = node.outputs[0]
    sign = "*" if node.op == "mul" else "+"
    cpp.line(f"for (int i = 0; i < {_size(y)}; i++) {cpp.v(y)}[i] = "
             f"{cpp.v(a)}[{_index(a, y)}] {sign} {cpp.v(b)}[{_index(b, y)}];")


def _sigmoid(node: Node, xs: list[Tensor], design: Design) -> list[Tensor]:
    (x, xf), out = xs[0], design.fmt(node.outputs[0])
    return [(requant(SIGMOID(x, xf.frac), LUT_FRAC, out), out)]


def _sigmoid_emit(node: Node, design: Design, cpp: Any) -> None:
    x, y = node.inputs[0], node.outputs[0]
    cpp.line(f"for (int i = 0; i < {_size(y)}; i++) {cpp.v(y)}[i] = mc::requant<{cpp.t(y)}>(mc::lut_eval("
             f"mc::code_of({cpp.v(x)}[i]), {design.fmt(x).frac}, {cpp.lut(SIGMOID)}, {SIGMOID.lo}, {SIGMOID.size}, "
             f"{SIGMOID.step_bits}), {LUT_FRAC});")


# ---- rmsnorm ---------------------------------------------------------------------------------
def norm_constants(node: Node, design: Design) -> tuple[int, int]:
    """(eps with 2 fx fraction bits, sqrt(n) with 16), the integers rmsnorm is built with."""
    fx, n = design.fmt(node.inputs[0]).frac, _size(node.inputs[0])
    return math.floor(node.attrs["eps"] * 2.0 ** (2 * fx) + 0.5), math.floor(math.sqrt(n) * 2.0 ** 16 + 0.5)


def _norm_formats(node: Node, design: Design) -> dict[str, Fmt]:
    n = _size(node.inputs[0])
    inv_int = max(1, math.ceil(math.log2(1.0 / math.sqrt(node.attrs["eps"])))) + 1
    return {"norm": Fmt(NORM_WIDTH, math.ceil(math.log2(math.sqrt(n))) + 2), "inv": Fmt(INV_WIDTH, inv_int)}


def _rmsnorm(node: Node, xs: list[Tensor], design: Design) -> list[Tensor]:
    (x, xf) = xs[0]
    g, gf = design.codes(node.inputs[1]), design.wfmt(node.inputs[1])
    nt, inv_f, out = design.inner(node, "norm"), design.inner(node, "inv"), design.fmt(node.outputs[0])
    eps, sqrt_n = norm_constants(node, design)
    n = x.shape[-1]
    v = (x * x).sum(-1) + n * eps
    s = np.maximum(isqrt(v << 16), 1)
    sh = xf.frac + inv_f.frac + 8 - 16
    num = sqrt_n << sh if sh >= 0 else sqrt_n >> -sh
    inv = np.minimum(num // s, (1 << INV_WIDTH) - 1)[..., None]
    y = requant(x * inv, xf.frac + inv_f.frac, nt)
    return [(requant(y * g, nt.frac + gf.frac, out), out)]


def _rmsnorm_emit(node: Node, design: Design, cpp: Any) -> None:
    x, g = node.inputs
    y = node.outputs[0]
    nt, inv_f = design.inner(node, "norm"), design.inner(node, "inv")
    eps, sqrt_n = norm_constants(node, design)
    cpp.line(f"mc::rmsnorm<{cpp.t(x)}, {cpp.wt(g)}, {nt.cpp()}, ap_ufixed<{inv_f.width}, {inv_f.integer}>, {cpp.t(y)}, "
             f"{_size(x)}>({cpp.v(x)}, {cpp.w(g)}, {cpp.v(y)}, {eps}LL, {sqrt_n}LL);")


def _refuse_norm(node: Node) -> str | None:
    if node.attrs.get("group") is not None:
        return f"rmsnorm at {node.loc or '?'}: grouped (per-head) RMSNorm has no fpga kernel"
    return None


def _norm_extra(node: Node, design: Design) -> tuple[int, int, int, int]:
    """Two passes over the row, a 32-step square root and a 64-bit division."""
    return 2 * _size(node.inputs[0]) + 32 + 64, 3, 64 * 64 + 500, 0


def _elementwise_extra(node: Node, design: Design) -> tuple[int, int, int, int]:
    return _size(node.outputs[0]), 1 if node.op == "mul" else 0, 2 * design.fmt(node.outputs[0]).width, 0


register_kernel(FpgaKernel("add", _binary, _binary_emit, extra=_elementwise_extra, refuse=_refuse_broadcast))
register_kernel(FpgaKernel("mul", _binary, _binary_emit, extra=_elementwise_extra, refuse=_refuse_broadcast))
register_kernel(FpgaKernel("sigmoid", _sigmoid, _sigmoid_emit, extra=_elementwise_extra))
register_kernel(FpgaKernel("rmsnorm", _rmsnorm, _rmsnorm_emit, formats=_norm_formats, extra=_norm_extra,
                           refuse=_refuse_norm))
