"""README command-line features end to end through the `mocompile` command: `compile` with
`--plugin` (examples/custom_pass.py, also run from Python), `--tune N`, `--seed` and
`--require-isolation`; `passes --plugin`; `inspect --variant`; `check-isolation` with
`--variant` and with `--passes`. (On a checkpoint: test_hf_options.py; what
`--require-isolation` refuses: test_isolation.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np
import pytest
import torch

from conftest import EXAMPLES
from mocompile.cli import EXIT_NOT_ISOLATED, main
from mocompile.dsl import build_model, load_spec
from mocompile.frontend import lower_source, source_for
from mocompile.runtime import load, random_inputs

SPEC = """
model small {
    hidden = 64  heads = 4  kv_heads = 2  max_seq = 64
    modality text { vocab = 96 }
    moe sparse { experts = 4  top_k = 2  expert_hidden = 64 }
    layers = [sparse]
}
"""
PLUGIN = EXAMPLES / "custom_pass.py"


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mocompile.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One compile through the CLI, in a fresh process, with all of these options at once (a
    compile is the slow part): the example plugin's pass in the pipeline, weights from seed 3,
    batch isolation required."""
    root = tmp_path_factory.mktemp("cli")
    spec, out = root / "small.moe", root / "art"
    spec.write_text(SPEC)
    proc = _cli("compile", str(spec), "-o", str(out), "--plugin", str(PLUGIN), "--passes", "dce,flops-report(seq=4)",
                "--seed", "3", "--require-isolation", "--batch", "1", "--seq", "2")
    assert proc.returncode == 0, proc.stderr
    return spec, out, proc, json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A compile through the CLI with 2 tuning trials (MetaSchedule's search makes it the
    slowest compile here; tests/test_tuning.py covers tuning through the API by default)."""
    root = tmp_path_factory.mktemp("cli_tune")
    spec, out = root / "small.moe", root / "art"
    spec.write_text(SPEC)
    proc = _cli("compile", str(spec), "-o", str(out), "--tune", "2", "--batch", "1", "--seq", "2")
    assert proc.returncode == 0, proc.stderr
    return spec, out, proc, json.loads((out / "manifest.json").read_text())


def _total(inspect_output: str) -> int:
    return next(int(line.split()[-1].replace(",", "")) for line in inspect_output.splitlines()
                if line.split() and line.split()[0] == "total")


# ---- compile --plugin -------------------------------------------------------------------------
def test_plugin_pass_runs_in_the_compile_with_its_options(compiled) -> None:
    spec, _, proc, manifest = compiled
    assert "running passes: dce,flops-report(seq=4)" in proc.stderr
    (report,) = [r for r in manifest["passes"] if r["pass"].startswith("flops-report")]
    assert report["pass"] == "flops-report(batch=1,seq=4)"
    graph = lower_source(source_for(spec, None, None, 3))
    weights = sum(graph.weights[n.inputs[1].name].size for n in graph.nodes_of("linear"))
    assert report["flops"]["linear"] == 2 * 4 * weights  # 4 tokens (seq=4 was read), 2 flops per weight
    assert report["total_flops"] == sum(report["flops"].values()) and report["flops"]["experts"] > 0


def test_passes_lists_the_plugin_pass() -> None:
    proc = _cli("passes", "--plugin", str(PLUGIN), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:1] == ["flops-report"])
    assert [line.strip() for line in lines[at + 1:at + 3]] == ["batch: int = 1", "seq: int = 1"]
    assert "flops-report" not in _cli("passes", timeout=120).stdout  # only with the plugin


def test_custom_pass_example_runs_from_python(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(PLUGIN)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("flops-report(batch=1,seq=128)")]
    assert "'total_flops':" in line and "'experts':" in line


# ---- compile --tune ---------------------------------------------------------------------------
@pytest.mark.slow
def test_tune_spends_its_trials_and_saves_the_database(tuned) -> None:
    _, out, proc, manifest = tuned
    assert "tuning matmul kernels (2 trials)" in proc.stderr
    tuning = manifest["tuning"]
    assert 1 <= tuning["trials"] <= 2 and tuning["kernels"] > 0 and tuning["tuned"]
    db = json.loads((out / "tuning.json").read_text())
    assert "tuning.json" in manifest["files"]
    assert set(tuning["tuned"]) <= set(db["records"])
    for key in tuning["tuned"]:
        record = db["records"][key]
        assert len(record["us"]) == len(record["default_us"]) == 2 and record["trials"] >= 1
    assert manifest["verification"]["max_rel_error"] <= 1e-4


# ---- compile --seed ---------------------------------------------------------------------------
def _eager(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()


def test_seed_chooses_the_weights(compiled) -> None:
    """--seed 3 in the compile's process gives the weights seed 3 gives here (the same seed,
    the same weights), not those of the default seed 0 (another seed, other weights)."""
    spec, out, _, manifest = compiled
    assert manifest["model"]["weights"] == "seed 3"
    art = load(out)
    inputs = random_inputs(art.signature, 2, 5, seed=1)
    got = art.run(inputs)["logits"]
    same, other = (_eager(build_model(load_spec(spec), seed=s), inputs) for s in (3, 0))
    assert np.abs(got - same).max() <= 1e-4 * np.abs(same).max()
    assert np.abs(got - other).max() > 0.1 * np.abs(same).max()
    a, b, c = (dict(build_model(load_spec(spec), seed=s).named_parameters()) for s in (3, 3, 4))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(not torch.equal(a[n], c[n]) for n in a if a[n].numel() > 1 and "norm" not in n)  # norms start at 1


# ---- compile --require-isolation (the model is isolated: it compiles) --------------------------
def test_require_isolation_compiles_an_isolated_model(compiled) -> None:
    _, _, proc, manifest = compiled
    assert manifest["isolation"]["verdict"] == "isolated"
    assert "batch isolation: isolated" in proc.stdout


# ---- inspect --variant ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [None, "half", "shallow"])
def test_inspect_counts_the_parameters_of_a_variant(variant, capsys) -> None:
    spec = EXAMPLES / "unified_tiny.moe"
    assert main(["inspect", str(spec), *(["--variant", variant] if variant else [])]) == 0
    out = capsys.readouterr().out
    model = build_model(load_spec(spec), seed=0, variant=variant)
    assert _total(out) == sum(p.numel() for p in model.parameters())
    if variant == "half":  # layers [0, 1], 6 experts, top-1
        assert "model unified_tiny.half" in out and "2 layers: dense mm" in out and "moe mm: 6 experts, top-1" in out


def test_inspect_ir_of_a_variant(capsys) -> None:
    assert main(["inspect", str(EXAMPLES / "unified_tiny.moe"), "--variant", "shallow", "--ir"]) == 0
    ir = capsys.readouterr().out
    assert "# layers.1." in ir and "layers.2." not in ir  # 2 of the 4 layers
    assert main(["inspect", str(EXAMPLES / "unified_tiny.moe"), "--variant", "nope"]) == 1
    assert "no variant 'nope'" in capsys.readouterr().err


# ---- check-isolation --variant / --passes ---------------------------------------------------------
VARIANT_SPEC = """
model two_routers {
    hidden = 32  heads = 2  kv_heads = 2  max_seq = 64
    modality text { vocab = 64 }
    moe plain  { experts = 4  top_k = 2  expert_hidden = 32 }
    moe capped { experts = 4  top_k = 2  expert_hidden = 32  capacity_factor = 1.0 }
    layers = [plain, capped]
    variant first { layers = 1 }
}
"""


def test_check_isolation_of_a_variant(tmp_path, capsys) -> None:
    """The full model leaks at its capacity-limited second layer; the variant keeping only the
    first layer is isolated."""
    spec = tmp_path / "two.moe"
    spec.write_text(VARIANT_SPEC)
    assert main(["check-isolation", str(spec)]) == EXIT_NOT_ISOLATED
    out = capsys.readouterr().out
    assert "LEAKS" in out and "router.topk at layers.1.ffn.router" in out
    assert main(["check-isolation", str(spec), "--variant", "first", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "isolated" and report["findings"] == []


@pytest.mark.parametrize("passes,code", [("quantize(w=int8,a=int8,dynamic=token)", 0),
                                         ("quantize(w=int8,a=int8,dynamic=tensor,allow_batch_leak=true)",
                                          EXIT_NOT_ISOLATED)])
def test_check_isolation_after_a_pass_pipeline(passes, code, tmp_path, capsys) -> None:
    """The verdict is of the graph after the pipeline: per-token activation scales keep the
    samples apart, one scale over the whole batch does not."""
    spec = tmp_path / "small.moe"
    spec.write_text(SPEC)
    assert main(["check-isolation", str(spec), "--passes", passes, "--json"]) == code
    report = json.loads(capsys.readouterr().out)
    if code:
        assert report["verdict"] == "leaks" and {f["op"] for f in report["findings"]} == {"quantize_act"}
        assert report["witness"]["changed"]
    else:
        assert report["verdict"] == "isolated"
