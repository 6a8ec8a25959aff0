"""A backend written entirely in this file registers, compiles, loads and is verified through
the same `mocompile.compile` and `runtime.load` as the CPU backend: it writes the graph as
text (and pickled), and its artifacts "run" through the IR interpreter. Variants show that a
wrong backend fails verification and that one whose artifact cannot run here says so."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest

import mocompile
from mocompile import runtime
from mocompile.backends.base import Backend, get_backend, register_backend
from mocompile.errors import MocompileError, VerificationError
from mocompile.ir.graph import Graph
from mocompile.ir.interpreter import run as interpret
from mocompile.ir.printer import format_graph
from mocompile.signature import Signature

SPEC = Path(__file__).resolve().parent.parent / "examples" / "mixtral_tiny.moe"
KIND = "test-interpreted-graph"


class InterpretedArtifact:
    """The toy program: the pickled graph, run by the interpreter."""

    def __init__(self, path: Path, manifest: dict[str, Any], **options: Any) -> None:
        self.path, self.manifest = path, manifest
        self.signature = Signature.from_json(manifest["signature"])
        self.graph = pickle.loads((path / manifest["program"]["graph"]).read_bytes())
        self.scale = manifest["program"].get("scale", 1.0)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v * np.float32(self.scale) for k, v in interpret(self.graph, dict(inputs)).items()}


runtime.register_program_kind(KIND, InterpretedArtifact)


@register_backend
class GraphAsText(Backend):
    name = "test-graph-text"
    description = "the IR as text; runs through the interpreter"
    program_kind = KIND

    def emit(self, graph: Graph, out_dir: Path, *, tuning: Any = None) -> dict[str, Any]:
        (out_dir / "graph.txt").write_text(format_graph(graph) + "\n")
        (out_dir / "graph.pkl").write_bytes(pickle.dumps(graph))
        return {"kind": KIND, "graph": "graph.pkl", "text": "graph.txt",
                "target_info": {"backend": "test-graph-text"}}


@register_backend
class OffByOnePercent(GraphAsText):
    """A broken backend: every output 1% too large."""

    name = "test-off-by-one-percent"

    def emit(self, graph: Graph, out_dir: Path, *, tuning: Any = None) -> dict[str, Any]:
        return {**super().emit(graph, out_dir), "scale": 1.01}


@register_backend
class ElsewhereOnly(GraphAsText):
    """An artifact for a device this machine lacks: checked without running it."""

    name = "test-elsewhere"

    def cannot_run_here(self, manifest: dict[str, Any]) -> str | None:
        return "it needs the test's imaginary accelerator"

    def static_checks(self, stage: Path, manifest: dict[str, Any]) -> list[str]:
        text = (stage / manifest["program"]["text"]).read_text()
        return [f"the graph text has {text.count(chr(10))} lines and names every op"]


def test_a_backend_defined_outside_the_tree_compiles_loads_and_verifies(tmp_path) -> None:
    art = mocompile.compile(SPEC, target="test-graph-text", out_dir=tmp_path / "toy", batch=2, seq=4)
    m = art.manifest
    assert m["program"]["kind"] == KIND and m["target"]["name"] == "test-graph-text"
    assert m["verification"]["status"] == "verified" and m["verification"]["max_rel_error"] <= 1e-5
    assert "router.topk" in (tmp_path / "toy" / "graph.txt").read_text()
    loaded = runtime.load(tmp_path / "toy")  # the manifest's program kind picks the loader
    assert isinstance(loaded, InterpretedArtifact)
    cpu = mocompile.compile(SPEC, target="cpu", out_dir=tmp_path / "cpu", batch=2, seq=4)
    x = runtime.random_inputs(cpu.signature, 2, 5, seed=3)
    np.testing.assert_allclose(loaded.run(x)["logits"], cpu.run(x)["logits"], rtol=0, atol=1e-4)


def test_a_wrong_backend_fails_verification_and_leaves_nothing(tmp_path) -> None:
    with pytest.raises(VerificationError, match="relative error 0.01"):
        mocompile.compile(SPEC, target="test-off-by-one-percent", out_dir=tmp_path / "bad", batch=1, seq=2)
    assert list(tmp_path.iterdir()) == []


def test_an_artifact_that_cannot_run_here_says_so(tmp_path, capsys) -> None:
    from mocompile import cli

    assert cli.main(["compile", str(SPEC), "-o", str(tmp_path / "far"), "--target", "test-elsewhere",
                     "--batch", "1", "--seq", "2"]) == 0
    out = capsys.readouterr().out
    assert "NOT VERIFIED by running it" in out and "imaginary accelerator" in out and "graph text has" in out
    v = runtime.load(tmp_path / "far").manifest["verification"]
    assert v["status"] == "not run" and v["checked"]


def test_target_options_and_unknown_targets_are_one_line_errors() -> None:
    with pytest.raises(MocompileError, match=r"unknown target 'tpu' \(available: .*cpu"):
        get_backend("tpu")
    with pytest.raises(MocompileError, match="takes no options"):
        get_backend("test-graph-text -fast")
    with pytest.raises(ValueError, match="registered twice"):
        register_backend(type("Again", (GraphAsText,), {"name": "test-graph-text"}))


def test_an_unknown_program_kind_is_refused_in_one_line(tmp_path) -> None:
    import json

    art = mocompile.compile(SPEC, target="test-graph-text", out_dir=tmp_path / "toy", batch=1, seq=2)
    manifest = dict(art.manifest, program=dict(art.manifest["program"], kind="no-such-kind"))
    with pytest.raises(mocompile.errors.ArtifactError, match="program kind 'no-such-kind' has no loader here"):
        runtime.open_artifact(tmp_path / "toy", json.loads(json.dumps(manifest)))
