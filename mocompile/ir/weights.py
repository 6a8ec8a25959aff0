"""A graph's weights: numpy arrays, or lazy handles read from their files when asked for.

A real-size checkpoint does not fit this machine's memory in float32 (OLMoE-1B-7B: 28 GB),
so an imported graph does not hold its float weights: each is a `LazyWeight` (its type and a
function reading it from the checkpoint), materialised when a pass, the interpreter or a
backend asks for it and dropped again by that reader. Nothing caches a lazy weight, so the
memory a compile holds is what its readers keep: the quantize pass keeps the low-bit codes
it makes, the interpreter one node's weights at a time.

Every reader goes through `WeightStore.__getitem__` (which reads a lazy weight) or, where
only the shape, dtype or size matters (the verifier, byte counts, `Graph.clone`), through
`meta`/`nbytes`/`raw`, which never read one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, MutableMapping

import numpy as np


@dataclass(frozen=True)
class LazyWeight:
    """A weight of known shape and dtype that `load()` reads from its file (every call reads
    again: the caller decides how long the array lives); `origin` says where it comes from."""

    shape: tuple[int, ...]
    dtype: str
    load: Callable[[], np.ndarray]
    origin: str = ""

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def read(self) -> np.ndarray:
        a = np.ascontiguousarray(self.load())
        if tuple(a.shape) != self.shape or str(a.dtype) != self.dtype:
            raise ValueError(f"{self.origin}: read {a.dtype}{list(a.shape)}, expected {self.dtype}{list(self.shape)}")
        return a



class WeightStore(MutableMapping):
    """name -> array; a stored LazyWeight is read on every `[name]` (see the module docstring)."""

    def __init__(self) -> None:
        self._items: dict[str, np.ndarray | LazyWeight] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        item = self._items[name]
        return item.read() if isinstance(item, LazyWeight) else item

    def __setitem__(self, name: str, value: np.ndarray | LazyWeight) -> None:
        self._items[name] = value

    def __delitem__(self, name: str) -> None:
        del self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def raw(self, name: str) -> np.ndarray | LazyWeight:
        """What is stored, without reading a lazy weight."""
        return self._items[name]

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, dtype) without reading anything."""
        item = self._items[name]
        return tuple(int(d) for d in item.shape), str(item.dtype)

    def nbytes(self, name: str) -> int:
        return int(self._items[name].nbytes)

    def is_lazy(self, name: str) -> bool:
        return isinstance(self._items[name], LazyWeight)
