"""The FPGA kernel of causal grouped-query attention with rotary positions, one position at
a time over a KV cache (mocompile_hls.h's `attention_step`): the position's rotated key and
its value go into the cache, each query head scores cache rows 0..pos, softmax through the
exp table and one division per output. The emulation here computes every position of a
sequence at once with exactly those integer steps."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mocompile.backends.fpga.design import Design, FpgaKernel, Tensor, register_kernel
from mocompile.backends.fpga.fixed import EXP, Fmt, requant, trunc_div
from mocompile.ir.graph import Node
from mocompile.ir.ops.attention import apply_rope, rope_tables

ROPE = Fmt(16, 2)  # cos/sin table entries
SCALE_FRAC = 16  # fraction bits of 1/sqrt(head_dim)


def rope_codes(head_dim: int, theta: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [positions, head_dim / 2] as ROPE codes (the reference's frequencies)."""
    cos, sin = rope_tables(np.arange(positions), head_dim, theta)
    half = head_dim // 2
    q = lambda t: np.floor(t[:, :half].astype(np.float64) * 2.0 ** ROPE.frac + 0.5).astype(np.int64)  # noqa: E731
    return q(cos), q(sin)


def scale_code(head_dim: int) -> int:
    return math.floor(2.0 ** SCALE_FRAC / math.sqrt(head_dim) + 0.5)


def _rotate(x: np.ndarray, xf: Fmt, cos: np.ndarray, sin: np.ndarray, out: Fmt, rope: bool) -> np.ndarray:
    """x [b, s, heads, d] rotated at positions 0..s-1 (rope_at in mocompile_hls.h)."""
    if not rope:
        return requant(x, xf.frac, out)
    half = x.shape[-1] // 2
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    r = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return requant(r, xf.frac + ROPE.frac, out)


def _emulate(node: Node, xs: list[Tensor], design: Design) -> list[Tensor]:
    (q, qf), (k, kf), (v, vf) = xs
    h, hkv, d = node.attrs["heads"], node.attrs["kv_heads"], node.attrs["head_dim"]
    qr_f, kr_f, sc_f = (design.inner(node, r) for r in ("qr", "kr", "score"))
    out_f = design.fmt(node.outputs[0])
    b, s = q.shape[:2]
    rope = node.attrs["rope_theta"] > 0
    cos, sin = rope_codes(d, node.attrs["rope_theta"], s) if rope else (None, None)
    qr = _rotate(q.reshape(b, s, h, d), qf, cos, sin, qr_f, rope)
    kr = _rotate(k.reshape(b, s, hkv, d), kf, cos, sin, kr_f, rope)
    vv = v.reshape(b, s, hkv, d)
    seen = np.tril(np.ones((s, s), dtype=bool))
    out = np.zeros((b, s, h, d), np.int64)
    for bi in range(b):
        for hi in range(h):
            g = hi // (h // hkv)
            acc = qr[bi, :, hi] @ kr[bi, :, g].T
            sc = requant(acc * scale_code(d), qr_f.frac + kr_f.frac + SCALE_FRAC, sc_f)
            m = np.where(seen, sc, np.iinfo(np.int64).min).max(-1, keepdims=True)
            e = np.where(seen, EXP(sc - m, sc_f.frac), 0)
            num = e @ vv[bi, :, g]
            out[bi, :, hi] = requant(trunc_div(num * 256, e.sum(-1, keepdims=True)), vf.frac + 8, out_f)
    return [(out.reshape(b, s, h * d), out_f)]


def _internals(node: Node, xs: list[np.ndarray]) -> dict[str, float]:
    q, k, _ = xs
    h, hkv, d = node.attrs["heads"], node.attrs["kv_heads"], node.attrs["head_dim"]
    b, s = q.shape[:2]
    qh = q.reshape(b, s, h, d).transpose(0, 2, 1, 3)
    kh = k.reshape(b, s, hkv, d).transpose(0, 2, 1, 3)
    if node.attrs["rope_theta"] > 0:
        cos, sin = rope_tables(np.arange(s), d, node.attrs["rope_theta"])
        qh, kh = apply_rope(qh, cos, sin), apply_rope(kh, cos, sin)
    kr = np.repeat(kh, h // hkv, axis=1)
    scores = np.where(np.tril(np.ones((s, s), dtype=bool)), qh @ kr.transpose(0, 1, 3, 2) / np.sqrt(d), 0)
    return {"qr": float(np.abs(qh).max()), "kr": float(np.abs(kh).max()), "score": float(np.abs(scores).max())}


def _config(node: Node, design: Design, cpp: Any) -> str:
    name = f"cfg_{cpp.name(node.outputs[0])}"
    a = node.attrs
    cpp.decl(f"""struct {name} {{
    static const int heads = {a['heads']}, kv_heads = {a['kv_heads']}, head_dim = {a['head_dim']};
    static const int capacity = {cpp.capacity};
    static const bool rope = {str(a['rope_theta'] > 0).lower()};
    static const int64_t scale_code = {scale_code(a['head_dim'])}LL;
    static const int exp_lo = {EXP.lo}, exp_size = {EXP.size}, exp_step = {EXP.step_bits};
    typedef {design.inner(node, 'qr').cpp()} qr_t;
    typedef {design.inner(node, 'kr').cpp()} kr_t;
    typedef {design.inner(node, 'score').cpp()} score_t;
    typedef {ROPE.cpp()} rope_t;
}};""")
    return name


def _emit(node: Node, design: Design, cpp: Any) -> None:
    q, k, v = node.inputs
    y = node.outputs[0]
    a = node.attrs
    cfg = _config(node, design, cpp)
    width = a["kv_heads"] * a["head_dim"]
    kc = cpp.cache(f"kcache_{cpp.name(y)}", f"{cfg}::kr_t", design.inner(node, "kr"), width)
    vc = cpp.cache(f"vcache_{cpp.name(y)}", cpp.t(v), design.fmt(v), width)
    if a["rope_theta"] > 0:
        cos, sin = rope_codes(a["head_dim"], a["rope_theta"], cpp.capacity)
        tables = (cpp.array(f"ROPE_COS_{cpp.name(y)}", "int16_t", cos, 16),
                  cpp.array(f"ROPE_SIN_{cpp.name(y)}", "int16_t", sin, 16))
    else:
        tables = ("0", "0")
    cpp.line(f"mc::attention_step<{cfg}, {cpp.t(q)}, {cpp.t(k)}, {cpp.t(v)}, {cpp.t(y)}>({cpp.v(q)}, {cpp.v(k)}, "
             f"{cpp.v(v)}, pos, {kc}, {vc}, {cpp.v(y)}, {tables[0]}, {tables[1]}, {cpp.lut(EXP)});")


def _formats(node: Node, design: Design) -> dict[str, Fmt]:
    return {}


def _refuse(node: Node) -> str | None:
    if not node.attrs["causal"]:
        return f"attention at {node.loc or '?'}: the fpga target decodes causal attention only"
    return None


def attention_cycles(node: Node, positions: int) -> int:
    """Cycles of one position at cache length `positions`: per head a score and a value pass
    over the cache (one row a cycle), the key/value write and the query rotation."""
    a = node.attrs
    return a["heads"] * (2 * positions + 2 * a["head_dim"]) + a["kv_heads"] * a["head_dim"]


def _extra(node: Node, design: Design) -> tuple[int, int, int, int]:
    a = node.attrs
    d = a["head_dim"]
    luts = d * 2 * 48 + 64 * 64 + 1500  # a head_dim-wide multiply-add tree for q.k and e*v, the divider
    return attention_cycles(node, design.graph.meta.get("max_seq") or 1), 2 * d + 4, luts, 0


register_kernel(FpgaKernel("attention", _emulate, _emit, internals=_internals, formats=_formats, extra=_extra,
                           refuse=_refuse))
