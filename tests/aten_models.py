"""Small torch modules written the ways people write them, for the ATen isolation tests:
norms, MLPs, attention (masked, packed, nn.MultiheadAttention), convolutions, MoE layers
(loops over experts, sorted dispatch, capacity limits, expert choice), batch-mixing ops
and their per-sample look-alikes. None of them is written for mocompile."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

H = 8  # hidden size


class HandNorms(nn.Module):
    """LayerNorm and RMSNorm written out, reading the shape the way models do."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(torch.ones(H) * 1.5), nn.Parameter(torch.zeros(H) + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(dim=-1, keepdim=True)
        var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + 1e-5) * self.w + self.b
        rms = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        return rms.std(-1, keepdim=True) * rms + y.var(-1, unbiased=False, keepdim=True)


class TorchNorms(nn.Module):
    """torch.nn's norms over a sample's own features: LayerNorm, RMSNorm, GroupNorm, F.normalize."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.rms, self.gn = nn.LayerNorm(H), nn.RMSNorm(H), nn.GroupNorm(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [batch, 4, H]
        return F.normalize(self.gn(self.rms(self.ln(x))), dim=-1)


class MLP(nn.Module):
    """LayerNorm, Linear, ReLU, Linear, GELU, tanh, Dropout: the block the IR lowering refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, 16), nn.ReLU(), nn.Linear(16, H), nn.GELU(),
                                 nn.Dropout(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x)) + F.relu6(x) + F.leaky_relu(x)


class OrdinaryOps(nn.Module):
    """Shape reads, .T, chunk, split, flips, cumsums, sorts and scatters along a sample's own
    axes (x [batch, seq, H])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        a, c = x.chunk(2, dim=-1)
        y = torch.cat([c, a], dim=-1) + x.flip(1) + torch.roll(x, 1, dims=2) + x.cumsum(1)
        srt, idx = x.sort(dim=-1)
        y = y + torch.zeros_like(x).scatter(-1, idx, srt) + torch.gather(x, 1, x.argsort(1))
        y = y + x.transpose(1, 2).reshape(b, h, s).transpose(1, 2) + x.view(b, -1).softmax(-1).view(b, s, h)
        return y[:, :, : h // 2].repeat(1, 1, 2) + x.mT.mT


class Attention(nn.Module):
    """Multi-head self-attention written by hand, with an optional causal or padding mask."""

    def __init__(self, mask: str = "none", heads: int = 2) -> None:
        super().__init__()
        self.mask, self.heads = mask, heads
        self.qkv, self.o = nn.Linear(H, 3 * H), nn.Linear(H, H)
        self.register_buffer("causal", torch.tril(torch.ones(16, 16, dtype=torch.bool)))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.size()
        q, k, v = self.qkv(x).split(H, dim=-1)
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        att = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))
        if self.mask == "causal":
            att = att.masked_fill(~self.causal[:s, :s], float("-inf"))
        elif self.mask == "padding":
            att = att.masked_fill(~keep[:, None, None, :], float("-inf"))
        out = att.softmax(dim=-1) @ v
        return self.o(out.transpose(1, 2).contiguous().view(b, s, H))


class SdpaAttention(nn.Module):
    """Causal attention through F.scaled_dot_product_attention, rotary-free."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:2], 2, H // 2)
        q, k, v = (f(x).view(shape).transpose(1, 2) for f in (self.q, self.k, self.v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)


class TorchMHA(nn.Module):
    """nn.MultiheadAttention, batch-first or [seq, batch, hidden] (then batch_dim=1)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(H, 2, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn(x, x, x)


class PackedAttention(nn.Module):
    """Attention over sequences of several samples packed along one token axis; the
    block-diagonal mask from the sequence ids keeps them apart."""

    def __init__(self, masked: bool) -> None:
        super().__init__()
        self.masked = masked
        self.qkv, self.o = nn.Linear(H, 3 * H), nn.Linear(H, H)

    def forward(self, x: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, 2, H // 2).permute(1, 2, 0, 3)
        scores = q @ k.transpose(-1, -2) * (H // 2) ** -0.5
        if self.masked:
            same = seq_ids[:, None] == seq_ids[None, :]
            scores = scores.masked_fill(~same, float("-inf"))
        return self.o((scores.softmax(-1) @ v).transpose(0, 1).reshape(-1, H))


class ConvNet(nn.Module):
    """Conv1d, BatchNorm1d (eval: running statistics), ReLU, pooling over time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(4, H, 3, padding=1), nn.BatchNorm1d(H)
        self.pool = nn.AdaptiveAvgPool1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [batch, 4, time]
        return self.pool(F.relu(self.bn(self.conv(x)))).flatten(1)


class BatchStatistics(nn.Module):
    """Centred and scaled by statistics of the whole batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0)) / (x.std(0) + 1e-5)


class AlongAxis(nn.Module):
    """Ops along `dim` of x [batch, seq, H], summed: over dim 0 they run across samples."""

    def __init__(self, ops: tuple[str, ...], dim: int) -> None:
        super().__init__()
        self.ops, self.dim = ops, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dim
        along = {"flip": lambda: x.flip(d), "roll": lambda: torch.roll(x, 1, d), "cumsum": lambda: x.cumsum(d),
                 "sort": lambda: x.sort(dim=d).values, "max": lambda: x - x.amax(d, keepdim=True)}
        return sum(along[op]() for op in self.ops) + x


class DynamicQuant(nn.Module):
    """int8 quantise-dequantise with a scale from the running input: per token or per tensor."""

    def __init__(self, per_token: bool) -> None:
        super().__init__()
        self.per_token = per_token
        self.proj = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amax = x.abs().amax(dim=-1, keepdim=True) if self.per_token else x.abs().max()
        scale = amax.clamp(min=1e-8) / 127
        return self.proj((x / scale).round().clamp(-128, 127) * scale)


class Gathers(nn.Module):
    """Per-sample picks: x[arange(b), label] and gathering a sample's top features."""

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:  # x [batch, H], label [batch]
        picked = x[torch.arange(x.shape[0]), label]
        top = torch.topk(x, 3, dim=-1).indices
        return picked[:, None] * torch.gather(x, 1, top).sum(-1, keepdim=True) + x[:, [1, 3]].sum(-1, keepdim=True)


class CrossSampleIndex(nn.Module):
    """Every sample scaled by the row of the sample with the largest first feature."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x[x[:, 0].argmax()]


class ExpertLoopMoE(nn.Module):
    """Mixtral-style top-k MoE: a loop over experts, torch.where on the expert mask, and
    index_add_ of the expert outputs back. `capacity` keeps only the first tokens of each
    expert (the leak of capacity-limited routing)."""

    def __init__(self, experts: int = 3, k: int = 2, capacity: int | None = None) -> None:
        super().__init__()
        self.k, self.capacity = k, capacity
        self.gate = nn.Linear(H, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(H, 16), nn.SiLU(), nn.Linear(16, H))
                                     for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        flat = x.view(-1, h)
        weights, chosen = torch.topk(F.softmax(self.gate(flat), dim=-1), self.k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        mask = F.one_hot(chosen, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(mask[e])
            if self.capacity is not None:
                slot, token = slot[: self.capacity], token[: self.capacity]
            y = expert(flat[token]) * weights[token, slot, None]
            out.index_add_(0, token, y)
        return out.view(b, s, h)


class SortedMoE(nn.Module):
    """Top-k MoE dispatched by sorting the token copies by expert, per-copy expert weights,
    and index_add back to the tokens."""

    def __init__(self, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k = k
        self.gate = nn.Linear(H, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, 16, H) / 4)
        self.down = nn.Parameter(torch.randn(experts, H, 16) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(flat).softmax(-1).topk(self.k)
        order = chosen.flatten().argsort(stable=True)
        token, expert = order // self.k, chosen.flatten()[order]
        h = F.silu(torch.bmm(self.up[expert], flat[token].unsqueeze(-1)))
        y = torch.bmm(self.down[expert], h).squeeze(-1) * weights.flatten()[order, None]
        return torch.zeros_like(flat).index_add(0, token, y).view_as(x)


class CumsumCapacityMoE(nn.Module):
    """GShard-style capacity: each token's place in its expert's queue is a cumsum of the
    expert mask over every token of the batch; tokens past the capacity are dropped."""

    def __init__(self, experts: int = 4, capacity: int = 3) -> None:
        super().__init__()
        self.capacity = capacity
        self.gate, self.expert = nn.Linear(H, experts, bias=False), nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(0, 1)
        mask = F.one_hot(self.gate(flat).argmax(-1), self.gate.out_features)
        place = torch.cumsum(mask, dim=0) * mask
        kept = ((place > 0) & (place <= self.capacity)).any(-1, keepdim=True)
        return (self.expert(flat) * kept).view_as(x)


class ExpertChoiceMoE(nn.Module):
    """Expert choice: each expert takes its top-c tokens of the whole batch."""

    def __init__(self, experts: int = 3, c: int = 3) -> None:
        super().__init__()
        self.c = c
        self.gate, self.expert = nn.Linear(H, experts, bias=False), nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(0, 1)
        scores = self.gate(flat).softmax(-1).t()  # [experts, tokens]
        gate, token = scores.topk(self.c, dim=-1)
        out = torch.zeros_like(flat)
        for e in range(scores.shape[0]):
            out = out.index_add(0, token[e], self.expert(flat[token[e]]) * gate[e, :, None])
        return out.view_as(x)


class BranchOnValues(nn.Module):
    """Python control flow on tensor values: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


class Branches(nn.Module):
    """torch.cond on a learned flag (the same branch for every batch) or on the batch's mean."""

    def __init__(self, on_batch: bool) -> None:
        super().__init__()
        self.on_batch = on_batch
        self.flag, self.proj = nn.Parameter(torch.ones(1)), nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pred = x.mean() > 0 if self.on_batch else self.flag.sum() > 0
        return torch.cond(pred, lambda t: self.proj(t).relu(), lambda t: t - 1, (x,))


class FixedBatch(nn.Module):
    """Code that fixes the batch size (a literal in a view)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.view(4, -1)).view(4, 2, H)


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    """`module` in eval mode with deterministic parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if p.dim() == 1 else noise / max(p.shape[-1], 1) ** 0.5)
    return module.eval()
