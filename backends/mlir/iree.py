"""IREE's compiler on an exported module: `.mlir` -> `.vmfb` for the llvm-cpu backend.

The input dialect tells IREE how to read the module (`--iree-input-type`). The code is
compiled for the CPU doing the compile (`--iree-llvmcpu-target-cpu=host`), like the cpu
target's default; the flags are recorded in the manifest so the `.mlir` can be compiled
again by hand for another CPU or device (README: "The mlir target").
"""

from __future__ import annotations

import re
from pathlib import Path

INPUT_TYPES = {"linalg": "none", "stablehlo": "stablehlo", "tosa": "tosa", "torch": "torch"}
TARGET_BACKEND = "llvm-cpu"
CPU_FLAGS = ["--iree-llvmcpu-target-cpu=host"]


def compile_flags(dialect: str) -> list[str]:
    """The iree-compile command-line flags this target compiles a module of `dialect` with."""
    return [f"--iree-input-type={INPUT_TYPES[dialect]}", f"--iree-hal-target-backends={TARGET_BACKEND}", *CPU_FLAGS]


def first_error(text: str) -> str:
    """The first diagnostic of iree-compile's output, on one line."""
    m = re.search(r"error: ([^\n]+)", text)
    return (m.group(1) if m else (text.strip().splitlines() or ["iree-compile failed"])[0]).strip()


def compile_module(mlir: Path, dialect: str, out: Path) -> str | None:
    """Compile `mlir` into `out` (a .vmfb); None on success, else IREE's first error."""
    import iree.compiler as ireec

    try:
        ireec.compile_file(str(mlir), target_backends=[TARGET_BACKEND], input_type=INPUT_TYPES[dialect],
                           output_file=str(out), extra_args=CPU_FLAGS)
    except ireec.CompilerToolError as e:
        return first_error(str(e))
    return None
