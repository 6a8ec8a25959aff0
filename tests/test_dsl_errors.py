"""The `.moe` spec language's errors: every malformed spec is one line at the right line:column,
and randomly damaged examples only ever raise that error.

Needs only pytest, lark and the installed package (no torch).
"""

from __future__ import annotations

import random

import pytest

from mocompile.dsl import parse_spec
from mocompile.errors import SpecError

from dsl_specs import EXAMPLES, HEAD, LAYERS, MOE, model, ok


# ---- malformed specs: every error is a one-line SpecError at the right line:column -------------
#
# Each case marks the offending position with `^` (not part of the language); the marker is
# removed before parsing and its line:column is the location the error must carry.

V = "modality img { features = 8 }"  # a second modality for group tests
G2 = "moe e { experts = 4 top_k = 1 expert_hidden = 8 group text = 0..2 group img = 2..4 }"
DS = "moe e { experts = 16 top_k = 4 expert_hidden = 8 n_group = 4 topk_group = 2 }"

MALFORMED = [
    # -- syntax --
    ("missing-equals", model("hidden ^64"), "unexpected number 64, expected one of: '=', a name"),
    ("missing-brace-at-eof", "model m {\n    hidden = 64^\n", "unexpected end of file, expected one of: '}'"),
    ("bad-character", model("hidden = ^$64"), "unexpected character '$'"),
    ("list-missing-comma", model(*HEAD, MOE, "layers = [e ^e]"), "unexpected name 'e', expected one of: ','"),
    ("list-unclosed", model(*HEAD, "layers = [e, ^}"), "unexpected '}'"),
    ("key-without-value", model("hidden = 64", "kv_heads", "^heads = 4"), "unexpected name 'heads' after 'kv_heads'"),
    ("empty-file", "^", "empty spec, expected 'model <name> { ... }'"),
    ("key-outside-model", "^hidden = 3\n" + ok(), "found key 'hidden' outside"),
    ("two-models", ok() + "^model n { }\n", "only one model per file"),
    ("block-outside-model", ok() + "^moe x { }\n", "'moe' blocks go inside the model block"),
    # -- unknown / duplicate keys and blocks --
    ("unknown-model-key", model("^hiden = 64"), "unknown key 'hiden' in model 'm' (did you mean 'hidden'?)"),
    ("unknown-moe-key", model(*HEAD, "moe e { experts = 4 ^topk = 2 expert_hidden = 8 }", LAYERS),
     "unknown key 'topk' in moe 'e' (did you mean 'top_k'?)"),
    ("unknown-ffn-key", ok("ffn f { hidden = 8 ^gate = true }"), "unknown key 'gate' in ffn 'f' (did you mean 'gated'?)"),
    ("unknown-modality-key", ok("modality img { ^feature = 8 }"),
     "unknown key 'feature' in modality 'img' (did you mean 'features'?)"),
    ("unknown-variant-key", ok("variant v { ^layer = 1 }"), "unknown key 'layer' in variant 'v' (did you mean 'layers'?)"),
    ("misplaced-key", model(*HEAD, MOE, LAYERS, "^experts = 4"), "'experts' belongs in a moe block"),
    ("block-kind-as-key", ok("^moe = 3"), "'moe' starts a block"),
    ("duplicate-model-key", model(*HEAD, "^hidden = 32", MOE, LAYERS), "duplicate key 'hidden' in model 'm' (first set at line 2)"),
    ("duplicate-moe-key", model(*HEAD, "moe e { experts = 4 top_k = 2 expert_hidden = 8 ^top_k = 1 }", LAYERS),
     "duplicate key 'top_k' in moe 'e'"),
    ("unknown-block-kind", ok("^mo x { experts = 2 }"), "unknown block kind 'mo' (did you mean 'moe'?)"),
    ("nested-block", model(*HEAD, "moe e { experts = 4 top_k = 2 expert_hidden = 8 ^ffn f { hidden = 2 } }", LAYERS),
     "cannot be nested inside moe 'e'"),
    # -- types and enums --
    ("int-got-name", model(*HEAD, "moe e { experts = ^silu top_k = 2 expert_hidden = 8 }", LAYERS),
     "'experts' expects an integer, found name 'silu'"),
    ("int-got-float", model("hidden = ^1.5"), "'hidden' expects an integer, found float 1.5"),
    ("bool-got-int", ok("ffn f { hidden = 8 gated = ^3 }"), "'gated' expects true or false, found integer 3"),
    ("bad-activation", ok("ffn f { hidden = 8 activation = ^relu6 }"),
     "unknown activation 'relu6', expected one of silu, gelu"),
    ("bad-norm", ok("norm = ^batchnorm"), "expected one of rmsnorm, layernorm"),
    ("bad-scoring", model(*HEAD, "moe e { experts = 4 top_k = 2 expert_hidden = 8 scoring = ^sigmod }", LAYERS),
     "unknown scoring 'sigmod', expected one of softmax, sigmoid (did you mean 'sigmoid'?)"),
    ("float-got-name", ok("norm_eps = ^tiny"), "'norm_eps' expects a number, found name 'tiny'"),
    ("layers-not-list", model(*HEAD, MOE, "layers = ^e"), "'layers' expects a list of block names"),
    ("layers-not-names", model(*HEAD, MOE, "layers = [e, ^1]"), "'layers' expects block names, found integer 1"),
    ("plus-non-list", model(*HEAD, MOE, "layers = [e] + ^2"), "'+' joins lists, found integer 2"),
    ("repeat-count-name", model(*HEAD, MOE, "layers = [e] * ^n"), "repeat count must be a non-negative integer"),
    # -- required keys (located at the block's name) --
    ("model-missing-heads", model("hidden = 64", "max_seq = 8", LAYERS, name="^m"),
     "model 'm' is missing required key 'heads'"),
    ("model-missing-layers", model(*HEAD, MOE, name="^m"), "model 'm' is missing required key 'layers'"),
    ("moe-missing-keys", model(*HEAD, "moe ^e { experts = 4 }", LAYERS),
     "moe 'e' is missing required keys 'top_k', 'expert_hidden'"),
    ("ffn-missing-hidden", ok("ffn ^f { activation = gelu }"), "ffn 'f' is missing required key 'hidden'"),
    ("modality-neither", ok("modality ^img { }"), "modality 'img' needs exactly one of 'vocab'"),
    ("modality-both", ok("modality img { vocab = 3 ^features = 8 }"), "sets both 'vocab' and 'features'"),
    # -- sizes and attention --
    ("zero-hidden", model("hidden = ^0"), "'hidden' must be a positive integer, found 0"),
    ("negative-experts", model(*HEAD, "moe e { experts = ^-2 top_k = 1 expert_hidden = 8 }", LAYERS),
     "'experts' must be a positive integer, found -2"),
    ("negative-shared", model(*HEAD, "moe e { experts = 4 top_k = 1 expert_hidden = 8 shared_experts = ^-1 }", LAYERS),
     "'shared_experts' must be an integer >= 0, found -1"),
    ("topk-over-experts", model(*HEAD, "moe e { experts = 4 top_k = ^5 expert_hidden = 8 }", LAYERS),
     "'top_k' = 5 is larger than 'experts' = 4"),
    ("heads-kv-heads", ok("kv_heads = ^3"), "'heads' = 4 is not divisible by 'kv_heads' = 3"),
    ("hidden-heads", model("hidden = 66", "heads = ^4", "max_seq = 8", "modality t { vocab = 9 }",
                           "ffn f { hidden = 8 }", "layers = [f]"),
     "'hidden' = 66 is not divisible by 'heads' = 4"),
    ("odd-head-dim", ok("head_dim = ^15"), "head_dim = 15 must be even"),
    ("capacity-zero", model(*HEAD, "moe e { experts = 4 top_k = 2 expert_hidden = 8 capacity_factor = ^0 }", LAYERS),
     "'capacity_factor' must be > 0, found 0"),
    ("routed-scale-negative", model(*HEAD, "moe e { experts = 4 top_k = 2 expert_hidden = 8 routed_scale = ^-1.5 }",
                                    LAYERS), "'routed_scale' must be > 0, found -1.5"),
    # -- names and layers --
    ("duplicate-block-name", ok("ffn ^e { hidden = 8 }"), "duplicate name 'e': ffn 'e' clashes with moe 'e' at line 6"),
    ("modality-block-clash", ok("ffn ^text { hidden = 8 }"), "ffn 'text' clashes with modality 'text'"),
    ("duplicate-variant", ok("variant v { top_k = 1 }", "variant ^v { top_k = 2 }"), "duplicate name 'v'"),
    ("layers-unknown-block", model(*HEAD, MOE, "ffn dense { hidden = 8 }", "layers = [dense, ^ee]"),
     "'layers' names unknown block 'ee' (did you mean 'e'?); known blocks: e, dense"),
    ("layers-names-modality", model(*HEAD, MOE, "layers = [^text]"), "'layers' names modality 'text'"),
    ("layers-empty", model(*HEAD, MOE, "layers = ^[]"), "'layers' is empty"),
    ("layers-repeat-zero", model(*HEAD, MOE, "layers = ^[e] * 0"), "'layers' is empty"),
    ("no-token-modality", model("hidden = 64", "heads = 4", "max_seq = 8", "modality img { features = 8 }",
                                "ffn f { hidden = 8 }", "layers = [f]", name="^m"), "no token modality"),
    # -- modality groups --
    ("group-unknown-modality", model(*HEAD, "moe e { experts = 4 top_k = 1 expert_hidden = 8 group ^txt = 0..4 }",
                                     LAYERS), "group for unknown modality 'txt' in moe 'e' (did you mean 'text'?)"),
    ("group-overlap", model(*HEAD, V, "moe e { experts = 4 top_k = 1 expert_hidden = 8 "
                                      "group text = 0..3 group img = ^2..4 }", LAYERS),
     "group img = 2..4 overlaps group text = 0..3"),
    ("group-uncovered", model(*HEAD, V, "moe e { experts = 8 top_k = 1 expert_hidden = 8 "
                                        "^group text = 0..2 group img = 2..5 }", LAYERS),
     "leave experts 5..8 in no group"),
    ("group-exceeds", model(*HEAD, V, "moe e { experts = 4 top_k = 1 expert_hidden = 8 "
                                      "group text = 0..2 group img = ^2..6 }", LAYERS),
     "group img = 2..6 exceeds the 4 experts of moe 'e'"),
    ("group-topk", model(*HEAD, V, "moe e { experts = 6 top_k = ^3 expert_hidden = 8 "
                                   "group text = 0..4 group img = 4..6 }", LAYERS),
     "'top_k' = 3 is larger than the smallest modality group of moe 'e' (img = 4..6, 2 experts)"),
    ("group-with-n-group", model(*HEAD, V, "moe e { experts = 4 top_k = 1 expert_hidden = 8 n_group = ^2 "
                                           "group text = 0..2 group img = 2..4 }", LAYERS),
     "not supported together"),
    ("group-empty-range", model(*HEAD, "moe e { experts = 4 top_k = 1 expert_hidden = 8 group text = ^4..4 }",
                                LAYERS), "range 4..4 is empty"),
    ("group-not-range", model(*HEAD, "moe e { experts = 4 top_k = 1 expert_hidden = 8 group text = ^4 }",
                              LAYERS), "'group text' expects an expert range like 0..4, found integer 4"),
    ("group-missing-modality", model(*HEAD, V, "moe e { experts = 4 top_k = 1 expert_hidden = 8 "
                                               "^group text = 0..4 }", LAYERS), "none for modality 'img'"),
    ("group-without-name", model(*HEAD, "moe e { experts = 4 top_k = 1 expert_hidden = 8 ^group = 0..4 }", LAYERS),
     "'group' needs a modality name"),
    ("group-outside-moe", ok("^group text = 0..4"), "'group' entries belong in a moe block"),
    ("group-duplicate", model(*HEAD, "moe e { experts = 4 top_k = 1 expert_hidden = 8 "
                                     "group text = 0..4 group ^text = 0..4 }", LAYERS),
     "duplicate key 'group text'"),
    # -- DeepSeek group-limited routing --
    ("n-group-divides", model(*HEAD, "moe e { experts = 8 top_k = 2 expert_hidden = 8 n_group = ^3 topk_group = 1 }",
                              LAYERS), "'n_group' = 3 does not divide 'experts' = 8"),
    ("topk-group-over-n-group", model(*HEAD, "moe e { experts = 8 top_k = 2 expert_hidden = 8 n_group = 2 "
                                             "topk_group = ^3 }", LAYERS),
     "'topk_group' = 3 is larger than 'n_group' = 2"),
    ("topk-over-reachable", model(*HEAD, "moe e { experts = 16 top_k = ^5 expert_hidden = 8 n_group = 4 "
                                         "topk_group = 1 }", LAYERS),
     "'top_k' = 5 is larger than the 4 experts a token can reach"),
    ("n-group-one-per-group", model(*HEAD, "moe e { experts = 4 top_k = 1 expert_hidden = 8 n_group = ^4 }",
                                    LAYERS), "leaves 1 expert per routing group"),
    # -- variants --
    ("variant-index-range", model(*HEAD, MOE, "layers = [e] * 2", "variant v { layers = [0, ^2] }"),
     "layer index 2 in variant 'v' is out of range: the model has 2 layers"),
    ("variant-not-increasing", model(*HEAD, MOE, "layers = [e] * 3", "variant v { layers = [1, ^0] }"),
     "must be strictly increasing, found 0 after 1"),
    ("variant-repeated-index", model(*HEAD, MOE, "layers = [e] * 3", "variant v { layers = [1, ^1] }"),
     "must be strictly increasing"),
    ("variant-empty-layers", ok("variant v { layers = ^[] }"), "'layers' in variant 'v' is empty"),
    ("variant-zero-layers", ok("variant v { layers = ^0 }"), "keeps no layers"),
    ("variant-too-many-layers", ok("variant v { layers = ^5 }"), "is more than the model's 1 layer"),
    ("variant-layers-type", ok("variant v { layers = [^e] }"), "expects layer indices (integers), found name 'e'"),
    ("variant-experts-too-many", ok("variant v { experts = ^8 }"),
     "'experts' = 8 in variant 'v' is more than the 4 experts of moe 'e'"),
    ("variant-experts-split", model(*HEAD, V, G2, LAYERS, "variant v { experts = ^3 top_k = 1 }"),
     "does not split evenly across the 2 modality groups of moe 'e'"),
    ("variant-experts-n-group", model(*HEAD, DS, LAYERS, "variant v { experts = ^6 }"),
     "does not split evenly across the 4 routing groups (n_group) of moe 'e'"),
    ("variant-topk-per-group", model(*HEAD, V, G2, LAYERS, "variant v { experts = 2 top_k = ^2 }"),
     "'top_k' = 2 in variant 'v' is larger than the 1 expert it keeps per modality group"),
    ("variant-topk-over-kept", ok("variant v { experts = 2 top_k = ^3 }"),
     "'top_k' = 3 in variant 'v' is larger than the 2 experts it keeps"),
    ("variant-inherited-topk", ok("variant v { experts = ^1 }"), "inherited from moe 'e'"),
    ("variant-topk-zero", ok("variant v { top_k = ^0 }"), "'top_k' must be a positive integer, found 0"),
    ("variant-no-moe", model(*HEAD, "ffn f { hidden = 8 }", "layers = [f]", "variant v { experts = ^2 }"),
     "needs a moe block"),
    ("variant-recheck-routing-groups", model(*HEAD, DS, LAYERS, "variant v { experts = ^4 }"),
     "variant 'v' (moe 'e' shrunk to 4 experts, top_k 4)"),
    # -- attention options and latent attention --
    ("latent-key-without-mla", ok("^kv_lora_rank = 8"), "'kv_lora_rank' only applies to latent attention"),
    ("mla-missing-keys", ok("attention = ^mla  kv_lora_rank = 8"),
     "'attention = mla' needs 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim'"),
    ("mla-odd-rope", ok("attention = mla  kv_lora_rank = 8  qk_nope_head_dim = 8  ^qk_rope_head_dim = 5  "
                        "v_head_dim = 8"), "qk_rope_head_dim = 5 must be even"),
    ("mla-with-kv-heads", ok("attention = mla  kv_lora_rank = 8  qk_nope_head_dim = 8  qk_rope_head_dim = 4  "
                             "v_head_dim = 8  ^kv_heads = 2"), "'kv_heads' cannot be set with 'attention = mla'"),
    ("unknown-qk-norm", ok("qk_norm = ^heads"), "unknown qk_norm 'heads', expected one of none, whole, per_head"),
    ("shared-gate-without-shared", model(*HEAD, "moe e { experts = 4 top_k = 2 expert_hidden = 8 shared_gate = ^true }",
                                         LAYERS), "'shared_gate' gates the shared experts, but moe 'e' has none"),
]


def _locate(marked: str) -> tuple[str, int, int]:
    """Remove the single `^` marker; return the text and the marker's 1-based line and column."""
    assert marked.count("^") == 1, marked
    index = marked.index("^")
    before = marked[:index]
    line = before.count("\n") + 1
    column = index - (before.rfind("\n") + 1) + 1
    return marked.replace("^", ""), line, column


def test_enough_distinct_malformed_cases() -> None:
    assert len(MALFORMED) >= 20
    assert len({case[0] for case in MALFORMED}) == len(MALFORMED)
    assert len({case[1] for case in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize("marked, fragment", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_spec_is_located(marked: str, fragment: str) -> None:
    text, line, column = _locate(marked)
    with pytest.raises(SpecError) as info:
        parse_spec(text, "bad.moe")
    err = info.value
    message = str(err)
    assert type(err) is SpecError
    assert "\n" not in message
    assert message.startswith(f"bad.moe:{line}:{column}: "), message
    assert (err.line, err.column, err.source) == (line, column, "bad.moe")
    assert fragment in message, message


def test_the_base_of_the_malformed_cases_is_valid() -> None:
    """So each malformed case fails for its own reason only."""
    parse_spec(ok())
    parse_spec(model(*HEAD, V, G2, LAYERS, "variant v { experts = 2 top_k = 1 }"))
    parse_spec(model(*HEAD, DS, LAYERS, "variant v { experts = 8 }"))


# ---- robustness: damaged examples only ever raise SpecError ------------------------------------


def _damaged(text: str, rng: random.Random, count: int) -> list[str]:
    out = []
    junk = "{}[]()=+*.,#-_ \n0123456789aez$@\"'"
    for _ in range(count):
        i = rng.randrange(len(text))
        op = rng.randrange(3)
        if op == 0:
            out.append(text[:i] + text[i + 1:])
        elif op == 1:
            out.append(text[:i] + rng.choice(junk) + text[i + 1:])
        else:
            out.append(text[:i] + rng.choice(junk) + text[i:])
    return out


@pytest.mark.parametrize("name", ["mixtral_tiny", "deepseek_tiny", "unified_tiny"])
def test_damaged_examples_raise_only_spec_errors(name: str) -> None:
    text = (EXAMPLES / f"{name}.moe").read_text()
    rng = random.Random(name)
    prefixes = [text[:n] for n in range(0, len(text), 7)]
    for damaged in prefixes + _damaged(text, rng, 400):
        try:
            parse_spec(damaged, "x.moe")
        except SpecError as err:
            assert "\n" not in str(err) and err.line >= 1 and err.column >= 1, str(err)
