"""A Mixtral-style spec and its reference weights -> a Hugging Face Mixtral checkpoint directory.

The reverse of `hf_import` + `hf_weights` for the one family other engines read most widely:
it lets a benchmark give llama.cpp's `convert_hf_to_gguf.py` exactly the weights our
compiler compiles. The tensor names come from the importer's own weight plan
(`hf_weights.Planner`), run on the spec this export would import back as, so the two
directions cannot drift: a checkpoint written here imports to the same spec and the same
parameters (tests/test_hf_export.py checks the round trip).

Only a spec Mixtral can express is exported (one token modality, RMSNorm, grouped-query
attention without biases or q/k norm, every layer one MoE block of gated SiLU experts with
softmax top-k routing renormalised to sum to 1, nothing shared or grouped); anything else is
a one-line MocompileError naming the first feature Mixtral lacks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mocompile.dsl.hf_import import CONFIG, FAMILIES, HFCheckpoint
from mocompile.dsl.spec import MoESpec, Spec
from mocompile.errors import MocompileError
from mocompile.files import write_atomically

if TYPE_CHECKING:  # torch is imported only when weights are written
    import torch

__all__ = ["mixtral_blocker", "mixtral_config", "export_mixtral"]

WEIGHTS = "model.safetensors"


def _moe_blocker(moe: MoESpec) -> str | None:
    plain = MoESpec(moe.name, moe.experts, moe.top_k, moe.expert_hidden, shared_hidden=moe.shared_hidden)
    checks = [("activation", "silu experts"), ("gated", "gated experts"), ("shared_experts", "no shared experts"),
              ("scoring", "softmax routing"), ("normalize_topk", "top-k weights renormalised to sum to 1"),
              ("routed_scale", "no routed scale"), ("n_group", "no group-limited routing"),
              ("score_bias", "no routing score bias"), ("shared_gate", "no shared gate"),
              ("groups", "one expert pool for every modality"), ("capacity_factor", "no expert capacity")]
    for field, needs in checks:
        if getattr(moe, field) != getattr(plain, field):
            return f"block {moe.name}: {field} = {getattr(moe, field)!r} (Mixtral has {needs})"
    return None


def mixtral_blocker(spec: Spec) -> str | None:
    """Why `spec` is not a Mixtral model (the first feature Mixtral lacks), or None if it is."""
    if spec.mla is not None:
        return "latent attention (Mixtral has grouped-query attention)"
    if len(spec.modalities) != 1 or not spec.modalities[0].is_tokens:
        return f"{len(spec.modalities)} modalities (Mixtral reads one token modality)"
    for field, wanted in (("norm", "rmsnorm"), ("qkv_bias", False), ("out_bias", False), ("qk_norm", "none"),
                          ("tie_embeddings", False)):
        if getattr(spec, field) != wanted:
            return f"{field} = {getattr(spec, field)!r} (Mixtral has {wanted!r})"
    if spec.ffns or len(spec.moes) != 1 or any(b != spec.moes[0].name for b in spec.layers):
        return "not every layer is the same MoE block (Mixtral has no dense layers)"
    return _moe_blocker(spec.moes[0])


def mixtral_config(spec: Spec) -> dict[str, Any]:
    """The `config.json` of `spec` as a MixtralForCausalLM (transformers' key names)."""
    moe = spec.moes[0]
    return {
        "architectures": [FAMILIES["mixtral"].architecture], "model_type": "mixtral",
        "vocab_size": spec.vocab, "hidden_size": spec.hidden, "intermediate_size": moe.expert_hidden,
        "num_hidden_layers": len(spec.layers), "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim, "max_position_embeddings": spec.max_seq, "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta, "num_local_experts": moe.experts, "num_experts_per_tok": moe.top_k,
        "hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": None, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
    }


def _checkpoint_tensors(spec: Spec, model: "torch.nn.Module", out: Path) -> dict[str, "torch.Tensor"]:
    """Checkpoint tensor name -> tensor, from the importer's weight plan read backwards."""
    from mocompile.dsl.hf_weights import Planner

    params = dict(model.named_parameters())
    ckpt = HFCheckpoint(out, spec, FAMILIES["mixtral"], FAMILIES["mixtral"].architecture)
    tensors: dict[str, torch.Tensor] = {}
    for target in Planner(ckpt, {n: tuple(p.shape) for n, p in params.items()}, set()).plan():
        value = params[target.name].detach()
        for i, piece in enumerate(target.pieces):
            assert piece.rows is None, f"Mixtral's plan slices {piece.source}"  # only MLA / fused layouts slice
            tensors[piece.source] = (value[i] if target.stacked else value).contiguous().clone()
    return tensors


def export_mixtral(spec: Spec, model: "torch.nn.Module", out: str | Path) -> Path:
    """Write `model` (the reference model of `spec`) to `out` as a Mixtral checkpoint:
    config.json and one float32 model.safetensors. Raises MocompileError if Mixtral cannot
    express the spec."""
    from safetensors.torch import save_file

    why = mixtral_blocker(spec)
    if why is not None:
        raise MocompileError(f"{spec.name}: cannot be written as a Mixtral checkpoint: {why}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _checkpoint_tensors(spec, model, out)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={"format": "pt"})

    write_atomically(out / WEIGHTS, write, "weights")
    (out / CONFIG).write_text(json.dumps(mixtral_config(spec), indent=2) + "\n")
    return out
