"""One block of memory for an artifact's weights, backed by transparent huge pages where the
kernel gives them.

A decode step streams every active weight once, and on a CPU it is bound by how fast those
bytes arrive. With 4 KiB pages a step over a few hundred MiB of weights misses the TLB once
per page (the second-level TLB covers a few MiB); with 2 MiB pages the walks all but vanish.
The weights are read from the artifact's file straight into their place here (no second
copy), and the runtime hands TVM views of them (DLPack, no copy either).

`madvise(MADV_HUGEPAGE)` is a request: where transparent huge pages are off, or memory is too
fragmented for 2 MiB blocks, the same memory is simply backed by small pages.
"""

from __future__ import annotations

import mmap

import numpy as np

HUGE_PAGE = 2 << 20  # bytes: the x86-64 / arm64 transparent huge page


class WeightArena:
    """Fixed-size memory handing out aligned arrays in order (the weights live as long as the
    artifact, so nothing is ever freed on its own)."""

    def __init__(self, nbytes: int, alignment: int) -> None:
        self.alignment = alignment
        # anonymous and private: Python's default for -1 is a shared mapping, which is shmem,
        # whose huge pages follow another switch (shmem_enabled, usually never)
        private = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        try:
            self._map = mmap.mmap(-1, max(nbytes, 1) + HUGE_PAGE, **({"flags": private} if private else {}))
        except OSError as e:
            raise MemoryError(f"no memory for the {nbytes:,} bytes of the weights ({e.strerror})") from None
        advise = getattr(self._map, "madvise", None)
        if advise is not None and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                advise(mmap.MADV_HUGEPAGE)
            except OSError:  # a kernel without transparent huge pages: small pages it is
                pass
        base = np.frombuffer(self._map, np.uint8)
        start = -base.ctypes.data % HUGE_PAGE  # a huge page needs a 2 MiB-aligned virtual address
        self._free = base[start:]

    @staticmethod
    def size_of(shapes: list[tuple[tuple[int, ...], np.dtype]], alignment: int) -> int:
        """Bytes an arena needs to hand out arrays of these shapes and dtypes, each aligned."""
        return sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize + alignment for s, d in shapes)

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The next `alignment`-aligned array of `shape` and `dtype` (uninitialised)."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        skip = -self._free.ctypes.data % self.alignment
        if skip + nbytes > self._free.size:
            raise ValueError(f"weight arena exhausted: {nbytes} more bytes asked, {self._free.size - skip} left")
        out = self._free[skip:skip + nbytes].view(dtype).reshape(shape)
        self._free = self._free[skip + nbytes:]
        return out
