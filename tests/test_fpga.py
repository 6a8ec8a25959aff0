"""The fpga target end to end on every example (reduced, tests/fpga_models.py): the compile
writes the HLS project, builds its C simulation with g++ and verifies it; here the loaded
artifact's C simulation must equal the fixed-point emulation of the same design bit for bit on
new inputs, and stay within FP32_TOLERANCE of the fp32 model; token-by-token decoding through
its KV caches must equal the full forward; `mocompile run` and `inspect` work on it. One
compile (one g++ build) per example per module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mocompile
from mocompile import cli, runtime
from mocompile.backends.base import get_backend
from mocompile.backends.fpga.precision import describe
from mocompile.frontend import lower_source, source_for
from mocompile.ir.interpreter import run as interpret
from fpga_models import REDUCTIONS, reduced_spec

FP32_TOLERANCE = 2e-2  # relative error (max abs error / max abs fp32 output) of the 16-bit design
EXAMPLES = sorted(REDUCTIONS)


@pytest.fixture(scope="module", params=EXAMPLES)
def built(request, tmp_path_factory):
    """(name, artifact dir, the fp32 graph, the backend holding the same design)."""
    folder = tmp_path_factory.mktemp(request.param)
    spec = reduced_spec(request.param, folder)
    mocompile.compile(spec, target="fpga -device=alveo-u280", out_dir=folder / "art", batch=2, seq=3)
    src = source_for(spec, None, None, 0)
    graph = lower_source(src)
    backend = get_backend("fpga -device=alveo-u280")
    backend.prepare(graph, None, src.int_high, 0)  # the compile's calibration: random, seed 0
    return request.param, folder / "art", graph, backend


def test_the_c_simulation_is_bit_exact_and_near_fp32(built) -> None:
    name, path, graph, backend = built
    art = runtime.load(path)
    assert type(art).__name__ == "HlsCsimArtifact"
    manifest = art.manifest
    assert manifest["verification"]["status"] == "verified" and manifest["verification"]["max_rel_error"] == 0.0
    assert json.loads((path / "precision.json").read_text()) == describe(backend.design(graph))  # the same design
    x = runtime.random_inputs(art.signature, 2, 5, seed=11)
    got = art.run(x)
    ref_name, emulation = backend.reference(graph)
    exact = emulation(x)
    fp32 = interpret(graph, x)
    assert list(got) == [t.name for t in art.signature.outputs] == list(fp32)
    for k in got:
        np.testing.assert_array_equal(got[k], exact[k], err_msg=f"{name}: C simulation vs {ref_name}")
        rel = float(np.abs(got[k] - fp32[k]).max() / np.abs(fp32[k]).max())
        print(f"{name}: {k} relative error against fp32 {rel:.2e} (tolerance {FP32_TOLERANCE})")
        assert 0 < rel < FP32_TOLERANCE
    assert manifest["drift_from_fp32"]["max_rel_error"] < FP32_TOLERANCE


def test_decoding_through_the_kv_caches_equals_the_full_forward(built) -> None:
    name, path, graph, _ = built
    art = runtime.load(path)
    x = runtime.random_inputs(art.signature, 2, 6, seed=4)
    whole = art.run(x)
    if not art.can_decode:  # multimodal: the prompt's segments through one cache, then text continues
        cache = art.new_cache(2)
        np.testing.assert_array_equal(art.step(x, cache)["logits"], whole["logits"])
        more = art.step({k: v[:, :1] if k == "text" else v[:, :0] for k, v in x.items()}, cache)
        assert cache.length == 19 and more["logits"].shape == (2, 1, 64)
        return
    cached = art.run_cached(x, 2)
    np.testing.assert_array_equal(cached["logits"], whole["logits"])
    assert manifest_decode(path)["max_rel_error"] == 0.0
    tokens = art.generate(x[art.token_input.name][:, :3], 2)
    assert tokens.shape == (2, 2)


def manifest_decode(path) -> dict:
    return json.loads((path / "manifest.json").read_text())["decode_verification"]


def test_run_and_inspect_from_the_command_line(built, capsys) -> None:
    name, path, _, _ = built
    if name != "mixtral_tiny":
        pytest.skip("one example is enough for the command line")
    assert cli.main(["run", str(path), "--batch", "2", "--seq", "3", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "output logits: float32[2, 3, 64]" in out and "time per call" in out
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fpga design of mixtral_tiny for alveo-u280" in out and "router.topk" in out and "ap_fixed<16," in out
    assert "cycles per token" in out and "DSP" in out and "BRAM18" in out
    assert (path / "hls" / "build_prj.tcl").read_text().count("set_part {xcu280-fsvh2892-2L-e}") == 1
    top = (path / "hls" / "firmware" / "mixtral_tiny.cpp").read_text()
    assert "mc::route<" in top and "mc::attention_step<" in top and "nnet::dense<" in top


def test_the_synthesis_roms_hold_the_simulated_weights(built, tmp_path) -> None:
    """make_roms.py writes the ROM initialisers synthesis compiles (the arrays' values, not a
    loader); they compile, and each value is its code in weights.bin at its format."""
    name, path, _, _ = built
    if name != "mixtral_tiny":
        pytest.skip("one example is enough for the ROM path")
    hls = tmp_path / "hls"
    shutil.copytree(path / "hls", hls)
    subprocess.run([sys.executable, str(hls / "make_roms.py")], check=True)
    roms = (hls / "firmware" / "weights_rom.h").read_text()
    entries = json.loads((hls / "weights.json").read_text())
    blob = (hls / "weights.bin").read_bytes()
    assert len(roms.splitlines()) == len(entries) + 1
    head = next(e for e in entries if e["name"] == "W_lm_head_weight")
    codes = np.frombuffer(blob, np.int16, head["count"], head["offset"])
    line = next(li for li in roms.splitlines() if " W_lm_head_weight[" in li)
    values = np.array([float(v) for v in line.split("{")[1].rstrip("};").split(", ")])
    np.testing.assert_array_equal(values, codes * 2.0 ** -head["frac"])
    r = subprocess.run(["g++", "-std=c++14", "-fsyntax-only", "-DMC_WEIGHT_ROMS", "-Ifirmware", "-Ifirmware/ap_types",
                        "firmware/weights.cpp"], cwd=hls, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[:2000]


def test_a_quantized_pipeline_reads_its_weights_from_codes_and_scales(tmp_path) -> None:
    """After the quantize pass, each low-bit weight is stored as the values its codes and scales
    give, in the format that holds max(scale) x 127; the C simulation is bit-exact against the
    emulation and near the quantized model in float (the interpreter on the quantized IR)."""
    from mocompile.backends.fpga.fixed import Fmt
    from mocompile.pass_manager import PassContext, PassManager

    spec = reduced_spec("mixtral_tiny", tmp_path)
    art = mocompile.compile(spec, target="fpga", passes="quantize", out_dir=tmp_path / "art", batch=1, seq=3)
    assert art.manifest["verification"]["max_rel_error"] == 0.0
    src = source_for(spec, None, None, 0)
    graph, _ = PassManager("quantize").run(lower_source(src), PassContext(calibration=None,
                                                                         input_ranges=dict(src.int_high)))
    scale = graph.weights["lm_head.weight.scale"]
    formats = json.loads((tmp_path / "art" / "precision.json").read_text())["weights"]
    assert formats["lm_head.weight.deq"] == Fmt.covering(float(scale.max()) * 127, 16, headroom=1.0).text()
    x = runtime.random_inputs(art.signature, 2, 4, seed=5)
    got, quantized = art.run(x)["logits"], interpret(graph, x)["logits"]
    rel = float(np.abs(got - quantized).max() / np.abs(quantized).max())
    print(f"int8 weights: relative error against the quantized model in float {rel:.2e}")
    assert rel < FP32_TOLERANCE
    assert "the quantize pass's 8-bit codes x scales" in (tmp_path / "art" / "hls" / "firmware" / "mixtral_tiny.cpp").read_text()
