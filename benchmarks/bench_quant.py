"""Quantized artifacts side by side: fp32 eager vs fp32 / int8 / int4 / W8A8 / W4A8 artifacts.

Run:  python benchmarks/bench_quant.py [--threads N] [--models M ...] [--out PATH]
(all models by default; rewrites the "quantization" section of benchmarks/RESULTS.md). Never
run by the tests. Same inputs, same process, one thread count for every column (engines.py).
The tiny examples sit in cache (a step is bound by kernel arithmetic, not bytes);
`benchmarks/specs/moe_medium.moe` (~490 MB fp32) does not, so its single-token step is bound
by weight bytes read: the case the quantization targets are about. The section holds only
what the run measured and verdicts computed from it; analysis and history are in
benchmarks/NOTES.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import mocompile
from engines import THREADS
from harness import PAST, ROUNDS, artifact_columns, copy_bandwidth, cpu_name, fit_positions, rows_text, start_run, \
    time_columns, versions
from llamacpp_column import add_option, write_llamacpp_section
from mocompile.dsl import build_model, load_spec
from mocompile.dsl.kv_cache import CachedStep
from mocompile.dsl.summary import parameter_counts
from mocompile.progress import Bar
from results import write_section

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache" / "quant"
MODELS = {"mixtral_tiny": ROOT / "examples" / "mixtral_tiny.moe", "deepseek_tiny": ROOT / "examples" / "deepseek_tiny.moe",
          "moe_medium": ROOT / "benchmarks" / "specs" / "moe_medium.moe"}
SCHEMES = {"fp32": "", "int8": "quantize(w=int8)", "int4": "quantize(w=int4,group=32)",
           "w8a8": "quantize(w=int8,a=int8,dynamic=token)", "w4a8": "quantize(w=int4,group=32,a=int8,dynamic=token)"}
QUANTIZED = [s for s in SCHEMES if s != "fp32"]
# weight bytes per parameter: fp32 4; int8 1 (+ a float32 scale per row); int4 0.5 + a float16 scale per 32
BYTES_PER_PARAM = {"fp32": 4, "int8": 1.0, "int4": 0.5 + 2 / 32, "w8a8": 1.0, "w4a8": 0.5 + 2 / 32}
CASES = [("decode", 1, 1), ("decode", 8, 1), ("prefill", 1, 64)]  # (kind, batch, tokens)
TARGET_EAGER, TARGET_FP32 = 3.0, 1.8  # single-token speed-up targets: vs eager fp32, vs the fp32 artifact
ACCURACY_CALIB = 64  # random-token sequences of the accuracy table's pass reports


def bench_model(path: Path) -> tuple[list[dict], dict]:
    spec = load_spec(path)
    arts, info = {}, {}
    bar = Bar(f"compiling {spec.name}", len(SCHEMES), unit="schemes", delay=0)
    for scheme, passes in SCHEMES.items():
        bar.update(0, scheme)
        t0 = time.perf_counter()
        arts[scheme] = mocompile.compile(spec, passes=passes, out_dir=CACHE / f"{spec.name}-{scheme}", batch=2, seq=4)
        compile_s = time.perf_counter() - t0
        m = arts[scheme].manifest
        weights = (arts[scheme].path / m["program"]["weights"]).stat().st_size
        drift = m.get("drift_from_fp32", {})
        checked = [c for c in drift.get("checks", []) if c.get("output") == "logits" and "top1_agreement" in c]
        verified = sum(c["batch"] * c["seq"] for c in checked)  # positions: one next-token choice each
        accuracy = next((p["accuracy"] for p in m["passes"] if p["pass"].startswith("quantize")), {})
        bar.print(f"compiled {spec.name} {scheme} in {compile_s:.1f} s")
        bar.update(1)
        info[scheme] = {"compile_s": compile_s, "weight_mb": weights / 2**20,
                        "drift": drift.get("max_rel_error"),
                        "top1_verify": sum(c["top1_agreement"] * c["batch"] * c["seq"] for c in checked) / verified
                        if verified else None, "verify_positions": verified,
                        "top1_calib": accuracy.get("top1_agreement"), "calib_positions": accuracy.get("positions"),
                        "kl": accuracy.get("kl_mean")}
    bar.close()
    model = build_model(spec, seed=0)
    rows = []
    bar = Bar(f"benchmarking {spec.name}", len(CASES), unit="cases", delay=0)
    for kind, batch, tokens in CASES:
        case, makers, inputs = artifact_columns(arts, kind, batch, fit_positions(arts["fp32"], tokens))
        row = {"case": case}
        with torch.no_grad():
            if kind == "decode":  # the same token after the same cached positions, on every side
                step = CachedStep(model)
                _, past = step.prefill(torch.from_numpy(inputs["text"][:, :PAST]))
                token = torch.from_numpy(inputs["text"][:, PAST:])
                time_columns(row, {"eager": lambda: (lambda: step(token, *past)), **makers})
            else:
                torch_in = {k: torch.from_numpy(v) for k, v in inputs.items()}
                time_columns(row, {"eager": lambda: (lambda: model(**torch_in)), **makers})
        rows.append({"model": spec.name, **row})
        bar.print(f"{spec.name} {row['case']}: " + ", ".join(f"{c} {row[c]:.3f}" for c in ["eager", *SCHEMES]))
        bar.update(1)
    bar.close()
    return rows, info


def accuracy_rows() -> list[str]:
    """Top-1 agreement, KL and routing kept by each weight scheme on every example, with its
    random init and with its trained weights (examples/weights/), from the pass report on
    ACCURACY_CALIB random-token sequences; every position of every segment counts."""
    from mocompile.compiler import lower_source, source_for
    from mocompile.pass_manager import PassContext, PassManager

    lines = ["", f"Accuracy against fp32 (the quantize pass's report with `calib={ACCURACY_CALIB}` random-token "
             "sequences; every position of every segment):", "",
             "| model | weights | scheme | positions | top-1 agreement | median fp32 top-1 margin | KL | routing kept |",
             "|---|---|---|---|---|---|---|---|"]
    trained_top1: dict[str, list[float]] = {}
    for spec_path in sorted((ROOT / "examples").glob("*.moe")):
        trained = ROOT / "examples" / "weights" / f"{spec_path.stem}.safetensors"
        for label, weights in (("random init", None), ("trained", trained)):
            graph = lower_source(source_for(load_spec(spec_path), None, weights, 0))
            for scheme in QUANTIZED:
                _, reports = PassManager(SCHEMES[scheme].replace(")", f",calib={ACCURACY_CALIB})")).run(graph, PassContext())
                a = reports[0]["accuracy"]
                print(f"accuracy {spec_path.stem} {label} {scheme}: top-1 {a['top1_agreement']:.1%}", file=sys.stderr)
                if label == "trained":
                    trained_top1.setdefault(scheme, []).append(a["top1_agreement"])
                lines.append(f"| {spec_path.stem} | {label} | {scheme} | {a['positions']} | {a['top1_agreement']:.1%} "
                             f"| {a['median_top1_margin']:.2f} | {a['kl_mean']:.1e} | {a['routing_agreement']:.1%} |")
    lines += ["", "Top-1 agreement on the trained weights in this table, lowest-highest over the examples: "
              + ", ".join(f"{s} {span(v, '.1%')}" for s, v in trained_top1.items()) + "."]
    return lines


def span(values: list[float], fmt: str) -> str:
    """'lo-hi' of values (one value alone if they are all equal)."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}-{hi}"


def speed_lines(rows: list[dict]) -> list[str]:
    """The speed-ups of the table summarised: per scheme their range over the decode rows and
    the prefill rows, and each decode row's verdict against the single-token targets."""
    decode = [r for r in rows if r["case"].startswith("decode")]
    prefill = [r for r in rows if r["case"].startswith("prefill")]
    lines = ["", "Speed-ups in this run (lowest-highest over the rows named; fp32 eager / scheme and fp32 artifact / "
             "scheme):"]
    for label, group in (("decode", decode), ("prefill", prefill)):
        if group:
            lines.append(f"- {label} ({rows_text(len(group))}): " + "; ".join(
                f"{q} {span([r['eager'] / r[q] for r in group], '.2f')}x vs eager, "
                f"{span([r['fp32'] / r[q] for r in group], '.2f')}x vs fp32 artifact" for q in QUANTIZED))
    met = {q: sum(1 for r in decode if r["eager"] / r[q] >= TARGET_EAGER and r["fp32"] / r[q] >= TARGET_FP32)
           for q in QUANTIZED}
    lines += ["", f"Single-token targets (decode rows; >= {TARGET_EAGER:g}x eager fp32 and >= {TARGET_FP32:g}x the fp32 "
              "artifact): " + ", ".join(f"{q} met on {n} of {len(decode)}" for q, n in met.items()) + ":"]
    for r in decode:
        def verdict(q: str) -> str:
            e, a = r["eager"] / r[q], r["fp32"] / r[q]
            return f"{q} {e:.2f}x / {a:.2f}x ({'met' if e >= TARGET_EAGER and a >= TARGET_FP32 else 'missed'})"
        lines.append(f"- {r['model']} {r['case']}: " + ", ".join(verdict(q) for q in QUANTIZED))
    return lines


def header(bandwidth: float, argv: list[str], stamp: str) -> list[str]:
    from mocompile.backends.tvm_cpu.target import host_has_vnni

    kernels = ("integer kernels (this CPU has AVX-512 VNNI)" if host_has_vnni() else
               "float kernels (this CPU has no AVX-512 VNNI)")
    return ["## Quantization (`python benchmarks/bench_quant.py`)", "",
            f"Run of `python benchmarks/bench_quant.py{''.join(' ' + a for a in argv)}` ({stamp}): {cpu_name()}, "
            f"{versions()}; {THREADS.header(['artifact', 'eager'])}. Copy bandwidth {bandwidth / 1e9:.1f} GB/s at the "
            "start (each row's roofline uses the bandwidth measured around its timing). Medians in ms, the columns of a "
            f"row timed in {ROUNDS} alternating rounds. Speed-ups are fp32 eager / column and fp32 artifact / column "
            f"(above 1: faster). `decode` rows: one token after {PAST} positions in a KV cache (artifacts: their `step`; "
            "eager: the reference model with a Hugging Face style cache); `prefill`: a forward over all positions. "
            "Schemes (their `passes`): " + ", ".join(f"{q} `{SCHEMES[q]}`" for q in QUANTIZED)
            + f"; their low-bit matmuls run in {kernels}. Accuracy: drift = the artifact against the fp32 eager model "
            "at compile time (relative max error; top-1 over the positions it checked); calib = the quantize pass's "
            "report on its calibration inputs.", "",
            "| model | case | eager fp32 | artifact fp32 | " + " | ".join(QUANTIZED) + " | "
            + " | ".join(f"{q} vs eager | {q} vs fp32 art." for q in QUANTIZED) + " | roofline " + " / ".join(SCHEMES) + " |",
            "|---|---|" + "---|" * (2 + 3 * len(QUANTIZED) + 1)]


def main() -> None:
    args, clock, _ = start_run(__doc__.splitlines()[0], list(MODELS), measure=False, add_options=add_option)
    if args.llamacpp != "skip":  # fp32 / int8 / int4 g32 / W4A8 against llama.cpp's F32 / Q8_0 / Q4_0 / Q4_0
        specs = {name: load_spec(MODELS[name]) for name in args.models}
        schemes = {s: {"passes": SCHEMES[s], "dtype": "fp32"} for s in ("fp32", "int8", "int4", "w4a8")}
        write_llamacpp_section("quantization-llamacpp", "bench_quant.py", specs, schemes, args.threads,
                               CACHE.parent / "llamacpp", args.out, sys.argv[1:],
                               BYTES_PER_PARAM)
        if args.llamacpp == "only":
            return
    bandwidth = copy_bandwidth()
    table = []
    sizes = ["", "| model | scheme | weights MB | compile s | drift (rel) | top-1 (verify) | top-1 (calib) | KL (calib) |",
             "|---|---|---|---|---|---|---|---|"]
    all_rows = []
    for name in args.models:
        rows, info = bench_model(MODELS[name])
        all_rows += rows
        active = parameter_counts(load_spec(MODELS[name]))["active_per_token"]
        for r in rows:
            roof = {s: 1e3 * active * b / r["bandwidth"] for s, b in BYTES_PER_PARAM.items()}  # bandwidth around the row
            roof_cell = " / ".join(f"{r[s] / roof[s]:.1f}x" for s in roof) if r["case"].startswith("decode b1") else ""
            table.append(f"| {r['model']} | {r['case']} | {r['eager']:.3f} | {r['fp32']:.3f} | "
                         + " | ".join(f"{r[q]:.3f}" for q in QUANTIZED) + " | "
                         + " | ".join(f"{r['eager'] / r[q]:.2f} | {r['fp32'] / r[q]:.2f}" for q in QUANTIZED)
                         + f" | {roof_cell} |")
        for s, i in info.items():
            fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
            verify = f"{fmt(i['top1_verify'], '.1%')} of {i['verify_positions']}" if i["top1_verify"] is not None else "-"
            calib = f"{fmt(i['top1_calib'], '.1%')} of {i['calib_positions']}" if i["top1_calib"] is not None else "-"
            sizes.append(f"| {rows[0]['model']} | {s} | {i['weight_mb']:.1f} | {i['compile_s']:.1f} "
                         f"| {fmt(i['drift'], '.2e')} | {verify} | {calib} | {fmt(i['kl'], '.2e')} |")
    lines = table + sizes + accuracy_rows() + speed_lines(all_rows)
    lines += ["", "Notes on this and earlier runs, written by hand and dated: `benchmarks/NOTES.md`."]
    text = "\n".join(header(bandwidth, sys.argv[1:], clock.stamp()) + lines)
    write_section("quantization", text, args.out)
    print(text)


if __name__ == "__main__":
    main()
