"""Lowerings of plain torch tensor code to the generic IR ops, as entries of `lower_fx`'s tables.

The DSL's layers stay whole in the IR; a model written by hand (a quantization helper, an
explicit MoE dispatch, packed-sequence attention, batch norm) is traced through to
reshapes, reductions, sorts, gathers and `sdpa`, so the isolation analysis (and the
interpreter) can see what it does. Python numbers become scalar weights of the tensor's dtype.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mocompile.errors import MocompileError
from mocompile.ir.graph import Value
from mocompile.fx_tables import (
    FUNCTION_LOWERINGS,
    METHOD_LOWERINGS,
    Lowering,
    lowers_function,
    lowers_method,
    lowers_module,
    unary_lowering,
)


def _arg(args: list[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _operand(lw: Lowering, path: str, a: Any, like: Value) -> Value:
    """A tensor operand as is; a Python number as a scalar weight of `like`'s dtype."""
    if isinstance(a, Value):
        return a
    if not isinstance(a, (int, float, bool)):
        raise MocompileError(f"{path}: unsupported operand {a!r}")
    return lw.graph.add_param(lw.graph.fresh_name(f"{path}.const"), np.array(a, dtype=like.type.dtype))


def _binary(op: str):
    def lower(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
        a, b = args[0], _arg(args, kwargs, 1, "other")
        like = a if isinstance(a, Value) else b
        return lw.graph.add(op, _operand(lw, path, a, like), _operand(lw, path, b, like), loc=path)
    return lower


# Binary arithmetic: tensor operands, or a tensor and a Python number.
for _op, _fns, _methods in (
    ("add", (operator.add, torch.add), ("add",)),
    ("mul", (operator.mul, torch.mul), ("mul",)),
    ("sub", (operator.sub, torch.sub), ("sub",)),
    ("div", (operator.truediv, operator.floordiv, torch.div), ("div",)),
    ("eq", (operator.eq, torch.eq), ("eq",)),
    ("logical_and", (operator.and_, torch.logical_and), ("logical_and",)),
    ("matmul", (operator.matmul, torch.matmul, torch.bmm), ("matmul", "bmm")),
):
    FUNCTION_LOWERINGS.update(dict.fromkeys(_fns, _binary(_op)))
    METHOD_LOWERINGS.update(dict.fromkeys(_methods, _binary(_op)))
for _op, _fns in (("abs", (torch.abs,)), ("round", (torch.round,))):
    FUNCTION_LOWERINGS.update(dict.fromkeys(_fns, unary_lowering(_op)))
    METHOD_LOWERINGS[_op] = unary_lowering(_op)
METHOD_LOWERINGS.update({"silu": unary_lowering("silu"), "sigmoid": unary_lowering("sigmoid")})


@lowers_function(torch.clamp)
@lowers_method("clamp")
def _clamp(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
    return lw.graph.add("clamp", args[0], loc=path, min=-np.inf if lo is None else float(lo),
                        max=np.inf if hi is None else float(hi))


@lowers_method("contiguous")
def _identity(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    return args[0]


# ---- shapes ---------------------------------------------------------------------------------
def _shape_args(args: list[Any]) -> tuple[Any, ...]:
    shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
    if not all(isinstance(d, int) for d in shape):
        raise MocompileError(f"reshape to {shape!r}: sizes must be Python ints (use -1 for the batch)")
    return tuple(shape)


@lowers_function(torch.reshape)
@lowers_method("reshape", "view")
def _reshape(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    shape = _shape_args(args if len(args) > 1 else [args[0], kwargs["shape"]])
    return lw.graph.add("reshape", args[0], loc=path, shape=shape)


@lowers_function(torch.flatten)
@lowers_method("flatten")
def _flatten(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    x = args[0]
    r = x.type.rank
    start, end = _arg(args, kwargs, 1, "start_dim", 0) % r, _arg(args, kwargs, 2, "end_dim", -1) % r
    shape = x.type.shape[:start] + (-1,) + x.type.shape[end + 1:]
    return lw.graph.add("reshape", x, loc=path, shape=shape)


@lowers_function(torch.unsqueeze)
@lowers_method("unsqueeze")
def _unsqueeze(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    x, d = args[0], _arg(args, kwargs, 1, "dim")
    d %= x.type.rank + 1
    return lw.graph.add("reshape", x, loc=path, shape=x.type.shape[:d] + (1,) + x.type.shape[d:])


@lowers_function(torch.squeeze)
@lowers_method("squeeze")
def _squeeze(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    x, d = args[0], _arg(args, kwargs, 1, "dim")
    if d is None or x.type.shape[d] != 1:
        raise MocompileError(f"{path}: only squeeze(dim) of a size-1 axis is supported")
    d %= x.type.rank
    return lw.graph.add("reshape", x, loc=path, shape=x.type.shape[:d] + x.type.shape[d + 1:])


@lowers_function(torch.transpose)
@lowers_method("transpose")
def _transpose(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    x, a, b = args[0], args[1] % args[0].type.rank, args[2] % args[0].type.rank
    perm = list(range(x.type.rank))
    perm[a], perm[b] = perm[b], perm[a]
    return lw.graph.add("permute", x, loc=path, perm=tuple(perm))


@lowers_function(torch.permute)
@lowers_method("permute")
def _permute(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    perm = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
    return lw.graph.add("permute", args[0], loc=path, perm=tuple(int(p) for p in perm))


@lowers_method("t")
def _t(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    return lw.graph.add("permute", args[0], loc=path, perm=(1, 0))


@lowers_function(torch.repeat_interleave)
@lowers_method("repeat_interleave")
def _repeat_interleave(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    repeats, dim = _arg(args, kwargs, 1, "repeats"), _arg(args, kwargs, 2, "dim")
    if not isinstance(repeats, int) or dim is None:
        raise MocompileError(f"{path}: only repeat_interleave(int, dim) is supported")
    return lw.graph.add("repeat_interleave", args[0], loc=path, repeats=repeats, axis=int(dim))


@lowers_function(torch.index_select)
@lowers_method("index_select")
def _index_select(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    return lw.graph.add("index_select", args[0], _arg(args, kwargs, 2, "index"), loc=path,
                        axis=int(_arg(args, kwargs, 1, "dim")))


@lowers_function(torch.index_copy)
@lowers_method("index_copy")
def _index_copy(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    return lw.graph.add("index_copy", args[0], _arg(args, kwargs, 2, "index"), _arg(args, kwargs, 3, "source"),
                        loc=path, axis=int(_arg(args, kwargs, 1, "dim")))


@lowers_function(torch.zeros_like)
def _zeros_like(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    return lw.graph.add("zeros_like", args[0], loc=path)


# ---- reductions, scans, sorts ---------------------------------------------------------------------
def _reduce(op: str):
    def lower(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
        dim = _arg(args, kwargs, 1, "dim")
        axes = None if dim is None else ((int(dim),) if isinstance(dim, int) else tuple(int(d) for d in dim))
        return lw.graph.add(op, args[0], loc=path, axes=axes, keepdim=bool(_arg(args, kwargs, 2, "keepdim", False)))
    return lower


for _op, _fns in (("sum", (torch.sum,)), ("mean", (torch.mean,)), ("amax", (torch.amax,))):
    FUNCTION_LOWERINGS.update(dict.fromkeys(_fns, _reduce(_op)))
    METHOD_LOWERINGS[_op] = _reduce(_op)


@lowers_function(torch.max)
@lowers_method("max")
def _max(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    if len(args) > 1 or kwargs:
        raise MocompileError(f"{path}: only max() over all elements is supported (use amax(dim) or topk)")
    return lw.graph.add("amax", args[0], loc=path, axes=None, keepdim=False)


@lowers_function(torch.softmax, F.softmax)
@lowers_method("softmax")
def _softmax(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    return lw.graph.add("softmax", args[0], loc=path, axis=int(_arg(args, kwargs, 1, "dim")))


@lowers_function(torch.cumsum)
@lowers_method("cumsum")
def _cumsum(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    return lw.graph.add("cumsum", args[0], loc=path, axis=int(_arg(args, kwargs, 1, "dim")))


@lowers_function(torch.topk)
@lowers_method("topk")
def _topk(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> tuple[Value, ...]:
    if not _arg(args, kwargs, 3, "largest", True):
        raise MocompileError(f"{path}: topk(largest=False) is not supported")
    k, dim = int(_arg(args, kwargs, 1, "k")), int(_arg(args, kwargs, 2, "dim", -1))
    return tuple(lw.graph.add_node("topk", [args[0]], {"k": k, "axis": dim}, loc=path))


@lowers_function(torch.argsort)
@lowers_method("argsort")
def _argsort(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    if _arg(args, kwargs, 2, "descending", False):
        raise MocompileError(f"{path}: argsort(descending=True) is not supported")
    return lw.graph.add("argsort", args[0], loc=path, axis=int(_arg(args, kwargs, 1, "dim", -1)))


@lowers_function(getattr)
def _named_field(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """`.values` / `.indices` of a topk result."""
    obj, name = args[0], args[1]
    if isinstance(obj, tuple) and name in ("values", "indices"):
        return obj[0 if name == "values" else 1]
    raise MocompileError(f"{path}: reading attribute .{name} is not supported")


# ---- attention and batch norm ---------------------------------------------------------------------
@lowers_function(F.scaled_dot_product_attention)
def _sdpa(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    mask = _arg(args, kwargs, 3, "attn_mask")
    if _arg(args, kwargs, 4, "dropout_p", 0.0) or kwargs.get("enable_gqa"):
        raise MocompileError(f"{path}: scaled_dot_product_attention with dropout or enable_gqa is not supported")
    scale = kwargs.get("scale")
    return lw.graph.add("sdpa", *args[:3], *([mask] if mask is not None else []), loc=path,
                        causal=bool(_arg(args, kwargs, 5, "is_causal", False)),
                        scale=None if scale is None else float(scale))


@lowers_module(nn.BatchNorm1d)
def _batch_norm(lw: Lowering, m: nn.BatchNorm1d, path: str, args: list[Any]) -> Value:
    """Training mode or no running statistics: normalised with the batch's own statistics."""
    if not m.affine:
        raise MocompileError(f"{path}: BatchNorm1d without affine parameters is not supported")
    ins = [args[0], lw.param(f"{path}.weight", m.weight), lw.param(f"{path}.bias", m.bias)]
    batch_stats = m.training or m.running_mean is None
    if not batch_stats:
        ins += [lw.param(f"{path}.running_mean", m.running_mean), lw.param(f"{path}.running_var", m.running_var)]
    return lw.graph.add("batch_norm", *ins, loc=path, eps=float(m.eps), use_batch_stats=batch_stats)
