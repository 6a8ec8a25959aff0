"""What a pass that changes a model's function costs in quality, measured on calibration
sequences: the errors of the outputs against the unmodified graph, for a language model the
KL divergence of the next-token distributions and top-1 agreement, and for an MoE model the
share of the unmodified model's routing decisions (token, expert) that the modified one
still makes.

Data-driven passes learn from part of the calibration data and are judged on the rest
(`split`): a quality figure measured on the sequences a pass fitted would flatter it.

Routers are paired by `loc`; a pass that renumbers a router's experts records the original
id of each remaining one in `graph.meta["expert_ids"][loc]`, so decisions are compared in the
original numbering. A router whose layer was removed makes none of its decisions: they count
as lost.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mocompile.calibration import Calibration, Inputs
from mocompile.ir.graph import Graph, Value
from mocompile.ir.interpreter import run as interpret
from mocompile.ir.registry import get_op

EXPERT_IDS = "expert_ids"  # graph.meta key: router loc -> original id of each remaining expert


def split(calibration: Calibration, held_out: float = 0.25) -> tuple[Calibration, Calibration]:
    """(fit, held-out) parts of the calibration: the last share `held_out` of the sequences
    (at least one) is held out. One sequence cannot be split: it is cut in two along the
    positions instead (the first half fits, the second is judged)."""
    inputs = calibration.inputs
    if len(inputs) >= 2:
        n = min(len(inputs) - 1, max(1, round(len(inputs) * held_out)))
        return (Calibration(inputs[:-n], f"{calibration.source}, first {len(inputs) - n}"),
                Calibration(inputs[-n:], f"{calibration.source}, last {n} held out"))
    (sample,) = inputs
    seq = min(a.shape[1] for a in sample.values())
    if seq < 2:
        raise ValueError("calibration of one sequence of one position cannot be split into fit and held-out parts")
    half = seq // 2
    return (Calibration([{k: a[:, :half] for k, a in sample.items()}], f"{calibration.source}, first half"),
            Calibration([{k: a[:, half:] for k, a in sample.items()}], f"{calibration.source}, second half held out"))


def token_ranges(graph: Graph, known: dict[str, int]) -> dict[str, int]:
    """Integer inputs -> number of ids: given, else the rows of the table they index (an op
    that `embeds_tokens`)."""
    ranges = dict(known)
    for node in (n for n in graph.nodes if get_op(n.op).embeds_tokens):
        ids = node.inputs[0]
        if ids in graph.inputs and ids.name not in ranges:
            ranges[ids.name] = int(node.inputs[1].type.shape[0])
    return ranges


def is_language_model(graph: Graph) -> bool:
    """A graph embedding tokens: its outputs are next-token logits."""
    return any(get_op(n.op).embeds_tokens for n in graph.nodes)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def routers(graph: Graph) -> dict[str, Value]:
    """Router loc -> the value holding its chosen experts (an op's `routing_choices`)."""
    return {(n.loc or n.outputs[0].name): n.outputs[get_op(n.op).routing_choices] for n in graph.nodes
            if get_op(n.op).routing_choices is not None}


def _routing_kept(ref: np.ndarray, got: np.ndarray | None, ref_ids: Sequence[int] | None,
                  ids: Sequence[int] | None) -> tuple[int, int]:
    """(decisions of `ref`, of them also made in `got`) per token, in the original numbering."""
    if got is None:
        return ref.size, 0
    if ref_ids is not None:
        ref = np.asarray(ref_ids)[ref]
    if ids is not None:
        got = np.asarray(ids)[got]
    a, b = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    return a.size, int(sum(np.isin(a[i], b[i]).sum() for i in range(a.shape[0])))


def quality_report(before: Graph, after: Graph, inputs: Sequence[Inputs], language_model: bool | None = None) -> dict[str, Any]:
    """Errors of `after`'s outputs against `before`'s on the same inputs; for a language model
    also the next-token KL divergence (mean over positions) and top-1 agreement, with the fp32
    top-1/top-2 margin of the positions whose top-1 flipped (flips at tiny margins are
    near-ties); for an MoE model the share of routing decisions kept."""
    language_model = is_language_model(before) if language_model is None else language_model
    ref_routers, got_routers = routers(before), routers(after)
    ref_ids, ids = before.meta.get(EXPERT_IDS, {}), after.meta.get(EXPERT_IDS, {})
    max_err = mean_acc = scale = kl_acc = 0.0
    count = agree = positions = routed = kept = 0
    margins: list[np.ndarray] = []
    flip_margins: list[np.ndarray] = []
    outputs = [v.name for v in before.outputs]
    for sample in inputs:
        ref = interpret(before, sample, watch=list(ref_routers.values()))
        got = interpret(after, sample, watch=list(got_routers.values()))
        for loc, value in ref_routers.items():
            mine = got_routers.get(loc)
            n, k = _routing_kept(ref[value.name], None if mine is None else got[mine.name], ref_ids.get(loc),
                                 ids.get(loc))
            routed, kept = routed + n, kept + k
        for name, g in zip(outputs, (got[v.name] for v in after.outputs)):
            r = ref[name]
            diff = np.abs(g.astype(np.float64) - r)
            max_err, scale = max(max_err, float(diff.max(initial=0))), max(scale, float(np.abs(r).max(initial=0)))
            mean_acc, count = mean_acc + float(diff.sum()), count + diff.size
            if language_model:
                p, q = softmax(r), softmax(g)
                kl = (p * (np.log(p + 1e-30) - np.log(q + 1e-30))).sum(-1)
                kl_acc += float(kl.sum())
                same = r.argmax(-1) == g.argmax(-1)
                agree += int(same.sum())
                positions += kl.size
                top2 = np.sort(r, -1)[..., -2:]
                margin = top2[..., 1] - top2[..., 0]
                margins.append(margin.ravel())
                flip_margins.append(margin[~same].ravel())
    out: dict[str, Any] = {"samples": len(inputs), "max_abs_error": max_err, "mean_abs_error": mean_acc / max(count, 1),
                           "rel_error": max_err / max(scale, 1e-30)}
    if language_model and positions:
        flips = np.concatenate(flip_margins)
        out.update({"kl_mean": kl_acc / positions, "top1_agreement": agree / positions, "positions": positions,
                    "median_top1_margin": float(np.median(np.concatenate(margins))),
                    "max_flipped_margin": float(flips.max()) if flips.size else 0.0})
    if routed:
        out["routing_agreement"] = kept / routed
    return out


def quality_line(q: dict[str, Any]) -> str:
    """The quality figures of a report in a few words, for a pass's one-line summary."""
    parts = []
    if "kl_mean" in q:
        parts += [f"KL {q['kl_mean']:.3g}", f"top-1 {100 * q['top1_agreement']:.1f}%"]
    parts.append(f"rel err {q['rel_error']:.3g}")
    if "routing_agreement" in q:
        parts.append(f"routing kept {100 * q['routing_agreement']:.1f}%")
    return ", ".join(parts)
