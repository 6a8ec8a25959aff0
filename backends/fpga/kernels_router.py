"""The FPGA kernel of the top-k router (`router.topk`): the logits are an hls4ml dense
product; the rest is mocompile_hls.h's `route`, sort-free: scores through the exp or sigmoid
table, optional score bias and group-limited routing, then top_k rounds of argmax, the
chosen scores renormalised by an integer division and scaled by routed_scale. A token of a
multimodal model is routed among its modality's experts only."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mocompile.backends.fpga.design import Design, DenseUnit, Tensor
from mocompile.backends.fpga.lowerings import FpgaKernel, register_kernel
from mocompile.backends.fpga.fixed import EXP, LUT_FRAC, SIGMOID, requant
from mocompile.backends.fpga.kernels_dense import dense, dense_config
from mocompile.ir.graph import Node
from mocompile.ir.ops.moe import router_inputs

SCALE_FRAC = 12  # fraction bits of routed_scale
NEG_INF = -(1 << 62)


def scale_code(node: Node) -> int:
    return math.floor(node.attrs["routed_scale"] * 2.0 ** SCALE_FRAC + 0.5)


def bias_codes(node: Node, design: Design) -> np.ndarray | None:
    given = dict(zip(router_inputs(node.attrs), node.inputs))
    if "score_bias" not in given:
        return None
    b = design.weight(given["score_bias"])
    return np.floor(b.astype(np.float64) * 2.0 ** LUT_FRAC + 0.5).astype(np.int64)


def _first_largest(score: np.ndarray, k: int) -> np.ndarray:
    """k rounds of argmax (the first largest not yet taken) = a stable descending sort's first k."""
    return np.argsort(-score, axis=-1, kind="stable")[:, :k]


def _allowed(node: Node, xs: list[Tensor], tokens: int, experts: int) -> np.ndarray:
    """[tokens, experts]: the experts each token may use (its modality's group, else all)."""
    allowed = np.ones((tokens, experts), dtype=bool)
    if node.attrs["groups"]:
        mods = dict(zip(router_inputs(node.attrs), xs))["modality_ids"][0].reshape(-1)
        for mod, start, end in node.attrs["groups"]:
            rows = mods == mod
            allowed[rows] = False
            allowed[np.ix_(rows, np.arange(start, end))] = True
    return allowed


def _emulate(node: Node, xs: list[Tensor], design: Design) -> list[Tensor]:
    x = xs[0]
    a = node.attrs
    w = node.inputs[1]
    lg_f, out_f = design.inner(node, "logits"), design.fmt(node.outputs[0])
    logits = dense(x, design.codes(w), design.wfmt(w), lg_f)
    lead = logits.shape[:-1]
    lg = logits.reshape(-1, logits.shape[-1])
    t, e = lg.shape
    allowed = _allowed(node, xs, t, e)
    if a["scoring"] == "softmax":
        m = np.where(allowed, lg, np.iinfo(np.int64).min).max(-1, keepdims=True)
        ex = np.where(allowed, EXP(lg - m, lg_f.frac), 0)
        score = (ex << LUT_FRAC) // ex.sum(-1, keepdims=True)
    else:
        score = np.where(allowed, SIGMOID(lg, lg_f.frac), 0)
    bias = bias_codes(node, design)
    choice = score + (0 if bias is None else bias)
    if a["n_group"] > 1:
        grouped = choice.reshape(t, a["n_group"], -1)
        top = np.sort(grouped, axis=-1)
        gscore = top[..., -2:].sum(-1) if a["group_score"] == "top2_sum" and grouped.shape[-1] > 1 else top[..., -1]
        keep = _first_largest(gscore, a["topk_group"])
        mask = np.zeros((t, a["n_group"]), dtype=bool)
        np.put_along_axis(mask, keep, True, axis=-1)
        choice = np.where(np.repeat(mask, e // a["n_group"], axis=-1), choice, 0 if bias is None else NEG_INF)
    idx = _first_largest(np.where(allowed, choice, NEG_INF), a["top_k"])
    wts = np.take_along_axis(score, idx, axis=-1) * scale_code(node)
    if a["normalize"]:
        den = np.maximum(np.take_along_axis(score, idx, axis=-1).sum(-1, keepdims=True), 1)
        wts = (wts << LUT_FRAC) // den
    weights = requant(wts, LUT_FRAC + SCALE_FRAC, out_f)
    return [(weights.reshape(*lead, -1), out_f), (idx.reshape(*lead, -1).astype(np.int64), None)]


def _internals(node: Node, xs: list[np.ndarray]) -> dict[str, float]:
    return {"logits": float(np.abs(xs[0].reshape(-1, xs[0].shape[-1]) @ xs[1].T).max())}


def _emit(node: Node, design: Design, cpp: Any) -> None:
    x, w = node.inputs[:2]
    wts, idx = node.outputs
    a = node.attrs
    key = cpp.name(wts)
    e, h = w.type.shape
    lg_f = design.inner(node, "logits")
    dense_cfg = dense_config(cpp, f"{key}__logits", h, e, design.fmt(x), design.wfmt(w), design.rf(f"{key}__logits", h))
    zero = cpp.array(f"B_{key}__logits", f"{dense_cfg}::bias_t", np.zeros(e, np.int64), 64, 0)
    bias = bias_codes(node, design)
    bias_arr = "0" if bias is None else cpp.array(f"SB_{key}", "int32_t", bias, 32)
    cpp.decl(f"""struct cfg_{key} {{
    static const int experts = {e}, top_k = {a['top_k']}, n_group = {a['n_group']}, topk_group = {a['topk_group']};
    static const bool softmax = {str(a['scoring'] == 'softmax').lower()}, normalize = {str(a['normalize']).lower()};
    static const bool has_bias = {str(bias is not None).lower()}, top2_sum = {str(a['group_score'] == 'top2_sum').lower()};
    static const int64_t scale_code = {scale_code(node)}LL;
    static const int exp_lo = {EXP.lo}, exp_size = {EXP.size}, exp_step = {EXP.step_bits};
    static const int sig_lo = {SIGMOID.lo}, sig_size = {SIGMOID.size}, sig_step = {SIGMOID.step_bits};
}};""")
    cpp.line(f"{lg_f.cpp()} logits_{key}[{e}];")
    cpp.line(f"nnet::dense<{cpp.t(x)}, {lg_f.cpp()}, {dense_cfg}>({cpp.v(x)}, logits_{key}, {cpp.w(w)}, {zero});")
    cpp.line(f"int lo_{key} = 0, hi_{key} = {e};")
    if a["groups"]:
        mods = cpp.v(dict(zip(router_inputs(a), node.inputs))["modality_ids"])
        for mod, start, end in a["groups"]:
            cpp.line(f"if ({mods}[0] == {mod}) {{ lo_{key} = {start}; hi_{key} = {end}; }}")
    cpp.line(f"mc::route<cfg_{key}, {lg_f.cpp()}, {cpp.t(wts)}>(logits_{key}, {bias_arr}, {cpp.lut(EXP)}, "
             f"{cpp.lut(SIGMOID)}, lo_{key}, hi_{key}, {cpp.v(wts)}, {cpp.v(idx)});")


def _units(node: Node, design: Design) -> list[DenseUnit]:
    x, w = node.inputs[:2]
    e, h = w.type.shape
    return [DenseUnit(f"{node.outputs[0].name}__logits", h, e, design.fmt(x), design.wfmt(w), e * h, 1, "dense")]


def _extra(node: Node, design: Design) -> tuple[int, int, int, int]:
    """Scores (one expert a cycle), the group pass, k + topk_group argmax rounds, k divisions."""
    a = node.attrs
    e = node.inputs[1].type.shape[0]
    cycles = 3 * e + (a["topk_group"] * a["n_group"] + e if a["n_group"] > 1 else 0) + a["top_k"] * (e + 64)
    return cycles, 1, 64 * 64 + 40 * e + 800, 0


def _refuse(node: Node) -> str | None:
    a = node.attrs
    if a["routing"] != "token_choice" or a["capacity_factor"] is not None:
        return f"router.topk at {node.loc or '?'}: the fpga target routes each token on its own (token_choice " \
               "without capacity)"
    return None


register_kernel(FpgaKernel("router.topk", _emulate, _emit, internals=_internals, units=_units, extra=_extra,
                           refuse=_refuse))
