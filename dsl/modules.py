"""Reference torch layers: the eager model every compiled artifact is checked against.

Written the way Hugging Face transformers writes Mixtral/DeepSeek MoE (a loop over the
experts that received tokens, `index_add_` back), never slowed down to flatter an artifact.
The layers the IR keeps whole (`AttentionCore`, `MLP`, `Router`, `Experts`, `RMSNorm`) are
torch.fx leaf modules; everything around them is traced through.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from mocompile.dsl.spec import MLASpec

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, or with `grouped` over each consecutive `hidden`-sized
    piece of it (one attention head each: Qwen3-MoE's per-head q/k norm)."""

    def __init__(self, hidden: int, eps: float, grouped: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps, self.grouped = eps, grouped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.grouped:
            x = x.reshape(*shape[:-1], -1, self.weight.shape[0])
        var = x.pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(var + self.eps) * self.weight).reshape(shape)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(seq: int, dim: int, theta: float, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [seq, dim] of rotate-half rotary embeddings at positions start..start+seq-1."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(start, start + seq, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class KVSlot:
    """One attention layer's KV cache in the reference model, kept the way Hugging Face's
    DynamicCache keeps it: keys (after rope) and values [batch, heads, positions, dim] of
    the positions seen so far, concatenated with each call's new ones."""

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> None:
        self.k, self.v = k, v

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            k, v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        self.k, self.v = k, v
        return k, v


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, causal: bool,
                     gqa: bool = False) -> torch.Tensor:
    """SDPA of queries at positions past.. against keys at 0..past+s-1 (causal: each query
    sees the keys up to its own position)."""
    s = q.shape[2]
    if not causal or (past > 0 and s == 1):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = torch.arange(past, past + s)[:, None] >= torch.arange(past + s)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class AttentionCore(nn.Module):
    """Grouped-query causal attention with rotary positions on [batch, seq, heads*dim].

    `cache` (a KVSlot, set only while decoding incrementally: see dsl/kv_cache.py) holds the
    earlier positions; it is None whenever the model is traced, so the traced graph is the
    plain full-sequence forward."""

    cache: KVSlot | None = None

    def __init__(self, heads: int, kv_heads: int, head_dim: int, rope_theta: float, causal: bool = True) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rope_theta, self.causal = rope_theta, causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, s, _ = q.shape
        d = self.head_dim
        past = self.cache.length if self.cache is not None else 0
        q = q.view(b, s, self.heads, d).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, d).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, d).transpose(1, 2)
        if self.rope_theta > 0:
            cos, sin = rope_cos_sin(s, d, self.rope_theta, start=past)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.extend(k, v)
        out = cached_attention(q, k, v, past, self.causal, gqa=self.heads != self.kv_heads)
        return out.transpose(1, 2).reshape(b, s, self.heads * d)


class Attention(nn.Module):
    """Projections around `AttentionCore`: optional q/k/v and output biases (Qwen), and an
    optional RMSNorm of q and k before rope, over each whole projection ("whole", OLMoE) or
    over each head ("per_head", Qwen3-MoE)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, rope_theta: float,
                 qkv_bias: bool = False, out_bias: bool = False, qk_norm: str = "none", eps: float = 1e-5) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=out_bias)
        self.q_norm = self.k_norm = None
        if qk_norm == "whole":
            self.q_norm, self.k_norm = RMSNorm(heads * head_dim, eps), RMSNorm(kv_heads * head_dim, eps)
        elif qk_norm == "per_head":
            self.q_norm, self.k_norm = RMSNorm(head_dim, eps, grouped=True), RMSNorm(head_dim, eps, grouped=True)
        self.core = AttentionCore(heads, kv_heads, head_dim, rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.q_proj(x), self.k_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(self.core(q, k, self.v_proj(x)))


# DeepSeek normalises its latents with RMSNorm's default eps, whatever rms_norm_eps says.
MLA_NORM_EPS = 1e-6


class LatentAttentionCore(nn.Module):
    """The attention part of multi-head latent attention on [batch, seq, heads*dim] tensors.

    q: [b, s, H*(dn+dr)] (per head: nope channels, then rope channels); k_nope: [b, s, H*dn];
    v: [b, s, H*dv]; k_rope: [b, s, dr], one rotary key per position shared by every head.
    Rope (rotate-half) is applied to the rope channels of q and to k_rope; scores are scaled
    by 1/sqrt(dn+dr); causal.
    """

    cache: KVSlot | None = None  # as in AttentionCore: per-head keys [k_nope | rope(k_rope)] and values

    def __init__(self, heads: int, nope_dim: int, rope_dim: int, v_dim: int, rope_theta: float) -> None:
        super().__init__()
        self.heads, self.nope_dim, self.rope_dim, self.v_dim = heads, nope_dim, rope_dim, v_dim
        self.rope_theta = rope_theta

    def forward(self, q: torch.Tensor, k_nope: torch.Tensor, v: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        b, s, _ = q.shape
        h, dn, dr, dv = self.heads, self.nope_dim, self.rope_dim, self.v_dim
        past = self.cache.length if self.cache is not None else 0
        q = q.view(b, s, h, dn + dr).transpose(1, 2)
        k_nope = k_nope.view(b, s, h, dn).transpose(1, 2)
        v = v.view(b, s, h, dv).transpose(1, 2)
        cos, sin = rope_cos_sin(s, dr, self.rope_theta, start=past)
        q = torch.cat((q[..., :dn], apply_rope(q[..., dn:], cos, sin)), dim=-1)
        k_rope = apply_rope(k_rope.view(b, 1, s, dr), cos, sin).expand(b, h, s, dr)
        k = torch.cat((k_nope, k_rope), dim=-1)
        if self.cache is not None:
            k, v = self.cache.extend(k, v)
        out = cached_attention(q, k, v, past, causal=True)
        return out.transpose(1, 2).reshape(b, s, h * dv)


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3) with every projection a plain linear.

    Queries: q_proj, or q_a_proj -> RMSNorm -> q_b_proj. Keys and values: kv_a_proj -> RMSNorm
    gives the latent, expanded by k_b_proj (per-head nope keys) and v_b_proj (values);
    k_rope_proj gives the shared rotary key. (A Hugging Face checkpoint fuses kv_a_proj with
    k_rope_proj and k_b_proj with v_b_proj; the importer splits them.)
    """

    def __init__(self, hidden: int, heads: int, mla: "MLASpec", rope_theta: float, out_bias: bool = False) -> None:
        super().__init__()
        dq = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank:
            self.q_a_proj = nn.Linear(hidden, mla.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(mla.q_lora_rank, MLA_NORM_EPS)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, heads * dq, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, heads * dq, bias=False)
        self.kv_a_proj = nn.Linear(hidden, mla.kv_lora_rank, bias=False)
        self.kv_a_norm = RMSNorm(mla.kv_lora_rank, MLA_NORM_EPS)
        self.k_rope_proj = nn.Linear(hidden, mla.qk_rope_head_dim, bias=False)
        self.k_b_proj = nn.Linear(mla.kv_lora_rank, heads * mla.qk_nope_head_dim, bias=False)
        self.v_b_proj = nn.Linear(mla.kv_lora_rank, heads * mla.v_head_dim, bias=False)
        self.o_proj = nn.Linear(heads * mla.v_head_dim, hidden, bias=out_bias)
        self.core = LatentAttentionCore(heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim, rope_theta)
        self.low_rank_q = bool(mla.q_lora_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if self.low_rank_q else self.q_proj(x)
        latent = self.kv_a_norm(self.kv_a_proj(x))
        out = self.core(q, self.k_b_proj(latent), self.v_b_proj(latent), self.k_rope_proj(x))
        return self.o_proj(out)


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
    token sees only its group's experts), softmax or sigmoid scores, an optional score bias
    used only to choose experts (DeepSeek-V3), group-limited selection (groups scored by the
    sum of their top-2 choice scores, DeepSeek-V3, or their best one, DeepSeek-V2), optional
    renormalisation, routed scale, optional capacity limit with token dropping.
    """

    def __init__(self, hidden: int, experts: int, top_k: int, scoring: str = "softmax", normalize: bool = True,
                 routed_scale: float = 1.0, n_group: int = 1, topk_group: int = 1,
                 groups: tuple[tuple[int, int, int], ...] = (), capacity_factor: float | None = None,
                 score_bias: bool = False, group_score: str = "top2_sum") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        self.score_bias = nn.Parameter(torch.zeros(experts)) if score_bias else None
        self.experts, self.top_k, self.scoring, self.normalize = experts, top_k, scoring, normalize
        self.routed_scale, self.n_group, self.topk_group = routed_scale, n_group, topk_group
        self.groups, self.capacity_factor, self.group_score = tuple(groups), capacity_factor, group_score

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
        choice = scores if self.score_bias is None else scores + self.score_bias
        if self.n_group > 1:
            grouped = choice.view(t, self.n_group, e // self.n_group)
            if self.group_score == "top2_sum":
                group_score = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_score = grouped.amax(-1)
            keep = group_score.topk(self.topk_group, dim=-1, sorted=False).indices
            mask = torch.zeros_like(group_score).scatter_(1, keep, 1.0).bool()
            fill = 0.0 if self.score_bias is None else float("-inf")  # biased choice scores may be negative
            choice = choice.masked_fill(~mask.repeat_interleave(e // self.n_group, dim=-1), fill)
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
        # Graph exporters (ONNX) cannot express the data-dependent loop below; this switch selects
        # an equivalent, still sparse, loop-free form (see forward_gathered). Off by default.
        self.export_friendly = False

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.export_friendly:
            return self.forward_gathered(x, weights, indices)
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

    def forward_gathered(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Gather each token's top-k experts' weights and contract: no loop, still sparse (only
        chosen experts are read), at the cost of one weight copy per (token, slot)."""
        act = ACTIVATIONS[self.activation]
        flat = x.reshape(-1, x.shape[-1])
        k = indices.shape[-1]
        idx = indices.reshape(-1, k)
        up = torch.einsum("th,tkfh->tkf", flat, self.up[idx])
        h = act(torch.einsum("th,tkfh->tkf", flat, self.gate[idx])) * up if self.gate is not None else act(up)
        y = torch.einsum("tkf,tkhf->tkh", h, self.down[idx])
        return (y * weights.reshape(-1, k, 1)).sum(1).reshape(x.shape)


class MoEBlock(nn.Module):
    """Routed experts plus optional shared experts, whose output may be scaled by a learned
    sigmoid gate per token (Qwen2-MoE's shared_expert_gate)."""

    def __init__(self, router: Router, experts: Experts, shared: MLP | None,
                 shared_gate: nn.Linear | None = None) -> None:
        super().__init__()
        self.router, self.experts, self.shared, self.shared_gate = router, experts, shared, shared_gate

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None) -> torch.Tensor:
        weights, indices = self.router(x, modality_ids) if self.router.groups else self.router(x)
        y = self.experts(x, weights, indices)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            y = y + shared
        return y


@torch.fx.wrap
def segment_ids(segments: list[torch.Tensor], ids: list[int]) -> torch.Tensor:
    """int32 [batch, total_seq]: the modality id of every position (segments are [batch, S_i, ...])."""
    row = torch.cat([torch.full((s.shape[1],), i, dtype=torch.int32) for s, i in zip(segments, ids)])
    return row.expand(segments[0].shape[0], row.shape[0])


class DecoderLayer(nn.Module):
    def __init__(self, attn_norm: nn.Module, attn: Attention | LatentAttention, ffn_norm: nn.Module,
                 ffn: nn.Module) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn

    def forward(self, h: torch.Tensor, modality_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h))
        x = self.ffn_norm(h)
        if isinstance(self.ffn, MoEBlock) and self.ffn.router.groups:
            return h + self.ffn(x, modality_ids)
        return h + self.ffn(x)
