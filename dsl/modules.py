"""Reference torch layers: the eager model every compiled artifact is checked against.

Written the way Hugging Face transformers writes Mixtral/DeepSeek MoE (a loop over the
experts that received tokens, `index_add_` back), never slowed down to flatter an artifact.
The layers the IR keeps whole (`AttentionCore`, `MLP`, `Router`, `Experts`, `RMSNorm`) are
torch.fx leaf modules; everything around them is traced through.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AttentionCore(nn.Module):
    """Grouped-query causal attention with rotary positions on [batch, seq, heads*dim]."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, rope_theta: float, causal: bool = True) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rope_theta, self.causal = rope_theta, causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, s, _ = q.shape
        d = self.head_dim
        q = q.view(b, s, self.heads, d).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, d).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, d).transpose(1, 2)
        if self.rope_theta > 0:
            inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
            freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=self.heads != self.kv_heads)
        return out.transpose(1, 2).reshape(b, s, self.heads * d)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, rope_theta: float) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.core = AttentionCore(heads, kv_heads, head_dim, rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.core(self.q_proj(x), self.k_proj(x), self.v_proj(x)))


class MLP(nn.Module):
    """A dense feed-forward block: down(act(gate(x)) * up(x)), or down(act(up(x)))."""

    def __init__(self, hidden: int, ffn: int, activation: str, gated: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False) if gated else None
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)
        self.activation, self.gated = activation, gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        h = act(self.gate_proj(x)) * self.up_proj(x) if self.gate_proj is not None else act(self.up_proj(x))
        return self.down_proj(h)


class Router(nn.Module):
    """Top-k token-choice router. Returns (weights [..., k], indices [..., k] int64).

    Semantics (mirrored exactly by the IR's `router.topk`): optional modality groups (a
    token sees only its group's experts), softmax or sigmoid scores, DeepSeek-V3
    group-limited selection, optional renormalisation, routed scale, optional capacity
    limit with token dropping.
    """

    def __init__(self, hidden: int, experts: int, top_k: int, scoring: str = "softmax", normalize: bool = True,
                 routed_scale: float = 1.0, n_group: int = 1, topk_group: int = 1,
                 groups: tuple[tuple[int, int, int], ...] = (), capacity_factor: float | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        self.experts, self.top_k, self.scoring, self.normalize = experts, top_k, scoring, normalize
        self.routed_scale, self.n_group, self.topk_group = routed_scale, n_group, topk_group
        self.groups, self.capacity_factor = tuple(groups), capacity_factor

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        lead = x.shape[:-1]
        logits = F.linear(x.reshape(-1, x.shape[-1]), self.weight)
        t, e = logits.shape
        allowed = None
        if self.groups:
            mods = modality_ids.reshape(-1)
            allowed = torch.ones(t, e, dtype=torch.bool)
            for mod_id, start, end in self.groups:
                rows = mods == mod_id
                allowed[rows] = False
                allowed[rows, start:end] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
        if self.scoring == "softmax":
            scores = logits.softmax(dim=-1)
        else:
            scores = torch.sigmoid(logits)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, 0.0)
        choice = scores
        if self.n_group > 1:
            grouped = scores.view(t, self.n_group, e // self.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
            keep = group_score.topk(self.topk_group, dim=-1, sorted=False).indices
            mask = torch.zeros_like(group_score).scatter_(1, keep, 1.0).bool()
            choice = scores.masked_fill(~mask.repeat_interleave(e // self.n_group, dim=-1), 0.0)
        if allowed is not None:
            choice = choice.masked_fill(~allowed, float("-inf"))
        idx = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        if self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scale
        if self.capacity_factor is not None:
            weights = self._drop_over_capacity(weights, idx)
        return weights.reshape(*lead, self.top_k), idx.reshape(*lead, self.top_k)

    def _drop_over_capacity(self, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        t, k = idx.shape
        capacity = math.ceil(self.capacity_factor * t * k / self.experts)
        # position of each assignment in its expert's queue, slot-major then token order
        onehot = F.one_hot(idx.t().reshape(-1), self.experts)
        position = (onehot.cumsum(0) * onehot).sum(-1) - 1
        keep = (position < capacity).view(k, t).t()
        return weights * keep


class Experts(nn.Module):
    """Routed experts with stacked weights; runs each expert only on its tokens (HF style)."""

    def __init__(self, experts: int, hidden: int, ffn: int, activation: str, gated: bool) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.empty(experts, ffn, hidden)) if gated else None
        self.up = nn.Parameter(torch.empty(experts, ffn, hidden))
        self.down = nn.Parameter(torch.empty(experts, hidden, ffn))
        self.experts, self.activation, self.gated = experts, activation, gated

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        flat = x.reshape(-1, x.shape[-1])
        k = indices.shape[-1]
        flat_w, flat_i = weights.reshape(-1, k), indices.reshape(-1, k)
        out = torch.zeros_like(flat)
        hit = F.one_hot(flat_i, self.experts).permute(2, 1, 0)  # [experts, k, tokens]
        for e in torch.nonzero(hit.sum((1, 2))).flatten().tolist():
            slot, tok = torch.where(hit[e])
            cur = flat[tok]
            up = cur @ self.up[e].t()
            h = act(cur @ self.gate[e].t()) * up if self.gate is not None else act(up)
            out.index_add_(0, tok, (h @ self.down[e].t()) * flat_w[tok, slot, None])
        return out.reshape(x.shape)


class MoEBlock(nn.Module):
    def __init__(self, router: Router, experts: Experts, shared: MLP | None) -> None:
        super().__init__()
        self.router, self.experts, self.shared = router, experts, shared

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None) -> torch.Tensor:
        weights, indices = self.router(x, modality_ids) if self.router.groups else self.router(x)
        y = self.experts(x, weights, indices)
        if self.shared is not None:
            y = y + self.shared(x)
        return y


@torch.fx.wrap
def segment_ids(segments: list[torch.Tensor], ids: list[int]) -> torch.Tensor:
    """int32 [batch, total_seq]: the modality id of every position (segments are [batch, S_i, ...])."""
    row = torch.cat([torch.full((s.shape[1],), i, dtype=torch.int32) for s, i in zip(segments, ids)])
    return row.expand(segments[0].shape[0], row.shape[0])


class DecoderLayer(nn.Module):
    def __init__(self, attn_norm: nn.Module, attn: Attention, ffn_norm: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn

    def forward(self, h: torch.Tensor, modality_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h))
        x = self.ffn_norm(h)
        if isinstance(self.ffn, MoEBlock) and self.ffn.router.groups:
            return h + self.ffn(x, modality_ids)
        return h + self.ffn(x)
