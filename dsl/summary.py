"""Parameter counts of a spec, computed from the spec alone (no torch): what `inspect` shows."""

from __future__ import annotations

from mocompile.dsl.spec import FFNSpec, MoESpec, Spec


def _ffn_params(hidden: int, ffn: int, gated: bool) -> int:
    return (3 if gated else 2) * hidden * ffn


def _attention_params(spec: Spec) -> int:
    """Projections, biases and q/k norms of one attention block (grouped-query or latent)."""
    h, heads = spec.hidden, spec.heads
    out = heads * (spec.mla.v_head_dim if spec.mla else spec.head_dim) * h + (h if spec.out_bias else 0)
    if spec.mla is not None:
        m = spec.mla
        dq = m.qk_nope_head_dim + m.qk_rope_head_dim
        q = (h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * heads * dq) if m.q_lora_rank else h * heads * dq
        kv = h * m.kv_lora_rank + m.kv_lora_rank + h * m.qk_rope_head_dim
        return out + q + kv + m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
    q, kv = heads * spec.head_dim, spec.kv_heads * spec.head_dim
    norms = {"none": 0, "whole": q + kv, "per_head": 2 * spec.head_dim}[spec.qk_norm]
    return out + h * (q + 2 * kv) + ((q + 2 * kv) if spec.qkv_bias else 0) + norms


def parameter_counts(spec: Spec) -> dict[str, int]:
    """Total parameters by component, plus `active_per_token`: what one token's forward pass
    reads (every dense weight, top_k of the routed experts, one embedding row)."""
    h, norm = spec.hidden, (2 if spec.norm == "layernorm" else 1) * spec.hidden
    counts = {"embeddings": 0, "attention": 0, "dense_ffn": 0, "routed_experts": 0, "shared_experts": 0,
              "routers": 0, "norms": 0, "lm_head": 0}
    active_routed = 0
    for m in spec.modalities:
        counts["embeddings"] += m.vocab * h if m.is_tokens else (m.features + 1) * h
    attn = _attention_params(spec)
    for name in spec.layers:
        counts["attention"] += attn
        counts["norms"] += 2 * norm
        block = spec.block(name)
        if isinstance(block, FFNSpec):
            counts["dense_ffn"] += _ffn_params(h, block.hidden, block.gated)
        elif isinstance(block, MoESpec):
            per_expert = _ffn_params(h, block.expert_hidden, block.gated)
            counts["routed_experts"] += block.experts * per_expert
            active_routed += block.top_k * per_expert
            counts["routers"] += block.experts * (h + (1 if block.score_bias else 0))
            counts["shared_experts"] += _ffn_params(h, block.shared_experts * block.shared_hidden, block.gated)
            counts["shared_experts"] += h if block.shared_gate else 0
    counts["norms"] += norm
    counts["lm_head"] = 0 if spec.tie_embeddings else h * spec.vocab
    counts["total"] = sum(counts.values())
    counts["active_per_token"] = counts["total"] - counts["routed_experts"] - counts["embeddings"] + active_routed + h
    return counts
