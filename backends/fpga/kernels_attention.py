"""The FPGA kernels of causal attention, one position at a time over a KV cache:
grouped-query attention with rotary positions (mocompile_hls.h's `attention_step`) and
multi-head latent attention (`mla_step`). The position's keys and values go into the caches,
each query head scores cache rows 0..pos, softmax through the exp table and one division per
output. The emulations here compute every position of a sequence at once with exactly those
integer steps."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mocompile.backends.fpga.design import Design, Tensor
from mocompile.backends.fpga.lowerings import FpgaKernel, register_kernel
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
    out = np.zeros((b, s, h, d), np.int64)
    for bi in range(b):
        for hi in range(h):
            g = hi // (h // hkv)
            sc = requant((qr[bi, :, hi] @ kr[bi, :, g].T) * scale_code(d), qr_f.frac + kr_f.frac + SCALE_FRAC, sc_f)
            out[bi, :, hi] = softmax_values(sc, sc_f, vv[bi, :, g], vf, out_f)
    return [(out.reshape(b, s, h * d), out_f)]


def softmax_values(sc: np.ndarray, sc_f: Fmt, v: np.ndarray, vf: Fmt, out_f: Fmt) -> np.ndarray:
    """mocompile_hls.h's softmax_values for every query row of causal scores sc [s, s] at once."""
    seen = np.tril(np.ones(sc.shape, dtype=bool))
    m = np.where(seen, sc, np.iinfo(np.int64).min).max(-1, keepdims=True)
    e = np.where(seen, EXP(sc - m, sc_f.frac), 0)
    return requant(trunc_div((e @ v) * 256, e.sum(-1, keepdims=True)), vf.frac + 8, out_f)


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
{_score_types(node, design)}
}};""")
    return name


def _score_types(node: Node, design: Design) -> str:
    """The config lines every attention kernel has: its exp table and its inner formats."""
    return "\n".join([f"    static const int exp_lo = {EXP.lo}, exp_size = {EXP.size}, exp_step = {EXP.step_bits};",
                      *(f"    typedef {design.inner(node, role).cpp()} {role}_t;" for role in ("qr", "kr", "score")),
                      f"    typedef {ROPE.cpp()} rope_t;"])


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


def _refuse(node: Node) -> str | None:
    if not node.attrs["causal"]:
        return f"attention at {node.loc or '?'}: the fpga target decodes causal attention only"
    return None


def _dims(node: Node) -> tuple[int, int, int, int]:
    """(heads, key dim, value dim, values written to the caches per position)."""
    a = node.attrs
    if node.op == "attention.mla":
        return a["heads"], a["nope_dim"] + a["rope_dim"], a["v_dim"], a["heads"] * (a["nope_dim"] + a["v_dim"]) + \
            a["rope_dim"]
    return a["heads"], a["head_dim"], a["head_dim"], 2 * a["kv_heads"] * a["head_dim"]


def attention_cycles(node: Node, positions: int) -> int:
    """Cycles of one position at cache length `positions`: per head a score and a value pass
    over the cache (one row a cycle) and the query rotation, and the cache writes."""
    h, dk, dv, written = _dims(node)
    return h * (2 * positions + dk + dv) + written


def _extra(node: Node, design: Design) -> tuple[int, int, int, int]:
    h, dk, dv, _ = _dims(node)
    luts = (dk + dv) * 48 + 64 * 64 + 1500  # multiply-add trees for q.k and e*v, the divider
    return attention_cycles(node, 1), dk + dv + 4, luts, 0


def _memories(node: Node, design: Design, positions: int) -> list[tuple[str, int, int]]:
    a, name = node.attrs, node.outputs[0].name
    kr, v = design.inner(node, "kr").width, design.fmt(node.inputs[2]).width
    if node.op == "attention.mla":
        return [(f"kncache_{name}", positions * a["heads"], a["nope_dim"] * kr),
                (f"krcache_{name}", positions, a["rope_dim"] * kr),
                (f"vcache_{name}", positions * a["heads"], a["v_dim"] * v)]
    return [(f"kcache_{name}", positions * a["kv_heads"], a["head_dim"] * kr),
            (f"vcache_{name}", positions * a["kv_heads"], a["head_dim"] * v)]


# ---- multi-head latent attention -----------------------------------------------------------
def _mla_emulate(node: Node, xs: list[Tensor], design: Design) -> list[Tensor]:
    (q, qf), (kn, knf), (v, vf), (kr, krf) = xs
    a = node.attrs
    h, dn, dr, dv = a["heads"], a["nope_dim"], a["rope_dim"], a["v_dim"]
    qr_f, kr_f, sc_f = (design.inner(node, r) for r in ("qr", "kr", "score"))
    out_f = design.fmt(node.outputs[0])
    b, s = q.shape[:2]
    cos, sin = rope_codes(dr, a["rope_theta"], s)
    qh = q.reshape(b, s, h, dn + dr)
    qall = np.concatenate([requant(qh[..., :dn], qf.frac, qr_f), _rotate(qh[..., dn:], qf, cos, sin, qr_f, True)], -1)
    knc = requant(kn.reshape(b, s, h, dn), knf.frac, kr_f)
    krc = _rotate(kr.reshape(b, s, 1, dr), krf, cos, sin, kr_f, True)
    vv = v.reshape(b, s, h, dv)
    out = np.zeros((b, s, h, dv), np.int64)
    for bi in range(b):
        for hi in range(h):
            keys = np.concatenate([knc[bi, :, hi], krc[bi, :, 0]], -1)
            sc = requant((qall[bi, :, hi] @ keys.T) * scale_code(dn + dr), qr_f.frac + kr_f.frac + SCALE_FRAC, sc_f)
            out[bi, :, hi] = softmax_values(sc, sc_f, vv[bi, :, hi], vf, out_f)
    return [(out.reshape(b, s, h * dv), out_f)]


def _mla_internals(node: Node, xs: list[np.ndarray]) -> dict[str, float]:
    q, kn, _, kr = xs
    a = node.attrs
    h, dn, dr = a["heads"], a["nope_dim"], a["rope_dim"]
    b, s = q.shape[:2]
    cos, sin = rope_tables(np.arange(s), dr, a["rope_theta"])
    qh = q.reshape(b, s, h, dn + dr).transpose(0, 2, 1, 3)
    qall = np.concatenate([qh[..., :dn], apply_rope(qh[..., dn:], cos, sin)], -1)
    krot = apply_rope(kr.reshape(b, 1, s, dr), cos, sin)
    keys = np.concatenate([kn.reshape(b, s, h, dn).transpose(0, 2, 1, 3), np.broadcast_to(krot, (b, h, s, dr))], -1)
    scores = np.where(np.tril(np.ones((s, s), dtype=bool)), qall @ keys.transpose(0, 1, 3, 2) / np.sqrt(dn + dr), 0)
    return {"qr": float(np.abs(qall).max()), "kr": float(np.abs(keys).max()), "score": float(np.abs(scores).max())}


def _mla_emit(node: Node, design: Design, cpp: Any) -> None:
    q, kn, v, kr = node.inputs
    y = node.outputs[0]
    a = node.attrs
    name = f"cfg_{cpp.name(y)}"
    cpp.decl(f"""struct {name} {{
    static const int heads = {a['heads']}, nope_dim = {a['nope_dim']}, rope_dim = {a['rope_dim']}, v_dim = {a['v_dim']};
    static const int capacity = {cpp.capacity};
    static const int64_t scale_code = {scale_code(a['nope_dim'] + a['rope_dim'])}LL;
{_score_types(node, design)}
}};""")
    kr_f = design.inner(node, "kr")
    kn_c = cpp.cache(f"kncache_{cpp.name(y)}", f"{name}::kr_t", kr_f, a["heads"] * a["nope_dim"])
    kr_c = cpp.cache(f"krcache_{cpp.name(y)}", f"{name}::kr_t", kr_f, a["rope_dim"])
    v_c = cpp.cache(f"vcache_{cpp.name(y)}", cpp.t(v), design.fmt(v), a["heads"] * a["v_dim"])
    cos, sin = rope_codes(a["rope_dim"], a["rope_theta"], cpp.capacity)
    c, s = cpp.array(f"ROPE_COS_{cpp.name(y)}", "int16_t", cos, 16), cpp.array(f"ROPE_SIN_{cpp.name(y)}", "int16_t", sin, 16)
    cpp.line(f"mc::mla_step<{name}, {cpp.t(q)}, {cpp.t(kn)}, {cpp.t(v)}, {cpp.t(kr)}, {cpp.t(y)}>({cpp.v(q)}, "
             f"{cpp.v(kn)}, {cpp.v(v)}, {cpp.v(kr)}, pos, {kn_c}, {kr_c}, {v_c}, {cpp.v(y)}, {c}, {s}, {cpp.lut(EXP)});")


register_kernel(FpgaKernel("attention", _emulate, _emit, internals=_internals, extra=_extra, refuse=_refuse,
                           memories=_memories, position_cycles=attention_cycles))
register_kernel(FpgaKernel("attention.mla", _mla_emulate, _mla_emit, internals=_mla_internals, extra=_extra,
                           memories=_memories, position_cycles=attention_cycles))
