"""The cost model every placement is judged by: modelled time of one step of the MoE layers.

For one layer and one device d holding expert replicas (expert e with share s_e, the
fraction of e's tokens this replica serves):

- tokens_d = sum s_e * t_e (t_e: assignments of expert e in one step);
- compute_d = max(tokens_d * flops_per_token / peak_flops_d,      (compute-bound)
                  replicas_d * expert_bytes / memory_bandwidth_d)  (every held expert's
                  weights are read once: what bounds a decode step);
- dispatched_d: the tokens sent to d, one message per token however many of its experts d
  holds. From pairwise statistics it is estimated as
      sum_e s_e t_e / (1 + sum_{f on d, f != e} s_f C[e, f] / t_e)
  (each token's message shared among its experts on d; exact when the tokens' choices on d
  are all-or-none, and without co-activation statistics every assignment is a message);
- comm_d: dispatched_d tokens arrive from the devices running attention (an even share from
  each) and go back combined, each way hidden x activation bytes, over the link from each
  source (its bandwidth and latency); a token starting on d itself does not move.

A layer's time is the slowest device's compute plus the slowest device's all-to-all
(max_d compute_d + max_d comm_d: the all-to-all and the expert compute are collective
steps, each as slow as its slowest member); a step is the sum over layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mocompile.errors import MocompileError
from mocompile.placement.devices import Cluster

WEIGHT_BYTES = {"fp32": 4.0, "tf32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
COMPUTE_DTYPE = {"int4": "int8", "tf32": "fp32"}  # weights of these are computed in this dtype

Placement = list[dict[int, float]]  # per device (cluster order): expert -> share of its tokens
SMALL = 12  # experts on a device up to which a change is priced in plain Python, not with arrays


@dataclass(frozen=True)
class ExpertShape:
    """One routed expert: a (gated) FFN hidden -> inner -> hidden with `dtype` weights."""

    hidden: int = 7168  # DeepSeek-V3's figures, when the statistics do not say
    inner: int = 2048
    gated: bool = True
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        if self.dtype not in WEIGHT_BYTES:
            raise MocompileError(f"unknown expert dtype {self.dtype!r} (known: {', '.join(WEIGHT_BYTES)})")
        if self.hidden < 1 or self.inner < 1:
            raise MocompileError(f"expert sizes must be positive (hidden {self.hidden}, inner {self.inner})")

    @property
    def matrices(self) -> int:
        return 3 if self.gated else 2

    @property
    def flops_per_token(self) -> float:
        return 2.0 * self.hidden * self.inner * self.matrices

    @property
    def weight_bytes(self) -> int:
        return int(self.hidden * self.inner * self.matrices * WEIGHT_BYTES[self.dtype])

    @property
    def act_bytes(self) -> float:
        """Bytes of one token's activation on the wire (fp32 models send fp32, others bf16)."""
        return self.hidden * (4.0 if self.dtype == "fp32" else 2.0)

    @property
    def compute_dtype(self) -> str:
        return COMPUTE_DTYPE.get(self.dtype, self.dtype)


@dataclass
class Held:
    """One device's experts as arrays (see LayerCost.arrays)."""

    idx: np.ndarray
    share: np.ndarray
    den: np.ndarray | None
    pos: dict[int, int]
    den_map: dict[int, float]  # the same divisors by expert, for the plain-Python path


@dataclass
class DeviceCost:
    tokens: float
    compute_s: float
    comm_s: float
    dispatched: float


class LayerCost:
    """The cost model of one layer on one cluster (see the module docstring)."""

    def __init__(self, cluster: Cluster, shape: ExpertShape, tokens: np.ndarray,
                 coactivation: np.ndarray | None) -> None:
        self.cluster, self.shape = cluster, shape
        self.t = np.asarray(tokens, dtype=np.float64)
        self.experts = len(self.t)
        safe = np.where(self.t > 0, self.t, 1.0)
        self.ratio_m = None if coactivation is None else np.asarray(coactivation, dtype=np.float64) / safe[:, None]
        self.ratio = None if self.ratio_m is None else self.ratio_m.tolist()
        devices = cluster.devices
        self.rate = [d.flops_per_s(shape.compute_dtype) / shape.flops_per_token for d in devices]
        self.read_s = [shape.weight_bytes / (d.memory_gb_per_s * 1e9) for d in devices]
        origin = cluster.origin()
        self.per_token_s, self.latency_s = [], []
        for d in devices:
            links = [(o, cluster.link(s, d)) for s, o in zip(devices, origin) if s is not d and o > 0]
            self.per_token_s.append(sum(2 * o * shape.act_bytes / (link.gb_per_s * 1e9) for o, link in links))
            self.latency_s.append(sum(2 * link.latency_us * 1e-6 for _, link in links))
        self.origin = origin

    def device(self, d: int, held: dict[int, float]) -> DeviceCost:
        if not held:
            return DeviceCost(0.0, 0.0, 0.0, 0.0)
        items = list(held.items())
        t = self.t
        tokens = sum(s * t[e] for e, s in items)
        if self.ratio is None:
            dispatched = tokens
        else:
            dispatched = 0.0
            for e, s in items:
                row = self.ratio[e]
                dispatched += s * t[e] / (1.0 + sum(sf * row[f] for f, sf in items if f != e))
        compute = max(tokens / self.rate[d], sum(1 for _, s in items if s > 0) * self.read_s[d])
        comm = dispatched * self.per_token_s[d] + (self.latency_s[d] if dispatched > 0 else 0.0)
        return DeviceCost(tokens, compute, comm, dispatched)

    def arrays(self, held: dict[int, float]) -> Held:
        """`held` as arrays with each expert's estimator divisor (1 + the sum of its co-located
        co-activation ratios), which the local search keeps so that a change costs a few
        vector operations over the device's experts."""
        idx = np.fromiter(held, dtype=np.int64, count=len(held))
        share = np.fromiter(held.values(), dtype=np.float64, count=len(held))
        den = None if self.ratio_m is None else 1.0 + self.ratio_m[np.ix_(idx, idx)] @ share
        den_map = {} if den is None else dict(zip(held, den.tolist()))
        return Held(idx, share, den, {int(e): i for i, e in enumerate(idx)}, den_map)

    def changed(self, d: int, held: dict[int, float], arr: Held, tokens: float,
                remove: tuple[int, ...], add: dict[int, float]) -> DeviceCost:
        """Device d's cost after dropping the experts `remove` from `held` and adding `add`
        (expert -> share; an expert in both has its share replaced), from its arrays and
        current `tokens`."""
        t = self.t
        tokens = tokens - sum(held[g] * t[g] for g in remove) + sum(s * t[g] for g, s in add.items())
        count = len(held) - len(remove) + len(add)
        if count == 0:
            return DeviceCost(0.0, 0.0, 0.0, 0.0)
        r = self.ratio_m
        if r is None:
            dispatched = tokens
        elif len(held) <= SMALL:
            dispatched = self._dispatched_small(held, arr, remove, add)
        else:
            idx, share, den = arr.idx, arr.share, arr.den
            if remove:
                keep = np.ones(len(idx), dtype=bool)
                keep[[arr.pos[g] for g in remove]] = False
                idx, share, den = idx[keep], share[keep], den[keep]  # type: ignore[index]
                for g in remove:
                    den = den - held[g] * r[idx, g]
            for g, s in add.items():
                den = den + s * r[idx, g]  # type: ignore[operator]
            dispatched = float((share * t[idx] / den).sum()) if len(idx) else 0.0
            for g, s in add.items():
                dg = 1.0 + float(r[g, idx] @ share) + sum(s2 * r[g, g2] for g2, s2 in add.items() if g2 != g)
                dispatched += s * t[g] / dg
        compute = max(tokens / self.rate[d], count * self.read_s[d])
        comm = dispatched * self.per_token_s[d] + (self.latency_s[d] if dispatched > 0 else 0.0)
        return DeviceCost(tokens, compute, comm, dispatched)

    def _dispatched_small(self, held: dict[int, float], arr: Held, remove: tuple[int, ...],
                          add: dict[int, float]) -> float:
        """`changed`'s dispatched tokens in plain Python: faster than arrays for a few experts."""
        t, r, den = self.t, self.ratio, arr.den_map
        out = 0.0
        for f, sf in held.items():
            if f in remove:
                continue
            row = r[f]  # type: ignore[index]
            df = den[f] - sum(held[g] * row[g] for g in remove) + sum(s * row[g] for g, s in add.items())
            out += sf * t[f] / df
        for g, s in add.items():
            row = r[g]  # type: ignore[index]
            dg = 1.0 + sum(sf * row[f] for f, sf in held.items() if f not in remove)
            dg += sum(s2 * row[g2] for g2, s2 in add.items() if g2 != g)
            out += s * t[g] / dg
        return out

    def devices(self, placement: Placement) -> list[DeviceCost]:
        return [self.device(d, held) for d, held in enumerate(placement)]

    def time(self, placement: Placement) -> float:
        costs = self.devices(placement)
        return max(c.compute_s for c in costs) + max(c.comm_s for c in costs)

    def traffic_bytes(self, costs: Sequence[DeviceCost]) -> float:
        """Bytes that cross a link in one step (dispatch and combine)."""
        return sum(2 * c.dispatched * (1 - o) * self.shape.act_bytes for c, o in zip(costs, self.origin))


def imbalance(costs: Sequence[DeviceCost]) -> float:
    """max over mean of the devices' tokens (1.0: perfectly even)."""
    tokens = [c.tokens for c in costs]
    mean = sum(tokens) / len(tokens)
    return max(tokens) / mean if mean > 0 else 1.0


def check_shares(placement: Placement, experts: int, where: str) -> None:
    """Every expert is served, and the shares of each expert sum to 1."""
    total = np.zeros(experts)
    for held in placement:
        for e, s in held.items():
            total[e] += s
    bad = np.flatnonzero(np.abs(total - 1.0) > 1e-6)
    if bad.size:
        raise MocompileError(f"{where}: expert {bad[0]}'s shares sum to {total[bad[0]]:g}, not 1")
