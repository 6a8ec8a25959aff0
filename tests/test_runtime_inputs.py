"""Inputs are checked at the artifact boundary (mocompile/runtime_inputs.py), so every program
using an artifact gets the checks, not only the CLI: token ids outside the vocabulary, empty
batches and sequences, positions past the model's max_seq, wrong dtypes, shapes and containers
are refused by `run`, `step`, `generate`, `run_cached` and `new_cache` with one line naming the
input and the bound, and no numpy warning on the way. A KV cache states its memory, defaults
to a bounded capacity rather than max_seq, and is refused when the machine cannot hold it.

One small multimodal model (text tokens and image features) is compiled for the module, with
a max_seq of 100: not a multiple of the attention kernels' key block (64), so a cache's
rounded-up capacity (128) and max_seq bound a step differently.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np
import pytest

from mocompile.compiler import compile
from mocompile.errors import ArtifactInputError, MocompileError
from mocompile.runtime import KVCache, LoadedArtifact

SPEC = """
model inputs_tiny {
    hidden   = 64
    heads    = 2
    kv_heads = 1
    max_seq  = 100
    modality text  { vocab = 512 }
    modality image { features = 16 }
    moe sparse { experts = 4  top_k = 2  expert_hidden = 64 }
    layers = [sparse]
}
"""
MAX_SEQ, VOCAB = 100, 512


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "inputs_tiny.moe").write_text(SPEC)
    return compile(root / "inputs_tiny.moe", out_dir=root / "art")


@pytest.fixture(autouse=True)
def no_numpy_warnings():
    """A refused input must be refused before any kernel or numpy reduction sees it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def ids(*shape: int, value: int = 1) -> np.ndarray:
    return np.full(shape, value, np.int64)


def image(batch: int, positions: int) -> np.ndarray:
    return np.zeros((batch, positions, 16), np.float32)


def test_run_refuses_token_ids_outside_the_vocabulary(art):
    text = np.array([[1, 2, 3, 9999]])
    with pytest.raises(ValueError,
                       match=r"^input 'text': token id 9999 at \[0, 3\] is outside the vocabulary \[0, 512\)$") as info:
        art.run({"text": text, "image": image(1, 2)})
    assert isinstance(info.value, MocompileError)  # library callers catch ValueError; the CLI shows these in one line
    with pytest.raises(ArtifactInputError, match=r"^input 'text': token id -1 at \[0, 1\] is outside"):
        art.run({"text": np.array([[0, -1]]), "image": image(1, 2)})
    long = ids(2, 70)  # more ids than the per-step fast path compares
    long[1, 65] = VOCAB
    with pytest.raises(ArtifactInputError, match=r"token id 512 at \[1, 65\] is outside the vocabulary \[0, 512\)"):
        art.run({"text": long, "image": image(2, 0)})
    ok = art.run({"text": np.array([[0, VOCAB - 1]]), "image": image(1, 2)})["logits"]
    assert ok.shape == (1, 4, VOCAB)


def test_step_refuses_token_ids_outside_the_vocabulary(art):
    cache = art.new_cache(1, 16)
    with pytest.raises(ArtifactInputError, match=r"^input 'text': token id 512 at \[0, 1\] is outside"):
        art.step({"text": np.array([[5, 512]])}, cache)
    assert cache.length == 0  # a refused step leaves the cache as it was
    art.step({"text": ids(1, 3)}, cache)
    for bad in (-1, VOCAB, 10**12):
        with pytest.raises(ArtifactInputError, match=rf"^input 'text': token id {bad} at \[0, 0\] is outside"):
            art.step({"text": np.array([[bad]])}, cache)
    assert cache.length == 3
    art.step({"text": ids(1, 1)}, cache)
    assert cache.length == 4


def test_generate_refuses_token_ids_outside_the_vocabulary(art):
    with pytest.raises(ArtifactInputError, match=r"^input 'text': token id 600 at \[0, 1\] is outside"):
        art.generate(np.array([[1, 600]]), 3)
    with pytest.raises(ArtifactInputError, match=r"^input 'text': token id -3 at \[0, 0\] is outside"):
        art.generate(np.array([[-3, 1]], np.int32), 3)  # checked before the cast to int64
    with pytest.raises(ArtifactInputError, match=r"^input 'text': token ids must be integers, got float64$"):
        art.generate(np.array([[1.0, 2.5]]), 3)
    assert art.generate([[1, 2]], 3).shape == (1, 3)  # a list of ids is fine


def test_run_refuses_positions_past_max_seq(art):
    with pytest.raises(ArtifactInputError,
                       match=r"^inputs text, image: 101 \+ 0 = 101 positions, past the model's max_seq of 100$"):
        art.run({"text": ids(1, MAX_SEQ + 1), "image": image(1, 0)})
    with pytest.raises(ArtifactInputError, match=r"90 \+ 20 = 110 positions, past the model's max_seq of 100"):
        art.run({"text": ids(1, 90), "image": image(1, 20)})
    assert art.run({"text": ids(1, 90), "image": image(1, 10)})["logits"].shape == (1, MAX_SEQ, VOCAB)
    with pytest.raises(ArtifactInputError, match="101 positions, past the model's max_seq of 100"):
        art.run_cached({"text": ids(1, MAX_SEQ + 1), "image": image(1, 0)}, 4)


def test_step_refuses_positions_past_max_seq(art):
    cache = art.new_cache(1, MAX_SEQ)
    assert cache.capacity == 128  # rounded up to the key block: room past max_seq
    art.step({"text": ids(1, 90)}, cache)
    with pytest.raises(ArtifactInputError,
                       match=r"^the cache holds 90 positions; 11 more would pass the model's max_seq of 100$"):
        art.step({"text": ids(1, 11)}, cache)
    assert cache.length == 90
    art.step({"text": ids(1, 10)}, cache)
    with pytest.raises(ArtifactInputError, match="the cache holds 100 positions; 1 more would pass"):
        art.step({"text": ids(1, 1)}, cache)


def test_new_cache_and_generate_refuse_sizes_past_max_seq(art):
    with pytest.raises(ArtifactInputError, match=r"^new_cache: capacity 101 is past the model's max_seq of 100$"):
        art.new_cache(1, MAX_SEQ + 1)
    with pytest.raises(ArtifactInputError, match=r"^generate: the prompt's 2 positions and 99 new tokens make 101, "
                                                 r"past the model's max_seq of 100$"):
        art.generate(ids(1, 2), 99)
    cache = art.new_cache(1, MAX_SEQ)
    art.step({"text": ids(1, 95)}, cache)
    with pytest.raises(ArtifactInputError, match=r"^generate: 95 cached positions, the prompt's 2 positions and "
                                                 r"4 new tokens make 101"):
        art.generate(ids(1, 2), 4, cache=cache)
    assert art.generate(ids(1, 2), 98).shape == (1, 98)


def test_empty_batches_and_sequences_are_refused(art):
    with pytest.raises(ArtifactInputError,
                       match=r"^input 'text': a batch of 0 samples \(shape \(0, 3\)\); a call needs at least one$"):
        art.run({"text": ids(0, 3), "image": image(0, 2)})
    with pytest.raises(ArtifactInputError,
                       match=r"^inputs text, image: 0 \+ 0 = 0 positions; a call needs at least one$"):
        art.run({"text": ids(1, 0), "image": image(1, 0)})
    assert art.run({"text": ids(1, 0), "image": image(1, 3)})["logits"].shape == (1, 3, VOCAB)  # one empty segment
    cache = art.new_cache(1, 16)
    with pytest.raises(ArtifactInputError, match="a batch of 0 samples"):
        art.step({"text": ids(0, 1)}, cache)
    with pytest.raises(ArtifactInputError, match="a step needs at least one position"):
        art.step({"text": ids(1, 0)}, cache)
    for batch in (0, -1, 1.5, True):
        with pytest.raises(ArtifactInputError, match=rf"^new_cache: batch must be a positive integer \(got {batch}\)$"):
            art.new_cache(batch, 16)
    for capacity in (0, -5):
        with pytest.raises(ArtifactInputError,
                           match=rf"^new_cache: capacity must be a positive integer \(got {capacity}\)$"):
            art.new_cache(1, capacity)
    with pytest.raises(ArtifactInputError, match=r"^generate: new_tokens must be a non-negative integer \(got -1\)$"):
        art.generate(ids(1, 2), -1)
    assert art.generate(ids(1, 2), 0).shape == (1, 0)


def test_wrong_dtypes_shapes_and_containers_are_named(art):
    with pytest.raises(ArtifactInputError, match=r"^input 'image': expected float32, got float64 "
                                                 r"\(convert it with .astype\('float32'\)\)$"):
        art.run({"text": ids(1, 2), "image": image(1, 2).astype(np.float64)})
    with pytest.raises(ArtifactInputError, match="^input 'image': expected float32, got float64"):
        art.run({"text": [[1, 2]], "image": [[[0.5] * 16]]})  # a list of floats is float64
    with pytest.raises(ArtifactInputError, match=r"^input 'text': cannot be read as an array \("):
        art.run({"text": [[1, 2], [3]], "image": image(2, 1)})
    with pytest.raises(ArtifactInputError, match=r"^input 'image': axis 2 is 15 \(shape \(1, 2, 15\)\), "
                                                 r"the artifact takes 16 \(float32\[batch, seq_image, 16\]\)$"):
        art.run({"text": ids(1, 2), "image": np.zeros((1, 2, 15), np.float32)})
    with pytest.raises(ArtifactInputError, match=r"^input 'text': expected rank 2"):
        art.step({"text": np.int64(3)}, art.new_cache(1, 16))
    with pytest.raises(ArtifactInputError, match=r"^input 'text': expected rank 2"):
        art.generate([1, 2], 2)
    with pytest.raises(ArtifactInputError, match=r"^the inputs must be a mapping \{input name: array\}, got ndarray$"):
        art.run(ids(1, 2))
    assert art.run({"text": [[1, 2]], "image": image(1, 1)})["logits"].shape == (1, 3, VOCAB)  # a list of ids is fine


def test_cache_capacity_defaults_to_a_bounded_number_of_positions(art):
    """Not max_seq: an imported checkpoint's 131072 positions would reserve gigabytes."""
    from mocompile.runtime_inputs import DEFAULT_CACHE_POSITIONS

    assert art.new_cache(1).capacity == 128  # max_seq (100) is below the default, rounded up to the key block
    manifest = {**art.manifest, "model": {**art.manifest["model"], "max_seq": 131072}}
    manifest["program"] = {**manifest["program"], "step": {**manifest["program"]["step"], "max_positions": 131072}}
    long = LoadedArtifact(art.path, manifest)
    assert long.max_seq == 131072
    assert long.new_cache(1).capacity == DEFAULT_CACHE_POSITIONS == 2048
    assert long.new_cache(1, 4096).capacity == 4096  # a longer cache, asked for


def test_cache_states_its_memory(art):
    cache = art.new_cache(2, 96)
    specs = art.manifest["program"]["step"]["cache"]
    sizes = {"batch": 2, "cache_len": 128}
    expected = sum(int(np.prod([sizes.get(d, d) for d in s["shape"]])) * np.dtype(s["dtype"]).itemsize for s in specs)
    assert cache.nbytes == expected == 64 * 1024
    art.step({"text": ids(2, 96)}, cache)
    assert cache.describe() == repr(cache) == "KVCache(batch 2, 96 of 128 positions, 64 KiB)"
    # every dtype counts its own width (numpy arrays stand in for TVM tensors)
    half = KVCache([{"name": "k", "shape": ["batch", "cache_len", 24], "dtype": "float16"},
                    {"name": "s", "shape": ["batch", 3], "dtype": "int8"}], 2, 100, 64, lambda a: a)
    assert half.nbytes == 2 * 128 * 24 * 2 + 2 * 3 == sum(t.nbytes for t in half.tensors)
    assert repr(half) == "KVCache(batch 2, 0 of 128 positions, 12 KiB)"


def test_cache_larger_than_available_memory_is_refused(art, monkeypatch):
    import mocompile.runtime_inputs as runtime_inputs

    free = runtime_inputs.available_memory()
    assert free is None or free > 0
    monkeypatch.setattr(runtime_inputs, "available_memory", lambda: 100_000)
    assert art.new_cache(1, 100).nbytes == 32 * 1024  # fits
    with pytest.raises(ArtifactInputError,
                       match=r"^a KV cache of batch 4 x 128 positions needs 128 KiB \(131072 bytes\), but only "
                             r"97.7 KiB \(100000 bytes\) of memory is available; ask for fewer positions$"):
        art.new_cache(4, 100)
    with pytest.raises(ArtifactInputError, match="needs 128 KiB"):
        art.generate(ids(4, 70), 3)
