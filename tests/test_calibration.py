"""Calibration inputs and the hooks that collect statistics over them: token files checked
against the model in one line, the source recorded (random tokens said as such), statistics
equal to what the full activations give, and the interpreter holding only live values."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest

import mocompile
from mocompile import cli
from mocompile.calibration import channel_max, for_graph, load_token_file
from mocompile.errors import MocompileError
from mocompile.frontend import lower_source, source_for
from mocompile.ir.interpreter import run as interpret
from mocompile.signature import signature_of

SPEC = Path(__file__).resolve().parent.parent / "examples" / "mixtral_tiny.moe"


@pytest.fixture(scope="module")
def graph():
    return lower_source(source_for(SPEC, None, None, 0))


@pytest.mark.parametrize("content,message", [
    (np.zeros((2, 4), np.float32), "token ids must be integers, got float32"),
    (np.full((2, 4), 512, np.int64), "token id 512 at [0, 0] is outside the vocabulary [0, 512)"),
    (np.array([[1, 2], [3, -1]]), "token id -1 at [1, 1] is outside the vocabulary"),
    (np.zeros((0, 4), np.int64), "non-empty [n, seq] array, got shape (0, 4)"),
    (np.zeros(4, np.int64), "non-empty [n, seq] array, got shape (4,)"),
])
def test_bad_token_files_are_one_line_errors(graph, tmp_path, content, message) -> None:
    path = tmp_path / "calib.npy"
    np.save(path, content)
    with pytest.raises(MocompileError) as e:
        load_token_file(path, signature_of(graph, {"text": 512}))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_other_files_are_refused(graph, tmp_path) -> None:
    sig = signature_of(graph, {"text": 512})
    (tmp_path / "ids.txt").write_text("1 2 3")
    with pytest.raises(MocompileError, match=r"\.npy array \[n, seq\]"):
        load_token_file(tmp_path / "ids.txt", sig)
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(MocompileError, match="not a readable .npy array"):
        load_token_file(tmp_path / "bad.npy", sig)


def test_the_compile_records_where_calibration_came_from(tmp_path, capsys) -> None:
    ids = np.random.default_rng(0).integers(0, 512, (3, 7))
    np.save(tmp_path / "calib.npy", ids)
    art = mocompile.compile(SPEC, passes="quantize(w=int8,a=int8)", out_dir=tmp_path / "a", batch=1, seq=2,
                            calibration=tmp_path / "calib.npy")
    assert art.manifest["calibration"]["source"].endswith("calib.npy (3 sequences of 7 tokens)")
    report = art.manifest["passes"][0]["calibration"]
    assert report["samples"] == 3 and not report["random"]
    plain = mocompile.compile(SPEC, passes="quantize(w=int8,a=int8)", out_dir=tmp_path / "b", batch=1, seq=2)
    assert plain.manifest["passes"][0]["calibration"]["random"] and "calibration" not in plain.manifest
    assert art.manifest["passes"][0]["activations"] != plain.manifest["passes"][0]["activations"]
    np.save(tmp_path / "bad.npy", np.full((1, 3), 9999))
    assert cli.main(["compile", str(SPEC), "-o", str(tmp_path / "c"), "--calib", str(tmp_path / "bad.npy")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mocompile: error")]
    assert len(err) == 1 and "9999" in err[0] and not (tmp_path / "c").exists()


def test_channel_maxima_equal_those_of_the_full_activations(graph) -> None:
    calib = for_graph(graph, None, {"text": 512}, 3, 5, 1)
    values = [n.outputs[0] for n in graph.nodes if n.op in ("rmsnorm", "experts")][:4]
    stats = channel_max(graph, values, calib)
    for v in values:
        full = np.stack([np.abs(interpret(graph, x, watch=[v])[v.name]).reshape(-1, v.type.shape[-1]).max(0)
                         for x in calib.inputs]).max(0)
        np.testing.assert_array_equal(stats[v.name], full)


def test_the_interpreter_frees_what_no_later_node_reads(graph) -> None:
    """With a hook after every node, only the outputs are alive at the end: memory holds the
    live values, not every activation (calibration over many tokens stays bounded)."""
    refs = []
    x = for_graph(graph, None, {"text": 512}, 1, 6, 0).inputs[0]
    out = interpret(graph, x, after=lambda node, results: refs.extend(weakref.ref(r) for r in results))
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert len(refs) > 20 and all(any(a is o for o in out.values()) for a in alive), len(alive)
