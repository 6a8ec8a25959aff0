"""elastic: the best smaller model that fits a budget, chosen among combinations of the
sparsity passes and the spec's declared variants, with the whole Pareto front reported.

    elastic(budget=0.6)                         at most 60% of the active parameters per token
    elastic(budget=0.5,metric=latency)          at most half the estimated decode-step bytes
    elastic(budget=0.6,skip=0|1,experts=1|0.5,k=2|1,neurons=0|0.25,plot=front.png)

ERNIE 5.0 trains one model whose depth, expert count and top-k can shrink; this pass searches
that space after the fact. Each candidate is a combination of: neurons pruned (share removed,
WINA scores), experts kept per MoE block (share, by calibration usage), experts per token (k),
layers removed (lowest block influence); plus every `variant` the spec declares (its layers,
the first experts of each group, its top_k). The calibration statistics are recorded once on
the full model (fit part); every candidate is built from them and its quality measured on
the held-out part (KL of the next-token distributions against the full model, top-1
agreement). Cost is the share of the full model's active parameters per token, or with
`metric=latency` the share of the full model's decode-step time measured on this machine:
each candidate is compiled by the compile's backend and a single-token step timed (the probe
`mocompile compile` puts in `PassContext.options["decode_latency"]`; a compile per candidate,
so keep the grid small). Run outside a compile, without the probe, `latency` falls back to
the bytes a single-token step reads, summed from the ops' cost facets, and says so. The pass
keeps the candidate of lowest KL within the budget; the report lists every candidate and the
Pareto front (no other candidate is both cheaper and better), and `plot=FILE.png` draws it
(with matplotlib, the `plot` extra).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mocompile.blocks import blocks, remove_blocks
from mocompile.calib_record import node_key, record
from mocompile.calibration import Calibration
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.ir.registry import get_op
from mocompile.pass_manager import PassContext, register_pass
from mocompile.ir.active_params import active_params
from mocompile.passes.calibrated import CalibratedPass, drop_dead
from mocompile.passes.prune_experts import choose_experts, prune_router
from mocompile.passes.prune_neurons import prune_neurons
from mocompile.passes.skip_layers import lowest_influence
from mocompile.passes.top_k import set_top_k
from mocompile.quality import quality_report


@dataclass(frozen=True)
class Candidate:
    """One point of the search: what is removed, or a declared variant."""

    neurons: float = 0.0  # share of hidden neurons removed
    experts: float = 1.0  # share of routed experts kept
    k: int | None = None  # experts per token (None: the model's own)
    skip: int = 0  # layers removed (lowest influence)
    variant: str | None = None
    variant_layers: tuple[int, ...] | None = None
    variant_experts: int | None = None

    def label(self) -> str:
        if self.variant is not None:
            return f"variant {self.variant}"
        parts = [f"neurons-{self.neurons:g}" if self.neurons else "", f"experts x{self.experts:g}"
                 if self.experts < 1 else "", f"k={self.k}" if self.k is not None else "",
                 f"skip {self.skip}" if self.skip else ""]
        return ", ".join(p for p in parts if p) or "full model"


def decode_bytes(graph: Graph) -> int:
    """Bytes one single-token decode step reads and writes, from the ops' cost facets (every
    symbolic size 1: one sample, one position)."""
    env: dict[str, int] = {}
    for v in graph.values():
        for d in v.type.shape:
            if isinstance(d, str):
                for sym in d.replace("+", " ").replace("*", " ").split():
                    if not sym.isdigit():
                        env[sym] = 1
    total = 0
    for node in graph.nodes:
        op = get_op(node.op)
        if op.cost is not None:
            total += op.cost([v.type for v in node.inputs], [v.type for v in node.outputs], node.attrs, env).bytes
    return total


def spec_variants(graph: Graph) -> list[Candidate]:
    """The variants the model's spec declares (the frontend records them in the graph's meta;
    none for a graph not made from a spec, or for a variant's own graph)."""
    if graph.meta.get("variant") is not None:
        return []
    return [Candidate(variant=v["name"], variant_layers=None if v["layers"] is None else tuple(v["layers"]),
                      variant_experts=v["experts"], k=v["top_k"]) for v in graph.meta.get("variants", ())]


class _Stats:
    """What calibration said about the full model, keyed by layer name or node key."""

    def __init__(self, graph: Graph, fit: Calibration) -> None:
        rec = record(graph, fit)
        self.hidden = {k: h.mean for k, h in rec.hidden.items()}
        self.routing = rec.routing
        self.influence = {k: i.mean for k, i in rec.influence.items()}


def build(full: Graph, c: Candidate, stats: _Stats, name: str) -> Graph:
    """The candidate's graph, made from the full one with the recorded statistics."""
    g = full.clone()
    if c.neurons:
        prune_neurons(g, stats.hidden, c.neurons, 8, name)
    routers = [n for n in g.nodes if get_op(n.op).expert_pools is not None]
    for router in routers:
        pools = get_op(router.op).expert_pools(router)
        usage = stats.routing[node_key(router)]
        if c.variant_experts is not None:  # the first experts of each group, split evenly
            per = max(pools.min_keep, c.variant_experts // len(pools.pools))
            keep = sorted(e for p in pools.pools for e in p[:per])
        elif c.experts < 1:
            keep = choose_experts(usage, pools, None, c.experts, None)
        else:
            continue
        if len(keep) < usage.experts:
            prune_router(g, router, keep, name)
    if c.k is not None:
        set_top_k(g, c.k)
    stack = blocks(g)
    if c.variant_layers is not None:
        gone = [b for b in stack if b.index not in c.variant_layers]
    else:
        gone = [stack[i] for i in lowest_influence(stats.influence, stack, c.skip)] if c.skip else []
    remove_blocks(g, gone)
    drop_dead(g)
    return g


@register_pass("elastic")
class Elastic(CalibratedPass):
    """Pick the best combination of layer skipping, expert and neuron pruning and top-k within a cost budget."""

    def __init__(self, budget: float = 0.5, metric: Literal["active_params", "latency"] = "active_params",
                 skip: tuple[int, ...] = (0, 1), experts: tuple[float, ...] = (1.0, 0.75, 0.5),
                 k: tuple[int, ...] = (), neurons: tuple[float, ...] = (0.0, 0.25, 0.5), variants: bool = True,
                 plot: str | None = None, calib: int = 16, seq: int = 32, seed: int = 0,
                 held_out: float = 0.25) -> None:
        if not 0 < budget <= 1:
            raise MocompileError(f"elastic: budget is a share of the full model's cost, in (0, 1] (got {budget})")
        if any(not 0 < e <= 1 for e in experts) or any(not 0 <= n < 1 for n in neurons) or any(s < 0 for s in skip) \
                or any(x < 1 for x in k):
            raise MocompileError("elastic: experts in (0, 1], neurons in [0, 1), skip >= 0, k >= 1")
        self.budget, self.metric, self.plot = float(budget), metric, plot
        self.grid = (tuple(skip), tuple(experts), tuple(k), tuple(neurons))
        self.variants = variants
        self.init_calibration(calib, seq, seed, held_out)

    def describe(self) -> str:
        return f"elastic(budget={self.budget:g},metric={self.metric})"

    def candidates(self, graph: Graph) -> list[Candidate]:
        skip, experts, ks, neurons = self.grid
        top = [int(n.attrs[get_op(n.op).top_k_attr]) for n in graph.nodes if get_op(n.op).top_k_attr]
        ks = ks or (tuple(range(max(top), 0, -1)) if top else ())
        layers = len(blocks(graph))
        out = [Candidate(n, e if top else 1.0, None if not top or k == max(top) else k, s)
               for n, e, k, s in itertools.product(neurons, experts, ks or (None,), skip) if s < layers]
        return list(dict.fromkeys(out)) + (spec_variants(graph) if self.variants else [])

    def cost(self, graph: Graph, ctx: PassContext) -> float:
        if self.metric == "active_params":
            return active_params(graph)
        probe = ctx.options.get("decode_latency")
        return probe(graph) if probe is not None else decode_bytes(graph)

    def cost_note(self, ctx: PassContext) -> str:
        if self.metric == "active_params":
            return "active parameters per token"
        if ctx.options.get("decode_latency") is not None:
            return "single-token decode step time, measured on this machine"
        return "bytes a single-token decode step reads (estimated from the ops' cost facets: no backend to measure with)"

    def transform(self, graph: Graph, fit: Calibration, ctx: PassContext) -> tuple[dict[str, Any], str]:
        _, _, held = self.calibration(graph, ctx)
        stats = _Stats(graph, fit)
        full_cost = self.cost(graph, ctx)
        points = []
        for c in self.candidates(graph):
            try:
                g = build(graph, c, stats, self.name)
            except MocompileError as e:  # a combination the model cannot take (too few layers, groups)
                points.append({"candidate": c.label(), "refused": str(e)})
                continue
            q = quality_report(graph, g, held.inputs)
            points.append({"candidate": c.label(), "cost": self.cost(g, ctx) / full_cost, "kl_mean": q.get("kl_mean", 0.0),
                           "top1_agreement": q.get("top1_agreement"), "rel_error": q["rel_error"], "_c": c})
        scored = sorted((p for p in points if "cost" in p), key=lambda p: (p["cost"], p["kl_mean"]))
        front, best_kl = [], float("inf")
        for p in scored:
            if p["kl_mean"] < best_kl:
                front.append(p)
                best_kl = p["kl_mean"]
        fits = [p for p in scored if p["cost"] <= self.budget]
        if not fits:
            cheapest = scored[0]["cost"] if scored else float("nan")
            raise MocompileError(f"elastic: no candidate fits budget {self.budget:g} of {self.metric} (the cheapest "
                                 f"costs {cheapest:.2f}); give a larger budget or a wider search")
        best = min(fits, key=lambda p: (p["kl_mean"], p["cost"]))
        chosen = build(graph, best["_c"], stats, self.name)
        graph.__dict__.update(chosen.__dict__)  # the pass's graph becomes the chosen one (inputs included)
        for p in points:
            p.pop("_c", None)
        report = {"metric": self.metric, "cost": self.cost_note(ctx), "budget": self.budget, "chosen": best["candidate"],
                  "candidates": points, "pareto_front": [p["candidate"] for p in front]}
        if self.plot:
            report["plot"] = plot_front(scored, front, best, self.budget, self.metric, Path(self.plot))
        return report, (f"chose {best['candidate']} at {best['cost']:.0%} of the {self.metric} "
                        f"(budget {self.budget:.0%}; {len(scored)} candidates, {len(front)} on the Pareto front)")


def plot_front(points: list[dict[str, Any]], front: list[dict[str, Any]], best: dict[str, Any], budget: float,
               metric: str, path: Path) -> str:
    """Quality against cost of every candidate, the Pareto front joined, the choice marked;
    returns the file written, or why not (matplotlib is the optional `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is not installed (pip install 'mocompile[plot]')"
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p["cost"] for p in points], [p["kl_mean"] for p in points], s=14, c="0.6", label="candidates")
    ax.plot([p["cost"] for p in front], [p["kl_mean"] for p in front], "o-", c="C0", label="Pareto front")
    ax.scatter([best["cost"]], [best["kl_mean"]], s=80, marker="*", c="C3", zorder=3, label=f"chosen: {best['candidate']}")
    ax.axvline(budget, ls="--", c="C3", lw=1)
    ax.set_xlabel(f"cost (share of the full model's {metric})")
    ax.set_ylabel("held-out KL vs the full model (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
