"""Multi-head attention core (grouped-query, rotary positions, causal), kept whole.

The q/k/v/o projections are ordinary `linear` ops around it, so quantization and
scheduling treat them like any other matmul; this op is only what cannot be a matmul.
Tensors stay [batch, seq, heads*head_dim] so no reshapes appear in the IR.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from mocompile.ir.registry import REQUIRED, Cost, OpDef, register_op
from mocompile.ir.types import TensorType

ATTENTION_ATTRS = {"heads": REQUIRED, "kv_heads": REQUIRED, "head_dim": REQUIRED, "rope_theta": 0.0, "causal": True}


def _infer(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    q, k, v = ts
    h, hkv, d = attrs["heads"], attrs["kv_heads"], attrs["head_dim"]
    if h % hkv:
        raise ValueError(f"heads {h} not divisible by kv_heads {hkv}")
    if q.rank != 3 or q.shape[-1] != h * d:
        raise ValueError(f"attention q {q} should be [batch, seq, {h * d}]")
    for t in (k, v):
        if t.shape != q.shape[:2] + (hkv * d,):
            raise ValueError(f"attention k/v {t} should be [batch, seq, {hkv * d}]")
    return [q]


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
    h, hkv, d = attrs["heads"], attrs["kv_heads"], attrs["head_dim"]
    q = q.reshape(b, s, h, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, s, hkv, d).transpose(0, 2, 1, 3)
    v = v.reshape(b, s, hkv, d).transpose(0, 2, 1, 3)
    if attrs["rope_theta"] > 0:
        cos, sin = rope_tables(np.arange(s), d, attrs["rope_theta"])
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = h // hkv
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) / np.sqrt(d)
    if attrs["causal"]:
        scores = np.where(np.tril(np.ones((s, s), dtype=bool)), scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(-1, keepdims=True)
    out = (p @ v).transpose(0, 2, 1, 3).reshape(b, s, h * d)
    return [out.astype(np.float32)]


def _cost(ins, outs, attrs, env) -> Cost:
    b, s, hd = outs[0].concrete(env)
    return Cost(flops=4 * b * s * s * hd, bytes=4 * sum(t.numel(env) for t in (*ins, *outs)))


register_op(OpDef("attention", _infer, _compute, ATTENTION_ATTRS, cost=_cost,
                  doc="softmax(rope(q) rope(k)^T / sqrt(d) + causal mask) v, grouped-query"))
