"""Torch code of the dense, elementwise, layout and quantization ops (the mlir target).

Each function mirrors its op's numpy reference in mocompile/ir/ops/: same formula, same
float32 arithmetic, so the exported module computes what the interpreter does. Low-bit
weights stay integer tensors in the exported program and are dequantized in it (`dequantize`
below), so the MLIR carries the int8 (or packed int4) codes and their scales.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from mocompile.backends.mlir.lower import LowerContext, torch_lowering
from mocompile.ir.graph import Node
from mocompile.ir.ops.quant import INT4_MIN, INT8_MAX

Tensors = Sequence[torch.Tensor]
ACTIVATIONS = {"silu": lambda x: x / (1.0 + torch.exp(-x)), "gelu": F.gelu}


def rows_times(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w.T for a weight w [N, K], without merging x's leading axes: torch-mlir
    20261001 lowers a reshape that merges two dynamic axes ([batch, seq, K] -> [batch*seq, K],
    which torch.matmul of a 3-D by a 2-D tensor decomposes into) to linalg wrongly, so a
    3-D x is multiplied by the weight broadcast over its batch (a batched matmul)."""
    if x.dim() <= 2:
        return torch.matmul(x, w.t())
    return torch.matmul(x, w.t().expand(*x.shape[:-2], w.shape[1], w.shape[0]))


def _axis_list(attrs: dict[str, Any], rank: int) -> list[int]:
    return list(range(rank)) if attrs["axes"] is None else sorted({a % rank for a in attrs["axes"]})


# ---- elementwise -------------------------------------------------------------------------------
def _pointwise(fn: Callable[..., torch.Tensor]) -> Callable[[LowerContext, Node, Tensors], list[torch.Tensor]]:
    return lambda ctx, node, xs: [fn(*xs)]


for _op, _fn in {"add": torch.add, "mul": torch.mul, "sub": torch.sub, "eq": torch.eq,
                 "logical_and": torch.logical_and, "silu": ACTIVATIONS["silu"], "gelu": F.gelu,
                 "sigmoid": torch.sigmoid, "abs": torch.abs, "round": torch.round}.items():
    torch_lowering(_op)(_pointwise(_fn))


@torch_lowering("div")
def _div(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    a, b = xs
    return [a / b if a.is_floating_point() else torch.div(a, b, rounding_mode="floor")]


@torch_lowering("clamp")
def _clamp(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    return [torch.clamp(xs[0], node.attrs["min"], node.attrs["max"])]


# ---- reductions --------------------------------------------------------------------------------
def _reduction(fn: Callable[..., torch.Tensor]) -> Callable[[LowerContext, Node, Tensors], list[torch.Tensor]]:
    def lower(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
        return [fn(xs[0], dim=_axis_list(node.attrs, xs[0].dim()), keepdim=node.attrs["keepdim"])]

    return lower


for _op, _fn in {"sum": torch.sum, "mean": torch.mean, "amax": torch.amax}.items():
    torch_lowering(_op)(_reduction(_fn))


@torch_lowering("softmax")
def _softmax(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    x, axis = xs[0], node.attrs["axis"]
    z = torch.exp(x - x.amax(axis, keepdim=True))
    return [z / z.sum(axis, keepdim=True)]


@torch_lowering("cumsum")
def _cumsum(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    return [torch.cumsum(xs[0], node.attrs["axis"]).to(xs[0].dtype)]


# ---- layout ------------------------------------------------------------------------------------
@torch_lowering("reshape")
def _reshape(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    return [xs[0].reshape([d if isinstance(d, int) else -1 for d in node.attrs["shape"]])]


@torch_lowering("permute")
def _permute(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    return [xs[0].permute(*node.attrs["perm"]).contiguous()]


@torch_lowering("repeat_interleave")
def _repeat(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    return [torch.repeat_interleave(xs[0], node.attrs["repeats"], dim=node.attrs["axis"])]


@torch_lowering("index_select")
def _index_select(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    return [torch.index_select(xs[0], node.attrs["axis"], xs[1].to(torch.int64))]


@torch_lowering("zeros_like")
def _zeros_like(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    return [torch.zeros_like(xs[0])]


@torch_lowering("concat")
def _concat(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    return [torch.cat(list(xs), dim=node.attrs["axis"])]


@torch_lowering("segment_ids")
def _segment_ids(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    row = torch.cat([torch.full((x.shape[1],), i, dtype=torch.int32) for x, i in zip(xs, node.attrs["ids"])])
    return [row.unsqueeze(0).expand(xs[0].shape[0], -1)]


# ---- dense layers ------------------------------------------------------------------------------
@torch_lowering("embedding")
def _embedding(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    return [F.embedding(xs[0].to(torch.int64), xs[1])]


@torch_lowering("linear")
def _linear(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    y = rows_times(xs[0], xs[1])
    return [y + xs[2] if len(xs) == 3 else y]


@torch_lowering("matmul")
def _matmul(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    return [torch.matmul(xs[0], xs[1])]


@torch_lowering("rmsnorm")
def _rmsnorm(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    x, w = xs
    shape, group = x.shape, node.attrs["group"]
    if group is not None:
        x = x.reshape(*shape[:-1], -1, group)
    var = torch.mean(x * x, dim=-1, keepdim=True)
    return [(x / torch.sqrt(var + node.attrs["eps"]) * w).reshape(shape)]


@torch_lowering("layernorm")
def _layernorm(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    x, w, b = xs
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return [(x - mu) / torch.sqrt(var + node.attrs["eps"]) * w + b]


@torch_lowering("batch_norm")
def _batch_norm(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    x, w, b = xs[:3]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if node.attrs["use_batch_stats"]:
        axes = [0, *range(2, x.dim())]
        mean, var = x.mean(axes), x.var(axes, unbiased=False)
    else:
        mean, var = xs[3], xs[4]
    return [(x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + node.attrs["eps"]) * w.reshape(shape)
            + b.reshape(shape)]


def fake_quant(x: torch.Tensor, mode: str, static: torch.Tensor | None = None) -> torch.Tensor:
    """x rounded to int8 codes and back (quant.fake_quant): static, per-row or per-tensor scale."""
    if mode == "static":
        scale = static.reshape((1,) * x.dim())
    else:
        amax = x.abs().amax(-1, keepdim=True) if mode == "token" else x.abs().amax(list(range(x.dim())), keepdim=True)
        scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX) * scale


def ffn(x: torch.Tensor, gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor, activation: str,
        hidden_quant: str | None) -> torch.Tensor:
    """nn.ffn in torch: the feed-forward block of mlp and of each routed expert."""
    act = ACTIVATIONS[activation]
    h = act(rows_times(x, gate)) * rows_times(x, up) if gate is not None else act(rows_times(x, up))
    if hidden_quant is not None:
        h = fake_quant(h, hidden_quant)
    return rows_times(h, down)


@torch_lowering("mlp")
def _mlp(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    x, *ws = xs
    gate, up, down = ws if node.attrs["gated"] else (None, *ws)
    return [ffn(x, gate, up, down, node.attrs["activation"], node.attrs["hidden_quant"])]


# ---- quantization ------------------------------------------------------------------------------
def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Packed bytes [..., K/2] -> int32 [..., K] in [-8, 7] (quant.unpack_int4), in integer
    arithmetic every dialect legalises (no bitwise ops): low nibble = p mod 16, high = p div 16
    mod 16. The bytes may be uint8 or the same bits read as int8 (emit_torch.torch_weights)."""
    wide = p.to(torch.int32)
    hi = torch.div(wide, 16, rounding_mode="floor")
    lo = wide - hi * 16
    hi = hi - 16 * torch.div(hi, 16, rounding_mode="floor")  # an int8 byte of 128 and up: its high nibble
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], 2 * p.shape[-1]) + INT4_MIN


@torch_lowering("dequantize")
def _dequantize(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    q, scale = xs
    values = unpack_int4(q) if node.attrs["bits"] == 4 else q
    grouped = values.reshape(*values.shape[:-1], scale.shape[-1], -1).to(torch.float32)
    return [(grouped * scale.unsqueeze(-1)).reshape(values.shape)]


@torch_lowering("quantize_act")
def _quantize_act(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    return [fake_quant(xs[0], node.attrs["mode"], xs[1] if len(xs) == 2 else None)]
