"""The compilation target: the host CPU, described the way TVM 0.27 wants it (a dict).

Why `mcpu` matters: without it LLVM emits baseline x86-64 (SSE2) code and every vector
loop runs at a quarter of the width the kernels are written for (16-lane fp32 on AVX-512).
"""

from __future__ import annotations

import os
from pathlib import Path

import tvm


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. "znver4", "sapphirerapids")."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


def host_target(num_cores: int | None = None, mcpu: str | None = None) -> tvm.target.Target:
    """An LLVM target for the host CPU with `num_cores` worker threads (default: all cores)."""
    cores = num_cores or os.cpu_count() or 1
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu or host_cpu(), "num-cores": int(cores)})



def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
    except OSError:
        return set()
    return set(flags.split()[2:])


def host_has_vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI (the int8 dot product the W8A8 kernels use)."""
    return "avx512_vnni" in cpu_flags()


def vector_register_bytes() -> int:
    """Bytes of this CPU's vector register file: 32 x 64 with AVX-512, 16 x 32 with AVX2,
    16 x 16 (SSE) otherwise. A matmul's register tile must leave room in it for the weight
    and input vectors, or LLVM spills accumulators to the stack on every step."""
    flags = cpu_flags()
    if "avx512f" in flags:
        return 32 * 64
    return 16 * (32 if "avx2" in flags else 16)


def last_level_cache_bytes() -> int:
    """Size of this CPU's largest cache (sysfs; 32 MiB where it cannot be read). A model whose
    weights exceed it streams them from memory on every decode step, so its kernels are tuned
    with the caches flushed before each call (tuning.py)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 1024, "M": 1024 ** 2}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KM")) * scale)
        except ValueError:
            continue
    return max(sizes, default=32 * 1024 ** 2)
