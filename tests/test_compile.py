"""End to end: every example (and elastic variant) compiles for the CPU, the artifact agrees with
the eager model, and the artifact is self-contained, checksummed and written atomically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mocompile
from conftest import EXAMPLE_SHAPE, EXAMPLES, cli_main as _main, example_variants
from mocompile.errors import ArtifactError, VerificationError
from mocompile.runtime import load, random_inputs

@pytest.fixture(scope="module")
def artifacts(artifact_cache) -> dict[tuple[str, str | None], Path]:
    """Every example and variant, compiled once for the session (test_decode.py reads one too)."""
    return {(spec_name, variant): artifact_cache.path(EXAMPLES / spec_name, target="cpu", variant=variant,
                                                      **EXAMPLE_SHAPE)
            for spec_name, variant in example_variants()}


@pytest.mark.parametrize("spec_name,variant", example_variants())
def test_artifact_matches_eager_model(artifacts, spec_name: str, variant: str | None) -> None:
    from mocompile.dsl import build_model, load_spec

    path = artifacts[(spec_name, variant)]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["verification"]["max_rel_error"] <= 1e-4
    assert {c["batch"] for c in manifest["verification"]["checks"]} == {1, 3}
    # and independently of the compiler's own check, on fresh inputs of other sizes
    model = build_model(load_spec(EXAMPLES / spec_name), seed=0, variant=variant)
    art = load(path)
    for batch, seq in ((1, 3), (4, 6)):
        inputs = random_inputs(art.signature, batch, seq, seed=11)
        got = art.run(inputs)["logits"]
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_manifest_records_what_a_deployment_needs(artifacts) -> None:
    path = artifacts[("mixtral_tiny.moe", None)]
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "mocompile-artifact" and m["format_version"] == 1
    assert len(m["model"]["spec_hash"]) == 64
    assert m["target"]["name"] == "cpu"
    assert m["signature"]["inputs"] == [{"name": "text", "dtype": "int64", "shape": ["batch", "seq"], "high": 512}]
    assert m["signature"]["outputs"][0]["shape"] == ["batch", "seq", 512]
    listed = set(m["files"])
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert listed == on_disk and all(len(h) == 64 for h in m["files"].values())


def test_runtime_runs_in_a_fresh_process_without_torch(artifacts) -> None:
    path = artifacts[("deepseek_tiny.moe", None)]
    code = (
        "import sys, numpy as np\n"
        "from mocompile.runtime import load, random_inputs\n"
        f"art = load({str(path)!r})\n"
        "out = art.run(random_inputs(art.signature, 2, 4))['logits']\n"
        "assert out.shape == (2, 4, 512) and np.isfinite(out).all()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_tampered_weights_are_refused(artifact_cache, tmp_path, capsys) -> None:
    copy = artifact_cache.copy(tmp_path / "tampered", EXAMPLES / "mixtral_tiny.moe", **EXAMPLE_SHAPE)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load(copy)
    code, _, err = _main(capsys, "run", str(copy))
    assert code == 1 and err.count("\n") == 1 and "checksum mismatch" in err


def test_failed_verification_leaves_no_artifact(tmp_path, monkeypatch) -> None:
    import mocompile.verification as verification

    out = tmp_path / "never"
    monkeypatch.setattr(verification, "TOLERANCE", -1.0)  # nothing can pass
    with pytest.raises(VerificationError, match="disagrees with the eager torch model"):
        mocompile.compile(EXAMPLES / "mixtral_tiny.moe", out_dir=out, batch=1, seq=2)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory left behind either


def test_recompiling_over_an_artifact_replaces_it_whole(artifact_cache, tmp_path) -> None:
    out = artifact_cache.copy(tmp_path / "art", EXAMPLES / "mixtral_tiny.moe", batch=1, seq=2)  # seed 0
    first = json.loads((out / "manifest.json").read_text())
    mocompile.compile(EXAMPLES / "mixtral_tiny.moe", out_dir=out, batch=1, seq=2, seed=2)
    second = json.loads((out / "manifest.json").read_text())
    assert first["files"] != second["files"]  # different weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    load(out)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TVM_THREAD_POOL_SPIN_COUNT="0")
    return subprocess.run([sys.executable, "-m", "mocompile.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_compile_run_inspect(tmp_path, capsys) -> None:
    """A compile through the `mocompile` command in its own process; the artifact it wrote run
    and inspected through the command line's entry point."""
    out = tmp_path / "unified_half"
    r = _cli("compile", str(EXAMPLES / "unified_tiny.moe"), "-o", str(out), "--variant", "half",
             "--passes", "dce,fold-constants", "--batch", "2", "--seq", "4")
    assert r.returncode == 0, r.stderr
    assert "max relative error" in r.stdout and "[6/6]" in r.stderr
    code, stdout, err = _main(capsys, "run", str(out), "--batch", "2", "--seq", "3", "--repeat", "2")
    assert code == 0, err
    assert "output logits: float32[2, 9, 512]" in stdout and "time per call" in stdout
    code, stdout, _ = _main(capsys, "inspect", str(out))
    assert code == 0 and json.loads(stdout)["passes"][0]["pass"] == "dce"
    code, stdout, _ = _main(capsys, "inspect", str(out), "--ir")
    assert code == 0 and "router.topk" in stdout
    code, stdout, _ = _main(capsys, "inspect", str(EXAMPLES / "unified_tiny.moe"))
    assert code == 0 and "active per token" in stdout


@pytest.mark.parametrize("args,message", [
    (("compile", "no/such.moe", "-o", "x"), "no/such.moe"),
    (("compile", "{spec}", "-o", "{out}", "--variant", "nope"), "no variant 'nope'"),
    (("compile", "{spec}", "-o", "{out}", "--passes", "dce,bogus"), "unknown pass 'bogus'"),
    (("compile", "{spec}", "-o", "{out}", "--target", "tpu"), "unknown target 'tpu'"),
    (("compile", "{spec}", "-o", "{out}", "--weights", "{missing}"), "weights file not found"),
    (("run", "{out}"), "not an artifact directory"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args: tuple[str, ...], message: str) -> None:
    fill = {"spec": str(EXAMPLES / "mixtral_tiny.moe"), "out": str(tmp_path / "o"), "missing": str(tmp_path / "w.st")}
    code, _, err = _main(capsys, *(a.format(**fill) for a in args))
    assert code == 1
    errors = [line for line in err.splitlines() if not line.startswith("[")]  # "[n/6] ..." is progress
    assert len(errors) == 1 and errors[0].startswith("mocompile: error: ") and message in errors[0]
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_wrong_checkpoint_is_a_clear_error(tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    from mocompile.dsl import build_model, load_spec

    state = {k: v.contiguous() for k, v in build_model(load_spec(EXAMPLES / "mixtral_tiny.moe")).state_dict().items()}
    state["layers.0.ffn.experts.up"] = state["layers.0.ffn.experts.up"][:, :-1].contiguous()
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    code, _, err = _main(capsys, "compile", str(EXAMPLES / "mixtral_tiny.moe"), "-o", str(tmp_path / "o"), "--weights",
                         str(bad))
    assert code == 1 and "layers.0.ffn.experts.up" in err and "shape" in err
    good = tmp_path / "good.safetensors"
    state["layers.0.ffn.experts.up"] = torch.zeros(8, 256, 128)
    save_file(state, str(good))
    art = mocompile.compile(EXAMPLES / "mixtral_tiny.moe", out_dir=tmp_path / "g", weights=good, batch=1, seq=3)
    assert art.manifest["model"]["weights"] == str(good)


@pytest.mark.parametrize("spec_name", ["mixtral_tiny.moe", "deepseek_tiny.moe", "unified_tiny.moe"])
def test_compiled_examples_are_batch_invariant_bit_for_bit(artifacts, spec_name: str) -> None:
    """Replacing one sample leaves every other sample's logits bit for bit unchanged, even
    though it changes how many rows each expert's grouped GEMM gets (kernels must sum in an
    order that does not depend on the rest of the batch)."""
    from mocompile.witness import differential_check

    art = load(artifacts[(spec_name, None)])
    axes = {t.name: 0 for t in art.signature.inputs}
    high = {t.name: t.high for t in art.signature.inputs if t.high}
    for seed in range(3):
        inputs = random_inputs(art.signature, 4, 6, seed=seed)
        result = differential_check(art.run, inputs, axes, {"logits": 0}, perturbed=seed % 4, seed=seed, int_high=high)
        assert result["bitwise_identical"], result


GOLDEN_DIR = Path(__file__).parent / "data" / "golden"
GOLDEN = json.loads((GOLDEN_DIR / "fp32_examples.json").read_text())
QUANTIZED_GOLDEN = json.loads((GOLDEN_DIR / "quantized_examples.json").read_text())


def _output_digests(path: Path) -> dict[str, str]:
    """sha256 of an artifact's outputs on the recorded inputs: forward, and cached decoding."""
    import hashlib

    art = load(path)
    x = random_inputs(art.signature, 3, 9, seed=11)
    got = {f"main.{k}": v for k, v in art.run(x).items()}
    if art.can_decode:
        got.update({f"cached.{k}": v for k, v in art.run_cached(x, 5).items()})
    return {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in got.items()}


def _skip_unless_recorded_cpu(golden: dict) -> None:
    from mocompile.backends.tvm_cpu.target import host_cpu

    if host_cpu() not in golden["llvm_cpus"]:
        pytest.skip(f"digests recorded on {', '.join(golden['llvm_cpus'])}, this host is {host_cpu()}")


@pytest.mark.parametrize("name", sorted(GOLDEN["outputs"]))
def test_generated_code_computes_the_recorded_bits(artifacts, name: str) -> None:
    """The fp32 example artifacts' outputs (forward and cached decode), bit for bit, against
    sha256 digests recorded on hosts of the listed LLVM CPUs: a refactor of the compiler that
    changes any kernel's arithmetic fails here (elsewhere the eager comparisons above hold)."""
    _skip_unless_recorded_cpu(GOLDEN)
    assert _output_digests(artifacts[(f"{name}.moe", None)]) == GOLDEN["outputs"][name]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(QUANTIZED_GOLDEN["outputs"]))
def test_quantized_code_computes_the_recorded_bits(tmp_path, case: str) -> None:
    """As above for quantized examples (int8, int4 with groups, W8A8 per token), whose kernels
    follow the target's low-bit path (VNNI integers on the recorded znver4)."""
    _skip_unless_recorded_cpu(QUANTIZED_GOLDEN)
    spec, passes = case.split("|")
    mocompile.compile(EXAMPLES / f"{spec}.moe", passes=passes, out_dir=tmp_path / "art", batch=3, seq=5)
    assert _output_digests(tmp_path / "art") == QUANTIZED_GOLDEN["outputs"][case]
