"""Errors a user sees for a bad pass pipeline or an out-of-bounds spec, and the pass listing.

Pipeline errors must be one line that names the pass, says where in the text the problem is
and, for an option, what the pass accepts (options, types, defaults). Spec numbers beyond
the compiler's bounds (mocompile/dsl/limits.py) must fail as located SpecErrors before
anything is built from them; damaged specs must only ever raise MocompileErrors.
"""

from __future__ import annotations

import random
import re
import tracemalloc
from typing import Literal

import pytest

from conftest import EXAMPLE_SPECS, EXAMPLES
from mocompile.dsl import limits, parse_spec
from mocompile.errors import MocompileError, SpecError
from mocompile.ir.graph import Graph
from mocompile.pass_manager import (Pass, PassContext, PassResult, describe_passes, load_plugin, parse_pipeline,
                                    register_pass)


@register_pass("test-annotated-options")
class AnnotatedOptions(Pass):
    """A plugin-style pass: its options are only its annotated __init__ parameters."""

    def __init__(self, scale: float = 1.0, mode: Literal["fast", "exact"] = "fast", names: tuple[str, ...] = (),
                 limit: int | None = None) -> None:
        self.scale, self.mode, self.names, self.limit = scale, mode, names, limit

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return PassResult(graph)


def pipeline_error(text: str) -> str:
    with pytest.raises(MocompileError) as info:
        parse_pipeline(text)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f'pipeline "{text}": '), message
    return message


# ---- A: pipeline text errors ------------------------------------------------------------------


def test_unknown_option_lists_the_options_with_types_and_defaults() -> None:
    message = pipeline_error("quantize(bits=8)")
    assert "pass 'quantize' at column 10: it has no option 'bits'" in message
    for listed in ("w: {int8,int4} = 'int8'", "group: int = 0", "skip: str|... = ()", "router: bool = False",
                   "smooth: float or none = None"):
        assert listed in message, message
    assert "did you mean 'group'" in pipeline_error("quantize(groups=64)")


def test_unclosed_parenthesis_is_reported_at_its_column() -> None:
    assert "cannot parse at column 9: the '(' after 'quantize' is not closed" in pipeline_error("quantize(w=int8")
    message = pipeline_error("dce, quantize(w=int8,fold-constants")
    assert "column 14" in message and "before the end of the pipeline" in message
    message = pipeline_error("quantize(w=int8 dce(x=1)")
    assert "column 9" in message and "'(' at column 20" in message


def test_option_value_of_the_wrong_type_names_option_type_and_value() -> None:
    assert "column 16: option 'group' expects an integer, got 'abc'" in pipeline_error("quantize(group=abc)")
    assert "option 'group' expects an integer, got '1.5'" in pipeline_error("quantize(group=1.5)")  # was int(1.5)
    assert "option 'router' expects true or false, got 'yes'" in pipeline_error("quantize(router=yes)")
    assert "option 'w' expects int8 or int4, got 'int3'" in pipeline_error("quantize(w=int3)")
    # a MocompileError, not float()'s ValueError from inside the pass
    assert "option 'smooth' expects a number or none, got 'abc'" in pipeline_error("quantize(a=int8,smooth=abc)")


def test_other_pipeline_errors_are_located() -> None:
    assert "unknown pass 'dcee' at column 5 (did you mean 'dce'?)" in pipeline_error("dce,dcee")
    assert "pass 'dce' at column 5: it takes no options (got 'level')" in pipeline_error("dce(level=3)")
    assert "column 5: expected ',' after pass 'dce', found 'f'" in pipeline_error("dce fold-constants")
    assert "option 'w' is given twice" in pipeline_error("quantize(w=int8,w=int4)")
    assert "unknown skip target(s) ['embedding']" in pipeline_error("quantize(skip=embedding)")


def test_plugin_style_pass_gets_checked_options_from_its_annotations() -> None:
    (p,) = parse_pipeline("test-annotated-options(scale=2,mode=exact,names=a|b,limit=none)")
    assert (p.scale, p.mode, p.names, p.limit) == (2.0, "exact", ("a", "b"), None)
    message = pipeline_error("test-annotated-options(mode=slow)")
    assert "option 'mode' expects fast or exact, got 'slow'" in message
    message = pipeline_error("test-annotated-options(scales=2)")
    listing = "(options: scale: float = 1.0, mode: {fast,exact} = 'fast', names: str|... = (), limit: int or none = None)"
    assert listing in message, message
    load_plugin(EXAMPLES / "custom_pass.py")
    assert "option 'seq' expects an integer, got 'long'" in pipeline_error("dce,flops-report(seq=long)")


def test_valid_pipelines_read_as_before() -> None:
    """Regression guard (holds before and after the option checks): valid text means the same."""
    (q,) = parse_pipeline("quantize(w = int4 , group=64, skip=router|attention, router=TRUE,)")
    assert q.describe() == "quantize(w=int4,group=64,skip=['attention', 'router'],router=True,calib=16)"
    (q,) = parse_pipeline("quantize(w=int8,a=int8,dynamic=token,smooth=0.5,calib=4)")
    assert (q.scheme.activations, q.scheme.smooth, q.calib) == ("token", 0.5, 4)
    (q,) = parse_pipeline("quantize(a=none,skip=)")
    assert q.scheme.activations is None and "attention" in q.roles
    assert [p.name for p in parse_pipeline(" dce , fold-constants, ")] == ["dce", "fold-constants"]
    assert parse_pipeline("") == []


# ---- B: the pass listing ------------------------------------------------------------------------


def test_describe_passes_lists_every_pass_with_options_and_description() -> None:
    load_plugin(EXAMPLES / "custom_pass.py")
    text = describe_passes()
    for name in ("dce", "fold-constants", "check-isolation", "quantize", "flops-report"):
        assert re.search(rf"^  {re.escape(name)} +\S", text, re.M), (name, text)
    assert "Counts FLOPs and bytes per op kind" in text  # a plugin's docstring, first line
    assert "seq: int = 1" in text and "w: {int8,int4} = 'int8'" in text and "(no options)" in text
    assert not text.endswith("\n")


# ---- C: spec bounds -----------------------------------------------------------------------------

MIXTRAL = (EXAMPLES / "mixtral_tiny.moe").read_text()


def spec_error(text: str) -> SpecError:
    tracemalloc.start()
    try:
        with pytest.raises(SpecError) as info:
            parse_spec(text, "big.moe")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2 ** 20, peak  # refused before the list is built (10^7 layer names alone take ~80 MB)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize("count", ["9" * 40, "10000000", "4097"])
def test_layer_repeat_count_is_bounded_before_the_list_is_built(count: str) -> None:
    err = spec_error(MIXTRAL.replace("[sparse] * 2", f"[sparse] * {count}"))
    line = MIXTRAL.splitlines().index("    layers = [sparse] * 2") + 1
    assert (err.line, err.column) == (line, 25), str(err)
    expected = f"'layers' would have {int(count)} items, more than the {limits.MAX_LAYERS} this compiler accepts"
    assert expected in str(err), str(err)
    parse_spec(MIXTRAL.replace("[sparse] * 2", f"[sparse] * {limits.MAX_LAYERS}"))  # the bound itself is fine


@pytest.mark.parametrize("old, new", [
    ("hidden   = 128", "hidden = 1000000"),
    ("heads    = 4", "heads = 100000"),
    ("max_seq  = 256", "max_seq = 1000000000"),
    ("vocab = 512", "vocab = 100000000"),
    ("experts        = 8", "experts = 1000000000"),
    ("top_k          = 2", "top_k = " + "9" * 40),
    ("expert_hidden  = 256", "expert_hidden = 10000000"),
])
def test_huge_sizes_are_located_errors(old: str, new: str) -> None:
    assert old in MIXTRAL
    err = spec_error(MIXTRAL.replace(old, new))
    key, value = new.split(" = ")
    assert f"'{key}' = {value} is more than the" in str(err) and "this compiler accepts" in str(err), str(err)
    assert err.line == MIXTRAL[:MIXTRAL.index(old)].count("\n") + 1


def test_integer_too_long_to_read_is_located() -> None:
    err = spec_error(MIXTRAL.replace("hidden   = 128", "hidden = " + "1" * 5000))
    assert "integer of 5000 digits is too long" in str(err) and (err.line, err.column) == (12, 14), str(err)


def test_sizes_of_real_models_stay_accepted() -> None:
    real = (MIXTRAL.replace("hidden   = 128", "hidden = 16384").replace("heads    = 4", "heads = 128")
            .replace("kv_heads = 2", "kv_heads = 8").replace("max_seq  = 256", "max_seq = 10000000")
            .replace("vocab = 512", "vocab = 1000000").replace("experts        = 8", "experts = 384")
            .replace("expert_hidden  = 256", "expert_hidden = 53248").replace("[sparse] * 2", "[sparse] * 126"))
    spec = parse_spec(real)
    assert (spec.hidden, spec.vocab, spec.max_seq, len(spec.layers), spec.moes[0].experts) == (
        16384, 1000000, 10000000, 126, 384)


def _mutations(text: str, rng: random.Random, count: int) -> list[str]:
    """Damaged copies of a spec: digit runs replaced (often by huge numbers), characters
    deleted or duplicated, lines duplicated."""
    huge = ["9" * 40, "1" * 5000, "1000000000", str(2**63), "0", "-1", "4097"]
    runs = [m.span() for m in re.finditer(r"\d+", text)]
    lines = text.splitlines(keepends=True)
    out = []
    for _ in range(count):
        op = rng.randrange(5)
        if op <= 1:  # a digit run -> a huge or random number
            a, b = rng.choice(runs)
            digits = rng.choice(huge) if op == 0 else "".join(rng.choices("0123456789", k=rng.randint(1, 30)))
            out.append(text[:a] + digits + text[b:])
        elif op == 2:
            i = rng.randrange(len(text))
            out.append(text[:i] + text[i + 1:])
        elif op == 3:
            i = rng.randrange(len(text))
            out.append(text[:i] + text[i] * rng.randint(2, 4) + text[i + 1:])
        else:
            i = rng.randrange(len(lines))
            out.append("".join(lines[:i + 1] + lines[i:]))
    return out


def test_fuzzed_specs_raise_only_mocompile_errors() -> None:
    rng = random.Random(25)
    cases = [m for path in EXAMPLE_SPECS for m in _mutations(path.read_text(), rng, 300 // len(EXAMPLE_SPECS) + 1)]
    for text in cases:
        try:
            parse_spec(text, "fuzz.moe")
        except MocompileError as err:
            assert "\n" not in str(err), str(err)
        except Exception as err:  # noqa: BLE001 (the point: nothing else may escape)
            pytest.fail(f"{type(err).__name__}: {err} for a damaged spec:\n{text}")
