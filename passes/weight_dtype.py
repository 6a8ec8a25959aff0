"""weight-dtype: store the matmul and embedding weights in 16 bits (bfloat16 or float16).

    weight-dtype(dtype=bf16)     every weight a matmul reads (attention projections, routers,
                                 dense blocks, experts, lm head) and every embedding table
                                 as bfloat16
    weight-dtype(dtype=fp16)     ... as IEEE float16

What `mocompile compile --dtype bf16|fp16` appends to the pipeline (and what a bf16
checkpoint gets by default). Each such float32 weight becomes its 16-bit bit patterns behind
a `widen` node (mocompile/ir/ops/widen.py), rounded to nearest even: for a bf16 checkpoint,
imported as float32 that holds bf16 values exactly, the rounding changes nothing, so the
graph computes the checkpoint's model as stored; for a float32 model it is the model with
its weights rounded. Activations, norms and biases stay float32, and a backend widens the
weights in registers as its kernels read them, so each decode step reads half the bytes.

The report lists per tensor and in total the bytes before and after, and how far the
rounding moved the weights (0 for a checkpoint already in that format).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph, Node, Value
from mocompile.ir.ops.widen import SHORT_NAMES, from_bits, to_bits
from mocompile.ir.registry import get_op
from mocompile.pass_manager import Pass, PassContext, PassResult, register_pass
from mocompile.passes.dce import drop_dead_weights
from mocompile.passes.quantize import _insert_before


def weight_inputs(node: Node) -> range:
    """The inputs of `node` that may be stored in 16 bits: its op's weight slots (matmul
    weights, never the activation), or the table of a token embedding."""
    op = get_op(node.op)
    if op.weight_slots is not None:
        return range(len(node.inputs))[op.weight_slots]
    return range(1, 2) if op.embeds_tokens else range(0)


@register_pass("weight-dtype")
class WeightDtype(Pass):
    """Store matmul and embedding weights as bfloat16 or float16, widened to float32 in the kernels."""

    preserves_semantics = False  # rounding a float32 weight changes it: verify against the IR interpreter

    def __init__(self, dtype: Literal["bf16", "fp16"] = "bf16") -> None:
        if dtype not in SHORT_NAMES:
            raise MocompileError(f"weight-dtype: dtype must be bf16 or fp16, got {dtype!r}")
        self.short, self.dtype = dtype, SHORT_NAMES[dtype]

    def describe(self) -> str:
        return f"weight-dtype(dtype={self.short})"

    def stored_bytes_per_param(self) -> float:
        return 2.0

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        done: dict[int, Value] = {}
        tensors: list[dict[str, Any]] = []
        for node in list(graph.nodes):
            for i in weight_inputs(node):
                w = node.inputs[i]
                if graph.params.get(w.name) is not w or w.type.dtype != "float32":
                    continue  # computed at run time, or already low-bit / 16-bit
                if id(w) not in done:
                    done[id(w)], info = self._store_16bit(graph, node, w)
                    tensors.append(info)
                node.inputs[i] = done[id(w)]
        drop_dead_weights(graph)
        before = sum(t["bytes_before"] for t in tensors)
        after = sum(t["bytes_after"] for t in tensors)
        return PassResult(graph, {"dtype": self.dtype, "tensors": tensors,
                                  "total": {"tensors": len(tensors), "bytes_before": before, "bytes_after": after,
                                            "max_rounding": max((t["max_rounding"] for t in tensors), default=0.0)}})

    def _store_16bit(self, graph: Graph, consumer: Node, w: Value) -> tuple[Value, dict[str, Any]]:
        array = graph.weights[w.name]
        bits = to_bits(array, self.dtype)
        widened = from_bits(bits, self.dtype)
        if not np.isfinite(widened).all() and np.isfinite(array).all():
            raise MocompileError(f"weight-dtype: weight {w.name} has values beyond {self.dtype}'s range "
                                 f"(max |w| = {float(np.abs(array).max()):.6g}); use --dtype bf16 or fp32")
        stored = graph.add_param(graph.fresh_name(f"{w.name}.{self.short}"), bits)
        out = _insert_before(graph, consumer, "widen", [stored], {"dtype": self.dtype}, f"{w.name}.widen")
        info = {"tensor": w.name, "shape": list(array.shape), "bytes_before": int(array.nbytes),
                "bytes_after": int(bits.nbytes), "max_rounding": float(np.abs(widened - array).max(initial=0.0))}
        return out, info
