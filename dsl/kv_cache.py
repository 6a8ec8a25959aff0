"""Incremental decoding of the reference torch model, Hugging Face style, with the cache
passed explicitly so the same step can be timed eagerly, under torch.compile and through an
ONNX export (benchmarks/bench_models.py): `CachedStep(model)(ids, *past) -> (logits, *present)`
where past/present are per attention layer (keys, values) [batch, heads, positions, dim].
"""

from __future__ import annotations

import torch
from torch import nn

from mocompile.dsl.modules import AttentionCore, KVSlot, LatentAttentionCore


class CachedStep(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cores = [m for m in model.modules() if isinstance(m, (AttentionCore, LatentAttentionCore))]

    def forward(self, ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits of the positions in `ids` (following the cached ones) and the extended cache."""
        slots = [KVSlot(past[2 * i], past[2 * i + 1]) if past else KVSlot() for i in range(len(self.cores))]
        for core, slot in zip(self.cores, slots):
            core.cache = slot
        try:
            logits = self.model(ids)
        finally:
            for core in self.cores:
                core.cache = None
        return (logits, *[t for slot in slots for t in (slot.k, slot.v)])

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, cache) after the prompt `ids`."""
        logits, *cache = self(ids)
        return logits, cache
