"""The llama.cpp benchmark column's parts that need no llama.cpp build (benchmarks/llamacpp.py,
benchmarks/llamacpp_column.py): a build that cannot happen skips the column with one line
instead of stopping the benchmark, the converter's tokenizer is trained on the spot with the
special ids the Mixtral export's config names, and llama-bench's cases are the issue's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import llamacpp  # noqa: E402
import llamacpp_column  # noqa: E402
from mocompile.dsl import load_spec  # noqa: E402
from mocompile.dsl.hf_export import mixtral_config  # noqa: E402


def test_a_damaged_sdist_skips_the_column_with_one_line(tmp_path, monkeypatch):
    (tmp_path / f"llama_cpp_python-{llamacpp.VERSION}.tar.gz").write_bytes(b"not a tar archive")
    with pytest.raises(llamacpp.Unavailable, match="cannot unpack .*llama_cpp_python"):
        llamacpp.build(tmp_path)
    monkeypatch.setattr(llamacpp, "CACHE", tmp_path)
    said = []
    rows, notes, build = llamacpp_column.column_rows({"m": None}, {"fp32": ""}, 2, tmp_path, said.append)
    assert rows == [] and build == "" and len(said) == 1
    assert notes == [f"- llama.cpp column skipped: {said[0].split(': ', 1)[1]}"]
    text = "\n".join(llamacpp_column.section_lines(rows, notes, build, 2))
    assert "not built" in text and "cannot unpack" in text


def test_the_converters_tokenizer_is_trained_with_the_exports_special_ids(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    spec = load_spec(ROOT / "examples" / "mixtral_tiny.moe")
    model = spm.SentencePieceProcessor(model_file=str(llamacpp.train_tokenizer(tmp_path, spec.vocab)))
    config = mixtral_config(spec)
    assert 0 < model.get_piece_size() <= spec.vocab  # the converter pads it to vocab_size
    assert (model.bos_id(), model.eos_id()) == (config["bos_token_id"], config["eos_token_id"])
    assert model.decode(model.encode("abc def")) == "abc def"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.model"]
    json.dumps(config)  # config.json is written from it


def test_the_cases_are_llama_benchs():
    assert [c[0] for c in llamacpp.cases()] == ["pp64", "pp512", "tg32 @ 0", "tg32 @ 512", "tg32 @ 2048"]
    assert [llamacpp.tokens(c[0]) for c in llamacpp.cases()] == [64, 512, 32, 32, 32]
    assert llamacpp_column.LONG >= max(llamacpp.DEPTHS) + llamacpp.GEN
