"""Readers of single `config.json` values for the Hugging Face import (dsl/hf_import.py).

Each reader takes the raw JSON value and returns what the spec needs, or raises BadValue with
the reason; the key tables of hf_import.py name which reader each key goes through, and the
importer adds the file and the key to the one-line error.
"""

from __future__ import annotations

from typing import Any, Callable


class BadValue(Exception):
    """A refused value; the caller adds the file and the key."""


def positive_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise BadValue(f"expected a positive integer, found {v!r}")
    return v


def non_negative_int(v: Any) -> int:
    """A non-negative integer, None meaning 0 (q_lora_rank, first_k_dense_replace, ...)."""
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise BadValue(f"expected a non-negative integer, found {v!r}")
    return v


def optional_int(v: Any) -> int | None:
    return None if v is None else positive_int(v)


def positive_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise BadValue(f"expected a positive number, found {v!r}")
    return float(v)


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise BadValue(f"expected true or false, found {v!r}")
    return v


def layer_list(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise BadValue(f"expected a list of layer indices, found {v!r}")
    return tuple(v)


ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu"}  # HF's "gelu" is the exact (erf) GELU


def read_activation(v: Any) -> str:
    if v not in ACTIVATIONS:
        raise BadValue(f"unsupported activation {v!r} (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[v]


def must_be(*allowed: Any, why: str) -> Callable[[Any], Any]:
    """A key that is only checked: its value must be one of `allowed`."""

    def check(v: Any) -> Any:
        if v not in allowed:
            raise BadValue(f"{v!r} is not supported ({why})")
        return v

    return check


def check_rope_type(v: Any, where: str) -> None:
    kind = v.get("rope_type", v.get("type", "default")) if isinstance(v, dict) else v
    if kind not in (None, "default"):
        raise BadValue(f"rope type {kind!r} is not supported, only plain rotary embeddings ({where})")
    if isinstance(v, dict) and v.get("partial_rotary_factor", 1.0) != 1.0:
        raise BadValue(f"partial_rotary_factor {v['partial_rotary_factor']!r} is not supported ({where})")


def read_rope_parameters(v: Any) -> float | None:
    """transformers 5's rope_parameters: plain rope only; gives rope_theta."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise BadValue(f"expected an object, found {v!r}")
    check_rope_type(v, "rope_parameters.rope_type")
    return None if v.get("rope_theta") is None else positive_float(v["rope_theta"])


def check_rope_scaling(v: Any) -> None:
    if v is not None:
        check_rope_type(v, "rope_scaling")


def all_full_attention(v: Any) -> Any:
    if v is not None and any(t != "full_attention" for t in v):
        raise BadValue(f"only full attention is supported, found {sorted(set(v))}")
    return v
