"""Parameters per token, as every pass report states them (mocompile.ir.active_params)."""

from __future__ import annotations

import pytest

from mocompile.dsl import load_spec
from mocompile.dsl.summary import parameter_counts
from mocompile.frontend import lower_source, source_for
from mocompile.ir.active_params import active_params
from mocompile.pass_manager import PassManager

from conftest import EXAMPLES


@pytest.mark.parametrize("name", ["mixtral_tiny", "deepseek_tiny"])
def test_a_token_reads_what_the_spec_says_and_quantization_keeps_the_count(name):
    """The IR's count equals the spec's own arithmetic (top_k of E experts, one embedding row,
    every dense weight), and int4 codes count as the weights they stand for, with the same
    k/E share of the experts: the pass report's params_per_token is unchanged by quantize."""
    spec = EXAMPLES / f"{name}.moe"
    graph = lower_source(source_for(spec, None, None, 0))
    expected = parameter_counts(load_spec(spec))["active_per_token"]
    assert active_params(graph) == expected
    quantized, reports = PassManager("quantize(w=int4,group=32)").run(graph)
    assert active_params(quantized) == expected
    assert reports[0]["params_per_token"] == [expected, expected]
    assert reports[0]["weight_bytes"][1] < reports[0]["weight_bytes"][0] / 4
