"""Random OLMoE-shaped Hugging Face checkpoints, written tensor by tensor in bf16 shards.

A real-size checkpoint (OLMoE-1B-7B: 6.9B parameters, 14 GB in bf16) cannot be made by
instantiating transformers' model on this machine, and the benchmarks may not download one;
so this writes the files an `OlmoeForCausalLM` checkpoint has (config.json, safetensors
shards, their index) directly, with the tensor names and shapes of the Hub's layout (one
tensor per expert and projection), holding at most one shard's tensors in memory.
Weights are N(0, 1/fan_in) (norms 1 + small noise), so activations keep their scale through
the layers and the routing decisions are not ties.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

__all__ = ["OLMOE_1B_7B", "olmoe_config", "olmoe_tensors", "write_olmoe_checkpoint"]

# OLMoE-1B-7B's architecture (allenai/OLMoE-1B-7B-0924's config.json).
OLMOE_1B_7B: dict[str, Any] = dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                                   num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                                   num_experts_per_tok=8, vocab_size=50304, max_position_embeddings=4096)


def olmoe_config(**shape: Any) -> dict[str, Any]:
    """config.json of an OlmoeForCausalLM with OLMoE-1B-7B's settings, `shape` overriding sizes."""
    return {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", **OLMOE_1B_7B, **shape,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "norm_topk_prob": False,
            "tie_word_embeddings": False, "attention_bias": False, "clip_qkv": None, "pad_token_id": 1,
            "eos_token_id": 50279, "torch_dtype": "bfloat16"}


def olmoe_tensors(config: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the checkpoint, in the Hub's order."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    yield "model.embed_tokens.weight", (v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for proj, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            yield f"{p}.self_attn.{proj}.weight", (rows, h)
        yield f"{p}.self_attn.q_norm.weight", (h,)
        yield f"{p}.self_attn.k_norm.weight", (kv,)
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.post_attention_layernorm.weight", (h,)
        yield f"{p}.mlp.gate.weight", (config["num_experts"], h)
        for e in range(config["num_experts"]):
            for proj, shape in (("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f))):
                yield f"{p}.mlp.experts.{e}.{proj}.weight", shape
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def write_olmoe_checkpoint(path: str | Path, seed: int = 0, shard_bytes: int = 1 << 30, **shape: Any) -> int:
    """Write a random bf16 OLMoE checkpoint of `shape` (olmoe_config's overrides) into the
    directory `path` in shards of about `shard_bytes`; returns the bytes of tensor data."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = olmoe_config(**shape)
    g = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    names: list[str] = []
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, dims in olmoe_tensors(config):
        if len(dims) == 1:
            t = 1.0 + 0.1 * torch.randn(dims, generator=g)
        else:
            t = torch.randn(dims, generator=g).mul_(dims[-1] ** -0.5)
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].nbytes
        total += shard[name].nbytes
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    count = len(names)  # the Hub's names say how many shards there are: model-00001-of-00003.safetensors
    final = {n: n.replace(".safetensors", f"-of-{count:05d}.safetensors") for n in names}
    for old, new in final.items():
        (path / old).rename(path / new)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}, indent=1))
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return total
