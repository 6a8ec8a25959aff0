"""16-bit float weights (bfloat16, float16) kept 16-bit in the graph.

A weight stored in 16 bits is a uint16 array of the bit patterns, and `widen(bits, dtype=...)`
is an ordinary node between it and the op that reads it (`linear`, `mlp`, `experts`,
`router.topk`, `embedding`), exactly as `dequantize` sits in front of low-bit codes
(ops/quant.py): the interpreter computes the model with the weights as stored (each 16-bit
value widened to float32 exactly), every pass still sees an ordinary float32 weight, and a
backend recognises the pair and widens inside the kernel that reads the weight, so the
weight stays 16-bit in memory and in the artifact. Constant folding never expands it (the op
declares `keeps_weights_low_bit`).

Why bit patterns rather than a float dtype: numpy has no bfloat16, and one storage dtype
for both formats keeps every layout and file writer unchanged; `dtype` says how to read the
bits. bfloat16 is the upper half of a float32 (widening is a 16-bit shift); float16 is IEEE
half precision (widening is the hardware conversion, F16C's vcvtph2ps on x86).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from mocompile.ir.ops.quant import _reads_weights_only
from mocompile.ir.registry import REQUIRED, Cost, OpDef, register_op
from mocompile.ir.types import TensorType

HALF_DTYPES = ("bfloat16", "float16")
# what --dtype says -> the IR's name of the format
SHORT_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


def to_bits(w: np.ndarray, dtype: str) -> np.ndarray:
    """float32 weights -> uint16 bit patterns of `dtype`, rounded to nearest even (as torch's
    and the hardware's conversions round). bfloat16 keeps a NaN a NaN; float16 turns values
    beyond its range (65504) into infinities, which callers check for."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):  # out-of-range values become infinities, as documented
            return w.astype(np.float16).view(np.uint16)
    if dtype != "bfloat16":
        raise ValueError(f"unknown 16-bit weight dtype {dtype!r} (one of {', '.join(HALF_DTYPES)})")
    bits = w.view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    return np.where(np.isnan(w), np.uint32(0x7FC0), rounded).astype(np.uint16)


def from_bits(bits: np.ndarray, dtype: str) -> np.ndarray:
    """uint16 bit patterns of `dtype` -> the float32 values they hold (exact)."""
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float32)
    if dtype != "bfloat16":
        raise ValueError(f"unknown 16-bit weight dtype {dtype!r} (one of {', '.join(HALF_DTYPES)})")
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _infer(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    if attrs["dtype"] not in HALF_DTYPES:
        raise ValueError(f"widen: dtype must be one of {', '.join(HALF_DTYPES)}, got {attrs['dtype']!r}")
    if ts[0].dtype != "uint16":
        raise ValueError(f"widen takes the uint16 bit patterns of {attrs['dtype']} weights, got {ts[0].dtype}")
    return [TensorType(ts[0].shape, "float32")]


def _cost(ins, outs, attrs, env) -> Cost:
    return Cost(flops=outs[0].numel(env), bytes=2 * ins[0].numel(env) + 4 * outs[0].numel(env))


register_op(OpDef("widen", _infer, lambda xs, a: [from_bits(xs[0], a["dtype"])], {"dtype": REQUIRED},
                  batch_flow=_reads_weights_only, cost=_cost, positionwise=True, keeps_weights_low_bit=True,
                  weight_format=lambda a: a["dtype"],
                  doc="16-bit float weights (uint16 bit patterns of bfloat16 or float16) widened to float32"))
