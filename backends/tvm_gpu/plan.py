"""The host side of a GPU artifact: the Relax functions `main` and `step` as launch plans.

The lowered module's functions hold only kernel calls, reshapes and tuple items (tvm_common's
CallPlan reads them in order); written down as JSON they are what mocompile.gpu_plan replays
on a device with no TVM and no compiled host code:

    {"params":  [{"id", "role": input|past|cache|weight|constant, "name", "shape", "dtype"}],
     "ops":     [{"op": "alloc", "id", "shape", "dtype"} | {"op": "view", "id", "of", "shape"}
                 | {"op": "call", "kernel", "args": [{"id"} | {"expr"}]}],
     "results": [id, ...]}

Shapes are expressions of the function's symbols (batch, seq, past, cache_len, ...), bound
from the inputs' shapes at run time; a kernel's own launches are in the kernel table
(codegen.py). Compile-time constants (rope frequencies) are stored with the weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm

from mocompile.backends.tvm_common.call_plan import CallPlan, PlanTensor, Unsupported
from mocompile.backends.tvm_common.layout import WeightLayout
from mocompile.backends.tvm_gpu.codegen import expr_text


def _dtype(d: Any) -> str:
    """A Relax dtype (a string, a dtype or a PrimType) as text."""
    return str(d.dtype) if isinstance(d, tvm.ir.PrimType) else str(d)


def function_plan(mod: tvm.IRModule, function: str, weights: list[WeightLayout], inputs: int,
                  caches: int) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The launch plan of Relax function `function` (its first `inputs` parameters are the
    graph inputs, then `past` and `caches` cache tensors for a step), and its constants."""
    try:
        plan = CallPlan(mod[function], weights)
    except Unsupported as e:
        raise RuntimeError(f"the GPU launch plan cannot express {function}: {e}") from e
    ids: dict[int, int] = {}

    def ident(t: PlanTensor) -> int:
        return ids.setdefault(id(t), len(ids))

    params = []
    tensors = [p for _, p in plan.params if isinstance(p, PlanTensor)]
    for k, (name, p) in enumerate(plan.params):
        if not isinstance(p, PlanTensor):
            params.append({"role": "past", "name": name, "expr": expr_text(p)})
            continue
        index = tensors.index(p)
        role = "input" if index < inputs else "cache" if index < inputs + caches else "weight"
        params.append({"id": ident(p), "role": role, "name": name, "shape": [expr_text(d) for d in p.shape],
                       "dtype": _dtype(p.dtype)})
    for i, (t, _) in enumerate(plan.constants):
        params.append({"id": ident(t), "role": "constant", "name": f"{function}.const{i}",
                       "shape": [expr_text(d) for d in t.shape], "dtype": _dtype(t.dtype)})
    ops = []
    for op in plan.ops:
        if op[0] == "alloc":
            t = op[1]
            ops.append({"op": "alloc", "id": ident(t), "shape": [expr_text(d) for d in t.shape], "dtype": _dtype(t.dtype)})
        elif op[0] == "view":
            t = op[1]
            ops.append({"op": "view", "id": ident(t), "of": ident(t.root), "shape": [expr_text(d) for d in t.shape]})
        else:
            _, kernel, args = op
            ops.append({"op": "call", "kernel": kernel,
                        "args": [{"id": ident(a)} if isinstance(a, PlanTensor) else {"expr": expr_text(a)}
                                 for a in args]})
    results = [ident(r) for r in plan.results]
    return {"params": params, "ops": ops, "results": results}, [array for _, array in plan.constants]
