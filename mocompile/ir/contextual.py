"""Contextual (activation) sparsity, WINA-style and training-free: for each token, a matmul
reads only the input channels i with the largest |x_i| * ||W[:, i]||, the ones that add most
to its output, so a decode step reads only that share of the weight's rows (in the
transposed [in, out] layout a backend stores for it, one contiguous row per channel).

An op that can do this declares `contextual_shares` where it is registered and takes the
attribute `keep` (the share of channels kept; absent: dense). This module holds what the
interpreter and every backend must agree on exactly: how many channels a share keeps, the
column norms (a backend stores them as constants computed at compile time by the same
function), and which channels a token keeps (ties go to the lower channel index, as a
stable sort of the scores in descending order takes them).
"""

from __future__ import annotations

import weakref
from typing import Sequence

import numpy as np

from mocompile.ir.batch_flow import BatchFlowFn, rowwise


def kept_channels(width: int, keep: float) -> int:
    """Channels of `width` a token keeps at share `keep`: round(width * keep), at least one."""
    return min(int(width), max(1, int(round(width * float(keep)))))


# id(weight array) -> (a weak reference to it, its float64 squared column sums). An entry
# leaves with its array, and a hit must name the same living object, so an id reused by a
# new array is never served the old one's sums. Weights are replaced, never written in place
# (passes put new arrays in the graph), so a living array's sums stay its own.
_SQUARES: dict[int, tuple[weakref.ref, np.ndarray]] = {}


def _squared_column_sums(w: np.ndarray) -> np.ndarray:
    """sum over the rows (axis -2) of w**2 in float64, per input channel ([(E,) K]): computed
    once per weight array, not on every call of an op that reads it."""
    key = id(w)
    hit = _SQUARES.get(key)
    if hit is not None and hit[0]() is w:
        return hit[1]
    sums = (np.asarray(w, np.float64) ** 2).sum(axis=-2)
    try:
        ref = weakref.ref(w, lambda _, key=key: _SQUARES.pop(key, None))
    except TypeError:  # not weakly referenceable (not an ndarray): not cached
        return sums
    _SQUARES[key] = (ref, sums)
    return sums


def column_norms(weights: Sequence[np.ndarray]) -> np.ndarray:
    """||W[:, i]|| per input channel i, over the rows of every weight given (a gated block's
    gate and up read the same input, so they are scored as one stacked matrix); float32.
    Stacked expert weights [E, N, K] give every expert's norms at once, [E, K]."""
    squares = sum(_squared_column_sums(w) for w in weights)
    return np.sqrt(squares).astype(np.float32)


def channel_scores(x: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """|x_i| * ||W[:, i]|| per token (float32, as the kernels compute it)."""
    return (np.abs(x.astype(np.float32)) * norms).astype(np.float32)


def select_channels(x: np.ndarray, norms: np.ndarray, m: int) -> np.ndarray:
    """The `m` channels each token (row of x [..., K]) keeps, ascending: the largest scores,
    ties to the lower index."""
    order = np.argsort(-channel_scores(x, norms), axis=-1, kind="stable")[..., :m]
    return np.sort(order, axis=-1)


def sparsify(x: np.ndarray, weights: Sequence[np.ndarray], keep: float | None,
             norms: np.ndarray | None = None) -> np.ndarray:
    """x with every channel a token does not keep set to zero (x itself where all are kept):
    x_sparse @ W.T is exactly the sum over the kept channels. `norms`: the weights'
    column_norms where the caller has them already."""
    if keep is None:
        return x
    width = x.shape[-1]
    m = kept_channels(width, keep)
    if m >= width:
        return x
    chosen = select_channels(x, column_norms(weights) if norms is None else norms, m)
    mask = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(mask, chosen, True, axis=-1)
    return np.where(mask, x, np.float32(0)).astype(x.dtype)


def check_keep(keep: float | None) -> None:
    if keep is not None and not (isinstance(keep, (int, float)) and 0 < float(keep) <= 1):
        raise ValueError(f"keep (the share of input channels a token reads) must be in (0, 1], got {keep!r}")


def per_token_rowwise(params=None) -> BatchFlowFn:
    """The batch-flow rule of an op that may select channels per token: rowwise, because
    with `keep` each row selects its channels from its own values and constant column norms
    only, so no row reads another (the selection adds no mixing)."""
    return rowwise(params)
