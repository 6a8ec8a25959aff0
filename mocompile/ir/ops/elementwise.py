"""Elementwise ops with numpy broadcasting: the glue between the high-level ops."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy.special import erf

from mocompile.ir.batch_flow import LABEL, SAME_SAMPLE, BatchAxis, Flow, FlowArgs, Out, broadcast_map, elementwise
from mocompile.ir.registry import REQUIRED, Cost, OpDef, register_op
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


def _binary(name: str, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], doc: str,
            positionwise: bool = False) -> None:
    register_op(OpDef(name, _infer_binary, lambda xs, a: [fn(xs[0], xs[1])], batch_flow=elementwise,
                      cost=_elementwise_cost, doc=doc, positionwise=positionwise))


def _unary(name: str, fn: Callable[[np.ndarray], np.ndarray], doc: str, positionwise: bool = False) -> None:
    register_op(OpDef(name, _infer_unary, lambda xs, a: [fn(xs[0]).astype(np.float32)], batch_flow=elementwise,
                      cost=_elementwise_cost, doc=doc, positionwise=positionwise))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, torch's default."""
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"silu": silu, "gelu": gelu}

# positionwise=True on the ops a model's layers use between attentions and on sub/div; the
# other glue ops (abs, round, clamp, eq, logical_and) leave it undeclared, so a graph holding
# them gets no token-by-token decode step (mocompile.kv_cache).
_binary("add", np.add, "a + b (numpy broadcasting)", positionwise=True)
_binary("mul", np.multiply, "a * b (numpy broadcasting)", positionwise=True)
_unary("silu", silu, "x * sigmoid(x)", positionwise=True)
_unary("gelu", gelu, "exact erf GELU", positionwise=True)
_unary("sigmoid", sigmoid, "1 / (1 + exp(-x))", positionwise=True)

# ---- glue that plain torch code needs (dynamic quantization, masks) ------------------------
_binary("sub", np.subtract, "a - b (numpy broadcasting)", positionwise=True)
_binary("div", lambda a, b: np.divide(a, b).astype(a.dtype) if a.dtype.kind == "f" else np.floor_divide(a, b),
        "a / b (floor division for integers, as torch's //)", positionwise=True)
_unary("abs", np.abs, "|x|")
_unary("round", np.round, "round half to even, as torch.round")


def _infer_clamp(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    return [ts[0]]


register_op(OpDef("clamp", _infer_clamp, lambda xs, a: [np.clip(xs[0], a["min"], a["max"]).astype(xs[0].dtype)],
                  {"min": REQUIRED, "max": REQUIRED}, batch_flow=elementwise, cost=_elementwise_cost,
                  doc="min(max(x, min), max)"))


def _infer_compare(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    return [TensorType(_infer_binary(ts, attrs)[0].shape, "bool")]


def _pair_of_labels(args: FlowArgs, role: str) -> tuple[BatchAxis, BatchAxis] | None:
    """The two output axes on which inputs of `role` carry their (single) batch axis, if different."""
    r = args.out_types[0].rank
    got = []
    for s, t in zip(args.ins, args.in_types):
        if s.role != role or len(s.axes) != 1:
            return None
        b = s.axes[0]
        got.append(BatchAxis(broadcast_map(t.rank, r)[b.axis], b.rows))
    return (got[0], got[1]) if got[0].axis != got[1].axis else None


def _eq_flow(args: FlowArgs) -> Flow:
    """Comparing the sample labels of two different axes (ids[:, None] == ids[None, :]) gives
    a same-sample (block-diagonal) mask; any other comparison is elementwise."""
    pair = _pair_of_labels(args, LABEL)
    if pair:
        return Flow((Out(axes=pair, role=SAME_SAMPLE),), frozenset({0, 1}))
    return elementwise(args)


def _and_flow(args: FlowArgs) -> Flow:
    """A same-sample mask and-ed with a mask that depends on no sample (causal, padding of
    the pair's own positions) stays block-diagonal."""
    for m, other in ((0, 1), (1, 0)):
        s, o = args.ins[m], args.ins[other]
        if s.role == SAME_SAMPLE and not o.axes:
            r = args.out_types[0].rank
            shift = r - args.in_types[m].rank
            axes = tuple(BatchAxis(b.axis + shift, b.rows) for b in s.axes)
            return Flow((Out(axes=axes, role=SAME_SAMPLE),), frozenset({m}))
    return elementwise(args)


register_op(OpDef("eq", _infer_compare, lambda xs, a: [np.equal(xs[0], xs[1])], batch_flow=_eq_flow,
                  cost=_elementwise_cost, doc="a == b (numpy broadcasting), bool"))


def _infer_and(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    if any(t.dtype != "bool" for t in ts):
        raise ValueError(f"logical_and takes bool tensors, got {[str(t) for t in ts]}")
    return _infer_binary(ts, attrs)


register_op(OpDef("logical_and", _infer_and, lambda xs, a: [np.logical_and(xs[0], xs[1])], batch_flow=_and_flow,
                  cost=_elementwise_cost, doc="a & b on bool tensors"))
