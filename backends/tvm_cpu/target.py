"""The compilation target: which x86 CPU the kernels are shaped and compiled for.

A `CpuTarget` is an LLVM CPU (`mcpu`, optionally with `mattr` feature changes), the feature
set LLVM gives it, and a worker-thread count. It is made from the machine doing the compile
(`CpuTarget.host()`, the default everywhere) or from a target text for cross-compiling:

    "cpu"                                            this host
    "cpu -mcpu=haswell"                              AVX2: float low-bit kernels, AVX2 tiles
    "cpu -mcpu=icelake-server"                       AVX-512 VNNI: integer low-bit kernels
    "cpu -mcpu=icelake-server -mattr=-avx512vnni"    AVX-512 without VNNI
    "cpu -mattr=-avx512f -num-cores=4"               this host without AVX-512, 4 threads

Two kernel decisions follow the target's features (not the compiling machine's): whether
low-bit matmuls run in integers (`integer_matmuls`: AVX-512 VNNI's vpdpbusd, kernels_int8.py)
or as float kernels reading the low-bit codes (kernels_matmul.py), and how many accumulator
bytes an untuned register tile may fill (`accumulator_bytes`: half of 32 zmm registers with
AVX-512, of 16 ymm with AVX2). The feature set is LLVM's answer for the named CPU
(tvm.target.codegen.llvm_get_cpu_features), so it is what LLVM will emit instructions for.

Why `mcpu` matters at all: without it LLVM emits baseline x86-64 (SSE2) code and every vector
loop runs at a quarter of the width the kernels are written for (16-lane fp32 on AVX-512).

Whether code built for a target runs on this machine (`runs_here`, `missing_features` for an
artifact's recorded target) compares the instruction-set extensions LLVM may use in these
kernels (CPUINFO_FLAGS) with /proc/cpuinfo.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import tvm
from tvm.target import codegen

from mocompile.cpu_features import CPUINFO_FLAGS, cpu_flags, missing_cpu_features  # noqa: F401
from mocompile.errors import MocompileError

TARGET_WORDS = ("cpu", "llvm")  # what a target text may start with
VNNI = "avx512vnni"  # the integer kernels' vpdpbusd.512 (AVX-VNNI's 256-bit form is not used)

class TargetError(MocompileError, ValueError):
    """A target text that names no CPU LLVM knows, a feature it lacks, or an unknown option."""


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. "znver4", "sapphirerapids")."""
    return str(codegen.llvm_get_system_cpu())


def llvm_features(mcpu: str, mattr: tuple[str, ...] = ()) -> frozenset[str]:
    """LLVM's feature set for CPU `mcpu` with `mattr` ("+feat" / "-feat") applied, implied
    features included (-avx512f also drops every AVX-512 extension)."""
    spec: dict[str, Any] = {"kind": "llvm", "mcpu": mcpu, **({"mattr": list(mattr)} if mattr else {})}
    return frozenset(str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(spec)))


@functools.cache
def _known_features() -> frozenset[str]:
    """Every feature some CPU LLVM knows has (what a "+feat" may name)."""
    cpus = codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm"}))
    return frozenset().union(*(llvm_features(str(c)) for c in cpus)) | CPUINFO_FLAGS.keys()


@dataclass(frozen=True)
class CpuTarget:
    """An x86 CPU to compile for: `mcpu` with `mattr` changes, LLVM's `features` for them
    (computed, never given), and `num_cores` worker threads (None: every core of the machine
    running the build's kernels)."""

    mcpu: str
    mattr: tuple[str, ...] = ()
    num_cores: int | None = None
    features: frozenset[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mattr", tuple(self.mattr))
        object.__setattr__(self, "features", llvm_features(self.mcpu, self.mattr))

    @staticmethod
    def host(num_cores: int | None = None) -> "CpuTarget":
        """This machine: LLVM's CPU name for it, minus (as "-feat") the extensions LLVM's model
        of that CPU has but /proc/cpuinfo does not show (a virtual machine hiding AVX-512, say),
        so that the host target always runs here."""
        return _host(num_cores)

    @staticmethod
    def parse(text: str) -> "CpuTarget":
        """A target from its text: `cpu` (or `llvm`) then options `-mcpu=NAME` (default or
        "native": this host's), `-mattr=+feat,-feat` (LLVM feature names) and `-num-cores=N`."""
        return parse_target(text)

    # ---- what the kernels are shaped by --------------------------------------------------
    @property
    def integer_matmuls(self) -> bool:
        """Whether low-bit matmuls run in integers (kernels_int8.py needs AVX-512 VNNI)."""
        return VNNI in self.features

    @property
    def vector_register_bytes(self) -> int:
        """Bytes of the vector register file: 32 x 64 with AVX-512, 16 x 32 with AVX2, 16 x 16
        (SSE) otherwise. A matmul's register tile must leave room in it for the weight and
        input vectors, or LLVM spills accumulators to the stack on every step."""
        if "avx512f" in self.features:
            return 32 * 64
        return 16 * (32 if "avx2" in self.features else 16)

    @property
    def accumulator_bytes(self) -> int:
        """What an untuned matmul register tile may fill: half the vector register file."""
        return self.vector_register_bytes // 2

    # ---- how it is written down ------------------------------------------------------------
    @property
    def isa_features(self) -> list[str]:
        """The instruction-set extensions (CPUINFO_FLAGS) that code for this target may use."""
        return sorted(self.features & CPUINFO_FLAGS.keys())

    def text(self) -> str:
        """The target text that parses back to this target."""
        options = [f"-mcpu={self.mcpu}"] + ([f"-mattr={','.join(self.mattr)}"] if self.mattr else [])
        return " ".join(["cpu", *options, *([f"-num-cores={self.num_cores}"] if self.num_cores else [])])

    def llvm(self, num_cores: int | None = None) -> tvm.target.Target:
        """The TVM LLVM target (`num_cores` threads; default this target's, else every core)."""
        cores = num_cores or self.num_cores or os.cpu_count() or 1
        spec: dict[str, Any] = {"kind": "llvm", "mcpu": self.mcpu, "num-cores": int(cores)}
        if self.mattr:
            spec["mattr"] = list(self.mattr)
        return tvm.target.Target(spec)

    def info(self) -> dict[str, Any]:
        """What an artifact records of its target (the manifest's target entry): enough for
        `missing_features` to tell whether a machine can run it, and which kernel paths
        were chosen."""
        return {"spec": self.text(), "mcpu": self.mcpu, "mattr": list(self.mattr), "features": self.isa_features,
                "low_bit_matmuls": f"integer ({VNNI})" if self.integer_matmuls else "float",
                "vector_register_bytes": self.vector_register_bytes}


@functools.cache
def _host(num_cores: int | None) -> CpuTarget:
    mcpu, flags = host_cpu(), cpu_flags()
    hidden = [f for f in sorted(llvm_features(mcpu)) if f in CPUINFO_FLAGS and CPUINFO_FLAGS[f] not in flags]
    if not flags:  # nothing to compare with (no /proc/cpuinfo): LLVM's model stands
        hidden = []
    return CpuTarget(mcpu, tuple(f"-{f}" for f in hidden), num_cores)


@functools.cache
def parse_target(text: str) -> CpuTarget:
    """See CpuTarget.parse; raises TargetError naming what is wrong."""
    words = text.split()
    if not words or words[0] not in TARGET_WORDS:
        raise TargetError(f"target {text!r}: a CPU target starts with 'cpu' (e.g. 'cpu -mcpu=haswell')")
    options: dict[str, str] = {}
    for word in words[1:]:
        key, eq, value = word.lstrip("-").partition("=")
        key = key.replace("_", "-")
        if not word.startswith("-") or not eq or key not in ("mcpu", "mattr", "num-cores") or key in options:
            raise TargetError(f"target {text!r}: {word!r} is not one of -mcpu=NAME, -mattr=+feat,-feat, "
                              "-num-cores=N (each at most once)")
        options[key] = value
    cores = options.get("num-cores")
    if cores is not None and not (cores.isdigit() and int(cores) > 0):
        raise TargetError(f"target {text!r}: -num-cores must be a positive integer (got {cores!r})")
    host = _host(None)
    mcpu = options.get("mcpu", "native")
    mcpu = host.mcpu if mcpu == "native" else mcpu
    base = host.mattr if mcpu == host.mcpu else ()  # the host's own hidden extensions stay off
    if not codegen.llvm_is_valid_cpu(mcpu, codegen.llvm_get_system_triple()):
        raise TargetError(f"target {text!r}: LLVM knows no CPU named {mcpu!r} (e.g. haswell, skylake-avx512, "
                          "icelake-server, znver4, sapphirerapids)")
    mattr = tuple(a for a in options.get("mattr", "").split(",") if a)
    for change in mattr:
        if change[:1] not in "+-" or change[1:] not in _known_features():
            raise TargetError(f"target {text!r}: {change!r} is not +FEATURE or -FEATURE with a feature LLVM knows "
                              f"(e.g. -{VNNI}, -avx512f, +avx2)")
    return CpuTarget(mcpu, base + mattr, int(cores) if cores else None)


def as_cpu_target(target: "CpuTarget | str | tvm.target.Target | None") -> CpuTarget:
    """A CpuTarget from what callers pass: None (this host), a target text, or a TVM LLVM
    target (its mcpu, mattr and num-cores)."""
    if target is None:
        return CpuTarget.host()
    if isinstance(target, CpuTarget):
        return target
    if isinstance(target, str):
        return parse_target(target)
    if target.kind.name != "llvm":
        raise TargetError(f"the tvm_cpu backend compiles for LLVM CPU targets, not {target.kind.name}")
    attrs = target.attrs
    cores = int(attrs["num-cores"]) if "num-cores" in attrs else None
    # no mcpu: LLVM's "generic" x86-64 (what TVM compiles such a target for)
    return CpuTarget(str(attrs.get("mcpu", "") or "generic"), tuple(str(a) for a in attrs.get("mattr", ())), cores)


def runs_here(target: CpuTarget) -> bool:
    """Whether this machine can execute code built for `target`: every instruction-set
    extension the target lets LLVM use is in this CPU's /proc/cpuinfo flags."""
    return not missing_cpu_features(target.features)


def missing_features(target_info: Mapping[str, Any]) -> list[str]:
    """The extensions (LLVM names) an artifact's code may use that this machine lacks, from
    its recorded target (CpuTarget.info(), the manifest's "target" entry): its "features",
    or for an artifact that predates them, LLVM's features of its llvm_target's mcpu. Empty:
    it runs here (or there is nothing to tell from)."""
    if "features" in target_info:
        return missing_cpu_features(list(target_info["features"]))
    llvm_target = target_info.get("llvm_target") or {}
    if not llvm_target.get("mcpu"):
        return []
    mattr = llvm_target.get("mattr") or ()
    return missing_cpu_features(llvm_features(str(llvm_target["mcpu"]), tuple(mattr) if not isinstance(mattr, str) else (mattr,)))


def host_target(num_cores: int | None = None, mcpu: str | None = None) -> tvm.target.Target:
    """An LLVM target for the host CPU (or, with `mcpu`, that CPU) with `num_cores` worker
    threads (default: all cores)."""
    return (CpuTarget(mcpu) if mcpu else CpuTarget.host()).llvm(num_cores)


def host_has_vnni() -> bool:
    """Whether the host target runs low-bit matmuls in integers (AVX-512 VNNI)."""
    return CpuTarget.host().integer_matmuls


def vector_register_bytes() -> int:
    """The host target's vector register file in bytes (CpuTarget.vector_register_bytes)."""
    return CpuTarget.host().vector_register_bytes


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
