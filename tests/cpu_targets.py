"""The CPU targets kernel tests run over, one per kernel path the tvm_cpu backend has:

- "vnni":   low-bit matmuls in integers (AVX-512 VNNI, kernels_int8.py), AVX-512 tiles;
- "avx512": low-bit matmuls as float kernels over the codes, AVX-512 register tiles;
- "avx2":   the same float kernels with AVX2's (smaller) register tiles.

Each is this host with features switched off where the host has what the path needs (so it
runs here: on an AVX-512 VNNI machine all three do), else a named LLVM CPU that has it (so
the path is still lowered and cross-compiled here, but not run: `skip_unless_runs_here`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import pytest

from mocompile.backends.tvm_cpu import kernels_int8, kernels_matmul
from mocompile.backends.tvm_cpu.kernels_matmul import Epilogue
from mocompile.backends.tvm_cpu.target import VNNI, CpuTarget, missing_features, runs_here

HOST = CpuTarget.host()


def _variant(needs: str, drop: str | None, elsewhere: str) -> CpuTarget:
    """The host (without `drop`, if it has it) when it has `needs`, else CPU `elsewhere`."""
    if needs not in HOST.features:
        return CpuTarget.parse(f"cpu -mcpu={elsewhere}")
    return CpuTarget.parse(f"cpu -mattr=-{drop}") if drop and drop in HOST.features else HOST


TARGETS = {
    "vnni": _variant(VNNI, None, "icelake-server"),
    "avx512": _variant("avx512f", VNNI, "skylake-avx512"),
    "avx2": _variant("avx2", "avx512f", "haswell"),
}
PATHS = list(TARGETS)  # parametrize over these ids; TARGETS[path] is the CpuTarget


def skip_unless_runs_here(target: CpuTarget) -> None:
    """Skip the rest of a test (after what it checked of the lowered / compiled code) where
    this host cannot execute code built for `target`, saying which features it lacks."""
    if not runs_here(target):
        missing = missing_features(target.info())
        pytest.skip(f"code for {target.text()} uses {', '.join(missing)}, which this host ({HOST.mcpu}) lacks "
                    "(/proc/cpuinfo): lowered and compiled here, not run")


def _clear_kernel_caches() -> None:
    for factory in (kernels_matmul.dense_matmul, kernels_matmul.grouped_matmul, kernels_int8.int8_matmul):
        factory.cache_clear()


@contextlib.contextmanager
def perturbed_kernel_output(factor: float = 1.01, when: Callable[[Epilogue], bool] = lambda epi: epi.bias,
                            ) -> Iterator[list[Epilogue]]:
    """Test-only knob: matmul kernels built inside the block whose epilogue satisfies `when`
    (default: a biased linear layer; float and integer kernels share the write-back) multiply
    their output by `factor`. Yields the epilogues it perturbed (so a test can tell the knob
    hit a kernel). A kernel test that still passes under it cannot catch a 1% error."""
    original = kernels_matmul.epilogue_value
    hits: list[Epilogue] = []

    def perturbed(epi: Epilogue, *args, **kwargs):
        value = original(epi, *args, **kwargs)
        if not when(epi):
            return value
        hits.append(epi)
        return value * kernels_matmul.U.f32(factor)

    _clear_kernel_caches()
    kernels_matmul.epilogue_value = perturbed
    try:
        yield hits
    finally:
        kernels_matmul.epilogue_value = original
        _clear_kernel_caches()
