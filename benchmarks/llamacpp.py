"""llama.cpp as a benchmark column: built from source, fed the very weights our artifacts compile.

What it does, each step cached under ~/.cache/mocompile-bench (MOCOMPILE_BENCH_CACHE moves it):
- build: the llama.cpp sources vendored in PyPI's `llama-cpp-python` sdist (fetched with
  `pip download --no-binary :all:`), configured by cmake (Release, GGML_NATIVE: this CPU's
  vector extensions, as a user building it here would get) and built for the `llama-bench`
  and `llama-quantize` targets only. A failed step returns a one-line reason (with the log's
  path) and the benchmark skips the column instead of stopping.
- convert: a Mixtral-style spec's reference weights are written as a Hugging Face Mixtral
  checkpoint (dsl/hf_export.py, the importer's weight plan read backwards), a small
  sentencepiece tokenizer is trained on the spot (the converter requires one; it pads the
  vocabulary to the model's), and llama.cpp's own `convert_hf_to_gguf.py` (with the vendored
  gguf-py) writes an F32 GGUF; `llama-quantize` makes Q8_0, Q4_0, BF16 and F16 from it.
- run: `llama-bench -o json` at a given thread count, one case per process: pp64 or pp512
  from an empty cache, tg32 from an empty cache or after 512 or 2048 cached positions (`-d`,
  which this version has; the cached state is restored, not recomputed, between
  repetitions), its per-repetition samples returned, under the OpenMP wait policies asked
  for (WAIT_POLICIES; by default both), keeping llama.cpp's faster one.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python release whose vendored llama.cpp is built
CACHE = Path(os.environ.get("MOCOMPILE_BENCH_CACHE", Path.home() / ".cache" / "mocompile-bench"))
TARGETS = ("llama-bench", "llama-quantize")
# our scheme -> llama.cpp's type of the same bits per weight (the benchmark's pairing)
# (llama.cpp's Q8_0 / Q4_0 dot products round the activations to int8 blocks of 32, so W8A8 / W4A8
# are the same arithmetic; int8 / int4 keep float activations)
# (and its BF16 / F16 dot products round the activations to that type; our bf16 / fp16 widen the
# weights and keep float32 activations)
PAIRS = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0", "w8a8": "Q8_0", "w4a8": "Q4_0", "bf16": "BF16", "fp16": "F16"}
PROMPTS = (64, 512)  # ppN: one N-token prompt from an empty cache
GEN, DEPTHS = 32, (0, 512, 2048)  # tgN after each count of cached positions
# llama.cpp runs under both OpenMP wait policies and each case keeps its faster one: its
# default (workers spin while idle) is what a user gets and is fastest on a quiet machine
# (moe_medium Q4_0 tg32: ~850 tokens/s against ~300 sleeping); on a loaded machine a spinning
# worker waits out whole time slices of the one it waits for (measured here: pp512 20-60x
# slower), and sleeping workers are llama.cpp's best (mocompile/threads.py bounds TVM's spin to ~1 ms).
WAIT_POLICIES = {"default": None, "passive": "PASSIVE"}


class Unavailable(Exception):
    """A step of the column failed; str() is the one line the benchmark prints before skipping it."""


@dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp: its source tree (converter, gguf-py) and its binaries."""

    source: Path
    bin: Path
    commit: str

    def tool(self, name: str) -> Path:
        return self.bin / name


def _run(cmd: list[str], log: Path, what: str, env: dict | None = None, cwd: Path | None = None) -> None:
    """Run `cmd`, its output appended to `log`; a failure raises Unavailable naming `what` and the log."""
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if done.returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise Unavailable(f"{what} failed (exit {done.returncode}; {tail[0][:160]}; log {log})")


def _sources(cache: Path, log: Path) -> Path:
    """The llama.cpp tree vendored in the llama-cpp-python sdist, downloaded and unpacked once."""
    tree = cache / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    sdist = cache / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", str(cache),
              f"llama-cpp-python=={VERSION}"], log, "downloading the llama-cpp-python sdist")
    try:
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise Unavailable(f"cannot unpack {sdist} ({e})") from None
    if not (tree / "CMakeLists.txt").exists():
        raise Unavailable(f"{sdist} holds no vendor/llama.cpp")
    return tree


def build(cache: Path | None = None, jobs: int = 2) -> LlamaCpp:
    """llama.cpp's llama-bench and llama-quantize, built once per cache (default CACHE; a
    finished build is reused as it is). Raises Unavailable with the reason when any step fails."""
    cache = cache or CACHE
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "build.log"
    source = _sources(cache, log)
    out = cache / f"llama.cpp-{VERSION}-build"
    binaries = out / "bin"
    if not all((binaries / t).exists() for t in TARGETS):
        if shutil.which("cmake") is None:
            raise Unavailable("cmake is not installed")
        _run(["cmake", "-S", str(source), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
              "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TOOLS=ON",
              "-DLLAMA_BUILD_COMMON=ON"], log, "configuring llama.cpp")
        _run(["cmake", "--build", str(out), "--target", *TARGETS, "-j", str(jobs)], log, "building llama.cpp")
    commit = next((line.split('"')[1] for line in (out / "common" / "build-info.cpp").read_text().splitlines()
                   if "LLAMA_COMMIT" in line), "?") if (out / "common" / "build-info.cpp").exists() else "?"
    return LlamaCpp(source, binaries, commit)


# ---- the model, as llama.cpp reads it --------------------------------------------------------
def train_tokenizer(out: Path, vocab: int) -> Path:
    """A sentencepiece model of at most `vocab` pieces trained on generated text: the converter
    needs a tokenizer and pads its vocabulary to the model's; llama-bench feeds token ids, so
    what the pieces spell does not matter."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(400)]
    text = out / "tokenizer-corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)) + "\n")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out / "tokenizer"), model_type="bpe",
                                   vocab_size=min(vocab, 256), hard_vocab_limit=False, minloglevel=2,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    text.unlink()
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    return out / "tokenizer.model"


def ggufs(tools: LlamaCpp, spec, model, name: str, types: list[str], cache: Path | None = None) -> dict[str, Path]:
    """GGUF files of `model` (the reference model of `spec`) in each of `types` (F32, Q8_0,
    Q4_0, BF16, F16), converted once per name and weights: the checkpoint's digest names the files."""
    import hashlib

    from mocompile.dsl.hf_export import export_mixtral

    work = (cache or CACHE) / "models" / name
    hf = export_mixtral(spec, model, work / "hf")
    digest = hashlib.sha256((hf / "model.safetensors").read_bytes() + (hf / "config.json").read_bytes()).hexdigest()[:12]
    if not (hf / "tokenizer.model").exists():
        train_tokenizer(hf, spec.vocab)
    log = work / "convert.log"
    f32 = work / f"{name}-{digest}-F32.gguf"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tools.source / "gguf-py"), os.environ.get("PYTHONPATH", "")]),
           "NO_LOCAL_GGUF": ""}
    if not f32.exists():
        _run([sys.executable, str(tools.source / "convert_hf_to_gguf.py"), str(hf), "--outfile", str(f32),
              "--outtype", "f32"], log, f"converting {name} to GGUF", env=env)
    out = {}
    for t in types:
        path = work / f"{name}-{digest}-{t}.gguf"
        if not path.exists():
            _run([str(tools.tool("llama-quantize")), str(f32), str(path), t], log, f"quantizing {name} to {t}")
        out[t] = path
    return out


# ---- the timings ------------------------------------------------------------------------------
def cases() -> list[tuple[str, int, int, int]]:
    """(label, prompt tokens, generated tokens, cached positions) of every row, prompts first."""
    return [(f"pp{p}", p, 0, 0) for p in PROMPTS] + [(f"tg{GEN} @ {d}", 0, GEN, d) for d in DEPTHS]


def bench(tools: LlamaCpp, gguf: Path, threads: int, label: str, reps: int = 3,
          policies: tuple[str, ...] = tuple(WAIT_POLICIES)) -> tuple[list[float], str]:
    """ms of each repetition of case `label` (a whole prompt, or all GEN tokens) on `gguf` at
    `threads` threads, and the wait policy they ran under: one llama-bench process per policy
    of `policies` (names of WAIT_POLICIES), keeping the one with the lower median (llama.cpp's
    best). One case per process, so that the caller can time its own side of the same case
    right after it."""
    if not policies:
        raise ValueError("llama-bench needs at least one wait policy")
    best: tuple[list[float], str] | None = None
    for name in policies:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if WAIT_POLICIES[name] is not None:
            env["OMP_WAIT_POLICY"] = WAIT_POLICIES[name]
        ms = _bench_once(tools, gguf, threads, reps, label, env)
        if best is None or statistics.median(ms) < statistics.median(best[0]):
            best = (ms, name)
    return best


def _bench_once(tools: LlamaCpp, gguf: Path, threads: int, reps: int, label: str, env: dict[str, str]) -> list[float]:
    case = next((c for c in cases() if c[0] == label), None)
    if case is None:
        raise ValueError(f"no llama-bench case {label!r} (cases: {', '.join(c[0] for c in cases())})")
    _, prompt, gen, depth = case
    cmd = [str(tools.tool("llama-bench")), "-m", str(gguf), "-t", str(threads), "-r", str(reps), "-o", "json",
           "-p", str(prompt), "-n", str(gen), "-d", str(depth)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise Unavailable(f"llama-bench on {gguf.name} failed (exit {done.returncode}): "
                          f"{(done.stderr.strip().splitlines() or [''])[-1][:200]}")
    try:
        tests = json.loads(done.stdout)
    except json.JSONDecodeError as e:
        raise Unavailable(f"llama-bench on {gguf.name} printed no JSON ({e})") from None
    if len(tests) != 1:
        raise Unavailable(f"llama-bench on {gguf.name} ran {len(tests)} tests for {label}, not 1")
    return [ns / 1e6 for ns in tests[0]["samples_ns"]]


def tokens(label: str) -> int:
    """Tokens one repetition of a case processes (ppN: N; tgN @ d: N)."""
    return int(label.split()[0][2:])
