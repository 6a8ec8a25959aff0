"""Quantized artifacts side by side: fp32 eager vs fp32 / int8 / int4 / W8A8 / W4A8 artifacts.

Run:  python benchmarks/bench_quant.py   (several minutes; rewrites the "quantization"
section of benchmarks/RESULTS.md). Never run by the tests. Same inputs, same process, 2
threads for every column. The tiny examples sit in cache (a step is bound by kernel
arithmetic, not bytes); `benchmarks/specs/moe_medium.moe` (~490 MB fp32) does not, so its single-token
step is bound by weight bytes read: the case the issue's targets are about.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

from mocompile.threads import configure_tvm_threads

configure_tvm_threads()  # before anything starts TVM's thread pool

import torch  # noqa: E402

import mocompile  # noqa: E402
from mocompile.dsl import build_model, load_spec  # noqa: E402
from mocompile.dsl.kv_cache import CachedStep  # noqa: E402
from mocompile.dsl.summary import parameter_counts  # noqa: E402
from mocompile.runtime import random_inputs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import PAST, _cpu_name, artifact_step, copy_bandwidth, time_columns  # noqa: E402
from results import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache" / "quant"
MODELS = [ROOT / "examples" / "mixtral_tiny.moe", ROOT / "examples" / "deepseek_tiny.moe",
          ROOT / "benchmarks" / "specs" / "moe_medium.moe"]
SCHEMES = {"fp32": "", "int8": "quantize(w=int8)", "int4": "quantize(w=int4,group=32)",
           "w8a8": "quantize(w=int8,a=int8,dynamic=token)", "w4a8": "quantize(w=int4,group=32,a=int8,dynamic=token)"}
QUANTIZED = [s for s in SCHEMES if s != "fp32"]
# weight bytes per parameter: fp32 4; int8 1 (+ a scale per row); int4 0.5 + a 4-byte scale per 32
BYTES_PER_PARAM = {"fp32": 4, "int8": 1.0, "int4": 0.5 + 4 / 32, "w8a8": 1.0, "w4a8": 0.5 + 4 / 32}
CASES = [("decode", 1, 1), ("decode", 8, 1), ("prefill", 1, 64)]  # (kind, batch, tokens)


def bench_model(path: Path) -> tuple[list[dict], dict]:
    spec = load_spec(path)
    arts, info = {}, {}
    for scheme, passes in SCHEMES.items():
        t0 = time.perf_counter()
        arts[scheme] = mocompile.compile(spec, passes=passes, out_dir=CACHE / f"{spec.name}-{scheme}", batch=2, seq=4)
        m = arts[scheme].manifest
        weights = (arts[scheme].path / m["program"]["weights"]).stat().st_size
        drift = m.get("drift_from_fp32", {})
        top1 = [c["top1_agreement"] for c in drift.get("checks", []) if "top1_agreement" in c]
        accuracy = next((p["accuracy"] for p in m["passes"] if p["pass"].startswith("quantize")), {})
        info[scheme] = {"compile_s": time.perf_counter() - t0, "weight_mb": weights / 2**20,
                        "drift": drift.get("max_rel_error"), "top1_verify": min(top1) if top1 else None,
                        "top1_calib": accuracy.get("top1_agreement"), "kl": accuracy.get("kl_mean")}
    model = build_model(spec, seed=0)
    rows = []
    for kind, batch, tokens in CASES:
        if kind == "decode":  # one token after PAST cached positions, on every side
            ids = random_inputs(arts["fp32"].signature, batch, PAST + 1, seed=1)["text"]
            step = CachedStep(model)
            with torch.no_grad():
                _, past = step.prefill(torch.from_numpy(ids[:, :PAST]))
                token = torch.from_numpy(ids[:, PAST:])
                row = {"case": f"decode b{batch} x1 (+{PAST} cached)"}
                time_columns(row, {"eager": lambda: (lambda: step(token, *past)), **{
                    s: (lambda a=a: artifact_step(a, {"text": ids[:, :PAST]}, {"text": ids[:, PAST:]}))
                    for s, a in arts.items()}})
        else:
            inputs = random_inputs(arts["fp32"].signature, batch, tokens, seed=1)
            torch_in = {k: torch.from_numpy(v) for k, v in inputs.items()}
            with torch.no_grad():
                row = {"case": f"{kind} b{batch} x{tokens}"}
                time_columns(row, {"eager": lambda: (lambda: model(**torch_in)), **{
                    s: (lambda a=a: (lambda: a.run(inputs))) for s, a in arts.items()}})
        rows.append({"model": spec.name, **row})
    return rows, info


def accuracy_rows() -> list[str]:
    """Top-1 agreement, KL and routing kept by each weight scheme on every example, with its
    random init and with its trained weights (examples/weights/), from the pass report on 64
    random-token sequences of 16 positions (a multimodal example: 16 per segment)."""
    from mocompile.compiler import lower_source, source_for
    from mocompile.pass_manager import PassContext, PassManager

    lines = ["", "Accuracy against fp32 on 64 random-token sequences (pass report; every position of every segment):", "",
             "| model | weights | scheme | top-1 agreement | median fp32 top-1 margin | KL | routing kept |",
             "|---|---|---|---|---|---|---|"]
    for spec_path in sorted((ROOT / "examples").glob("*.moe")):
        trained = ROOT / "examples" / "weights" / f"{spec_path.stem}.safetensors"
        for label, weights in (("random init", None), ("trained", trained)):
            graph = lower_source(source_for(load_spec(spec_path), None, weights, 0))
            for scheme in QUANTIZED:
                _, reports = PassManager(SCHEMES[scheme].replace(")", ",calib=64)")).run(graph, PassContext())
                a = reports[0]["accuracy"]
                lines.append(f"| {spec_path.stem} | {label} | {scheme} | {a['top1_agreement']:.1%} "
                             f"| {a['median_top1_margin']:.2f} | {a['kl_mean']:.1e} | {a['routing_agreement']:.1%} |")
    return lines


QUANT_NOTE = """
### Against the quantization issue's targets

- **Speed.** Where a step is bound by weight bytes (moe_medium: 490 MB fp32, single token), int8 and
  int4 make it 2.0-3.3x faster than the fp32 artifact and 4-12x faster than eager, over the runs of
  2026-11-22 and 2026-12-01; int4 at batch 8, whose 8 experts are all active and each serve 2-3 rows,
  was at 1.6-1.9x until the matmuls reduced such rows in pairs (one unpack per pair), 2.0x since.
  Register tiles: fp32 and int8 panels take tiles sized to the vector ISA (half the register file; on
  the AVX2 host that made int8 prefill 1.0-1.4x the fp32 artifact's speed, from 0.9-1.3x); int4 panels
  keep the largest tile, since unpacking a panel row once for 3-4 rows beats avoiding spills (with
  AVX2-sized tiles its batch-8 step fell to 1.46x the fp32 artifact and its prefill slowed 1.2-1.5x).
  The tiny examples' weights (1-7 MB) sit in cache, so reading fewer bytes helps them less. Until the
  decode driver (models section) their steps were mostly fixed costs: a `perf` profile of 180,000
  mixtral_tiny fp32 steps (136 us each in that loop) put 42% of the time in the kernels and the rest in
  the Relax VM's interpreter and builtins (26%), Python (17%), malloc/free (7%) and glue (6%), so int8
  gained only 1.1-1.35x. With the driver the steps are mostly kernel arithmetic: on the AVX2 host int8
  was 1.2-1.45x the fp32 artifact on the tiny rows (mixtral_tiny batch 1: 1.84x in one run, 1.35x in
  the next) and int4 0.65-0.93x. On the AVX-512 host of the table above (2026-12-01, after 23:00 UTC),
  int8 is 1.22-1.75x and int4 1.10-1.49x there, moe_medium int8 2.20-2.25x and int4 2.33-2.38x.
  Why the tiny rows stay under 1.8x: with the weights in cache a step is bound by arithmetic, not bytes,
  and weight-only int8/int4 does the same float arithmetic as fp32 plus the conversion of each code
  (int4: shift, mask, convert, group scale). The matmuls are also only part of a step: in the VM
  profile of the models section, mixtral_tiny's matmul kernels take ~60% of the step's kernel time
  (attention, norms, routing and the rest ~40%, identical in every scheme), so even matmuls twice as
  fast give ~1.4x, and 1.8x would need them almost 4x faster than fp32 from cache. The >= 1.8x-over-fp32-
  artifact target is met where its premise holds (moe_medium, every run on both hosts, int4 once just
  under at batch 8 on the AVX2 host) and missed on the tiny rows; >= 3x eager holds everywhere. On a
  CPU without AVX-512 VNNI (the header says which) the W8A8 linears fall back to fp32 arithmetic on the
  rounded values.
- **Accuracy.** On the examples' trained weights (`examples/weights/`, made by
  `examples/train_synthetic.py`), int8 weight-only keeps 99.7-100% of next-token top-1 choices on
  random-token inputs (the accuracy table; `tests/test_quantize.py` holds every example to >= 99%), and
  int4 with groups of 32 keeps 95-99%. With random weights the same quantizer keeps 91-96%: a random
  model's next-token logits are nearly flat (median top-1/top-2 margin 0.22, against ~0.8 trained) and its
  routing choices are near ties, so rounding flips them; adding Gaussian noise with the RMS of int8
  rounding to those weights flips as many. The compile-time columns (drift, top-1 of verify/calib in the
  second table) are for the random-weight artifacts the speed rows time.
"""


def main() -> None:
    torch.set_num_threads(2)
    bandwidth = copy_bandwidth()
    lines = ["## Quantization (`python benchmarks/bench_quant.py`)", "",
             f"Run on {datetime.date.today()}: {_cpu_name()}, 2 threads for every column, copy bandwidth "
             f"{bandwidth / 1e9:.1f} GB/s at the start (each row's roofline uses the bandwidth measured around its "
             "timing). Medians in ms, the columns of a row timed in five alternating rounds. Speed-ups are fp32 eager / column and fp32 artifact / "
             f"column (above 1: faster). `decode` rows: one token after {PAST} positions in a KV cache (artifacts: their "
             "`step`; eager: the reference model with a Hugging Face style cache); `prefill`: a forward over all "
             "positions. Schemes: int8 = weight-only int8, one scale per output channel; int4 = weight-only int4 in "
             "groups of 32; w8a8 / w4a8 = the same weights times int8 activations with a scale per token computed at run "
             "time (every matmul's input, the hidden activation of each FFN and expert included), in integers with "
             "AVX-512 VNNI where the header says the CPU has it. Accuracy: drift = the artifact against the fp32 eager model at compile time (relative max "
             "error, top-1 over its 16 checked positions); calib = the pass report on 16 random-token sequences.", "",
             "| model | case | eager fp32 | artifact fp32 | " + " | ".join(QUANTIZED) + " | "
             + " | ".join(f"{q} vs eager | {q} vs fp32 art." for q in QUANTIZED) + " | roofline " + " / ".join(SCHEMES) + " |",
             "|---|---|" + "---|" * (2 + 3 * len(QUANTIZED) + 1)]
    sizes = ["", "| model | scheme | weights MB | compile s | drift (rel) | top-1 (verify) | top-1 (calib) | KL (calib) |",
             "|---|---|---|---|---|---|---|---|"]
    targets = []
    for path in MODELS:
        rows, info = bench_model(path)
        active = parameter_counts(load_spec(path))["active_per_token"]
        for r in rows:
            roof = {s: 1e3 * active * b / r["bandwidth"] for s, b in BYTES_PER_PARAM.items()}  # bandwidth around the row
            roof_cell = " / ".join(f"{r[s] / roof[s]:.1f}x" for s in roof) if r["case"].startswith("decode b1") else ""
            speedups = {q: (r["eager"] / r[q], r["fp32"] / r[q]) for q in QUANTIZED}
            lines.append(f"| {r['model']} | {r['case']} | {r['eager']:.3f} | {r['fp32']:.3f} | "
                         + " | ".join(f"{r[q]:.3f}" for q in QUANTIZED) + " | "
                         + " | ".join(f"{e:.2f} | {a:.2f}" for e, a in speedups.values()) + f" | {roof_cell} |")
            if r["case"].startswith("decode"):
                targets.append((r, speedups))
        for s, i in info.items():
            fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
            sizes.append(f"| {rows[0]['model']} | {s} | {i['weight_mb']:.1f} | {i['compile_s']:.1f} | {fmt(i['drift'], '.2e')} "
                         f"| {fmt(i['top1_verify'], '.1%')} | {fmt(i['top1_calib'], '.1%')} | {fmt(i['kl'], '.2e')} |")
    lines += sizes
    lines += accuracy_rows()
    lines += ["", "Single-token targets (decode rows; >= 3x eager fp32 and >= 1.8x the fp32 artifact):"]
    for r, speedups in targets:
        ok = lambda e, a: "met" if e >= 3 and a >= 1.8 else "missed"  # noqa: E731
        lines.append(f"- {r['model']} {r['case']}: " + ", ".join(f"{q} {e:.2f}x / {a:.2f}x ({ok(e, a)})"
                                                                 for q, (e, a) in speedups.items()))
    text = "\n".join(lines) + "\n" + QUANT_NOTE
    write_section("quantization", text)
    print(text)


if __name__ == "__main__":
    main()
