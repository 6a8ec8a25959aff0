"""torch.fx lowering: the IR of every example (and variant) computes what the eager model does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import EXAMPLES, example_variants
from mocompile.frontend import lower_source, source_from_spec
from mocompile.ir.interpreter import run
from mocompile.ir.printer import format_graph
from mocompile.lower_fx import numpy_inputs


@pytest.mark.parametrize("spec_name,variant", example_variants())
@pytest.mark.parametrize("batch", [1, 3])
def test_interpreter_matches_eager(spec_name: str, variant: str | None, batch: int) -> None:
    src = source_from_spec(EXAMPLES / spec_name, variant, None, seed=1)
    graph = lower_source(src)
    inputs = src.module.example_inputs(batch, 7, seed=batch)
    with torch.no_grad():
        ref = src.module(**inputs).numpy()
    got = run(graph, numpy_inputs(inputs))["logits"]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_moe_block_stays_whole_in_the_ir() -> None:
    graph = lower_source(source_from_spec(EXAMPLES / "mixtral_tiny.moe", None, None, seed=0))
    ops = [n.op for n in graph.nodes]
    assert ops.count("router.topk") == 2 and ops.count("experts") == 2 and ops.count("attention") == 2
    text = format_graph(graph)
    assert "router.topk(" in text and "@layers.0.ffn.experts.gate" in text
    # symbolic batch and sequence dims survive lowering
    assert str(graph.inputs[0].type) == "int64[batch, seq]"
    assert str(graph.outputs[0].type) == "float32[batch, seq, 512]"


def test_multimodal_segments_concatenate_symbolically() -> None:
    graph = lower_source(source_from_spec(EXAMPLES / "unified_tiny.moe", None, None, seed=0))
    assert [v.name for v in graph.inputs] == ["text", "image", "audio"]
    assert graph.outputs[0].type.shape == ("batch", "seq_text+seq_image+seq_audio", 512)
    routers = graph.nodes_of("router.topk")
    assert routers and all(len(n.inputs) == 3 and n.attrs["groups"] for n in routers)


def test_variant_shares_the_full_models_weights() -> None:
    full = lower_source(source_from_spec(EXAMPLES / "unified_tiny.moe", None, None, seed=5))
    half = lower_source(source_from_spec(EXAMPLES / "unified_tiny.moe", "half", None, seed=5))
    name = "layers.1.ffn.experts.up"
    kept = [0, 1, 4, 5, 8, 9]
    np.testing.assert_array_equal(half.weights[name], full.weights[name][kept])
    np.testing.assert_array_equal(half.weights["layers.0.attn.q_proj.weight"], full.weights["layers.0.attn.q_proj.weight"])
