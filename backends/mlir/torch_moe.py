"""Torch code of the MoE ops (mocompile/ir/ops/moe.py) for the mlir target, written so that
routing stays sparse in every dialect.

Routing: top-k as k rounds of argmax, each masking the expert it chose (comparison masks, no
`topk`): this legalises to TOSA too, where `topk` does not. Ties go to the lowest expert
index, as the reference's stable sort does; an expert whose score is -inf (outside a
token's modality group) is still ranked after every finite one and before those already
taken.

Dispatch: each token gathers the weights of its own top_k experts (an embedding lookup in
the flattened weight stack, which torch-mlir legalises to a gather in every dialect, TOSA's
`tosa.gather` included) and runs only those: the work of the sparse reference, never the
other experts. Nothing is made dense; the export notes in the manifest say so.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mocompile.backends.mlir.lower import LowerContext, torch_lowering
from mocompile.backends.mlir.torch_nn import ACTIVATIONS, fake_quant, rows_times
from mocompile.ir.graph import Node
from mocompile.ir.ops.moe import router_inputs

Tensors = Sequence[torch.Tensor]
NEG_INF = float("-inf")


def argmax_rounds(choice: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [..., k]: the k best entries of each row (last axis) of `choice`, best first
    (ties: lowest index), by k rounds of argmax that each mask the entry they took."""
    floor = torch.finfo(torch.float32).min  # a -inf choice still ranks above the taken ones
    key = torch.where(choice == NEG_INF, torch.full_like(choice, floor), choice)
    columns = torch.arange(choice.shape[-1])
    picks = []
    for _ in range(k):
        pick = torch.argmax(key, dim=-1)
        picks.append(pick)
        key = torch.where(columns == pick.unsqueeze(-1), torch.full_like(key, NEG_INF), key)
    return torch.stack(picks, dim=-1)


def _refuses_router(node: Node, dialect: str) -> str | None:
    a = node.attrs
    if a["capacity_factor"] is not None or a["routing"] != "token_choice":
        return (f"routing={a['routing']} capacity_factor={a['capacity_factor']} looks at the whole batch; only "
                "per-token (token_choice, no capacity) routing is exported")
    return None


# Tokens keep their leading axes ([batch, seq, ...]) throughout: torch-mlir 20261001 lowers a
# reshape that merges two dynamic axes (x.reshape(-1, hidden)) to linalg wrongly (it casts
# the second to size 1), so nothing here flattens them.
@torch_lowering("router.topk", refuses=_refuses_router)
def _router(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    a = node.attrs
    given = dict(zip(router_inputs(a), xs))
    x, w = given["x"], given["w"]
    e, k = w.shape[0], a["top_k"]
    logits = rows_times(x, w)  # [..., E]
    columns = torch.arange(e)
    allowed = None
    if a["groups"]:
        mods = given["modality_ids"].unsqueeze(-1)
        allowed = torch.ones_like(logits, dtype=torch.bool)
        for mod_id, start, end in a["groups"]:
            allowed = torch.where(mods == mod_id, (columns >= start) & (columns < end), allowed)
        logits = torch.where(allowed, logits, torch.full_like(logits, NEG_INF))
    if a["scoring"] == "softmax":
        z = torch.exp(logits - logits.amax(-1, keepdim=True))
        scores = z / z.sum(-1, keepdim=True)
    else:
        scores = torch.where(logits == NEG_INF, torch.zeros_like(logits), torch.sigmoid(logits))
    choice = scores if "score_bias" not in given else scores + given["score_bias"]
    if a["n_group"] > 1:
        g = a["n_group"]
        grouped = choice.reshape(*choice.shape[:-1], g, e // g)
        best = grouped.amax(-1)
        if a["group_score"] == "top2_sum":
            first = torch.argmax(grouped, dim=-1, keepdim=True)
            second = torch.where(torch.arange(e // g) == first, torch.full_like(grouped, NEG_INF), grouped).amax(-1)
            best = second + best
        keep = argmax_rounds(best, a["topk_group"])  # [..., topk_group]
        mask = (torch.arange(g).unsqueeze(-1) == keep.unsqueeze(-2)).any(-1)  # [..., g]
        fill = 0.0 if "score_bias" not in given else NEG_INF
        choice = torch.where(torch.repeat_interleave(mask, e // g, dim=-1), choice, torch.full_like(choice, fill))
    if allowed is not None:
        choice = torch.where(allowed, choice, torch.full_like(choice, NEG_INF))
    idx = argmax_rounds(choice, k)
    weights = torch.gather(scores, -1, idx)
    if a["normalize"]:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return [weights * a["routed_scale"], idx.to(torch.int32)]


@torch_lowering("experts")
def _experts(ctx: LowerContext, node: Node, xs: Tensors) -> list[torch.Tensor]:
    a = node.attrs
    x, w, idx = xs[:3]
    gate, up, down = xs[3:] if a["gated"] else (None, *xs[3:])
    idx = idx.to(torch.int64)
    ctx.note("experts", "sparse: each token gathers and runs only the weights of its top_k experts")
    act = ACTIVATIONS[a["activation"]]

    def times(stack: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Each token's vector v [..., (k,) B] times its own experts' weights stack[idx]
        [..., k, A, B]: a broadcast product summed over B (a batched matmul would merge the
        dynamic token axes, which torch-mlir lowers wrongly: see torch_nn.rows_times).
        stack[idx] is taken as an embedding lookup of the flattened stack: the same gather
        with an implicit index vector, which IREE lowers directly; indexing writes an
        explicit size-1 index vector, and IREE 3.13's StableHLO gather canonicalisation
        turns that into a static stablehlo.reshape of two dynamic dims, which is invalid."""
        rows = F.embedding(idx, stack.reshape(stack.shape[0], -1)).reshape(*idx.shape, *stack.shape[1:])
        return (rows * v.unsqueeze(-2)).sum(-1)

    tokens = x.unsqueeze(-2)  # [..., 1, H]: one row for every expert slot
    hidden = act(times(up if gate is None else gate, tokens))  # [..., k, F]
    if gate is not None:
        hidden = hidden * times(up, tokens)
    if a["hidden_quant"] is not None:
        hidden = fake_quant(hidden, a["hidden_quant"])
    y = times(down, hidden)  # [..., k, H]
    return [(y * w.unsqueeze(-1)).sum(-2)]
