"""Elementwise ops with numpy broadcasting: the glue between the high-level ops."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy.special import erf

from mocompile.ir.registry import Cost, OpDef, register_op
from mocompile.ir.types import Dim, TensorType


def broadcast_shapes(a: Sequence[Dim], b: Sequence[Dim]) -> tuple[Dim, ...]:
    """numpy broadcasting over possibly symbolic dims (a symbol broadcasts only with 1 or itself)."""
    out: list[Dim] = []
    for i in range(max(len(a), len(b))):
        da = a[len(a) - 1 - i] if i < len(a) else 1
        db = b[len(b) - 1 - i] if i < len(b) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            raise ValueError(f"shapes {tuple(a)} and {tuple(b)} do not broadcast")
    return tuple(reversed(out))


def _infer_binary(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    a, b = ts
    if a.dtype != b.dtype:
        raise ValueError(f"dtype mismatch {a.dtype} vs {b.dtype}")
    return [TensorType(broadcast_shapes(a.shape, b.shape), a.dtype)]


def _infer_unary(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    (a,) = ts
    if a.dtype != "float32":
        raise ValueError(f"expects float32, got {a.dtype}")
    return [a]


def _elementwise_cost(ins, outs, attrs, env) -> Cost:
    n = outs[0].numel(env)
    return Cost(flops=n, bytes=4 * (n + sum(t.numel(env) for t in ins)))


def _binary(name: str, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], doc: str) -> None:
    register_op(OpDef(name, _infer_binary, lambda xs, a: [fn(xs[0], xs[1])], cost=_elementwise_cost, doc=doc))


def _unary(name: str, fn: Callable[[np.ndarray], np.ndarray], doc: str) -> None:
    register_op(OpDef(name, _infer_unary, lambda xs, a: [fn(xs[0]).astype(np.float32)], cost=_elementwise_cost, doc=doc))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, torch's default."""
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"silu": silu, "gelu": gelu}

_binary("add", np.add, "a + b (numpy broadcasting)")
_binary("mul", np.multiply, "a * b (numpy broadcasting)")
_unary("silu", silu, "x * sigmoid(x)")
_unary("gelu", gelu, "exact erf GELU")
_unary("sigmoid", sigmoid, "1 / (1 + exp(-x))")
