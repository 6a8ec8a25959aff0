"""The last-position prompt step: the IR cut (mocompile/prefill.py) computes the full graph's
outputs at the last position with the final norm, the LM head and the last feed-forward moved
after the cut; the compiled `prefill` function returns the step's last position bit for bit
and leaves the same cache; `step(last_only=True)` and `generate` use it, and fall back to
slicing the step's outputs where a program has none; the cut graph keeps samples apart."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np
import pytest

from conftest import EXAMPLES
from mocompile.compiler import compile
from mocompile.frontend import lower_source, source_for
from mocompile.ir.graph import Graph
from mocompile.ir.interpreter import run as interpret
from mocompile.ir.registry import get_op
from mocompile.ir.types import TensorType
from mocompile.ir.verifier import verify
from mocompile.isolation import analyze
from mocompile.prefill import cached_last_position_graph, last_position_graph
from mocompile.runtime import open_artifact, random_inputs
from mocompile.signature import signature_of

CUT = "last_position"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefill")
    return {name: compile(EXAMPLES / f"{example}.moe", passes=passes, out_dir=root / name, seq=6)
            for name, example, passes in [("mixtral", "mixtral_tiny", ""),
                                          ("deepseek_int4", "deepseek_tiny", "quantize(w=int4,group=32)"),
                                          ("unified", "unified_tiny", "")]}


def _graph(example: str):
    src = source_for(EXAMPLES / f"{example}.moe", None, None, 0)
    return src, lower_source(src)


# ---- the IR cut ------------------------------------------------------------------------------
@pytest.mark.parametrize("example", ["mixtral_tiny", "deepseek_tiny", "latent_tiny", "unified_tiny"])
def test_cut_graph_computes_the_last_position_with_the_lm_head_after_the_cut(example):
    src, g = _graph(example)
    cut = last_position_graph(g)
    assert not isinstance(cut, str), cut
    verify(cut.graph)
    assert cut.cut == ["logits"] and cut.moved[-2:] == ["rmsnorm@norm", "linear@lm_head"]
    assert any(m.startswith("experts@") for m in cut.moved)  # the last MoE block's experts run on one row too
    nodes = cut.graph.nodes
    (head,) = [n for n in nodes if n.loc == "lm_head"]
    assert head.inputs[0].type.shape[:2] == ("batch", 1) and head.outputs[0].type.shape[:2] == ("batch", 1)
    first_cut = min(i for i, n in enumerate(nodes) if n.op == CUT)
    assert all(n.op != CUT for n in nodes[nodes.index(head):])
    assert {f"{n.op}@{n.loc}" for n in nodes[first_cut:] if n.op != CUT} == set(cut.moved)
    assert len(nodes) == len(g.nodes) + sum(n.op == CUT for n in nodes)
    x = random_inputs(signature_of(g, src.int_high), 2, 7, seed=3)
    full, last = interpret(g, x)["logits"], interpret(cut.graph, x)["logits"]
    assert last.shape == (2, 1, full.shape[2])
    # numpy's matmul (BLAS) blocks its work by the number of rows, so the interpreter is not
    # bit-exact across row counts; the compiled kernels are (test below)
    np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("example", ["mixtral_tiny", "unified_tiny"])
def test_cut_graphs_are_proven_isolated(example):
    """The cut keeps each sample's own last row: the cut graph and the KV-cached cut graph (what
    the prefill function computes, cache included) keep samples apart."""
    _, g = _graph(example)
    assert analyze(last_position_graph(g).graph).verdict == "isolated"
    cached = cached_last_position_graph(g)
    assert any(v.name.startswith("present.") and v.type.shape[1] != 1 for v in cached.graph.outputs)
    assert analyze(cached.graph).verdict == "isolated"


def test_multimodal_last_position_is_the_last_of_the_joined_segments():
    """A value carrying one segment's positions (before the join) is never cut: the cut starts
    after the concat, and the last position is the joined sequence's (here the audio's last)."""
    src, g = _graph("unified_tiny")
    cut = last_position_graph(g).graph
    cut_inputs = [n.inputs[0] for n in cut.nodes if n.op == CUT]
    assert cut_inputs and all(v.type.shape[1] == "seq_text+seq_image+seq_audio" for v in cut_inputs)
    x = random_inputs(signature_of(g, src.int_high), 1, 4, seed=5)
    x["audio"] = x["audio"][:, :2]
    full, last = interpret(g, x)["logits"], interpret(cut, x)["logits"]
    assert full.shape[1] == 10
    np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-5 * np.abs(full).max())


def test_graphs_without_a_cut_say_why():
    _, g = _graph("unified_tiny")
    text = next(n for n in g.nodes if n.op == "embedding").outputs[0]  # [batch, seq_text, hidden]
    g.outputs.append(text)
    assert "counts positions elsewhere than as axis 1" in last_position_graph(g)
    _, g = _graph("mixtral_tiny")
    for n in g.nodes:
        if n.op == "attention":
            n.attrs["causal"] = False
    assert last_position_graph(g).startswith("the graph does not decode with a KV cache")


def test_last_position_op():
    op = get_op(CUT)
    assert not op.positionwise and op.position_check is None  # a graph holding it does not decode
    assert op.infer([TensorType(("batch", "seq", 8), "float32")], {}) == [TensorType(("batch", 1, 8), "float32")]
    with pytest.raises(ValueError, match="no positions axis"):
        op.infer([TensorType(("batch",), "float32")], {})
    x = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    (y,) = op.compute([x], {})
    assert y.shape == (2, 1, 4) and np.array_equal(y, x[:, 2:]) and y.flags.c_contiguous
    with pytest.raises(ValueError, match="holds no position"):
        op.compute([np.zeros((2, 0, 4), np.float32)], {})
    g = Graph("batch_on_positions")  # the sample index on axis 1: keeping its last row mixes samples
    v = g.add_input("x", TensorType((4, "batch", 8), "float32"))
    g.outputs.append(g.add(CUT, v, name="y"))
    assert analyze(g, batch_axes={"x": 1}).verdict == "leaks"


# ---- the compiled prefill function -------------------------------------------------------------
@pytest.mark.parametrize("name", ["mixtral", "deepseek_int4", "unified"])
def test_prefill_equals_the_steps_last_position_bit_for_bit(artifacts, name):
    art = artifacts[name]
    program = art.manifest["program"]
    assert program["prefill"] == {"function": "prefill", "last_only": ["logits"]} and art.has_prefill
    check = art.manifest["prefill_verification"]
    assert check["bit_exact"] and check["isolation"] == "isolated" and check["cache_tensors_compared"] > 0
    assert art.manifest["isolation"]["decoding"] == {"step": "isolated", "prefill": "isolated"}
    assert program["kernel_calls"]["prefill"] > 0
    full = random_inputs(art.signature, 3, 9, seed=21)
    ids = full["text"]
    caches = [art.new_cache(3, 32) for _ in range(2)]
    for chunk in (full, {"text": ids[:, :4]}):  # a whole prompt, then one more chunk after cached positions
        want = art.step(chunk, caches[0])["logits"]
        got = art.step(chunk, caches[1], last_only=True)["logits"]
        assert got.shape == (3, 1, want.shape[2]) and np.array_equal(got, want[:, -1:])
        for a, b in zip(caches[0].tensors, caches[1].tensors):
            assert np.array_equal(a.numpy(), b.numpy())
    one = art.step({"text": ids[:, 4:5]}, caches[1], last_only=True)["logits"]  # one position: the driver
    assert np.array_equal(one, art.step({"text": ids[:, 4:5]}, caches[0])["logits"])


def test_prefill_runs_the_lm_head_on_one_row_per_sample():
    from tvm import relax

    from mocompile.backends.tvm_cpu.lower import lower

    _, g = _graph("mixtral_tiny")
    program = lower(g)
    assert program.prefill == ["logits"] and program.no_prefill_reason is None

    def kernel_calls(function: str) -> list[tuple[str, str]]:
        calls = []
        relax.analysis.post_order_visit(program.mod[function].body, lambda e: calls.append(
            (e.args[0].name_hint, str(e.ty))) if isinstance(e, relax.Call) and e.op.name == "relax.call_tir" else None)
        return calls

    step, prefill = kernel_calls("step"), kernel_calls("prefill")
    (head,) = [c for c in step if c[0].startswith("dense_128x512")]
    assert "(batch * seq, 512)" in head[1]
    (head,) = [c for c in prefill if c[0].startswith("dense_128x512")]
    assert "(batch, 512)" in head[1]  # the same kernel, one row per sample
    new = {name for name, _ in prefill} - {name for name, _ in step}
    assert new and all(name.startswith("last_position") for name in new)  # the cut's copies, nothing else


def test_generate_gives_the_greedy_tokens_of_full_forwards(artifacts):
    art = artifacts["mixtral"]
    prompt = random_inputs(art.signature, 2, 5, seed=4)["text"]
    tokens = art.generate(prompt, 4)
    seq = prompt
    for i in range(4):
        nxt = art.run({"text": seq})["logits"][:, -1].argmax(-1).astype(seq.dtype)
        assert np.array_equal(tokens[:, i], nxt)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)


def test_artifact_without_a_prefill_function_slices_the_step(artifacts):
    """An artifact compiled before there was one (its manifest names none) runs the step and
    keeps its last position: the same numbers and the same tokens."""
    art = artifacts["unified"]
    manifest = copy.deepcopy(art.manifest)
    del manifest["program"]["prefill"]
    old = open_artifact(art.path, manifest)
    assert not old.has_prefill and art.has_prefill
    x = random_inputs(art.signature, 2, 5, seed=8)
    got = old.step(x, old.new_cache(2, 16), last_only=True)["logits"]
    assert np.array_equal(got, art.step(x, art.new_cache(2, 16), last_only=True)["logits"])
    assert got.shape[1] == 1
    assert np.array_equal(old.generate(x, 3), art.generate(x, 3))
