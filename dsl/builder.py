"""Spec -> torch.nn.Module: the numerical reference model.

Weights are deterministic from a seed and a parameter's *name* (not construction order),
so the full model and any elastic variant agree on every shared weight; a variant's
weights are sliced out of the full model's (same layers, the kept experts' rows).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from torch import nn

from mocompile.dsl import modules
from mocompile.dsl.modules import (
    MLP,
    Attention,
    DecoderLayer,
    Experts,
    LatentAttention,
    MoEBlock,
    RMSNorm,
    Router,
)
from mocompile.dsl.spec import FFNSpec, MoESpec, ResolvedVariant, Spec
from mocompile.dsl.variants import resolve_variant
from mocompile.errors import MocompileError
from mocompile.ir.types import TensorType


def _norm(spec: Spec) -> nn.Module:
    if spec.norm == "layernorm":
        return nn.LayerNorm(spec.hidden, eps=spec.norm_eps)
    return RMSNorm(spec.hidden, spec.norm_eps)


def _ffn_block(spec: Spec, block: FFNSpec | MoESpec) -> nn.Module:
    if isinstance(block, FFNSpec):
        return MLP(spec.hidden, block.hidden, block.activation, block.gated)
    mod_index = {m.name: i for i, m in enumerate(spec.modalities)}
    router = Router(
        spec.hidden, block.experts, block.top_k, block.scoring, block.normalize_topk, block.routed_scale,
        block.n_group, block.topk_group, tuple((mod_index[g.modality], g.start, g.end) for g in block.groups),
        block.capacity_factor, block.score_bias, block.group_score,
    )
    experts = Experts(block.experts, spec.hidden, block.expert_hidden, block.activation, block.gated)
    shared = gate = None
    if block.shared_experts:
        shared = MLP(spec.hidden, block.shared_experts * block.shared_hidden, block.activation, block.gated)
    if block.shared_gate:
        gate = nn.Linear(spec.hidden, 1, bias=False)
    return MoEBlock(router, experts, shared, gate)


def _attention(spec: Spec) -> nn.Module:
    if spec.mla is not None:
        return LatentAttention(spec.hidden, spec.heads, spec.mla, spec.rope_theta, spec.out_bias)
    return Attention(spec.hidden, spec.heads, spec.kv_heads, spec.head_dim, spec.rope_theta,
                     spec.qkv_bias, spec.out_bias, spec.qk_norm, spec.norm_eps)


class MoEModel(nn.Module):
    """A decoder over early-fused modality segments; predicts the token modality's vocabulary.

    forward takes one tensor per modality, in spec order: int64 [batch, seq] ids for a
    token modality, float32 [batch, seq, features] for a feature modality.
    """

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.ModuleDict()
        for m in spec.modalities:
            self.embed[m.name] = nn.Embedding(m.vocab, spec.hidden) if m.is_tokens else nn.Linear(m.features, spec.hidden)
        self.layers = nn.ModuleList(
            DecoderLayer(
                _norm(spec),
                _attention(spec),
                _norm(spec),
                _ffn_block(spec, spec.block(name)),
            )
            for name in spec.layers
        )
        self.norm = _norm(spec)
        self.lm_head = nn.Linear(spec.hidden, spec.vocab, bias=False)
        if spec.tie_embeddings:
            token = next(m for m in spec.modalities if m.is_tokens)
            self.lm_head.weight = self.embed[token.name].weight
        self.needs_modality_ids = any(b.groups for b in spec.moes)

    def forward_segments(self, segments: list[torch.Tensor]) -> torch.Tensor:
        parts = [self.embed[m.name](x) for m, x in zip(self.spec.modalities, segments)]
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        # called through the module so torch.fx's wrap() (patched in modules' globals) sees it
        mods = modules.segment_ids(list(segments), list(range(len(parts)))) if self.needs_modality_ids else None
        for layer in self.layers:
            h = layer(h, mods)
        return self.lm_head(self.norm(h))

    # ---- signature -----------------------------------------------------------------
    def input_types(self) -> dict[str, TensorType]:
        """Inputs in forward order with symbolic dims (batch, seq or seq_<modality>)."""
        many = len(self.spec.modalities) > 1
        out = {}
        for m in self.spec.modalities:
            seq = f"seq_{m.name}" if many else "seq"
            out[m.name] = TensorType(("batch", seq), "int64") if m.is_tokens else TensorType(
                ("batch", seq, m.features), "float32")
        return out

    def example_inputs(self, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random inputs of the right kinds: token ids within the vocabulary, unit-normal features."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for m in self.spec.modalities:
            if m.is_tokens:
                out[m.name] = torch.randint(0, m.vocab, (batch, seq), generator=g)
            else:
                out[m.name] = torch.randn(batch, seq, m.features, generator=g)
        return out


def _model_class(spec: Spec) -> type[MoEModel]:
    """A MoEModel subclass whose forward names one argument per modality.

    torch.fx traces a forward by its code object, so `forward(self, *segments)` would give
    one opaque placeholder; a generated `forward(self, text, image)` gives one per input.
    Modality names are identifiers (the grammar guarantees it), so the source is safe.
    """
    names = [m.name for m in spec.modalities]
    src = f"def forward(self, {', '.join(names)}):\n    return self.forward_segments([{', '.join(names)}])\n"
    scope: dict = {}
    exec(compile(src, f"<forward of {spec.name}>", "exec"), scope)
    return type("MoEModel", (MoEModel,), {"forward": scope["forward"], "__module__": __name__})


def _init_tensor(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """A deterministic tensor for parameter `name`: scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return 0.02 * torch.randn(shape, generator=g)
    if len(shape) == 1:  # norm weights: around one, but not exactly (so a missed scale shows)
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / shape[-1] ** 0.5  # fan-in scaling


def new_model(spec: Spec) -> MoEModel:
    """The reference model of `spec` with weights not yet set (for loaders that set them all)."""
    return _model_class(spec)(spec)


def init_weights(model: MoEModel, seed: int) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_init_tensor(name, p.shape, seed))


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors file by name, with one-line errors for missing/extra/mis-shaped tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MocompileError(f"{path}: weights file not found")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise MocompileError(f"{path}: not a readable safetensors file ({e})") from None
    expected = dict(model.state_dict())
    with handle as f:
        keys = set(f.keys())
        missing = sorted(set(expected) - keys)
        if missing:
            raise MocompileError(f"{path}: missing tensor {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        with torch.no_grad():
            for name, target in expected.items():
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(target.shape):
                    raise MocompileError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, the spec needs {tuple(target.shape)}")
                target.copy_(t.to(target.dtype))


def slice_for_variant(full: MoEModel, small: MoEModel, resolved: ResolvedVariant) -> None:
    """Copy the full model's weights into a variant: kept layers, kept experts' rows."""
    full_state = full.state_dict()
    with torch.no_grad():
        for name, p in small.state_dict().items():
            src_name = name
            parts = name.split(".")
            if parts[0] == "layers":
                parts[1] = str(resolved.layer_map[int(parts[1])])
                src_name = ".".join(parts)
            src = full_state[src_name]
            if parts[0] == "layers" and parts[3] in ("router", "experts"):
                block = full.spec.layers[int(parts[1])]
                src = src[list(resolved.expert_map[block])]
            p.copy_(src)


def build_model(spec: Spec, seed: int = 0, variant: str | None = None, weights: str | Path | None = None) -> MoEModel:
    """The reference model of `spec` (or of one of its elastic variants), in eval mode.

    Weights come from `weights` (a safetensors file of the full model) or, when absent,
    deterministically from `seed`.
    """
    full = _model_class(spec)(spec)
    if weights is not None:
        load_weights(full, weights)
    else:
        init_weights(full, seed)
    full.eval()
    if variant is None:
        return full
    try:
        resolved = resolve_variant(spec, variant)
    except KeyError as e:
        raise MocompileError(str(e.args[0])) from None
    small = _model_class(resolved.spec)(resolved.spec)
    slice_for_variant(full, small, resolved)
    return small.eval()
