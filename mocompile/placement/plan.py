"""A placement plan for every MoE layer of a model, its figures on the cost model, and the
same figures for round-robin and EPLB on the same statistics.

Memory: each device's free memory (capacity less reserved) is split evenly over the layers,
so a layer may put `floor(free / (layers x expert_bytes))` replicas on a device. A layer
whose experts do not fit in those slots is an error that names it.

Replicas: `replicas=R` gives each layer up to R redundant experts; without it, R is chosen
per model by the cost model among 0, devices/2, devices and 2 x devices (those that fit),
and EPLB is computed with the R chosen.

`to_json` is the documented output of `mocompile place --json` (README, "Expert placement"):
{"devices": [{"name", "experts": [{"layer", "expert", "share"}], "memory_bytes", "tokens",
"time_s"}], "imbalance", "step_time_s", "baselines": {"round_robin": {...}, "eplb": {...}}}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mocompile.errors import MocompileError
from mocompile.placement.baselines import round_robin
from mocompile.placement.cost import DeviceCost, ExpertShape, LayerCost, Placement, check_shares, imbalance
from mocompile.placement.devices import GIB, Cluster
from mocompile.placement.search import LayerProblem, best_placement, eplb_for, fits
from mocompile.placement.stats import ExpertStats, tokens_per_step


@dataclass
class LayerResult:
    placement: Placement
    costs: list[DeviceCost]
    time_s: float
    traffic_bytes: float
    fits: bool

    @property
    def imbalance(self) -> float:
        return imbalance(self.costs)

    @property
    def replicas(self) -> int:
        return sum(len(h) for h in self.placement)


def _result(problem: LayerProblem, placement: Placement) -> LayerResult:
    costs = problem.cost.devices(placement)
    time = max(c.compute_s for c in costs) + max(c.comm_s for c in costs)
    return LayerResult(placement, costs, time, problem.cost.traffic_bytes(costs), fits(problem, placement))


@dataclass
class Scheme:
    """One placement of every layer with its summary figures."""

    layers: dict[int, LayerResult]

    @property
    def step_time_s(self) -> float:
        return sum(r.time_s for r in self.layers.values())

    @property
    def imbalance(self) -> float:
        return float(np.mean([r.imbalance for r in self.layers.values()]))

    @property
    def traffic_bytes(self) -> float:
        return sum(r.traffic_bytes for r in self.layers.values())

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.layers.values())

    def summary(self) -> dict[str, float]:
        return {"imbalance": self.imbalance, "step_time_s": self.step_time_s}


@dataclass
class Plan:
    cluster: Cluster
    shape: ExpertShape
    replicas: int
    placed: Scheme
    round_robin: Scheme
    eplb: Scheme

    def to_json(self) -> dict[str, Any]:
        devices = []
        for d, dev in enumerate(self.cluster.devices):
            experts = [{"layer": layer, "expert": int(e), "share": float(s)}
                       for layer, r in sorted(self.placed.layers.items()) for e, s in sorted(r.placement[d].items())]
            costs = [r.costs[d] for r in self.placed.layers.values()]
            devices.append({"name": dev.name, "experts": experts,
                            "memory_bytes": len(experts) * self.shape.weight_bytes,
                            "tokens": float(sum(c.tokens for c in costs)),
                            "time_s": float(sum(c.compute_s + c.comm_s for c in costs))})
        return {"devices": devices, "imbalance": self.placed.imbalance, "step_time_s": self.placed.step_time_s,
                "baselines": {"round_robin": self.round_robin.summary(), "eplb": self.eplb.summary()}}


def layer_slots(cluster: Cluster, shape: ExpertShape, layers: int) -> list[int]:
    return [int(d.memory_bytes // (layers * shape.weight_bytes)) for d in cluster.devices]


def _problems(stats: ExpertStats, cluster: Cluster, shape: ExpertShape,
              step_tokens: float | None) -> dict[int, LayerProblem]:
    slots = layer_slots(cluster, shape, len(stats.layers))
    names = [d.name for d in cluster.devices]
    nodes = [[i for i, d in enumerate(cluster.devices) if d.node == node] for node in cluster.nodes]
    out = {}
    for layer, ls in sorted(stats.layers.items()):
        if ls.experts > sum(slots):
            per = shape.weight_bytes / GIB
            raise MocompileError(
                f"layer {layer}: its {ls.experts} experts of {per:.3g} GiB do not fit: the devices hold "
                f"{sum(slots)} expert(s) per layer in all ({', '.join(f'{n} {s}' for n, s in zip(names, slots))}) "
                f"after splitting their free memory over {len(stats.layers)} layer(s)")
        scale = 1.0 if step_tokens is None else step_tokens / tokens_per_step(stats, layer)
        co = None if ls.coactivation is None else ls.coactivation * scale
        out[layer] = LayerProblem(LayerCost(cluster, shape, ls.tokens * scale, co), slots,
                                  int(stats.model.get("n_group", 1)), nodes)
    return out


def replica_options(problems: dict[int, LayerProblem], devices: int) -> list[int]:
    experts = max(p.cost.experts for p in problems.values())
    room = min(sum(p.slots) for p in problems.values()) - experts
    return sorted({r for r in (0, devices // 2, devices, 2 * devices) if r <= min(room, experts)})


def make_plan(stats: ExpertStats, cluster: Cluster, shape: ExpertShape, replicas: int | None = None,
              step_tokens: float | None = None, max_rounds: int = 200) -> Plan:
    """Place every layer of `stats` on `cluster` (see the module docstring)."""
    problems = _problems(stats, cluster, shape, step_tokens)
    n = len(cluster.devices)
    if replicas is not None:
        if replicas < 0:
            raise MocompileError(f"replicas must be >= 0 (got {replicas})")
        for layer, p in problems.items():
            if p.cost.experts + replicas > sum(p.slots):
                raise MocompileError(f"layer {layer}: {p.cost.experts} experts + {replicas} replicas do not fit: the "
                                     f"devices hold {sum(p.slots)} per layer; give fewer replicas")
        options = [replicas]
    else:
        options = replica_options(problems, n)
    best: tuple[float, int, Scheme] | None = None
    for r in options:
        scheme = Scheme({layer: _result(p, best_placement(p, r, max_rounds)) for layer, p in problems.items()})
        if best is None or scheme.step_time_s < best[0] * (1 - 1e-9):
            best = (scheme.step_time_s, r, scheme)
    assert best is not None
    _, chosen, placed = best
    for layer, r in placed.layers.items():
        check_shares(r.placement, problems[layer].cost.experts, f"layer {layer}")
    rr = Scheme({layer: _result(p, round_robin(p.cost.experts, n)) for layer, p in problems.items()})
    ep = Scheme({layer: _result(p, eplb_for(p, chosen)) for layer, p in problems.items()})
    return Plan(cluster, shape, chosen, placed, rr, ep)


def shape_of(stats: ExpertStats, hidden: int | None = None, inner: int | None = None,
             dtype: str | None = None, gated: bool | None = None) -> ExpertShape:
    """The expert shape: what is given, else what the statistics say, else DeepSeek-V3's."""
    m, default = stats.model, ExpertShape()
    return ExpertShape(hidden or m.get("hidden", default.hidden), inner or m.get("expert_hidden", default.inner),
                       m.get("gated", default.gated) if gated is None else gated,
                       dtype or m.get("dtype", default.dtype))
