"""16-bit float weights against float32: the same model compiled with --dtype fp32, bf16, fp16.

Run:  python benchmarks/bench_dtype.py [--threads N] [--models M ...] [--out PATH] [--llamacpp with|only|skip]
(all models by default; rewrites the "weight dtype" section of benchmarks/RESULTS.md, and with
the llama.cpp column its "weight-dtype-llamacpp" section: bf16 / fp16 against llama.cpp's BF16 /
F16 GGUF of the same weights, llamacpp_column.py). Never
run by the tests. Same inputs, same process, one thread count for every column (engines.py).
Activations stay float32 in every column; bf16/fp16 store the matmul and embedding weights in
16 bits and widen them in registers, so a single-token step of a model that does not fit in
cache (`benchmarks/specs/moe_medium.moe`, ~490 MB fp32) reads half the bytes, while the tiny
example sits in cache and shows what the widening costs the arithmetic. The section holds only
what the run measured.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mocompile
from engines import THREADS
from harness import PAST, ROUNDS, artifact_rows, copy_bandwidth, cpu_name, start_run, versions
from llamacpp_column import add_option, write_llamacpp_section
from mocompile.dsl import load_spec
from mocompile.dsl.summary import parameter_counts
from results import write_section

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache" / "dtype"
MODELS = {"mixtral_tiny": ROOT / "examples" / "mixtral_tiny.moe", "moe_medium": ROOT / "benchmarks" / "specs" / "moe_medium.moe"}
DTYPES = ("fp32", "bf16", "fp16")
HALVES = DTYPES[1:]
BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2}
CASES = [("decode", 1, 1), ("decode", 8, 1), ("prefill", 1, 64)]  # (kind, batch, tokens)


def bench_model(path: Path) -> tuple[list[dict], dict]:
    spec = load_spec(path)
    arts, info = {}, {}
    for dtype in DTYPES:
        t0 = time.perf_counter()
        arts[dtype] = mocompile.compile(spec, out_dir=CACHE / f"{spec.name}-{dtype}", batch=2, seq=4, dtype=dtype)
        m = arts[dtype].manifest
        info[dtype] = {"compile_s": time.perf_counter() - t0,
                       "weight_mb": (arts[dtype].path / m["program"]["weights"]).stat().st_size / 2**20,
                       "drift": m.get("drift_from_fp32", {}).get("max_rel_error")}
        print(f"compiled {spec.name} {dtype} in {info[dtype]['compile_s']:.1f} s", file=sys.stderr)
    return artifact_rows(spec.name, arts, CASES), info


def header(bandwidth: float, argv: list[str], stamp: str) -> list[str]:
    return ["## Weight dtype (`python benchmarks/bench_dtype.py`)", "",
            f"Run of `python benchmarks/bench_dtype.py{''.join(' ' + a for a in argv)}` ({stamp}): {cpu_name()}, "
            f"{versions()}; {THREADS.header(['artifact'])}. Copy bandwidth {bandwidth / 1e9:.1f} GB/s at the start. "
            f"Medians in ms, the columns of a row timed in {ROUNDS} alternating rounds. Each column is the same spec "
            "and seed compiled with `--dtype` fp32, bf16 or fp16 (matmul and embedding weights stored in that type, "
            "widened to float32 in registers; activations float32). `decode` rows: one token after "
            f"{PAST} positions in the KV cache (the artifact's `step`); `prefill`: a forward over all positions. "
            "Speed-up = fp32 / column (above 1: faster). Roofline (decode b1): the measured step over the time to "
            "read the active weights once at the copy bandwidth measured around the row.", "",
            "| model | case | fp32 | bf16 | fp16 | bf16 speed-up | fp16 speed-up | roofline fp32 / bf16 / fp16 |",
            "|---|---|---|---|---|---|---|---|"]


def main() -> None:
    args, clock, _ = start_run(__doc__.splitlines()[0], list(MODELS), measure=False, add_options=add_option)
    if args.llamacpp != "skip":  # bf16 / fp16 against llama.cpp's BF16 / F16, in a section of its own
        specs = {name: load_spec(MODELS[name]) for name in args.models}
        write_llamacpp_section("weight-dtype-llamacpp", "bench_dtype.py", specs,
                               {d: {"passes": "", "dtype": d} for d in HALVES}, args.threads,
                               CACHE / "llamacpp", args.out, sys.argv[1:], BYTES_PER_PARAM)
        if args.llamacpp == "only":
            return
    bandwidth = copy_bandwidth()
    table = []
    sizes = ["", "| model | dtype | weights MB | compile s | drift from fp32 (rel) |", "|---|---|---|---|---|"]
    for name in args.models:
        rows, info = bench_model(MODELS[name])
        active = parameter_counts(load_spec(MODELS[name]))["active_per_token"]
        for r in rows:
            roof = " / ".join(f"{r[d] / (1e3 * active * BYTES_PER_PARAM[d] / r['bandwidth']):.1f}x" for d in DTYPES) \
                if r["case"].startswith("decode b1") else ""
            table.append(f"| {r['model']} | {r['case']} | " + " | ".join(f"{r[d]:.3f}" for d in DTYPES) + " | "
                         + " | ".join(f"{r['fp32'] / r[d]:.2f}" for d in HALVES) + f" | {roof} |")
        for d, i in info.items():
            drift = format(i["drift"], ".2e") if i["drift"] is not None else "- (is the fp32 model)"
            sizes.append(f"| {name} | {d} | {i['weight_mb']:.1f} | {i['compile_s']:.1f} | {drift} |")
    text = "\n".join(header(bandwidth, sys.argv[1:], clock.stamp()) + table + sizes)
    write_section("weight dtype", text, args.out)
    print(text)


if __name__ == "__main__":
    main()
