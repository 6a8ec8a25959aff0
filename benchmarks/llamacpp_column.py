"""The llama.cpp column of bench_models.py and bench_quant.py: our artifact against llama-bench
on the same weights, precision by precision, in alternating rounds.

Both sides read one checkpoint: the benchmark model's reference weights written as a Hugging
Face Mixtral directory (dsl/hf_export.py); mocompile compiles that directory (with a scheme's
passes), llama.cpp converts it to GGUF and quantizes it to the paired type (llamacpp.PAIRS).
The spec's max_seq is raised to LONG positions first (weights unchanged: rope is computed, not
stored) so that both sides can hold 2048 cached positions plus the generated ones.

What is timed, llama-bench's cases on both sides, batch 1: ppN = one N-token prompt into an
empty cache, the last token's logits out (llama-bench's batch marks only its last token as an
output, common_batch_get_one; ours: one `step(last_only=True)` of N positions into a fresh
cache, the artifact's `prefill` function); tg32 @ d = 32 single-token
steps after d cached positions (ours: 32 `step` calls; the cache is rewound to d before each
repetition, as llama-bench restores its saved state). Each case runs ROUNDS rounds; a round
is one llama-bench process of that case (its own warm-up, REPS repetitions) and ours (one
warm-up, REPS timed repetitions) back to back, the side that goes first alternating. The
speed-up is the median of the rounds' ratios: this shared host's speed drifts by up to 1.5x
within a minute, and a ratio taken within a round sees one state of it. A model llama.cpp
cannot read (not Mixtral-shaped) is skipped with the reason.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

import llamacpp
from harness import figure

LONG = 4096  # max_seq of the compared models: 2048 cached + 32 generated, and pp512, fit
ROUNDS, REPS = 5, 3
GEN_TARGET = 1.05  # generation: tokens/s at least this multiple of llama.cpp's
ROOT = Path(__file__).resolve().parent.parent


def skip_reason(spec) -> str | None:
    """Why llama.cpp cannot run `spec` with the same weights, or None."""
    from mocompile.dsl.hf_export import mixtral_blocker

    why = mixtral_blocker(spec)
    return f"{why}; llama.cpp reads it only as a Mixtral checkpoint here" if why else None


def _our_case(art, label: str, vocab: int) -> Callable[[], object]:
    """Our side of one llama-bench case, as a timed call on artifact `art` (batch 1)."""
    rng = np.random.default_rng(7)
    if label.startswith("pp"):
        n = llamacpp.tokens(label)
        ids = {"text": rng.integers(0, vocab, (1, n)).astype(np.int64)}
        cache = art.new_cache(1, n)

        def prompt() -> object:
            cache.length = 0
            return art.step(ids, cache, last_only=True)
        return prompt
    depth = int(label.split("@")[1])
    cache = art.new_cache(1, depth + llamacpp.GEN)
    if depth:
        art.step({"text": rng.integers(0, vocab, (1, depth)).astype(np.int64)}, cache)
    tokens = [{"text": rng.integers(0, vocab, (1, 1)).astype(np.int64)} for _ in range(llamacpp.GEN)]

    def generate() -> object:
        cache.length = depth
        for t in tokens:
            art.step(t, cache)
    return generate


def _source_digest(hf: Path, options: dict[str, str]) -> str:
    """What an artifact of the comparison depends on: the checkpoint's bytes, the compile
    options and the compiler's own sources (a changed kernel must be measured, not a stale build)."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    h.update((hf / "model.safetensors").read_bytes())
    h.update((hf / "config.json").read_bytes())
    for folder in ("mocompile", "dsl", "passes", "backends"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            h.update(str(f.relative_to(ROOT)).encode() + f.read_bytes())
    return h.hexdigest()


def _artifact(hf: Path, options: dict[str, str], out: Path):
    """The artifact of checkpoint `hf` compiled with `options` (mocompile.compile's keyword
    arguments: passes, dtype): compiled (and verified) once, then loaded while the checkpoint,
    the options and the compiler's sources are unchanged (a quantized moe_medium takes
    minutes to compile on this machine)."""
    import mocompile
    from mocompile.runtime import load

    key, stamp = _source_digest(hf, options), out.parent / f"{out.name}.source"
    if (out / "manifest.json").exists() and stamp.exists() and stamp.read_text() == key:
        return load(out)
    art = mocompile.compile(str(hf), out_dir=out, batch=2, seq=4, **options)
    stamp.write_text(key)
    return art


def compare(tools: llamacpp.LlamaCpp, name: str, spec, schemes: dict[str, dict[str, str]], threads: int,
            cache: Path, say: Callable[[str], None] = print) -> list[dict]:
    """Rows of one model: per scheme (our compile options: passes, dtype) and case, our and
    llama.cpp's medians."""
    from mocompile.dsl import build_model
    from mocompile.dsl.hf_export import export_mixtral
    from mocompile.dsl.summary import parameter_counts

    spec = replace(spec, max_seq=max(spec.max_seq, LONG))
    model = build_model(spec, seed=0)
    files = llamacpp.ggufs(tools, spec, model, name, [llamacpp.PAIRS[s] for s in schemes])
    hf = export_mixtral(spec, model, cache / f"{name}-hf")
    del model
    labels = [c[0] for c in llamacpp.cases()]
    active = parameter_counts(spec)["active_per_token"]  # the roofline's weights, one figure per model
    rows = []
    for scheme, options in schemes.items():
        art = _artifact(hf, options, cache / f"{name}-long-{scheme}")
        gguf = files[llamacpp.PAIRS[scheme]]
        kv = _kv_bytes_per_position(art)
        for label in labels:
            theirs_ms, ours_ms, ratios = _paired_rounds(tools, gguf, threads, label, _our_case(art, label, spec.vocab))
            a, b, n = statistics.median(ours_ms), statistics.median(theirs_ms), llamacpp.tokens(label)
            speedup = statistics.median(ratios)
            rows.append({"model": name, "scheme": scheme, "type": llamacpp.PAIRS[scheme], "case": label,
                         "ours_ms": a, "llama_ms": b, "ours_tps": 1e3 * n / a, "llama_tps": 1e3 * n / b,
                         "speedup": speedup, "rounds": (min(ratios), max(ratios)), "path": art.path,
                         "active": active, "kv_per_position": kv})
            say(f"{name} {scheme} vs {llamacpp.PAIRS[scheme]} {label}: ours {1e3 * n / a:.1f} tok/s, "
                f"llama.cpp {1e3 * n / b:.1f} tok/s (rounds {min(ratios):.2f}-{max(ratios):.2f}x, median "
                f"{speedup:.2f}x)")
    return rows


def _paired_rounds(tools: llamacpp.LlamaCpp, gguf: Path, threads: int, label: str,
                   ours: Callable[[], object]) -> tuple[list[float], list[float], list[float]]:
    """ROUNDS rounds of one case: llama-bench's REPS repetitions and ours back to back (which
    side first alternates by round), so that each round's ratio of medians sees one state of
    the host. llama.cpp's wait policy is chosen in the first round (both run, the faster
    kept: that round's llama.cpp time is the better of two processes, a small edge to
    llama.cpp which the median over the rounds damps) and used in the rest. Returns every
    repetition's ms of theirs and ours, and the rounds' ratios (theirs / ours)."""
    def timed_ours() -> list[float]:
        ours()  # one untimed run, as llama-bench warms up before its repetitions
        ms = []
        for _ in range(REPS):
            t0 = time.perf_counter()
            ours()
            ms.append(1e3 * (time.perf_counter() - t0))
        return ms

    theirs_ms: list[float] = []
    ours_ms: list[float] = []
    ratios = []
    policies = tuple(llamacpp.WAIT_POLICIES)
    for r in range(ROUNDS):
        ours_first = r % 2 == 1
        mine = timed_ours() if ours_first else []
        theirs, policy = llamacpp.bench(tools, gguf, threads, label, REPS, policies)
        policies = (policy,)
        if not ours_first:
            mine = timed_ours()
        theirs_ms += theirs
        ours_ms += mine
        ratios.append(statistics.median(theirs) / statistics.median(mine))
    return theirs_ms, ours_ms, ratios


def column_rows(specs: dict[str, object], schemes: dict[str, dict[str, str]], threads: int, cache: Path,
                say: Callable[[str], None] = print) -> tuple[list[dict], list[str], str]:
    """Every comparable model's rows, the notes of what was skipped and why, and the build's
    description ('' when the column is skipped as a whole)."""
    notes = []
    try:
        tools = llamacpp.build()
    except llamacpp.Unavailable as e:
        say(f"llama.cpp column skipped: {e}")
        return [], [f"- llama.cpp column skipped: {e}"], ""
    rows = []
    for name, spec in specs.items():
        why = skip_reason(spec)
        if why:
            notes.append(f"- {name}: not compared ({why})")
            continue
        try:
            rows += compare(tools, name, spec, schemes, threads, cache, say)
        except llamacpp.Unavailable as e:
            notes.append(f"- {name}: not compared ({e})")
    return rows, notes, f"llama.cpp {tools.commit} (vendored in llama-cpp-python {llamacpp.VERSION})"


def _kv_bytes_per_position(art) -> int:
    """Bytes of keys and values one cached position holds for one sequence (the artifact's
    cache tensors, whose symbolic dims are the batch and the cache length)."""
    import numpy as np

    return sum(int(np.prod([d for d in c["shape"] if isinstance(d, int)])) * np.dtype(c["dtype"]).itemsize
               for c in art.manifest["program"]["step"]["cache"])


def roofline_cell(r: dict, bytes_per_param: dict[str, float], bandwidth: float) -> str:
    """A tg row's time per step against the time to read what a step must read once: the
    active weights (active parameters x bytes per parameter of the scheme) and the cached
    keys and values (at the mean depth of the row's steps), at the measured copy bandwidth."""
    if not r["case"].startswith("tg") or r["scheme"] not in bytes_per_param:
        return ""
    depth = int(r["case"].split("@")[1]) + llamacpp.GEN / 2
    roof = 1e3 * (r["active"] * bytes_per_param[r["scheme"]] + r["kv_per_position"] * depth) / bandwidth
    return f"{r['ours_ms'] / llamacpp.GEN / roof:.2f}x of {roof:.3f} ms"


def miss_profiles(rows: list[dict], limit: int = 2) -> list[str]:
    """Kernel profiles of the decode steps behind the generation rows that missed GEN_TARGET
    (the model and scheme with the lowest speed-up first, at most `limit`)."""
    from mocompile.runtime import load
    from vm_profile import kernel_profile, profile_lines

    lines, seen = [], set()
    for r in sorted((r for r in rows if r["case"].startswith("tg") and r["speedup"] < GEN_TARGET),
                    key=lambda r: r["speedup"]):
        if (r["model"], r["scheme"]) in seen or len(seen) == limit:
            continue
        seen.add((r["model"], r["scheme"]))
        prof = kernel_profile(load(r["path"], driver=False))
        lines += profile_lines(f"{r['model']} {r['scheme']}", "decode b1 x1", r["ours_ms"] / llamacpp.GEN, prof)
    return lines


def section_lines(rows: list[dict], notes: list[str], build: str, threads: int,
                  bytes_per_param: dict[str, float] | None = None, bandwidth: float = 0.0) -> list[str]:
    """The llama.cpp table of a section and its verdicts: generation rows against GEN_TARGET,
    prompt rows against 1.0 (the prompt lead kept); the steps of missed rows profiled."""
    bytes_per_param = bytes_per_param or {}
    lines = ["", f"### Against llama.cpp ({build or 'not built'})", ""]
    if rows:
        lines += [
            f"Both sides at {threads} threads, batch 1, on one Mixtral checkpoint written from the model's reference "
            f"weights (`dsl/hf_export.py`; max_seq raised to {LONG}, weights unchanged): mocompile compiles it with "
            "the scheme's passes and weight dtype, llama.cpp's `convert_hf_to_gguf.py` converts it and `llama-quantize` "
            "makes the paired type. Cases as `llama-bench` names them: ppN = an N-token prompt into an empty cache, the "
            "last token's logits out (llama-bench outputs only the last token's; ours: `step(last_only=True)`, the "
            "artifact's `prefill` function, whose final norm and LM head run on the last position only); tg32 @ d = "
            "32 single-token steps after d cached positions (ours: `step` calls). Each case runs "
            f"{ROUNDS} rounds; a round is one llama-bench process of that case ({REPS} repetitions) and {REPS} of ours, "
            "back to back, the side that goes first alternating by round (each side warms the case up first). ms and "
            "tokens/s: medians over all rounds' repetitions. speed-up: the median over the rounds of each round's "
            "ratio, llama.cpp's median ms / ours (= ours tokens/s / llama.cpp tokens/s), with the lowest and highest "
            "round's: this shared host's speed drifts by up to 1.5x within a minute (the same artifact's tg32 took "
            "48 to 70 ms in consecutive processes), and a round sees one state of it. Arithmetic: llama.cpp's Q8_0 / Q4_0 dot products round "
            "the activations to int8 blocks of 32 and its BF16 / F16 ones to 16 bits, as w8a8 / w4a8 round them to "
            "int8 per token; our fp32 / int8 / int4 / bf16 / fp16 keep float32 activations (int8 / int4: three int8 "
            "digits per activation in the VNNI kernels, 3x w4a8's integer arithmetic on prompts). llama.cpp runs each case under both OpenMP wait policies "
            "(its default, idle workers spinning, and `OMP_WAIT_POLICY=PASSIVE`) in the first round and keeps its "
            "faster one for the case's later rounds: spinning "
            "is faster on a quiet machine, sleeping on a loaded one; ours runs as shipped (an idle TVM worker "
            "spins ~1 ms, `TVM_THREAD_POOL_SPIN_COUNT=1000` yields, then sleeps).", "",
            f"Roofline (tg rows): our time per step against reading the active weights and the cached keys and "
            f"values (at the mean depth of the row's steps) once at the copy bandwidth measured at the start "
            f"({bandwidth / 1e9:.1f} GB/s).", "",
            "| model | ours | llama.cpp | case | ours ms | llama.cpp ms | ours tok/s | llama.cpp tok/s | speed-up "
            "| rounds | our step vs roofline |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['scheme']} | {r['type']} | {r['case']} | {r['ours_ms']:.2f} | "
                  f"{r['llama_ms']:.2f} | {r['ours_tps']:.1f} | {r['llama_tps']:.1f} | {figure(r['speedup'])} | "
                  f"{figure(r['rounds'][0])}-{figure(r['rounds'][1])} | "
                  f"{roofline_cell(r, bytes_per_param, bandwidth)} |" for r in rows]
        gen = [r for r in rows if r["case"].startswith("tg")]
        pp = [r for r in rows if r["case"].startswith("pp")]
        missed = [f"{r['model']} {r['scheme']} {r['case']} {figure(r['speedup'])}x" for r in gen
                  if r["speedup"] < GEN_TARGET]
        lost = [f"{r['model']} {r['scheme']} {r['case']} {figure(r['speedup'])}x" for r in pp if r["speedup"] < 1.0]
        lines += ["", f"- generation (>= {GEN_TARGET}x llama.cpp): {len(gen) - len(missed)} of {len(gen)} rows met"
                  + (f"; missed: {', '.join(missed)}" if missed else ""),
                  f"- prompts (>= 1x llama.cpp): {len(pp) - len(lost)} of {len(pp)} rows met"
                  + (f"; behind: {', '.join(lost)}" if lost else "")]
        lines += miss_profiles(rows)
    return lines + ([""] + notes if notes else [])


def add_option(parser) -> None:
    """The scripts' --llamacpp choice: the comparison after the script's own tables, alone, or not."""
    parser.add_argument("--llamacpp", choices=["with", "only", "skip"], default="with",
                        help="the llama.cpp comparison (its own RESULTS.md section): after the other tables (with, "
                             "the default), alone (only) or not at all (skip)")


def write_llamacpp_section(section: str, script: str, specs: dict[str, object], schemes: dict[str, dict[str, str]],
                           threads: int,
                           cache: Path, out: Path, argv: list[str], bytes_per_param: dict[str, float]) -> None:
    """Run the comparison and write it as its own RESULTS.md section (`section`), so that
    `--llamacpp only` reruns it without touching the script's other tables."""
    from engines import THREADS
    from harness import RunClock, copy_bandwidth, cpu_name, versions
    from results import write_section

    clock = RunClock()
    bandwidth = copy_bandwidth()
    rows, notes, build = column_rows(specs, schemes, threads, cache)
    head = [f"## Against llama.cpp: {section.removesuffix('-llamacpp')} (`python benchmarks/{script} --llamacpp only`)",
            "", f"Run of `python benchmarks/{script}{''.join(' ' + a for a in argv)}` ({clock.stamp()}): {cpu_name()}, "
            f"{versions()}; {THREADS.header(['artifact'])}, llama-bench `-t {threads}`."]
    text = "\n".join(head + section_lines(rows, notes, build, threads, bytes_per_param, bandwidth))
    write_section(section, text, out)
    print(text)
