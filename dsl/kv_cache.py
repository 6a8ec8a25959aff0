"""Incremental decoding of the reference torch model, Hugging Face style, with the cache
passed explicitly so the same step can be timed eagerly, under torch.compile and through an
ONNX export (benchmarks/bench_models.py): `CachedStep(model)(ids, *past) -> (logits, *present)`
where past/present are per attention layer (keys, values) [batch, heads, positions, dim];
`.segments({name: tensor}, *past)` takes a multimodal model's segments by name.
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
        return self.segments((ids,), *past)

    def segments(self, inputs: dict[str, torch.Tensor] | tuple[torch.Tensor, ...],
                 *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The same for the model's inputs in forward order, or by name (a multimodal model:
        positions after the cached ones in the model's segment order; a segment left out is
        empty, so text can follow an image/audio prompt)."""
        if isinstance(inputs, dict):
            batch = next(iter(inputs.values())).shape[0]
            inputs = {**{name: self._empty(name, batch) for name in self.model.input_types()}, **inputs}
        slots = [KVSlot(past[2 * i], past[2 * i + 1]) if past else KVSlot() for i in range(len(self.cores))]
        for core, slot in zip(self.cores, slots):
            core.cache = slot
        try:
            logits = self.model(**inputs) if isinstance(inputs, dict) else self.model(*inputs)
        finally:
            for core in self.cores:
                core.cache = None
        return (logits, *[t for slot in slots for t in (slot.k, slot.v)])

    def _empty(self, name: str, batch: int) -> torch.Tensor:
        """A segment with no positions."""
        t = self.model.input_types()[name]
        dtype = torch.int64 if t.dtype.startswith("int") else torch.float32
        return torch.zeros([batch if i == 0 else d if isinstance(d, int) else 0 for i, d in enumerate(t.shape)],
                           dtype=dtype)

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, cache) after the prompt `ids`."""
        logits, *cache = self(ids)
        return logits, cache
