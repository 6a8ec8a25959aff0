"""The placements a plan is compared with: round-robin, and DeepSeek's EPLB.

EPLB (the expert-parallel load balancer of DeepSeek-V3, github.com/deepseek-ai/EPLB),
written here from its description, for one layer:

1. hierarchical policy, when the expert groups divide evenly over the nodes: the groups
   (n_group contiguous blocks of experts) are packed onto nodes, each node getting the same
   number of groups, heaviest group first to the lightest node that still has room, so a
   token's group-limited choices stay inside few nodes;
2. inside each node, its experts get the node's share of the redundant replicas one at a
   time, each to the expert whose load per replica is highest;
3. the node's replicas (each carrying load / replica count) are packed onto its devices,
   the same number per device, heaviest first to the lightest device with room.
Otherwise (groups that do not divide over the nodes) the global policy runs steps 2 and 3
over all devices as one node. EPLB assumes equal devices and equal slots: when the experts
and replicas do not divide evenly over the devices, zero-load padding experts fill the
slots and are dropped afterwards. Replicas of one expert split its tokens evenly.
"""

from __future__ import annotations

import heapq

import numpy as np

from mocompile.placement.cost import Placement


def round_robin(experts: int, devices: int) -> Placement:
    """Expert e on device e mod devices, no replicas."""
    out: Placement = [{} for _ in range(devices)]
    for e in range(experts):
        out[e % devices][e] = 1.0
    return out


def balanced_packing(weights: np.ndarray, packs: int) -> list[int]:
    """Pack items into `packs` packs of equal item count (len(weights) / packs), each item,
    heaviest first, into the lightest pack that still has room. Returns the pack of each."""
    n = len(weights)
    per_pack = n // packs
    load, count = [0.0] * packs, [0] * packs
    pack_of = [0] * n
    for item in sorted(range(n), key=lambda i: -weights[i]):
        best = min((p for p in range(packs) if count[p] < per_pack), key=lambda p: load[p])
        pack_of[item] = best
        load[best] += float(weights[item])
        count[best] += 1
    return pack_of


def replicate(weights: np.ndarray, total: int) -> list[int]:
    """Replica count per item after adding `total - len(weights)` replicas one at a time, each
    to the item with the highest load per replica (ties: the lowest index)."""
    counts = [1] * len(weights)
    heap = [(-float(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    for _ in range(total - len(weights)):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (-float(weights[i]) / counts[i], i))
    return counts


def _pack_node(load: np.ndarray, experts: list[int], replicas: int, devices: list[int],
               out: Placement) -> None:
    """Steps 2 and 3 inside one node: `experts` (ids) get `replicas` physical slots in all."""
    w = load[experts]
    counts = replicate(w, replicas)
    phys = [(e_local, counts[e_local]) for e_local in range(len(experts)) for _ in range(counts[e_local])]
    pack_of = balanced_packing(np.array([w[e] / c for e, c in phys]), len(devices))
    for (e_local, c), p in zip(phys, pack_of):
        e = experts[e_local]
        held = out[devices[p]]
        held[e] = held.get(e, 0.0) + 1.0 / c


def eplb(tokens: np.ndarray, replicas: int, n_group: int, nodes: list[list[int]]) -> Placement:
    """EPLB's placement of one layer: `tokens` per expert, `replicas` redundant experts,
    `n_group` expert groups, `nodes` the device indices of each node."""
    experts = len(tokens)
    devices = sum(len(n) for n in nodes)
    pad = -(experts + replicas) % devices
    load = np.concatenate([np.asarray(tokens, dtype=np.float64), np.zeros(pad)])
    total = experts + replicas + pad
    out: Placement = [{} for _ in range(devices)]
    equal_nodes = len({len(n) for n in nodes}) == 1
    hierarchical = (n_group > 1 and equal_nodes and n_group % len(nodes) == 0 and experts % n_group == 0
                    and pad == 0 and total % len(nodes) == 0)
    if not hierarchical:
        _pack_node(load, list(range(len(load))), total, [d for n in nodes for d in n], out)
    else:
        size = experts // n_group
        group_load = load[:experts].reshape(n_group, size).sum(-1)
        node_of = balanced_packing(group_load, len(nodes))
        for i, node in enumerate(nodes):
            members = [g * size + j for g in range(n_group) if node_of[g] == i for j in range(size)]
            _pack_node(load, members, total // len(nodes), node, out)
    for held in out:  # the padding experts are not real
        for e in [e for e in held if e >= experts]:
            del held[e]
    return out
