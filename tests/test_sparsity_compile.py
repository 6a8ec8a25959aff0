"""The sparsity passes through the whole compile: the TVM CPU artifact of a pruned, re-routed
and shortened model has the smaller shapes and fewer layers, matches the interpreter of the
modified graph (forward and KV-cached decoding), keeps the isolation verdict, and `mocompile
compile` prints each pass's one-line summary."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import EXAMPLES
from mocompile import cli, runtime
from mocompile.dsl import load_spec
from mocompile.ir.interpreter import run as interpret
from mocompile.isolation import analyze
from mocompile.pass_manager import PassContext, PassManager
from mocompile.calibration import load_token_file
from mocompile.signature import signature_of
from sparsity_models import trainer, trained

PIPELINE = "prune-experts(keep=12),prune-neurons(ratio=0.25),top-k(k=3),skip-layers(speedup=1.5)"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    ids = trainer().calibration_tokens(load_spec(EXAMPLES / "deepseek_tiny.moe"), 8, 16)
    np.save(root / "calib.npy", ids)
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(["compile", str(EXAMPLES / "deepseek_tiny.moe"), "-o", str(root / "art"), "--weights",
                         str(EXAMPLES / "weights" / "deepseek_tiny.safetensors"), "--passes", PIPELINE,
                         "--calib", str(root / "calib.npy"), "--seq", "6"])
    assert code == 0
    return root, out.getvalue()


def test_the_artifact_has_the_smaller_model(compiled) -> None:
    root, printed = compiled
    art = runtime.load(root / "art")
    reports = art.manifest["passes"]
    assert [r["pass"] for r in reports] == ["prune-experts(keep=12)", "prune-neurons(ratio=0.25)", "top-k(k=3)",
                                            "skip-layers(speedup=1.5)"]
    for r in reports:  # compile prints every pass's summary line
        assert f"{r['pass']}: {r['summary']}" in printed
    ir = (root / "art" / "ir.txt").read_text()
    assert "layers.1." not in ir and "@layers.2.ffn.experts.gate : float32[12, 48, 128]" in ir
    assert "int32[batch, seq, 3]" in ir and "@layers.0.ffn.gate_proj.weight : float32[288, 128]" in ir
    weights = load_file(str(root / "art" / "weights.safetensors"))
    assert not any(name.startswith("layers.1.") for name in weights)
    dense = trained("deepseek_tiny")
    assert sum(w.size for w in weights.values()) < 0.75 * sum(w.size for w in dense.weights.values())


def test_the_artifact_computes_the_modified_graph(compiled) -> None:
    root, _ = compiled
    art = runtime.load(root / "art")
    v = art.manifest["verification"]
    assert v["status"] == "verified" and v["reference"] == "IR interpreter" and v["max_rel_error"] < 1e-4
    dec = art.manifest["decode_verification"]
    assert dec["max_rel_error"] < 1e-4 and dec["isolation"] == "isolated"
    dense = trained("deepseek_tiny")
    calib = load_token_file(root / "calib.npy", signature_of(dense, {"text": 512}))
    graph, _ = PassManager(PIPELINE).run(dense, PassContext(calibration=calib, input_ranges={"text": 512}))
    ids = np.random.default_rng(3).integers(0, 512, (2, 7))
    got = art.run({"text": ids})["logits"]
    np.testing.assert_allclose(got, interpret(graph, {"text": ids})["logits"], rtol=1e-4, atol=1e-4)
    assert np.abs(got - interpret(dense, {"text": ids})["logits"]).max() > 1e-2  # not the dense model
    cache = art.new_cache(batch=2, capacity=16)
    steps = [art.step({"text": ids[:, :5]}, cache)["logits"]] + [art.step({"text": ids[:, t:t + 1]}, cache)["logits"]
                                                                 for t in (5, 6)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), got, rtol=1e-4, atol=1e-4)


def test_the_isolation_verdict_is_unchanged(compiled) -> None:
    root, _ = compiled
    art = runtime.load(root / "art")
    assert art.manifest["isolation"]["verdict"] == analyze(trained("deepseek_tiny")).verdict == "isolated"


@pytest.mark.slow  # five compiles, 30-50 s on two shared cores
def test_elastic_latency_is_measured_on_this_machine() -> None:
    from mocompile.backends.base import get_backend
    from mocompile.latency import PROBE, latency_probe
    from mocompile.ir.active_params import active_params
    from mocompile.passes.elastic import Elastic
    from sparsity_models import toy_inputs, toy_moe

    g = toy_moe(experts=8, top_k=4, hidden=64, ffn=256, vocab=64)
    full = active_params(g)
    ctx = PassContext(calibration=toy_inputs(4, vocab=64), options={PROBE: latency_probe(get_backend("cpu"), {"text": 64})})
    result = Elastic(budget=0.95, metric="latency", skip=(0,), experts=(1.0,), k=(4, 1), neurons=(0.0, 0.5)).run(g, ctx)
    r = result.report
    assert r["cost"] == "single-token decode step time, measured on this machine"
    costs = {p["candidate"]: p["cost"] for p in r["candidates"]}
    assert set(costs) == {"full model", "k=1", "neurons-0.5", "neurons-0.5, k=1"}
    assert costs["neurons-0.5, k=1"] < 0.95  # an eighth of the expert work, measured
    assert r["chosen"] != "full model" and costs[r["chosen"]] <= 0.95
    assert active_params(result.graph) < full
