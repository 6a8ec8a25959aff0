"""Torch code of the attention ops (mocompile/ir/ops/attention.py) for the mlir target.

Keys and values may cover more positions than the queries (a cached step: the IR's
kv_cache.cached_graph puts the earlier positions in front of them), so rotary positions and
the causal mask follow the offset kv_len - seq, read from the shapes: the exported `step`
takes a cache of any length.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mocompile.backends.mlir.lower import LowerContext, torch_lowering
from mocompile.ir.graph import Node

Tensors = Sequence[torch.Tensor]


def rope_tables(n: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [n, head_dim] for positions 0..n-1 (attention.rope_tables, rotate-half)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return torch.cos(emb), torch.sin(emb)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def causal_softmax(scores: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Softmax over the keys, query i (at position kv_len - seq + i) seeing keys 0..kv_len-seq+i."""
    s, n = scores.shape[-2], scores.shape[-1]
    if causal:
        keep = torch.arange(n)[None, :] <= torch.arange(s)[:, None] + (n - s)
        scores = torch.where(keep, scores, torch.full_like(scores, float("-inf")))
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    return p / p.sum(-1, keepdim=True)


@torch_lowering("attention")
def _attention(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    q, k, v = xs
    a = node.attrs
    h, hkv, d = a["heads"], a["kv_heads"], a["head_dim"]
    b, s, n = q.shape[0], q.shape[1], k.shape[1]
    q = q.reshape(b, s, h, d).transpose(1, 2)
    k = k.reshape(b, n, hkv, d).transpose(1, 2)
    v = v.reshape(b, n, hkv, d).transpose(1, 2)
    if a["rope_theta"] > 0:
        cos, sin = rope_tables(n, d, a["rope_theta"])
        q, k = apply_rope(q, cos[n - s:], sin[n - s:]), apply_rope(k, cos, sin)
    if h != hkv:
        k, v = torch.repeat_interleave(k, h // hkv, dim=1), torch.repeat_interleave(v, h // hkv, dim=1)
    p = causal_softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d), a["causal"])
    return [torch.matmul(p, v).transpose(1, 2).reshape(b, s, h * d)]


@torch_lowering("attention.mla")
def _mla(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    q, k_nope, v, k_rope = xs
    a = node.attrs
    h, dn, dr, dv = a["heads"], a["nope_dim"], a["rope_dim"], a["v_dim"]
    b, s, n = q.shape[0], q.shape[1], k_nope.shape[1]
    q = q.reshape(b, s, h, dn + dr).transpose(1, 2)
    cos, sin = rope_tables(n, dr, a["rope_theta"])
    q = torch.cat([q[..., :dn], apply_rope(q[..., dn:], cos[n - s:], sin[n - s:])], dim=-1)
    k_rope = apply_rope(k_rope.reshape(b, 1, n, dr), cos, sin).expand(b, h, n, dr)
    k = torch.cat([k_nope.reshape(b, n, h, dn).transpose(1, 2), k_rope], dim=-1)
    v = v.reshape(b, n, h, dv).transpose(1, 2)
    p = causal_softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dn + dr))
    return [torch.matmul(p, v).transpose(1, 2).reshape(b, s, h * dv)]


@torch_lowering("sdpa")
def _sdpa(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    q, k, v = xs[:3]
    scale = node.attrs["scale"] if node.attrs["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if len(xs) == 4:
        mask = xs[3]
        scores = torch.where(mask, scores, torch.full_like(scores, float("-inf"))) if mask.dtype == torch.bool \
            else scores + mask
    if node.attrs["causal"]:  # sdpa's causal mask is the square one (no offset)
        L, S = scores.shape[-2], scores.shape[-1]
        keep = torch.arange(S)[None, :] <= torch.arange(L)[:, None]
        scores = torch.where(keep, scores, torch.full_like(scores, float("-inf")))
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    return [torch.matmul(p / p.sum(-1, keepdim=True), v)]
