"""Incremental decoding with a KV cache: the artifact's `step` function (prefill, then one
token at a time) gives the outputs of one full-sequence forward, per sample, for GQA and
latent (MLA) attention, fp32 and quantized, and text after a multimodal prompt; the cache is
bounded and refuses misuse. The IR's cached graph (mocompile/kv_cache.py) is the interpreter
reference for past > 0 and is proven batch-isolated."""

from __future__ import annotations

import os
import re

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np
import pytest

from mocompile.compiler import compile
from mocompile.errors import ArtifactError
from mocompile.runtime import load, random_inputs

from conftest import EXAMPLE_SHAPE, EXAMPLES, cli_main as _main


@pytest.fixture(scope="module")
def artifacts(artifact_cache):
    return {name: artifact_cache.load(EXAMPLES / f"{example}.moe", **options)
            for name, example, options in [("mixtral", "mixtral_tiny", EXAMPLE_SHAPE),
                                           ("latent", "latent_tiny", EXAMPLE_SHAPE),
                                           ("deepseek_int8", "deepseek_tiny", {"passes": "quantize(w=int8)"})]}


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


@pytest.mark.parametrize("name", ["mixtral", "latent"])
def test_steps_across_key_chunks_and_blocks_match_full_forward(artifacts, name):
    """Keys are stored in chunks of 16 positions and read in blocks of 64, the last block only
    as far as its chunks hold keys: prompt chunks starting and ending off chunk boundaries,
    then single tokens on both sides of position 64, give the full forward's outputs."""
    art = artifacts[name]
    full = random_inputs(art.signature, 2, 70, seed=12)["text"]
    ref = art.run({"text": full})["logits"]
    cache = art.new_cache(2, capacity=70)
    got = [art.step({"text": full[:, a:b]}, cache)["logits"] for a, b in [(0, 7), (7, 30), (30, 62)]]
    got += [art.step({"text": full[:, t:t + 1]}, cache)["logits"] for t in range(62, 70)]
    out = np.concatenate(got, axis=1)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("name", ["mixtral", "latent", "deepseek_int8"])
def test_decode_driver_matches_the_vm_step_bit_for_bit(artifacts, name):
    """Single-token steps run through the decode driver (the step's kernel calls as one TIR
    function, no VM): logits and caches are the VM step's bit for bit, at batch 1 and 3."""
    art = artifacts[name]
    assert art.has_driver and art.manifest["program"]["step"]["driver"]["positions"] == 1
    vm = load(art.path, driver=False)
    assert not vm.has_driver
    for batch in (1, 3):
        ids = random_inputs(art.signature, batch, 9, seed=batch)["text"]
        caches = [a.new_cache(batch, 16) for a in (art, vm)]
        outs = [[a.step({"text": ids[:, :6]}, c)["logits"]] for a, c in zip((art, vm), caches)]
        for t in range(6, 9):
            for a, c, o in zip((art, vm), caches, outs):
                o.append(a.step({"text": ids[:, t:t + 1]}, c)["logits"])
        for got, want in zip(*outs):
            np.testing.assert_array_equal(got, want)
        for a, b in zip(caches[0].tensors, caches[1].tensors):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        first = outs[0][1]
        art.step({"text": ids[:, 8:9]}, caches[0])  # the next call reuses the output buffer ...
        np.testing.assert_array_equal(first, outs[1][1])  # ... results already returned do not change


def test_decode_driver_allocations_are_never_on_the_stack(artifacts):
    """Kernels assume 64-byte aligned buffers; TVM puts small constant-size allocations on
    the stack, less aligned (a vectorized kernel faulted on one, depending on the stack
    address), so the driver pads them to STACK_BYTES, which go to the workspace pool."""
    import tvm_ffi
    from tvm import tirx

    from mocompile.backends.tvm_cpu.driver import decode_driver
    from mocompile.backends.tvm_cpu.lower import lower
    from mocompile.backends.tvm_cpu.tir_util import STACK_BYTES
    from mocompile.frontend import lower_source, source_for

    program = lower(lower_source(source_for(EXAMPLES / "mixtral_tiny.moe", None, None, 0)))
    driver = decode_driver(program.mod, program.weights)
    sizes = []
    tvm_ffi.structural_walk(driver.func.body, [(tirx.AllocBuffer, lambda a: sizes.append(a.buffer))])
    assert len(sizes) > 20
    for buf in sizes:
        if all(isinstance(d, tirx.IntImm) for d in buf.shape):
            assert int(np.prod([int(d) for d in buf.shape])) * np.dtype(str(buf.dtype)).itemsize >= STACK_BYTES


def test_decode_driver_says_why_it_cannot_drive_a_step():
    """A step binding anything but kernel calls, reshapes and tuple items gets no driver, and
    the reason names the binding."""
    import tvm
    from tvm import relax, tirx

    from mocompile.backends.tvm_cpu.driver import decode_driver

    bb = relax.BlockBuilder()
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, 4], "float32"))
    past = relax.Var("past", relax.ShapeType([tirx.Var("past", "int64")]))
    with bb.function("step", [x, past]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.add(x, x)))
        bb.emit_func_output(y)
    why = decode_driver(bb.get(), [])
    assert isinstance(why, str) and "relax.add" in why


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


def test_text_decodes_after_a_multimodal_prompt(artifact_cache, capsys):
    """unified_tiny (text, image, audio): the prefill step over every segment is the plain
    forward; text tokens then follow with the other segments empty, as the IR's cached graph
    computes (the compile checks it too); the CLI generates through the cache."""
    from mocompile.frontend import lower_source, source_for
    from mocompile.kv_cache import cached_graph, run_cached_graph

    art = artifact_cache.load(EXAMPLES / "unified_tiny.moe", **EXAMPLE_SHAPE)
    assert art.can_decode and art.token_input.name == "text"
    dec = art.manifest["decode_verification"]
    assert dec["reference"] == "the IR's cached graph" and dec["max_rel_error"] <= 1e-4
    prompt = random_inputs(art.signature, 2, 5, seed=7)
    cache = art.new_cache(2, 32)
    first = art.step(prompt, cache)["logits"]
    np.testing.assert_array_equal(first, art.run(prompt)["logits"])
    assert cache.length == 15
    token = first[:, -1:].argmax(-1)
    second = art.step({"text": token}, cache)["logits"]
    assert second.shape == (2, 1, 512) and cache.length == 16
    vm = load(art.path, driver=False)  # the decode driver passes empty segments as the VM step does
    vm_cache = vm.new_cache(2, 32)
    vm.step(prompt, vm_cache)
    assert art.has_driver and not vm.has_driver
    np.testing.assert_array_equal(vm.step({"text": token}, vm_cache)["logits"], second)
    empty = {k: a[:, :0] for k, a in prompt.items() if k != "text"}
    ref = run_cached_graph(cached_graph(lower_source(source_for(EXAMPLES / "unified_tiny.moe", None, None, 0))),
                           [prompt, {"text": token, **empty}])
    np.testing.assert_allclose(second, ref[1]["logits"], rtol=0, atol=1e-5 * np.abs(second).max())
    np.testing.assert_array_equal(art.generate(prompt, 3)[:, 0], token[:, 0])
    # the torch reference decoding the same way (dsl/kv_cache.py): an independent check
    import torch

    from mocompile.dsl import build_model, load_spec
    from mocompile.dsl.kv_cache import CachedStep

    step = CachedStep(build_model(load_spec(EXAMPLES / "unified_tiny.moe"), seed=0))
    with torch.no_grad():
        logits, *past = step.segments({k: torch.from_numpy(a) for k, a in prompt.items()})
        torch_second = step.segments({"text": torch.from_numpy(token)}, *past)[0].numpy()
    np.testing.assert_allclose(logits.numpy(), first, rtol=0, atol=1e-4 * np.abs(first).max())
    np.testing.assert_allclose(torch_second, second, rtol=0, atol=1e-4 * np.abs(second).max())
    with pytest.raises(ValueError, match="a step needs at least one position"):
        art.step({}, cache)
    code, out, err = _main(capsys, "run", str(art.path), "--generate", "2")
    assert code == 0, err
    assert "prefill of 24 positions (text 8, image 8, audio 8)" in out.splitlines()[-1]


def test_artifact_without_a_step_says_why(tmp_path, capsys):
    """A graph that cannot decode (here: float features, no token input) has no step; asking
    for one names why, in one line from the CLI."""
    import torch

    from mocompile.ir.types import TensorType

    class Proj(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 4)

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return self.proj(input)

    torch.manual_seed(0)
    art = compile(Proj(), out_dir=tmp_path / "proj",
                  input_types={"input": TensorType(("batch", "seq", 8), "float32")})
    reason = "decoding needs a token input, ids [batch, seq], to feed the chosen tokens back"
    assert not art.can_decode and art.manifest["program"]["no_step_reason"] == reason
    with pytest.raises(ArtifactError, match="no cached step function"):
        art.new_cache(1)
    code, _, err = _main(capsys, "run", str(tmp_path / "proj"), "--generate", "2")
    assert code == 1 and "Traceback" not in err
    assert err.strip().endswith(f"({reason})") and err.count("\n") == 1


def _refuses_to_decode(art, reason: str, capsys) -> None:
    """No step function, and every way of decoding says `reason`; the plain forward still runs."""
    from mocompile.cli import main

    assert not art.can_decode and art.manifest["program"]["no_step_reason"] == reason
    assert "decode_verification" not in art.manifest
    ids = np.zeros((1, 3), np.int64)
    why = f"this artifact has no cached step function \\({re.escape(reason)}\\)"
    with pytest.raises(ArtifactError, match=why):
        art.new_cache(1)
    with pytest.raises(ArtifactError, match=why):
        art.step({"text": ids}, None)
    with pytest.raises(ArtifactError, match=why):
        art.generate(ids, 2)
    assert main(["run", str(art.path), "--generate", "2"]) == 1
    assert capsys.readouterr().err.strip().endswith(f"({reason})")
    assert np.isfinite(art.run({"text": ids})["logits"]).all()


def test_non_causal_attention_is_not_decoded(tmp_path, capsys):
    """Bidirectional attention lets an earlier position read later ones: a KV cache would
    change what it computes, so the artifact has no step and says so."""
    import torch

    from mocompile.dsl.modules import AttentionCore
    from mocompile.ir.types import TensorType

    class Bidirectional(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(64, 32)
            self.q, self.k, self.v = (torch.nn.Linear(32, 32, bias=False) for _ in range(3))
            self.core = AttentionCore(2, 2, 16, 10000.0, causal=False)
            self.head = torch.nn.Linear(32, 64, bias=False)

        def forward(self, text: torch.Tensor) -> torch.Tensor:
            x = self.embed(text)
            return self.head(x + self.core(self.q(x), self.k(x), self.v(x)))

    torch.manual_seed(0)
    art = compile(Bidirectional().eval(), out_dir=tmp_path / "bidi", batch=1, seq=3,
                  input_types={"text": TensorType(("batch", "seq"), "int64")})
    assert art.manifest["verification"]["max_rel_error"] <= 1e-4
    _refuses_to_decode(art, "attention at core is not causal", capsys)


SMALL_LM = """
model small_lm {
    hidden = 32  heads = 2  kv_heads = 2  max_seq = 64
    modality text { vocab = 64 }
    moe sparse { experts = 4  top_k = 2  expert_hidden = 32 }
    layers = [sparse]
}
"""


def test_per_tensor_activation_scales_are_not_decoded(tmp_path, capsys):
    """One activation scale over all positions (and samples) of a call: a position's output
    depends on the later ones, so the artifact compiles (its leak recorded) but cannot decode."""
    spec = tmp_path / "small_lm.moe"
    spec.write_text(SMALL_LM)
    art = compile(spec, passes="quantize(w=int8,a=int8,dynamic=tensor,allow_batch_leak=true)",
                  out_dir=tmp_path / "tensor", batch=1, seq=3)
    assert art.manifest["isolation"]["verdict"] == "leaks"
    reason = art.manifest["program"]["no_step_reason"]
    assert re.fullmatch(r"quantize_act at layers\.0\.\S+ takes its scale over all positions", reason), reason
    _refuses_to_decode(art, reason, capsys)


def test_check_isolation_replays_the_cached_step_bit_for_bit(artifacts, capsys):
    """`check-isolation ARTIFACT` replaces one sample and compares the others through the KV
    cache too (prefill, then single tokens): the same logits as through `main`, bit for bit."""
    from mocompile.cli import main

    art = artifacts["latent"]
    inputs = random_inputs(art.signature, 2, 7, seed=5)
    cached = art.run_cached(inputs, 4)["logits"]
    np.testing.assert_allclose(cached, art.run(inputs)["logits"], rtol=0, atol=1e-5 * np.abs(cached).max())
    assert main(["check-isolation", str(art.path), "--seq", "7"]) == 0
    out = capsys.readouterr().out
    assert ("cached step (KV cache: prefill of 4 tokens and any other segments, then one token at a time): "
            "every replacement left the other samples bit for bit identical") in out
    with pytest.raises(ValueError, match=r"the prompt must cover 1\.\.7 positions \(got 0\)"):
        art.run_cached(inputs, 0)


def test_cli_generates_through_the_cache(artifacts, capsys):
    code, out, err = _main(capsys, "run", str(artifacts["mixtral"].path), "--generate", "3", "--seq", "5", "--batch", "2")
    assert code == 0, err
    lines = out.splitlines()
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


# ---- the IR's cached form: the reference for past > 0 ------------------------------------------
def _graph(example: str):
    from mocompile.frontend import lower_source, source_for

    return lower_source(source_for(EXAMPLES / f"{example}.moe", None, None, 0))


@pytest.mark.parametrize("example", ["mixtral_tiny", "deepseek_tiny", "latent_tiny"])
def test_interpreter_on_the_cached_graph_matches_the_full_sequence(example):
    """Prefill (past = 0, zero-size caches), a second chunk and single tokens through the
    cached IR graph give the interpreter's full-sequence logits."""
    from mocompile.ir.interpreter import run
    from mocompile.kv_cache import cached_graph, run_cached_graph

    graph = _graph(example)
    cached = cached_graph(graph)
    inputs = {v.name: v for v in cached.graph.inputs}
    assert [v.name for v in cached.graph.outputs] == ["logits", *(e.present for e in cached.entries)]
    assert all(inputs[e.past].type.shape[:2] == ("batch", "past") for e in cached.entries)
    ids = np.random.default_rng(3).integers(0, 512, (2, 9)).astype(np.int64)
    ref = run(graph, {"text": ids})["logits"]
    outs = run_cached_graph(cached, [{"text": ids[:, b:e]} for b, e in [(0, 4), (4, 7), (7, 8), (8, 9)]])
    assert list(outs[0]) == ["logits"]
    got = np.concatenate([o["logits"] for o in outs], axis=1)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_cached_graph_is_proven_isolated_and_recorded(artifacts):
    """The cache rows are inputs and outputs with the sample on axis 0; the analysis proves a
    step keeps samples apart, and compile records it."""
    from mocompile.isolation import analyze
    from mocompile.kv_cache import cached_graph

    cached = cached_graph(_graph("latent_tiny"))
    report = analyze(cached.graph)
    assert report.verdict == "isolated", report.format()
    assert all(report.inputs[e.past] == report.outputs[e.present] == "axis 0" for e in cached.entries)
    assert all(a.manifest["decode_verification"]["isolation"] == "isolated" for a in artifacts.values())


def test_graphs_that_cannot_be_cached_say_why():
    from mocompile.frontend import lower_source, source_for
    from mocompile.dsl import parse_spec
    from mocompile.kv_cache import cached_graph

    text = re.sub(r"top_k\s*=\s*2", "top_k = 2  capacity_factor = 1.0", (EXAMPLES / "mixtral_tiny.moe").read_text())
    spec = parse_spec(text, "capacity.moe")
    with pytest.raises(ValueError, match="routes each token by the others"):
        cached_graph(lower_source(source_for(spec, None, None, 0)))


def test_attention_reads_longer_keys_as_earlier_positions_only():
    from mocompile.ir.registry import get_op

    attrs = {"heads": 2, "kv_heads": 1, "head_dim": 4, "rope_theta": 10000.0, "causal": True}
    q, k = np.ones((1, 3, 8), np.float32), np.ones((1, 2, 4), np.float32)
    with pytest.raises(ValueError, match="2 key positions cannot cover 3 query positions"):
        get_op("attention").compute([q, k, k], attrs)


def test_tvm_backend_refuses_the_cached_ir_graph_in_one_line():
    from mocompile.backends.tvm_cpu.lower import LoweringError, lower
    from mocompile.kv_cache import cached_graph

    with pytest.raises(LoweringError, match=r"^attention at layers\.0\.attn\.core: keys cover earlier positions"):
        lower(cached_graph(_graph("mixtral_tiny")).graph)


def test_staged_inputs_never_leak_into_earlier_results(tmp_path):
    """The runtime copies each call's inputs into one staging buffer per input: results of an
    earlier call, including an output that is the input itself, keep their values."""
    import torch

    from mocompile.ir.types import TensorType

    class ViewAndProj(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 4)

        def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.proj(input), input

    torch.manual_seed(0)
    art = compile(ViewAndProj(), out_dir=tmp_path / "view",
                  input_types={"input": TensorType(("batch", "seq", 8), "float32")})
    rng = np.random.default_rng(0)
    first_in, second_in = (rng.standard_normal((2, 3, 8)).astype(np.float32) for _ in range(2))
    first = art.run({"input": first_in})
    kept = {k: v.copy() for k, v in first.items()}
    second = art.run({"input": second_in})
    for k in first:
        np.testing.assert_array_equal(first[k], kept[k])
        assert not np.array_equal(first[k], second[k])
    np.testing.assert_array_equal(second[art.signature.outputs[1].name], second_in)
    np.testing.assert_array_equal(first_in, kept[art.signature.outputs[1].name])
