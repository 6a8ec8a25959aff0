"""Resource and latency estimates of a design against a device, the reuse factors that make
it fit, and the streaming plan of a model whose weights do not fit on chip.

The model (README, "How the estimates are made"):
- a dense product n_in x n_out at reuse factor R (hls4ml's resource strategy: R divides
  n_in, or is n_in * m with m dividing n_out) has ceil(n_in * n_out / R) multipliers, each ceil(a / 27) * ceil(b / 18) DSP48E2
  slices for a-bit by b-bit operands (the wider one on the 27-bit port), and an adder of the
  accumulator's width per multiplier (that many LUTs); it starts every R cycles (II = R) and
  takes R + PIPELINE cycles;
- its weights are reshaped to R words (per expert) of n_in * n_out / R weights: an array D
  words deep and W bits wide takes the fewest 18 Kb block RAMs over the block's shapes
  (512 x 36, 1K x 18, 2K x 9, 4K x 4, 8K x 2, 16K x 1): min ceil(D / d) * ceil(W / w), or
  ceil(D / 4096) * ceil(W / 72) UltraRAMs;
- the KV cache of an attention layer holds keys and values, capacity * kv_heads rows of
  head_dim codes each (latent attention: its k_nope, shared rope key and value rows); an
  embedding table is rows x hidden codes read one value a cycle;
- the other work of a kernel (norms, the router's rounds, softmax, silu) is its `extra`;
- a token runs the layers one after the other, routed experts top_k times; attention is
  costed at the last position of a full cache (and at position 0);
- the design may use UTILIZATION of each resource. The smallest power-of-two reuse factor
  whose DSPs and LUTs fit is chosen; memory is placed KV caches first, then the dense
  weights, then the routed experts, each in block RAM, else UltraRAM, else off chip. What
  lands off chip streams from the device's off-chip memory every token it is used: bytes /
  (bandwidth / clock) more cycles per token (a routed expert's weights only for the top_k
  experts a token visits, into a double buffer of two experts on chip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mocompile.backends.fpga.design import Design, DenseUnit, ident
from mocompile.backends.fpga.lowerings import kernel_for
from mocompile.backends.fpga.devices import Device
from mocompile.errors import MocompileError

UTILIZATION = 0.8
PIPELINE = 5
BRAM_SHAPES = ((512, 36), (1024, 18), (2048, 9), (4096, 4), (8192, 2), (16384, 1))
URAM_SHAPE = (4096, 72)
MAX_REUSE = 1 << 24


def dsp_per_multiply(a: int, b: int) -> int:
    a, b = max(a, b), min(a, b)
    return math.ceil(a / 27) * math.ceil(b / 18)


def bram18(depth: int, bits: int) -> int:
    return min(math.ceil(depth / d) * math.ceil(bits / w) for d, w in BRAM_SHAPES)


def uram(depth: int, bits: int) -> int:
    return math.ceil(depth / URAM_SHAPE[0]) * math.ceil(bits / URAM_SHAPE[1])


def reuse_factors(n_in: int, n_out: int) -> list[int]:
    """The reuse factors hls4ml's resource kernels take: divisors of n_in, and multiples
    n_in * m of it with m dividing n_out."""
    return sorted({d for d in range(1, n_in + 1) if n_in % d == 0} | {n_in * m for m in range(1, n_out + 1)
                                                                      if n_out % m == 0})


def reuse_for(n_in: int, n_out: int, target: int) -> int:
    """The largest reuse factor not above target."""
    return max(r for r in reuse_factors(n_in, n_out) if r <= max(target, 1))


@dataclass
class UnitCost:
    unit: DenseUnit
    rf: int
    multipliers: int
    dsp: int
    lut: int
    depth: int  # words of its weight array (all experts)
    bits: int  # bits per word
    cycles: int  # per call

    def to_json(self) -> dict[str, Any]:
        u = self.unit
        return {"name": u.key, "shape": [u.n_out, u.n_in], "reuse_factor": self.rf, "ii": self.rf,
                "multipliers": self.multipliers, "dsp": self.dsp, "lut": self.lut, "calls_per_token": u.calls,
                "cycles_per_call": self.cycles, "weight_array": [self.depth, self.bits],
                "weights": f"ap_fixed<{u.w.width},{u.w.integer}>"}


def unit_cost(u: DenseUnit, rf: int) -> UnitCost:
    mults = math.ceil(u.n_in * u.n_out / rf)
    acc = u.x.width + u.w.width + math.ceil(math.log2(max(u.n_in, 2))) + 1
    per_matrix = u.n_in * u.n_out
    return UnitCost(u, rf, mults, mults * dsp_per_multiply(u.x.width, u.w.width), mults * acc + 150,
                    rf * (u.weights // per_matrix), per_matrix // rf * u.w.width, rf + PIPELINE)


def _units(design: Design) -> list[tuple[Any, list[DenseUnit]]]:
    return [(n, kernel_for(n).units(n, design) if kernel_for(n).units else []) for n in design.graph.nodes]


def _compute(design: Design, r: int) -> tuple[list[UnitCost], int, int]:
    costs = [unit_cost(u, reuse_for(u.n_in, u.n_out, r)) for _, units in _units(design) for u in units]
    extra_dsp = extra_lut = 0
    for n in design.graph.nodes:
        if kernel_for(n).extra:
            _, dsp, lut, _ = kernel_for(n).extra(n, design)
            extra_dsp, extra_lut = extra_dsp + dsp, extra_lut + lut
    return costs, sum(c.dsp for c in costs) + extra_dsp, sum(c.lut for c in costs) + extra_lut


def choose_reuse(design: Design, device: Device) -> tuple[int, list[UnitCost], int, int]:
    """The smallest power-of-two reuse target whose DSPs and LUTs fit the device; sets design.reuse."""
    r = 1
    while True:
        costs, dsp, lut = _compute(design, r)
        if dsp <= UTILIZATION * device.dsp and lut <= UTILIZATION * device.lut:
            design.reuse = {ident(c.unit.key): c.rf for c in costs}
            return r, costs, dsp, lut
        if all(c.rf == c.unit.n_in * c.unit.n_out for c in costs) or r >= MAX_REUSE:
            raise MocompileError(
                f"{design.graph.name} cannot fit {device.name}: even with every dense product at its largest reuse "
                f"factor it needs {dsp:,} DSPs and {lut:,} LUTs, the device allows {int(UTILIZATION * device.dsp):,} "
                f"and {int(UTILIZATION * device.lut):,} ({UTILIZATION:.0%} of {device.dsp:,} and {device.lut:,})")
        r *= 2


def _memories(design: Design, capacity: int) -> list[tuple[str, int, int]]:
    return [m for n in design.graph.nodes if kernel_for(n).memories for m in kernel_for(n).memories(n, design, capacity)]


def plan(design: Design, device: Device, capacity: int) -> dict[str, Any]:
    """The estimate the artifact records (see the module doc); sets design.reuse."""
    r, costs, dsp, lut = choose_reuse(design, device)
    bytes_per_cycle = device.offchip_gbps * 1e9 / (device.clock_mhz * 1e6)
    budget = {"bram18": int(UTILIZATION * device.bram18), "uram": int(UTILIZATION * device.uram)}
    used = {"bram18": 0, "uram": 0}
    placed, off_chip = [], []
    arrays = [(name, d, b, None) for name, d, b in _memories(design, capacity)]
    arrays += [(c.unit.key, c.depth, c.bits, c) for c in sorted(costs, key=lambda c: c.unit.role == "experts")]
    stream_cycles = 0.0
    for name, depth, bits, cost in arrays:
        need = {"bram18": bram18(depth, bits), "uram": uram(depth, bits)}
        where = next((m for m in ("bram18", "uram") if used[m] + need[m] <= budget[m]), None)
        if where is not None:
            used[where] += need[where]
            placed.append({"array": name, "memory": where, "blocks": need[where]})
            continue
        if cost is None:  # a KV cache or table off chip: a position reads all of it (at most)
            per_token = depth * bits / 8
        else:  # a streamed weight matrix: the matrices a token uses
            per_token = cost.unit.calls * cost.unit.n_in * cost.unit.n_out * cost.unit.w.width / 8
            buffer = {"bram18": bram18(2 * cost.rf, bits), "uram": uram(2 * cost.rf, bits)}
            for m in ("bram18", "uram"):
                if used[m] + buffer[m] <= budget[m]:
                    used[m] += buffer[m]
                    break
        stream_cycles += per_token / bytes_per_cycle
        off_chip.append({"array": name, "kind": "memory" if cost is None else cost.unit.role,
                         "bytes_per_token": int(per_token), "cycles_per_token": math.ceil(per_token / bytes_per_cycle)})
    extra = {id(n): kernel_for(n).extra(n, design) if kernel_for(n).extra else (0, 0, 0, 0)
             for n in design.graph.nodes}
    by_key = {c.unit.key: c for c in costs}
    rows, total_cycles, first_cycles = [], 0, 0
    for node, units in _units(design):
        unit_cycles = sum(by_key[u.key].cycles * u.calls for u in units)
        at = kernel_for(node).position_cycles
        cycles = unit_cycles + (at(node, capacity) if at else extra[id(node)][0])
        at_zero = unit_cycles + (at(node, 1) if at else extra[id(node)][0])
        total_cycles, first_cycles = total_cycles + cycles, first_cycles + at_zero
        rows.append({"node": node.outputs[0].name, "op": node.op, "loc": node.loc, "cycles": cycles,
                     "dsp": sum(by_key[u.key].dsp for u in units) + extra[id(node)][1],
                     "lut": sum(by_key[u.key].lut for u in units) + extra[id(node)][2],
                     "dense": [by_key[u.key].to_json() for u in units]})
    streamed = math.ceil(stream_cycles)
    per_token = total_cycles + streamed
    totals = {"dsp": dsp, "lut": lut, **used}
    return {
        "device": device.to_json(), "utilization_limit": UTILIZATION, "reuse_target": r,
        "totals": totals,
        "utilization": {k: round(v / max(getattr(device, k), 1), 4) for k, v in totals.items()},
        "cycles_per_token": {"at_position_0": first_cycles + streamed, "at_full_cache": per_token,
                             "streaming": streamed},
        "tokens_per_second_at_full_cache": round(device.clock_mhz * 1e6 / per_token, 1),
        "kv_cache_positions": capacity,
        "fits_on_chip": not off_chip,
        "placement": placed,
        "off_chip": off_chip,
        "kernels": rows,
    }
