"""The device description: what expert placement places onto.

A TOML file (read with the standard library's `tomllib`) lists the devices and the network
between them:

    name = "my-cluster"                 # optional, for reports

    [network]                           # defaults for every pair of devices
    intra_node = { gb_per_s = 450, latency_us = 2 }   # two devices of the same node
    inter_node = { gb_per_s = 50, latency_us = 5 }    # devices of different nodes

    [[device]]
    name = "gpu"                        # with count = N: gpu0 .. gpu{N-1}
    count = 8
    kind = "gpu"                        # gpu | cpu | fpga
    node = "node0"
    memory_gib = 80                     # capacity for expert weights ...
    reserved_gib = 20                   # ... less what the rest of the model and caches keep
    memory_gb_per_s = 3350              # memory bandwidth
    tflops = { bf16 = 989, fp32 = 67 }  # peak compute per dtype
    attention = true                    # runs the dense layers, so tokens start here (default true)

    [[link]]                            # overrides the network default for one pair
    between = ["gpu0", "cpu0"]
    gb_per_s = 64
    latency_us = 2

A link's bandwidth is what one device can move to the others over that class of link per
direction (an NVSwitch port, a NIC, a PCIe slot): the cost model charges a device's
all-to-all traffic to it. Every problem with a file is one `MocompileError` line naming the
file and the entry: an unknown key, a missing or negative figure, a link to a device that is
not defined, two devices of one name.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mocompile.errors import MocompileError
from mocompile.files import read_document

KINDS = ("gpu", "cpu", "fpga")
DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "int4")
GIB = 1 << 30

_DEVICE_KEYS = ("name", "count", "kind", "node", "memory_gib", "reserved_gib", "memory_gb_per_s", "tflops",
                "attention")
_LINK_KEYS = ("gb_per_s", "latency_us")
_TOP_KEYS = ("name", "network", "device", "link")


@dataclass(frozen=True)
class Link:
    """One class of connection: bandwidth per direction (GB/s) and latency per message (us)."""

    gb_per_s: float
    latency_us: float

    def seconds(self, nbytes: float) -> float:
        """Time to move `nbytes` over this link (0 when nothing moves)."""
        return 0.0 if nbytes <= 0 else self.latency_us * 1e-6 + nbytes / (self.gb_per_s * 1e9)


@dataclass(frozen=True)
class Device:
    name: str
    kind: str
    node: str
    memory_bytes: int  # capacity for experts: memory_gib less reserved_gib
    memory_gb_per_s: float
    tflops: Mapping[str, float]
    attention: bool = True

    def flops_per_s(self, dtype: str) -> float:
        """Peak throughput for `dtype`; a dtype the device lists no figure for is an error, not a guess."""
        if dtype not in self.tflops:
            raise MocompileError(f"device {self.name!r} gives no tflops for {dtype} (it gives "
                                 f"{', '.join(sorted(self.tflops)) or 'none'}); add tflops.{dtype}")
        return self.tflops[dtype] * 1e12


@dataclass
class Cluster:
    """Devices and the links between them."""

    name: str
    devices: list[Device]
    intra_node: Link
    inter_node: Link
    links: dict[frozenset[str], Link] = field(default_factory=dict)

    def link(self, a: Device, b: Device) -> Link:
        given = self.links.get(frozenset((a.name, b.name)))
        if given is not None:
            return given
        return self.intra_node if a.node == b.node else self.inter_node

    @property
    def nodes(self) -> list[str]:
        return list(dict.fromkeys(d.node for d in self.devices))

    def origin(self) -> list[float]:
        """The fraction of tokens starting on each device: spread evenly over the devices that
        run attention (all of them when none is marked)."""
        hosts = [d.attention for d in self.devices]
        if not any(hosts):
            hosts = [True] * len(self.devices)
        n = sum(hosts)
        return [1.0 / n if h else 0.0 for h in hosts]


def _number(value: Any, what: str, where: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MocompileError(f"{where}: {what} must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise MocompileError(f"{where}: {what} must be {'positive' if positive else 'non-negative'}, got {value}")
    return float(value)


def _unknown(given: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    extra = sorted(set(given) - set(known))
    if extra:
        raise MocompileError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")


def _link(data: Any, where: str) -> Link:
    if not isinstance(data, dict):
        raise MocompileError(f"{where}: expected a table with gb_per_s and latency_us, got {data!r}")
    _unknown(data, _LINK_KEYS, where)
    for key in ("gb_per_s", "latency_us"):
        if key not in data:
            raise MocompileError(f"{where}: missing {key}")
    return Link(_number(data["gb_per_s"], "gb_per_s", where), _number(data["latency_us"], "latency_us", where,
                                                                        positive=False))


def _devices(entry: Any, index: int, where: str) -> list[Device]:
    at = f"{where}: device {index + 1}"
    if not isinstance(entry, dict):
        raise MocompileError(f"{at}: expected a table, got {entry!r}")
    if isinstance(entry.get("name"), str):
        at = f"{where}: device {entry['name']!r}"
    _unknown(entry, _DEVICE_KEYS, at)
    for key in ("name", "kind", "node", "memory_gib", "memory_gb_per_s", "tflops"):
        if key not in entry:
            raise MocompileError(f"{at}: missing {key}")
    name, kind, node = entry["name"], entry["kind"], entry["node"]
    if not isinstance(name, str) or not name:
        raise MocompileError(f"{at}: name must be a non-empty string")
    if kind not in KINDS:
        raise MocompileError(f"{at}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(node, str) or not node:
        raise MocompileError(f"{at}: node must be a non-empty string")
    memory = _number(entry["memory_gib"], "memory_gib", at)
    reserved = _number(entry.get("reserved_gib", 0), "reserved_gib", at, positive=False)
    if reserved >= memory:
        raise MocompileError(f"{at}: reserved_gib ({reserved:g}) leaves no memory of memory_gib ({memory:g})")
    bandwidth = _number(entry["memory_gb_per_s"], "memory_gb_per_s", at)
    tflops = entry["tflops"]
    if not isinstance(tflops, dict) or not tflops:
        raise MocompileError(f"{at}: tflops must be a table of dtype = TFLOPS, e.g. {{ bf16 = 989 }}")
    _unknown(tflops, DTYPES, f"{at}: tflops")
    peak = {dtype: _number(v, f"tflops.{dtype}", at) for dtype, v in tflops.items()}
    attention = entry.get("attention", True)
    if not isinstance(attention, bool):
        raise MocompileError(f"{at}: attention must be true or false, got {attention!r}")
    count = entry.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise MocompileError(f"{at}: count must be a positive integer, got {count!r}")
    names = [name] if count is None else [f"{name}{i}" for i in range(count)]
    return [Device(n, kind, node, int((memory - reserved) * GIB), bandwidth, peak, attention) for n in names]


def parse_cluster(data: Mapping[str, Any], where: str) -> Cluster:
    """A cluster from the TOML document `data` (already parsed); `where` names it in errors."""
    _unknown(data, _TOP_KEYS, where)
    network = data.get("network", {})
    if not isinstance(network, dict):
        raise MocompileError(f"{where}: [network] must be a table")
    _unknown(network, ("intra_node", "inter_node"), f"{where}: [network]")
    default = {"gb_per_s": 50, "latency_us": 5}
    intra = _link(network.get("intra_node", default), f"{where}: network.intra_node")
    inter = _link(network.get("inter_node", default), f"{where}: network.inter_node")
    entries = data.get("device")
    if not isinstance(entries, list) or not entries:
        raise MocompileError(f"{where}: no devices (add [[device]] tables)")
    devices = [d for i, e in enumerate(entries) for d in _devices(e, i, where)]
    seen: set[str] = set()
    for d in devices:
        if d.name in seen:
            raise MocompileError(f"{where}: two devices are named {d.name!r}")
        seen.add(d.name)
    links: dict[frozenset[str], Link] = {}
    for i, entry in enumerate(data.get("link", [])):
        at = f"{where}: link {i + 1}"
        if not isinstance(entry, dict):
            raise MocompileError(f"{at}: expected a table, got {entry!r}")
        _unknown(entry, (*_LINK_KEYS, "between"), at)
        pair = entry.get("between")
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise MocompileError(f"{at}: between must name two devices, e.g. between = [\"gpu0\", \"cpu0\"]")
        for p in pair:
            if p not in seen:
                raise MocompileError(f"{at}: names device {p!r}, which is not defined "
                                     f"(devices: {', '.join(sorted(seen)[:8])}{', ...' if len(seen) > 8 else ''})")
        if pair[0] == pair[1]:
            raise MocompileError(f"{at}: links device {pair[0]!r} to itself")
        links[frozenset(pair)] = _link({k: v for k, v in entry.items() if k != "between"}, at)
    name = data.get("name", where)
    if not isinstance(name, str):
        raise MocompileError(f"{where}: name must be a string")
    return Cluster(name, devices, intra, inter, links)


def load_cluster(path: str | Path) -> Cluster:
    """Read and check a device file (see the module docstring)."""
    return parse_cluster(read_document(path, "device file", tomllib.loads, (tomllib.TOMLDecodeError,), "TOML"), str(path))
