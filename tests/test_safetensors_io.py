"""The one safetensors reader of the tree: a header alone, and named tensors, each with a
one-line error naming the file (and the tensor) when it cannot be read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mocompile.errors import MocompileError
from mocompile.safetensors_io import MissingTensorError, read_arrays, read_header, save_arrays


def test_header_and_arrays_round_trip(tmp_path: Path) -> None:
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int8)}
    save_arrays(arrays, tmp_path / "w.safetensors")
    header = read_header(tmp_path / "w.safetensors")
    assert header["a"]["dtype"] == "F32" and header["a"]["shape"] == [2, 3] and header["b"]["dtype"] == "I8"
    b, a = read_arrays(tmp_path / "w.safetensors", ["b", "a"])
    assert np.array_equal(a, arrays["a"]) and np.array_equal(b, arrays["b"])


def test_a_missing_name_is_refused_before_any_tensor_is_read(tmp_path: Path) -> None:
    save_arrays({"a": np.zeros(3, np.float32)}, tmp_path / "w.safetensors")
    reading = read_arrays(tmp_path / "w.safetensors", ["a", "gone"])
    with pytest.raises(MissingTensorError) as e:
        next(reading)  # fails at once, not after reading "a"
    assert e.value.name == "gone" and str(e.value) == f"{tmp_path / 'w.safetensors'}: no tensor 'gone'"


def test_an_unreadable_header_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(MocompileError, match=r"bad\.safetensors: not a readable safetensors file"):
        read_header(tmp_path / "bad.safetensors")
    with pytest.raises(MocompileError, match=r"short\.safetensors: not a readable safetensors file"):
        (tmp_path / "short.safetensors").write_bytes(b"\x01")
        read_header(tmp_path / "short.safetensors")
