"""The parameters of each kernel role, declared once for every target.

The lowerings (lowerings.py) call a role's kernel with its arguments in one order; each
target's kernel for the role must take exactly those. So the parameter lists live here: a
kernel calls its role's function inside its `kernel(...)` frame (the CPU's tir_util, the
GPU's gpu_util) and gets back its buffers and symbolic sizes; it then writes only its body.
"""

from __future__ import annotations

from tvm import tirx

from mocompile.backends.tvm_common.kernel_math import rope
from mocompile.backends.tvm_common.panel_math import weight_shapes
from mocompile.backends.tvm_common.specs import AttentionSpec, Epilogue, LatentSpec, RouterSpec, WeightFormat
from mocompile.backends.tvm_common.tir_build import arg, dim, residual_args, scalar_arg

Buffer = tirx.Buffer


def matmul_weights(fmt: WeightFormat, panels, k: int, width: int) -> tuple:
    """The weight panels [panels, depth, width] and, for low-bit weights, their scale panels:
    (w, w_scale or None)."""
    bufs = [arg(name, shape, dtype) for name, (shape, dtype) in zip(("w", "w_scale"), weight_shapes(fmt, panels, k, width))]
    return bufs[0], bufs[1] if fmt.quantized else None


def dense_matmul(k: int, n: int, tj: int, epi: Epilogue, fmt: WeightFormat) -> tuple:
    """x[m, k], weight panels (+ scale panels) (+ bias[n]) (+ residuals [m, n]) -> y[m, n]:
    (m, x, w, w_scale, bias, residuals, y)."""
    m = dim("m")
    x = arg("x", (m, k))
    w, w_scale = matmul_weights(fmt, -(-n // tj), k, 2 * tj if epi.glu else tj)
    bias = arg("bias", (n,)) if epi.bias else None
    return m, x, w, w_scale, bias, residual_args(epi.residual, m, n), arg("y", (m, n))


def grouped_matmul(experts: int, k: int, n: int, tj: int, epi: Epilogue, fmt: WeightFormat) -> tuple:
    """x[rows, k] sorted by expert, indptr[E+1], every expert's panels (+ scale panels)
    (+ a row scale[rows]) -> y[rows, n]: (rows, x, indptr, w, w_scale, scale, y)."""
    if epi.bias or epi.residual:
        raise ValueError("the grouped matmul takes glu/activation/row_scale epilogues only")
    rows = dim("rows")
    x = arg("x", (rows, k))
    indptr = arg("indptr", (experts + 1,), "int32")
    w, w_scale = matmul_weights(fmt, experts * -(-n // tj), k, 2 * tj if epi.glu else tj)
    scale = arg("scale", (rows,)) if epi.row_scale else None
    return rows, x, indptr, w, w_scale, scale, arg("y", (rows, n))


def gather_rows_name(hidden: int, index_dtype: str, table_rows: int | None, table_dtype: str = "float32") -> str:
    """A gather kernel's name: its parameters (kernels are shared by name)."""
    rows_tag = "" if table_rows is None else f"_n{table_rows}"
    return f"gather_rows_h{hidden}_{index_dtype}{rows_tag}{'' if table_dtype == 'float32' else f'_{table_dtype}'}"


def gather_rows(hidden: int, index_dtype: str, table_rows: int | None, table_dtype: str = "float32") -> tuple:
    """table[n, hidden], index[p] -> out[p, hidden]: (n, p, table, index, out); a 16-bit float
    table ("bfloat16", "float16") is its uint16 bits."""
    n = table_rows if table_rows is not None else dim("n")
    p = dim("p")
    stored = "float32" if table_dtype == "float32" else "uint16"
    return n, p, arg("table", (n, hidden), stored), arg("index", (p,), index_dtype), arg("out", (p, hidden))


def norm_name(kind: str, hidden: int, eps: float) -> str:
    """A norm kernel's name: its parameters, eps exactly (kernels are shared by name)."""
    if kind not in ("rms", "layer"):
        raise ValueError(f"unknown norm {kind!r}")
    eps_tag = repr(float(eps)).replace("-", "m").replace("+", "").replace(".", "p")
    return f"{kind}norm_h{hidden}_eps{eps_tag}"


def norm(kind: str, hidden: int) -> tuple:
    """x[m, hidden], w[hidden] (+ b[hidden] for "layer") -> y[m, hidden]: (m, x, w, b, y)."""
    m = dim("m")
    x, w = arg("x", (m, hidden)), arg("w", (hidden,))
    b = arg("b", (hidden,)) if kind == "layer" else None
    return m, x, w, b, arg("y", (m, hidden))


def quantize_rows(k: int, mode: str) -> tuple:
    """x[m, k] (+ scale[1] for "static") -> y[m, k]: (m, x, static, y)."""
    m = dim("m")
    x = arg("x", (m, k))
    static = arg("scale", (1,)) if mode == "static" else None
    return m, x, static, arg("y", (m, k))


def router_topk(spec: RouterSpec) -> tuple:
    """logits[t, E] (+ score_bias[E]) (+ modality[t]) -> weights[t, k], indices[t, k]:
    (t, logits, bias, modality, weights, indices)."""
    t, E, k = dim("t"), spec.experts, spec.top_k
    logits = arg("logits", (t, E))
    bias = arg("score_bias", (E,)) if spec.score_bias else None
    modality = arg("modality", (t,), "int32") if spec.groups else None
    return t, logits, bias, modality, arg("weights", (t, k)), arg("indices", (t, k), "int32")


def moe_plan(experts: int, top_k: int) -> tuple:
    """indices[t, k], weights[t, k] -> indptr[E+1], row_token[P], row_weight[P], pair_row[P]:
    (t, indices, weights, indptr, row_token, row_weight, pair_row)."""
    t = dim("t")
    return (t, arg("indices", (t, top_k), "int32"), arg("weights", (t, top_k)), arg("indptr", (experts + 1,), "int32"),
            arg("row_token", (t * top_k,), "int32"), arg("row_weight", (t * top_k,)),
            arg("pair_row", (t * top_k,), "int32"))


def moe_combine(hidden: int, top_k: int, residuals: int) -> tuple:
    """ys[t*k, hidden], pair_row[t*k] (+ residuals [t, hidden]) -> out[t, hidden]:
    (t, ys, pair_row, residuals, out)."""
    t = dim("t")
    ys, pair_row = arg("ys", (t * top_k, hidden)), arg("pair_row", (t * top_k,), "int32")
    return t, ys, pair_row, residual_args(residuals, t, hidden), arg("out", (t, hidden))


def rope_table(head_dim: int) -> tuple:
    """inv_freq[D/2], past, s -> cs[s, 2, D/2]: (past, s, inv_freq, cs)."""
    s, past = dim("s"), dim("past")
    inv_freq = arg("inv_freq", (head_dim // 2,))
    scalar_arg(past)
    scalar_arg(s)
    return past, s, inv_freq, arg("cs", (s, 2, head_dim // 2))


def cache_rows(width: int) -> tuple:
    """x[B, S, W], past -> cache[B, L, W] (in place): (b, s, past, x, cache)."""
    b, s, past, length = dim("b"), dim("s"), dim("past"), dim("cache_len")
    x = arg("x", (b, s, width))
    scalar_arg(past)
    return b, s, past, x, arg("cache", (b, length, width))


def attention_keys(spec: AttentionSpec) -> tuple:
    """k[B, S, Hkv*D] (+ cs), past -> kt[B, Hkv, D, L] (in place): (b, s, past, k, cs, kt)."""
    b, s, past, length = dim("b"), dim("s"), dim("past"), dim("kt_len")
    D, hkv = spec.head_dim, spec.kv_heads
    k = arg("k", (b, s, hkv * D))
    cs = arg("cs", (s, 2, D // 2)) if spec.rope else None
    scalar_arg(past)
    return b, s, past, k, cs, arg("kt", (b, hkv, D, length))


def attention_key_value(spec: AttentionSpec, k: Buffer, cs: Buffer | None):
    """value(bi, h, d, j): channel d of head h's key at the call's position j (roped)."""
    D = spec.head_dim

    def value(bi, h, d, j):
        def load(c):
            return k[bi, j, h * D + c]

        return rope(load, d, D, cs, j) if spec.rope else load(d)

    return value


def attention(spec: AttentionSpec) -> tuple:
    """q[B, S, H*D], kt[B, Hkv, D, Lk], v[B, Lv, Hkv*D] (+ cs), past -> out[B, S, H*D]:
    (b, s, past, q, kt, v, cs, out)."""
    b, s, past = dim("b"), dim("s"), dim("past")
    kt_len, v_len = dim("kt_len"), dim("v_len")
    D, H, hkv = spec.head_dim, spec.heads, spec.kv_heads
    q = arg("q", (b, s, H * D))
    kt = arg("kt", (b, hkv, D, kt_len))
    v = arg("v", (b, v_len, hkv * D))
    cs = arg("cs", (s, 2, D // 2)) if spec.rope else None
    scalar_arg(past)
    return b, s, past, q, kt, v, cs, arg("out", (b, s, H * D))


def latent_keys(spec: LatentSpec) -> tuple:
    """k_nope[B, S, H*dn], k_rope[B, S, dr], cs, past -> kt[B, H, dn+dr, L] (in place):
    (b, s, past, k_nope, k_rope, cs, kt)."""
    b, s, past, length = dim("b"), dim("s"), dim("past"), dim("kt_len")
    H, dn, dr = spec.heads, spec.nope_dim, spec.rope_dim
    k_nope, k_rope = arg("k_nope", (b, s, H * dn)), arg("k_rope", (b, s, dr))
    cs = arg("cs", (s, 2, dr // 2))
    scalar_arg(past)
    return b, s, past, k_nope, k_rope, cs, arg("kt", (b, H, spec.qk_dim, length))


def latent_attention(spec: LatentSpec) -> tuple:
    """q[B, S, H*(dn+dr)], kt, v[B, Lv, H*dv], cs, past -> out[B, S, H*dv]:
    (b, s, past, q, kt, v, cs, out)."""
    b, s, past = dim("b"), dim("s"), dim("past")
    kt_len, v_len = dim("kt_len"), dim("v_len")
    H, dq, dv = spec.heads, spec.qk_dim, spec.v_dim
    q = arg("q", (b, s, H * dq))
    kt = arg("kt", (b, H, dq, kt_len))
    v = arg("v", (b, v_len, H * dv))
    cs = arg("cs", (s, 2, spec.rope_dim // 2))
    scalar_arg(past)
    return b, s, past, q, kt, v, cs, arg("out", (b, s, H * dv))
