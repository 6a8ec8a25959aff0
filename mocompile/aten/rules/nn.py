"""Matrix products, convolution, normalisation, pooling and the other network layers, with
the backward ops torch lists in the core set.

Per axis: a matmul keeps the axes of its operands that are not summed over, so x @ W is per
row and q @ k^T over a packed token axis is a pair (see `mocompile.aten.state`); summing over
a pair's axis is per sample when its off-block is 0 (masked attention probabilities times
values). A convolution keeps the batch (axis 0) and reads channels and a window of every
spatial axis. Normalisation reads the axes it normalises over: layer and group norm a
sample's own features, batch norm in training mode the whole batch (in eval mode it only
applies running statistics, which are weights). Weight gradients sum over the batch.
"""

from __future__ import annotations

import torch

from mocompile.aten.call import Call
from mocompile.aten.registry import rule
from mocompile.aten.rules.common import windowed
from mocompile.aten.state import AxisMap, Flow, Out, State, combine, drop_axis
from mocompile.ir.batch_flow import broadcast_map, identity_map

aten = torch.ops.aten
BATCH_STATISTICS = "normalises with the mean and variance of the whole batch (batch norm in training mode)"
ACROSS = "attends across samples: a query row reads the keys and values of every sample along the batch axis"


def contract(a: State, a_map: AxisMap, ak: int, b: State, b_map: AxisMap, bk: int,
             extra: tuple[tuple[State, AxisMap], ...] = ()) -> Out:
    """a's axis ak summed with b's axis bk (maps give the other axes' places). A pair summed
    over its own axis whose off-block is 0 sums only its sample's own entries."""
    for x, xk, y, yk in ((a, ak, b, bk), (b, bk, a, ak)):
        xb, yb = x.axis(xk), y.axis(yk)
        if x.is_pair and xb is not None and x.offblock in (0, 0.0, False) and (
                yb is None or (yb.layout == xb.layout)):
            dropped_x, dropped_y = drop_axis(x, xk), (drop_axis(y, yk) if yb is not None else y)
            a, b = (dropped_x, dropped_y) if x is a else (dropped_y, dropped_x)
            break
    return combine([a, b, *(s for s, _ in extra)], [a_map, b_map, *(m for _, m in extra)],
                   why="sums over the batch axis (a matrix product along it): each result mixes every sample")


@rule(aten.mm.default)
def mm(call: Call) -> Flow:
    return Flow((contract(call.state("self"), [0, None], 1, call.state("mat2"), [None, 1], 0),))


@rule(aten.bmm.default)
def bmm(call: Call) -> Flow:
    return Flow((contract(call.state("self"), [0, 1, None], 2, call.state("mat2"), [0, None, 2], 1),))


@rule(aten.addmm.default)
def addmm(call: Call) -> Flow:
    bias = (call.state("self"), broadcast_map(call.rank("self"), 2))
    return Flow((contract(call.state("mat1"), [0, None], 1, call.state("mat2"), [None, 1], 0, (bias,)),))


@rule(aten.linear.default)
def linear(call: Call) -> Flow:
    """Not core (kept whole in undecomposed graphs): x @ W^T + b, per row of x."""
    r = call.rank("input")
    parts = [(call.state("input"), identity_map(r, drop=[r - 1])), (call.state("weight"), [r - 1, None])]
    if call.arg("bias") is not None:
        parts.append((call.state("bias"), [r - 1]))
    return Flow((combine([s for s, _ in parts], [m for _, m in parts],
                         why="sums over the batch axis (a matrix product along it): each result mixes every sample"),))


@rule(aten.matmul.default)
def matmul(call: Call) -> Flow:
    """Not core: torch.matmul with its 1-D and broadcasting cases."""
    ra, rb, r = call.rank("self"), call.rank("other"), call.out_rank()
    a, b = call.state("self"), call.state("other")
    if ra == 1 or rb == 1:
        a_map = [None] if ra == 1 else broadcast_map(ra - 2, r - 1) + [r - 1, None]
        b_map = [None] if rb == 1 else broadcast_map(rb - 2, r - 1) + [None, r - 1]
        return Flow((contract(a, a_map, ra - 1, b, b_map, max(rb - 2, 0)),))
    a_map = broadcast_map(ra - 2, r - 2) + [r - 2, None]
    b_map = broadcast_map(rb - 2, r - 2) + [None, r - 1]
    return Flow((contract(a, a_map, ra - 1, b, b_map, rb - 2),))


@rule(aten.scaled_dot_product_attention.default)
def sdpa(call: Call) -> Flow:
    """Not core (kept whole in undecomposed graphs): softmax(q k^T + mask) v. Each query row
    reads every key and value row: keys packed with several samples are fine only under a
    mask whose other-sample entries are False or -inf, on the query's own layout."""
    r = call.out_rank()

    def lead(rank: int) -> list[int | None]:
        return broadcast_map(rank - 2, r - 2)

    q, k, v = (call.state(n) for n in ("query", "key", "value"))
    kr = call.rank("key")
    maps: list[AxisMap] = [lead(call.rank("query")) + [r - 2, None], lead(kr) + [None, None],
                           lead(call.rank("value")) + [None, r - 1]]
    mask = call.state("attn_mask") if call.arg("attn_mask") is not None else None
    qb, kb = q.axis(call.rank("query") - 2), k.axis(kr - 2)
    if kb is not None and mask is not None and qb is not None and mask.is_pair and qb.layout == kb.layout and \
            mask.offblock in (False, -float("inf")) and [b.axis for b in mask.axes][-1] == call.rank("attn_mask") - 1:
        kept = [q, drop_axis(k, kr - 2), drop_axis(v, call.rank("value") - 2)]
        return Flow((combine(kept, maps, why=ACROSS),), frozenset({"attn_mask"}))
    states = [q, k, v] + ([mask] if mask is not None else [])
    if mask is not None:
        maps.append(lead(call.rank("attn_mask")) + [r - 2, None])
    return Flow((combine(states, maps, why=ACROSS),))


@rule(aten.convolution.default)
def convolution(call: Call) -> Flow:
    """Output [N, C_out, spatial...]: the batch axis passes, channels and windows are read."""
    r = call.rank("input")
    maps = [[0] + [None] * (r - 1), None, [1]]
    names = ["input", "weight", "bias"]
    present = [(call.state(n), m) for n, m in zip(names, maps) if call.arg(n) is not None]
    out = combine([s for s, _ in present], [m for _, m in present],
                  why="convolves over an axis that carries the batch (sample) index")
    return Flow((out,))


@rule(aten.convolution_backward.default)
def convolution_backward(call: Call) -> Flow:
    r = call.rank("input")
    per_sample = [0] + [None] * (r - 1)
    grad_input = combine([call.state("grad_output"), call.state("input"), call.state("weight")],
                         [per_sample, per_sample, None])
    summed = combine([call.state("grad_output"), call.state("input")], [None, None],
                     why="sums the weight gradient over every sample of the batch")
    return Flow((grad_input, summed, summed))


def _last(k: int, rank: int) -> list[int]:
    """Maps of a [normalized_shape] parameter onto the last k of `rank` axes."""
    return list(range(rank - k, rank))


@rule(aten.native_layer_norm.default, aten.layer_norm.default)
def layer_norm(call: Call) -> Flow:
    """native_layer_norm's (out, mean, rstd); layer_norm, kept whole in undecomposed graphs: out."""
    r, k = call.rank("input"), len(call.arg("normalized_shape"))
    norm = list(range(r - k, r))
    params = [(call.state(n), _last(k, r)) for n in ("weight", "bias") if call.arg(n) is not None]
    out = combine([call.state("input"), *(s for s, _ in params)], [identity_map(r), *(m for _, m in params)],
                  reduce=norm, why="normalises over axes that carry the batch (sample) index")
    stats = combine([call.state("input")], [identity_map(r, drop=norm)],
                    why="normalises over axes that carry the batch (sample) index")
    return Flow((out, stats, stats)[:len(call.outs)])


@rule(aten.native_layer_norm_backward.default)
def layer_norm_backward(call: Call) -> Flow:
    r, k = call.rank("input"), len(call.arg("normalized_shape"))
    norm = list(range(r - k, r))
    ins = [call.state(n) for n in ("grad_out", "input", "mean", "rstd")]
    grad_input = combine(ins, [identity_map(r)] * 4, reduce=norm)
    summed = combine(ins[:2], [[None] * (r - k) + list(range(k))] * 2,
                     why="sums the parameter gradient over every sample of the batch")
    return Flow((grad_input, summed, summed))


@rule(aten.native_group_norm.default)
def group_norm(call: Call) -> Flow:
    """Statistics per sample and group: over channels of the group and all spatial positions."""
    r = call.rank("input")
    params = [(call.state(n), [1]) for n in ("weight", "bias") if call.arg(n) is not None]
    why = "normalises over axes that carry the batch (sample) index (group norm's batch is axis 0)"
    out = combine([call.state("input"), *(s for s, _ in params)], [identity_map(r), *(m for _, m in params)],
                  reduce=range(1, r), why=why)
    stats = combine([call.state("input")], [[0] + [None] * (r - 1)], why=why)
    return Flow((out, stats, stats))


@rule(aten.native_group_norm_backward.default)
def group_norm_backward(call: Call) -> Flow:
    r = call.rank("input")
    grad_input = combine([call.state(n) for n in ("grad_out", "input", "mean", "rstd")],
                         [identity_map(r), identity_map(r), [0, None], [0, None]], reduce=range(1, r))
    summed = combine([call.state("grad_out"), call.state("input")], [[None, 0] + [None] * (r - 2)] * 2,
                     why="sums the parameter gradient over every sample of the batch")
    return Flow((grad_input, summed, summed))


def _batch_norm(call: Call, training: bool) -> Flow:
    """Axis 1 is the channel: per-channel parameters and statistics line up with it."""
    r = call.rank("input")
    params = [(call.state(n), [1]) for n in ("weight", "bias", "running_mean", "running_var")
              if call.arg(n) is not None]
    reduce = [a for a in range(r) if a != 1] if training else []
    out = combine([call.state("input"), *(s for s, _ in params)], [identity_map(r), *(m for _, m in params)],
                  reduce=reduce, why=BATCH_STATISTICS)
    stats = combine([call.state("input")], [None], why=BATCH_STATISTICS) if training else Out()
    return Flow((out, *(stats for _ in call.outs[1:])))


@rule(aten._native_batch_norm_legit_no_training.default)
def batch_norm_eval(call: Call) -> Flow:
    return _batch_norm(call, training=False)


@rule(aten._native_batch_norm_legit.default, aten._native_batch_norm_legit.no_stats,
      aten._native_batch_norm_legit_functional.default, aten.native_batch_norm.default)
def batch_norm(call: Call) -> Flow:
    return _batch_norm(call, training=bool(call.arg("training")))


for _k, _ops in ((2, (aten.avg_pool2d.default, aten._adaptive_avg_pool2d.default, aten.max_pool2d_with_indices.default,
                      aten.reflection_pad2d.default, aten.replication_pad2d.default)),
                 (3, (aten.avg_pool3d.default, aten._adaptive_avg_pool3d.default, aten.max_pool3d_with_indices.default,
                      aten.reflection_pad3d.default, aten.replication_pad3d.default)),
                 (1, (aten.reflection_pad1d.default, aten.avg_pool1d.default, aten.adaptive_avg_pool1d.default))):
    for _op in _ops:
        rule(_op)(windowed(_k))
for _op in (aten.avg_pool2d_backward.default, aten.max_pool2d_with_indices_backward.default,
            aten._adaptive_avg_pool2d_backward.default):
    rule(_op)(windowed(2, ("grad_output", "self", "indices")))
for _op in (aten.upsample_bilinear2d.vec, aten.upsample_nearest2d.vec):
    rule(_op)(windowed(2, ("input",), what="interpolates"))


@rule(aten.grid_sampler_2d.default)
def grid_sampler(call: Call) -> Flow:
    """input [N, C, H, W] sampled at grid [N, Ho, Wo, 2]: per sample, the plane read at data-chosen points."""
    return Flow((combine([call.state("input"), call.state("grid")], [[0, 1, None, None], [0, 2, 3, None]],
                         why="samples positions chosen by the grid along an axis that carries the batch index"),))


@rule(aten._cdist_forward.default)
def cdist(call: Call) -> Flow:
    """Distances between every row of x1 and every row of x2: rows of one batch make a pair."""
    r = call.out_rank()
    maps = [broadcast_map(call.rank(n) - 2, r - 2) + [r - 2 if n == "x1" else r - 1, None] for n in ("x1", "x2")]
    return Flow((combine([call.state("x1"), call.state("x2")], maps),))


@rule(aten._pdist_forward.default)
def pdist(call: Call) -> Flow:
    return Flow((combine([call.state("self")], [None], why="compares every row with every other row"),))


@rule(aten._fft_r2c.default, aten._fft_c2r.default, aten._fft_c2c.default)
def fft(call: Call) -> Flow:
    r = call.rank("self")
    dims = call.dim_list("dim", r)
    return Flow((combine([call.state("self")], [identity_map(r)], reduce=dims,
                         why="transforms along an axis that carries the batch (sample) index"),))


@rule(aten.col2im.default)
def col2im(call: Call) -> Flow:
    """[N, C*k, L] blocks folded into [N, C, H, W]: per sample."""
    r = call.rank("self")
    amap = [0] + [None] * (r - 1) if r == 3 else [None] * r
    return Flow((combine([call.state("self")], [amap], why="folds blocks along an axis that carries the batch index"),))
