"""`mocompile report ARTIFACT [-o report.html]`: one self-contained HTML page per artifact (no
script, no network: plots are inline SVG) saying what the compiler did, where the time goes on
this machine, what the passes cost in quality and whether samples of a batch can see each
other.

The manifest and the IR text give the model, the pipeline, the isolation verdict and the
verification. The rest is measured when the report is made, by running the artifact itself
through its VM's instrumentation hook (vm_trace.py): the experts each router chose on the
calibration tokens (when the manifest names a file that is still there) or on random tokens
of the verification's shape, and the time of every kernel of a prefill and of a decode step
against the roofline of this machine (its memory bandwidth and matmul rate). An artifact that
cannot run here still gets its page, with the measured sections saying why they are missing.
"""

from __future__ import annotations

import platform
from html import escape
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mocompile import report_sections as S
from mocompile import vm_trace
from mocompile.artifact import placement_plan, read_manifest
from mocompile.placement.stats import layer_index
from mocompile.errors import ArtifactError, MocompileError
from mocompile.files import write_atomically
from mocompile.progress import Bar
from mocompile.report_svg import bars, heatmap

LOAD_SAMPLES = 16  # random sequences routed for the expert-load heatmap without calibration data
PLOTTED_KERNELS = 12  # the slowest kernels drawn per profile (the table lists all)
PROFILE_PROMPT = 64  # positions of the profiled prefill, and cached positions before the decode step

CSS = """
:root{color-scheme:light;--ink:#1d232a;--muted:#5b6672;--line:#dde3ea;--bg:#f6f8fa}
*{box-sizing:border-box}body{margin:0;font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:var(--ink);background:var(--bg)}
header,main{max-width:1080px;margin:0 auto;padding:12px 16px}header h1{margin:8px 0 2px;font-size:1.5em}
header p{margin:0;color:var(--muted)}nav{display:flex;flex-wrap:wrap;gap:6px;margin:10px 0}
nav a{padding:3px 10px;border:1px solid var(--line);border-radius:14px;background:#fff;color:var(--ink);text-decoration:none;font-size:.9em}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 16px;margin:14px 0}
h2{margin:0 0 8px;font-size:1.15em}h3{font-size:1em;margin:14px 0 6px}.note{color:var(--muted);font-size:.9em}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;font-size:.9em}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{background:var(--bg)}table.kv td:first-child{color:var(--muted);white-space:nowrap;width:1%}
td{overflow-wrap:break-word}.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:.85em}
.ok{background:#dcf5e3;color:#11632d}.bad{background:#fde0de;color:#9b1c13}.warn{background:#fff3cd;color:#7a5300}
.plotbox{overflow-x:auto}svg.plot{width:100%;height:auto;min-width:520px;display:block;margin:8px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:12px}
@media (max-width:600px){body{font-size:14px}table.findings{min-width:560px}header,main{padding:8px}section{padding:10px}th,td{padding:3px 4px}}
"""


def _load(path: Path) -> Any:
    """The artifact loaded for tracing (single-token steps through the VM, not the decode
    driver, so that the hook sees their kernels), or the reason it cannot run here."""
    from mocompile.runtime import load

    try:
        return load(path, driver=False)
    except ArtifactError as e:
        return str(e)


def _load_inputs(art: Any) -> tuple[list[dict[str, np.ndarray]], str]:
    """The inputs whose routing the heatmap shows, and a sentence saying what they are."""
    from mocompile.calibration import load_token_file
    from mocompile.runtime import random_inputs

    calib = art.manifest.get("calibration") or {}
    source = str(calib.get("source", ""))
    candidate = Path(source.split(" (")[0]) if source and not calib.get("random") else None
    if candidate is not None and candidate.is_file():
        try:
            given = load_token_file(candidate, art.signature)
            return given.inputs, f"the calibration tokens {escape(given.source)}"
        except MocompileError:
            pass
    checks = (art.manifest.get("verification") or {}).get("checks") or [{"seq": 8}]
    seq = int(max(c["seq"] for c in checks))
    return ([random_inputs(art.signature, 1, seq, seed) for seed in range(LOAD_SAMPLES)],
            f"{LOAD_SAMPLES} random-token sequences of {seq} positions (the verification's shape; "
            "the manifest names no calibration file that is still readable)")


def expert_load_section(path: Path, manifest: dict[str, Any], bar: Bar) -> str:
    art = _load(path)
    if isinstance(art, str):
        return S.section("load", "Expert load", f"<p class='note'>Not measured: {escape(art)}</p>")
    inputs, what = _load_inputs(art)
    bar.update(0, "routing the load inputs")
    try:
        routers, counts = vm_trace.expert_load(art, inputs)
    except ArtifactError as e:
        return S.section("load", "Expert load", f"<p class='note'>Not measured: {escape(str(e))}</p>")
    if not routers:
        return S.section("load", "Expert load", "<p>The model has no routed experts.</p>")
    body = [heatmap(counts, routers, [str(e) for e in range(counts.shape[1])], "Tokens per expert, per MoE layer"),
            f"<p class='note'>Routing of {what}, read from the router kernels' outputs of the artifact itself. "
            f"The busiest expert of a layer gets {counts.max(1).min() / max(counts.sum(1).max(), 1):.1%} to "
            f"{counts.max(1).max() / max(counts.sum(1).min(), 1):.1%} of its routed tokens "
            f"(uniform: {1 / counts.shape[1]:.1%}).</p>"]
    plan = placement_plan(manifest)
    if plan is not None:
        body.append(_device_load(plan["devices"], routers, counts))
    return S.section("load", "Expert load", "".join(body))


def _device_load(devices: Sequence[Any], routers: Sequence[str], counts: np.ndarray) -> str:
    """Tokens per device per layer from the placement: each replica serves its `share` of
    its expert's tokens in that layer."""
    rows = {i if layer_index(r) is None else layer_index(r): i for i, r in enumerate(routers)}  # the plan's numbering
    names, per_device = [], []
    for i, d in enumerate(devices):
        load = np.zeros(len(routers))
        for e in d.get("experts") or [] if isinstance(d, dict) else []:
            row, expert = rows.get(int(e.get("layer", -1))), int(e.get("expert", -1))
            if row is not None and 0 <= expert < counts.shape[1]:
                load[row] += float(e.get("share", 1.0)) * counts[row, expert]
        names.append(str(d.get("name", f"device {i}")) if isinstance(d, dict) else f"device {i}")
        per_device.append(load)
    if not names:
        return ""
    return heatmap(np.stack(per_device, 1), routers, names, "Tokens per device, per MoE layer (placement)")


def _profile_calls(art: Any) -> list[tuple[str, Any, str]]:
    """(name, call, description) of a prefill and a decode step at batch 1."""
    from mocompile.runtime import random_inputs

    prompt_len = max(1, min(PROFILE_PROMPT, (art.max_seq or 2 * PROFILE_PROMPT) // 2))
    segments = max(1, len(art.signature.inputs))
    prompt = random_inputs(art.signature, 1, max(1, prompt_len // segments), seed=1)
    if not art.can_decode:
        one = random_inputs(art.signature, 1, 1, seed=2)
        return [("prefill", lambda: art.run(prompt), f"a forward over {prompt_len} positions (batch 1)"),
                ("one position", lambda: art.run(one), "a forward over 1 position (the artifact has no KV-cached step)")]
    cache = art.new_cache(1, prompt_len + 1)
    token = {art.token_input.name: random_inputs(art.signature, 1, 1, seed=3)[art.token_input.name]}

    def prefill() -> None:  # as `generate` runs a prompt: the logits of its last position only
        cache.length = 0
        art.step(prompt, cache, last_only=True)

    def decode() -> None:
        cache.length = prompt_len
        art.step(token, cache)

    last = "the prefill function (outputs at the last position only)" if getattr(art, "has_prefill", False) else \
        "the step function, its outputs then cut to the last position"
    return [("prefill", prefill, f"a {prompt_len}-position prompt (batch 1) as generation runs it: {last}"),
            ("decode step", decode, f"one token after {prompt_len} cached positions (batch 1, through the VM; "
                                    "the decode driver runs the same kernels without it)")]


def profile_section(path: Path, bar: Bar) -> str:
    probe = _load(path)
    if isinstance(probe, str):
        return S.section("profile", "Where the time goes", f"<p class='note'>Not measured: {escape(probe)}</p>")
    body = []
    bandwidth, flops = vm_trace.memory_bandwidth(), vm_trace.peak_flops()
    body.append(f"<p>This machine ({escape(platform.machine())}, {escape(platform.processor() or platform.system())}): "
                f"memory copies at {bandwidth / 1e9:.1f} GB/s, float32 matrix products at {flops / 1e9:.0f} GFLOP/s "
                f"(measured now): a kernel doing fewer than {flops / bandwidth:.1f} flops per byte it moves is bound by "
                "memory. A kernel's roofline floor is the longer of moving the bytes its arguments hold (per-expert "
                "weights only for the experts that get rows) at that bandwidth and, for a matmul, doing its flops at "
                "that rate; a kernel faster than its floor is served from caches.</p>")
    for name, _, what in _profile_calls(probe):
        art = _load(path)  # a VM of its own: instrumented for good once traced
        call = next(c for n, c, _ in _profile_calls(art) if n == name)
        bar.update(0, f"profiling the {name}")
        prof = vm_trace.kernel_profile(art, call)
        kernels = [k for k in prof if not k.builtin]
        builtin_us = sum(k.us for k in prof if k.builtin)
        total = sum(k.us for k in prof if not k.builtin)
        top = kernels[:PLOTTED_KERNELS]
        plot = bars([k.name for k in top], [k.us for k in top], [k.roofline_us(bandwidth, flops) for k in top],
                    f"{name}: time per kernel" + (f" (the {len(top)} slowest)" if len(top) < len(kernels) else ""))
        rows = [(k.name, k.calls, f"{k.us:.1f}", S.human_bytes(k.bytes), f"{k.flops / 1e6:.2f}" if k.flops else "-",
                 f"{k.roofline_us(bandwidth, flops):.2f} ({k.bound(bandwidth, flops)})",
                 f"{k.roofline_us(bandwidth, flops) / k.us:.0%}" if k.us > 0 else "-") for k in kernels]
        body.append(f"<h3>{escape(name)}</h3><p class='note'>{escape(what)}: {total:.0f} us in "
                    f"{sum(k.calls for k in prof if not k.builtin)} kernel calls, {builtin_us:.0f} us in VM builtins "
                    "(shapes, allocation; timed through the hook, which adds its own cost to every call).</p>")
        body.append(plot)
        body.append(S.table(("kernel", "calls", "us", "bytes", "Mflop", "floor us", "floor / time"), rows))
    return S.section("profile", "Where the time goes", "".join(body))


def render(path: str | Path, measure: bool = True) -> str:
    """The report page of the artifact at `path` (measured sections need it to run here)."""
    path = Path(path)
    manifest = read_manifest(path)
    ir_path = path / "ir.txt"
    facts = S.model_facts(ir_path.read_text() if ir_path.is_file() else "")
    experts = facts.routers[0][0] if facts.routers else None
    with Bar(f"report {path.name}", 3) as bar:
        measured = [S.section("load", "Expert load", "<p class='note'>Not measured (--no-run).</p>"),
                    S.section("profile", "Where the time goes", "<p class='note'>Not measured (--no-run).</p>")]
        if measure:
            measured[0] = expert_load_section(path, manifest, bar)
            bar.update(1, "profiling")
            measured[1] = profile_section(path, bar)
            bar.update(1)
        parts = [S.glance(manifest, facts, experts), S.pipeline(manifest), *measured, S.isolation(manifest),
                 S.verification(manifest), S.tuning(manifest)]
        bar.update(1)
    model = manifest.get("model", {})
    nav = "".join(f"<a href='#{a}'>{t}</a>" for a, t in (
        ("glance", "model"), ("pipeline", "pipeline"), ("load", "expert load"), ("profile", "time"),
        ("isolation", "isolation"), ("verification", "verification")))
    title = f"mocompile report: {model.get('name', path.name)}"
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            # nothing may load from anywhere: a browser refuses (and logs) any fetch the page would make
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "img-src data:\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{escape(title)}</h1><p>{escape(str(path))} · {escape(str((manifest.get('target') or {}).get('text')))}"
            f"</p><nav>{nav}</nav></header><main>{''.join(parts)}</main></body></html>\n")


def write_report(path: str | Path, out: str | Path | None = None, measure: bool = True) -> Path:
    """Write the report of the artifact at `path` to `out` (default: report.html beside the
    artifact directory, named after it) atomically; returns where."""
    path = Path(path)
    if not path.is_dir():
        raise MocompileError(f"{path}: not an artifact directory")
    target = Path(out) if out is not None else path.parent / f"{path.name}.report.html"
    if target.is_dir():
        raise MocompileError(f"{target}: is a directory; give -o a file name")
    if target.resolve().parent == path.resolve():
        raise MocompileError(f"{target}: inside the artifact directory (its files are checksummed); write it elsewhere")
    page = render(path, measure)
    write_atomically(target, lambda tmp: tmp.write_text(page, encoding="utf-8"), "report")
    return target
