"""torch.nn.Module -> mocompile IR, through torch.fx.

The module is traced with the layers the IR keeps whole (attention core, MLP, router,
experts, norms, linear, embedding) as fx leaves; every fx node is then mapped by a table
keyed on the leaf module's class or the called function (the tables live in fx_tables.py;
the DSL's layers register here, plain tensor code in lower_tensor_code.py). A node with no
entry is an error that names the op and where it is in the model, never a silent drop.
"""

from __future__ import annotations

import operator
from typing import Any, Mapping

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from mocompile import lower_tensor_code  # noqa: F401  (registers the lowerings of plain tensor code)
from mocompile.dsl import modules as M
from mocompile.errors import MocompileError
from mocompile.fx_tables import (FUNCTION_LOWERINGS, METHOD_LOWERINGS, MODULE_LOWERINGS, Lowering, lowers_function,
                                 lowers_module, unary_lowering)
from mocompile.ir.graph import Graph, Value
from mocompile.ir.types import TensorType
from mocompile.ir.weights import LazyWeight

LEAF_MODULES: tuple[type[nn.Module], ...] = (M.AttentionCore, M.LatentAttentionCore, M.MLP, M.Router, M.Experts,
                                             M.RMSNorm)


class LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEAF_MODULES) or super().is_leaf_module(m, qualname)


# ---- leaf modules -----------------------------------------------------------------------
@lowers_module(nn.Linear)
def _linear(lw: Lowering, m: nn.Linear, path: str, args: list[Any]) -> Value:
    ins = [args[0], lw.param(f"{path}.weight", m.weight)]
    if m.bias is not None:
        ins.append(lw.param(f"{path}.bias", m.bias))
    return lw.graph.add("linear", *ins, loc=path)


@lowers_module(nn.Embedding)
def _embedding(lw: Lowering, m: nn.Embedding, path: str, args: list[Any]) -> Value:
    return lw.graph.add("embedding", args[0], lw.param(f"{path}.weight", m.weight), loc=path)


@lowers_module(M.RMSNorm)
def _rmsnorm(lw: Lowering, m: M.RMSNorm, path: str, args: list[Any]) -> Value:
    group = int(m.weight.shape[0]) if m.grouped else None
    return lw.graph.add("rmsnorm", args[0], lw.param(f"{path}.weight", m.weight), loc=path, eps=float(m.eps),
                        group=group)


@lowers_module(nn.LayerNorm)
def _layernorm(lw: Lowering, m: nn.LayerNorm, path: str, args: list[Any]) -> Value:
    if m.weight is None or m.bias is None or len(m.normalized_shape) != 1:
        raise MocompileError(f"{path}: only LayerNorm over the last axis with weight and bias is supported")
    w, b = lw.param(f"{path}.weight", m.weight), lw.param(f"{path}.bias", m.bias)
    return lw.graph.add("layernorm", args[0], w, b, loc=path, eps=float(m.eps))


@lowers_module(M.AttentionCore)
def _attention(lw: Lowering, m: M.AttentionCore, path: str, args: list[Any]) -> Value:
    return lw.graph.add("attention", *args[:3], loc=path, heads=m.heads, kv_heads=m.kv_heads, head_dim=m.head_dim,
                        rope_theta=float(m.rope_theta), causal=bool(m.causal))


@lowers_module(M.LatentAttentionCore)
def _latent_attention(lw: Lowering, m: M.LatentAttentionCore, path: str, args: list[Any]) -> Value:
    return lw.graph.add("attention.mla", *args[:4], loc=path, heads=m.heads, nope_dim=m.nope_dim, rope_dim=m.rope_dim,
                        v_dim=m.v_dim, rope_theta=float(m.rope_theta))


def _ffn_weights(lw: Lowering, path: str, gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor,
                 names: tuple[str, str, str]) -> list[Value]:
    ws = [] if gate is None else [lw.param(f"{path}.{names[0]}", gate)]
    return ws + [lw.param(f"{path}.{names[1]}", up), lw.param(f"{path}.{names[2]}", down)]


@lowers_module(M.MLP)
def _mlp(lw: Lowering, m: M.MLP, path: str, args: list[Any]) -> Value:
    ws = _ffn_weights(lw, path, None if m.gate_proj is None else m.gate_proj.weight, m.up_proj.weight,
                      m.down_proj.weight, ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
    return lw.graph.add("mlp", args[0], *ws, loc=path, activation=m.activation, gated=m.gated)


@lowers_module(M.Router)
def _router(lw: Lowering, m: M.Router, path: str, args: list[Any]) -> tuple[Value, ...]:
    ins = [args[0], lw.param(f"{path}.weight", m.weight)]
    if m.score_bias is not None:
        ins.append(lw.param(f"{path}.score_bias", m.score_bias))
    if m.groups:
        ins.append(args[1])
    attrs = dict(top_k=m.top_k, scoring=m.scoring, normalize=m.normalize, routed_scale=float(m.routed_scale),
                 n_group=m.n_group, topk_group=m.topk_group, groups=tuple(tuple(g) for g in m.groups),
                 capacity_factor=m.capacity_factor, score_bias=m.score_bias is not None, group_score=m.group_score)
    return tuple(lw.graph.add_node("router.topk", ins, attrs, loc=path, name=path.rsplit(".", 1)[-1]))


@lowers_module(M.Experts)
def _experts(lw: Lowering, m: M.Experts, path: str, args: list[Any]) -> Value:
    ws = _ffn_weights(lw, path, m.gate, m.up, m.down, ("gate", "up", "down"))
    return lw.graph.add("experts", *args[:3], *ws, loc=path, activation=m.activation, gated=m.gated)


# ---- functions ----------------------------------------------------------------------------
# Arithmetic (add, mul, sub, ...) with tensor or Python-number operands is in lower_tensor_code.py.
FUNCTION_LOWERINGS.update({F.silu: unary_lowering("silu"), F.gelu: unary_lowering("gelu"),
                           torch.sigmoid: unary_lowering("sigmoid")})


@lowers_function(operator.getitem)
def _getitem(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    container, index = args
    if isinstance(container, (tuple, list)):
        return container[index]
    raise MocompileError(f"{path}: indexing a tensor ({index!r}) is not supported")


@lowers_function(torch.cat)
def _cat(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    axis = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    return lw.graph.add("concat", *args[0], loc=path, axis=int(axis))


@lowers_function(M.segment_ids)
def _segment_ids(lw: Lowering, path: str, args: list[Any], kwargs: dict[str, Any]) -> Value:
    return lw.graph.add("segment_ids", *args[0], loc=path, ids=tuple(int(i) for i in args[1]))


# ---- driver -------------------------------------------------------------------------------
def _map_args(a: Any, env: Mapping[torch.fx.Node, Any]) -> Any:
    return torch.fx.node.map_arg(a, lambda n: env[n])


def lower_module(model: nn.Module, input_types: Mapping[str, TensorType], name: str = "model",
                 output_names: tuple[str, ...] = (), lazy: Mapping[int, LazyWeight] | None = None) -> Graph:
    """Trace `model` and lower it. `input_types` gives each forward argument's IR type, in
    order; `output_names` names the graph outputs (e.g. "logits"); `lazy` gives the
    LazyWeight of each parameter (by id) of a model built on the meta device."""
    try:
        fx_graph = LeafTracer().trace(model)
    except Exception as e:  # fx raises many kinds of errors on untraceable Python
        raise MocompileError(f"torch.fx could not trace {type(model).__name__}: {e}") from None
    graph = Graph(name)
    lw = Lowering(graph, lazy)
    env: dict[torch.fx.Node, Any] = {}
    placeholders = [n for n in fx_graph.nodes if n.op == "placeholder"]
    if [n.target for n in placeholders] != list(input_types):
        raise MocompileError(f"model inputs {[n.target for n in placeholders]} do not match signature {list(input_types)}")
    for node in fx_graph.nodes:
        path = node.meta.get("nn_module_stack") and next(reversed(node.meta["nn_module_stack"].values()))[0] or ""
        if node.op == "placeholder":
            env[node] = graph.add_input(node.target, input_types[node.target])
        elif node.op == "call_module":
            sub = model.get_submodule(node.target)
            fn = MODULE_LOWERINGS.get(type(sub))
            if fn is None:
                raise MocompileError(f"{node.target}: no IR lowering for module {type(sub).__name__}")
            env[node] = fn(lw, sub, node.target, list(_map_args(node.args, env)))
        elif node.op == "call_function":
            fn = FUNCTION_LOWERINGS.get(node.target)
            if fn is None:
                raise MocompileError(f"{path or node.name}: no IR lowering for function {getattr(node.target, '__name__', node.target)}")
            env[node] = fn(lw, path or node.name, list(_map_args(node.args, env)), dict(_map_args(node.kwargs, env)))
        elif node.op == "get_attr":
            env[node] = lw.param(node.target, _get_attr(model, node.target))
        elif node.op == "call_method":
            fn = METHOD_LOWERINGS.get(node.target)
            if fn is None:
                raise MocompileError(f"{path or node.name}: no IR lowering for tensor method .{node.target}()")
            env[node] = fn(lw, path or node.name, list(_map_args(node.args, env)), dict(_map_args(node.kwargs, env)))
        elif node.op == "output":
            out = _map_args(node.args[0], env)
            graph.outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    for v, out_name in zip(graph.outputs, output_names):
        v.name = graph.fresh_name(out_name)
    return graph


def _get_attr(model: nn.Module, target: str) -> torch.Tensor:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def numpy_inputs(inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in inputs.items()}
