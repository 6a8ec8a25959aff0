"""Expert-parallel execution (`compile --ep`, `mocompile run-ep`): real rank processes over
torch.distributed (gloo), compared with the single-process artifact at prefill and for cached
decode steps; a rank that dies or hangs ends the run with one error line within the timeout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mocompile
from mocompile.artifact import read_manifest
from mocompile.cli import main
from mocompile.errors import MocompileError
from mocompile.ep_build import dense_graph, routed_experts
from mocompile.frontend import lower_source, source_for
from mocompile.ir.interpreter import run as interpret
from mocompile.ir.ops.moe_remote import expert_service
from mocompile.ir.registry import get_op
from mocompile.runtime import load
from mocompile.runtime_ep import LocalTransport, Placement, open_rank
from mocompile.signature import random_inputs, signature_of
from mocompile.verification import TOLERANCE, relative_error

ROOT = Path(__file__).resolve().parent.parent
MIXTRAL = ROOT / "examples" / "mixtral_tiny.moe"
DEEPSEEK = ROOT / "examples" / "deepseek_tiny.moe"
HANG_TIMEOUT_S = 3  # the ranks' exchange timeout in the hang test
TWO_GPUS = """
name = "2gpu"
[network]
intra_node = { gb_per_s = 450, latency_us = 2 }
inter_node = { gb_per_s = 50, latency_us = 5 }
[[device]]
name = "gpu"
count = 2
node = "node0"
kind = "gpu"
memory_gib = 80
memory_gb_per_s = 3350
tflops = { fp32 = 67 }
"""
STARTUP_S = 40  # generous: starting two ranks (torch, TVM, the programs) on a loaded 2-core machine


@pytest.fixture(scope="module")
def ep_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ep") / "mixtral"
    mocompile.compile(MIXTRAL, out_dir=out, ep=True)
    return out


def run_ep(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`mocompile run-ep` in its own process, as a user runs it (the launcher starts the ranks)."""
    return subprocess.run([sys.executable, "-m", "mocompile.cli", "run-ep", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


def compare_with_single_process(artifact: Path, out: Path) -> dict:
    run = np.load(out)
    single = load(artifact)
    ids, prompt = run["ids"], int(run["prompt"])
    name = single.token_input.name
    prefill = relative_error(run["prefill"], single.run({name: ids})["logits"])[1]
    decode = relative_error(run["decode"], single.run_cached({name: ids}, prompt)["logits"])[1]
    assert prefill <= TOLERANCE and decode <= TOLERANCE, (prefill, decode)
    assert prompt < ids.shape[1], "the run must include cached decode steps"
    return json.loads(str(run["ranks"]))


def test_the_cut_graph_with_its_experts_served_is_the_model() -> None:
    """The dense graph calls out at every MoE layer; serving those calls with the original
    experts gives the original model's outputs bit for bit."""
    graph = lower_source(source_for(DEEPSEEK, None, None, 0))
    experts = routed_experts(graph)
    dense = dense_graph(graph, experts)
    assert [n.op for n in dense.nodes].count("experts.remote") == len(experts) == 2
    assert not any(n.inputs[3].name in dense.params for _, n in experts), "routed expert weights left in the graph"
    by_layer = {layer: node for layer, node in experts}

    def serve(layer: int, x: np.ndarray, w: np.ndarray, idx: np.ndarray) -> np.ndarray:
        node = by_layer[layer]
        return get_op("experts").compute([x, w, idx, *[graph.weights[v.name] for v in node.inputs[3:]]], node.attrs)[0]

    inputs = random_inputs(signature_of(graph, {}), 2, 6, 0)
    with expert_service(serve):
        got = interpret(dense, inputs)
    want = interpret(graph, inputs)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(Exception, match="no expert service"):
        interpret(dense, inputs)


def test_replicas_share_an_experts_tokens_by_the_plan() -> None:
    plan = {"devices": [{"name": "a", "experts": [{"layer": 0, "expert": 0, "share": 0.75},
                                                  {"layer": 0, "expert": 1, "share": 1.0}]},
                        {"name": "b", "experts": [{"layer": 0, "expert": 0, "share": 0.25}]}]}
    placement = Placement.from_plan(plan, [{"layer": 0, "experts": 2}], 2)
    dest = placement.destinations(0, np.array([0] * 8 + [1] * 3))
    assert list(dest[:8]).count(0) == 6 and list(dest[:8]).count(1) == 2 and set(dest[8:]) == {0}
    assert placement.held(1) == [(0, 0)]
    with pytest.raises(MocompileError, match="2 devices .* but 3 ranks"):
        Placement.from_plan(plan, [{"layer": 0, "experts": 2}], 3)


def test_two_ranks_match_the_single_process_artifact(ep_artifact: Path, tmp_path: Path) -> None:
    """Prefill and cached decode steps over 2 gloo ranks, each reading only its experts' files."""
    manifest = read_manifest(ep_artifact)
    assert manifest["ep"]["verification"]["status"] == "verified"
    assert manifest["ep"]["verification"]["decode"]["new_tokens"] > 0
    out = tmp_path / "run.npz"
    done = run_ep(str(ep_artifact), "--nproc", "2", "--batch", "3", "--seq", "9", "--prompt", "5", "--out", str(out),
                  "--check")
    assert done.returncode == 0, done.stderr
    assert "matches the single-process artifact" in done.stdout
    ranks = compare_with_single_process(ep_artifact, out)
    files = [set(r["expert_files"]) for r in ranks]
    layers = [d["layer"] for d in manifest["ep"]["layers"]]
    assert files[0].isdisjoint(files[1])
    assert files[0] | files[1] == {f"ep/L{layer}/e{e}.safetensors" for layer in layers for e in range(8)}
    assert files[1] == {f"ep/L{layer}/e{e}.safetensors" for layer in layers for e in (1, 3, 5, 7)}  # round-robin


def test_a_rank_reads_and_checks_only_its_own_expert_files(ep_artifact: Path, tmp_path: Path) -> None:
    """Rank 0 of 2 (round-robin: the even experts) refuses a tampered even expert's file and
    never opens an odd one's."""

    class RankZeroOfTwo(LocalTransport):
        size = 2  # opening a rank exchanges nothing; only the placement reads the size

    copy = tmp_path / "art"
    shutil.copytree(ep_artifact, copy)
    manifest = read_manifest(copy)
    for e in (1, 2):
        (copy / f"ep/L0/e{e}.safetensors").write_bytes(b"not the weights")
    with pytest.raises(MocompileError, match="ep/L0/e2.safetensors: checksum mismatch"):
        open_rank(copy, manifest, RankZeroOfTwo(), "round-robin")
    shutil.copy(ep_artifact / "ep/L0/e2.safetensors", copy / "ep/L0/e2.safetensors")
    rank = open_rank(copy, manifest, RankZeroOfTwo(), "round-robin")  # e1 stays broken: rank 1's
    assert rank.experts.files == [f"ep/L{layer}/e{e}.safetensors" for layer in (0, 1) for e in (0, 2, 4, 6)]


def test_each_rank_in_a_process_serves_its_own_program(ep_artifact: Path) -> None:
    manifest = read_manifest(ep_artifact)
    first, second = (open_rank(ep_artifact, manifest, LocalTransport(), "round-robin") for _ in range(2))
    inputs = random_inputs(first.model.signature, 1, 4, 0)
    first.model.run(inputs)
    assert (first.calls, second.calls) == (2, 0)  # one call per MoE layer, to the rank whose program ran


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_rank_that_dies_or_hangs_stops_the_run_with_one_line(ep_artifact: Path, how: str) -> None:
    t0 = time.monotonic()
    done = run_ep(str(ep_artifact), "--nproc", "2", "--timeout", str(HANG_TIMEOUT_S),
                  env={"MOCOMPILE_EP_FAULT": f"1:2:{how}"}, timeout=STARTUP_S + 4 * HANG_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("mocompile: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert errors[0].startswith("mocompile: error: run-ep: rank ") and "stopped the other 1 rank(s)" in errors[0]
    if how == "exit":
        assert "rank 1 failed: exited with status 3 without an error message" in errors[0]
    else:
        assert f"rank 0 failed: an all-to-all failed: another rank exited or did not answer within " \
               f"{HANG_TIMEOUT_S} s" in errors[0]
    assert elapsed < STARTUP_S + 2 * HANG_TIMEOUT_S


def test_the_rank_with_the_error_is_named_not_the_one_left_waiting(ep_artifact: Path, tmp_path: Path) -> None:
    """Rank 1's sequence has a token past the vocabulary: rank 1 refuses it, rank 0's exchange
    then fails, and the run's one line is rank 1's own error."""
    ids = np.zeros((2, 6), np.int32)
    ids[1, 2] = 10_000
    np.save(tmp_path / "ids.npy", ids)
    done = run_ep(str(ep_artifact), "--nproc", "2", "--tokens", str(tmp_path / "ids.npy"), "--timeout", "30")
    errors = [line for line in done.stderr.splitlines() if line.startswith("mocompile: error:")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert errors[0].startswith("mocompile: error: run-ep: rank 1 failed: ") and "10000" in errors[0], errors[0]


def test_bad_runs_get_one_clear_line(ep_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run-ep", str(ep_artifact), "--nproc", "9"]) == 1
    assert "9 ranks: the artifact's MoE layers have 8 experts; start at most 8" in capsys.readouterr().err
    plain = tmp_path / "plain"
    shutil.copytree(ep_artifact, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    del manifest["ep"]
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("ep/")}
    shutil.rmtree(plain / "ep")
    (plain / "manifest.json").write_text(json.dumps(manifest))
    assert main(["run-ep", str(plain), "--nproc", "2"]) == 1
    assert f"{plain}: has no expert-parallel pieces (compile it with --ep)" in capsys.readouterr().err
    assert main(["run-ep", str(ep_artifact), "--placement", "plan"]) == 1
    assert "the artifact has no placement plan" in capsys.readouterr().err


def test_ep_needs_the_cpu_target(tmp_path: Path) -> None:
    with pytest.raises(MocompileError, match="--ep: expert-parallel pieces are built for the cpu target"):
        mocompile.compile(MIXTRAL, target="fpga", out_dir=tmp_path / "f", ep=True)


@pytest.mark.slow
def test_ep_refuses_quantized_experts_before_generating_code(tmp_path: Path) -> None:
    with pytest.raises(MocompileError, match="--ep: the experts at layers.0.ffn.experts read .*, not float32 weights"):
        mocompile.compile(MIXTRAL, passes="quantize(w=int8)", out_dir=tmp_path / "q", ep=True)
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_shared_experts_and_a_placement_plan_over_ranks(tmp_path: Path) -> None:
    """DeepSeek-style (shared experts, a dense first layer, group-limited routing), placed by
    the place pass on two GPUs with redundant experts: one rank per device of the plan, a
    replicated expert's tokens split over its holders by the plan's shares."""
    devices = tmp_path / "two.toml"
    devices.write_text(TWO_GPUS)
    art = tmp_path / "ds"
    mocompile.compile(DEEPSEEK, passes=f"place(devices={devices},replicas=2)", out_dir=art, ep=True)
    plan = next(r["plan"] for r in read_manifest(art)["passes"] if r.get("plan"))
    out = tmp_path / "run.npz"
    done = run_ep(str(art), "--batch", "3", "--seq", "8", "--out", str(out))  # --nproc: the plan's 2 devices
    assert done.returncode == 0, done.stderr
    assert "2 ranks (plan placement)" in done.stdout
    ranks = compare_with_single_process(art, out)
    held = [{f"ep/L{x['layer']}/e{x['expert']}.safetensors" for x in d["experts"]} for d in plan["devices"]]
    assert held == [set(r["expert_files"]) for r in ranks] and all(held)
    # The same artifact with a plan that replicates expert 0 of every layer on both devices
    # (the place pass chose no replica for this balanced random-weight load): its tokens split.
    replicated = tmp_path / "replicated"
    shutil.copytree(art, replicated)
    manifest = json.loads((replicated / "manifest.json").read_text())
    report = next(r for r in manifest["passes"] if r.get("plan"))
    for d in report["plan"]["devices"]:
        d["experts"] = [x for x in d["experts"] if x["expert"] != 0]
        d["experts"] += [{"layer": layer["layer"], "expert": 0, "share": 0.5} for layer in manifest["ep"]["layers"]]
    (replicated / "manifest.json").write_text(json.dumps(manifest))
    done = run_ep(str(replicated), "--batch", "3", "--seq", "8", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert all("ep/L1/e0.safetensors" in r["expert_files"] for r in compare_with_single_process(replicated, out))
    out3 = tmp_path / "run3.npz"  # 3 round-robin ranks, batch 2: one rank has no sequence and serves experts only
    done = run_ep(str(art), "--nproc", "3", "--placement", "round-robin", "--batch", "2", "--out", str(out3))
    assert done.returncode == 0, done.stderr
    compare_with_single_process(art, out3)
