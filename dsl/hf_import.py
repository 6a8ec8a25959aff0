"""Hugging Face MoE checkpoints -> specs: `config.json` read through one key table per family.

A family's table says, for every config key it understands, which spec ingredient the value
becomes (with Hugging Face's default when the key is absent) or which values it must have
for the model to be one this compiler reproduces exactly. Keys that only matter for
training, generation or bookkeeping are ignored; any other key, an unknown `model_type`, or
a value the table refuses is a one-line `MocompileError` naming the key: an import either
reproduces what transformers computes or stops.

Supported (transformers 5 names): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2 and
DeepSeek-V3 causal LMs. Attention: grouped-query (with q/k/v/o biases and q/k RMSNorm where
the family has them) and DeepSeek's multi-head latent attention. Not supported: rope
scaling (yarn, linear, dynamic, ...), sliding windows that bite, qkv clipping, biased MLA
projections, quantized checkpoints. This module needs neither torch nor transformers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from mocompile.dsl.hf_config_values import (
    BadValue,
    positive_int,
    non_negative_int,
    optional_int,
    positive_float,
    boolean,
    layer_list,
    read_activation,
    must_be,
    check_rope_scaling,
    read_rope_parameters,
    all_full_attention,
)
from mocompile.dsl.spec import FFNSpec, MLASpec, Modality, MoESpec, Spec
from mocompile.dsl.spec_writer import write_spec
from mocompile.errors import MocompileError

__all__ = ["HFCheckpoint", "FAMILIES", "import_checkpoint", "is_checkpoint", "spec_text"]

CONFIG = "config.json"
DENSE, SPARSE = "dense", "sparse"  # block names of the imported spec
REQUIRED: Any = object()


# ---- key tables -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    """How one config key is read: `to` names the ingredient(s) the value becomes (None: the
    key is only checked by `read`), `default` is transformers' value when the key is absent."""

    to: str | tuple[str, ...] | None
    read: Callable[[Any], Any] = positive_int
    default: Any = REQUIRED


IGNORE = Key(None, lambda v: v, None)  # training, generation or bookkeeping only

# Keys that never change what a forward pass computes, whatever the family.
IGNORED = (
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path", "auto_map",
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "attention_dropout",
    "output_router_logits", "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "tokenizer_class",
    "pretraining_tp", "ep_size", "router_jitter_noise", "is_decoder", "return_dict", "output_hidden_states",
    "output_attentions", "tie_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id", "problem_type",
    "use_return_dict", "max_window_layers", "num_nextn_predict_layers", "num_mtp_layers", "qk_head_dim",
)

COMMON: dict[str, Key] = {
    "vocab_size": Key("vocab"),
    "hidden_size": Key("hidden"),
    "num_attention_heads": Key("heads"),
    "num_key_value_heads": Key("kv_heads", optional_int, None),
    "head_dim": Key("head_dim", optional_int, None),
    "num_hidden_layers": Key("n_layers"),
    "max_position_embeddings": Key("max_seq"),
    "rms_norm_eps": Key("norm_eps", positive_float, 1e-6),
    "tie_word_embeddings": Key("tie_embeddings", boolean, False),
    "hidden_act": Key("activation", read_activation, "silu"),
    "num_experts_per_tok": Key("top_k"),
    "rope_theta": Key("rope_theta", positive_float, None),
    "rope_parameters": Key("rope_parameters_theta", read_rope_parameters, None),  # transformers 5
    "rope_scaling": Key(None, check_rope_scaling, None),
    "quantization_config": Key(None, must_be(None, why="quantized checkpoints are not supported"), None),
    **{k: IGNORE for k in IGNORED},
}

_NO_SLIDING = "sliding-window attention is not supported"
QWEN: dict[str, Key] = {
    **COMMON,
    "num_experts": Key("experts", positive_int, None),
    "moe_intermediate_size": Key("expert_hidden"),
    "intermediate_size": Key("dense_hidden", positive_int, None),
    "norm_topk_prob": Key("normalize_topk", boolean, False),
    "decoder_sparse_step": Key("sparse_step", positive_int, 1),
    "mlp_only_layers": Key("mlp_only_layers", layer_list, ()),
    "use_sliding_window": Key(None, must_be(False, None, why=_NO_SLIDING), False),
    "sliding_window": IGNORE,  # used only with use_sliding_window
    "layer_types": Key(None, all_full_attention, None),
}

def _group_count(v: Any) -> int:
    return non_negative_int(v) or 1


def _v2_topk_method(v: Any) -> str | None:
    """DeepSeek-V2 routing: plain top-k, or groups scored by their best expert."""
    return {"greedy": None, "group_limited_greedy": "max"}[must_be("greedy", "group_limited_greedy",
                                                                   why="DeepSeek-V2 routing")(v)]


def _deepseek(shared: int, scale: float, first_dense: int, n_group: int, topk_group: int) -> dict[str, Key]:
    """The keys DeepSeek-V2 and -V3 share; the arguments are transformers' defaults, which differ."""
    return {
        **COMMON,
        "head_dim": IGNORE,  # transformers sets it to qk_rope_head_dim
        "num_key_value_heads": IGNORE,  # latent attention expands keys and values for every query head
        "n_routed_experts": Key("experts"),
        "moe_intermediate_size": Key("expert_hidden"),
        "intermediate_size": Key("dense_hidden", positive_int, None),
        "n_shared_experts": Key("shared_experts", non_negative_int, shared),
        "routed_scaling_factor": Key("routed_scale", positive_float, scale),
        "first_k_dense_replace": Key("first_dense", non_negative_int, first_dense),
        "moe_layer_freq": Key("moe_freq", positive_int, 1),
        "n_group": Key("n_group", _group_count, n_group),
        "topk_group": Key("topk_group", _group_count, topk_group),
        "q_lora_rank": Key("q_lora_rank", non_negative_int, 1536),
        "kv_lora_rank": Key("kv_lora_rank"),
        "qk_nope_head_dim": Key("qk_nope_head_dim"),
        "qk_rope_head_dim": Key("qk_rope_head_dim"),
        "v_head_dim": Key("v_head_dim"),
        "attention_bias": Key(None, must_be(False, why="biased latent-attention projections"), False),
        "mlp_bias": Key(None, must_be(False, why="biased feed-forward projections"), False),
    }


TABLES: dict[str, dict[str, Key]] = {
    "mixtral": {
        **COMMON,
        "num_local_experts": Key("experts"),
        "intermediate_size": Key("expert_hidden"),
        "sliding_window": Key("sliding_window", optional_int, None),
    },
    "qwen2_moe": {
        **QWEN,
        "shared_expert_intermediate_size": Key("shared_hidden", non_negative_int, 5632),
        "qkv_bias": Key("qkv_bias", boolean, True),
    },
    "qwen3_moe": {
        **QWEN,
        "num_local_experts": Key("experts", positive_int, None),  # transformers 5 writes this alias of num_experts
        "attention_bias": Key(("qkv_bias", "out_bias"), boolean, False),
    },
    "olmoe": {
        **COMMON,
        "num_experts": Key("experts"),
        "intermediate_size": Key("expert_hidden"),
        "norm_topk_prob": Key("normalize_topk", boolean, False),
        "attention_bias": Key(("qkv_bias", "out_bias"), boolean, False),
        "clip_qkv": Key(None, must_be(None, why="clipping q/k/v activations"), None),
    },
    "deepseek_v2": {
        **_deepseek(shared=2, scale=1.0, first_dense=0, n_group=1, topk_group=1),
        "topk_method": Key("group_score", _v2_topk_method, None),
        # transformers' DeepSeek-V2 never renormalises the top-k weights; DeepSeek's own code
        # would with true, so only false reproduces both
        "norm_topk_prob": Key(None, must_be(False, None, why="transformers ignores it for DeepSeek-V2"), False),
        "scoring_func": Key(None, must_be("softmax", why="DeepSeek-V2 routing scores by softmax"), "softmax"),
    },
    "deepseek_v3": {
        **_deepseek(shared=1, scale=2.5, first_dense=3, n_group=8, topk_group=4),
        "norm_topk_prob": Key("normalize_topk", boolean, True),
        "rope_interleave": Key("rope_interleave", boolean, True),
        "topk_method": Key(None, must_be("noaux_tc", why="DeepSeek-V3 routing is noaux_tc"), "noaux_tc"),
        "scoring_func": Key(None, must_be("sigmoid", why="DeepSeek-V3 routing scores by sigmoid"), "sigmoid"),
    },
}


# ---- families ---------------------------------------------------------------------------------
def _all_moe(ing: Mapping[str, Any], i: int) -> bool:
    return True


def _qwen_moe(ing: Mapping[str, Any], i: int) -> bool:
    """Qwen: MoE unless listed in mlp_only_layers, every decoder_sparse_step-th layer."""
    return i not in ing["mlp_only_layers"] and (i + 1) % ing["sparse_step"] == 0


def _deepseek_moe(ing: Mapping[str, Any], i: int) -> bool:
    """DeepSeek: dense for the first first_k_dense_replace layers, then every moe_layer_freq-th
    (DeepSeek's own rule; transformers ignores moe_layer_freq; released V2/V3 models use 1)."""
    return i >= ing["first_dense"] and i % ing["moe_freq"] == 0


@dataclass(frozen=True)
class WeightNames:
    """Where a family keeps its MoE weights in the checkpoint (under model.layers.<i>.)."""

    moe: str  # the MoE block's module name
    expert: tuple[str, str, str]  # per-expert gate, up, down projection names
    shared: str | None = None  # shared expert module name


@dataclass(frozen=True)
class Family:
    name: str  # as people call it
    model_type: str
    architecture: str  # the causal-LM class transformers builds
    is_moe: Callable[[Mapping[str, Any], int], bool]
    fixed: Mapping[str, Any]  # ingredients the family fixes whatever the config says
    weights: WeightNames

    @property
    def keys(self) -> dict[str, Key]:
        return TABLES[self.model_type]


_HF_NAMES = WeightNames("mlp", ("gate_proj", "up_proj", "down_proj"))
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("Mixtral", "mixtral", "MixtralForCausalLM", _all_moe, {"normalize_topk": True},
           WeightNames("block_sparse_moe", ("w1", "w3", "w2"))),
    Family("Qwen2-MoE", "qwen2_moe", "Qwen2MoeForCausalLM", _qwen_moe, {"shared_gate": True},
           WeightNames("mlp", _HF_NAMES.expert, "shared_expert")),
    Family("Qwen3-MoE", "qwen3_moe", "Qwen3MoeForCausalLM", _qwen_moe, {"qk_norm": "per_head"}, _HF_NAMES),
    Family("OLMoE", "olmoe", "OlmoeForCausalLM", _all_moe, {"qk_norm": "whole"}, _HF_NAMES),
    Family("DeepSeek-V2", "deepseek_v2", "DeepseekV2ForCausalLM", _deepseek_moe,
           {"normalize_topk": False, "rope_interleave": True, "mla": True},
           WeightNames("mlp", _HF_NAMES.expert, "shared_experts")),
    Family("DeepSeek-V3", "deepseek_v3", "DeepseekV3ForCausalLM", _deepseek_moe,
           {"scoring": "sigmoid", "score_bias": True, "group_score": "top2_sum", "mla": True},
           WeightNames("mlp", _HF_NAMES.expert, "shared_experts")),
)}


# ---- the import ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFCheckpoint:
    """A checkpoint directory read as a spec, plus what loading its weights needs to know."""

    path: Path
    spec: Spec
    family: Family
    architecture: str
    rope_interleaved: bool = False  # MLA rotating adjacent channel pairs: de-interleaved on load
    notes: dict[str, str] = field(default_factory=dict)  # "<block>.<spec key>" -> config key it came from

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG


def is_checkpoint(path: str | Path) -> bool:
    """A directory with a config.json: what `mocompile compile` treats as a Hugging Face checkpoint."""
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def _fail(where: Path, key: str | None, message: str) -> MocompileError:
    return MocompileError(f"{where}: {f'{key}: ' if key else ''}{message}")


def read_config(path: Path) -> dict[str, Any]:
    where = path / CONFIG
    if not where.is_file():
        raise _fail(path, None, f"not a Hugging Face checkpoint (no {CONFIG})")
    try:
        config = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(where, None, f"cannot read it as JSON ({e})") from None
    if not isinstance(config, dict):
        raise _fail(where, None, "expected a JSON object")
    return config


def _family(config: Mapping[str, Any], where: Path) -> tuple[Family, str]:
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)  # type: ignore[arg-type]
    if family is None:
        known = ", ".join(FAMILIES)
        raise _fail(where, "model_type", f"{model_type!r} is not a supported MoE family (supported: {known})")
    archs = config.get("architectures") or [family.architecture]
    if archs != [family.architecture]:
        raise _fail(where, "architectures", f"{archs!r} is not supported; only {family.architecture} (a causal LM "
                                            f"with its LM head) is")
    return family, family.architecture


def _ingredients(config: Mapping[str, Any], family: Family, where: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Every key of the config through the family's table: ingredients and where each came from."""
    table = family.keys
    unknown = sorted(k for k in config if k not in table)
    if unknown:
        raise _fail(where, unknown[0], f"unknown {family.name} config key; the importer does not know whether it "
                                       "changes the model, so it refuses to guess")
    ing: dict[str, Any] = {}
    origin: dict[str, str] = {}
    # absent keys first (transformers' defaults), so a present key always wins over an absent alias
    for key, rule in sorted(table.items(), key=lambda kv: kv[0] in config):
        if key not in config and rule.default is REQUIRED:
            raise _fail(where, key, f"missing (a {family.name} config needs it)")
        try:
            value = rule.read(config[key]) if key in config else rule.default
        except BadValue as e:
            raise _fail(where, key, str(e)) from None
        for name in (rule.to,) if isinstance(rule.to, str) else rule.to or ():
            if key in config or name not in ing:
                ing[name] = value
                origin[name] = key if key in config else f"{key} (default)"
    ing.update(family.fixed)
    origin.update({name: f"always, in {family.name}" for name in family.fixed})
    return ing, origin


def _check(ok: bool, where: Path, key: str, message: str) -> None:
    if not ok:
        raise _fail(where, key, message)


def _spec_name(path: Path) -> str:
    name = re.sub(r"\W", "_", path.resolve().name).strip("_") or "model"
    return name if not name[0].isdigit() else f"m_{name}"


def _build(ing: dict[str, Any], origin: dict[str, str], family: Family, path: Path,
           where: Path) -> tuple[Spec, dict[str, str]]:
    heads, hidden = ing["heads"], ing["hidden"]
    n = ing["n_layers"]
    mla = None
    if ing.get("mla"):
        mla = MLASpec(ing["kv_lora_rank"], ing["qk_nope_head_dim"], ing["qk_rope_head_dim"], ing["v_head_dim"],
                      ing["q_lora_rank"])
        _check(mla.qk_rope_head_dim % 2 == 0, where, "qk_rope_head_dim", "must be even")
    window = ing.get("sliding_window")
    _check(window is None or window >= ing["max_seq"], where, "sliding_window",
           f"{window} is shorter than max_position_embeddings {ing['max_seq']}: sliding-window attention is not "
           "supported")
    theta = ing["rope_parameters_theta"] or ing["rope_theta"] or (1e6 if family.model_type == "mixtral" else 1e4)
    experts = ing["experts"]
    _check(experts is not None, where, "num_experts", "missing (the number of routed experts)")
    moe_layers = [family.is_moe(ing, i) for i in range(n)]
    shared = ing.get("shared_experts")
    if shared is None:  # Qwen2-MoE: one shared expert of its own width
        shared = 1 if ing.get("shared_hidden") else 0
    n_group, topk_group, group_score = ing.get("n_group", 1), ing.get("topk_group", 1), ing.get("group_score")
    if group_score is None:  # no group-limited routing
        n_group, topk_group, group_score = 1, 1, "top2_sum"
    if n_group > 1:
        _check(experts % n_group == 0, where, "n_group", f"{n_group} does not divide {experts} routed experts")
        _check(topk_group <= n_group, where, "topk_group", f"{topk_group} is larger than n_group {n_group}")
        _check(group_score == "max" or experts // n_group >= 2, where, "n_group",
               "groups of one expert cannot be scored by their top-2 experts")
    _check(ing["top_k"] <= experts, where, "num_experts_per_tok", f"{ing['top_k']} is more than the {experts} experts")
    moe = MoESpec(
        SPARSE, experts=experts, top_k=ing["top_k"], expert_hidden=ing["expert_hidden"],
        activation=ing["activation"], shared_experts=shared,
        shared_hidden=ing.get("shared_hidden") or ing["expert_hidden"],
        scoring=ing.get("scoring", "softmax"), normalize_topk=ing["normalize_topk"],
        routed_scale=ing.get("routed_scale", 1.0), n_group=n_group, topk_group=topk_group, group_score=group_score,
        score_bias=ing.get("score_bias", False), shared_gate=bool(ing.get("shared_gate") and shared),
    )
    ffns: tuple[FFNSpec, ...] = ()
    if not all(moe_layers):
        _check(ing.get("dense_hidden") is not None, where, "intermediate_size", "missing (dense layers need it)")
        ffns = (FFNSpec(DENSE, ing["dense_hidden"], ing["activation"]),)
    _check(any(moe_layers), where, "num_hidden_layers", "no layer is a MoE layer; this importer is for MoE models")
    head_dim = ing.get("head_dim") or hidden // heads
    spec = Spec(
        name=_spec_name(path), hidden=hidden, heads=heads, kv_heads=heads if mla else (ing["kv_heads"] or heads),
        head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim if mla else head_dim, max_seq=ing["max_seq"],
        layers=tuple(SPARSE if m else DENSE for m in moe_layers), modalities=(Modality("text", vocab=ing["vocab"]),),
        ffns=ffns, moes=(moe,), norm_eps=ing["norm_eps"], rope_theta=float(theta),
        tie_embeddings=ing["tie_embeddings"], qkv_bias=ing.get("qkv_bias", False),
        out_bias=ing.get("out_bias", False), qk_norm=ing.get("qk_norm", "none"), mla=mla, source=str(where),
    )
    notes = _notes(origin, spec, family, ing)
    return spec, notes


# spec key -> ingredient, for the notes naming each value's config key
_NOTE_KEYS = {
    "model": {"hidden": "hidden", "heads": "heads", "kv_heads": "kv_heads", "head_dim": "head_dim",
              "max_seq": "max_seq", "norm_eps": "norm_eps", "rope_theta": "rope_theta",
              "tie_embeddings": "tie_embeddings", "qkv_bias": "qkv_bias", "out_bias": "out_bias",
              **{k: k for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}},
    SPARSE: {"experts": "experts", "top_k": "top_k", "expert_hidden": "expert_hidden",
             "normalize_topk": "normalize_topk", "scoring": "scoring", "routed_scale": "routed_scale",
             "n_group": "n_group",
             "topk_group": "topk_group", "shared_experts": "shared_experts", "shared_hidden": "shared_hidden"},
    DENSE: {"hidden": "dense_hidden"},
    "text": {"vocab": "vocab"},
}


def _notes(origin: dict[str, str], spec: Spec, family: Family, ing: Mapping[str, Any]) -> dict[str, str]:
    notes = {f"{scope}.{key}": origin[name] for scope, keys in _NOTE_KEYS.items() for key, name in keys.items()
             if name in origin}
    if ing["rope_parameters_theta"] is not None:
        notes["model.rope_theta"] = "rope_parameters.rope_theta"
    elif ing["rope_theta"] is None:
        notes["model.rope_theta"] = f"transformers' default for {family.name}"
    if spec.qk_norm != "none":
        notes["model.qk_norm"] = f"self_attn.q_norm / k_norm, {spec.qk_norm.replace('_', ' ')}"
    if family.model_type == "qwen2_moe":
        notes[f"{SPARSE}.shared_experts"] = "one shared_expert"
        notes[f"{SPARSE}.shared_gate"] = "shared_expert_gate"
    if spec.moes[0].score_bias:
        notes[f"{SPARSE}.score_bias"] = "gate.e_score_correction_bias"
    if spec.moes[0].group_score == "max":
        notes[f"{SPARSE}.group_score"] = "topk_method = group_limited_greedy"
    if spec.mla is not None:
        notes["model.attention"] = "multi-head latent attention"
    qwen, deepseek = "decoder_sparse_step, mlp_only_layers", "first_k_dense_replace, moe_layer_freq"
    rules = {"qwen2_moe": qwen, "qwen3_moe": qwen, "deepseek_v2": deepseek, "deepseek_v3": deepseek}
    notes["model.layers"] = f"{len(spec.layers)} layers (num_hidden_layers)" + (
        f", MoE by {rules[family.model_type]}" if family.model_type in rules else "")
    return notes


def import_checkpoint(path: str | Path) -> HFCheckpoint:
    """Read `path/config.json` into a spec. Raises MocompileError naming the key it cannot honour."""
    path = Path(path)
    config = read_config(path)
    where = path / CONFIG
    family, architecture = _family(config, where)
    ing, origin = _ingredients(config, family, where)
    spec, notes = _build(ing, origin, family, path, where)
    interleaved = bool(spec.mla is not None and ing.get("rope_interleave"))
    return HFCheckpoint(path, spec, family, architecture, interleaved, notes)


def spec_text(ckpt: HFCheckpoint) -> str:
    """The imported spec as a readable `.moe` file naming the original architecture."""
    header = [
        f"Imported from the Hugging Face checkpoint {ckpt.path}",
        f"architecture {ckpt.architecture} (model_type {ckpt.family.model_type}, {ckpt.family.name} family).",
        "Comments name the config.json key each value comes from. Weights: `mocompile import-hf --weights`.",
    ]
    if ckpt.rope_interleaved:
        header.append("Rope: the checkpoint rotates adjacent channel pairs; converted weights are de-interleaved.")
    return write_spec(ckpt.spec, header, ckpt.notes)
