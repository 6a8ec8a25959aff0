"""FPGA kernels of the matrix products: `embedding` (a table read), `linear` (one hls4ml
dense), `mlp` (a gated or plain feed-forward block: hls4ml dense products around a silu
table) and `experts` (sparse dispatch: each token runs only its top_k experts, one after the
other, through one feed-forward unit whose weights hold every expert)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mocompile.backends.fpga.design import Design, DenseUnit, Tensor, accum_fmt, expands_low_bit
from mocompile.backends.fpga.lowerings import FpgaKernel, register_kernel
from mocompile.backends.fpga.fixed import LUT_FRAC, SIGMOID, Fmt, quantize, requant
from mocompile.ir.graph import Node
from mocompile.ir.ops.elementwise import silu


def dense(x: Tensor, w: np.ndarray, wf: Fmt, out: Fmt, bias: np.ndarray | None = None) -> np.ndarray:
    """hls4ml's dense in integers: exact products summed in an exact accumulator (which the
    bias, in the accumulator's format, starts from), rounded to `out`."""
    xc, xf = x
    acc = xc.reshape(-1, xc.shape[-1]) @ w.T
    if bias is not None:
        acc = acc + bias
    return requant(acc, xf.frac + wf.frac, out).reshape(*xc.shape[:-1], w.shape[0])


def ffn_codes(x: Tensor, gate: np.ndarray | None, up: np.ndarray, down: np.ndarray, node: Node,
              design: Design, out: Fmt) -> np.ndarray:
    """A feed-forward block as mocompile_hls.h's `ffn` computes it."""
    gw, uw, dw = (design.wfmt(v) for v in node.inputs[-3:]) if gate is not None else (None, *(
        design.wfmt(v) for v in node.inputs[-2:]))
    u_f, h_f = design.inner(node, "u"), design.inner(node, "h")
    u = dense(x, up, uw, u_f)
    if gate is not None:
        g_f = design.inner(node, "g")
        g = dense(x, gate, gw, g_f)
        a = requant(g * SIGMOID(g, g_f.frac), g_f.frac + LUT_FRAC, g_f)
        h = requant(a * u, g_f.frac + u_f.frac, h_f)
    else:
        h = requant(u * SIGMOID(u, u_f.frac), u_f.frac + LUT_FRAC, h_f)
    return dense((h, h_f), down, dw, out)


def _ffn_internals(x: np.ndarray, gate: np.ndarray | None, up: np.ndarray) -> dict[str, float]:
    u = x @ up.T
    out = {"u": float(np.abs(u).max())}
    if gate is not None:
        g = x @ gate.T
        out |= {"g": float(np.abs(g).max()), "h": float(np.abs(silu(g) * u).max())}
    else:
        out["h"] = float(np.abs(silu(u)).max())
    return out


def _refuse_ffn(node: Node) -> str | None:
    if node.attrs["activation"] != "silu":
        return f"{node.op} at {node.loc or '?'}: the fpga target has a silu table only (activation " \
               f"{node.attrs['activation']!r})"
    if node.attrs.get("hidden_quant"):
        return f"{node.op} at {node.loc or '?'}: W8A8 blocks (hidden_quant) have no fpga kernel"
    return None


# ---- C++ -------------------------------------------------------------------------------------
def dense_config(cpp: Any, key: str, n_in: int, n_out: int, x: Fmt, w: Fmt, rf: int) -> str:
    """An hls4ml dense config (resource strategy, reuse factor rf) declared in parameters.h."""
    name = f"cfg_{key}"
    acc = accum_fmt(x, w, n_in)
    cpp.decl(f"""struct {name} : nnet::dense_config {{
    static const unsigned n_in = {n_in};
    static const unsigned n_out = {n_out};
    static const unsigned io_type = nnet::io_parallel;
    static const unsigned strategy = nnet::resource;
    static const unsigned reuse_factor = {rf};
    static const unsigned n_zeros = 0;
    static const unsigned n_nonzeros = {n_in * n_out};
    static const unsigned multiplier_limit = DIV_ROUNDUP(n_in * n_out, reuse_factor);
    static const bool store_weights_in_bram = false;
    typedef {acc.cpp()} accum_t;
    typedef accum_t bias_t;
    typedef ap_fixed<{w.width}, {w.integer}> weight_t;
    template <class data_T, class res_T, class CONFIG_T>
    using kernel = nnet::{"DenseResource_rf_leq_nin" if rf <= n_in else "DenseResource_rf_gt_nin_rem0"}<data_T, res_T, CONFIG_T>;
    template <class x_T, class y_T> using product = nnet::product::mult<x_T, y_T>;
}};""")
    return name


def ffn_config(cpp: Any, node: Node, design: Design, x: Fmt, key: str) -> str:
    gated = node.attrs["gated"]
    gate, up, down = node.inputs[-3:] if gated else (None, *node.inputs[-2:])
    hidden, ffn = up.type.shape[-1], up.type.shape[-2]
    u_f, h_f = design.inner(node, "u"), design.inner(node, "h")
    g_f = design.inner(node, "g") if gated else u_f
    up_c = dense_config(cpp, f"{key}__up", hidden, ffn, x, design.wfmt(up), design.rf(f"{key}__up", hidden))
    gate_c = dense_config(cpp, f"{key}__gate", hidden, ffn, x, design.wfmt(gate), design.rf(f"{key}__gate", hidden)) \
        if gated else up_c
    down_c = dense_config(cpp, f"{key}__down", ffn, hidden, h_f, design.wfmt(down), design.rf(f"{key}__down", ffn))
    cpp.decl(f"""struct cfg_{key} {{
    static const int hidden = {hidden}, ffn = {ffn};
    static const bool gated = {str(gated).lower()};
    static const int sig_lo = {SIGMOID.lo}, sig_size = {SIGMOID.size}, sig_step = {SIGMOID.step_bits};
    typedef {g_f.cpp()} g_t;
    typedef {u_f.cpp()} u_t;
    typedef {h_f.cpp()} h_t;
    typedef {gate_c} gate_cfg;
    typedef {up_c} up_cfg;
    typedef {down_c} down_cfg;
}};""")
    return f"cfg_{key}"


# ---- embedding -------------------------------------------------------------------------------
def _embed_emulate(node: Node, xs: list[Tensor], design: Design) -> list[Tensor]:
    return [(design.codes(node.inputs[1])[xs[0][0]], design.fmt(node.outputs[0]))]


def _embed_emit(node: Node, design: Design, cpp: Any) -> None:
    ids, table = node.inputs
    h = table.type.shape[1]
    cpp.line(f"for (int i = 0; i < {h}; i++) {cpp.v(node.outputs[0])}[i] = {cpp.w(table)}[{cpp.v(ids)}[0] * {h} + i];")


def _embed_formats(node: Node, design: Design) -> dict[str, Fmt]:
    design.weight_fmts[design.param_name(node.inputs[1])] = design.fmt(node.outputs[0])  # read as it is stored
    return {}


# ---- linear ----------------------------------------------------------------------------------
def _bias_codes(node: Node, design: Design) -> np.ndarray:
    x, w = node.inputs[:2]
    acc = accum_fmt(design.fmt(x), design.wfmt(w), w.type.shape[1])
    if len(node.inputs) > 2:
        return quantize(design.weight(node.inputs[2]), acc)
    return np.zeros(w.type.shape[0], np.int64)


def _linear_emulate(node: Node, xs: list[Tensor], design: Design) -> list[Tensor]:
    w = node.inputs[1]
    return [(dense(xs[0], design.codes(w), design.wfmt(w), design.fmt(node.outputs[0]), _bias_codes(node, design)),
             design.fmt(node.outputs[0]))]


def _linear_emit(node: Node, design: Design, cpp: Any) -> None:
    x, w = node.inputs[:2]
    y = node.outputs[0]
    cfg = dense_config(cpp, cpp.name(y), w.type.shape[1], w.type.shape[0], design.fmt(x), design.wfmt(w),
                       design.rf(cpp.name(y), w.type.shape[1]))
    acc = accum_fmt(design.fmt(x), design.wfmt(w), w.type.shape[1])
    bias = cpp.array(f"B_{cpp.name(y)}", f"{cfg}::bias_t", _bias_codes(node, design), 64, acc.frac)
    cpp.line(f"nnet::dense<{cpp.t(x)}, {cpp.t(y)}, {cfg}>({cpp.v(x)}, {cpp.v(y)}, {cpp.w(w)}, {bias});")


def _linear_units(node: Node, design: Design) -> list[DenseUnit]:
    x, w = node.inputs[:2]
    n_out, n_in = w.type.shape
    return [DenseUnit(node.outputs[0].name, n_in, n_out, design.fmt(x), design.wfmt(w), n_in * n_out, 1, "dense")]


def _refuse_linear(node: Node) -> str | None:
    w = node.inputs[1]
    if len(w.type.shape) != 2 or (w.producer is not None and not expands_low_bit(w)):
        return f"linear at {node.loc or '?'}: the fpga target multiplies by stored weight matrices only"
    return None


# ---- mlp -------------------------------------------------------------------------------------
def _weights(node: Node, design: Design) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    ws = [design.codes(v) for v in node.inputs[-3:]] if node.attrs["gated"] else \
        [None, *(design.codes(v) for v in node.inputs[-2:])]
    return ws[0], ws[1], ws[2]


def _mlp_emulate(node: Node, xs: list[Tensor], design: Design) -> list[Tensor]:
    out = design.fmt(node.outputs[0])
    return [(ffn_codes(xs[0], *_weights(node, design), node, design, out), out)]


def _mlp_internals(node: Node, xs: list[np.ndarray]) -> dict[str, float]:
    x = xs[0].reshape(-1, xs[0].shape[-1])
    return _ffn_internals(x, xs[1] if node.attrs["gated"] else None, xs[-2])


def _mlp_emit(node: Node, design: Design, cpp: Any) -> None:
    x, y = node.inputs[0], node.outputs[0]
    cfg = ffn_config(cpp, node, design, design.fmt(x), cpp.name(y))
    gate = cpp.w(node.inputs[1]) if node.attrs["gated"] else "0"
    cpp.line(f"mc::ffn<{cfg}, {cpp.t(x)}, {cpp.t(y)}>({cpp.v(x)}, {gate}, {cpp.w(node.inputs[-2])}, "
             f"{cpp.w(node.inputs[-1])}, {cpp.v(y)}, {cpp.lut(SIGMOID)});")


def ffn_units(node: Node, design: Design, key: str, experts: int, calls: int, role: str) -> list[DenseUnit]:
    gated = node.attrs["gated"]
    gate, up, down = node.inputs[-3:] if gated else (None, *node.inputs[-2:])
    ffn, hidden = up.type.shape[-2:]
    x = design.fmt(node.inputs[0])
    units = [DenseUnit(f"{key}__up", hidden, ffn, x, design.wfmt(up), experts * hidden * ffn, calls, role),
             DenseUnit(f"{key}__down", ffn, hidden, design.inner(node, "h"), design.wfmt(down), experts * hidden * ffn,
                       calls, role)]
    if gated:
        units.insert(0, DenseUnit(f"{key}__gate", hidden, ffn, x, design.wfmt(gate), experts * hidden * ffn, calls, role))
    return units


def _mlp_units(node: Node, design: Design) -> list[DenseUnit]:
    return ffn_units(node, design, node.outputs[0].name, 1, 1, "dense")


def _ffn_extra(node: Node, design: Design) -> tuple[int, int, int, int]:
    """The silu loop (one element a cycle) and its sigmoid table (shared ROM)."""
    ffn = node.inputs[-2].type.shape[-2]
    return ffn, 1, 300, 0


# ---- experts ---------------------------------------------------------------------------------
def _experts_emulate(node: Node, xs: list[Tensor], design: Design) -> list[Tensor]:
    (xc, xf), (wc, wf), (idx, _) = xs[:3]
    gate, up, down = _weights(node, design)
    y_f, out = design.inner(node, "y"), design.fmt(node.outputs[0])
    rows, lead = xc.reshape(-1, xc.shape[-1]), xc.shape[:-1]
    flat_w, flat_i = wc.reshape(-1, wc.shape[-1]), idx.reshape(-1, idx.shape[-1])
    comb = np.zeros(rows.shape, np.int64)
    for e in np.unique(flat_i):
        tok, slot = np.nonzero(flat_i == e)
        y = ffn_codes((rows[tok], xf), None if gate is None else gate[e], up[e], down[e], node, design, y_f)
        np.add.at(comb, tok, y * flat_w[tok, slot][:, None])
    return [(requant(comb, wf.frac + y_f.frac, out).reshape(*lead, -1), out)]


def _experts_internals(node: Node, xs: list[np.ndarray]) -> dict[str, float]:
    x = xs[0].reshape(-1, xs[0].shape[-1])
    gate, up, down = (xs[3], xs[4], xs[5]) if node.attrs["gated"] else (None, xs[3], xs[4])
    stats: dict[str, float] = {}
    for e in range(up.shape[0]):
        found = _ffn_internals(x, None if gate is None else gate[e], up[e])
        h = silu(x @ gate[e].T) * (x @ up[e].T) if gate is not None else silu(x @ up[e].T)
        found["y"] = float(np.abs(h @ down[e].T).max())
        stats = {k: max(v, stats.get(k, 0.0)) for k, v in found.items()}
    return stats


def _experts_emit(node: Node, design: Design, cpp: Any) -> None:
    x, w, idx = node.inputs[:3]
    y = node.outputs[0]
    key = cpp.name(y)
    cfg = ffn_config(cpp, node, design, design.fmt(x), key)
    up = node.inputs[-2]
    f, h = up.type.shape[-2:]
    y_f, w_f = design.inner(node, "y"), design.fmt(w)
    comb = accum_fmt(w_f, y_f, node.inputs[1].type.shape[-1])
    gate = f"&{cpp.w(node.inputs[3])}[e * {f * h}]" if node.attrs["gated"] else "0"
    cpp.line(f"""{{  // sparse dispatch: only the token's top_k experts run, through one ffn unit
        {comb.cpp()} comb[{h}];
        for (int i = 0; i < {h}; i++) comb[i] = 0;
        for (int j = 0; j < {w.type.shape[-1]}; j++) {{
            const int e = {cpp.v(idx)}[j];
            {y_f.cpp()} ye[{h}];
            mc::ffn<{cfg}, {cpp.t(x)}, {y_f.cpp()}>({cpp.v(x)}, {gate}, &{cpp.w(up)}[e * {f * h}],
                &{cpp.w(node.inputs[-1])}[e * {f * h}], ye, {cpp.lut(SIGMOID)});
            for (int i = 0; i < {h}; i++) comb[i] += {cpp.v(w)}[j] * ye[i];
        }}
        for (int i = 0; i < {h}; i++) {cpp.v(y)}[i] = comb[i];
    }}""")


def _experts_units(node: Node, design: Design) -> list[DenseUnit]:
    experts, k = node.inputs[-1].type.shape[0], node.inputs[1].type.shape[-1]
    return ffn_units(node, design, node.outputs[0].name, experts, k, "experts")


def _experts_extra(node: Node, design: Design) -> tuple[int, int, int, int]:
    k, h = node.inputs[1].type.shape[-1], node.inputs[0].type.shape[-1]
    ffn = node.inputs[-2].type.shape[-2]
    return k * (ffn + h), 1 + h, 600, 0


def _embed_memories(node: Node, design: Design, positions: int) -> list[tuple[str, int, int]]:
    rows, h = node.inputs[1].type.shape
    return [(f"table_{node.outputs[0].name}", rows * h, design.fmt(node.outputs[0]).width)]


def _embed_extra(node: Node, design: Design) -> tuple[int, int, int, int]:
    """One row read, a value a cycle."""
    return node.inputs[1].type.shape[1], 0, 50, 0


# ---- low-bit weights (the quantize pass's dequantize) -----------------------------------------
def _expansion(node: Node, xs: list[Tensor], design: Design) -> list[Tensor]:
    """Nothing per position: the kernels reading this weight read its stored values."""
    return [(np.empty(0, np.int64), None)]


def _expansion_emit(node: Node, design: Design, cpp: Any) -> None:
    v = node.outputs[0]
    cpp.line(f"// {v.name}: the quantize pass's {node.attrs.get('bits')}-bit codes x scales, stored as "
             f"{design.wfmt(v).text()}")


def _refuse_expansion(node: Node) -> str | None:
    if expands_low_bit(node.outputs[0]):
        return None
    return f"{node.op} at {node.loc or '?'}: the fpga target expands low-bit weights only, not computed values"


register_kernel(FpgaKernel("dequantize", _expansion, _expansion_emit, refuse=_refuse_expansion))
register_kernel(FpgaKernel("embedding", _embed_emulate, _embed_emit, formats=_embed_formats, extra=_embed_extra,
                           memories=_embed_memories))
register_kernel(FpgaKernel("linear", _linear_emulate, _linear_emit, units=_linear_units, refuse=_refuse_linear))
register_kernel(FpgaKernel("mlp", _mlp_emulate, _mlp_emit, internals=_mlp_internals, units=_mlp_units,
                           extra=_ffn_extra, refuse=_refuse_ffn))
register_kernel(FpgaKernel("experts", _experts_emulate, _experts_emit, internals=_experts_internals,
                           units=_experts_units, extra=_experts_extra, refuse=_refuse_ffn))
