"""A Relax function of the lowered module as a plan of allocations, views and kernel calls.

The lowering (lower.py) emits only kernel calls (call_tir, call_tir_inplace), reshapes (free
views) and tuple items; `CallPlan` walks those bindings in order and records each tensor's
symbolic shape and what it is a view of. The CPU's decode driver turns a plan into one TIR
function (tvm_cpu/driver.py); a GPU target writes it down as the launch plan its runtime
follows (tvm_gpu/plan.py). A binding of any other kind raises `Unsupported` with its name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx

from mocompile.backends.tvm_common.layout import WeightLayout


class Unsupported(Exception):
    """A Relax function uses something a call plan does not express (the message says what)."""


def _op_name(call: relax.Call) -> str:
    return call.op.name if hasattr(call.op, "name") else ""


def _shape_of(ty) -> list:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise Unsupported(f"a value of type {ty} has no known shape")
    return list(ty.shape.values)


@dataclass
class PlanTensor:
    """A tensor of the step: allocated by the driver (root None), or a view of `root`'s data."""

    shape: list
    dtype: str
    name: str
    root: "PlanTensor | None" = None
    param: bool = False


class CallPlan:
    """A Relax function's bindings as allocations, views and kernel calls, in order: what a
    target runs without the Relax VM (the CPU's decode driver, a GPU's launch plan).
    `weights`: the layouts of the function's trailing weight parameters (typed by rank and
    dtype only in Relax; their shapes come from here)."""

    def __init__(self, step: relax.Function, weights: list[WeightLayout]) -> None:
        self.values: dict[relax.Expr, object] = {}  # Relax var or constant -> PlanTensor, or list of them (a multi-output call)
        self.ops: list[tuple] = []  # ("alloc", t) | ("view", t) | ("call", kernel name, [arg])
        self.params: list[tuple[str, object]] = []  # (name, PlanTensor | tirx.Var), the step's order
        self.constants: list[tuple[PlanTensor, np.ndarray]] = []
        first_weight = len(step.params) - len(weights)
        for k, p in enumerate(step.params):
            if isinstance(p.ty, relax.ShapeType):
                (past,) = p.ty.values
                if not isinstance(past, tirx.Var):
                    raise Unsupported("the step's past is not a plain symbol")
                self.params.append(("past", past))
                continue
            if k >= first_weight:  # typed by rank and dtype only: the shape is the layout's
                w = weights[k - first_weight]
                t = PlanTensor(list(w.shape), w.dtype, p.name, param=True)
            else:
                t = PlanTensor(_shape_of(p.ty), p.ty.dtype, p.name, param=True)
            self.values[p] = t
            self.params.append((p.name, t))
        for block in step.body.blocks:
            for b in block.bindings:
                if not isinstance(b, relax.VarBinding):
                    raise Unsupported("the step has a match_cast binding")
                self._bind(b.var, b.value)
        result = step.body.body
        self.results = [self._arg(r) for r in (result.fields if isinstance(result, relax.Tuple) else [result])]

    def _arg(self, e: relax.Expr):
        if tvm.ir.is_prim_expr(e):
            return e
        if isinstance(e, tvm.ir.expr.Constant):
            if e not in self.values:  # one parameter per constant, however many calls pass it
                array = e.value.numpy()
                self.values[e] = PlanTensor(list(array.shape), str(array.dtype), f"const{len(self.constants)}", param=True)
                self.constants.append((self.values[e], array))
            return self.values[e]
        value = self.values.get(e)
        if not isinstance(value, PlanTensor):
            raise Unsupported(f"{e} is not a tensor value of the step")
        return value

    def _bind(self, var: relax.Var, value: relax.Expr) -> None:
        op = _op_name(value) if isinstance(value, relax.Call) else ""
        if isinstance(value, relax.Var):
            self.values[var] = self._arg(value)
        elif isinstance(value, relax.TupleGetItem):
            self.values[var] = self.values[value.tuple_value][value.index]
        elif op == "relax.reshape":
            src = self._arg(value.args[0])
            t = PlanTensor(_shape_of(var.ty), src.dtype, var.name, root=src.root or src)
            self.ops.append(("view", t))
            self.values[var] = t
        elif op in ("relax.call_tir", "relax.call_tir_inplace") and len(value.args) == 2:
            args = [self._arg(a) for a in value.args[1].fields]
            if op == "relax.call_tir_inplace":
                outs = [args[i] for i in value.attrs.inplace_indices]
                self.ops.append(("call", value.args[0].name_hint, args))
            else:
                types = value.ty.fields if isinstance(value.ty, relax.TupleType) else [value.ty]
                outs = [PlanTensor(_shape_of(t), t.dtype, f"{var.name}{i}") for i, t in enumerate(types)]
                self.ops += [("alloc", t) for t in outs]
                self.ops.append(("call", value.args[0].name_hint, args + outs))
            self.values[var] = outs if isinstance(value.ty, relax.TupleType) else outs[0]
        else:
            raise Unsupported(f"the step binds {var.name} to {op or type(value).__name__}, which the driver "
                               "does not emit")
