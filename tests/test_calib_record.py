"""The calibration recorder and the held-out quality module: each running statistic equals what
the full activations give, memory does not grow with the data, plain-text calibration goes
through a checkpoint's tokenizer.json (bad files: one line), and the quality figures of an
unchanged graph are perfect while those of a changed one are not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mocompile.blocks import blocks
from mocompile.calib_record import record
from mocompile.calibration import Calibration, load_token_file
from mocompile.compiler import given_calibration
from mocompile.errors import MocompileError
from mocompile.ir.interpreter import run as interpret
from mocompile.ir.ops.nn import ffn_hidden
from mocompile.ir.registry import get_op
from mocompile.quality import quality_report, split
from mocompile.signature import signature_of
from sparsity_models import text_calibration, toy_inputs, toy_moe, trained


@pytest.fixture(scope="module")
def deepseek():
    return trained("deepseek_tiny")


def test_statistics_equal_those_of_the_full_activations(deepseek) -> None:
    calib = text_calibration("deepseek_tiny", sequences=2, seq=12)
    rec = record(deepseek, calib)
    stack = blocks(deepseek)
    routers = [n for n in deepseek.nodes if get_op(n.op).routing_choices is not None]
    ffns = [n for n in deepseek.nodes if get_op(n.op).hidden_abs_sum is not None]
    watch = [b.input for b in stack] + [b.output for b in stack] + [v for n in routers for v in n.outputs] + \
        [v for n in ffns for v in n.inputs if v.producer is not None]
    full = [interpret(deepseek, x, watch=watch) for x in calib]
    for b in stack:  # influence: mean over tokens of 1 - cos(in, out)
        a = np.concatenate([f[b.input.name].reshape(-1, 128) for f in full]).astype(np.float64)
        o = np.concatenate([f[b.output.name].reshape(-1, 128) for f in full]).astype(np.float64)
        cos = (a * o).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(o, axis=-1)
        assert rec.influence[b.name].mean == pytest.approx(float(np.mean(1 - cos)), rel=1e-9)
    for n in routers:
        idx = np.concatenate([f[n.outputs[1].name].reshape(-1, 4) for f in full])
        gates = np.concatenate([f[n.outputs[0].name].reshape(-1, 4) for f in full])
        usage = rec.routing[n.loc]
        np.testing.assert_array_equal(usage.counts, np.bincount(idx.ravel(), minlength=16))
        np.testing.assert_allclose(usage.gate_mass, np.bincount(idx.ravel(), gates.ravel(), minlength=16), rtol=1e-6)
        assert usage.tokens == 24 and usage.share.sum() == pytest.approx(1.0)
    dense = next(n for n in ffns if n.op == "mlp")
    x = np.concatenate([f[dense.inputs[0].name].reshape(-1, 128) for f in full])
    w = [deepseek.weights[v.name] for v in dense.inputs[1:3]]
    expect = np.abs(ffn_hidden(x, w[0], w[1], "silu")).mean(0)
    np.testing.assert_allclose(rec.hidden[dense.loc].mean[0], expect, rtol=1e-5)
    experts = next(n for n in ffns if n.op == "experts")
    assert rec.hidden[experts.loc].sums.shape == (16, 64)
    # an expert's count is the tokens routed to it by the router feeding the op
    router = next(n for n in routers if n.loc.startswith(experts.loc.rsplit(".", 1)[0]))
    np.testing.assert_array_equal(rec.hidden[experts.loc].tokens, rec.routing[router.loc].counts)


def test_memory_holds_statistics_not_tokens() -> None:
    g = toy_moe()
    small, large = record(g, toy_inputs(1)), record(g, toy_inputs(6, seq=40))
    for key in small.hidden:
        assert small.hidden[key].sums.shape == large.hidden[key].sums.shape == (6, 12)
    assert large.routing["layers.0.ffn.router"].tokens == 240 and large.samples == 6


def _tokenizer(tmp_path, words: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(words)} | {"[UNK]": words}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_plain_text_goes_through_the_checkpoints_tokenizer(tmp_path) -> None:
    g = toy_moe(vocab=20)
    sig = signature_of(g, {"text": 20})
    _tokenizer(tmp_path, 12)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 12}" for i in range(150)))
    calib = given_calibration(text, g, {"text": 20}, model=tmp_path)  # tmp_path stands for the checkpoint dir
    assert len(calib.inputs) == 2 and calib.inputs[0]["text"].shape == (1, 64)
    np.testing.assert_array_equal(calib.inputs[1]["text"][0, :3], [4, 5, 6])  # token 64 is w4
    assert "2 sequences of 64 tokens of text" in calib.source
    short = load_token_file(text, sig, tmp_path / "tokenizer.json", max_seq=16)
    assert len(short.inputs) == 9 and short.inputs[0]["text"].shape == (1, 16)


@pytest.mark.parametrize("kind,message", [
    ("no_tokenizer", "plain text needs a model from a checkpoint directory with a tokenizer.json"),
    ("binary", "calibration text is not UTF-8"),
    ("empty", "calibration text holds no tokens"),
    ("vocab", "is outside the vocabulary [0, 20)"),
    ("bad_tokenizer", "not a readable tokenizer"),
])
def test_bad_text_calibration_is_one_line(tmp_path, kind, message) -> None:
    g = toy_moe(vocab=20)
    tok = _tokenizer(tmp_path, 40 if kind == "vocab" else 12)
    text = tmp_path / "calib.txt"
    text.write_text("w1 w2 w35 w3" if kind == "vocab" else "w1 w2 w3")
    if kind == "binary":
        text.write_bytes(b"w1 \xff\xfe w2")
    if kind == "empty":
        text.write_text("   \n")
    if kind == "bad_tokenizer":
        tok.write_text(json.dumps({"model": "nonsense"}))
    with pytest.raises(MocompileError) as e:
        given_calibration(text, g, {"text": 20}, model=None if kind == "no_tokenizer" else tmp_path)
    named = tok.name if kind == "bad_tokenizer" else text.name
    assert message in str(e.value) and "\n" not in str(e.value) and named in str(e.value)


def test_split_holds_out_the_last_sequences() -> None:
    calib = Calibration(toy_inputs(8), "given")
    fit, held = split(calib, 0.25)
    assert len(fit.inputs) == 6 and len(held.inputs) == 2 and held.inputs[0] is calib.inputs[6]
    fit, held = split(Calibration(toy_inputs(1, seq=10), "given"))
    assert fit.inputs[0]["text"].shape == (1, 5) and held.inputs[0]["text"].shape == (1, 5)


def test_quality_of_an_unchanged_and_a_changed_graph() -> None:
    g = toy_moe()
    same = quality_report(g, g.clone(), toy_inputs(2))
    assert same["kl_mean"] == 0 and same["top1_agreement"] == 1 and same["routing_agreement"] == 1
    assert same["rel_error"] == 0
    other = g.clone()
    router = next(n for n in other.nodes if n.op == "router.topk")
    other.weights[router.inputs[1].name] = other.weights[router.inputs[1].name][::-1].copy()  # experts swapped
    worse = quality_report(g, other, toy_inputs(2))
    assert worse["routing_agreement"] < 0.9 and worse["kl_mean"] > 0 and worse["rel_error"] > 0


def test_the_command_line_refuses_text_without_a_tokenizer_in_one_line(tmp_path, capsys) -> None:
    from conftest import EXAMPLES
    from mocompile import cli

    text = tmp_path / "calib.txt"
    text.write_text("some plain text")
    code = cli.main(["compile", str(EXAMPLES / "mixtral_tiny.moe"), "-o", str(tmp_path / "out"), "--calib", str(text),
                     "--passes", "top-k(k=1)"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mocompile: error")]
    assert code == 1 and len(err) == 1 and "calib.txt" in err[0] and "tokenizer.json" in err[0]
    assert not (tmp_path / "out").exists()
