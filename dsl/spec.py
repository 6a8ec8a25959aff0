"""Typed spec objects: what a `.moe` file means, independent of how it was written.

The parser (`parser.py`) produces these and has already checked every rule that can be
checked from the spec alone, so downstream code (the torch builder, the HF importer) can
trust them. Every object is frozen: a variant is a new spec, never a mutation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

Activation = Literal["silu", "gelu"]
NormKind = Literal["rmsnorm", "layernorm"]
Scoring = Literal["softmax", "sigmoid"]
GroupScore = Literal["top2_sum", "max"]
QKNorm = Literal["none", "whole", "per_head"]
AttentionKind = Literal["gqa", "mla"]


@dataclass(frozen=True)
class Modality:
    """One input modality. Token modalities are embedded by a table, feature modalities
    (image patches, audio frames) by a linear projection into the shared hidden size.

    Inputs are given as separate tensors and concatenated along the sequence axis in
    declaration order (early fusion), so a position's modality is fixed by its segment.
    """

    name: str
    vocab: int | None = None  # token modality: embedding table size
    features: int | None = None  # feature modality: width of one patch/frame

    @property
    def is_tokens(self) -> bool:
        return self.vocab is not None


@dataclass(frozen=True)
class FFNSpec:
    """A dense feed-forward block (used by dense layers and by shared experts)."""

    name: str
    hidden: int
    activation: Activation = "silu"
    gated: bool = True


@dataclass(frozen=True)
class ExpertGroup:
    """Experts [start, end) reserved for tokens of one modality (MoMa-style)."""

    modality: str
    start: int
    end: int


@dataclass(frozen=True)
class MoESpec:
    """A sparse MoE block: router, routed experts and optional always-on shared experts."""

    name: str
    experts: int
    top_k: int
    expert_hidden: int
    activation: Activation = "silu"
    gated: bool = True
    shared_experts: int = 0
    shared_hidden: int = 0  # hidden size of each shared expert (defaults to expert_hidden)
    scoring: Scoring = "softmax"
    normalize_topk: bool = True
    routed_scale: float = 1.0
    # DeepSeek-V3 group-limited routing: experts split into n_group equal groups, a token
    # first picks topk_group groups (by the sum of its top-2 scores in each), then its
    # top_k experts inside them. 1/1 means plain top-k.
    n_group: int = 1
    topk_group: int = 1
    # How a routing group is scored: the sum of its top-2 scores (DeepSeek-V3) or its best
    # score (DeepSeek-V2's group_limited_greedy).
    group_score: GroupScore = "top2_sum"
    # A learned per-expert bias added to the scores only to choose experts, never to weight
    # them (DeepSeek-V3's e_score_correction_bias).
    score_bias: bool = False
    # Shared experts' output scaled by sigmoid(x @ w_gate), a learned [1, hidden] gate (Qwen2-MoE).
    shared_gate: bool = False
    # Modality groups; empty means every modality shares the whole pool (ERNIE 5.0).
    groups: tuple[ExpertGroup, ...] = ()
    # Capacity-limited routing (token dropping). None = no capacity limit (per-token
    # routing). A capacity makes a token's service depend on other tokens: a batch leak.
    capacity_factor: float | None = None


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3): queries (optionally through a rank-
    `q_lora_rank` bottleneck) and keys/values expanded from a rank-`kv_lora_rank` latent.

    Each query/key head is [nope | rope]: `qk_nope_head_dim` channels without positions, then
    `qk_rope_head_dim` rotary channels; the rotary part of the keys is one vector per position
    shared by all heads. Values have `v_head_dim` channels per head. Scores are scaled by
    1 / sqrt(qk_nope_head_dim + qk_rope_head_dim); rope is the rotate-half form.
    """

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int = 0  # 0: queries are one projection of the hidden state


@dataclass(frozen=True)
class Variant:
    """An elastic sub-model (ERNIE 5.0): a subset of layers, fewer experts, smaller top-k,
    all taken from the same weights as the full model.

    layers: indices of the full model's layers to keep (in order), None = all.
    experts: experts kept per MoE block (the first ones of each modality group, split
             evenly across groups), None = all.
    top_k: routed experts per token, None = the block's own top_k.
    """

    name: str
    layers: tuple[int, ...] | None = None
    experts: int | None = None
    top_k: int | None = None


@dataclass(frozen=True)
class Spec:
    """A whole model. `layers` holds, per layer, the name of its FFN or MoE block."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    max_seq: int
    layers: tuple[str, ...]
    modalities: tuple[Modality, ...]
    ffns: tuple[FFNSpec, ...] = ()
    moes: tuple[MoESpec, ...] = ()
    variants: tuple[Variant, ...] = ()
    norm: NormKind = "rmsnorm"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    # Attention options: biases on the q/k/v and output projections; RMSNorm on q and k
    # ("whole": over each projection, OLMoE; "per_head": over each head, Qwen3-MoE); and the
    # attention kind: grouped-query, or latent attention when `mla` is set.
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: QKNorm = "none"
    mla: MLASpec | None = None
    source: str = ""  # file the spec came from, for messages

    # ---- lookups -------------------------------------------------------------------
    @property
    def attention(self) -> AttentionKind:
        return "gqa" if self.mla is None else "mla"

    @property
    def vocab(self) -> int:
        """Output vocabulary: the first token modality's (the LM head predicts its tokens)."""
        for m in self.modalities:
            if m.is_tokens:
                return int(m.vocab)  # type: ignore[arg-type]
        raise ValueError(f"{self.name}: no token modality, so no output vocabulary")

    def block(self, name: str) -> FFNSpec | MoESpec:
        for b in (*self.ffns, *self.moes):
            if b.name == name:
                return b
        raise KeyError(name)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.variants) or "none"
        raise KeyError(f"spec {self.name!r} has no variant {name!r} (known: {known})")

    def digest(self) -> str:
        """sha256 of the spec's meaning (not its formatting): the artifact's spec hash."""
        data = asdict(replace(self, source=""))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ResolvedVariant:
    """A variant turned into a plain spec plus the map back into the full model's weights.

    layer_map[i] is the full-model index of the variant's layer i; expert_map[block] lists
    the full-model expert indices the variant's experts of that block come from.
    """

    spec: Spec
    layer_map: tuple[int, ...]
    expert_map: dict[str, tuple[int, ...]] = field(default_factory=dict)
