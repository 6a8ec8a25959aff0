"""Writing and reading a safetensors file one tensor at a time.

`safetensors.numpy.save_file` serialises every tensor into one bytes object before writing,
so saving an artifact's weights held them twice; a real-size model's int4 weights are
gigabytes. This writes the same format (an 8-byte little-endian header length, the JSON
header padded to 8 bytes, then each tensor's bytes in header order) straight from each
array's memory; reading is the same, a header alone (`read_header`, no tensor's bytes) or
named tensors one at a time (`read_arrays`), each into memory of its own or where the caller
says.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping

import numpy as np

from mocompile.errors import MocompileError

_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16",
           "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL"}


def save_arrays(arrays: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Write `arrays` (name -> array; each read once more while writing) as a safetensors file."""
    header: dict[str, dict] = {}
    offset = 0
    for name, a in arrays.items():
        dtype = _DTYPES.get(str(a.dtype))
        if dtype is None:
            raise ValueError(f"{name}: safetensors has no dtype {a.dtype}")
        header[name] = {"dtype": dtype, "shape": [int(d) for d in a.shape], "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in header:
            a = np.ascontiguousarray(arrays[name])
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            f.write(memoryview(a.reshape(-1)).cast("B"))


_NUMPY = {v: k for k, v in _DTYPES.items()}


class MissingTensorError(LookupError):
    """A tensor asked for by name that the safetensors file does not hold."""

    def __init__(self, path: str | Path, name: str) -> None:
        super().__init__(f"{path}: no tensor {name!r}")
        self.path, self.name = path, name


def _header_of(f: BinaryIO) -> tuple[int, dict]:
    """(its byte length, the JSON header) of the safetensors file open as `f`, at its start."""
    (size,) = struct.unpack("<Q", f.read(8))
    return size, json.loads(f.read(size))


def read_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file: tensor name -> {dtype, shape, data_offsets}
    (and "__metadata__"), read without any tensor's bytes."""
    try:
        with open(path, "rb") as f:
            return _header_of(f)[1]
    except (OSError, struct.error, ValueError) as e:
        raise MocompileError(f"{path}: not a readable safetensors file ({e})") from None


Shapes = list[tuple[tuple[int, ...], np.dtype]]


def read_arrays(path: str | Path, names: list[str],
                into: Callable[[Shapes], Callable[[tuple[int, ...], np.dtype], np.ndarray]] | None = None,
                ) -> Iterator[np.ndarray]:
    """The arrays `names` of a safetensors file, one at a time, read with plain reads: unlike a
    memory map (safetensors' safe_open), the file's pages then never count as this process's
    resident memory beside the copies the caller keeps. Each goes into memory of its own, or
    with `into` where `into(every (shape, dtype))` says (one block for them all, say). Every
    name is looked up in the header before any tensor is read (MissingTensorError: the first
    absent)."""
    with open(path, "rb") as f:
        size, header = _header_of(f)
        missing = next((n for n in names if n not in header), None)
        if missing is not None:
            raise MissingTensorError(path, missing)
        shapes = [(tuple(header[n]["shape"]), np.dtype(_NUMPY[header[n]["dtype"]])) for n in names]
        allocate = into(shapes) if into is not None else np.empty
        for name, (shape, dtype) in zip(names, shapes):
            start, end = header[name]["data_offsets"]
            a = allocate(shape, dtype)
            if a.nbytes != end - start:
                raise ValueError(f"{path}: {name} has {end - start} bytes for {a.dtype}{list(a.shape)}")
            f.seek(8 + size + start)
            if f.readinto(memoryview(a.reshape(-1)).cast("B")) != a.nbytes:
                raise ValueError(f"{path}: {name} is cut short")
            yield a
