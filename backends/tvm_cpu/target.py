"""The compilation target: the host CPU, described the way TVM 0.27 wants it (a dict).

Why `mcpu` matters: without it LLVM emits baseline x86-64 (SSE2) code and every vector
loop runs at a quarter of the width the kernels are written for (16-lane fp32 on AVX-512).
"""

from __future__ import annotations

import os

import tvm


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. "znver4", "sapphirerapids")."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


def host_target(num_cores: int | None = None, mcpu: str | None = None) -> tvm.target.Target:
    """An LLVM target for the host CPU with `num_cores` worker threads (default: all cores)."""
    cores = num_cores or os.cpu_count() or 1
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu or host_cpu(), "num-cores": int(cores)})



def host_has_vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI (the int8 dot product the W8A8 kernels use)."""
    try:
        flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_vnni" in flags.split()
