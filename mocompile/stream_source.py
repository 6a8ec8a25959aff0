"""A Hugging Face checkpoint made into IR without holding its weights: the streamed import.

The reference model is built on torch's meta device (shapes only, no storage), traced and
lowered as usual, and every IR weight becomes a `LazyWeight` that reads its tensors from the
checkpoint's safetensors shards when a reader asks (one shard open at a time, the pieces of
the weight plan stacked or sliced as `hf_weights` plans them, cast to float32). So importing
a 7B-parameter checkpoint costs its graph structure, not its 28 GB of float32 weights; the
quantize pass then reads one float weight at a time and keeps only its low-bit codes, and the
verification's reference (the IR interpreter) reads each node's weights as it runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mocompile.dsl.hf_import import HFCheckpoint
from mocompile.dsl.hf_weights import CheckpointFiles, Target, copy_pieces, plan_weights
from mocompile.ir.weights import LazyWeight


def _reader(files: CheckpointFiles, target: Target):
    """A function reading `target`'s float32 array from the shards (each shard opened once;
    bf16/fp16 cast to float32 while copying)."""
    def load() -> np.ndarray:
        import torch

        out = np.empty(target.shape, np.float32)
        copy_pieces([target], files, lambda t, slot: torch.from_numpy(out[slot] if t.stacked else out))
        return out
    return load


def lazy_weights(ckpt: HFCheckpoint) -> tuple[Any, dict[int, LazyWeight]]:
    """The reference model of `ckpt` on the meta device, and for each of its parameters (by
    id; tied ones once) the LazyWeight reading it; the plan is checked against the shard
    headers first (a missing or misshapen tensor is a one-line MocompileError)."""
    import torch

    from mocompile.dsl.builder import new_model

    with torch.device("meta"):
        model = new_model(ckpt.spec).eval()
    params = dict(model.named_parameters())  # tied parameters appear once, under their first name
    targets, files = plan_weights(ckpt, {name: tuple(p.shape) for name, p in params.items()})
    lazy = {id(params[t.name]): LazyWeight(tuple(t.shape), "float32", _reader(files, t),
                                           f"{Path(ckpt.path).name}:{t.name}") for t in targets}
    return model, lazy
