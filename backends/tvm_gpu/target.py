"""The GPU targets: OpenCL, and CUDA for an NVIDIA architecture.

    "opencl"                  OpenCL C (any OpenCL 1.2+ device: a GPU, or PoCL on a CPU)
    "cuda"                    CUDA C++ for sm_90 (Hopper), compiled by nvcc
    "cuda -arch=sm_80"        ... for sm_80 (Ampere A100), sm_89 (Ada), sm_90

Both generate from the same GPU-scheduled kernels (thread bindings, shared memory, barriers);
only the code generator and the runtime that launches them differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tvm

from mocompile.errors import MocompileError

KINDS = ("opencl", "cuda")
ARCHS = ("sm_80", "sm_89", "sm_90")
DEFAULT_ARCH = "sm_90"


class GpuTargetError(MocompileError, ValueError):
    """A GPU target text with an unknown kind, architecture or option."""


@dataclass(frozen=True)
class GpuTarget:
    kind: str  # "opencl" | "cuda"
    arch: str | None = None  # CUDA only

    @staticmethod
    def parse(text: str) -> "GpuTarget":
        words = text.split()
        if not words or words[0] not in KINDS:
            raise GpuTargetError(f"target {text!r}: a GPU target is 'opencl' or 'cuda [-arch=sm_80|sm_89|sm_90]'")
        kind, options = words[0], {}
        for word in words[1:]:
            key, eq, value = word.lstrip("-").partition("=")
            if kind != "cuda" or not word.startswith("-") or not eq or key != "arch" or key in options:
                allowed = "-arch=sm_80|sm_89|sm_90 (once)" if kind == "cuda" else "no options"
                raise GpuTargetError(f"target {text!r}: {word!r} is not an option of {kind} (it takes {allowed})")
            options[key] = value
        arch = options.get("arch", DEFAULT_ARCH) if kind == "cuda" else None
        if kind == "cuda" and arch not in ARCHS:
            raise GpuTargetError(f"target {text!r}: -arch must be one of {', '.join(ARCHS)} (got {arch!r})")
        return GpuTarget(kind, arch)

    def text(self) -> str:
        return f"cuda -arch={self.arch}" if self.kind == "cuda" else self.kind

    def tvm(self) -> tvm.target.Target:
        """TVM's target for the code generator (host code is never built: our runtime launches)."""
        spec: dict[str, Any] = {"kind": self.kind}
        if self.kind == "cuda":
            spec["arch"] = self.arch
        return tvm.target.Target(spec, host="llvm")

    @property
    def max_threads(self) -> int:
        """Threads per block the kernels may use on every device of the kind (OpenCL's
        guaranteed minimum on common GPUs is 256; CUDA's limit is 1024)."""
        return 256 if self.kind == "opencl" else 1024

    def info(self) -> dict[str, Any]:
        return {"spec": self.text(), "kind": self.kind, **({"arch": self.arch} if self.arch else {})}
