"""Multi-head attention core (grouped-query, rotary positions, causal), kept whole.

The q/k/v/o projections are ordinary `linear` ops around it, so quantization and
scheduling treat them like any other matmul; this op is only what cannot be a matmul.
Tensors stay [batch, seq, heads*head_dim] so no reshapes appear in the IR.

Keys and values may cover more positions than the queries (`kv_len` >= `seq`): they are
then the positions 0..kv_len-1 of the sequence and the queries its last `seq` positions
(offset = kv_len - seq), which is how a KV-cached graph (mocompile/kv_cache.py) feeds the
cached keys of earlier calls in. Rotary positions and the causal mask follow the offset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from mocompile.ir.batch_flow import SAME_SAMPLE, BatchState, Flow, FlowArgs, broadcast_map, combine, one
from mocompile.ir.ops.elementwise import broadcast_shapes
from mocompile.ir.registry import REQUIRED, Cost, OpDef, register_op
from mocompile.ir.types import Dim, TensorType

if TYPE_CHECKING:
    from mocompile.ir.graph import Node

ATTENTION_ATTRS = {"heads": REQUIRED, "kv_heads": REQUIRED, "head_dim": REQUIRED, "rope_theta": 0.0, "causal": True}


def _infer(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    q, k, v = ts
    h, hkv, d = attrs["heads"], attrs["kv_heads"], attrs["head_dim"]
    if h % hkv:
        raise ValueError(f"heads {h} not divisible by kv_heads {hkv}")
    if q.rank != 3 or q.shape[-1] != h * d:
        raise ValueError(f"attention q {q} should be [batch, seq, {h * d}]")
    if k.rank != 3 or k.shape[0] != q.shape[0] or k.shape[-1] != hkv * d:
        raise ValueError(f"attention k {k} should be [batch, kv_len, {hkv * d}]")
    if v.shape != k.shape:
        raise ValueError(f"attention v {v} should have the shape of k {k}")
    return [q]


def query_offset(q_len: int, kv_len: int) -> int:
    """Position of the first query when keys cover positions 0..kv_len-1 (a cached call)."""
    if kv_len < q_len:
        raise ValueError(f"attention: {kv_len} key positions cannot cover {q_len} query positions")
    return kv_len - q_len


def causal_mask(q_len: int, kv_len: int) -> np.ndarray:
    """[q_len, kv_len]: query i (at position offset+i) sees keys 0..offset+i."""
    return np.tril(np.ones((q_len, kv_len), dtype=bool), k=query_offset(q_len, kv_len))


def rope_tables(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [seq, head_dim] for the rotate-half (Llama/HF) convention."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = np.outer(positions.astype(np.float32), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: [batch, heads, seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _compute(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    q, k, v = xs
    b, s, _ = q.shape
    n = k.shape[1]
    past = query_offset(s, n)
    h, hkv, d = attrs["heads"], attrs["kv_heads"], attrs["head_dim"]
    q = q.reshape(b, s, h, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, n, hkv, d).transpose(0, 2, 1, 3)
    v = v.reshape(b, n, hkv, d).transpose(0, 2, 1, 3)
    if attrs["rope_theta"] > 0:
        cos, sin = rope_tables(np.arange(n), d, attrs["rope_theta"])
        q, k = apply_rope(q, cos[past:], sin[past:]), apply_rope(k, cos, sin)
    rep = h // hkv
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) / np.sqrt(d)
    if attrs["causal"]:
        scores = np.where(causal_mask(s, n), scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(-1, keepdims=True)
    out = (p @ v).transpose(0, 2, 1, 3).reshape(b, s, h * d)
    return [out.astype(np.float32)]


def _cost(ins, outs, attrs, env) -> Cost:
    b, s, hd = outs[0].concrete(env)
    n = ins[1].concrete(env)[1]
    return Cost(flops=4 * b * s * n * hd, bytes=4 * sum(t.numel(env) for t in (*ins, *outs)))


ACROSS_SAMPLES = ("attends across positions of different samples: keys and values carry the batch index along "
                  "the sequence axis (packed sequences) and no block-diagonal same-sample mask keeps each query "
                  "within its own sample")


def _flow(args: FlowArgs) -> Flow:
    """Each query position reads every key/value position of its row: isolated when the batch
    is the leading axis, a leak when samples are packed along the sequence."""
    return one(combine(args, [[0, 1, None], [0, None, None], [0, None, 2]], why=ACROSS_SAMPLES))


def _causal_only(node: Node, segments: Sequence[Dim]) -> str | None:
    """Keys and values of earlier positions are all a causal query reads (a cache holds them)."""
    return None if node.attrs["causal"] else f"{node.op} at {node.loc or '?'} is not causal"


register_op(OpDef("attention", _infer, _compute, ATTENTION_ATTRS, cost=_cost, batch_flow=_flow,
                  cached_inputs={1: "k", 2: "v"}, position_check=_causal_only,
                  doc="softmax(rope(q) rope(k)^T / sqrt(d) + causal mask) v, grouped-query; k/v [b, kv_len, ..] may "
                      "start kv_len - seq positions before the queries (cached keys)"))


# ---- multi-head latent attention (DeepSeek-V2/V3) ---------------------------------------------
MLA_ATTRS = {"heads": REQUIRED, "nope_dim": REQUIRED, "rope_dim": REQUIRED, "v_dim": REQUIRED, "rope_theta": REQUIRED}


def _infer_mla(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    if len(ts) != 4:
        raise ValueError(f"attention.mla takes q, k_nope, v, k_rope; got {len(ts)} inputs")
    q = ts[0]
    h, dn, dr, dv = attrs["heads"], attrs["nope_dim"], attrs["rope_dim"], attrs["v_dim"]
    if dr % 2:
        raise ValueError(f"attention.mla rope_dim {dr} must be even")
    lead = q.shape[:2]
    kv_lead = (q.shape[0], ts[1].shape[1] if ts[1].rank == 3 else None)  # keys may cover earlier positions too
    widths = {"q": h * (dn + dr), "k_nope": h * dn, "v": h * dv, "k_rope": dr}
    for i, (t, (what, width)) in enumerate(zip(ts, widths.items())):
        if t.rank != 3 or t.shape != (lead if i == 0 else kv_lead) + (width,) or t.dtype != q.dtype:
            axis = "seq" if i == 0 else "kv_len"
            raise ValueError(f"attention.mla {what} {t} should be {q.dtype}[batch, {axis}, {width}]")
    return [TensorType(lead + (h * dv,), q.dtype)]


def _compute_mla(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    q, k_nope, v, k_rope = xs
    b, s, _ = q.shape
    n = k_nope.shape[1]
    past = query_offset(s, n)
    h, dn, dr, dv = attrs["heads"], attrs["nope_dim"], attrs["rope_dim"], attrs["v_dim"]
    q = q.reshape(b, s, h, dn + dr).transpose(0, 2, 1, 3)
    cos, sin = rope_tables(np.arange(n), dr, attrs["rope_theta"])
    q = np.concatenate([q[..., :dn], apply_rope(q[..., dn:], cos[past:], sin[past:])], axis=-1)
    k_rope = np.broadcast_to(apply_rope(k_rope.reshape(b, 1, n, dr), cos, sin), (b, h, n, dr))
    k = np.concatenate([k_nope.reshape(b, n, h, dn).transpose(0, 2, 1, 3), k_rope], axis=-1)
    v = v.reshape(b, n, h, dv).transpose(0, 2, 1, 3)
    scores = (q @ k.transpose(0, 1, 3, 2)) / np.sqrt(dn + dr)
    scores = np.where(causal_mask(s, n), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return [(p @ v).transpose(0, 2, 1, 3).reshape(b, s, h * dv).astype(np.float32)]


def _mla_cost(ins, outs, attrs, env) -> Cost:
    b, s, _ = outs[0].concrete(env)
    n = ins[1].concrete(env)[1]
    h, dq, dv = attrs["heads"], attrs["nope_dim"] + attrs["rope_dim"], attrs["v_dim"]
    return Cost(flops=2 * b * s * n * h * (dq + dv), bytes=4 * sum(t.numel(env) for t in (*ins, *outs)))


def _mla_flow(args: FlowArgs) -> Flow:
    """As `attention`: each query reads every key/value position of its own row."""
    return one(combine(args, [[0, 1, None], [0, None, None], [0, None, 2], [0, None, None]], why=ACROSS_SAMPLES))


register_op(OpDef("attention.mla", _infer_mla, _compute_mla, MLA_ATTRS, cost=_mla_cost, batch_flow=_mla_flow,
                  cached_inputs={1: "k_nope", 2: "v", 3: "k_rope"},
                  doc="causal multi-head latent attention core: per head q = [nope | rope(q_rope)], k = [k_nope | "
                      "rope(k_rope)] with k_rope shared by all heads, scale 1/sqrt(nope_dim + rope_dim); inputs q "
                      "[b,s,H*(dn+dr)], k_nope [b,n,H*dn], v [b,n,H*dv], k_rope [b,n,dr] with n >= s key positions (the "
                      "queries are the last s)"))


# ---- scaled_dot_product_attention (plain torch code) ----------------------------------------
SDPA_ATTRS = {"causal": False, "scale": None}


def _infer_sdpa(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    if len(ts) not in (3, 4):
        raise ValueError(f"sdpa takes q, k, v[, mask]; got {len(ts)} inputs")
    q, k, v = ts[:3]
    if min(q.rank, k.rank, v.rank) < 2 or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"sdpa: q {q}, k {k}, v {v} should be [..., L, E], [..., S, E], [..., S, Ev]")
    lead = broadcast_shapes(broadcast_shapes(q.shape[:-2], k.shape[:-2]), v.shape[:-2])
    if len(ts) == 4:
        broadcast_shapes(ts[3].shape, lead + (q.shape[-2], k.shape[-2]))
    return [TensorType(lead + (q.shape[-2], v.shape[-1]), q.dtype)]


def _sdpa(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    q, k, v = xs[:3]
    scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / np.sqrt(q.shape[-1])
    scores = (q @ np.swapaxes(k, -1, -2)) * scale
    L, S = scores.shape[-2:]
    if attrs["causal"]:
        scores = np.where(np.tril(np.ones((L, S), dtype=bool)), scores, -np.inf)
    if len(xs) == 4:
        mask = xs[3]
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
    scores = scores - scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(-1, keepdims=True)
    return [(p @ v).astype(np.float32)]


def _sdpa_flow(args: FlowArgs) -> Flow:
    """Leading axes broadcast; each query row reads all key/value rows. Keys packed with
    several samples along the sequence are fine only under a same-sample mask."""
    q, k, v = args.in_types[:3]
    r = args.out_types[0].rank

    def lead(rank: int) -> list:
        return broadcast_map(rank - 2, r - 2)

    maps = [[*lead(q.rank), r - 2, None], [*lead(k.rank), None, None], [*lead(v.rank), None, r - 1]]
    if len(args.ins) == 4:
        maps.append([*lead(args.in_types[3].rank), r - 2, None])
    packed = any(s.axis(t.rank - 2) for s, t in zip(args.ins[1:3], (k, v)))
    if packed and len(args.ins) == 4 and args.ins[0].axis(q.rank - 2):
        mask, m = args.ins[3], args.in_types[3].rank
        if mask.role == SAME_SAMPLE and {b.axis for b in mask.axes} == {m - 2, m - 1}:
            states = [args.ins[0]] + [
                BatchState(tuple(b for b in s.axes if b.axis != t.rank - 2), s.taints)
                for s, t in zip(args.ins[1:3], (k, v))]
            return Flow((combine(args, maps[:3], states=states, why=ACROSS_SAMPLES),), frozenset({3}))
    return one(combine(args, maps, why=ACROSS_SAMPLES))


def _sdpa_cost(ins, outs, attrs, env) -> Cost:
    s, e = ins[1].concrete(env)[-2:]
    return Cost(flops=2 * outs[0].numel(env) // max(outs[0].concrete(env)[-1], 1) * s * (e + ins[2].concrete(env)[-1]),
                bytes=4 * sum(t.numel(env) for t in (*ins, *outs)))


register_op(OpDef("sdpa", _infer_sdpa, _sdpa, SDPA_ATTRS, batch_flow=_sdpa_flow, cost=_sdpa_cost,
                  doc="softmax(q k^T * scale [causal] [mask]) v over the last two axes, numpy broadcasting of the "
                      "leading ones; a bool mask keeps True positions, a float mask is added"))
