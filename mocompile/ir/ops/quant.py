"""Quantization ops: low-bit weights and quantized activations, as plain IR.

A quantized weight stays low-bit in the graph: `dequantize(q, scale)` is an ordinary node
between the low-bit weight and the op that reads it (`linear`, `mlp`, `experts`, ...), so
the interpreter computes exactly the quantized model, every pass still sees an ordinary
linear layer, and a backend recognises the pair and reads the low-bit weight inside its
matmul kernel (constant folding never expands it: the op declares `keeps_weights_low_bit`).

Number formats (symmetric, no zero point):
- int8: q int8 in [-127, 127], w = q * scale;
- int4: q in [-8, 7] stored as q + 8 in a nibble, two per uint8 byte along the input
  axis (even k in the low nibble), w = q * scale.
Scales are float32 [..., N, G]: one per output channel and group of K/G consecutive
inputs (G = 1: per output channel).

`quantize_act(x[, scale])` rounds activations to int8 and back (the value a W8A8 kernel
multiplies); its `mode` says where the scale comes from:
- "static": a calibrated per-tensor scale, a weight [1] fixed at compile time;
- "token": max |x| of each row (each token) at run time;
- "tensor": max |x| of the whole tensor at run time, i.e. over the whole batch, so one
  sample's result depends on the other samples: its batch-flow rule says so, and the
  isolation analysis reports it as a leak.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from mocompile.ir.batch_flow import Flow, FlowArgs, combine, identity_map, one
from mocompile.ir.registry import REQUIRED, Cost, OpDef, register_op
from mocompile.ir.rounding import round_half_even
from mocompile.ir.types import Dim, TensorType

if TYPE_CHECKING:
    from mocompile.ir.graph import Node

INT8_MAX = 127
INT4_MIN, INT4_MAX = -8, 7
ACT_MODES = ("static", "token", "tensor")


# ---- the arithmetic (shared by the ops, the quantize pass and the tests) ------------------
def symmetric_scales(amax: np.ndarray, qmax: int) -> np.ndarray:
    """Scale mapping [-amax, amax] onto [-qmax, qmax]; 1 where amax is 0 (q is then 0)."""
    amax = amax.astype(np.float32)
    return np.where(amax > 0, amax / np.float32(qmax), np.float32(1)).astype(np.float32)


SCALE_DTYPES = ("float32", "float16")  # what a dequantize's scales are exact in (its `scales` attribute)
HALF_RANGE = (2.0 ** -24, 65504.0)  # float16's smallest (subnormal) and largest finite value


def group_scale_dtype(group: int) -> str:
    """The type the quantize pass keeps a weight's scales exact in: float16 for groups along
    the inputs (GGUF's Q4_0 / Q8_0 blocks keep theirs so: int4 in groups of 32 is then 4.5 bits
    per weight, not 5), float32 for one scale per output channel (its bytes are negligible)."""
    return "float16" if group else "float32"


def half_exact(scale: np.ndarray) -> np.ndarray:
    """Scales rounded to the nearest float16 (kept as float32), within float16's range: a
    group of weights smaller than 2^-24 * qmax gets the smallest float16 scale (its codes
    then round towards 0), a scale past 65504 the largest (its codes clip)."""
    return np.clip(scale, *HALF_RANGE).astype(np.float16).astype(np.float32)


QUANTIZE_CHUNK = 1 << 22  # elements quantized at a time: the temporaries stay ~16 MB for any weight size


def quantize_weight(w: np.ndarray, bits: int, group: int = 0,
                    scales: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """w [..., N, K] float32 -> (q, scale [..., N, G]); group 0 means one group per row.
    `scales` "float16": the scales are rounded to float16 values first (half_exact) and the
    codes computed against them, so that they can be stored in 2 bytes exactly (GGUF's Q4_0
    / Q8_0 blocks do the same). Rows are quantized a chunk at a time (each row on its own, so
    the result is the same), so a gigabyte-sized expert stack needs no gigabyte-sized
    temporaries."""
    if scales not in SCALE_DTYPES:
        raise ValueError(f"scales must be one of {', '.join(SCALE_DTYPES)}, got {scales!r}")
    k = w.shape[-1]
    group = group or k
    if k % group:
        raise ValueError(f"group size {group} does not divide the input width {k}")
    if bits == 4 and group % 2:
        raise ValueError(f"int4 groups hold whole bytes: group size {group} must be even")
    if bits not in (4, 8):
        raise ValueError(f"unsupported weight bit width {bits} (8 or 4)")
    rows = w.reshape(-1, k)
    q = np.empty((rows.shape[0], k if bits == 8 else k // 2), np.int8 if bits == 8 else np.uint8)
    scale = np.empty((rows.shape[0], k // group), np.float32)
    step = max(1, QUANTIZE_CHUNK // max(k, 1))
    for i in range(0, rows.shape[0], step):
        q[i:i + step], scale[i:i + step] = _quantize_rows(rows[i:i + step], bits, group, scales == "float16")
    return q.reshape(*w.shape[:-1], q.shape[-1]), scale.reshape(*w.shape[:-1], k // group)


def _quantize_rows(w: np.ndarray, bits: int, group: int, half: bool) -> tuple[np.ndarray, np.ndarray]:
    k = w.shape[-1]
    grouped = w.reshape(*w.shape[:-1], k // group, group).astype(np.float32)
    qmax = INT8_MAX if bits == 8 else INT4_MAX
    scale = symmetric_scales(np.abs(grouped).max(-1), qmax)
    if half:
        scale = half_exact(scale)
    q = np.round(grouped / scale[..., None])
    if bits == 8:
        return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8).reshape(w.shape), scale
    if bits == 4:
        q = np.clip(q, INT4_MIN, INT4_MAX).astype(np.int8).reshape(w.shape)
        return pack_int4(q), scale
    raise ValueError(f"unsupported weight bit width {bits} (8 or 4)")


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], [..., K] -> uint8 [..., K/2]; even k in the low nibble."""
    u = (q.astype(np.int16) - INT4_MIN).astype(np.uint8)
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4))


def unpack_int4(p: np.ndarray) -> np.ndarray:
    """uint8 [..., K/2] -> int8 [..., K] in [-8, 7]."""
    lo = (p & 0x0F).astype(np.int8) + INT4_MIN
    hi = (p >> 4).astype(np.int8) + INT4_MIN
    return np.stack([lo, hi], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])


# byte -> its two int4 values (low nibble first) as float32, each pair one 8-byte item: unpacking
# is one gather
_INT4_PAIRS = np.stack([(np.arange(256) & 0x0F) + INT4_MIN, (np.arange(256) >> 4) + INT4_MIN],
                       -1).astype(np.float32).view(np.float64).ravel()


def dequantize_weight(q: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """codes times scales in float32, in two passes over the output (the interpreter
    dequantizes every low-bit weight of a real-size model on each run)."""
    if bits == 4:
        shape = (*q.shape[:-1], 2 * q.shape[-1])
        values = _INT4_PAIRS[q].view(np.float32).reshape(shape)  # a new array: scaled in place below
    else:
        shape = q.shape
        values = q.astype(np.float32)
    groups = scale.shape[-1]
    grouped = values.reshape(*shape[:-1], groups, -1)
    grouped *= scale[..., None]
    return values


def activation_scales(x: np.ndarray, mode: str, static: np.ndarray | None = None) -> np.ndarray:
    """The scale each element of x is quantized with, broadcastable against x."""
    if mode == "static":
        return static.astype(np.float32).reshape((1,) * x.ndim)
    if mode == "token":
        return symmetric_scales(np.abs(x).max(-1, keepdims=True), INT8_MAX)
    if mode == "tensor":
        return symmetric_scales(np.abs(x).max(keepdims=True), INT8_MAX)
    raise ValueError(f"unknown activation quantization mode {mode!r} (one of {', '.join(ACT_MODES)})")


def quantize_activation(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 codes of x under `scale` (round half to even, saturate at +-127)."""
    return np.clip(round_half_even(x / scale), -INT8_MAX, INT8_MAX).astype(np.int8)


def fake_quant(x: np.ndarray, mode: str, static: np.ndarray | None = None) -> np.ndarray:
    scale = activation_scales(x, mode, static)
    return (quantize_activation(x, scale).astype(np.float32) * scale).astype(np.float32)


# ---- dequantize ----------------------------------------------------------------------------
def _infer_dequantize(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    q, scale = ts
    bits = attrs["bits"]
    want = {8: "int8", 4: "uint8"}.get(bits)
    if want is None:
        raise ValueError(f"dequantize: bits must be 8 or 4, got {bits}")
    if q.dtype != want or scale.dtype != "float32":
        raise ValueError(f"dequantize (bits={bits}) takes {want} codes and float32 scales, got {q.dtype}, {scale.dtype}")
    if attrs["scales"] not in SCALE_DTYPES:
        raise ValueError(f"dequantize: scales must be one of {', '.join(SCALE_DTYPES)}, got {attrs['scales']!r}")
    k = q.shape[-1] * (2 if bits == 4 else 1)
    if scale.rank != q.rank or scale.shape[:-1] != q.shape[:-1] or k % scale.shape[-1]:
        raise ValueError(f"dequantize: scales {scale} do not group the rows of {q}")
    return [TensorType(q.shape[:-1] + (k,), "float32")]


def _dequantize_cost(ins, outs, attrs, env) -> Cost:
    return Cost(flops=outs[0].numel(env), bytes=ins[0].numel(env) + 4 * (ins[1].numel(env) + outs[0].numel(env)))


def _reads_weights_only(args: FlowArgs) -> Flow:
    """Weights in, weights out: no sample is involved."""
    return one(combine(args, [None] * len(args.ins)))


register_op(OpDef("dequantize", _infer_dequantize, lambda xs, a: [dequantize_weight(xs[0], xs[1], a["bits"])],
                  {"bits": REQUIRED, "scales": "float32"}, batch_flow=_reads_weights_only, cost=_dequantize_cost,
                  positionwise=True, keeps_weights_low_bit=True, weight_format=lambda a: f"int{a['bits']}",
                  doc="low-bit weight codes [..., N, K] (int8, or int4 packed two per uint8) times float32 "
                      "scales [..., N, G] per output channel and group of K/G inputs; `scales` says the type "
                      "their values are exact in (float16: a backend may store them in 2 bytes)"))


# ---- quantize_act --------------------------------------------------------------------------
def _infer_quantize_act(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    mode = attrs["mode"]
    if mode not in ACT_MODES:
        raise ValueError(f"quantize_act: unknown mode {mode!r} (one of {', '.join(ACT_MODES)})")
    x = ts[0]
    if x.dtype != "float32":
        raise ValueError(f"quantize_act takes float32 activations, got {x.dtype}")
    if (len(ts) == 2) != (mode == "static") or (mode == "static" and ts[1].shape != (1,)):
        raise ValueError("quantize_act: a static scale is one float32 [1] input; dynamic modes take none")
    return [x]


def _quantize_act(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    return [fake_quant(xs[0], attrs["mode"], xs[1] if len(xs) == 2 else None)]


def _quantize_act_flow(args: FlowArgs) -> Flow:
    x = args.in_types[0]
    mode = args.attrs["mode"]
    if mode == "tensor":
        return one(combine(args, [identity_map(x.rank)], reduce=range(x.rank),
                           why="dynamic per-tensor activation scale: max |x| over the whole batch, so every "
                               "sample's rounding depends on the other samples' values"))
    reduce = [x.rank - 1] if mode == "token" else []
    return one(combine(args, [identity_map(x.rank), *([None] if mode == "static" else [])], reduce=reduce,
                       why="reads the whole last axis, and that axis carries the batch (sample) index"))


def _quantize_act_cost(ins, outs, attrs, env) -> Cost:
    n = outs[0].numel(env)
    return Cost(flops=3 * n, bytes=8 * n)


def _quantize_act_positions(node: Node, segments: Sequence[Dim]) -> str | None:
    """A static or per-token scale rounds each position on its own."""
    if node.attrs["mode"] == "tensor":
        return f"{node.op} at {node.loc or '?'} takes its scale over all positions"
    return None


register_op(OpDef("quantize_act", _infer_quantize_act, _quantize_act, {"mode": REQUIRED},
                  batch_flow=_quantize_act_flow, cost=_quantize_act_cost, position_check=_quantize_act_positions,
                  rounds_input=True,
                  doc="x rounded to int8 codes and back: scale static (input [1]), per token (row max) or per "
                      "tensor (whole-batch max: breaks batch isolation)"))
