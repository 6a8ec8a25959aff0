"""The sparsity and layer-skipping passes on the IR: the selection logic on constructed cases
(a never-routed expert goes first, an identity layer has the lowest influence, a neuron with a
zero down column goes first, Unified Layer Skipping's count and spacing), the shapes each pass
changes, modality and routing groups kept consistent, options checked, and reports with the
held-out quality and a one-line summary."""

from __future__ import annotations

import numpy as np
import pytest

from mocompile.blocks import blocks
from mocompile.errors import MocompileError
from mocompile.ir.interpreter import run as interpret
from mocompile.ir.verifier import verify
from mocompile.pass_manager import PassContext, PassManager, parse_pipeline
from mocompile.passes.prune_experts import PruneExperts
from mocompile.passes.prune_neurons import PruneNeurons
from mocompile.passes.skip_layers import SkipLayers, evenly_spaced, layers_for_speedup
from mocompile.passes.top_k import TopK
from sparsity_models import text_calibration, toy_inputs, toy_moe, trained


@pytest.fixture(scope="module")
def deepseek():
    return trained("deepseek_tiny")


@pytest.fixture(scope="module")
def calib():
    return text_calibration("deepseek_tiny", sequences=8, seq=16)


def _shape(graph, name):
    return graph.params[name].type.shape


def test_a_never_routed_expert_is_pruned_first() -> None:
    g = toy_moe(experts=6, dead_expert=3)
    assert not any(3 in interpret(g, x, watch=[g.nodes[1].outputs[1]])[g.nodes[1].outputs[1].name]
                   for x in toy_inputs(4))
    result = PruneExperts(keep=5).run(g, PassContext(calibration=toy_inputs(8)))
    (layer,) = result.report["layers"]
    assert layer["kept"] == [0, 1, 2, 4, 5] and layer["usage_before"]["counts"][3] == 0
    assert _shape(result.graph, "layers.0.router") == (5, 16) and _shape(result.graph, "layers.0.gate") == (5, 12, 16)
    verify(result.graph)
    quality = result.report["quality"]  # the dead expert served no token: nothing changes
    assert quality["routing_agreement"] == 1.0 and quality["top1_agreement"] == 1.0 and quality["rel_error"] < 1e-5


def test_prune_experts_shrinks_routers_and_keeps_deepseek_groups_equal(deepseek, calib) -> None:
    result = PruneExperts(keep=8).run(deepseek.clone(), PassContext(calibration=calib))
    g = result.graph
    verify(g)
    router = next(n for n in g.nodes if n.op == "router.topk")
    assert router.attrs["n_group"] == 4 and _shape(g, "layers.1.ffn.router.weight") == (8, 128)
    assert _shape(g, "layers.1.ffn.experts.down") == (8, 128, 64)
    for layer in result.report["layers"]:
        assert layer["experts"] == [16, 8] and "usage_after" in layer
        per_group = [sum(1 for e in layer["kept"] if e // 4 == grp) for grp in range(4)]
        assert per_group == [2, 2, 2, 2]
        assert layer["pruned_share"] < 0.5  # the least used half carried less than half the decisions
    assert g.meta["expert_ids"]["layers.1.ffn.router"] == result.report["layers"][0]["kept"]
    assert 0 < result.report["quality"]["routing_agreement"] < 1
    assert result.report["summary"].startswith("experts 32 -> 16 over 2 MoE block(s)")
    with pytest.raises(MocompileError, match="give exactly one of keep=N, ratio=R, min_share=S"):
        parse_pipeline("prune-experts(keep=2,ratio=0.5)")


def test_modality_groups_stay_consistent() -> None:
    g = trained("unified_tiny")
    rng = np.random.default_rng(0)
    samples = [{"text": rng.integers(0, 512, (1, 6)), "image": rng.standard_normal((1, 3, 48)).astype(np.float32),
                "audio": rng.standard_normal((1, 3, 32)).astype(np.float32)} for _ in range(4)]
    result = PruneExperts(keep=6).run(g, PassContext(calibration=samples))
    router = next(n for n in result.graph.nodes if n.op == "router.topk")
    assert router.attrs["groups"] == ((0, 0, 2), (1, 2, 4), (2, 4, 6))
    for layer in result.report["layers"]:  # two per modality group, each from its own group
        assert [sum(1 for e in layer["kept"] if e // 4 == m) for m in range(3)] == [2, 2, 2]
    idx = interpret(result.graph, samples[0], watch=[router.outputs[1]])[router.outputs[1].name][0]
    assert idx[:6].max() <= 1 and idx[6:9].min() >= 2 and idx[6:9].max() <= 3 and idx[9:].min() >= 4


def test_a_neuron_with_a_zero_down_column_is_pruned_first(deepseek, calib) -> None:
    g = deepseek.clone()
    down = g.weights["layers.0.ffn.down_proj.weight"].copy()
    down[:, 37] = 0
    g.weights["layers.0.ffn.down_proj.weight"] = down
    up = g.weights["layers.0.ffn.up_proj.weight"]
    result = PruneNeurons(ratio=1 / 384, multiple=1).run(g, PassContext(calibration=calib))
    out = result.graph
    assert _shape(out, "layers.0.ffn.down_proj.weight") == (128, 383)
    np.testing.assert_array_equal(out.weights["layers.0.ffn.down_proj.weight"], np.delete(down, 37, axis=1))
    np.testing.assert_array_equal(out.weights["layers.0.ffn.up_proj.weight"],
                                  np.delete(up, 37, axis=0))
    assert result.report["quality"]["rel_error"] < 1e-4  # the neuron added nothing


def test_prune_neurons_shrinks_every_block(deepseek, calib) -> None:
    result = PruneNeurons(ratio=0.5).run(deepseek.clone(), PassContext(calibration=calib))
    g = result.graph
    verify(g)
    assert _shape(g, "layers.0.ffn.gate_proj.weight") == (192, 128)
    assert _shape(g, "layers.1.ffn.experts.gate") == (16, 32, 128)
    assert _shape(g, "layers.1.ffn.experts.down") == (16, 128, 32)
    assert _shape(g, "layers.2.ffn.shared.down_proj.weight") == (128, 64)
    before, after = result.report["active_params"]
    assert after < 0.8 * before
    assert 0.5 < result.report["quality"]["top1_agreement"] < 1


def test_top_k_routes_to_fewer_experts(deepseek, calib) -> None:
    result = TopK(k=2).run(deepseek.clone(), PassContext(calibration=calib))
    router = next(n for n in result.graph.nodes if n.op == "router.topk")
    assert router.attrs["top_k"] == 2 and router.outputs[1].type.shape == ("batch", "seq", 2)
    verify(result.graph)
    weights = interpret(result.graph, calib[0], watch=[router.outputs[0]])[router.outputs[0].name]
    np.testing.assert_allclose(weights.sum(-1), 2.5, rtol=1e-5)  # renormalised, times routed_scale
    q = result.report["quality"]
    assert 0.4 < q["routing_agreement"] < 0.6  # 2 of 4 choices per token stay
    assert result.report["summary"].startswith("experts per token 4 -> 2")


@pytest.mark.parametrize("layers,speedup", [(8, 2.0), (12, 1.5), (6, 2.0), (24, 1.33), (5, 1.25)])
def test_uniform_skipping_count_and_spacing(layers, speedup) -> None:
    chosen = evenly_spaced(layers, layers_for_speedup(layers, speedup))
    assert len(chosen) == round(layers * (1 - 1 / speedup))
    assert 0 not in chosen and layers - 1 not in chosen and len(set(chosen)) == len(chosen)
    gaps = np.diff(chosen)  # spread evenly over the middle: equal steps, equal margins at both ends
    assert len(gaps) == 0 or gaps.max() - gaps.min() <= 1
    assert abs((chosen[0] - 1) - (layers - 2 - chosen[-1])) <= 1


def test_skip_layers_speedup_on_a_deeper_model(tmp_path) -> None:
    from mocompile.frontend import lower_source, source_for

    spec = tmp_path / "deep.moe"
    spec.write_text("model deep { hidden = 32 heads = 2 kv_heads = 2 max_seq = 64 modality text { vocab = 64 }\n"
                    "ffn dense { hidden = 32 }\n layers = [dense] * 8 }\n")
    g = lower_source(source_for(spec, None, None, 0))
    result = SkipLayers(speedup=2).run(g, PassContext())
    assert result.report["removed"] == ["layers.1", "layers.3", "layers.4", "layers.6"]
    assert [b.name for b in blocks(result.graph)] == ["layers.0", "layers.2", "layers.5", "layers.7"]
    assert not any(name.startswith("layers.3.") for name in result.graph.params)
    assert result.report["calibration"]["random"] and "on random calibration tokens" in result.report["summary"]


def test_an_identity_layer_has_the_lowest_influence_and_goes_first(deepseek, calib) -> None:
    g = deepseek.clone()
    for name in ("layers.1.attn.o_proj.weight", "layers.1.ffn.experts.down", "layers.1.ffn.shared.down_proj.weight"):
        g.weights[name] = np.zeros_like(g.weights[name])  # layer 1 now adds nothing: out = in
    result = SkipLayers(n=1, by="influence").run(g, PassContext(calibration=calib))
    influence = result.report["influence"]
    assert influence["layers.1"] < 1e-9 < min(influence["layers.0"], influence["layers.2"])
    assert result.report["removed"] == ["layers.1"]
    assert result.report["quality"]["rel_error"] < 1e-5  # removing an identity changes nothing
    assert result.report["quality"]["routing_agreement"] == pytest.approx(0.5)  # its router's choices are gone


def test_pipeline_text_and_summaries(deepseek, calib) -> None:
    manager = PassManager("prune-experts(ratio=0.75),top-k(k=3),skip-layers(speedup=1.5),prune-neurons(ratio=0.25)")
    g, reports = manager.run(deepseek, PassContext(calibration=calib))
    assert len(blocks(g)) == 2 and _shape(g, "layers.2.ffn.experts.gate") == (12, 48, 128)
    for r in reports:
        assert "held-out KL" in r["summary"] and "active params/token" in r["summary"]
        assert r["calibration"]["fit"] == 6 and r["calibration"]["held_out"] == 2
    with pytest.raises(MocompileError, match="run this pass before quantize"):
        PassManager("quantize(w=int8),prune-neurons(ratio=0.5)").run(deepseek, PassContext(calibration=calib))
    with pytest.raises(MocompileError, match="cannot remove 2 of 3 layers keeping the first and last"):
        PassManager("skip-layers(n=2)").run(deepseek, PassContext(calibration=calib))


def test_elastic_picks_the_best_candidate_within_the_budget(deepseek, calib, tmp_path) -> None:
    from mocompile.passes.elastic import Elastic

    plot = tmp_path / "front.png"
    result = Elastic(budget=0.8, skip=(0, 1), experts=(1.0, 0.5), k=(4, 2), neurons=(0.0,),
                     plot=str(plot)).run(deepseek.clone(), PassContext(calibration=calib))
    r = result.report
    scored = [p for p in r["candidates"] if "cost" in p]
    assert len(scored) == 8 and r["candidates"][0]["candidate"] == "full model"
    fits = [p for p in scored if p["cost"] <= 0.8]
    best = min(fits, key=lambda p: (p["kl_mean"], p["cost"]))
    assert r["chosen"] == best["candidate"] and r["active_params"][1] <= 0.8 * r["active_params"][0]
    front = [p for p in scored if p["candidate"] in r["pareto_front"]]
    for p in scored:  # nothing on the front is beaten in both cost and quality
        assert not any(q["cost"] < p["cost"] and q["kl_mean"] < p["kl_mean"] for q in scored) or p not in front
    assert r["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["summary"].startswith(f"chose {best['candidate']}")
    verify(result.graph)
    with pytest.raises(MocompileError, match="no candidate fits budget 0.1"):
        Elastic(budget=0.1, skip=(0,), experts=(1.0,), k=(4,), neurons=(0.0,)).run(deepseek.clone(),
                                                                                  PassContext(calibration=calib))


def test_a_declared_variant_built_by_elastic_is_the_specs_variant() -> None:
    from conftest import EXAMPLES
    from mocompile.frontend import lower_source, source_for
    from mocompile.passes.elastic import _Stats, build, spec_variants

    weights = EXAMPLES / "weights" / "unified_tiny.safetensors"
    full = lower_source(source_for(EXAMPLES / "unified_tiny.moe", None, weights, 0))
    half = lower_source(source_for(EXAMPLES / "unified_tiny.moe", "half", weights, 0))
    (candidate,) = [c for c in spec_variants(full) if c.variant == "half"]
    rng = np.random.default_rng(0)
    sample = {"text": rng.integers(0, 512, (1, 5)), "image": rng.standard_normal((1, 3, 48)).astype(np.float32),
              "audio": rng.standard_normal((1, 2, 32)).astype(np.float32)}
    built = build(full, candidate, _Stats(full, [sample]), "elastic")
    np.testing.assert_allclose(interpret(built, sample)["logits"], interpret(half, sample)["logits"], rtol=1e-5,
                               atol=1e-5)
    assert len(blocks(built)) == 2 and built.params["layers.1.ffn.experts.up"].type.shape[0] == 6
