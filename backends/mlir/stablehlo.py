"""torch-mlir's dynamic-shape StableHLO made compilable by IREE 3.13, keeping every shape dynamic.

torch-mlir writes a module whose batch, sequence and cache length are dynamic with three
constructs IREE's StableHLO input cannot legalise:

- `stablehlo.dynamic_broadcast_in_dim` (torch's implicit broadcasting of every elementwise
  op): IREE lowers it only when it knows, for each dynamic operand dimension, whether it
  expands. torch.export settles every broadcast while tracing (two symbolic sizes that meet
  in a broadcast are proven equal, or the dimension is specialised to a static 1), so a
  dimension that is still dynamic never expands: it is annotated
  `known_nonexpanding_dimensions`, a StableHLO attribute that states exactly this.
- `stablehlo.dynamic_reshape`: IREE 3.13 has no lowering for it. The same reshape to a
  shape computed at run time is `tensor.reshape`, which IREE lowers.
- `shape.cstr_broadcastable` witnesses (checks of those same broadcasts at run time): IREE
  rejects them, and lowering them to `cf.assert` first crashes iree-compile 3.13. They check
  what torch.export proved, so they are replaced by a true witness (MLIR's
  remove-shape-constraints); the runtime checks every input's shape before a call.

The experts' weight gather is the fourth: see torch_moe.gather_rows, fixed in the torch code.
The module stays StableHLO plus the tensor/shape/arith ops torch-mlir already mixes in for
dynamic shapes; the rewritten module is what the artifact holds and what IREE compiled.
"""

from __future__ import annotations

from typing import Any

CLEANUP = "builtin.module(func.func(remove-shape-constraints,canonicalize))"


def _collect(module: Any, name: str) -> list[Any]:
    from torch_mlir import ir

    found: list[Any] = []

    def visit(op: Any) -> Any:
        if op.name == name:
            found.append(op)
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    return found


def prepare_for_iree(module: Any) -> str:
    """Rewrite `module` (a torch_mlir.ir.Module of StableHLO) in place as the module docstring
    says; what was rewritten, for the manifest's export notes."""
    with module.context:
        return _rewrite(module)


def _rewrite(module: Any) -> str:
    from torch_mlir import ir, passmanager

    annotated = 0
    for op in _collect(module, "stablehlo.dynamic_broadcast_in_dim"):
        operand = ir.RankedTensorType(op.operands[0].type)
        dynamic = [i for i in range(operand.rank) if operand.is_dynamic_dim(i)]
        if dynamic:
            op.attributes["known_nonexpanding_dimensions"] = ir.DenseI64ArrayAttr.get(dynamic)
            annotated += 1
    reshapes = _collect(module, "stablehlo.dynamic_reshape")
    for op in reshapes:
        with ir.InsertionPoint(op), op.location:
            new = ir.Operation.create("tensor.reshape", results=[op.results[0].type], operands=list(op.operands))
        op.results[0].replace_all_uses_with(new.results[0])
        op.erase()
    witnesses = len(_collect(module, "shape.cstr_broadcastable"))
    passmanager.PassManager.parse(CLEANUP).run(module.operation)
    return (f"kept dynamic (batch, sequence, cache length); for IREE 3.13's StableHLO input {annotated} "
            "dynamic_broadcast_in_dim annotated known_nonexpanding (torch.export settled every broadcast), "
            f"{len(reshapes)} dynamic_reshape written as tensor.reshape, {witnesses} broadcast witnesses removed")
