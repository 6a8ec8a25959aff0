"""Incremental decoding with a KV cache: the artifact's `step` function (prefill, then one
token at a time) gives the outputs of one full-sequence forward, per sample, for GQA and
latent (MLA) attention, fp32 and quantized; the cache is bounded and refuses misuse."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np
import pytest

from mocompile.compiler import compile
from mocompile.errors import ArtifactError
from mocompile.runtime import load, random_inputs

from conftest import EXAMPLES


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    return {name: compile(EXAMPLES / f"{example}.moe", passes=passes, out_dir=root / name)
            for name, example, passes in [("mixtral", "mixtral_tiny", ""), ("latent", "latent_tiny", ""),
                                          ("deepseek_int8", "deepseek_tiny", "quantize(w=int8)")]}


@pytest.mark.parametrize("name", ["mixtral", "latent", "deepseek_int8"])
def test_compile_verifies_cached_decoding(artifacts, name):
    art = artifacts[name]
    dec = art.manifest["decode_verification"]
    assert dec["new_tokens"] == 4 and dec["max_rel_error"] <= 1e-4
    assert art.manifest["program"]["step"]["cache"]  # one keys and one values tensor per attention layer
    kinds = {c["name"].rsplit(".", 1)[1] for c in art.manifest["program"]["step"]["cache"]}
    assert kinds == {"keys", "values"}


@pytest.mark.parametrize("name", ["mixtral", "latent"])
def test_chunked_prefill_and_tokens_match_full_forward(artifacts, name):
    """Prompt in two chunks (the second attends to the cached first), then single tokens."""
    art = artifacts[name]
    full = random_inputs(art.signature, 3, 13, seed=11)["text"]
    ref = art.run({"text": full})["logits"]
    cache = art.new_cache(3, capacity=100)
    assert cache.capacity == 128  # rounded up to the attention kernels' key block
    got = [art.step({"text": full[:, :5]}, cache)["logits"], art.step({"text": full[:, 5:9]}, cache)["logits"]]
    for t in range(9, 13):
        got.append(art.step({"text": full[:, t:t + 1]}, cache)["logits"])
    assert cache.length == 13
    out = np.concatenate(got, axis=1)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_each_sample_decodes_as_if_alone(artifacts):
    """Per-sample results do not depend on the rest of the batch (bit for bit)."""
    art = artifacts["mixtral"]
    ids = random_inputs(art.signature, 2, 7, seed=4)["text"]
    together = art.generate(ids, 5)
    alone = art.generate(ids[1:], 5)
    np.testing.assert_array_equal(together[1:], alone)


def test_generate_is_greedy_argmax_of_full_forwards(artifacts):
    art = artifacts["latent"]
    ids = random_inputs(art.signature, 1, 4, seed=2)["text"]
    new = art.generate(ids, 4)
    assert new.shape == (1, 4) and new.dtype == ids.dtype
    seq = ids
    for i in range(4):
        nxt = art.run({"text": seq})["logits"][:, -1].argmax(-1)
        assert nxt[0] == new[0, i]
        seq = np.concatenate([seq, nxt[:, None].astype(seq.dtype)], axis=1)


def test_cache_is_bounded_and_checked(artifacts):
    art = artifacts["mixtral"]
    cache = art.new_cache(1, capacity=64)
    art.step({"text": np.zeros((1, 60), np.int64)}, cache)
    with pytest.raises(ValueError, match="60 of 64 positions; 5 more"):
        art.step({"text": np.zeros((1, 5), np.int64)}, cache)
    with pytest.raises(ValueError, match="holds 1 sequences"):
        art.step({"text": np.zeros((2, 1), np.int64)}, cache)
    cache.reset()
    first = art.step({"text": np.ones((1, 3), np.int64)}, cache)["logits"]
    np.testing.assert_array_equal(first, art.run({"text": np.ones((1, 3), np.int64)})["logits"])


def test_multimodal_artifact_has_no_step_and_says_why(tmp_path):
    art = compile(EXAMPLES / "unified_tiny.moe", out_dir=tmp_path / "uni")
    assert not art.can_decode and "one input" in art.manifest["program"]["no_step_reason"]
    with pytest.raises(ArtifactError, match="no cached step function"):
        art.new_cache(1)
    out = subprocess.run([sys.executable, "-m", "mocompile.cli", "run", str(tmp_path / "uni"), "--generate", "2"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith("(decoding needs exactly one input, token ids [batch, seq])")


def test_cli_generates_through_the_cache(artifacts):
    out = subprocess.run([sys.executable, "-m", "mocompile.cli", "run", str(artifacts["mixtral"].path),
                          "--generate", "3", "--seq", "5", "--batch", "2"], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("sample 0: prompt [") and lines[1].startswith("sample 1: prompt [")
    assert "ms per token" in lines[-1] and "KV cache of 64 positions" in lines[-1]
    assert load(artifacts["mixtral"].path).can_decode


@pytest.mark.parametrize("example", ["mixtral_tiny", "latent_tiny"])
def test_reference_model_cache_matches_full_forward(example):
    """The torch reference's Hugging Face style cache (used by the decode benchmarks)."""
    import torch

    from mocompile.dsl import build_model, load_spec
    from mocompile.dsl.kv_cache import CachedStep

    model = build_model(load_spec(EXAMPLES / f"{example}.moe"), seed=0)
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    step = CachedStep(model)
    with torch.no_grad():
        ref = model(ids)
        logits, past = step.prefill(ids[:, :4])
        outs = [logits]
        logits, *past = step(ids[:, 4:7], *past)
        outs.append(logits)
        for t in range(7, 10):
            logits, *past = step(ids[:, t:t + 1], *past)
            outs.append(logits)
    assert past[0].shape[2] == 10
    assert torch.allclose(torch.cat(outs, dim=1), ref, rtol=1e-4, atol=1e-4)
    assert all(core.cache is None for core in step.cores)  # tracing sees the plain model again
