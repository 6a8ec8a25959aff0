"""The tables the torch.fx lowering dispatches on, and the state one lowering carries.

A traced node is lowered by the entry for its leaf module's class, its called function or its
tensor method. The DSL's layers (lower_fx.py) and plain tensor code (lower_tensor_code.py)
both register here, so neither needs the other.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from mocompile.ir.graph import Graph, Value
from mocompile.ir.weights import LazyWeight


class Lowering:
    """State of one lowering: the IR graph being built and the weights already added.
    `lazy`: id(parameter) -> the LazyWeight that reads it, for a module whose parameters
    live on torch's meta device (a streamed checkpoint: the weights stay in its files)."""

    def __init__(self, graph: Graph, lazy: Mapping[int, LazyWeight] | None = None) -> None:
        self.graph = graph
        self.lazy = dict(lazy or {})
        self._by_tensor: dict[int, Value] = {}

    def param(self, name: str, tensor: torch.Tensor) -> Value:
        """The IR weight for a torch tensor; tied tensors (same storage) become one weight."""
        key = id(tensor)
        if key not in self._by_tensor:
            if key in self.lazy:
                self._by_tensor[key] = self.graph.add_param(name, self.lazy[key])
            elif tensor.is_meta:
                raise ValueError(f"{name}: a meta tensor with no file to read it from")
            else:
                self._by_tensor[key] = self.graph.add_param(name, tensor.detach().to(torch.float32).numpy().copy())
        return self._by_tensor[key]


ModuleLowering = Callable[[Lowering, nn.Module, str, list[Any]], Any]
FunctionLowering = Callable[[Lowering, str, list[Any], dict[str, Any]], Any]

MODULE_LOWERINGS: dict[type, ModuleLowering] = {}
FUNCTION_LOWERINGS: dict[Any, FunctionLowering] = {}
METHOD_LOWERINGS: dict[str, FunctionLowering] = {}  # tensor methods by name; args[0] is the tensor


def lowers_module(*classes: type) -> Callable[[ModuleLowering], ModuleLowering]:
    def deco(fn: ModuleLowering) -> ModuleLowering:
        for c in classes:
            MODULE_LOWERINGS[c] = fn
        return fn
    return deco


def lowers_function(*targets: Any) -> Callable[[FunctionLowering], FunctionLowering]:
    def deco(fn: FunctionLowering) -> FunctionLowering:
        for t in targets:
            FUNCTION_LOWERINGS[t] = fn
        return fn
    return deco


def lowers_method(*names: str) -> Callable[[FunctionLowering], FunctionLowering]:
    def deco(fn: FunctionLowering) -> FunctionLowering:
        for n in names:
            METHOD_LOWERINGS[n] = fn
        return fn
    return deco


def unary_lowering(op: str) -> FunctionLowering:
    """The lowering of a one-tensor function or method to the IR op `op`."""
    return lambda lw, path, args, kwargs: lw.graph.add(op, args[0], loc=path)
