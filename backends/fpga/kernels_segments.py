"""FPGA kernels of a multimodal model's joined sequence: the design runs one position at a
time, and the position's segment (`seg`, the index of the input it comes from) picks which
embedding path runs. `concat` along the sequence copies the current segment's row (rounded
to the joined format); `segment_ids` is that segment's id. Along the features `concat`
places its inputs side by side."""

from __future__ import annotations

from typing import Any

import numpy as np

from mocompile.backends.fpga.design import Design, Tensor
from mocompile.backends.fpga.lowerings import FpgaKernel, register_kernel
from mocompile.backends.fpga.fixed import requant
from mocompile.ir.graph import Node


def _last_axis(node: Node) -> bool:
    return node.attrs["axis"] in (-1, node.outputs[0].type.rank - 1)


def _concat(node: Node, xs: list[Tensor], design: Design) -> list[Tensor]:
    out = design.fmt(node.outputs[0])
    axis = -1 if _last_axis(node) else 1
    return [(np.concatenate([requant(c, f.frac, out) for c, f in xs], axis=axis), out)]


def _concat_emit(node: Node, design: Design, cpp: Any) -> None:
    y = node.outputs[0]
    if _last_axis(node):
        offset = 0
        for v in node.inputs:
            n = v.type.shape[-1]
            cpp.line(f"for (int i = 0; i < {n}; i++) {cpp.v(y)}[{offset} + i] = {cpp.v(v)}[i];")
            offset += n
        return
    for i, v in enumerate(node.inputs):
        cpp.line(f"{'if' if i == 0 else 'else if'} (seg == {i}) for (int i = 0; i < {y.type.shape[-1]}; i++) "
                 f"{cpp.v(y)}[i] = {cpp.v(v)}[i];")


def _refuse_concat(node: Node) -> str | None:
    if _last_axis(node) or node.attrs["axis"] == 1:
        return None
    return f"concat at {node.loc or '?'}: the fpga target joins along the sequence or the features only"


def _segment_ids(node: Node, xs: list[Tensor], design: Design) -> list[Tensor]:
    ids = node.attrs["ids"]
    b = xs[0][0].shape[0]
    row = np.concatenate([np.full(c.shape[1], i, np.int64) for (c, _), i in zip(xs, ids)])
    return [(np.broadcast_to(row, (b, row.size)).copy(), None)]


def _segment_ids_emit(node: Node, design: Design, cpp: Any) -> None:
    ids = ", ".join(str(i) for i in node.attrs["ids"])
    cpp.line(f"{{ const int ids[{len(node.attrs['ids'])}] = {{{ids}}}; {cpp.v(node.outputs[0])}[0] = ids[seg]; }}")


register_kernel(FpgaKernel("concat", _concat, _concat_emit, refuse=_refuse_concat))
register_kernel(FpgaKernel("segment_ids", _segment_ids, _segment_ids_emit))
