"""Streamed compile of a checkpoint (`compile(..., stream=True)`, `mocompile compile --stream`):
the weights stay in the safetensors shards, the artifact is the one the normal compile makes,
it is verified layer by layer, a wrong layer is named, and memory follows the artifact and one
layer, not the float32 model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mocompile
from mocompile import memory
from mocompile.backends.tvm_common import lower as tvm_lower
from mocompile.dsl.hf_synthetic import write_olmoe_checkpoint
from mocompile.errors import MocompileError, VerificationError
from mocompile.ir.ops.widen import from_bits, to_bits
from mocompile.runtime import load
from mocompile.signature import random_inputs

from conftest import EXAMPLES

SMALL = dict(hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             num_experts=8, num_experts_per_tok=2, vocab_size=256, max_position_embeddings=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("olmoe") / "ckpt"
    write_olmoe_checkpoint(path, seed=3, shard_bytes=40_000, **SMALL)  # several shards, an index
    return path


def _outputs(art, seed: int = 5) -> np.ndarray:
    return art.run(random_inputs(art.signature, 2, 6, seed))["logits"]


@pytest.mark.parametrize("passes", [pytest.param("", marks=pytest.mark.slow), "quantize(w=int4,group=32,calib=1)"])
def test_streamed_compile_gives_the_normal_compiles_artifact(checkpoint, tmp_path, passes):
    """Same outputs as the compile that builds the whole torch model; verified layer by layer,
    with each layer's drift from the float model reported where the passes change numerics."""
    normal = mocompile.compile(checkpoint, passes=passes, out_dir=tmp_path / "normal", batch=2, seq=4)
    streamed = mocompile.compile(checkpoint, passes=passes, out_dir=tmp_path / "streamed", batch=2, seq=4, stream=True)
    np.testing.assert_allclose(_outputs(streamed), _outputs(normal), rtol=0, atol=2e-5)
    m = streamed.manifest
    assert m["model"]["streamed"] is True and m["verification"]["status"] == "verified"
    layers = m["layer_verification"]
    assert [r["layer"] for r in layers["layers"]] == ["layers.0", "layers.1", "layers.2"]
    assert layers["max_rel_error"] < 1e-4
    # the bf16 checkpoint keeps bf16 weights (with quantize: those it leaves float), so without
    # passes no drift from its float model beyond float32 summation order
    assert m["weight_dtype"] == ("bfloat16" if not passes else "bfloat16+int4") and "drift_from_fp32" in layers
    if passes:
        assert all(0 < d["rel_error"] < 0.5 for d in layers["drift_from_fp32"])
    else:
        assert all(d["rel_error"] < 1e-5 for d in layers["drift_from_fp32"])
    # the per-layer states are a function of the artifact, loadable on their own
    states = load(streamed.path).run_layers(random_inputs(streamed.signature, 1, 4, 0))
    assert list(states) == m["program"]["layers"]["outputs"] and all(s.shape == (1, 4, 64) for s in states.values())


def test_a_corrupted_layer_is_caught_and_named(checkpoint, tmp_path, monkeypatch):
    """The weights of layer 1's attention output projection are packed 3% off: the compile fails
    in one line naming layers.1, and leaves no artifact. (The checkpoint is bf16, so its weights
    are packed as bf16 bit patterns.)"""
    make_layout = tvm_lower.make_layout

    def off(a: np.ndarray) -> np.ndarray:
        if a.dtype == np.uint16:
            return to_bits(from_bits(a, "bfloat16") * np.float32(1.03), "bfloat16")
        return a * np.float32(1.03)

    def corrupted(name, kind, sources, panel, store=""):
        if name.startswith("layers.1.attn.o_proj"):
            sources = [(n, off(a)) for n, a in sources]
        return make_layout(name, kind, sources, panel, store)

    monkeypatch.setattr(tvm_lower, "make_layout", corrupted)
    with pytest.raises(VerificationError, match=r"^layer-by-layer verification: layers\.1 of the artifact disagrees"):
        mocompile.compile(checkpoint, out_dir=tmp_path / "out", batch=1, seq=4, stream=True)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".mocompile-scratch") for p in tmp_path.iterdir())


def test_a_streamed_compile_is_refused_on_its_artifacts_size(checkpoint, tmp_path, monkeypatch):
    """Refused with the figures where the artifact would not fit; the figure follows the
    pipeline (the bf16 checkpoint's default keeps 2 bytes per parameter, int4 a fraction)."""
    monkeypatch.setattr(memory, "available_memory", lambda: 10_000)
    with pytest.raises(MocompileError, match=r"ckpt: ckpt has [\d,]+ parameters, and compiling it streamed \(an "
                                             r"artifact of about 2 bytes per parameter\) needs about .* of memory, but "
                                             r"only 9.8 KiB"):
        mocompile.compile(checkpoint, out_dir=tmp_path / "a", stream=True)
    with pytest.raises(MocompileError, match=r"artifact of about 0.53125 bytes per parameter"):
        mocompile.compile(checkpoint, passes="quantize(w=int4,group=64)", out_dir=tmp_path / "b", stream=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_only_checkpoints_stream(tmp_path):
    with pytest.raises(MocompileError, match="only a Hugging Face checkpoint directory can be streamed"):
        mocompile.compile(EXAMPLES / "mixtral_tiny.moe", out_dir=tmp_path / "out", stream=True)


@pytest.mark.parametrize("hidden, refusal", [
    (131072, "'hidden' = 131072 is more than the 65536 this compiler accepts"),  # past the language's limit
    (65536, "mixtral_tiny has 26,"),  # within it, but ~500 GiB to build: refused on the memory figures
])
def test_a_typo_sized_spec_is_refused_in_one_line(tmp_path, hidden, refusal):
    """`hidden = 131072` or `65536` (for 128) in an example: one line saying why, with the
    figures where it is memory, not an allocator error from inside torch."""
    text = (EXAMPLES / "mixtral_tiny.moe").read_text().replace("hidden   = 128", f"hidden   = {hidden}", 1)
    assert str(hidden) in text
    spec = tmp_path / "typo.moe"
    spec.write_text(text)
    run = subprocess.run([sys.executable, "-m", "mocompile.cli", "compile", str(spec), "-o", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith(f"mocompile: error: {spec}") and refusal in line, line
    if hidden == 65536:
        assert "bytes) of memory, but only" in line and "is available on this machine" in line, line
    assert not (tmp_path / "out").exists()


PEAK = textwrap.dedent("""
    import json, resource, sys
    import mocompile
    art = mocompile.compile(sys.argv[1], passes="quantize(w=int4,calib=1)", out_dir=sys.argv[2], batch=1, seq=4,
                            stream=sys.argv[3] == "stream")
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")


def _peak(ckpt, out, mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", PEAK, str(ckpt), str(out), mode], capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])["peak"]


@pytest.mark.slow
def test_streamed_peak_memory_follows_the_artifact_and_one_layer(tmp_path):
    """A 0.2B-parameter checkpoint (0.8 GB in float32) compiled to int4 in a subprocess: the
    streamed compile's peak resident memory (ru_maxrss) exceeds that of a tiny checkpoint's
    streamed compile (the same imports, the same kernels) by less than a few times one layer's
    float32 weights plus the artifact, while the compile that builds the torch model peaks
    above it by more than the float32 model."""
    shape = dict(hidden_size=512, intermediate_size=512, num_attention_heads=8, num_key_value_heads=8,
                 num_experts=32, num_experts_per_tok=4, vocab_size=4096, max_position_embeddings=64)
    big, tiny = tmp_path / "big", tmp_path / "tiny"
    data = write_olmoe_checkpoint(big, num_hidden_layers=8, **shape)
    write_olmoe_checkpoint(tiny, num_hidden_layers=1, **{**shape, "num_experts": 4})
    float_model = data * 2  # bf16 on disk
    layer = 4 * (3 * 32 * 512 * 512 + 4 * 512 * 512)
    base = _peak(tiny, tmp_path / "tiny_out", "stream")
    streamed = _peak(big, tmp_path / "big_out", "stream")
    artifact = (tmp_path / "big_out" / "weights.safetensors").stat().st_size
    normal = _peak(big, tmp_path / "normal_out", "normal")
    assert streamed - base < 3 * (layer + artifact), (streamed, base, layer, artifact)
    assert normal - base > float_model, (normal, base, float_model)
