"""Tensor types with static or symbolic dimensions.

A dimension is an int, a symbol name ("batch", "seq"), or a sum of terms written as text
("seq_text+seq_image+16"); a term may be a product ("4*batch") once a reshape flattens a
symbolic axis. Sums appear when segments are concatenated (multimodal early fusion),
products when a reshape merges axes; nothing else needs shape arithmetic, so the
representation stays text a person can read in the printer and compare with ==.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union

import numpy as np

Dim = Union[int, str]

DTYPES = ("float32", "int64", "int32", "int8", "uint8", "uint16", "bool")  # uint16: 16-bit float weights as bits (ops/widen.py)


def dim_terms(d: Dim) -> list[Dim]:
    """The terms of a dimension sum ("a+b+3" -> ["a", "b", 3])."""
    if isinstance(d, int):
        return [d]
    return [int(t) if t.lstrip("-").isdigit() else t for t in d.split("+")]


class PositionsAxis:
    """Axis 1 of the values of a graph that takes segments [batch, positions, ...]: a value
    carries the positions when its axis 1 is every segment's sequence dim joined (their sum).
    The last-position form (mocompile/prefill.py) cuts such outputs, and a runtime without a
    compiled `prefill` slices the same ones (Signature.last_positions): one rule for both."""

    def __init__(self, input_shapes: Iterable[Sequence[Dim]]) -> None:
        self.segments: list[Dim] = [s[1] for s in input_shapes if len(s) >= 2]
        self.symbols = Counter(d for d in self.segments if isinstance(d, str))

    def carries(self, shape: Sequence[Dim]) -> bool:
        """[batch, positions, ...] with every segment's positions joined on axis 1."""
        return len(shape) >= 2 and Counter(dim_terms(shape[1])) == self.symbols

    def free(self, shape: Sequence[Dim]) -> bool:
        """No axis counts positions (a weight, a broadcast [batch, 1, ...] operand)."""
        return not any(isinstance(t, str) and t in self.symbols for d in shape for t in dim_terms(d))


def dim_add(*dims: Dim) -> Dim:
    """Sum of dimensions, folding the constants; symbols keep their order."""
    const = 0
    syms: list[str] = []
    for d in dims:
        for t in dim_terms(d):
            if isinstance(t, int):
                const += t
            else:
                syms.append(t)
    if not syms:
        return const
    return "+".join(syms + ([str(const)] if const else []))


def eval_dim(d: Dim, env: Mapping[str, int]) -> int:
    """The value of a dimension once its symbols are bound."""
    total = 0
    for t in dim_terms(d):
        total += t if isinstance(t, int) else _eval_product(t, env)
    return total


def _eval_product(term: str, env: Mapping[str, int]) -> int:
    """A term "4*batch*seq" (reshape flattens symbolic axes into products)."""
    value = 1
    for f in term.split("*"):
        value *= int(f) if f.lstrip("-").isdigit() else env[f]
    return value


def symbols(d: Dim) -> list[str]:
    return [f for t in dim_terms(d) if isinstance(t, str) for f in t.split("*") if not f.lstrip("-").isdigit()]


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def concrete(self, env: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(d, env) for d in self.shape)

    def numel(self, env: Mapping[str, int] | None = None) -> int:
        return int(np.prod(self.concrete(env or {}), dtype=np.int64))

    def with_shape(self, shape: tuple[Dim, ...]) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


def bind_shape(t: TensorType, actual: tuple[int, ...], env: dict[str, int], what: str) -> None:
    """Bind the symbols of `t` to the sizes of a concrete array, checking consistency.

    Only plain symbols are bound; sums are checked once their parts are known.
    Raises ValueError with a message naming `what` on mismatch.
    """
    if len(actual) != len(t.shape):
        raise ValueError(f"{what}: expected rank {len(t.shape)} ({t}), got shape {tuple(actual)}")
    for d, n in zip(t.shape, actual):
        if isinstance(d, str) and "+" not in d and "*" not in d and not d.lstrip("-").isdigit():
            if env.setdefault(d, int(n)) != n:
                raise ValueError(f"{what}: dimension {d} is {env[d]} elsewhere but {n} here")
    for d, n in zip(t.shape, actual):
        if all(s in env for s in symbols(d)) and eval_dim(d, env) != n:
            raise ValueError(f"{what}: expected {t} (dimension {d} = {eval_dim(d, env)}), got shape {tuple(actual)}")
