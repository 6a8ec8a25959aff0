"""Elementwise and shape ops as tensor expressions (te): add/mul with numpy broadcasting,
activations, concat, segment ids, the last position.

These have no reduction and no data-dependent loop bounds, so the generic route is the
right one: express the math with `te.compute` (emitted through `BlockBuilder.emit_te`) and
let each target schedule them (the CPU's schedule.schedule_injective: parallel outer loops,
vectorized innermost axis; a GPU's: thread bindings).
"""

from __future__ import annotations

from typing import Callable, Sequence

from tvm import te, tirx

from mocompile.backends.tvm_common.kernel_math import ACTIVATIONS, sigmoid


def _is_one(d) -> bool:
    return isinstance(d, tirx.IntImm) and int(d) == 1


def _broadcast_index(t: te.Tensor, out_index: Sequence, out_shape: Sequence) -> list:
    """Index of `t` read for output element `out_index` (numpy broadcasting from the right)."""
    off = len(out_index) - len(t.shape)
    return [tirx.const(0, "int64") if _is_one(d) and not _is_one(out_shape[off + i]) else out_index[off + i]
            for i, d in enumerate(t.shape)]


def binary(name: str, fn: Callable, out_shape: Sequence) -> Callable[[te.Tensor, te.Tensor], te.Tensor]:
    def compute(a: te.Tensor, b: te.Tensor) -> te.Tensor:
        return te.compute(out_shape, lambda *ix: fn(a(*_broadcast_index(a, ix, out_shape)),
                                                     b(*_broadcast_index(b, ix, out_shape))), name=name)
    return compute


BINARY = {"add": lambda x, y: x + y, "mul": lambda x, y: x * y}
UNARY = {**ACTIVATIONS, "sigmoid": sigmoid}


def unary(name: str) -> Callable[[te.Tensor], te.Tensor]:
    fn = UNARY[name]

    def compute(x: te.Tensor) -> te.Tensor:
        return te.compute(x.shape, lambda *ix: fn(x(*ix)), name=name)
    return compute


def concat(axis: int) -> Callable[..., te.Tensor]:
    """Concatenate along `axis`; each output element reads exactly one input."""

    def compute(*xs: te.Tensor) -> te.Tensor:
        rank = len(xs[0].shape)
        ax = axis % rank
        offsets = [tirx.const(0, "int64")]
        for x in xs:
            offsets.append(offsets[-1] + x.shape[ax])
        shape = list(xs[0].shape)
        shape[ax] = offsets[-1]

        def element(*ix):
            value = None
            for x, start in zip(xs, offsets):  # the last input whose start is passed wins
                local = list(ix)
                local[ax] = tirx.min(tirx.max(ix[ax] - start, 0), x.shape[ax] - 1)  # in bounds
                v = x(*local)
                value = v if value is None else tirx.if_then_else(ix[ax] >= start, v, value)
            return value
        return te.compute(shape, element, name="concat")
    return compute


def segment_ids(ids: Sequence[int]) -> Callable[..., te.Tensor]:
    """int32[B, S1+..+Sn]: id of the segment (input i) each position falls in."""

    def compute(*xs: te.Tensor) -> te.Tensor:
        ends = []
        total = tirx.const(0, "int64")
        for x in xs:
            total = total + x.shape[1]
            ends.append(total)

        def element(bi, p):
            value = tirx.const(ids[-1], "int32")
            for end, seg in reversed(list(zip(ends[:-1], ids[:-1]))):
                value = tirx.Select(p < end, tirx.const(seg, "int32"), value)
            return value
        return te.compute((xs[0].shape[0], total), element, name="segment_ids")
    return compute


def last_position(x: te.Tensor) -> te.Tensor:
    """[batch, positions, ...] -> [batch, 1, ...]: each sample's last position (a plain copy;
    the cut of a prompt step that needs the last position only, mocompile/prefill.py)."""
    last = x.shape[1] - 1
    return te.compute((x.shape[0], 1, *x.shape[2:]), lambda b, _, *rest: x(b, last, *rest), name="last_position")
