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

from mocompile.dsl.spec import FFNSpec, MLASpec, Modality, MoESpec, Spec
from mocompile.dsl.spec_writer import write_spec
from mocompile.errors import MocompileError

__all__ = ["HFCheckpoint", "FAMILIES", "import_checkpoint", "is_checkpoint", "spec_text"]

CONFIG = "config.json"
DENSE, SPARSE = "dense", "sparse"  # block names of the imported spec
REQUIRED: Any = object()


class _Bad(Exception):
    """A refused value; the caller adds the file and the key."""


# ---- value readers (each raises _Bad with the reason) ---------------------------------------
def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _Bad(f"expected a positive integer, found {v!r}")
    return v


def _int0(v: Any) -> int:
    """A non-negative integer, None meaning 0 (q_lora_rank, first_k_dense_replace, ...)."""
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _Bad(f"expected a non-negative integer, found {v!r}")
    return v


def _opt_int(v: Any) -> int | None:
    return None if v is None else _int(v)


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise _Bad(f"expected a positive number, found {v!r}")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"expected true or false, found {v!r}")
    return v


def _int_list(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise _Bad(f"expected a list of layer indices, found {v!r}")
    return tuple(v)


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu"}  # HF's "gelu" is the exact (erf) GELU


def _activation(v: Any) -> str:
    if v not in _ACTIVATIONS:
        raise _Bad(f"unsupported activation {v!r} (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[v]


def _must(*allowed: Any, why: str) -> Callable[[Any], Any]:
    """A key that is only checked: its value must be one of `allowed`."""

    def check(v: Any) -> Any:
        if v not in allowed:
            raise _Bad(f"{v!r} is not supported ({why})")
        return v

    return check


def _rope_type(v: Any, where: str) -> None:
    kind = v.get("rope_type", v.get("type", "default")) if isinstance(v, dict) else v
    if kind not in (None, "default"):
        raise _Bad(f"rope type {kind!r} is not supported, only plain rotary embeddings ({where})")
    if isinstance(v, dict) and v.get("partial_rotary_factor", 1.0) != 1.0:
        raise _Bad(f"partial_rotary_factor {v['partial_rotary_factor']!r} is not supported ({where})")


def _rope_parameters(v: Any) -> float | None:
    """transformers 5's rope_parameters: plain rope only; gives rope_theta."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _Bad(f"expected an object, found {v!r}")
    _rope_type(v, "rope_parameters.rope_type")
    return None if v.get("rope_theta") is None else _float(v["rope_theta"])


def _rope_scaling(v: Any) -> None:
    if v is not None:
        _rope_type(v, "rope_scaling")


def _all_full_attention(v: Any) -> Any:
    if v is not None and any(t != "full_attention" for t in v):
        raise _Bad(f"only full attention is supported, found {sorted(set(v))}")
    return v


# ---- key tables -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    """How one config key is read: `to` names the ingredient(s) the value becomes (None: the
    key is only checked by `read`), `default` is transformers' value when the key is absent."""

    to: str | tuple[str, ...] | None
    read: Callable[[Any], Any] = _int
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
    "num_key_value_heads": Key("kv_heads", _opt_int, None),
    "head_dim": Key("head_dim", _opt_int, None),
    "num_hidden_layers": Key("n_layers"),
    "max_position_embeddings": Key("max_seq"),
    "rms_norm_eps": Key("norm_eps", _float, 1e-6),
    "tie_word_embeddings": Key("tie_embeddings", _bool, False),
    "hidden_act": Key("activation", _activation, "silu"),
    "num_experts_per_tok": Key("top_k"),
    "rope_theta": Key("rope_theta", _float, None),
    "rope_parameters": Key("rope_parameters_theta", _rope_parameters, None),  # transformers 5
    "rope_scaling": Key(None, _rope_scaling, None),
    "quantization_config": Key(None, _must(None, why="quantized checkpoints are not supported"), None),
    **{k: IGNORE for k in IGNORED},
}

_NO_SLIDING = "sliding-window attention is not supported"
QWEN: dict[str, Key] = {
    **COMMON,
    "num_experts": Key("experts", _int, None),
    "moe_intermediate_size": Key("expert_hidden"),
    "intermediate_size": Key("dense_hidden", _int, None),
    "norm_topk_prob": Key("normalize_topk", _bool, False),
    "decoder_sparse_step": Key("sparse_step", _int, 1),
    "mlp_only_layers": Key("mlp_only_layers", _int_list, ()),
    "use_sliding_window": Key(None, _must(False, None, why=_NO_SLIDING), False),
    "sliding_window": IGNORE,  # used only with use_sliding_window
    "layer_types": Key(None, _all_full_attention, None),
}

def _group_count(v: Any) -> int:
    return _int0(v) or 1


def _v2_topk_method(v: Any) -> str | None:
    """DeepSeek-V2 routing: plain top-k, or groups scored by their best expert."""
    return {"greedy": None, "group_limited_greedy": "max"}[_must("greedy", "group_limited_greedy",
                                                                   why="DeepSeek-V2 routing")(v)]


def _deepseek(shared: int, scale: float, first_dense: int, n_group: int, topk_group: int) -> dict[str, Key]:
    """The keys DeepSeek-V2 and -V3 share; the arguments are transformers' defaults, which differ."""
    return {
        **COMMON,
        "head_dim": IGNORE,  # transformers sets it to qk_rope_head_dim
        "num_key_value_heads": IGNORE,  # latent attention expands keys and values for every query head
        "n_routed_experts": Key("experts"),
        "moe_intermediate_size": Key("expert_hidden"),
        "intermediate_size": Key("dense_hidden", _int, None),
        "n_shared_experts": Key("shared_experts", _int0, shared),
        "routed_scaling_factor": Key("routed_scale", _float, scale),
        "first_k_dense_replace": Key("first_dense", _int0, first_dense),
        "moe_layer_freq": Key("moe_freq", _int, 1),
        "n_group": Key("n_group", _group_count, n_group),
        "topk_group": Key("topk_group", _group_count, topk_group),
        "q_lora_rank": Key("q_lora_rank", _int0, 1536),
        "kv_lora_rank": Key("kv_lora_rank"),
        "qk_nope_head_dim": Key("qk_nope_head_dim"),
        "qk_rope_head_dim": Key("qk_rope_head_dim"),
        "v_head_dim": Key("v_head_dim"),
        "attention_bias": Key(None, _must(False, why="biased latent-attention projections"), False),
        "mlp_bias": Key(None, _must(False, why="biased feed-forward projections"), False),
    }


TABLES: dict[str, dict[str, Key]] = {
    "mixtral": {
        **COMMON,
        "num_local_experts": Key("experts"),
        "intermediate_size": Key("expert_hidden"),
        "sliding_window": Key("sliding_window", _opt_int, None),
    },
    "qwen2_moe": {
        **QWEN,
        "shared_expert_intermediate_size": Key("shared_hidden", _int0, 5632),
        "qkv_bias": Key("qkv_bias", _bool, True),
    },
    "qwen3_moe": {
        **QWEN,
        "num_local_experts": Key("experts", _int, None),  # transformers 5 writes this alias of num_experts
        "attention_bias": Key(("qkv_bias", "out_bias"), _bool, False),
    },
    "olmoe": {
        **COMMON,
        "num_experts": Key("experts"),
        "intermediate_size": Key("expert_hidden"),
        "norm_topk_prob": Key("normalize_topk", _bool, False),
        "attention_bias": Key(("qkv_bias", "out_bias"), _bool, False),
        "clip_qkv": Key(None, _must(None, why="clipping q/k/v activations"), None),
    },
    "deepseek_v2": {
        **_deepseek(shared=2, scale=1.0, first_dense=0, n_group=1, topk_group=1),
        "topk_method": Key("group_score", _v2_topk_method, None),
        # transformers' DeepSeek-V2 never renormalises the top-k weights; DeepSeek's own code
        # would with true, so only false reproduces both
        "norm_topk_prob": Key(None, _must(False, None, why="transformers ignores it for DeepSeek-V2"), False),
        "scoring_func": Key(None, _must("softmax", why="DeepSeek-V2 routing scores by softmax"), "softmax"),
    },
    "deepseek_v3": {
        **_deepseek(shared=1, scale=2.5, first_dense=3, n_group=8, topk_group=4),
        "norm_topk_prob": Key("normalize_topk", _bool, True),
        "rope_interleave": Key("rope_interleave", _bool, True),
        "topk_method": Key(None, _must("noaux_tc", why="DeepSeek-V3 routing is noaux_tc"), "noaux_tc"),
        "scoring_func": Key(None, _must("sigmoid", why="DeepSeek-V3 routing scores by sigmoid"), "sigmoid"),
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
        except _Bad as e:
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
