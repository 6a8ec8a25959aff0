"""Tests of the `.moe` spec language: the examples, the documented forms, load_spec's failures and the
imported architectures' options (the malformed specs: test_dsl_errors.py).

Needs only pytest, lark and the installed package (no torch).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mocompile.dsl import Spec, load_spec, parse_spec, resolve_variant
from mocompile.dsl.spec import ExpertGroup, Variant
from mocompile.errors import MocompileError, SpecError

from dsl_specs import EXAMPLES, HEAD, LAYERS, MOE, model, ok


# ---- valid specs -------------------------------------------------------------------------------


def test_mixtral_tiny() -> None:
    spec = load_spec(EXAMPLES / "mixtral_tiny.moe")
    assert isinstance(spec, Spec)
    assert (spec.name, spec.hidden, spec.heads, spec.kv_heads, spec.head_dim, spec.max_seq) == (
        "mixtral_tiny", 128, 4, 2, 32, 256)
    assert spec.vocab == 512 and len(spec.modalities) == 1 and spec.modalities[0].is_tokens
    assert spec.ffns == ()
    (moe,) = spec.moes
    assert (moe.experts, moe.top_k, moe.expert_hidden, moe.activation, moe.gated) == (8, 2, 256, "silu", True)
    assert (moe.scoring, moe.normalize_topk, moe.shared_experts, moe.groups) == ("softmax", True, 0, ())
    assert moe.capacity_factor is None
    assert spec.layers == (moe.name, moe.name)
    assert spec.source == str(EXAMPLES / "mixtral_tiny.moe")


def test_deepseek_tiny() -> None:
    spec = load_spec(EXAMPLES / "deepseek_tiny.moe")
    assert (spec.hidden, spec.heads, spec.kv_heads, spec.vocab) == (128, 4, 4, 512)
    (ffn,) = spec.ffns
    (moe,) = spec.moes
    assert ffn.hidden == 384
    assert spec.layers == (ffn.name, moe.name, moe.name)
    assert (moe.experts, moe.expert_hidden, moe.top_k) == (16, 64, 4)
    assert (moe.shared_experts, moe.shared_hidden) == (2, 64)
    assert (moe.scoring, moe.normalize_topk, moe.routed_scale) == ("sigmoid", True, 2.5)
    assert (moe.n_group, moe.topk_group) == (4, 2)


def test_unified_tiny() -> None:
    spec = load_spec(EXAMPLES / "unified_tiny.moe")
    assert [(m.name, m.vocab, m.features) for m in spec.modalities] == [
        ("text", 512, None), ("image", None, 48), ("audio", None, 32)]
    assert (spec.hidden, spec.heads, spec.kv_heads) == (128, 4, 2)
    (ffn,) = spec.ffns
    (moe,) = spec.moes
    assert moe.name == "mm" and spec.layers == (ffn.name, "mm", ffn.name, "mm")
    assert (moe.experts, moe.top_k, moe.expert_hidden, moe.shared_experts, moe.shared_hidden) == (12, 2, 128, 1, 128)
    assert moe.groups == (ExpertGroup("text", 0, 4), ExpertGroup("image", 4, 8), ExpertGroup("audio", 8, 12))
    assert spec.variants == (Variant("half", (0, 1), 6, 1), Variant("shallow", (0, 1), None, 2))


def test_unified_half_variant_resolution() -> None:
    spec = load_spec(EXAMPLES / "unified_tiny.moe")
    rv = resolve_variant(spec, "half")
    (moe,) = rv.spec.moes
    assert rv.layer_map == (0, 1) and rv.spec.layers == ("dense", "mm")
    assert (moe.experts, moe.top_k) == (6, 1)
    assert moe.groups == (ExpertGroup("text", 0, 2), ExpertGroup("image", 2, 4), ExpertGroup("audio", 4, 6))
    assert rv.expert_map == {"mm": (0, 1, 4, 5, 8, 9)}
    shallow = resolve_variant(spec, "shallow")
    assert shallow.layer_map == (0, 1) and shallow.spec.moes[0].experts == 12
    assert shallow.expert_map == {"mm": tuple(range(12))}


DOC_EXAMPLE = """\
# Mixtral-style tiny model
model mixtral_tiny {
    hidden     = 128
    heads      = 4
    kv_heads   = 2            # grouped-query attention; default = heads
    head_dim   = 32           # optional; default hidden / heads (must divide evenly)
    max_seq    = 256
    norm       = rmsnorm      # rmsnorm | layernorm ; default rmsnorm
    norm_eps   = 1e-5         # default 1e-5
    rope_theta = 10000.0      # default 10000.0
    tie_embeddings = false    # default false

    modality text { vocab = 512 }          # a token modality (embedding table)
    modality image { features = 48 }       # a feature modality

    ffn dense { hidden = 512  activation = silu  gated = true }

    moe routed {
        experts        = 8
        top_k          = 2
        expert_hidden  = 256
        activation     = silu
        gated          = true
        shared_experts = 0
        shared_hidden  = 256
        scoring        = softmax
        normalize_topk = true
        routed_scale   = 1.0
        n_group        = 1
        topk_group     = 1
        capacity_factor = 1.25
        group text  = 0..4
        group image = 4..8
    }

    layers = [dense] + [routed] * 3

    variant small {
        layers  = [0, 2]
        experts = 4
        top_k   = 1
    }
}
"""


def test_documented_example() -> None:
    spec = parse_spec(DOC_EXAMPLE, "doc.moe")
    assert spec.source == "doc.moe"
    assert spec.layers == ("dense", "routed", "routed", "routed")
    assert (spec.norm, spec.norm_eps, spec.rope_theta, spec.tie_embeddings) == ("rmsnorm", 1e-5, 10000.0, False)
    (moe,) = spec.moes
    assert moe.capacity_factor == 1.25
    assert moe.groups == (ExpertGroup("text", 0, 4), ExpertGroup("image", 4, 8))
    assert spec.ffns[0].hidden == 512
    assert spec.variants == (Variant("small", (0, 2), 4, 1),)
    rv = resolve_variant(spec, "small")
    assert rv.spec.layers == ("dense", "routed") and rv.expert_map == {"routed": (0, 1, 4, 5)}


def test_defaults() -> None:
    spec = parse_spec(ok())
    assert (spec.kv_heads, spec.head_dim) == (4, 16)
    assert (spec.norm, spec.norm_eps, spec.rope_theta, spec.tie_embeddings) == ("rmsnorm", 1e-5, 10000.0, False)
    (moe,) = spec.moes
    assert (moe.activation, moe.gated, moe.shared_experts, moe.shared_hidden) == ("silu", True, 0, 32)
    assert (moe.scoring, moe.normalize_topk, moe.routed_scale, moe.n_group, moe.topk_group) == (
        "softmax", True, 1.0, 1, 1)
    assert moe.capacity_factor is None and moe.groups == ()
    assert spec.variants == () and spec.source == "<string>"


def test_explicit_head_dim_need_not_divide() -> None:
    spec = parse_spec(model("hidden = 60", "heads = 4", "head_dim = 8", "max_seq = 8",
                            "modality t { vocab = 10 }", "ffn f { hidden = 8 }", "layers = [f]"))
    assert spec.head_dim == 8


@pytest.mark.parametrize("layers, expected", [
    ("[f, e] * 2", ("f", "e", "f", "e")),
    ("[e, e]", ("e", "e")),
    ("[f] + [e] * 3", ("f", "e", "e", "e")),
    ("([f] + [e]) * 2 + [f]", ("f", "e", "f", "e", "f")),
    ("[f, e,]", ("f", "e")),
    ("[f] * 2 * 2", ("f",) * 4),
])
def test_layer_list_expressions(layers: str, expected: tuple[str, ...]) -> None:
    spec = parse_spec(model(*HEAD, MOE, "ffn f { hidden = 16 }", f"layers = {layers}"))
    assert spec.layers == expected


def test_whitespace_and_comments_are_insignificant() -> None:
    one_line = ("model m{hidden=64 heads=4 max_seq=32 modality text{vocab=100}"
                "moe e{experts=4 top_k=2 expert_hidden=32}layers=[e]}")
    commented = "# header\n" + ok().replace("\n", "  # comment\n") + "# trailer"
    assert parse_spec(one_line) == parse_spec(ok()) == parse_spec(commented)


def test_ints_accepted_for_floats_and_floats_kept() -> None:
    spec = parse_spec(model("hidden = 64", "heads = 4", "max_seq = 32", "norm_eps = 1", "rope_theta = 5e5",
                            "modality text { vocab = 100 }",
                            "moe e { experts = 4 top_k = 2 expert_hidden = 32 routed_scale = 2 capacity_factor = 2 }",
                            "layers = [e]"))
    assert spec.norm_eps == 1.0 and isinstance(spec.norm_eps, float) and spec.rope_theta == 500000.0
    assert isinstance(spec.moes[0].routed_scale, float) and spec.moes[0].capacity_factor == 2.0


def test_variant_layers_int_and_declaration_order() -> None:
    spec = parse_spec(ok("variant b { layers = 1 }", "variant a { top_k = 1 }",
                         "modality img { features = 8 }", "ffn f { hidden = 8 }"))
    assert spec.variants == (Variant("b", (0,), None, None), Variant("a", None, None, 1))
    assert [m.name for m in spec.modalities] == ["text", "img"]
    assert resolve_variant(spec, "a").spec.moes[0].top_k == 1


def test_groups_sorted_by_start() -> None:
    spec = parse_spec(model(*HEAD, "modality img { features = 8 }",
                            "moe e { experts = 4 top_k = 1 expert_hidden = 8 group img = 2..4 group text = 0..2 }",
                            LAYERS))
    assert spec.moes[0].groups == (ExpertGroup("text", 0, 2), ExpertGroup("img", 2, 4))


def test_every_example_variant_rebuilds_as_a_valid_spec() -> None:
    """A resolved variant, written back as a plain spec, must itself pass validation."""
    for path in sorted(EXAMPLES.glob("*.moe")):
        spec = load_spec(path)
        for v in spec.variants:
            small = resolve_variant(spec, v.name).spec
            assert small.layers and all(m.top_k <= m.experts for m in small.moes)


def test_import_does_not_import_torch() -> None:
    code = "import sys, mocompile.dsl; assert 'torch' not in sys.modules, 'importing mocompile.dsl imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_attribute_is_attribute_error() -> None:
    import mocompile.dsl as dsl

    with pytest.raises(AttributeError):
        dsl.no_such_thing  # noqa: B018


# ---- load_spec failures ------------------------------------------------------------------------


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.moe"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert (info.value.line, info.value.column) == (0, 0)
    assert str(info.value).startswith(f"{path}: ") and "not found" in str(info.value)


def test_load_directory_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(SpecError):
        load_spec(tmp_path)
    bad = tmp_path / "bad.moe"
    bad.write_bytes(b"model m { \xff }")
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    assert "UTF-8" in str(info.value) and isinstance(info.value, MocompileError)


def test_load_reports_file_name(tmp_path: Path) -> None:
    path = tmp_path / "broken.moe"
    path.write_text(model("hidden = 64", "heads 4"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}:3:11: ")


# ---- options of imported architectures, and the spec writer ----------------------------------------


def test_attention_and_routing_options() -> None:
    spec = parse_spec(ok("qkv_bias = true  out_bias = true  qk_norm = per_head"))
    assert (spec.qkv_bias, spec.out_bias, spec.qk_norm, spec.attention, spec.mla) == (True, True, "per_head", "gqa",
                                                                                      None)
    mla = parse_spec(ok("attention = mla  kv_lora_rank = 8  qk_nope_head_dim = 6  qk_rope_head_dim = 4",
                        "v_head_dim = 5"))
    assert mla.attention == "mla" and mla.head_dim == 10 and mla.kv_heads == mla.heads and mla.mla.q_lora_rank == 0
    # groups of one expert are fine when a group is scored by its best expert
    moe = parse_spec(model(*HEAD, "moe e { experts = 4 top_k = 2 expert_hidden = 8 n_group = 4 topk_group = 2 "
                                  "group_score = max score_bias = true }", LAYERS)).moes[0]
    assert (moe.group_score, moe.score_bias, moe.shared_gate) == ("max", True, False)


def test_written_examples_parse_back_to_the_same_spec() -> None:
    from dataclasses import replace

    from mocompile.dsl.spec_writer import write_spec

    for path in sorted(EXAMPLES.glob("*.moe")):
        spec = load_spec(path)
        again = parse_spec(write_spec(spec, header=["written"], notes={"model.hidden": "a note"}), "w.moe")
        assert replace(again, source="") == replace(spec, source=""), path.name
