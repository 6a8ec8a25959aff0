"""`mocompile place` (statistics or simulation, device file or preset, JSON or text and heatmap)
and the `place` pass (statistics collected on calibration data, stored in the artifact)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mocompile.calibration import load_token_file
from mocompile.cli import main
from mocompile.errors import MocompileError
from mocompile.frontend import lower_source, source_for
from mocompile.pass_manager import PassContext, PassManager
from mocompile.placement.stats import parse_stats, zipf_stats
from mocompile.signature import signature_of

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "examples" / "deepseek_tiny.moe"


def place(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["place", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def stats_file(tmp_path: Path) -> Path:
    stats = zipf_stats(32, 4, 1200, 1.2, layers=2, seed=5, n_group=4, topk_group=2)
    stats.model.update({"hidden": 2048, "expert_hidden": 1408, "dtype": "bf16"})
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(stats.to_json()))
    return path


def test_json_plan_from_statistics_and_a_preset(capsys, stats_file: Path) -> None:
    code, out, _ = place(capsys, "--stats", str(stats_file), "--preset", "2node-4gpu", "--json", "--replicas", "4")
    assert code == 0
    doc = json.loads(out)
    assert [d["name"] for d in doc["devices"]] == [f"n{i}.gpu{j}" for i in range(2) for j in range(4)]
    served = {}
    for d in doc["devices"]:
        for x in d["experts"]:
            served[x["layer"], x["expert"]] = served.get((x["layer"], x["expert"]), 0) + x["share"]
    assert len(served) == 64 and all(abs(s - 1) < 1e-9 for s in served.values())
    assert doc["step_time_s"] <= doc["baselines"]["eplb"]["step_time_s"] * (1 + 1e-9)
    assert doc["step_time_s"] < doc["baselines"]["round_robin"]["step_time_s"]


def test_a_device_file_reads_like_its_preset(capsys, stats_file: Path, tmp_path: Path) -> None:
    code, toml, _ = place(capsys, "--preset", "gpu+cpu", "--print-devices")
    assert code == 0 and "[[device]]" in toml
    (tmp_path / "c.toml").write_text(toml)
    runs = [place(capsys, "--stats", str(stats_file), *where, "--json")[1]
            for where in (["--preset", "gpu+cpu"], ["--devices", str(tmp_path / "c.toml")])]
    assert json.loads(runs[0]) == json.loads(runs[1])


def test_human_output_and_heatmap(capsys, stats_file: Path, tmp_path: Path) -> None:
    png = tmp_path / "load.png"
    code, out, _ = place(capsys, "--stats", str(stats_file), "--preset", "1node-8gpu", "--heatmap", str(png))
    assert code == 0
    assert "round-robin" in out and "eplb" in out and f"heatmap: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_an_unwritable_heatmap_is_one_line_and_prints_nothing(capsys, stats_file: Path, tmp_path: Path) -> None:
    code, out, err = place(capsys, "--stats", str(stats_file), "--preset", "gpu+cpu",
                           "--heatmap", str(tmp_path / "no" / "such" / "dir.png"))
    assert code == 1 and out == "" and "cannot write the heatmap" in err and err.count("\n") == 1


@pytest.mark.parametrize("text, message", [
    ('name = "x"\n[[device]]\nname = "g"\nkind = "gpu"\nnode = "n"\nmemory_gib = -1\nmemory_gb_per_s = 1\n'
     'tflops = { bf16 = 1 }\n', "device 'g': memory_gib must be positive, got -1"),
    ('[[device]]\nname = "g"\nkind = "gpu"\nnode = "n"\nmemory_gib = 8\nmemory_gb_per_s = 1\ntflops = { bf16 = 1 }\n'
     'colour = "red"\n', "device 'g': unknown key 'colour'"),
    ('[[device]]\nname = "g"\nkind = "gpu"\nnode = "n"\nmemory_gib = 8\nmemory_gb_per_s = 1\ntflops = { bf16 = 1 }\n'
     '[[link]]\nbetween = ["g", "h"]\ngb_per_s = 1\nlatency_us = 1\n', "link 1: names device 'h', which is not defined"),
    ("[[device]\n", "not valid TOML"),
])
def test_bad_device_file_is_one_line(capsys, stats_file: Path, tmp_path: Path, text: str, message: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    code, out, err = place(capsys, "--stats", str(stats_file), "--devices", str(bad))
    assert code == 1 and out == ""
    assert err.startswith(f"mocompile: error: {bad}: ") and message in err and err.count("\n") == 1


def test_too_many_replicas_is_one_line(capsys, stats_file: Path) -> None:
    code, _, err = place(capsys, "--stats", str(stats_file), "--preset", "gpu+fpga", "--replicas", "100000")
    assert code == 1 and "layer 0: 32 experts + 100000 replicas do not fit" in err and err.count("\n") == 1


def test_bad_statistics_and_missing_options(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "s.json"
    bad.write_text('{"layers": {"0": {"tokens": [1, -3]}}}')
    code, _, err = place(capsys, "--stats", str(bad), "--preset", "gpu+cpu")
    assert code == 1 and "tokens[1] = -3 is not a non-negative count" in err and err.count("\n") == 1
    code, _, err = place(capsys, "--preset", "gpu+cpu")
    assert code == 1 and "needs --stats" in err


def test_simulation_of_a_small_cluster(capsys) -> None:
    code, out, _ = place(capsys, "--simulate", "--experts", "32", "--top-k", "4", "--groups", "4", "--topk-group", "2",
                         "--tokens", "1000", "--alpha", "1.2", "--preset", "2node-4gpu", "--json")
    doc = json.loads(out)
    assert code == 0 and len(doc["devices"]) == 8
    assert doc["step_time_s"] <= doc["baselines"]["eplb"]["step_time_s"] * (1 + 1e-9)


@pytest.mark.slow
def test_simulation_of_deepseek_v3_on_64_gpus(capsys) -> None:
    code, out, _ = place(capsys, "--simulate", "--json")  # 256 experts, top-8 of 4 of 8 groups, 8node-64gpu
    doc = json.loads(out)
    assert code == 0 and len(doc["devices"]) == 64
    assert doc["step_time_s"] <= doc["baselines"]["eplb"]["step_time_s"]
    assert doc["baselines"]["round_robin"]["imbalance"] > 2 > doc["imbalance"]


# ---- the pass ----------------------------------------------------------------------------------------


def test_place_pass_collects_statistics_on_the_calibration_data(tmp_path: Path) -> None:
    src = source_for(SPEC, None, None, 0)
    graph = lower_source(src)
    ids = np.random.default_rng(0).integers(0, 512, size=(3, 10))
    np.save(tmp_path / "calib.npy", ids)
    calibration = load_token_file(tmp_path / "calib.npy", signature_of(graph, src.int_high))
    _, reports = PassManager("place(preset=2node-4gpu,replicas=2)").run(
        graph, PassContext(calibration=calibration, input_ranges=dict(src.int_high)))
    report = reports[-1]
    assert report["pass"] == "place(preset=2node-4gpu,replicas=2)" and report["replicas"] == 2
    stats = parse_stats(report["stats"], "report")  # the documented format, readable by `mocompile place`
    assert sorted(stats.layers) == [1, 2]  # layer 0 is dense
    assert stats.model == {"hidden": 128, "expert_hidden": 64, "gated": True, "dtype": "fp32", "top_k": 4,
                           "n_group": 4}
    assert "calib.npy (3 sequences of 10 tokens)" in stats.source
    for layer in stats.layers.values():
        assert layer.tokens.sum() == 3 * 10 * 4  # every token's 4 choices
        assert np.allclose(layer.coactivation.sum(1), layer.tokens * 3)  # ... each with its 3 others
    assert set(report["plan"]) == {"devices", "imbalance", "step_time_s", "baselines"}


@pytest.mark.parametrize("scheme, dtype", [("quantize(w=int8),", "int8"), ("quantize(w=int4,group=32),", "int4"),
                                           ("weight-dtype(dtype=bf16),", "bf16"), ("", "fp32")])
def test_place_pass_sizes_experts_by_their_stored_weights(scheme: str, dtype: str) -> None:
    src = source_for(ROOT / "examples" / "mixtral_tiny.moe", None, None, 0)
    _, reports = PassManager(f"{scheme}place(preset=1node-8gpu,calib=2,seq=8)").run(
        lower_source(src), PassContext(input_ranges=dict(src.int_high)))
    report = reports[-1]
    assert report["stats"]["model"]["dtype"] == dtype
    per_expert = 128 * 256 * 3 * {"int8": 1, "int4": 0.5, "bf16": 2, "fp32": 4}[dtype]  # hidden x inner x (gate, up, down)
    replicas = sum(len(d["experts"]) for d in report["plan"]["devices"])
    assert sum(d["memory_bytes"] for d in report["plan"]["devices"]) == replicas * per_expert


def test_place_pass_reads_a_device_file(tmp_path: Path) -> None:
    from mocompile.placement.presets import preset_toml

    (tmp_path / "c.toml").write_text(preset_toml("gpu+cpu").replace("reserved_gib = 64", "reserved_gib = 767.999"))
    src = source_for(SPEC, None, None, 0)
    graph = lower_source(src)
    ctx = PassContext(input_ranges=dict(src.int_high))
    _, reports = PassManager(f"place(devices={tmp_path / 'c.toml'},calib=2,seq=8)").run(graph, ctx)
    report = reports[-1]
    assert report["calibration"]["random"] and report["devices"] == "gpu+cpu"
    cpu = report["plan"]["devices"][1]
    assert cpu["name"] == "cpu0" and cpu["memory_bytes"] <= 2**30 * 0.001  # all that its last 1 MiB holds


def test_place_pass_options_are_checked() -> None:
    for text, message in (("place", "exactly one of devices=FILE.toml or preset=NAME"),
                          ("place(preset=9gpu)", "unknown preset '9gpu'"),
                          ("place(devices=a.toml,preset=gpu+cpu)", "exactly one of")):
        with pytest.raises(MocompileError, match=message):
            PassManager(text)


def test_compiled_artifact_keeps_statistics_and_plan(tmp_path: Path, capsys) -> None:
    from mocompile.compiler import compile

    art = compile(SPEC, passes="place(preset=gpu+cpu)", out_dir=tmp_path / "art", seq=4, batch=1)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    report = next(p for p in manifest["passes"] if p["pass"].startswith("place("))
    assert parse_stats(report["stats"], "manifest").layers[1].tokens.sum() > 0
    assert [d["name"] for d in report["plan"]["devices"]] == ["gpu0", "cpu0"]
    assert art.manifest["verification"]["status"] == "verified"
    code, out, _ = place(capsys, "--stats", str(tmp_path / "art"), "--preset", "1node-8gpu", "--json")  # re-planned
    assert code == 0 and {x["layer"] for d in json.loads(out)["devices"] for x in d["experts"]} == {1, 2}
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "manifest.json").write_text(json.dumps({**manifest, "passes": []}))
    code, _, err = place(capsys, "--stats", str(tmp_path / "plain"), "--preset", "1node-8gpu")
    assert code == 1 and "compiled without the place pass" in err
