"""Shape ops: concatenating modality segments and labelling positions (early fusion), and
keeping the last position only (a prompt step that needs the next token's logits alone)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from mocompile.ir.batch_flow import Flow, FlowArgs, Out, combine, depends_on_shapes_only, identity_map, one
from mocompile.ir.registry import REQUIRED, OpDef, register_op
from mocompile.ir.types import Dim, TensorType, dim_add

if TYPE_CHECKING:
    from mocompile.ir.graph import Node


def _infer_concat(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    axis = attrs["axis"]
    first = ts[0]
    for t in ts[1:]:
        if t.rank != first.rank or t.dtype != first.dtype or any(
            a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != axis % first.rank
        ):
            raise ValueError(f"concat: {t} does not match {first} off axis {axis}")
    shape = list(first.shape)
    shape[axis] = dim_add(*(t.shape[axis] for t in ts))
    return [TensorType(tuple(shape), first.dtype)]


def _concat_flow(args: FlowArgs) -> Flow:
    """Segments joined along a non-batch axis line up position by position; joined along the
    batch axis, rows no longer say which sample they belong to."""
    r = args.out_types[0].rank
    axis = args.attrs["axis"] % r
    if any(s.axis(axis) for s in args.ins):
        return one(Out(unknown="concatenates along the batch axis: rows no longer line up with samples"))
    return one(combine(args, [identity_map(r)] * len(args.ins)))


def _concat_positions(node: Node, segments: Sequence[Dim]) -> str | None:
    """Joining features keeps positions apart, and so does joining whole segments (graph
    inputs with sequence axes of their own) along the sequence: each keeps its positions."""
    rank, axis = node.outputs[0].type.rank, node.attrs["axis"] % node.outputs[0].type.rank
    joined = [t.type.shape[1] if t.type.rank > 1 else None for t in node.inputs]
    segments_joined = axis == 1 and len(set(joined)) == len(joined) and all(d in segments for d in joined)
    if axis != rank - 1 and not segments_joined:
        return f"{node.op} at {node.loc or '?'} joins along axis {axis}, which is neither the features nor segments"
    return None


register_op(OpDef("concat", _infer_concat, lambda xs, a: [np.concatenate(xs, axis=a["axis"])], {"axis": REQUIRED},
                  batch_flow=_concat_flow, position_check=_concat_positions,
                  doc="concatenate along one axis"))


def _infer_segment_ids(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    if len(attrs["ids"]) != len(ts):
        raise ValueError(f"segment_ids: {len(ts)} segments but ids {attrs['ids']}")
    batch = ts[0].shape[0]
    for t in ts:
        if t.shape[0] != batch:
            raise ValueError(f"segment_ids: batch dims differ ({t} vs {ts[0]})")
    return [TensorType((batch, dim_add(*(t.shape[1] for t in ts))), "int32")]


def _segment_ids(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    row = np.concatenate([np.full(x.shape[1], i, dtype=np.int32) for x, i in zip(xs, attrs["ids"])])
    return [np.broadcast_to(row, (xs[0].shape[0], row.shape[0])).copy()]


register_op(OpDef("segment_ids", _infer_segment_ids, _segment_ids, {"ids": REQUIRED}, batch_flow=depends_on_shapes_only,
                  positionwise=True,
                  doc="int32[batch, S1+..+Sn]: the id of the segment (input i, [batch, Si, ...]) each position is in"))


def _infer_last_position(ts: Sequence[TensorType], attrs: Mapping[str, Any]) -> list[TensorType]:
    (t,) = ts
    if t.rank < 2:
        raise ValueError(f"last_position: {t} has no positions axis (axis 1)")
    return [TensorType((t.shape[0], 1, *t.shape[2:]), t.dtype)]


def _last_position(xs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[np.ndarray]:
    if xs[0].shape[1] == 0:
        raise ValueError(f"last_position: {xs[0].shape} holds no position")
    return [np.ascontiguousarray(xs[0][:, -1:])]


def _last_position_flow(args: FlowArgs) -> Flow:
    """Each sample keeps its own last row: the batch axis (axis 0) passes through; were the
    batch on axis 1, every output row would be the last sample's."""
    if args.ins[0].axis(1):
        return one(Out(mixes="keeps only the last row of axis 1, which carries the batch (sample) index"))
    return one(combine(args, [identity_map(args.in_types[0].rank)]))


# Not positionwise (its one output position is the input's last), so a graph holding it does not
# decode token by token; mocompile/prefill.py puts it where a prompt step stops needing every position.
register_op(OpDef("last_position", _infer_last_position, _last_position, batch_flow=_last_position_flow,
                  doc="x[:, -1:]: [batch, positions, ...] -> [batch, 1, ...], the last position of each sample"))
