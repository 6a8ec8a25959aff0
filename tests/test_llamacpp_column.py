"""The llama.cpp benchmark column's parts that need no llama.cpp build (benchmarks/llamacpp.py,
benchmarks/llamacpp_column.py): a build that cannot happen skips the column with one line
instead of stopping the benchmark, the converter's tokenizer is trained on the spot with the
special ids the Mixtral export's config names, and llama-bench's cases are the issue's."""

from __future__ import annotations

import json
import statistics
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


def test_each_case_runs_in_paired_rounds_and_its_speedup_is_the_median_round(monkeypatch):
    """A round is one llama-bench process of the case and our repetitions back to back, the side
    going first alternating; llama.cpp's wait policy is chosen in the first round (both run) and
    kept; the speed-up is the median of the rounds' ratios. (llama-bench's timings are stood in
    for here: what is checked is the column's own bookkeeping, not llama.cpp.)"""
    import time

    events, theirs = [], iter([[4.0, 4.0, 4.0], [3.0, 3.0, 3.0]] + [[6.0, 6.0, 6.0]] * 10)

    def fake_bench_once(tools, gguf, threads, reps, label, env):
        events.append(("theirs", env.get("OMP_WAIT_POLICY", "default")))
        return next(theirs)

    def ours():
        events.append(("ours", None))
        time.sleep(0.002)

    monkeypatch.setattr(llamacpp, "_bench_once", fake_bench_once)
    theirs_ms, ours_ms, ratios = llamacpp_column._paired_rounds(None, Path("m.gguf"), 2, "tg32 @ 0", ours)
    rounds, reps = llamacpp_column.ROUNDS, llamacpp_column.REPS
    assert len(ratios) == rounds and len(ours_ms) == len(theirs_ms) == rounds * reps
    # round 0: both policies, then ours (a warm-up and REPS timed); round 1: ours first, then the
    # faster policy (PASSIVE: 3 ms against 4) alone
    first = [e for e in events if e[0] == "theirs"][:3]
    assert first == [("theirs", "default"), ("theirs", "PASSIVE"), ("theirs", "PASSIVE")]
    assert events[2:2 + reps + 1] == [("ours", None)] * (reps + 1) and events[2 + reps + 1][0] == "ours"
    assert theirs_ms[:reps] == [3.0] * reps and theirs_ms[reps:] == [6.0] * (rounds - 1) * reps
    # ours takes ~2 ms: round 0's ratio ~3/2, the later rounds' ~6/2; the median is a later round's
    assert ratios[0] < min(ratios[1:]) and statistics.median(ratios) == sorted(ratios)[rounds // 2]
    assert 1.5 < statistics.median(ratios) < 3.1


def test_llama_bench_runs_one_case_per_process(monkeypatch):
    calls = []

    class Done:
        returncode, stderr = 0, ""
        stdout = json.dumps([{"n_prompt": 0, "n_gen": 32, "n_depth": 512, "samples_ns": [2e6, 3e6]}])

    monkeypatch.setattr(llamacpp.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done())
    tools = llamacpp.LlamaCpp(Path("/src"), Path("/bin"), "abc")
    ms, policy = llamacpp.bench(tools, Path("m.gguf"), 2, "tg32 @ 512", 2, ("default",))
    assert (ms, policy) == ([2.0, 3.0], "default") and len(calls) == 1
    assert calls[0][-6:] == ["-p", "0", "-n", "32", "-d", "512"] and calls[0][calls[0].index("-r") + 1] == "2"
    with pytest.raises(ValueError, match="no llama-bench case 'tg7'"):
        llamacpp.bench(tools, Path("m.gguf"), 2, "tg7", 2)
