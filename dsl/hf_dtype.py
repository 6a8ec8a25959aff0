"""The dtype a Hugging Face checkpoint stores its weights in, from the safetensors headers
alone (no tensor is read): a compile keeps a bf16 checkpoint's weights bf16 by default
(`mocompile.dtype_option`), so it must know the stored dtype before building anything."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mocompile.safetensors_io import read_header

# safetensors' names of the floating dtypes -> numpy/IR names
_FLOAT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_ELEMENT_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}


def checkpoint_dtype(path: str | Path) -> str | None:
    """The floating dtype holding most of the checkpoint's weight bytes ("bfloat16",
    "float16", "float32", ...), or None where the directory has no safetensors file."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    bytes_by_dtype: Counter[str] = Counter()
    for f in files:
        for name, entry in read_header(f).items():
            if name != "__metadata__" and entry.get("dtype") in _FLOAT_DTYPES:
                begin, end = entry["data_offsets"]
                bytes_by_dtype[entry["dtype"]] += (end - begin) // _ELEMENT_BYTES[entry["dtype"]]
    if not bytes_by_dtype:
        return None
    return _FLOAT_DTYPES[bytes_by_dtype.most_common(1)[0][0]]
