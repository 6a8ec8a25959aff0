"""The mlir target as a `Backend`: the IR after the pass pipeline, exported through torch-mlir
to linalg-on-tensors, StableHLO, TOSA or the torch dialect, and compiled by IREE for llvm-cpu
into a module that mocompile.runtime_iree runs.

`--target "mlir [--dialect linalg|stablehlo|tosa|torch] [--shape BxS]"`: the dialect of the
exported `.mlir` (default linalg). linalg, StableHLO and torch modules take any batch,
sequence and cache length; TOSA is exported at the fixed shape `--shape` (default 1x8: batch
1, 8 positions per segment; its step: one token after 8 cached positions). IREE 3.13 does
not parse the TOSA torch-mlir 20261001 writes (their MLIR versions spell `tosa.const_shape`
differently), so a TOSA artifact holds the `.mlir` only: it is checked statically (it parses
and verifies with torch-mlir's own MLIR), and its manifest says it was not run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mocompile.backends.base import Backend, register_backend
from mocompile.backends.mlir.export import export_mlir, parse_check
from mocompile.backends.mlir.iree import compile_flags, compile_module
from mocompile.backends.mlir.lower import DIALECTS, LOWERINGS, refusal, register_builtin_lowerings
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.kv_cache import cached_graph, decode_support

PROGRAM_KIND = "iree-vmfb"  # mocompile.runtime_iree loads these
VMFB = "model.vmfb"
# Dialects whose modules IREE 3.13 compiles and runs here (a failure is then an error);
# StableHLO after stablehlo.prepare_for_iree. IREE 3.13 does not parse torch-mlir's TOSA: that
# artifact holds the MLIR, checked statically, unless this IREE does compile it.
RUN_HERE = frozenset({"linalg", "torch", "stablehlo"})
USAGE = "mlir [--dialect linalg|stablehlo|tosa|torch] [--shape BxS]"


def parse_words(words: list[str]) -> dict[str, Any]:
    """`--dialect NAME` / `--dialect=NAME` and `--shape BxS` (the fixed shape of a static dialect)."""
    options: dict[str, Any] = {"dialect": "linalg", "batch": 1, "seq": 8}
    flat = [part for w in words for part in (w.split("=", 1) if w.startswith("--") and "=" in w else [w])]
    it = iter(flat)
    for word in it:
        value = next(it, None)
        if word == "--dialect" and value in DIALECTS:
            options["dialect"] = value
        elif word == "--shape" and value and re.fullmatch(r"[1-9]\d*x[1-9]\d*", value):
            options["batch"], options["seq"] = map(int, value.split("x"))
        else:
            got = f"{word} {value}" if value is not None else word
            raise MocompileError(f"target mlir: cannot read option {got!r} (usage: --target \"{USAGE}\")")
    return options


@register_backend
class MlirBackend(Backend):
    name = "mlir"
    description = "MLIR through torch-mlir (linalg, StableHLO, TOSA or torch dialect), compiled and run by IREE"
    program_kind = PROGRAM_KIND
    weight_formats = frozenset({"float32", "int8", "int4"})

    def parse_options(self, words: list[str]) -> dict[str, Any]:
        return parse_words(words)

    @property
    def dialect(self) -> str:
        return self.options["dialect"]

    def ops(self) -> frozenset[str]:
        register_builtin_lowerings()
        return frozenset(LOWERINGS)

    def unsupported(self, graph: Graph) -> str | None:
        return refusal(graph, self.dialect) or super().unsupported(graph)

    def cannot_run_here(self, manifest: dict[str, Any]) -> str | None:
        program = manifest["program"]
        if not program.get("vmfb"):
            return program["no_vmfb_reason"]
        return None

    def static_checks(self, stage: Path, manifest: dict[str, Any]) -> list[str]:
        program = manifest["program"]
        counts = parse_check((stage / program["mlir"]).read_text())
        dialect_ops = sum(n for op, n in counts.items() if op.startswith(program["dialect"] + "."))
        return [f"{program['mlir']} parses and verifies with torch-mlir's MLIR: {sum(counts.values())} ops, "
                f"{dialect_ops} of them {program['dialect']}; functions {', '.join(program['functions'])}"]

    def emit(self, graph: Graph, out_dir: Path, *, tuning: Any = None) -> dict[str, Any]:
        dialect = self.dialect
        no_step = decode_support(graph)
        cached = cached_graph(graph) if no_step is None else None
        exported = export_mlir(graph, cached, dialect, self.options["batch"], self.options["seq"])
        mlir = f"model.{dialect}.mlir"
        (out_dir / mlir).write_text(exported.text)
        error = compile_module(out_dir / mlir, dialect, out_dir / VMFB)
        if error is not None and dialect in RUN_HERE:
            raise MocompileError(f"IREE could not compile the {dialect} export of {graph.name}: {error}")
        step = None
        if cached is not None:
            types = {v.name: v.type for v in cached.graph.inputs}
            step = {"function": "step", "block": 1, "max_positions": graph.meta.get("max_seq"),
                    "cache": [{"past": e.past, "present": e.present, "dtype": types[e.past].dtype,
                               "shape": ["batch", "cache_len", types[e.past].shape[2]]} for e in cached.entries]}
        return {
            "kind": PROGRAM_KIND,
            "dialect": dialect,
            "mlir": mlir,
            "functions": exported.functions,
            **({"vmfb": VMFB} if error is None else
               {"vmfb": None, "no_vmfb_reason": f"IREE {_version('iree-base-compiler')} cannot compile the {dialect} module "
                                                 f"torch-mlir wrote: {error}"}),
            "function": "main",
            "module": "module",
            **({"step": step} if step else {"no_step_reason": no_step}),
            "export_notes": exported.notes,
            **({"static_shapes": exported.shapes} if exported.shapes else {}),
            "iree_compile_flags": compile_flags(dialect),
            "target_info": {"backend": "mlir", "dialect": dialect, "iree_version": _version("iree-base-compiler"),
                            "torch_mlir_version": _version("torch-mlir")},
        }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
