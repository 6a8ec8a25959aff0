"""Dense layers: embedding, linear, norms and the dense feed-forward block (`mlp`).

`mlp` stays whole (not linear+act+mul+linear) so passes see a feed-forward block as one
unit (quantize its three weights, prune its neurons) and backends can fuse its epilogues.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from mocompile.ir.contextual import check_keep, kept_channels, per_token_rowwise, sparsify
from mocompile.ir.ops.elementwise import ACTIVATIONS, broadcast_shapes
from mocompile.ir.batch_flow import Flow, FlowArgs, broadcast_map, combine, identity_map, last_axis_params, one, rowwise
from mocompile.ir.ops.quant import fake_quant
from mocompile.ir.registry import OPTIONAL, REQUIRED, Cost, OpDef, register_op
from mocompile.ir.types import TensorType


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# ---- embedding -------------------------------------------------------------------------
def _infer_embedding(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    ids, table = ts
    _expect(ids.dtype in ("int64", "int32"), f"embedding ids must be integer, got {ids.dtype}")
    _expect(table.rank == 2, f"embedding table must be [vocab, hidden], got {table}")
    return [TensorType(ids.shape + (table.shape[1],), table.dtype)]


def _embedding_cost(ins, outs, attrs, env) -> Cost:
    return Cost(flops=0, bytes=2 * outs[0].numel(env) * 4)


def _embedding_flow(args: FlowArgs) -> Flow:
    """Rows of a table looked up by per-position ids: the ids' axes carry on; the table is read whole."""
    ids = args.in_types[0]
    return one(combine(args, [identity_map(ids.rank), [None, ids.rank]]))


register_op(OpDef("embedding", _infer_embedding, lambda xs, a: [xs[1][xs[0]]], batch_flow=_embedding_flow,
                  cost=_embedding_cost, positionwise=True, embeds_tokens=True,
                  doc="table[ids]; rows of a [vocab, hidden] table"))


# ---- linear ----------------------------------------------------------------------------
def _infer_linear(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    _expect(len(ts) in (2, 3), f"linear takes x, w[, b]; got {len(ts)} inputs")
    x, w = ts[0], ts[1]
    _expect(w.rank == 2, f"linear weight must be [out, in], got {w}")
    _expect(x.shape[-1] == w.shape[1], f"linear: x {x} does not match weight {w}")
    if len(ts) == 3:
        _expect(ts[2].shape == (w.shape[0],), f"linear bias {ts[2]} does not match weight {w}")
    check_keep(attrs.get("keep"))
    return [TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)]


def _linear(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    y = sparsify(xs[0], [xs[1]], attrs.get("keep")) @ xs[1].T
    if len(xs) == 3:
        y = y + xs[2]
    return [y.astype(np.float32)]


def _linear_cost(ins, outs, attrs, env) -> Cost:
    rows = ins[0].numel(env) // ins[0].concrete(env)[-1]
    n, k = ins[1].concrete(env)
    kk = k if attrs.get("keep") is None else kept_channels(k, attrs["keep"])
    return Cost(flops=2 * rows * n * kk, bytes=4 * (rows * k + n * kk + rows * n))


def _linear_params(args: FlowArgs) -> list:
    r = args.in_types[0].rank
    return [[r - 1, None], *([[r - 1]] if len(args.ins) == 3 else [])]


def _share(node, index: int, keep: float | None) -> dict[int, float]:
    """{index: the share of input `index`'s columns (axis -1) a token reads at `keep`}."""
    if keep is None:
        return {}
    width = int(node.inputs[index].type.shape[-1])
    return {index: kept_channels(width, keep) / width}


register_op(OpDef("linear", _infer_linear, _linear, {"keep": OPTIONAL}, batch_flow=per_token_rowwise(_linear_params),
                  cost=_linear_cost, positionwise=True, weight_slots=slice(1, 2), act_quant_input=True,
                  contextual_shares=lambda node: _share(node, 1, node.attrs.get("keep")),
                  doc="x @ w.T (+ b); w is [out, in]; with keep=R each token (row) reads only the "
                      "kept_channels(in, R) input channels i of largest |x_i| * ||w[:, i]|| (mocompile.ir.contextual)"))


# ---- norms -----------------------------------------------------------------------------
def _infer_norm(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    x = ts[0]
    group = attrs.get("group")
    size = x.shape[-1] if group is None else group
    if group is not None:
        _expect(isinstance(x.shape[-1], int) and x.shape[-1] % group == 0,
                f"norm group {group} does not divide the last axis of {x}")
    for p in ts[1:]:
        _expect(p.shape == (size,), f"norm parameter {p} does not match input {x}" +
                (f" in groups of {group}" if group is not None else ""))
    return [x]


def _rmsnorm(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    x, w = xs
    shape = x.shape
    if attrs["group"] is not None:
        x = x.reshape(*shape[:-1], -1, attrs["group"])
    var = np.mean(x.astype(np.float32) ** 2, axis=-1, keepdims=True)
    return [(x / np.sqrt(var + attrs["eps"]) * w).astype(np.float32).reshape(shape)]


def _layernorm(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    x, w, b = xs
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return [((x - mu) / np.sqrt(var + attrs["eps"]) * w + b).astype(np.float32)]


def _norm_cost(ins, outs, attrs, env) -> Cost:
    n = outs[0].numel(env)
    return Cost(flops=4 * n, bytes=8 * n)


register_op(OpDef("rmsnorm", _infer_norm, _rmsnorm, {"eps": REQUIRED, "group": None}, cost=_norm_cost,
                  batch_flow=rowwise(last_axis_params, reduce_last=True), positionwise=True, affine_channels=True,
                  doc="x / sqrt(mean(x^2) + eps) * w over the last axis, or with `group` over each consecutive "
                      "group of that many elements of it (per attention head); w is [last axis] or [group]"))
register_op(OpDef("layernorm", _infer_norm, _layernorm, {"eps": REQUIRED}, cost=_norm_cost,
                  batch_flow=rowwise(last_axis_params, reduce_last=True), positionwise=True, affine_channels=True,
                  doc="(x - mean) / sqrt(var + eps) * w + b over the last axis (biased variance)"))


# ---- mlp (dense feed-forward block) ----------------------------------------------------
# hidden_quant "token": the hidden activation h is rounded to int8 with a scale per row
# (max |h| / 127) before the down projection, as a W8A8 block computes it (quantize pass).
MLP_ATTRS = {"activation": "silu", "gated": True, "hidden_quant": None, "keep": OPTIONAL}
HIDDEN_QUANT_MODES = (None, "token")


def ffn_weight_types(ts: Sequence[TensorType], gated: bool, hidden: Any, experts: Any = None) -> None:
    """Check the (gate, up, down) weights of a feed-forward block, optionally stacked per expert."""
    lead = () if experts is None else (experts,)
    ws = ts if gated else (None, *ts)
    gate, up, down = ws
    ffn = up.shape[-2]
    _expect(up.shape == lead + (ffn, hidden), f"up weight {up} should be {lead + ('F', hidden)}")
    if gate is not None:
        _expect(gate.shape == up.shape, f"gate weight {gate} should match up weight {up}")
    _expect(down.shape == lead + (hidden, ffn), f"down weight {down} should be {lead + (hidden, ffn)}")


def _infer_mlp(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    _expect(len(ts) == (4 if attrs["gated"] else 3), f"mlp (gated={attrs['gated']}) got {len(ts)} inputs")
    _expect(attrs["activation"] in ACTIVATIONS, f"unknown activation {attrs['activation']!r}")
    check_hidden_quant(attrs)
    x = ts[0]
    ffn_weight_types(ts[1:], attrs["gated"], x.shape[-1])
    check_keep(attrs.get("keep"))
    _expect(attrs.get("keep") is None or attrs["hidden_quant"] is None,
            "mlp: keep (contextual sparsity) and hidden_quant (W8A8) do not combine")
    return [x]


def check_hidden_quant(attrs: Mapping[str, Any]) -> None:
    _expect(attrs["hidden_quant"] in HIDDEN_QUANT_MODES,
            f"hidden_quant must be token or absent, got {attrs['hidden_quant']!r}")


def ffn_hidden(x: np.ndarray, gate: np.ndarray | None, up: np.ndarray, activation: str) -> np.ndarray:
    """The hidden activation of a feed-forward block, what its down projection multiplies."""
    act = ACTIVATIONS[activation]
    return act(x @ gate.T) * (x @ up.T) if gate is not None else act(x @ up.T)


def ffn(x: np.ndarray, gate: np.ndarray | None, up: np.ndarray, down: np.ndarray, activation: str,
        hidden_quant: str | None = None, keep: float | None = None,
        norms: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The feed-forward block shared by dense layers, shared experts and routed experts.
    With `keep` (contextual sparsity; never with hidden_quant, which both ops refuse): each
    token reads its kept input channels of gate and up (scored by their stacked columns),
    then its kept hidden neurons of down; `norms`: (gate and up's, down's) column norms
    where the caller has them (a routed expert's rows of its stacked weights' norms)."""
    if keep is None:
        h = ffn_hidden(x, gate, up, activation)
        if hidden_quant is not None:
            h = fake_quant(h.astype(np.float32), hidden_quant)
        return (h @ down.T).astype(np.float32)
    x_norms, h_norms = norms if norms is not None else (None, None)
    x = sparsify(x, [w for w in (gate, up) if w is not None], keep, x_norms)
    h = sparsify(ffn_hidden(x, gate, up, activation).astype(np.float32), [down], keep, h_norms)
    return (h @ down.T).astype(np.float32)


def _mlp(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    if attrs["gated"]:
        x, gate, up, down = xs
    else:
        (x, up, down), gate = xs, None
    return [ffn(x, gate, up, down, attrs["activation"], attrs["hidden_quant"], attrs.get("keep"))]


def _mlp_shares(node) -> dict[int, float]:
    """Gate and up: the kept input channels; down: the kept hidden neurons."""
    shares: dict[int, float] = {}
    for i in range(1, len(node.inputs)):
        shares.update(_share(node, i, node.attrs.get("keep")))
    return shares


def _mlp_hidden_abs_sum(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """|hidden activation| summed per neuron over every token, as one 'expert' ([1, F], [1])."""
    x, gate, up = (xs[0], *xs[1:3]) if attrs["gated"] else (xs[0], None, xs[1])
    flat = x.reshape(-1, x.shape[-1])
    h = ffn_hidden(flat, gate, up, attrs["activation"])
    return np.abs(h).sum(0, dtype=np.float64)[None], np.array([flat.shape[0]], np.int64)


def _mlp_cost(ins, outs, attrs, env) -> Cost:
    rows = ins[0].numel(env) // ins[0].concrete(env)[-1]
    wsize = sum(t.numel(env) for t in ins[1:])
    if attrs.get("keep") is not None:
        wsize = int(wsize * kept_channels(ins[0].concrete(env)[-1], attrs["keep"]) / ins[0].concrete(env)[-1])
    return Cost(flops=2 * rows * wsize, bytes=4 * (wsize + 2 * outs[0].numel(env)))


register_op(OpDef("mlp", _infer_mlp, _mlp, MLP_ATTRS, cost=_mlp_cost, batch_flow=per_token_rowwise(),
                  positionwise=True, weight_slots=slice(1, None), down_projection=True, act_quant_input=True,
                  weight_role="ffn", hidden_abs_sum=_mlp_hidden_abs_sum, contextual_shares=_mlp_shares,
                  doc="down(act(x@gate.T) * (x@up.T)) if gated else down(act(x@up.T)), the hidden activation rounded to "
                      "int8 per row first with hidden_quant=token; inputs x, [gate], up, down; with keep=R each token "
                      "reads only its kept input channels (gate, up) and kept hidden neurons (down), as linear's keep"))


# ---- matmul (plain torch code: x @ w, batched) ---------------------------------------------
def _infer_matmul(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    a, b = ts
    _expect(a.rank >= 2 and b.rank >= 2, f"matmul takes tensors of rank >= 2, got {a} and {b}")
    _expect(a.dtype == b.dtype, f"matmul dtype mismatch {a.dtype} vs {b.dtype}")
    _expect(a.shape[-1] == b.shape[-2], f"matmul: {a} @ {b} do not match")
    return [TensorType(broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]), a.dtype)]


def _matmul_flow(args: FlowArgs) -> Flow:
    """Leading axes broadcast; a's rows and b's columns carry on; the inner axis is contracted."""
    r = args.out_types[0].rank
    a, b = args.in_types
    lead_a, lead_b = broadcast_map(a.rank - 2, r - 2), broadcast_map(b.rank - 2, r - 2)
    return one(combine(args, [[*lead_a, r - 2, None], [*lead_b, None, r - 1]]))


def _matmul_cost(ins, outs, attrs, env) -> Cost:
    k = ins[0].concrete(env)[-1]
    return Cost(flops=2 * outs[0].numel(env) * k, bytes=4 * sum(t.numel(env) for t in (*ins, *outs)))


register_op(OpDef("matmul", _infer_matmul, lambda xs, a: [np.matmul(xs[0], xs[1]).astype(xs[0].dtype)],
                  batch_flow=_matmul_flow, cost=_matmul_cost, doc="a @ b with numpy batch broadcasting (rank >= 2)"))


# ---- batch norm ----------------------------------------------------------------------------
def _infer_batch_norm(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    x = ts[0]
    _expect(x.rank >= 2, f"batch_norm input {x} should be [N, C, ...]")
    _expect(len(ts) == (3 if attrs["use_batch_stats"] else 5),
            "batch_norm takes x, weight, bias (+ running_mean, running_var unless use_batch_stats)")
    for p in ts[1:]:
        _expect(p.shape == (x.shape[1],), f"batch_norm parameter {p} does not match channels of {x}")
    return [x]


def _batch_norm(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    x, w, b = xs[:3]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if attrs["use_batch_stats"]:
        axes = (0, *range(2, x.ndim))
        mean, var = x.mean(axes), x.var(axes)  # biased variance, as torch normalises in training
    else:
        mean, var = xs[3], xs[4]
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + attrs["eps"]) * w.reshape(shape) + b.reshape(shape)
    return [y.astype(np.float32)]


def _batch_norm_flow(args: FlowArgs) -> Flow:
    """Per-channel affine with running statistics; with batch statistics every element reads
    all positions of every axis but the channel axis, the batch axis among them."""
    r = args.in_types[0].rank
    reduce = [a for a in range(r) if a != 1] if args.attrs["use_batch_stats"] else []
    why = "normalises with mean and variance computed over the batch (batch statistics)"
    return one(combine(args, [identity_map(r), *[[1]] * (len(args.ins) - 1)], reduce=reduce, why=why))


register_op(OpDef("batch_norm", _infer_batch_norm, _batch_norm, {"eps": REQUIRED, "use_batch_stats": REQUIRED},
                  batch_flow=_batch_norm_flow, cost=_norm_cost,
                  doc="(x - mean) / sqrt(var + eps) * w + b per channel (axis 1); inputs x, w, b[, running_mean, "
                      "running_var]; statistics of the batch itself when use_batch_stats"))
