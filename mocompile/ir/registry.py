"""The op registry: every facet of an op registered once, in one place.

Facets a registered op carries:
- `infer`: output types from input types and attrs (the verifier and every pass use it);
- `compute`: reference semantics on numpy arrays (the interpreter: the oracle that every
  backend and pass is checked against);
- `batch_flow`: how the batch (sample) axis of each input reaches each output, and whether
  the op mixes samples (the isolation analysis; vocabulary and helpers in
  `mocompile.ir.batch_flow`). `batch_flow(FlowArgs) -> Flow`: from the inputs' abstract
  states (which axes carry the sample index, which mixing points they already depend on,
  their role: data, sample label, same-sample mask, batch-wide permutation), input/output
  types and attrs, to each output's state, with `Out(mixes="why")` where the op itself
  makes an output depend on other samples. An op without one makes the verdict "unknown",
  never "isolated";
- `cost`: FLOPs and bytes moved for concrete shapes (placement, reports, rooflines).
Backend lowerings live with each backend (a backend registers a lowering per op name and
refuses a graph holding an op it has none for), so the core never imports TVM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mocompile.ir.batch_flow import BatchFlowFn
from mocompile.ir.types import TensorType


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

InferFn = Callable[[Sequence[TensorType], Mapping[str, Any]], list[TensorType]]
ComputeFn = Callable[[Sequence[np.ndarray], Mapping[str, Any]], list[np.ndarray]]


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes: int  # bytes read and written, weights included


@dataclass(frozen=True)
class OpDef:
    name: str
    infer: InferFn
    compute: ComputeFn
    attrs: Mapping[str, Any] = field(default_factory=dict)  # name -> default (REQUIRED if none)
    batch_flow: BatchFlowFn | None = None
    cost: Callable[[Sequence[TensorType], Sequence[TensorType], Mapping[str, Any], Mapping[str, int]], Cost] | None = None
    doc: str = ""

    def check_attrs(self, attrs: dict[str, Any], where: str = "") -> None:
        """Fill defaults in place; reject unknown or missing attributes."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise ValueError(f"{self.name}{' at ' + where if where else ''}: unknown attribute(s) {sorted(unknown)}")
        for k, default in self.attrs.items():
            if k not in attrs:
                if default is REQUIRED:
                    raise ValueError(f"{self.name}{' at ' + where if where else ''}: missing attribute {k!r}")
                attrs[k] = default


_OPS: dict[str, OpDef] = {}


def register_op(opdef: OpDef) -> OpDef:
    if opdef.name in _OPS:
        raise ValueError(f"op {opdef.name!r} registered twice")
    _OPS[opdef.name] = opdef
    return opdef


def get_op(name: str) -> OpDef:
    _load_builtin_ops()
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}") from None


def all_ops() -> dict[str, OpDef]:
    _load_builtin_ops()
    return dict(_OPS)


def _load_builtin_ops() -> None:
    # Importing the package registers the built-in ops (each file calls register_op).
    import mocompile.ir.ops  # noqa: F401
