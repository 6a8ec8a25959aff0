"""An artifact's weights are read into one block of memory advised for transparent huge pages
(mocompile/weight_arena.py), which TVM reads in place: every weight tensor the runtime passes
lies in that block, aligned, and holds the file's bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mocompile.runtime import ALIGNMENT, load
from mocompile.safetensors_io import read_arrays
from mocompile.weight_arena import HUGE_PAGE, WeightArena

from conftest import EXAMPLE_SHAPE

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _mapping_flags(address: int) -> tuple[int, int, set[str]]:
    """(start, end, VmFlags) of this process's mapping that holds `address` (Linux smaps: a
    range line opens each mapping, its VmFlags line closes it)."""
    span = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and ":" not in first:
            lo, hi = (int(x, 16) for x in first.split("-"))
            span = (lo, hi) if lo <= address < hi else None
        elif span is not None and line.startswith("VmFlags:"):
            return span[0], span[1], set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_the_arena_hands_out_aligned_arrays_in_order_and_refuses_past_its_end() -> None:
    shapes = [((3, 5), np.dtype(np.float32)), ((7,), np.dtype(np.uint16)), ((2, 2), np.dtype(np.int8))]
    arena = WeightArena(WeightArena.size_of(shapes, 64), 64)
    arrays = [arena.take(s, d) for s, d in shapes]
    assert [(a.shape, a.dtype) for a in arrays] == shapes
    assert all(a.ctypes.data % 64 == 0 for a in arrays)
    assert arrays[0].ctypes.data % HUGE_PAGE == 0  # the block starts on a huge page boundary
    assert arrays[0].ctypes.data < arrays[1].ctypes.data < arrays[2].ctypes.data
    for i, a in enumerate(arrays):
        a[...] = i + 1
    assert [int(a.min()) for a in arrays] == [1, 2, 3]  # no overlap
    with pytest.raises(ValueError, match="weight arena exhausted"):
        arena.take((1 << 20,), np.dtype(np.float32))


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(),
                    reason="needs Linux with transparent huge pages (reads /proc/self/smaps)")
def test_a_loaded_artifacts_weights_live_in_one_huge_page_block(artifact_cache) -> None:
    path = artifact_cache.path(EXAMPLES / "mixtral_tiny.moe", **EXAMPLE_SHAPE)
    art = load(path)
    program = art.manifest["program"]
    ptrs = [t.data_ptr() for t in art._weights]
    assert all(p % ALIGNMENT == 0 for p in ptrs)
    lo, hi, flags = _mapping_flags(ptrs[0])
    assert "hg" in flags  # madvise(MADV_HUGEPAGE)
    assert "sh" not in flags  # private: a shared anonymous mapping is shmem, whose huge pages are another switch
    assert all(lo <= p < hi for p in ptrs)
    # TVM reads the arena in place: its tensors hold the file's bytes
    for t, want in zip(art._weights, read_arrays(path / program["weights"], program["weight_order"])):
        assert np.array_equal(t.numpy(), want)
