"""What an artifact accepts at its boundary: the input arrays of a call and the KV caches it makes.

The compiled kernels trust their inputs: the embedding gather clamps a token id past the
vocabulary (or a negative one) and returns plausible logits, a zero-size batch runs, and a
sequence past the model's max_seq decodes positions it was never built for. So the runtime
(mocompile.runtime) checks every call here, once per set of input shapes for what depends on
shapes only (its per-shape call plans), and on every call for what depends on values (token
ids: a min and a max). Every refusal is one ArtifactInputError line naming the input and
the bound.

A KV cache is sized up front and reserves its whole capacity, so `KVCache` states its memory
(`nbytes`, `describe()`) and refuses one larger than the memory available on the machine.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mocompile.errors import ArtifactInputError
from mocompile.memory import available_memory, format_bytes

# The capacity of a KV cache made without one: an imported checkpoint's max_seq is often
# 131072 positions, which would reserve tens of GiB per sequence for a large model; a cache
# is meant to be sized to the prompt plus the tokens to generate (as `generate` does).
DEFAULT_CACHE_POSITIONS = 2048


def as_arrays(inputs: Mapping[str, Any], what: str = "the inputs") -> dict[str, np.ndarray]:
    """`inputs` as numpy arrays (lists and scalars converted; arrays passed as they are).
    Exact type tests first: an abc isinstance check costs a tenth of a tiny model's step."""
    if type(inputs) is not dict and not isinstance(inputs, Mapping):
        raise ArtifactInputError(f"{what} must be a mapping {{input name: array}}, got {type(inputs).__name__}")
    out = {}
    for name, v in inputs.items():
        if type(v) is not np.ndarray and not isinstance(v, np.ndarray):
            try:
                v = np.asarray(v)
            except ValueError as e:  # a ragged list
                raise ArtifactInputError(f"input {name!r}: cannot be read as an array ({e})") from None
        out[name] = v
    return out


def positive_int(value: Any, what: str) -> int:
    """`value` as an int if it is an integer >= 1 (bools are not sizes)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ArtifactInputError(f"{what} must be a positive integer (got {value!r})")
    return int(value)


def check_batch(arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse a call over zero samples (axis 0 of an input is its batch)."""
    for name, a in arrays.items():
        if a.ndim and a.shape[0] == 0:
            raise ArtifactInputError(f"input {name!r}: a batch of 0 samples (shape {a.shape}); "
                                     "a call needs at least one")


def segments(arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
    """The positions each input covers (axis 1 of every input of rank 2 or more); a call
    covers their sum (a multimodal model's segments are joined along the sequence)."""
    return {name: a.shape[1] for name, a in arrays.items() if a.ndim > 1}


def _named(seg: Mapping[str, int]) -> str:
    if len(seg) == 1:
        return f"input {next(iter(seg))!r}:"
    return f"inputs {', '.join(seg)}: {' + '.join(map(str, seg.values()))} ="


def check_positions(seg: Mapping[str, int], max_seq: int | None) -> None:
    """Refuse a forward over no positions or over more than the model's max_seq (inputs
    without a sequence axis bound neither)."""
    if not seg:
        return
    total = sum(seg.values())
    if total == 0:
        raise ArtifactInputError(f"{_named(seg)} 0 positions; a call needs at least one")
    if max_seq is not None and total > max_seq:
        raise ArtifactInputError(f"{_named(seg)} {total} positions, past the model's max_seq of {max_seq}")


SMALL = 64  # ids checked as a Python list up to this many (a decode step's): a numpy reduction costs more


def bounded_ids(arrays: Mapping[str, np.ndarray], highs: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    """The (name, high) of each non-empty input whose values are token ids in [0, high):
    what `check_ids` checks on every call."""
    return tuple((name, high) for name, high in highs.items()
                 if name in arrays and arrays[name].size and arrays[name].dtype.kind in "iu")


def check_ids(bounded: Sequence[tuple[str, int]], arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse token ids outside [0, high). This runs on every call, a decode step's included
    (one id per sample, ~1 us here against a step of 15-200 us): up to SMALL ids are compared
    as a Python list, which costs a quarter of a numpy min and max."""
    for name, high in bounded:
        a = arrays[name]
        if a.size <= SMALL:
            ids = a.ravel().tolist()
            bad = min(ids) < 0 or max(ids) >= high
        else:
            bad = a.min() < 0 or a.max() >= high
        if bad:
            where = np.argwhere((a < 0) | (a >= high))[0]
            raise ArtifactInputError(f"input {name!r}: token id {a[tuple(where)]} at "
                                     f"[{', '.join(map(str, where))}] is outside the vocabulary [0, {high})")


def token_ids(name: str, ids: Any, dtype: str, high: int | None) -> np.ndarray:
    """A prompt of token ids (an array or a list, of any integer dtype) as an array of the
    input's dtype; ids are checked before the cast so that none wraps into range."""
    a = as_arrays({name: ids})[name]
    if a.dtype.kind not in "iu":
        raise ArtifactInputError(f"input {name!r}: token ids must be integers, got {a.dtype}")
    if high is not None and a.size and a.dtype != np.dtype(dtype):
        check_ids(bounded_ids({name: a}, {name: high}), {name: a})
    return a.astype(dtype, copy=False)


# ---- KV caches -------------------------------------------------------------------------------

class KVCache:
    """The key/value tensors a `step` function reads and extends in place, and how many
    positions of each sample they hold (`length`, the same for every sample of the batch).

    The capacity is rounded up to `block` (the attention kernels read keys in blocks of that
    many); positions beyond `length` may hold stale values, which the kernels never use, so
    `reset()` only rewinds. The whole capacity is allocated up front: `nbytes` is its memory,
    and a cache larger than the memory available is refused before anything is allocated.
    """

    def __init__(self, specs: list[Mapping[str, Any]], batch: int, capacity: int, block: int,
                 tensor: Callable[[np.ndarray], Any]) -> None:
        if batch < 1 or capacity < 1:
            raise ArtifactInputError(f"a KV cache needs batch >= 1 and capacity >= 1 (got {batch}, {capacity})")
        self.batch = batch
        self.capacity = -(-capacity // block) * block
        sizes = {"batch": batch, "cache_len": self.capacity}
        shapes = [([sizes.get(d, d) for d in spec["shape"]], np.dtype(spec["dtype"])) for spec in specs]
        self.nbytes = sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in shapes)
        free = available_memory()
        if free is not None and self.nbytes > free:
            raise ArtifactInputError(f"a KV cache of batch {batch} x {self.capacity} positions needs "
                                     f"{format_bytes(self.nbytes)} ({self.nbytes} bytes), but only "
                                     f"{format_bytes(free)} ({free} bytes) of memory is available; "
                                     "ask for fewer positions")
        self.tensors = [tensor(np.zeros(shape, dtype=dtype)) for shape, dtype in shapes]
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def describe(self) -> str:
        """E.g. `KVCache(batch 2, 96 of 128 positions, 1.5 MiB)`."""
        return f"KVCache(batch {self.batch}, {self.length} of {self.capacity} positions, {format_bytes(self.nbytes)})"

    __repr__ = describe
