"""The sections of an artifact's report page that come from its files alone (manifest.json and
ir.txt): the model at a glance, the pipeline, batch isolation, verification and tuning. Each
returns an HTML fragment; every value from the manifest is escaped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html import escape
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mocompile.prefill import DECODING_FUNCTIONS

# An IR line: `%out = op(args) {attrs} : dtype[shape]  # place`, or a weight `@name : dtype[shape]`.
_NODE = re.compile(r"^\s*%(.+?) = ([\w.]+)\((.*?)\)(?: \{(.*)\})? : \w+\[([^\]]*)\]")
_WEIGHT = re.compile(r"^\s*@(\S+) : (\w+)\[([^\]]*)\]")


def _shape(text: str) -> tuple[int | str, ...]:
    return tuple(int(d) if d.strip().lstrip("-").isdigit() else d.strip() for d in text.split(",") if d.strip())


@dataclass
class ModelFacts:
    """What the IR text of an artifact says about its size: parameters per weight (low-bit
    weights counted as the float tensors they stand for), which weights are experts', and
    the routers' top-k and expert counts."""

    params: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple] = field(default_factory=dict)
    expert_weights: set[str] = field(default_factory=set)
    routers: list[tuple[int, int]] = field(default_factory=list)  # (experts, top_k) per router
    layers: set[str] = field(default_factory=set)

    @property
    def total(self) -> int:
        return sum(self.params.values())

    @property
    def active(self) -> int:
        """Parameters one token reads: every weight, experts' at top_k / experts."""
        share = (self.routers[0][1] / self.routers[0][0]) if self.routers else 1.0
        dense = sum(v for k, v in self.params.items() if k not in self.expert_weights)
        return int(dense + share * sum(self.params[k] for k in self.expert_weights if k in self.params))


def model_facts(ir_text: str) -> ModelFacts:
    facts = ModelFacts()
    stands_for: dict[str, str] = {}  # a dequantize output -> its code weight
    for line in ir_text.splitlines():
        w = _WEIGHT.match(line)
        if w:
            name, dtype, shape = w.group(1), w.group(2), _shape(w.group(3))
            facts.params[name] = int(np.prod([d for d in shape if isinstance(d, int)], dtype=np.int64))
            facts.dtypes[name] = dtype
            facts.shapes[name] = shape
            layer = re.match(r"(layers\.\d+)\.", name)
            if layer:
                facts.layers.add(layer.group(1))
            continue
        n = _NODE.match(line)
        if not n:
            continue
        out, op, args, attrs, shape = n.groups()
        weights = re.findall(r"[@%]([\w.]+)", args)
        if op == "dequantize" and weights and weights[0] in facts.params:
            code, *scales = weights
            facts.params[code] = int(np.prod([d for d in _shape(shape) if isinstance(d, int)], dtype=np.int64))
            for s in scales:  # scales are part of the quantized tensor, not parameters of their own
                facts.params.pop(s, None)
            stands_for[out] = code
        elif op == "experts":
            facts.expert_weights.update(stands_for.get(a, a) for a in weights[3:])
        elif op == "router.topk":
            k = re.search(r"top_k=(\d+)", attrs or "")
            experts = facts.shapes.get(weights[1], (0,))[0] if len(weights) > 1 else 0
            facts.routers.append((int(experts), int(k.group(1)) if k else 0))
    return facts


def table(head: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    th = "".join(f"<th>{escape(str(h))}</th>" for h in head)
    thead = f"<thead><tr>{th}</tr></thead>" if any(head) else ""
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, Raw) else escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<div class='scroll'><table class='{cls}'>{thead}<tbody>{body}</tbody></table></div>"


class Raw(str):
    """HTML already escaped (a table cell that holds markup)."""


def section(anchor: str, title: str, body: str) -> str:
    return f"<section id='{anchor}'><h2>{escape(title)}</h2>{body}</section>"


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def glance(manifest: Mapping[str, Any], facts: ModelFacts, experts: int | None) -> str:
    model, target = manifest.get("model", {}), manifest.get("target", {})
    routers = facts.routers
    quant = [p.get("scheme") for p in manifest.get("passes", []) if p.get("scheme")]
    precision = ", ".join(f"w={q.get('w')}" + (f" a={q['a']}" if q.get("a") else "") for q in quant) or "float32"
    weight_bytes = sum(f["weight_bytes"][1] for f in manifest.get("passes", [])[-1:] if "weight_bytes" in f)
    rows = [("model", f"{model.get('name')}" + (f" (variant {model['variant']})" if model.get("variant") else "")),
            ("source", f"{model.get('source')} ({model.get('weights')})"),
            ("layers", f"{len(facts.layers)} ({len(routers)} with routed experts)"),
            ("experts", f"{experts if experts else '-'} per MoE layer, top-{routers[0][1] if routers else '-'}"),
            ("parameters", f"{_count(facts.total)} total, {_count(facts.active)} active per token"),
            ("target", f"{target.get('text')} ({target.get('spec', target.get('name'))}; low-bit matmuls: "
                       f"{target.get('low_bit_matmuls', '-')})"),
            ("precision", precision + (f", weights {human_bytes(weight_bytes)}" if weight_bytes else "")),
            ("compile time", f"{manifest.get('compile_seconds', '-')} s")]
    return section("glance", "The model at a glance", table(("", ""), rows, "kv"))


def pipeline(manifest: Mapping[str, Any]) -> str:
    passes = manifest.get("passes", [])
    if not passes:
        return section("pipeline", "Pipeline", "<p>No passes ran: the artifact computes the traced model as is.</p>")
    rows = []
    for p in passes:
        nodes, wb = p.get("nodes", ["-", "-"]), p.get("weight_bytes", [0, 0])
        acc = p.get("accuracy") or {}
        ppt = p.get("params_per_token")
        cost = ", ".join(s for s in (
            f"rel. error {acc['rel_error']:.2e}" if "rel_error" in acc else "",
            f"KL {acc['kl_mean']:.2e}" if "kl_mean" in acc else "",
            f"top-1 {acc['top1_agreement']:.1%}" if "top1_agreement" in acc else "",
            f"routing kept {acc['routing_agreement']:.1%}" if "routing_agreement" in acc else "") if s) or "none (exact)"
        rows.append((p.get("pass"), f"{p.get('seconds', 0):.2f} s", f"{nodes[0]} → {nodes[1]}",
                     f"{human_bytes(wb[0])} → {human_bytes(wb[1])}" if wb[0] else "-",
                     f"{_count(ppt[0])} → {_count(ppt[1])}" if isinstance(ppt, list) else None, cost))
    head = ["pass", "time", "nodes", "weight bytes", "params per token", "quality cost"]
    if all(r[4] is None for r in rows):  # no pass changes which parameters a token reads: say it once, above
        head.pop(4)
        rows = [r[:4] + r[5:] for r in rows]
    calib = manifest.get("calibration") or next((p["calibration"] for p in passes if p.get("calibration")), None)
    note = (f"<p class='note'>Calibration: {escape(calib['source'])}, {calib['samples']} samples.</p>"
            if calib else "")
    return section("pipeline", "Pipeline", table(head, rows) + note)


def isolation(manifest: Mapping[str, Any]) -> str:
    iso = manifest.get("isolation") or {}
    verdict = iso.get("verdict", "not recorded")
    badge = {"isolated": "ok", "leaks": "bad"}.get(verdict, "warn")
    body = [f"<p><span class='badge {badge}'>{escape(verdict)}</span> sample axis: "
            f"{escape(', '.join(f'{k} {v}' for k, v in iso.get('inputs', {}).items()))}</p>"]
    if verdict == "isolated":
        body.append("<p>Every output row depends only on its own sample's input rows, for every batch size.</p>")
    findings = iso.get("findings", [])
    if findings:
        body.append(table(("kind", "op", "where", "why", "chain to the output"), [
            (f.get("kind"), f.get("op"), f.get("loc"), f.get("reason"), " → ".join(f.get("chain") or []))
            for f in findings], "findings"))
    w = iso.get("witness")
    if w:
        body.append(f"<p class='witness'>Witness: when only sample {escape(str(w.get('perturbed_sample')))} changes, "
                    f"sample {escape(str(w.get('observed_sample')))}'s {escape(str(w.get('output')))} changes by "
                    f"{float(w.get('max_change', 0)):.3g}" + (" (changed)." if w.get("changed") else " (no change seen).")
                    + "</p>")
    decoding = iso.get("decoding") or {}
    if not decoding and (manifest.get("decode_verification") or {}).get("isolation"):  # a manifest without isolation.decoding
        decoding = {"step": manifest["decode_verification"]["isolation"]}
    body += [f"<p>{DECODING_FUNCTIONS.get(k, escape(k))}: {escape(str(v))}.</p>" for k, v in decoding.items()]
    return section("isolation", "Batch isolation", "".join(body))


def _flips(check: Mapping[str, Any]) -> str:
    """How many of the values on a rounding boundary the reference rounded the artifact's way
    (mocompile.ir.rounding), or "-" for a model that does not round at run time."""
    if "ambiguous_roundings" not in check:
        return "-"
    return f"{check.get('rounding_flips', 0)} of {check['ambiguous_roundings']}"


def verification(manifest: Mapping[str, Any]) -> str:
    v = manifest.get("verification") or {}
    if v.get("status") != "verified":
        checked = "".join(f"<li>{escape(str(c))}</li>" for c in v.get("checked", []))
        return section("verification", "Verification",
                       f"<p><span class='badge warn'>not run</span> {escape(str(v.get('reason', '')))}</p><ul>{checked}</ul>")
    rows = [(f"{c['batch']} x {c['seq']}", c["output"], f"{c['max_abs_error']:.2e}", f"{c['rel_error']:.2e}",
             _flips(c), f"{c['top1_agreement']:.1%}" if "top1_agreement" in c else "-")
            for c in v.get("checks", [])]
    body = [f"<p><span class='badge ok'>verified</span> against the {escape(v.get('reference', '?'))}: max relative "
            f"error {v.get('max_rel_error', 0):.2e} (tolerance {v.get('tolerance', 0):g}).</p>",
            table(("batch x seq", "output", "max abs error", "rel. error", "boundary roundings flipped",
                   "top-1 agreement"), rows)]
    dec = manifest.get("decode_verification")
    if dec:
        body.append(f"<p>Cached decoding: a prompt of {dec['prompt']} then {dec['new_tokens']} tokens one at a time "
                    f"match {escape(dec['reference'])}, max relative error {dec['max_rel_error']:.2e}"
                    f"{'' if 'ambiguous_roundings' not in dec else ', boundary roundings flipped: ' + _flips(dec)}.</p>")
    drift = manifest.get("drift_from_fp32")
    if drift:
        body.append("<h3>Drift from the fp32 model</h3>")
        body.append(table(("batch x seq", "output", "max abs error", "rel. error", "top-1 agreement"), [
            (f"{c['batch']} x {c['seq']}", c["output"], f"{c['max_abs_error']:.2e}", f"{c['rel_error']:.2e}",
             f"{c['top1_agreement']:.1%}" if "top1_agreement" in c else "-") for c in drift.get("checks", [])]))
    return section("verification", "Verification", "".join(body))


def tuning(manifest: Mapping[str, Any]) -> str:
    t = manifest.get("tuning")
    if not t:
        return ""
    rows = [(k, f"{v:.2f}x") for k, v in sorted((t.get("tuned") or {}).items())]
    return section("tuning", "Tuning", f"<p>{escape(str(t.get('database', '')))}; {t.get('trials', 0)} trials over "
                                       f"{t.get('kernels', 0)} kernels.</p>" + table(("kernel", "speed-up"), rows))
