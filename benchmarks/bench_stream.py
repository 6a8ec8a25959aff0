"""Real-size compile within this machine's memory: an OLMoE-1B-7B-shaped checkpoint (random
bf16 weights, written here in shards, 14 GB on disk) compiled to int4 with `mocompile compile
--stream`, in a subprocess whose peak resident memory (ru_maxrss), wall time and then decode
speed (tokens/s of a second subprocess loading the artifact) are recorded in RESULTS.md.

    python benchmarks/bench_stream.py                   # the full OLMoE-1B-7B shape, under /tmp
    python benchmarks/bench_stream.py --layers 2 --experts 16 --dir /data   # a smaller run

The checkpoint and the artifact are deleted afterwards (--keep leaves them).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import RunClock, cpu_name, versions
from mocompile.dsl.hf_synthetic import OLMOE_1B_7B, write_olmoe_checkpoint
from results import write_section

PASSES = "quantize(w=int4,calib=1)"
DECODE = """
import json, resource, sys, time
import numpy as np
from mocompile.runtime import load
art = load(sys.argv[1])
ids = np.random.default_rng(0).integers(0, art.token_input.high, (1, 16)).astype(np.int64)
timings = []
art.generate({"text": ids}, int(sys.argv[2]), timings=timings)
steps = timings[1:]
print(json.dumps({"prefill_s": timings[0], "tokens_per_s": len(steps) / sum(steps),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _child_peak() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoint and the artifact go")
    p.add_argument("--layers", type=int, default=OLMOE_1B_7B["num_hidden_layers"])
    p.add_argument("--experts", type=int, default=OLMOE_1B_7B["num_experts"])
    p.add_argument("--tokens", type=int, default=32, help="tokens generated for the decode speed")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    clock = RunClock()
    root = Path(tempfile.mkdtemp(prefix="bench_stream_", dir=a.dir))
    ckpt, out = root / "olmoe", root / "artifact"
    try:
        t0 = time.perf_counter()
        data = write_olmoe_checkpoint(ckpt, num_hidden_layers=a.layers, num_experts=a.experts)
        write_s = time.perf_counter() - t0
        params = data // 2
        print(f"wrote {params / 1e9:.2f}B parameters ({data / 1e9:.1f} GB bf16) in {write_s:.0f} s", flush=True)
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "mocompile.cli", "compile", str(ckpt), "-o", str(out), "--stream",
                              "--passes", PASSES, "--batch", "1", "--seq", "4"], text=True)
        compile_s = time.perf_counter() - t0
        compile_peak = _child_peak()
        if run.returncode != 0:
            sys.exit(f"the compile failed (exit {run.returncode})")
        manifest = json.loads((out / "manifest.json").read_text())
        artifact_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        dec = subprocess.run([sys.executable, "-c", DECODE, str(out), str(a.tokens)], capture_output=True, text=True)
        if dec.returncode != 0:
            sys.exit(f"decoding failed: {dec.stderr.strip().splitlines()[-1:]}")
        decode = json.loads(dec.stdout.strip().splitlines()[-1])
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    layers = manifest.get("layer_verification", {})
    drift = layers.get("drift_from_fp32", [])
    gb = 1 << 30
    shape = "OLMoE-1B-7B" if (a.layers, a.experts) == (OLMOE_1B_7B["num_hidden_layers"], OLMOE_1B_7B["num_experts"]) else f"OLMoE-1B-7B-shaped, {a.layers} layers, " \
        f"{a.experts} experts"
    text = f"""## Real-size streamed compile (bench_stream.py)

{shape} (hidden 2048, top-8 of {a.experts} experts, intermediate 1024, vocab 50304): {params / 1e9:.2f}B
parameters, random bf16 weights written by the benchmark in {data / 1e9:.1f} GB of safetensors shards,
compiled with `mocompile compile CKPT --stream --passes '{PASSES}' --batch 1 --seq 4` on
{cpu_name()}, 24 GiB of memory shared with other work; {versions()}; {clock.stamp()}.

| | figure |
|---|---|
| float32 weights the compile never holds | {params * 4 / gb:.1f} GiB |
| peak resident memory of the compile process (ru_maxrss) | **{compile_peak / gb:.2f} GiB** |
| artifact on disk | {artifact_bytes / gb:.2f} GiB |
| compile time (wall) | {compile_s / 60:.1f} min |
| layer-by-layer verification, worst layer vs the interpreter | {layers.get('max_rel_error', float('nan')):.2g} |
| int4 drift from the float model, per layer (max) | {max((d['rel_error'] for d in drift), default=float('nan')):.3g} |
| decode, 1 sequence, 16-token prompt, {a.tokens} tokens, 2 threads | {decode['tokens_per_s']:.2f} tokens/s |
| peak resident memory while decoding | {decode['peak_rss'] / gb:.2f} GiB |

Writing the checkpoint took {write_s / 60:.1f} min (not part of the compile time).
"""
    print(text)
    full = (a.layers, a.experts) == (OLMOE_1B_7B["num_hidden_layers"], OLMOE_1B_7B["num_experts"])
    write_section("bench_stream" if full else f"bench_stream_{a.layers}x{a.experts}", text)


if __name__ == "__main__":
    main()
