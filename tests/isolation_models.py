"""Small plain-torch models for the batch-isolation tests: the leaks a served model can have
by accident, and the look-alikes that are isolated. Each is a few lines of ordinary torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mocompile.dsl import modules as M

HIDDEN = 8


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    """The module with deterministic small random parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5)
    return module


class DynamicQuant(nn.Module):
    """Quantize-dequantize to int8 with a scale computed at run time, per tensor or per token."""

    def __init__(self, per_token: bool) -> None:
        super().__init__()
        self.per_token = per_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_token:
            scale = x.abs().amax(-1, keepdim=True) / 127.0
        else:
            scale = x.abs().max() / 127.0
        return torch.clamp(torch.round(x / scale), -127, 127) * scale


class QuantLinear(nn.Module):
    def __init__(self, per_token: bool) -> None:
        super().__init__()
        self.quant = DynamicQuant(per_token)
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.quant(x))


class BatchNormNet(nn.Module):
    """Linear -> BatchNorm1d: batch statistics in training mode, running statistics in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.norm = nn.BatchNorm1d(HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class Norms(nn.Module):
    """LayerNorm and RMSNorm over the features of each token."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(HIDDEN)
        self.rms = M.RMSNorm(HIDDEN, 1e-5)
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rms(self.proj(self.ln(x)))


class SoftmaxOverBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.proj(x), dim=0)


class CenterByBatchMean(nn.Module):
    """A reduction over the batch axis: subtracting the batch mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


class TopkOverBatch(nn.Module):
    """Scales every sample by the best score among the top-2 samples of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = torch.topk(self.score(x), 2, dim=0)[0]
        return x * top.amax(0, keepdim=True)


class CumsumAcross(nn.Module):
    """A cumulative sum along the batch (dim 0) feeds values; along the sequence (dim 1) it stays per sample."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) / (1.0 + torch.cumsum(x.abs(), dim=self.dim))


class TopkRoutedMoE(nn.Module):
    """Per-token top-k routing into sparse experts (the DSL's Router and Experts)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = M.Router(HIDDEN, 4, 2)
        self.experts = M.Experts(4, HIDDEN, 16, "silu", True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, indices = self.router(x)
        return self.experts(x, weights, indices)


class SortedDispatchMoE(nn.Module):
    """Token-choice top-k MoE written as an explicit dispatch: copy each token k times, sort the
    copies by expert (contiguous per-expert buffers), run each copy through its expert, and put
    the results back by the inverse permutation: `restore` is "gather" (by argsort(order)),
    "scatter" (index_copy by order) or "none" (the bug: rows stay in expert order)."""

    def __init__(self, seq: int, restore: str, experts: int = 4, k: int = 2, ffn: int = 16) -> None:
        super().__init__()
        self.seq, self.k, self.restore = seq, k, restore
        self.router = nn.Linear(HIDDEN, experts, bias=False)
        self.up = nn.Parameter(torch.empty(experts, ffn, HIDDEN))
        self.down = nn.Parameter(torch.empty(experts, HIDDEN, ffn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, HIDDEN)
        weights, experts = torch.topk(torch.softmax(self.router(flat), dim=-1), self.k, dim=-1)
        expert_of = experts.reshape(-1)
        order = torch.argsort(expert_of, dim=0, stable=True)
        buffers = flat.repeat_interleave(self.k, dim=0).index_select(0, order)
        which = expert_of.index_select(0, order)
        h = F.silu(torch.matmul(self.up.index_select(0, which), buffers.unsqueeze(-1)))
        out = torch.matmul(self.down.index_select(0, which), h).squeeze(-1)
        if self.restore == "scatter":
            out = torch.zeros_like(out).index_copy(0, order, out)
        elif self.restore == "gather":
            out = out.index_select(0, torch.argsort(order, dim=0))
        out = out * weights.reshape(-1).unsqueeze(-1).index_select(0, order) if self.restore == "none" else \
            out * weights.reshape(-1).unsqueeze(-1)
        return out.reshape(-1, self.k, HIDDEN).sum(1).reshape(-1, self.seq, HIDDEN)


class PackedAttention(nn.Module):
    """Attention over several samples packed into one token axis (continuous batching), with
    or without the block-diagonal mask built from each token's sequence id."""

    def __init__(self, masked: bool, heads: int = 2) -> None:
        super().__init__()
        self.masked, self.heads = masked, heads
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(4))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, self.heads, HIDDEN // self.heads).transpose(0, 1)

    def forward(self, x: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        if self.masked:
            same = seq_ids.unsqueeze(1) == seq_ids.unsqueeze(0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=same)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(0, 1).reshape(-1, HIDDEN))


class KVCacheAttention(nn.Module):
    """One decoding step: the new token attends to its own sample's cached keys and values."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.d = heads, HIDDEN // heads
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(4))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, 1, self.heads, self.d).transpose(1, 2)

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
        q = self._heads(self.q(x))
        k = torch.cat([past_k, self._heads(self.k(x))], dim=2)
        v = torch.cat([past_v, self._heads(self.v(x))], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(-1, 1, HIDDEN)), k, v

