"""Pass API: pipeline text, built-in cleanups, the verifier between passes, user plugins."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import EXAMPLES
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.ir.interpreter import run
from mocompile.ir.types import TensorType
from mocompile.pass_manager import Pass, PassContext, PassManager, PassResult, load_plugin, parse_pipeline, register_pass


def small_graph() -> Graph:
    """x -> linear(w_a + w_b) -> out, plus a dead silu branch and an unused weight."""
    rng = np.random.default_rng(0)
    g = Graph("small")
    x = g.add_input("x", TensorType(("batch", 4), "float32"))
    wa = g.add_param("wa", rng.standard_normal((3, 4)).astype(np.float32))
    wb = g.add_param("wb", rng.standard_normal((3, 4)).astype(np.float32))
    g.add_param("unused", np.zeros(2, np.float32))
    w = g.add("add", wa, wb, loc="merge")
    g.add("silu", x, loc="dead")
    g.outputs = [g.add("linear", x, w, loc="proj")]
    return g


def test_dce_removes_dead_nodes_and_weights() -> None:
    g, reports = PassManager("dce").run(small_graph())
    assert [n.op for n in g.nodes] == ["add", "linear"]
    assert "unused" not in g.weights
    assert reports[0]["removed_nodes"] == ["silu@dead"] and reports[0]["removed_weights"] == ["unused"]
    assert reports[0]["nodes"] == [3, 2]


def test_fold_constants_computes_weight_only_nodes_at_compile_time() -> None:
    original = small_graph()
    x = {"x": np.ones((2, 4), np.float32)}
    folded, reports = PassManager("fold-constants,dce").run(original)
    assert [n.op for n in folded.nodes] == ["linear"]
    assert set(folded.weights) == {"merge.folded"}
    np.testing.assert_allclose(run(folded, x)["proj"], run(original, x)["proj"], rtol=1e-6)
    assert len(original.nodes) == 3  # passes work on a copy


def test_pipeline_text_options_and_errors() -> None:
    passes = parse_pipeline(" dce , fold-constants ")
    assert [p.name for p in passes] == ["dce", "fold-constants"]
    with pytest.raises(MocompileError, match="unknown pass 'nope'"):
        parse_pipeline("dce,nope")
    with pytest.raises(MocompileError, match="takes no options"):
        parse_pipeline("dce(level=3)")
    with pytest.raises(MocompileError, match="cannot parse at column"):
        parse_pipeline("dce,(x)")


def test_verifier_catches_a_pass_that_breaks_the_graph() -> None:
    @register_pass("test-break-types")
    class BreakTypes(Pass):
        def run(self, graph: Graph, ctx: PassContext) -> PassResult:
            graph.nodes[-1].outputs[0].type = TensorType(("batch", 99), "float32")
            return PassResult(graph)

    with pytest.raises(MocompileError, match="test-break-types produced an invalid graph"):
        PassManager("test-break-types").run(small_graph())


def test_user_pass_from_a_plugin_file_runs_through_the_manager() -> None:
    from mocompile.frontend import lower_source, source_from_spec

    load_plugin(EXAMPLES / "custom_pass.py")
    graph = lower_source(source_from_spec(EXAMPLES / "mixtral_tiny.moe", None, None, 0))
    _, reports = PassManager("dce,flops-report(seq=16)").run(graph)
    report = reports[1]
    assert report["pass"] == "flops-report(batch=1,seq=16)"
    # 2 layers x 16 tokens x top-2 x 3 matrices of 128x256, 2 FLOPs per multiply-add
    assert report["flops"]["experts"] == 2 * 16 * 2 * 3 * 128 * 256 * 2


def test_missing_plugin_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(MocompileError, match="pass plugin not found"):
        load_plugin(tmp_path / "nope.py")
