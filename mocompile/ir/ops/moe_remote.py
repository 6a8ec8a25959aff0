"""`experts.remote`: the routed experts of one MoE layer, computed outside the graph.

The expert-parallel form of a model (mocompile/ep_build.py) replaces every `experts` node by
this op, whose inputs are only the tokens and their routing: the expert weights are not in
the graph, so the program that holds the dense part of the model (attention, norms, router,
shared experts) is the same on every rank and loads none of them. What serves the experts is
installed at run time: a compiled program calls the packed function SERVICE (the TVM
lowering), which mocompile/runtime_ep.py registers to send the rows to the ranks holding
their experts and combine the answers; the interpreter calls the function installed with
`expert_service` (a test of the cut: the graph with a service computing the original experts
is the original graph).

Semantics: out[t] = sum_j weights[t, j] * FFN_{indices[t, j]}(x[t]), as `experts`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from mocompile.ir.batch_flow import rowwise
from mocompile.ir.ops.moe import _experts_params  # the routing rows of `experts`, read per token
from mocompile.ir.registry import REQUIRED, Cost, OpDef, register_op
from mocompile.ir.types import TensorType

SERVICE = "mocompile.ep.experts"  # the packed function a compiled program calls: (x, weights, indices, layer) -> y

# (layer, x [rows, hidden], weights [rows, k], indices [rows, k]) -> y [rows, hidden]
ExpertService = Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
_service: contextvars.ContextVar[ExpertService | None] = contextvars.ContextVar("expert_service", default=None)


@contextlib.contextmanager
def expert_service(fn: ExpertService) -> Iterator[None]:
    """Within the block, the interpreter computes `experts.remote` nodes with `fn`."""
    token = _service.set(fn)
    try:
        yield
    finally:
        _service.reset(token)


def _infer(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    if len(ts) != 3:
        raise ValueError("experts.remote takes x, weights, indices")
    x, w, idx = ts
    if w.shape != idx.shape or w.shape[:-1] != x.shape[:-1] or idx.dtype != "int32":
        raise ValueError(f"experts.remote: routing {w} / {idx} does not match tokens {x}")
    if not isinstance(attrs["layer"], int) or not isinstance(attrs["experts"], int) or attrs["experts"] < 1:
        raise ValueError(f"experts.remote: layer and experts must be integers (got {attrs['layer']!r}, "
                         f"{attrs['experts']!r})")
    return [x]


def _compute(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    fn = _service.get()
    if fn is None:
        raise ValueError(f"experts.remote of layer {attrs['layer']}: its experts are served by other processes "
                         f"(mocompile run-ep); no expert service is installed here")
    x, w, idx = xs
    h = x.shape[-1]
    y = fn(int(attrs["layer"]), x.reshape(-1, h), w.reshape(-1, w.shape[-1]), idx.reshape(-1, idx.shape[-1]))
    return [np.asarray(y, np.float32).reshape(x.shape)]


def _cost(ins, outs, attrs, env) -> Cost:
    """The rows sent out and received back; the expert arithmetic happens elsewhere."""
    return Cost(flops=0, bytes=4 * 2 * outs[0].numel(env) + 8 * ins[1].numel(env))


# A token's output reads only its own row and routing (the experts' weights are elsewhere).
register_op(OpDef("experts.remote", _infer, _compute, {"layer": REQUIRED, "experts": REQUIRED}, cost=_cost,
                  batch_flow=rowwise(_experts_params), positionwise=True,
                  doc="sum_j weights[t,j] * FFN_{indices[t,j]}(x[t]) with the experts of MoE layer `layer` (of "
                      "`experts`) served outside the graph (expert parallelism); inputs x, weights, indices"))
