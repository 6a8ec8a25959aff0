"""The CPU target as a `Backend`: TVM's LLVM code generator with hand-scheduled TIR kernels,
run by the Relax VM (and, for single-token steps, the decode driver). The work is done by
lower.py, build.py, artifact.py and tuning.py; this class is what the compiler sees.

`--target "cpu [-mcpu=NAME] [-mattr=+f,-f] [-num-cores=N]"` (target.py): what the kernels are
shaped for (integer VNNI or float low-bit matmuls, register tiles) comes from this target,
not from the machine doing the compile, so an artifact for another CPU can be built here; it
is verified by running it only where this CPU has every feature it was built with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mocompile.backends.base import Backend, Progress, register_backend
from mocompile.backends.tvm_cpu.artifact import PROGRAM_KIND, emit
from mocompile.backends.tvm_cpu.lower import LOWERINGS, _register_builtin_lowerings, refusal
from mocompile.backends.tvm_cpu.target import CpuTarget, host_cpu, missing_features, runs_here
from mocompile.backends.tvm_cpu.tuning import TuningDB, tune
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph


@register_backend
class TvmCpuBackend(Backend):
    name = "cpu"
    description = "CPUs through TVM's LLVM code generator (hand-scheduled TIR kernels, Relax VM, decode driver)"
    program_kind = PROGRAM_KIND
    weight_formats = frozenset({"float32", "bfloat16", "float16", "int8", "int4"})
    builds_prefill = True  # tvm_common/prefill.py
    can_tune = True
    contextual_sparsity = True  # tvm_common/contextual.py, kernels_contextual.py

    def parse_options(self, words: list[str]) -> dict[str, Any]:
        return {"cpu": CpuTarget.parse(" ".join(["cpu", *words]))}

    @property
    def cpu(self) -> CpuTarget:
        return self.options["cpu"]

    def ops(self) -> frozenset[str]:
        _register_builtin_lowerings()
        return frozenset(LOWERINGS)

    def unsupported(self, graph: Graph) -> str | None:
        return refusal(graph) or super().unsupported(graph)

    def cannot_run_here(self, manifest: dict[str, Any]) -> str | None:
        missing = missing_features(manifest["target"])
        if missing:
            return f"built for {self.cpu.text()}; this CPU ({host_cpu()}) lacks {', '.join(missing)}"
        return None

    def static_checks(self, stage: Path, manifest: dict[str, Any]) -> list[str]:
        program = manifest["program"]
        library = stage / program["library"]
        return [f"LLVM compiled and linked {program['library']} ({library.stat().st_size:,} bytes) for "
                f"{self.cpu.text()} ({', '.join(self.cpu.isa_features) or 'baseline x86-64'})"]

    def emit(self, graph: Graph, out_dir: Path, *, tuning: Any = None) -> dict[str, Any]:
        return emit(graph, out_dir, tuning=tuning, target=self.cpu)

    def load_tuning(self, path: Path) -> tuple[TuningDB, str]:
        return TuningDB.load(path, self.cpu.llvm())

    def tune(self, graph: Graph, trials: int, db: TuningDB, say: Progress) -> dict[str, Any]:
        if not runs_here(self.cpu):
            raise MocompileError(f"--tune measures kernels on this machine, which cannot run code for "
                                 f"{self.cpu.text()}; tune on such a CPU, or compile without --tune")
        return tune(graph, trials, db, self.cpu.llvm(), say)
