"""Arithmetic on symbolic sizes (Python operators and torch.sym_* in the exported graph),
runtime assertions, and higher-order ops.

Sizes are numbers that depend on shapes, not samples; their taints (a size computed from a
sample's values through .item()) are carried by the analysis like any other. A count of
positions selected over the whole batch stays a count through arithmetic: it mixes only once
read as data. Assertions produce nothing a sample could read.
"""

from __future__ import annotations

import math
import operator

import torch

from mocompile.aten.call import Call
from mocompile.aten.registry import by_design, rule
from mocompile.aten.state import COUNT, Flow, Out

aten = torch.ops.aten

SIZE_ARITHMETIC = [operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
                   operator.pow, operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                   operator.ge, operator.and_, operator.or_, operator.not_, operator.abs, torch.sym_float,
                   torch.sym_int, torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_ite, torch.sym_sqrt,
                   math.ceil, math.floor, math.trunc, math.sqrt]
ASSERTIONS = [aten._assert_scalar.default, aten._assert_async.default, aten._assert_async.msg,
              aten.sym_constrain_range_for_size.default, aten.sym_constrain_range.default,
              aten._assert_tensor_metadata.default]


@rule(*SIZE_ARITHMETIC)
def size_arithmetic(call: Call) -> Flow:
    """A number from numbers: a count stays a count (latent), anything else is a constant."""
    counts = [s for s in (call.state_of(a) for a in call.node.args) if s.role == COUNT]
    if counts:
        return Flow((Out(role=COUNT, carried=frozenset().union(*(s.latent for s in counts))),),
                    frozenset(call.args))
    return Flow((Out(),))


@rule(*ASSERTIONS)
def assertion(call: Call) -> Flow:
    """A runtime check: no value comes out of it."""
    return Flow(tuple(Out() for _ in call.outs), frozenset(call.args))


@rule(torch.ops.higher_order.cond)
def cond(call: Call) -> Flow:
    """torch.cond(pred, true_fn, false_fn, operands): both branches analysed on the operands;
    the result is theirs where they agree on the batch axes. The predicate's own mixing (a
    branch chosen by a statistic of the whole batch) comes with its taints."""
    pred, true_fn, false_fn, operands = call.node.args[:4]
    owner = call.node.graph.owning_module
    ins = [call.state_of(o) for o in operands]
    if call.subgraph is None or owner is None:
        return Flow(tuple(Out(unknown="torch.cond outside an exported program") for _ in call.outs))
    branches = [call.subgraph(getattr(owner, fn.target).graph, ins) for fn in (true_fn, false_fn)]
    outs = []
    for a, b in zip(*branches):
        if a.axes != b.axes:
            outs.append(Out(unknown="the branches of torch.cond put the batch axis in different places"))
        else:
            outs.append(Out(axes=a.axes, taints=a.taints | b.taints))
    return Flow(tuple(outs), frozenset({"arg3"}))

rule(torch.ops.higher_order.map_impl)(by_design("torch.map: the analysis does not look inside the mapped function"))
rule(torch.ops.higher_order.while_loop)(by_design("torch.while_loop: the analysis does not look inside the loop"))
