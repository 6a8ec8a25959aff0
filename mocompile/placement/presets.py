"""Named device setups (`--preset NAME`, `place(preset=NAME)`), built as the same documents a
device file holds and checked by the same code, so a preset and its TOML twin
(`mocompile place --preset NAME --show-devices`) read alike.

Figures, peak per direction, from the vendors' data sheets:
- GPU: NVIDIA H100 SXM5 80GB (H100 Tensor Core GPU data sheet): 989 dense BF16/FP16 TFLOPS,
  1979 FP8/INT8, 67 FP32, 3.35 TB/s HBM3, NVLink 4 at 900 GB/s both directions (450 per
  direction through the NVSwitch).
- Across nodes: one NVIDIA ConnectX-7 NDR InfiniBand NIC of 400 Gb/s (50 GB/s) per GPU, as in
  a DGX H100. Latencies (2 us in a node, 5 us across) are typical measured all-to-all
  message latencies, not data-sheet figures.
- CPU: AMD EPYC 9654 (96 Zen 4 cores, 2.4 GHz base, AMD product page): 12 channels of
  DDR5-4800 = 460.8 GB/s; FP32 = 96 cores x 2.4 GHz x 32 FLOP/cycle (two 256-bit FMA pipes)
  = 7.4 TFLOPS, BF16 twice that through AVX512_BF16; 768 GiB (12 x 64 GB DIMMs).
- Host link: PCIe Gen5 x16, 64 GB/s per direction.
- FPGA: AMD Alveo U55C (data sheet): 16 GB HBM2 at 460 GB/s, 24.5 INT8 TOPS; its DSPs have
  no BF16 datapath, so bf16 is an estimate at a quarter of the INT8 peak.
Reserved memory (for the dense layers, KV cache and activations) is a planning figure.
"""

from __future__ import annotations

from typing import Any

from mocompile.errors import MocompileError
from mocompile.placement.devices import Cluster, parse_cluster

H100 = {"kind": "gpu", "memory_gib": 80, "reserved_gib": 20, "memory_gb_per_s": 3350,
        "tflops": {"bf16": 989, "fp16": 989, "fp8": 1979, "int8": 1979, "fp32": 67}}
EPYC_9654 = {"kind": "cpu", "memory_gib": 768, "reserved_gib": 64, "memory_gb_per_s": 460.8,
             "tflops": {"fp32": 7.4, "bf16": 14.7, "int8": 29.5}, "attention": False}
ALVEO_U55C = {"kind": "fpga", "memory_gib": 16, "reserved_gib": 1, "memory_gb_per_s": 460,
              "tflops": {"int8": 24.5, "bf16": 6.1}, "attention": False}
NETWORK = {"intra_node": {"gb_per_s": 450, "latency_us": 2}, "inter_node": {"gb_per_s": 50, "latency_us": 5}}
PCIE5 = {"gb_per_s": 64, "latency_us": 2}


def _gpu_nodes(nodes: int, per_node: int) -> list[dict[str, Any]]:
    return [{"name": f"n{i}.gpu" if nodes > 1 else "gpu", "count": per_node, "node": f"node{i}", **H100}
            for i in range(nodes)]


PRESETS: dict[str, dict[str, Any]] = {
    "1node-8gpu": {"name": "1node-8gpu", "network": NETWORK, "device": _gpu_nodes(1, 8)},
    "2node-4gpu": {"name": "2node-4gpu", "network": NETWORK, "device": _gpu_nodes(2, 4)},
    "8node-64gpu": {"name": "8node-64gpu", "network": NETWORK, "device": _gpu_nodes(8, 8)},
    "gpu+cpu": {"name": "gpu+cpu", "network": NETWORK,
                "device": [{"name": "gpu0", "node": "node0", **H100}, {"name": "cpu0", "node": "node0", **EPYC_9654}],
                "link": [{"between": ["gpu0", "cpu0"], **PCIE5}]},
    "gpu+fpga": {"name": "gpu+fpga", "network": NETWORK,
                 "device": [{"name": "gpu0", "node": "node0", **H100}, {"name": "fpga0", "node": "node0", **ALVEO_U55C}],
                 "link": [{"between": ["gpu0", "fpga0"], **PCIE5}]},
}


def preset(name: str) -> Cluster:
    """The cluster of a named preset."""
    if name not in PRESETS:
        raise MocompileError(f"unknown device preset {name!r} (known: {', '.join(PRESETS)})")
    return parse_cluster(PRESETS[name], f"preset {name}")


def preset_toml(name: str) -> str:
    """A preset written as a device file, to start one's own from."""
    if name not in PRESETS:
        raise MocompileError(f"unknown device preset {name!r} (known: {', '.join(PRESETS)})")
    doc = PRESETS[name]

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return f"{v:g}" if isinstance(v, float) else str(v)

    lines = [f'name = "{doc["name"]}"', "", "[network]"]
    lines += [f"{k} = {value(v)}" for k, v in doc["network"].items()]
    for table in ("device", "link"):
        for entry in doc.get(table, []):
            lines += ["", f"[[{table}]]"] + [f"{k} = {value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"
