"""Writing and reading a safetensors file one tensor at a time.

`safetensors.numpy.save_file` serialises every tensor into one bytes object before writing,
so saving an artifact's weights held them twice; a real-size model's int4 weights are
gigabytes. This writes the same format (an 8-byte little-endian header length, the JSON
header padded to 8 bytes, then each tensor's bytes in header order) straight from each
array's memory.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

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


def read_arrays(path: str | Path, names: list[str]) -> Iterator[np.ndarray]:
    """The arrays `names` of a safetensors file, one at a time, each read into its own memory
    with plain reads: unlike a memory map (safetensors' safe_open), the file's pages then never
    count as this process's resident memory beside the copies the caller keeps."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        for name in names:
            entry = header.get(name)
            if entry is None:
                raise KeyError(name)
            start, end = entry["data_offsets"]
            a = np.empty(entry["shape"], _NUMPY[entry["dtype"]])
            if a.nbytes != end - start:
                raise ValueError(f"{path}: {name} has {end - start} bytes for {a.dtype}{list(a.shape)}")
            f.seek(8 + size + start)
            if f.readinto(memoryview(a.reshape(-1)).cast("B")) != a.nbytes:
                raise ValueError(f"{path}: {name} is cut short")
            yield a
