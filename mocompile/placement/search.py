"""The placement of one layer: candidates, then local search on the cost model.

Candidates (each only where it fits the devices' memory):
- EPLB's placement (baselines.eplb) with the same replica budget, unchanged;
- a speed-aware greedy: EPLB's replication rule (one replica at a time to the expert with
  the highest load per replica, FasterMoE-style shadowing of the hottest experts when the
  budget allows one per device), then the replicas heaviest first each onto the device that
  would finish it soonest (load / speed, so a slower device gets fewer tokens), ties to the
  device whose experts are most often chosen together with it; the shares of a replicated
  expert are then water-filled so its devices finish together;
- MoGE-style grouping when the router picks by groups and the groups divide over the
  devices: whole groups per device, balanced by group load;
- round-robin.
The best two candidates are improved by best-improvement local search from the bottleneck
devices (slowest compute, slowest all-to-all): move a replica to another device, swap two
(with the least busy devices), merge a replica into another replica of the same expert,
split a share onto a new device while the replica budget allows, and re-water-fill a
replicated expert. Moves off the slowest all-to-all device are where co-activation counts:
a swap that puts experts chosen together on one device lowers its messages. A move is taken
only when the modelled layer time drops, or stays equal while the sum of squared device
times drops, so the result is never slower than its start; EPLB's own placement is among the
candidates, so the result is never slower than it: the guarantee is structural.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from mocompile.placement.baselines import balanced_packing, eplb, replicate, round_robin
from mocompile.placement.cost import DeviceCost, LayerCost, Placement

Score = tuple[float, float]
EPS = 1e-12
SWAP_TARGETS = 4  # swaps are tried with this many of the least busy devices (moves with all)
IMPROVED_STARTS = 2  # local search runs from this many of the best candidates
TOP = 8  # largest device times kept per round for pricing changes


@dataclass
class LayerProblem:
    cost: LayerCost
    slots: list[int]  # expert replicas each device may hold for this layer (its memory share)
    n_group: int
    nodes: list[list[int]]  # device indices of each node

    @property
    def devices(self) -> int:
        return len(self.slots)


def fits(problem: LayerProblem, placement: Placement) -> bool:
    return all(len(held) <= s for held, s in zip(placement, problem.slots))


def _score(costs: list[DeviceCost]) -> Score:
    comp = [c.compute_s for c in costs]
    comm = [c.comm_s for c in costs]
    return max(comp) + max(comm), sum(x * x for x in comp) + sum(x * x for x in comm)


def _better(a: Score, b: Score) -> bool:
    """a improves on b: lower time, or the same time and a lower sum of squares."""
    tol = EPS * max(1.0, abs(b[0]))
    return a[0] < b[0] - tol or (a[0] <= b[0] + tol and a[1] < b[1] * (1 - 1e-9))


def water_fill(problem: LayerProblem, placement: Placement, e: int) -> dict[int, dict[int, float]]:
    """New holdings of the devices serving expert e, its shares set so they finish together."""
    cost = problem.cost
    hosts = [d for d, held in enumerate(placement) if e in held]
    t_e = cost.t[e]
    if len(hosts) < 2 or t_e <= 0:
        return {}
    base = {d: sum(s * cost.t[f] for f, s in placement[d].items() if f != e) / cost.rate[d] for d in hosts}
    order = sorted(hosts, key=base.__getitem__)
    level, share = 0.0, {}
    for i in range(len(order)):  # the finish time T with sum_d max(0, T - base_d) * rate_d = t_e
        active = order[: i + 1]
        rate = sum(cost.rate[d] for d in active)
        level = (t_e + sum(base[d] * cost.rate[d] for d in active)) / rate
        if i + 1 == len(order) or level <= base[order[i + 1]]:
            break
    for d in hosts:
        share[d] = max(0.0, level - base[d]) * cost.rate[d] / t_e
    total = sum(share.values())
    out = {}
    for d in hosts:
        held = dict(placement[d])
        s = share[d] / total
        if s < 1e-9:
            del held[e]
        else:
            held[e] = s
        out[d] = held
    return out


def greedy(problem: LayerProblem, replicas: int) -> Placement:
    """The speed-aware greedy candidate (see the module docstring)."""
    cost, n = problem.cost, problem.devices
    counts = [min(c, n) for c in replicate(cost.t, cost.experts + replicas)]
    items = sorted(((cost.t[e] / counts[e], e) for e in range(cost.experts) for _ in range(counts[e])), reverse=True)
    placement: Placement = [{} for _ in range(n)]
    load = [0.0] * n
    ratio = cost.ratio
    unplaced, free = set(range(cost.experts)), sum(problem.slots)
    for w, e in items:
        open_ = [d for d in range(n) if len(placement[d]) < problem.slots[d] and e not in placement[d]]
        if not open_ or (e not in unplaced and free <= len(unplaced)):
            continue  # no room for another replica (the slots left are for experts not yet placed)
        unplaced.discard(e)
        free -= 1
        affinity = (lambda d: sum(ratio[e][f] for f in placement[d])) if ratio is not None else (lambda d: 0.0)
        best = min(open_, key=lambda d: ((load[d] + w) / cost.rate[d], -affinity(d)))
        placement[best][e] = 1.0
        load[best] += w
    for e in range(cost.experts):  # shares: even first, then water-filled
        hosts = [d for d in range(n) if e in placement[d]]
        for d in hosts:
            placement[d][e] = 1.0 / len(hosts)
        for d, held in water_fill(problem, placement, e).items():
            placement[d] = held
    return placement


def grouped(problem: LayerProblem) -> Placement | None:
    """Whole router groups per device (MoGE), when the groups divide over the devices."""
    g, n, experts = problem.n_group, problem.devices, problem.cost.experts
    if g <= 1 or g % n or experts % g:
        return None
    size = experts // g
    pack = balanced_packing(problem.cost.t.reshape(g, size).sum(-1), n)
    out: Placement = [{} for _ in range(n)]
    for group, d in enumerate(pack):
        for e in range(group * size, (group + 1) * size):
            out[d][e] = 1.0
    return out


Change = dict[int, tuple[tuple[int, ...], dict[int, float]]]  # device -> (experts dropped, experts added)


def _as_change(holdings: dict[int, dict[int, float]], placement: Placement) -> Change:
    """New holdings of some devices as a change of the current placement."""
    out: Change = {}
    for d, held in holdings.items():
        old = placement[d]
        remove = tuple(e for e in old if e not in held or held[e] != old[e])
        out[d] = (remove, {e: s for e, s in held.items() if e not in old or old[e] != s})
    return out


class _Search:
    """Best-improvement local search over one layer's placement."""

    def __init__(self, problem: LayerProblem, placement: Placement, budget: int) -> None:
        self.p, self.cost = problem, problem.cost
        self.placement = [dict(h) for h in placement]
        self.arr = [self.cost.arrays(h) for h in self.placement]
        self.costs = self.cost.devices(self.placement)
        self.score = _score(self.costs)
        self.budget = budget  # replicas the layer may hold in all (experts + redundant)

    def _round_start(self) -> None:
        """What pricing a change needs of the untouched devices: the few largest compute and
        all-to-all times, and the sum of squares, so a change costs O(devices it touches)."""
        comp = [c.compute_s for c in self.costs]
        comm = [c.comm_s for c in self.costs]
        self.top_comp = sorted(range(len(comp)), key=comp.__getitem__, reverse=True)[:TOP]
        self.top_comm = sorted(range(len(comm)), key=comm.__getitem__, reverse=True)[:TOP]
        self.squares = sum(x * x for x in comp) + sum(x * x for x in comm)

    def _rest_max(self, top: list[int], attr: str, touched: dict[int, DeviceCost]) -> float:
        for d in top:
            if d not in touched:
                return getattr(self.costs[d], attr)
        return max((getattr(c, attr) for d, c in enumerate(self.costs) if d not in touched), default=0.0)

    def _try(self, change: Change) -> tuple[Score, dict[int, DeviceCost]] | None:
        touched: dict[int, DeviceCost] = {}
        for d, (remove, add) in change.items():
            held = self.placement[d]
            if len(held) - len(remove) + len(add) > self.p.slots[d]:
                return None
            touched[d] = self.cost.changed(d, held, self.arr[d], self.costs[d].tokens, remove, add)
        comp = max(self._rest_max(self.top_comp, "compute_s", touched), *(c.compute_s for c in touched.values()))
        comm = max(self._rest_max(self.top_comm, "comm_s", touched), *(c.comm_s for c in touched.values()))
        squares = self.squares + sum(c.compute_s ** 2 + c.comm_s ** 2 - self.costs[d].compute_s ** 2
                                     - self.costs[d].comm_s ** 2 for d, c in touched.items())
        return (comp + comm, squares), touched

    def _moves(self, b: int, lighten: bool) -> Iterator[Change]:
        """The changes from device b; with `lighten` (b is the slowest at compute only), only
        swaps that take tokens off b."""
        held_b, n, t = self.placement[b], self.p.devices, self.cost.t
        used = sum(len(h) for h in self.placement)
        spare = sorted(range(n), key=lambda d: self.costs[d].compute_s + self.costs[d].comm_s)[:SWAP_TARGETS]
        for e, s in list(held_b.items()):
            replicated = False
            for d in range(n):
                if d == b:
                    continue
                held_d = self.placement[d]
                if e in held_d:
                    replicated = True
                    yield {b: ((e,), {}), d: ((e,), {e: held_d[e] + s})}  # merge
                    continue
                yield {b: ((e,), {}), d: ((), {e: s})}  # move
                if used < self.budget:  # split: a new replica takes half the share
                    yield {b: ((e,), {e: s / 2}), d: ((), {e: s / 2})}
                if d not in spare:
                    continue
                for f, sf in held_d.items():  # swap, with the least busy devices only
                    if f not in held_b and not (lighten and sf * t[f] >= s * t[e]):
                        yield {b: ((e,), {f: sf}), d: ((f,), {e: s})}
            if replicated:
                yield _as_change(water_fill(self.p, self.placement, e), self.placement)

    def _apply(self, change: Change) -> None:
        for d, (remove, add) in change.items():
            held = {e: s for e, s in self.placement[d].items() if e not in remove}
            held.update(add)
            self.placement[d] = held
            self.arr[d] = self.cost.arrays(held)

    def run(self, max_rounds: int) -> Placement:
        for _ in range(max_rounds):
            self._round_start()
            slow_compute, slow_comm = self.top_comp[0], self.top_comm[0]
            best = None
            for b in {slow_compute, slow_comm}:
                for change in self._moves(b, lighten=b != slow_comm):
                    if not change:
                        continue
                    tried = self._try(change)
                    if tried is not None and _better(tried[0], self.score if best is None else best[0]):
                        best = (tried[0], tried[1], change)
            if best is None:
                break
            self.score = best[0]
            for d, c in best[1].items():
                self.costs[d] = c
            self._apply(best[2])
        return self.placement


def improve(problem: LayerProblem, placement: Placement, budget: int, max_rounds: int = 200) -> Placement:
    """`placement` after local search; never slower on the cost model."""
    return _Search(problem, placement, budget).run(max_rounds)


def eplb_for(problem: LayerProblem, replicas: int) -> Placement:
    return eplb(problem.cost.t, replicas, problem.n_group, problem.nodes)


def best_placement(problem: LayerProblem, replicas: int, max_rounds: int = 200) -> Placement:
    """The best placement found for one layer with at most `replicas` redundant experts."""
    budget = problem.cost.experts + replicas
    starts = [eplb_for(problem, replicas), greedy(problem, replicas), grouped(problem),
              round_robin(problem.cost.experts, problem.devices)]
    scored = [(_score(problem.cost.devices(s)), i, s) for i, s in enumerate(starts)
              if s is not None and fits(problem, s)]
    assert scored, "the greedy candidate always fits the slots"
    scored.sort(key=lambda x: x[:2])
    best = scored[0][0], scored[0][2]
    for _, _, start in scored[:IMPROVED_STARTS]:
        candidate = improve(problem, start, budget, max_rounds)
        score = _score(problem.cost.devices(candidate))
        if _better(score, best[0]):
            best = (score, candidate)
    return best[1]
