"""GPU benchmark: the CUDA target against PyTorch eager and torch.compile on the same GPU.

    python benchmarks/bench_gpu.py [--arch sm_90] [--specs examples/mixtral_tiny.moe ...]

For each spec (the examples and benchmarks/specs/moe_medium.moe by default) it compiles the model
for `--target "cuda -arch=..."` (the compile itself runs the artifact on the GPU and checks it
against the eager model), checks it once more against the eager model on the GPU, and times:

- prefill: one forward over a prompt of PROMPT positions (batch 1);
- decode: single-token steps with a KV cache after that prompt, at batch 1, 8 and 64;

for the artifact (mocompile.runtime.load: weights and cache on the GPU, no torch), PyTorch eager
on the GPU (the reference model; decode with its concatenating KV cache, dsl/kv_cache.py) and
torch.compile of the same (dynamic shapes; "not measured" with the reason where it fails). Times
are medians of ROUNDS timed calls after a warm-up, each ended by a device synchronisation. It
writes the "gpu" section of benchmarks/RESULTS.md, naming the GPU.

On a machine without an NVIDIA GPU (or without nvcc, or CUDA-enabled torch) it prints why and
exits 0 without writing anything: it is the one command a user with a GPU runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPECS = sorted((ROOT / "examples").glob("*.moe")) + [ROOT / "benchmarks" / "specs" / "moe_medium.moe"]
PROMPT = 32
DECODE_BATCHES = (1, 8, 64)
STEPS = 16
ROUNDS = 10


def why_not_here(arch: str) -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    from mocompile.backends.tvm_gpu.nvcc import find_nvcc
    from mocompile.gpu_devices import cuda_device_problem

    problem = cuda_device_problem(arch)
    if problem:
        return problem
    if find_nvcc() is None:
        return "nvcc (the CUDA toolkit) is not installed"
    import torch

    if not torch.cuda.is_available():
        return "this torch build has no CUDA (the eager and torch.compile columns need it)"
    return None


def median_ms(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def check_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    err = np.abs(got - want).max()
    if not err <= 1e-4 * np.abs(want).max():
        raise RuntimeError(f"{what}: the CUDA artifact disagrees with eager on the GPU (max abs difference {err:.3g})")


def bench_spec(spec: Path, arch: str, out: Path) -> list[str]:
    import torch

    import mocompile
    from mocompile.dsl import build_model, load_spec
    from mocompile.dsl.kv_cache import CachedStep
    from mocompile.runtime import load, random_inputs

    art_dir = out / spec.stem
    mocompile.compile(spec, target=f"cuda -arch={arch}", out_dir=art_dir, batch=2, seq=8)
    art = load(art_dir)
    model = build_model(load_spec(spec), seed=0).cuda().eval()
    sync = torch.cuda.synchronize
    name = art.token_input.name
    rows = []
    with torch.no_grad():
        x = random_inputs(art.signature, 1, PROMPT, seed=0)
        xt = {k: torch.from_numpy(v).cuda() for k, v in x.items()}
        want = model(**xt).cpu().numpy()
        check_close(art.run(x)[art.signature.outputs[0].name], want, spec.stem)
        eager = median_ms(lambda: model(**xt), sync)
        try:
            compiled = torch.compile(model, dynamic=True)
            check_close(compiled(**xt).cpu().numpy(), want, f"{spec.stem} torch.compile")
            compiled_ms = f"{median_ms(lambda: compiled(**xt), sync):.3f}"
        except Exception as e:  # a failed torch.compile is a result of its own
            compiled_ms = f"not measured ({type(e).__name__})"
        ours = median_ms(lambda: art.run(x), sync)
        rows.append(f"| {spec.stem} | prefill {PROMPT} | 1 | {ours:.3f} | {eager:.3f} | {compiled_ms} |")
        step = CachedStep(model)
        compiled_step = None
        try:
            compiled_step = torch.compile(step, dynamic=True)
        except Exception:
            pass
        for batch in DECODE_BATCHES:
            x = random_inputs(art.signature, batch, PROMPT, seed=1)
            ids = torch.from_numpy(x[name]).cuda()
            token = np.zeros((batch, 1), x[name].dtype)
            cache = art.new_cache(batch, PROMPT + STEPS + ROUNDS + 2)
            art.step({name: x[name]}, cache)
            ours = median_ms(lambda: art.step({name: token}, cache), sync)
            past = step(ids)[1:]
            token_t = torch.from_numpy(token).cuda()
            eager = median_ms(lambda: step(token_t, *past), sync)
            compiled_ms = "not measured (torch.compile failed)"
            if compiled_step is not None:
                try:
                    compiled_ms = f"{median_ms(lambda: compiled_step(token_t, *past), sync):.3f}"
                except Exception as e:
                    compiled_ms = f"not measured ({type(e).__name__})"
            rows.append(f"| {spec.stem} | decode step | {batch} | {ours:.3f} | {eager:.3f} | {compiled_ms} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90", choices=("sm_80", "sm_89", "sm_90"))
    ap.add_argument("--specs", nargs="*", type=Path, default=DEFAULT_SPECS)
    a = ap.parse_args()
    why = why_not_here(a.arch)
    if why:
        print(f"bench_gpu: skipped, nothing measured or written: {why}. Run it on a machine with an NVIDIA "
              f"{a.arch} GPU, its driver, nvcc and a CUDA build of torch.")
        return 0
    import torch

    from results import write_section

    gpu = torch.cuda.get_device_name(0)
    rows = ["| model | call | batch | mocompile cuda (ms) | torch eager (ms) | torch.compile (ms) |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for spec in a.specs:
            rows += bench_spec(spec, a.arch, Path(tmp))
            print(rows[-1])
    text = "\n".join([f"## GPU: the cuda target on {gpu} ({a.arch})", "",
                      f"`python benchmarks/bench_gpu.py --arch {a.arch}`; medians of {ROUNDS} calls after a "
                      "warm-up, each ended by a device synchronisation; decode steps after a "
                      f"{PROMPT}-position prompt, with a KV cache on every side.", "", *rows])
    write_section("gpu", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
