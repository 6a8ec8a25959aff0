"""The model as MLIR: the graph's `main` (and, where it decodes, the KV-cached `step`)
exported by torch.export from GraphModule (emit_torch.py), imported by torch-mlir into one
module and lowered to the dialect asked for.

Both functions are imported into one MLIR module from the same weight tensors, so each
weight is one constant of the module, read by both. A lowering failure becomes one line
naming the MLIR op that could not be legalised and the IR op whose torch code produced it
(torch-mlir keeps the Python source line of every traced op as its location).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from mocompile.backends.mlir.emit_torch import example_sizes, export_graph, symbols, torch_weights
from mocompile.backends.mlir.lower import DIALECTS, LOWERINGS, STATIC_DIALECTS, LowerContext
from mocompile.backends.mlir.stablehlo import prepare_for_iree
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.kv_cache import PAST, CachedGraph


class ExportError(MocompileError):
    """torch.export or torch-mlir could not export the graph to the dialect asked for."""


@dataclass
class Exported:
    text: str  # the MLIR module
    functions: list[str]
    notes: dict[str, str] = field(default_factory=dict)  # what the export made dense, and why
    shapes: dict[str, dict[str, int]] = field(default_factory=dict)  # function -> fixed sizes (static dialects)


def _lowering_at(path: str, line: int) -> str | None:
    """The IR op whose registered torch code contains source line `path`:`line`."""
    for op, fn in LOWERINGS.items():
        try:
            lines, first = inspect.getsourcelines(fn)
        except (OSError, TypeError):
            continue
        if Path(inspect.getsourcefile(fn) or "").resolve() == Path(path).resolve() and first <= line < first + len(lines):
            return op
    return None


def one_line(error: Exception, dialect: str) -> str:
    """torch-mlir's diagnostic as one line: the MLIR op it could not legalise and, from the
    op's source location, the IR op whose torch code made it."""
    text = str(error)
    m = re.search(r"failed to legalize operation '([\w.]+)'", text) or re.search(r"error: ([^\n]+)", text)
    what = m.group(1) if m else text.strip().splitlines()[0] if text.strip() else type(error).__name__
    where = ""
    loc = re.search(r'loc\("([^"]+)":(\d+):\d+\): error', text)
    if loc:
        op = _lowering_at(loc.group(1), int(loc.group(2)))
        where = f" (in the torch code of IR op {op})" if op else f" (at {Path(loc.group(1)).name}:{loc.group(2)})"
    if m and m.re.pattern.startswith("failed"):
        return f"torch-mlir cannot lower {what}{where} to {dialect}"
    return f"torch-mlir failed exporting to {dialect}: {what}{where}"


def export_mlir(graph: Graph, cached: CachedGraph | None, dialect: str, batch: int, seq: int) -> Exported:
    """`graph` as function `main` and `cached.graph` as `step` (when given) of one MLIR
    module in `dialect` (a key of DIALECTS). Dynamic dialects take any batch, sequence and
    cache length; static ones (TOSA) are exported at batch `batch` with `seq` positions per
    segment, the step at one token after `seq` cached positions."""
    from torch_mlir import ir
    from torch_mlir.compiler_utils import OutputType, TorchMlirCompilerError
    from torch_mlir.dialects import torch as torch_d
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table
    from torch_mlir.extras.fx_importer import FxImporter
    from torch_mlir.fx import _module_lowering

    ctx = LowerContext(dialect)
    weights = torch_weights(graph)
    static = dialect in STATIC_DIALECTS
    context = ir.Context()
    torch_d.register_dialect(context)
    importer = FxImporter(context=context)
    result = Exported("", [])
    plans: list[tuple[str, Graph, dict[str, int], frozenset[str]]] = []
    main_sizes = {s: (batch if s == graph.inputs[0].type.shape[0] else seq) for s in symbols(graph)}
    plans.append(("main", graph, example_sizes(graph, main_sizes if static else None), frozenset()))
    if cached is not None:
        token = next(v for v in graph.inputs if v.type.rank == 2 and v.type.dtype.startswith("int")).type.shape[1]
        segments = frozenset(s for s in symbols(cached.graph) if s != graph.inputs[0].type.shape[0])
        step_sizes = {**main_sizes, PAST: seq, **{s: (1 if s == token else 0) for s in segments if s != PAST}}
        plans.append(("step", cached.graph, example_sizes(cached.graph, step_sizes if static else None), segments))
    try:
        for name, g, sizes, may_be_empty in plans:
            program = export_graph(g, ctx, weights, sizes, dynamic=not static, may_be_empty=may_be_empty)
            program = program.run_decompositions(get_decomposition_table())
            importer.import_frozen_program(program, func_name=name)
            result.functions.append(name)
            if static:
                result.shapes[name] = sizes
        module = _module_lowering(False, False, OutputType.get(DIALECTS[dialect]), importer.module)
    except TorchMlirCompilerError as e:
        raise ExportError(one_line(e, dialect)) from None
    except Exception as e:  # torch.export's own refusals (data-dependent shapes, unsupported ops)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"torch.export failed exporting {graph.name} for {dialect}: {first}") from None
    if dialect == "stablehlo":
        ctx.note("dynamic shapes", prepare_for_iree(module))
    result.text = module.operation.get_asm(large_elements_limit=None, enable_debug_info=False)
    result.notes = dict(ctx.notes)
    return result


def parse_check(text: str) -> Mapping[str, int]:
    """Parse and verify `text` with torch-mlir's own MLIR; the number of each op in it."""
    from torch_mlir import ir
    from torch_mlir._mlir_libs import _stablehlo
    from torch_mlir.dialects import torch as torch_d

    with ir.Context() as context:
        torch_d.register_dialect(context)
        _stablehlo.register_dialect(context)  # torch-mlir's build carries StableHLO; registered on demand
        module = ir.Module.parse(text)
        if not module.operation.verify():
            raise ExportError("the exported MLIR module does not verify")
        counts: dict[str, int] = {}

        def walk(op: ir.Operation) -> ir.WalkResult:
            counts[op.name] = counts.get(op.name, 0) + 1
            return ir.WalkResult.ADVANCE

        module.operation.walk(walk)
    return counts
