"""`mocompile report`: the page of every example artifact, loaded in headless Chromium with no
network: it loads without a console message (the page holds no script, and its content
security policy makes any fetch a logged refusal), every section and plot is there, the
screenshot is a real picture, and the measured figures are those of the artifact (the heatmap
counts every routed token, the profile names the artifact's kernels)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import browser
from conftest import OnFirstUse
import mocompile
from mocompile.errors import MocompileError
from mocompile.report import LOAD_SAMPLES, write_report

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("glance", "pipeline", "load", "profile", "isolation", "verification")
# example -> (passes, whether the compile leaks between samples); the W8A8 per-tensor scheme
# on one of them gives the report a pass with a quality cost and a leak with its witness
EXAMPLES = {"mixtral_tiny": ("", False), "latent_tiny": ("", False), "unified_tiny": ("", False),
            "deepseek_tiny": ("quantize(w=int8,a=int8,dynamic=tensor,allow_batch_leak=true,calib=4)", True)}
SEQ = 4


# Rendered by default: mixtral_tiny (the page every other test here reads) and the leaking W8A8
# deepseek_tiny (the leak, witness and quality-cost sections); the pages of the other two
# examples, which add no section of their own, render with -m slow.
RENDERED_BY_DEFAULT = ("mixtral_tiny", "deepseek_tiny")


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (artifact, report) of an example compiled with its trained weights, when a test
    first asks for it (see RENDERED_BY_DEFAULT)."""
    root = tmp_path_factory.mktemp("reports")

    def compiled(name: str) -> tuple[Path, Path]:
        art = mocompile.compile(ROOT / "examples" / f"{name}.moe", passes=EXAMPLES[name][0], out_dir=root / name,
                                batch=2, seq=SEQ, weights=ROOT / "examples" / "weights" / f"{name}.safetensors")
        return Path(art.path), write_report(art.path, root / f"{name}.html")

    return OnFirstUse(compiled)


@pytest.mark.skipif(browser.chromium() is None, reason="chromium is not installed (.ci/run installs it)")
@pytest.mark.parametrize("name", [n if n in RENDERED_BY_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in EXAMPLES])
def test_report_renders_in_chromium(reports: dict, name: str) -> None:
    artifact, page_path = reports[name]
    page = browser.load(page_path)
    assert page.console == [], page.console
    width, height, colors = browser.png_size_and_colors(page.png)
    assert (width, height) == (1100, 1800) and colors > 50
    dom = page.dom
    for anchor in SECTIONS:
        assert re.search(rf"<section id=\"{anchor}\">", dom), anchor
    assert "Not measured" not in dom
    assert dom.count("<svg") >= 3  # the heatmap, and the prefill and decode (or one-position) profiles
    assert not re.search(r"(src|href)=\"(https?:)?//", dom)  # nothing outside the file
    manifest = json.loads((artifact / "manifest.json").read_text())
    # every router call of the artifact is a heatmap row, each of its cells one expert
    routers = [r["router"] for r in manifest["program"]["routing"]]
    assert routers and all(f">{r}</text>" in dom for r in routers)
    # the profile names the kernels the artifact calls
    assert re.search(r"<td>router_topk_e\d+_k\d+", dom)
    leaks = EXAMPLES[name][1]
    assert ("leaks</span>" in dom) == leaks and ("Witness: when only sample" in dom) == leaks
    # the decoding functions' own verdicts, as the manifest records them
    for fn, verdict in manifest["isolation"]["decoding"].items():
        assert f"{'KV-cached step' if fn == 'step' else 'prompt prefill'}: {verdict}." in dom
    if leaks:
        finding = manifest["isolation"]["findings"][0]
        assert f"<td>{finding['op']}</td>" in dom and finding["chain"][-1] in dom
        assert "quality cost" in dom and "top-1" in dom and "Drift from the fp32 model" in dom


@pytest.mark.skipif(browser.chromium() is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_reads_on_a_phone(reports: dict) -> None:
    page = browser.load(reports["mixtral_tiny"][1], width=390, height=1400)
    assert page.console == []
    # the page is laid out for the narrow screen: the viewport meta is there and wide plots scroll in their box
    assert "width=device-width" in page.dom and "overflow-x:auto" in page.dom


def test_heatmap_counts_every_routed_token(reports: dict) -> None:
    """The load is what the artifact's own routers chose: each router row sums to tokens x top_k."""
    from mocompile import vm_trace
    from mocompile.runtime import load, random_inputs

    artifact = reports["mixtral_tiny"][0]
    art = load(artifact, driver=False)
    inputs = [random_inputs(art.signature, 1, SEQ, seed) for seed in range(LOAD_SAMPLES)]
    routers, counts = vm_trace.expert_load(art, inputs)
    assert counts.shape == (2, 8) and (counts.sum(1) == LOAD_SAMPLES * SEQ * 2).all()
    page = reports["mixtral_tiny"][1].read_text()
    for r, row in zip(routers, counts):  # the cells' tooltips carry the same counts
        cells = [int(c) for c in re.findall(rf"<title>{re.escape(r)}, expert \d+: [\d.]+% \((\d+)\)</title>", page)]
        assert cells == row.tolist()


def test_placement_adds_load_per_device() -> None:
    """A place pass's plan gets a per-device heatmap: each replica serves its share of its
    expert's tokens (expert 0 of layer 0 split 0.5/0.5 over both devices)."""
    from mocompile.report_svg import heatmap
    from mocompile.report import _device_load, placement_plan

    counts = np.array([[6, 1, 0, 2], [1, 1, 1, 1]])
    devices = [{"name": "gpu0", "experts": [{"layer": 0, "expert": 0, "share": 0.5}, {"layer": 0, "expert": 1, "share": 1.0},
                                            {"layer": 1, "expert": 0, "share": 1.0}, {"layer": 1, "expert": 1, "share": 1.0}]},
               {"name": "gpu1", "experts": [{"layer": 0, "expert": 0, "share": 0.5}, {"layer": 0, "expert": 2, "share": 1.0},
                                            {"layer": 0, "expert": 3, "share": 1.0}, {"layer": 1, "expert": 2, "share": 1.0},
                                            {"layer": 1, "expert": 3, "share": 1.0}]}]
    manifest = {"passes": [{"pass": "dce"}, {"pass": "place(preset=gpu+cpu)", "plan": {"devices": devices}}]}
    assert placement_plan(manifest)["devices"] == devices and placement_plan({"passes": [{"pass": "dce"}]}) is None
    svg = _device_load(devices, ["layers.0.ffn.router", "layers.1.ffn.router"], counts)
    assert ">gpu0</text>" in svg and "(4)</title>" in svg and "(5)</title>" in svg and "(2)</title>" in svg
    assert heatmap(counts, ["l0", "l1"], list("abcd"), "t").count("class='cell'") == 8


def test_report_errors_are_one_line(reports: dict, tmp_path: Path) -> None:
    artifact = reports["mixtral_tiny"][0]
    with pytest.raises(MocompileError, match="not an artifact directory"):
        write_report(tmp_path / "missing")
    with pytest.raises(MocompileError, match="inside the artifact directory"):
        write_report(artifact, artifact / "r.html")
    cli = [sys.executable, "-m", "mocompile.cli", "report"]
    done = subprocess.run([*cli, str(tmp_path / "missing")], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and done.stderr.startswith("mocompile: error:")
    done = subprocess.run([*cli, str(artifact), "--no-run", "-o", str(tmp_path / "r.html")], capture_output=True,
                          text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"report -> {tmp_path / 'r.html'}"
    assert "Not measured (--no-run)" in (tmp_path / "r.html").read_text()


def test_artifact_for_another_cpu_gets_its_page_without_measurements(reports: dict, tmp_path: Path) -> None:
    """An artifact built for a CPU this one is not (its manifest names a feature this CPU
    lacks) is never loaded: its page has every recorded section and says why the measured
    ones are missing."""
    import shutil

    from mocompile.cpu_features import CPUINFO_FLAGS, missing_cpu_features

    lacking = next((f for f in CPUINFO_FLAGS if missing_cpu_features([f])), None)
    if lacking is None:
        pytest.skip("this CPU has every feature the backend may use")
    foreign = tmp_path / "foreign"
    shutil.copytree(reports["mixtral_tiny"][0], foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["target"]["features"].append(lacking)
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    page = write_report(foreign, tmp_path / "foreign.html").read_text()
    assert page.count(f"Not measured: {foreign}: built for") == 2 and f"lacks {lacking}" in page
    assert "<section id='verification'>" in page and "<section id='isolation'>" in page


def test_heatmap_routes_the_calibration_tokens_when_their_file_is_there(reports: dict, tmp_path: Path) -> None:
    """A manifest whose calibration came from a token file still readable: the heatmap routes
    those tokens (each router row sums to their count times top-k), and says so."""
    import shutil

    ids = np.random.default_rng(0).integers(0, 512, size=(3, 5)).astype(np.int64)
    np.save(tmp_path / "calib.npy", ids)
    art = tmp_path / "calibrated"
    shutil.copytree(reports["mixtral_tiny"][0], art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["calibration"] = {"source": f"{tmp_path / 'calib.npy'} (3 sequences of 5 tokens)", "samples": 3,
                               "random": False}
    (art / "manifest.json").write_text(json.dumps(manifest))
    page = write_report(art, tmp_path / "calibrated.html").read_text()
    assert f"the calibration tokens {tmp_path / 'calib.npy'}" in page
    for router in ("layers.0.ffn.router", "layers.1.ffn.router"):
        cells = re.findall(rf"<title>{re.escape(router)}, expert \d+: [\d.]+% \((\d+)\)</title>", page)
        assert sum(int(c) for c in cells) == ids.size * 2


def test_profile_counts_what_each_kernel_must_move_and_compute(reports: dict) -> None:
    """A decode step of mixtral_tiny (hidden 128, 8 experts of 256, top-2, vocab 512): the LM
    head's matmul reads its whole weight and does 2 x 128 x 512 flops for its one row; the
    experts' up projection reads only the two chosen experts' gate|up panels."""
    from mocompile import vm_trace
    from mocompile.runtime import load, random_inputs

    art = load(reports["mixtral_tiny"][0], driver=False)
    cache = art.new_cache(1, 9)
    art.step(random_inputs(art.signature, 1, 8, 0), cache)
    token = random_inputs(art.signature, 1, 1, 1)

    def decode() -> None:
        cache.length = 8
        art.step(token, cache)

    prof = {k.name: k for k in vm_trace.kernel_profile(art, decode, repeat=3)}
    head = next(k for name, k in prof.items() if name.startswith("dense_128x512"))
    assert head.calls == 1 and head.flops == 2 * 128 * 512
    assert head.bytes == 4 * (128 + 128 * 512 + 512)  # the row in, the weight, the logits out
    up = next(k for name, k in prof.items() if name.startswith("grouped_e8_128x256"))
    assert up.calls == 2 and up.flops == 2 * (2 * 2 * 128 * 2 * 256)  # 2 layers x 2 routed rows x 2 flops x K x gate|up
    panels = 8 * 2 * 256 * 128 * 4  # every expert's gate|up weights, float32
    per_layer = 2 * 128 * 4 + 9 * 4 + panels * 2 // 8 + 2 * 256 * 4  # rows in, offsets, 2 of 8 experts, rows out
    assert up.bytes == 2 * per_layer
    bandwidth, peak = 1e10, 1e11
    assert head.roofline_us(bandwidth, peak) == pytest.approx(1e6 * max(head.bytes / bandwidth, head.flops / peak))
