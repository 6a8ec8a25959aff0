"""Compiling the generated CUDA C++ with nvcc at compile time, warnings as errors.

`compile_cuda(source, output, arch)` writes a cubin for the architecture (sm_80, sm_89,
sm_90); a missing nvcc or code it rejects (any error, any warning) fails the compile with
one line naming the first diagnostic."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from mocompile.errors import MocompileError

NVCC_TIMEOUT_S = 600


class NvccError(MocompileError):
    """nvcc is missing, or rejected (or warned about) the generated code."""


def find_nvcc() -> str | None:
    """nvcc on PATH, else under CUDA_HOME or /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def require_nvcc() -> str:
    """nvcc's path, or NvccError in one line (asked before any CUDA code is generated: TVM's
    CUDA code generation runs nvcc too)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise NvccError("the cuda target needs nvcc (the CUDA toolkit) to compile its kernels; none was found on "
                        "PATH, CUDA_HOME or /usr/local/cuda")
    return nvcc


def nvcc_command(nvcc: str, source: Path, output: Path, arch: str) -> list[str]:
    return [nvcc, "-cubin", f"-arch={arch}", "-O3", "-Werror", "all-warnings", "-o", str(output), str(source)]


def compile_cuda(source: Path, output: Path, arch: str) -> str:
    """Compile `source` to a cubin at `output` for `arch`; returns nvcc's version line."""
    nvcc = require_nvcc()
    try:
        run = subprocess.run(nvcc_command(nvcc, source, output, arch), capture_output=True, text=True,
                             timeout=NVCC_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise NvccError(f"nvcc did not finish compiling {source.name} within {NVCC_TIMEOUT_S} s") from None
    if run.returncode != 0:
        lines = [line for line in (run.stderr + run.stdout).splitlines() if line.strip()]
        first = next((line for line in lines if "error" in line or "warning" in line), lines[0] if lines else "")
        raise NvccError(f"nvcc rejected the generated CUDA code for {arch}: {first.strip()}")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return version[-1] if version else "nvcc"
