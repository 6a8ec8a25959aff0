"""Which instruction-set extensions this CPU has, in LLVM's names: what decides whether code
compiled for some CPU target runs here. It reads /proc/cpuinfo only (no TVM, no LLVM), so the
runtime can refuse an artifact built for a CPU this one is not before loading its library
(which would otherwise die on the first instruction this CPU lacks).
"""

from __future__ import annotations

from typing import Iterable

# LLVM's name of each instruction-set extension LLVM may use in this backend's code -> its
# /proc/cpuinfo flag. Only these are compared with the host: LLVM's feature sets also hold
# tuning hints ("fast-gather") and system instructions (pku, wbnoinvd) that generated
# kernels never contain and that a virtual machine's cpuinfo often hides.
CPUINFO_FLAGS = {
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt",
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "lzcnt": "abm",
    "movbe": "movbe", "avxvnni": "avx_vnni",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512cd": "avx512cd", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2", "avx512ifma": "avx512ifma",
    "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
}


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(flags.split()[2:])


def missing_cpu_features(features: Iterable[str]) -> list[str]:
    """The extensions among `features` (LLVM names) this CPU lacks; empty where there is no
    /proc/cpuinfo to compare with (then the code is assumed to run)."""
    flags = cpu_flags()
    if not flags:
        return []
    return sorted(f for f in features if f in CPUINFO_FLAGS and CPUINFO_FLAGS[f] not in flags)
