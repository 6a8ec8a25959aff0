"""The key schemas of the `.moe` language: for each block kind, its keys with their readers,
defaults and whether they are required."""

from __future__ import annotations

from typing import Any, NamedTuple

from mocompile.dsl import limits
from mocompile.dsl.spec_values import TypeFn, _bool, _enum, _int, _layer_selection, _name_list, _positive_float


# ---- key schemas -------------------------------------------------------------------------


class Key(NamedTuple):
    """One key of a block kind: how to read it, its default, whether it must be given."""

    type: TypeFn
    default: Any = None
    required: bool = False


# Each size is bounded (limits.py) so a huge number fails here, before anything uses it.
_HIDDEN = _int(1, limits.MAX_HIDDEN)
_FFN_HIDDEN = _int(1, limits.MAX_FFN_HIDDEN)
_HEADS = _int(1, limits.MAX_HEADS)
_VOCAB = _int(1, limits.MAX_VOCAB)
_EXPERTS = _int(1, limits.MAX_EXPERTS)
_ACTIVATION = _enum("silu", "gelu")

MODEL_KEYS: dict[str, Key] = {
    "hidden": Key(_HIDDEN, required=True),
    "heads": Key(_HEADS, required=True),
    "kv_heads": Key(_HEADS),  # default: heads
    "head_dim": Key(_HIDDEN),  # default: hidden // heads
    "max_seq": Key(_int(1, limits.MAX_SEQ), required=True),
    "norm": Key(_enum("rmsnorm", "layernorm"), "rmsnorm"),
    "norm_eps": Key(_positive_float, 1e-5),
    "rope_theta": Key(_positive_float, 10000.0),
    "tie_embeddings": Key(_bool, False),
    "qkv_bias": Key(_bool, False),
    "out_bias": Key(_bool, False),
    "qk_norm": Key(_enum("none", "whole", "per_head"), "none"),
    "attention": Key(_enum("gqa", "mla"), "gqa"),
    # latent attention (attention = mla) only; see MLA_KEYS
    "q_lora_rank": Key(_int(0, limits.MAX_HIDDEN), 0),
    "kv_lora_rank": Key(_HIDDEN),
    "qk_nope_head_dim": Key(_HIDDEN),
    "qk_rope_head_dim": Key(_HIDDEN),
    "v_head_dim": Key(_HIDDEN),
    "layers": Key(_name_list, required=True),
}
MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_MLA_REQUIRED = MLA_KEYS[1:]

# Exactly one of vocab / features is checked separately (neither is required alone).
MODALITY_KEYS: dict[str, Key] = {
    "vocab": Key(_VOCAB),
    "features": Key(_VOCAB),
}

FFN_KEYS: dict[str, Key] = {
    "hidden": Key(_FFN_HIDDEN, required=True),
    "activation": Key(_ACTIVATION, "silu"),
    "gated": Key(_bool, True),
}

MOE_KEYS: dict[str, Key] = {
    "experts": Key(_EXPERTS, required=True),
    "top_k": Key(_EXPERTS, required=True),
    "expert_hidden": Key(_FFN_HIDDEN, required=True),
    "activation": Key(_ACTIVATION, "silu"),
    "gated": Key(_bool, True),
    "shared_experts": Key(_int(0, limits.MAX_EXPERTS), 0),
    "shared_hidden": Key(_FFN_HIDDEN),  # default: expert_hidden
    "scoring": Key(_enum("softmax", "sigmoid"), "softmax"),
    "normalize_topk": Key(_bool, True),
    "routed_scale": Key(_positive_float, 1.0),
    "n_group": Key(_EXPERTS, 1),
    "topk_group": Key(_EXPERTS, 1),
    "group_score": Key(_enum("top2_sum", "max"), "top2_sum"),
    "score_bias": Key(_bool, False),
    "shared_gate": Key(_bool, False),
    "capacity_factor": Key(_positive_float),  # default: None (no capacity limit)
}

VARIANT_KEYS: dict[str, Key] = {
    "layers": Key(_layer_selection),
    "experts": Key(_EXPERTS),
    "top_k": Key(_EXPERTS),
}

# Block kinds allowed inside `model { }` and their keys. `group <modality> = a..b` is the
# one qualified key, and only moe blocks take it.
BLOCK_KEYS: dict[str, dict[str, Key]] = {
    "modality": MODALITY_KEYS,
    "ffn": FFN_KEYS,
    "moe": MOE_KEYS,
    "variant": VARIANT_KEYS,
}
_GROUP_KEY = "group"
_SCHEMAS: dict[str, dict[str, Key]] = {"model": MODEL_KEYS, **BLOCK_KEYS}


def _home_of(key: str) -> str:
    """Where a misplaced key belongs, for hints like "it belongs in a moe block"."""
    homes = [kind for kind, schema in _SCHEMAS.items() if key in schema]
    if key == _GROUP_KEY:
        homes = ["moe"]
    return " or ".join(f"a {h} block" if h != "model" else "the model block" for h in homes)
