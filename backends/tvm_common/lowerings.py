"""One lowering per IR op: which kernels an op becomes and with which weight layouts, the
same for every TVM-based target; the kernels themselves come from the target's KernelSet
(`ctx.kernels`, kernels.py).

Each function receives the LowerContext and the IR node and returns the Relax values of the
node's outputs. Shapes: activations go to kernels as [rows, features] (ctx.rows) and come
back reshaped to the IR type (ctx.reshape_to).
"""

from __future__ import annotations

from tvm import relax

from mocompile.backends.tvm_common import injective as KI
from mocompile.backends.tvm_common.contextual import check_float_weights, gathered_or_masked, kept
from mocompile.backends.tvm_common.kernels import NAME_ATTR
from mocompile.backends.tvm_common.lower import (BACKEND_WORD, CACHE_LEN, LOW_BIT_READERS, LowerContext,
                                                 LoweringError, lowering)
from mocompile.backends.tvm_common.specs import AttentionSpec, Epilogue, LatentSpec, RouterSpec, rope_inv_freq
from mocompile.backends.tvm_common.weight_reads import (int8_call, int8_reader, integer_weights, matmul_weights,
                                                        widened)
from mocompile.ir.graph import Node, Value
from mocompile.ir.ops.moe_remote import SERVICE
from mocompile.ir.registry import get_op

F32 = "float32"


def _require_f32(ctx: LowerContext, node: Node, *values: Value) -> None:
    for v in values:
        if v.type.dtype != F32:
            raise LoweringError(f"{node.op} at {node.loc or '?'}: {v.name} is {v.type.dtype}; the "
                                f"{ctx.kernels.name} backend computes this op in float32 only")


def _with_residual(ctx: LowerContext, node: Node) -> tuple[Node | None, list[relax.Expr]]:
    """(the last fused add, the rows it and the adds before it add) when the node's output is
    only added to values already computed: up to two adds in a chain, as a MoE block's routed
    output is added to its shared expert's and then to the residual stream. The kernel adds
    them in the chain's order, so the sums round as the graph's adds do."""
    last, residuals = None, []
    while len(residuals) < 2:
        fusion = ctx.residual_for(last or node)
        if fusion is None:
            break
        last, other = fusion
        ctx.fuse_into(last)
        residuals.append(ctx.rows(other))
    return last, residuals


def _finish(ctx: LowerContext, node: Node, y: relax.Expr, add: Node | None) -> list[relax.Expr]:
    """Bind the kernel result to the node's output, or to the fused add's output."""
    target = add.outputs[0] if add is not None else node.outputs[0]
    out = ctx.reshape_to(y, target)
    if add is not None:
        ctx.bind(target, out)
    return [out]


def _dense(ctx: LowerContext, node: Node, x_rows: relax.Expr, rows, w: Value, epi: Epilogue, extra=(),
           gate: Value | None = None):
    """x_rows @ w.T through panels (or act(x @ gate.T) * (x @ w.T) with gate), + epilogue;
    low-bit weights the integer kernels take are read by them (integer_weights)."""
    n, k = (int(d) for d in w.type.shape)
    deqs = integer_weights(ctx, [gate, w] if gate is not None else [w])
    if deqs is not None:
        return int8_call(ctx, x_rows, rows, "float", deqs, epi, extra=list(extra))
    wargs, c = matmul_weights(ctx, node, "glu_panels" if gate is not None else "panels",
                               [gate, w] if gate is not None else [w], 0, k, n)
    kernel, *called = ctx.kernels.dense(c, epi)
    for func in called:
        ctx.add_callee(func)
    return ctx.call(kernel, [x_rows, *wargs, *extra], [((rows, n), F32)],
                    flops_per_row=2 * k * n * (2 if gate is not None else 1))


@lowering("dequantize")
def _dequantize(ctx: LowerContext, node: Node):
    """No code of its own: the matmul reading the weight reads the low-bit codes and scales
    (see matmul_weights); low-bit weights are never expanded to float32 in memory."""
    users = ctx.users(node.outputs[0])
    for user in users:
        if user.op not in LOW_BIT_READERS or node.outputs[0] is user.inputs[0]:
            raise LoweringError(f"dequantize at {node.loc or '?'}: feeds {user.op}, which the {ctx.kernels.name} backend cannot "
                                f"read low-bit weights in (only {', '.join(LOW_BIT_READERS)} weights)")
    return []


@lowering("widen")
def _widen(ctx: LowerContext, node: Node):
    """No code of its own: the matmul (see matmul_weights) or embedding reading the weight
    widens the 16-bit values as it reads them, so the weight stays 16-bit in memory."""
    for user in ctx.users(node.outputs[0]):
        slot = user.inputs.index(node.outputs[0])
        if not (user.op in LOW_BIT_READERS and slot > 0 or get_op(user.op).embeds_tokens and slot == 1):
            raise LoweringError(f"widen at {node.loc or '?'}: feeds {user.op}, which the {ctx.kernels.name} backend cannot "
                                f"read 16-bit weights in (only {', '.join(LOW_BIT_READERS)} weights and embedding tables)")
    return []


def _quantize_act_args(ctx: LowerContext, qa: Node) -> dict:
    """The mode and static scale of a quantize_act, as int8_call takes them."""
    return {"mode": qa.attrs["mode"], "static": [ctx.value(qa.inputs[1])] if len(qa.inputs) == 2 else []}


@lowering("quantize_act")
def _quantize_act(ctx: LowerContext, node: Node):
    """Rounded activations as float32 for the ops that read them so; nothing when every
    reader computes in integers (it quantizes the input itself, see activation_codes)."""
    users = ctx.users(node.outputs[0])
    if users and node.outputs[0] not in ctx.graph.outputs and all(int8_reader(ctx, u) for u in users):
        return []
    x = node.inputs[0]
    k = int(x.type.shape[-1])
    scale = [ctx.value(node.inputs[1])] if len(node.inputs) == 2 else []
    y = ctx.call(ctx.kernels.quantize_rows(k, node.attrs["mode"]), [ctx.rows(x), *scale], [((ctx.rows_of(x), k), F32)])
    return [ctx.reshape_to(y, node.outputs[0])]


@lowering("linear", reads_low_bit=True)
def _linear(ctx: LowerContext, node: Node):
    x, w = node.inputs[:2]
    _require_f32(ctx, node, *node.inputs)
    bias = [ctx.weight("identity", [node.inputs[2]])] if len(node.inputs) == 3 else []
    add, residuals = _with_residual(ctx, node)
    epi = Epilogue(bias=bool(bias), residual=len(residuals))
    extra = bias + residuals
    int8 = int8_reader(ctx, node)
    m, rows = kept(node, int(w.type.shape[1])), ctx.rows_of(x)
    if m is not None:  # contextual sparsity
        y = gathered_or_masked(ctx, node, ctx.rows(x), rows, [w], m, epi, extra,
                               lambda xm: _dense(ctx, node, xm, rows, w, epi, extra=extra))
    elif int8 is None:
        y = _dense(ctx, node, ctx.rows(x), rows, w, epi, extra=extra)
    else:
        qa, deqs = int8
        y = int8_call(ctx, ctx.rows(qa.inputs[0]), ctx.rows_of(x), deqs=deqs, epi=epi, extra=extra,
                       **_quantize_act_args(ctx, qa))
    return _finish(ctx, node, y, add)


def _down_projection(ctx: LowerContext, node: Node, h: relax.Expr, rows, epi: Epilogue, extra: list,
                     plan: list = ()) -> relax.Expr:
    """The down projection of a feed-forward block or of the experts (`plan`: [indptr], with
    the routing weight as the per-row scale in `extra`), from its hidden activation h,
    rounded per row first with hidden_quant: in integers where the integer kernels read the
    weight, else as float32 for the float kernels."""
    down = node.inputs[-1]
    experts = int(down.type.shape[0]) if plan else 0
    hidden, ffn = (int(d) for d in down.type.shape[-2:])
    mode = node.attrs["hidden_quant"]
    deqs = integer_weights(ctx, [down])
    if deqs is not None:
        return int8_call(ctx, h, rows, mode or "float", deqs, epi, plan, extra)
    if mode is not None:
        h = ctx.call(ctx.kernels.quantize_rows(ffn, mode), [h], [((rows, ffn), F32)])
    def dense(hs: relax.Expr) -> relax.Expr:
        if not plan:
            return _dense(ctx, node, hs, rows, down, epi, extra=extra)
        w_down, c = matmul_weights(ctx, node, "expert_panels", [down], experts, ffn, hidden)
        return ctx.call(ctx.kernels.grouped_matmul(c, epi), [hs, *plan, *w_down, *extra], [((rows, hidden), F32)],
                        (plan[0], w_down, experts), flops_per_row=2 * ffn * hidden)

    m = kept(node, ffn)
    if m is not None:  # contextual sparsity over the hidden neurons
        return gathered_or_masked(ctx, node, h, rows, [down], m, epi, extra, dense, *plan)
    return dense(h)


@lowering("mlp", reads_low_bit=True)
def _mlp(ctx: LowerContext, node: Node):
    _require_f32(ctx, node, *node.inputs)
    gated, act = node.attrs["gated"], node.attrs["activation"]
    x = node.inputs[0]
    gate, up = node.inputs[1:3] if gated else (None, node.inputs[1])
    rows = ctx.rows_of(x)
    epi_up = Epilogue(glu=gated, activation=act)
    int8 = int8_reader(ctx, node)
    m = kept(node, int(x.type.shape[-1]))
    if m is not None:  # contextual sparsity over the input channels of gate and up
        h = gathered_or_masked(ctx, node, ctx.rows(x), rows, [w for w in (gate, up) if w is not None], m, epi_up, [],
                               lambda xm: _dense(ctx, node, xm, rows, up, epi_up, gate=gate))
    elif int8 is None:
        h = _dense(ctx, node, ctx.rows(x), rows, up, epi_up, gate=gate)
    else:
        qa, deqs = int8
        h = int8_call(ctx, ctx.rows(qa.inputs[0]), rows, deqs=deqs, epi=epi_up, **_quantize_act_args(ctx, qa))
    add, residuals = _with_residual(ctx, node)
    y = _down_projection(ctx, node, h, rows, Epilogue(residual=len(residuals)), residuals)
    return _finish(ctx, node, y, add)


@lowering("rmsnorm", "layernorm")
def _norm(ctx: LowerContext, node: Node):
    _require_f32(ctx, node, *node.inputs)
    x = node.inputs[0]
    hidden = int(x.type.shape[-1])
    kind = "rms" if node.op == "rmsnorm" else "layer"
    params = [ctx.value(p) for p in node.inputs[1:]]
    group = node.attrs.get("group") or hidden  # per-head norm: the same kernel on a [rows * heads, group] view
    rows, xs = ctx.rows_of(x), ctx.rows(x)
    if group != hidden:
        rows = rows * (hidden // group)
        xs = ctx.bb.emit(relax.op.reshape(xs, [rows, group]))
    y = ctx.call(ctx.kernels.norm(kind, group, float(node.attrs["eps"])), [xs, *params], [((rows, group), F32)])
    if group != hidden:
        y = ctx.bb.emit(relax.op.reshape(y, [ctx.rows_of(x), hidden]))
    return [ctx.reshape_to(y, node.outputs[0])]


def _rope_table(ctx: LowerContext, dim: int, theta: float, s) -> relax.Expr:
    """cos/sin of positions past..past+s-1: one table per function for all the layers that
    rotate the same way (a kernel call fewer per layer in each decode step)."""
    key = ("rope", dim, theta, str(s))
    if key not in ctx.derived:
        inv_freq = relax.const(rope_inv_freq(dim, theta))
        ctx.derived[key] = ctx.call(ctx.kernels.rope_table(dim), [inv_freq, ctx.past, s], [((s, 2, dim // 2), F32)])
    return ctx.derived[key]


def _keys_and_values(ctx: LowerContext, node: Node, keys, key_args: list, rows: int, qk_dim: int, v: Value,
                     v_width: int):
    """(kt, v) for an attention kernel: this call's keys (transposed, roped) and values in a
    plain forward; in the step function, the layer's caches with this call's positions
    written in place at past.. (so the kernel sees every position so far)."""
    b, s = ctx.shape(v)[:2]
    if v.type.shape[1] != node.inputs[0].type.shape[1]:
        raise LoweringError(f"{node.op} at {node.loc or '?'}: keys cover earlier positions than the queries (an IR "
                            "graph with its KV cache as inputs); this backend caches keys in its own step function: "
                            "compile the graph without the cache")
    if ctx.cache is None:
        kt = ctx.call(keys, [*key_args, ctx.past], [((b, rows, qk_dim, ctx.kernels.padded_len(s)), F32)])
        return kt, ctx.value(v)
    batch = v.type.shape[0]
    kc = ctx.cache_slot(f"{node.loc or node.outputs[0].name}.keys", [batch, rows, qk_dim, CACHE_LEN])
    vc = ctx.cache_slot(f"{node.loc or node.outputs[0].name}.values", [batch, CACHE_LEN, v_width])
    kt = ctx.call_inplace(keys, [*key_args, ctx.past, kc], len(key_args) + 1)
    vs = ctx.call_inplace(ctx.kernels.cache_rows(v_width), [ctx.value(v), ctx.past, vc], 2)
    return kt, vs


@lowering("attention")
def _attention(ctx: LowerContext, node: Node):
    _require_f32(ctx, node, *node.inputs)
    q, k, v = node.inputs
    a = node.attrs
    spec = AttentionSpec(int(a["heads"]), int(a["kv_heads"]), int(a["head_dim"]), float(a["rope_theta"]) > 0, bool(a["causal"]))
    s = ctx.shape(q)[1]
    rope = [_rope_table(ctx, spec.head_dim, float(a["rope_theta"]), s)] if spec.rope else []
    kt, vs = _keys_and_values(ctx, node, ctx.kernels.attention_keys(spec), [ctx.value(k), *rope], spec.kv_heads, spec.head_dim,
                              v, spec.kv_heads * spec.head_dim)
    return [ctx.call(ctx.kernels.attention(spec), [ctx.value(q), kt, vs, *rope, ctx.past], [(ctx.shape(q), F32)])]


@lowering("attention.mla")
def _latent_attention(ctx: LowerContext, node: Node):
    _require_f32(ctx, node, *node.inputs)
    q, k_nope, v, k_rope = node.inputs
    a = node.attrs
    spec = LatentSpec(int(a["heads"]), int(a["nope_dim"]), int(a["rope_dim"]), int(a["v_dim"]))
    cs = _rope_table(ctx, spec.rope_dim, float(a["rope_theta"]), ctx.shape(q)[1])
    kt, vs = _keys_and_values(ctx, node, ctx.kernels.latent_keys(spec), [ctx.value(k_nope), ctx.value(k_rope), cs], spec.heads,
                              spec.qk_dim, v, spec.heads * spec.v_dim)
    return [ctx.call(ctx.kernels.latent_attention(spec), [ctx.value(q), kt, vs, cs, ctx.past], [(ctx.shape(node.outputs[0]), F32)])]


def _router_refusal(node: Node) -> str | None:
    a = node.attrs
    if a["capacity_factor"] is not None:
        return ("capacity_factor (token dropping) makes one sample's output depend on the rest of the batch; "
                f"the {BACKEND_WORD} backend does not compile it")
    if a["routing"] != "token_choice":
        return (f"routing={a['routing']} decides a token's experts from the whole batch; the {BACKEND_WORD} backend "
                "compiles token-choice routing only")
    return None


@lowering("router.topk", refuses=_router_refusal, reads_low_bit=True)
def _router(ctx: LowerContext, node: Node):
    a = node.attrs
    x, w = node.inputs[:2]
    _require_f32(ctx, node, x, w)
    experts, k = int(w.type.shape[0]), int(a["top_k"])
    rows = ctx.rows_of(x)
    logits = _dense(ctx, node, ctx.rows(x), rows, w, Epilogue())
    spec = RouterSpec.of(experts, a)
    bias = [ctx.value(node.inputs[2])] if spec.score_bias else []
    modality = [ctx.flat(node.inputs[-1])] if spec.groups else []
    kernel = ctx.kernels.router_topk(spec)
    weights, indices = ctx.call(kernel, [logits, *bias, *modality], [((rows, k), F32), ((rows, k), "int32")])
    if ctx.cache is None:  # main: its calls expose each layer's routing (the manifest's `routing`)
        ctx.routers.append((str(kernel.attrs[NAME_ATTR]), node.loc or f"router {len(ctx.routers)}"))
    return [ctx.reshape_to(weights, node.outputs[0]), ctx.reshape_to(indices, node.outputs[1])]


@lowering("experts", reads_low_bit=True)
def _experts(ctx: LowerContext, node: Node):
    """Sparse MoE: plan (counting sort by expert) -> gather -> grouped GLU GEMM -> grouped
    down GEMM scaled by the routing weight -> combine. See kernels_moe.py. Experts with int8
    or int4 weights for a target with integer_matmuls run both GEMMs in integers on the
    gathered rows, quantized as their quantize_act says (the same codes as quantizing the
    tokens) or, for weight-only experts, as float digits: the tokens are quantized once (a
    shared expert reading the same tokens shares their codes) and the up GEMM reads each
    sorted row's codes through the plan's row_token."""
    gated, act = node.attrs["gated"], node.attrs["activation"]
    x, weights, indices = node.inputs[:3]
    gate, up = node.inputs[3:5] if gated else (None, node.inputs[3])
    _require_f32(ctx, node, x, weights, *node.inputs[3:])
    experts, ffn, hidden = (int(d) for d in up.type.shape)
    k = int(weights.type.shape[-1])
    rows = ctx.rows_of(x)
    pairs = rows * k
    indptr, row_token, row_weight, pair_row = ctx.call(
        ctx.kernels.moe_plan(experts, k), [ctx.rows(indices), ctx.rows(weights)],
        [((experts + 1,), "int32"), ((pairs,), "int32"), ((pairs,), F32), ((pairs,), "int32")])
    epi_up = Epilogue(glu=gated, activation=act)
    if kept(node, hidden) is not None:
        check_float_weights(ctx, node, node.inputs[3:])
    int8 = int8_reader(ctx, node)
    up_side = [gate, up] if gated else [up]
    weight_only = integer_weights(ctx, up_side) if int8 is None else None
    gather = (row_token, pairs)
    if int8 is not None:
        h = int8_call(ctx, ctx.rows(int8[0].inputs[0]), rows, deqs=int8[1], epi=epi_up, plan=[indptr], gather=gather,
                       **_quantize_act_args(ctx, int8[0]))
    elif weight_only is not None:
        h = int8_call(ctx, ctx.rows(x), rows, "float", weight_only, epi_up, [indptr], gather=gather)
    else:
        def up_dense(xs: relax.Expr) -> relax.Expr:
            w_up, c_up = matmul_weights(ctx, node, "expert_glu_panels" if gated else "expert_panels", up_side,
                                         experts, hidden, ffn)
            return ctx.call(ctx.kernels.grouped_matmul(c_up, epi_up), [xs, indptr, *w_up], [((pairs, ffn), F32)],
                            (indptr, w_up, experts), flops_per_row=2 * hidden * ffn * len(up_side))

        xs = ctx.call(ctx.kernels.gather_rows(hidden), [ctx.rows(x), row_token], [((pairs, hidden), F32)])
        m = kept(node, hidden)
        h = up_dense(xs) if m is None else \
            gathered_or_masked(ctx, node, xs, pairs, up_side, m, epi_up, [], up_dense, indptr)  # contextual sparsity
    ys = _down_projection(ctx, node, h, pairs, Epilogue(row_scale=True), [row_weight], [indptr])
    add, residuals = _with_residual(ctx, node)
    out = ctx.call(ctx.kernels.moe_combine(hidden, k, len(residuals)), [ys, pair_row, *residuals], [((rows, hidden), F32)])
    return _finish(ctx, node, out, add)


@lowering("experts.remote")
def _experts_remote(ctx: LowerContext, node: Node):
    """Experts served outside the program (expert parallelism, ir/ops/moe_remote.py): a call of
    the packed function SERVICE with the token rows, their gate weights and expert ids and the
    layer number (a one-element shape); the runtime registers it (runtime_ep.py) before loading the program. Not
    pure (it talks to other processes), but its result is always used and the VM runs the
    calls in program order, which is what every rank's sends and receives line up by."""
    x, weights, indices = node.inputs
    _require_f32(ctx, node, x, weights)
    out = ctx.bb.emit(relax.call_pure_packed(
        SERVICE, ctx.rows(x), ctx.rows(weights), ctx.rows(indices), relax.ShapeExpr([int(node.attrs["layer"])]),
        ty_args=relax.TensorType([ctx.rows_of(x), ctx.dim(x.type.shape[-1])], F32)))
    return [ctx.reshape_to(out, node.outputs[0])]


# ---- elementwise and shape ops (te computes the target schedules) -------------------------
@lowering("add", "mul")
def _binary(ctx: LowerContext, node: Node):
    a, b = node.inputs
    fn = KI.binary(node.op, KI.BINARY[node.op], ctx.shape(node.outputs[0]))
    return [ctx.call_te(fn, [ctx.value(a), ctx.value(b)], node.op)]


@lowering("silu", "gelu", "sigmoid")
def _unary(ctx: LowerContext, node: Node):
    return [ctx.call_te(KI.unary(node.op), [ctx.value(node.inputs[0])], node.op)]


@lowering("concat")
def _concat(ctx: LowerContext, node: Node):
    return [ctx.call_te(KI.concat(int(node.attrs["axis"])), [ctx.value(v) for v in node.inputs], "concat")]


@lowering("segment_ids")
def _segment_ids(ctx: LowerContext, node: Node):
    ids = tuple(int(i) for i in node.attrs["ids"])
    return [ctx.call_te(KI.segment_ids(ids), [ctx.value(v) for v in node.inputs], "segment_ids")]


@lowering("last_position")
def _last_position(ctx: LowerContext, node: Node):
    return [ctx.call_te(KI.last_position, [ctx.value(node.inputs[0])], "last_position")]


@lowering("embedding")
def _embedding(ctx: LowerContext, node: Node):
    ids, table = node.inputs
    vocab, hidden = (int(d) for d in table.type.shape)
    half = widened(table)  # a 16-bit table: the gather widens the rows it copies
    stored, fmt = (half.inputs[0], [half.attrs["dtype"]]) if half is not None else (table, [])
    rows = ctx.call(ctx.kernels.gather_rows(hidden, ids.type.dtype, vocab, *fmt), [ctx.value(stored), ctx.flat(ids)],
                    [((ctx.rows_of(node.outputs[0]), hidden), table.type.dtype)])
    return [ctx.reshape_to(rows, node.outputs[0])]
