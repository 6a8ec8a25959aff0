"""Reading one value of a `.moe` entry: evaluating list expressions (`[a] * n + [b]`) within
the size limits, and the typed readers (bounded integers, floats, booleans, enums, names,
ranges) that the key schemas are made of."""

from __future__ import annotations

import math
from typing import Any, Callable

from mocompile.dsl import limits
from mocompile.dsl.spec_syntax import _Val, _describe, _fail_at, _suggest


# ---- value evaluation and types ------------------------------------------------------------


def _evaluate(v: _Val, key: str) -> _Val:
    """Expand list expressions: `[a] + [b] * 3` -> one list value (items keep positions).
    A list longer than limits.MAX_LAYERS is refused before it is built, naming `key`."""
    if v.kind == "list":
        _check_length(len(v.data), key, v)
        return _Val("list", [_evaluate(x, key) for x in v.data], v.line, v.column)
    if v.kind == "concat":
        lhs, rhs = (_evaluate(x, key) for x in v.data)
        for side in (lhs, rhs):
            if side.kind != "list":
                raise _fail_at(side, f"'+' joins lists, found {_describe(side)}")
        _check_length(len(lhs.data) + len(rhs.data), key, v)
        return _Val("list", lhs.data + rhs.data, lhs.line, lhs.column)
    if v.kind == "repeat":
        lhs, count = (_evaluate(x, key) for x in v.data)
        if lhs.kind != "list":
            raise _fail_at(lhs, f"'*' repeats a list, found {_describe(lhs)}")
        if count.kind != "int" or count.data < 0:
            raise _fail_at(count, f"repeat count must be a non-negative integer, found {_describe(count)}")
        _check_length(len(lhs.data) * count.data, key, count)
        return _Val("list", lhs.data * count.data, lhs.line, lhs.column)
    return v


def _check_length(n: int, key: str, at: _Val) -> None:
    if n > limits.MAX_LAYERS:
        raise _fail_at(at, f"'{key}' would have {n} items, more than the {limits.MAX_LAYERS} this compiler accepts")


# A type turns a value into a Python value or raises a located error naming the key.
TypeFn = Callable[[_Val, str], Any]


def _int(minimum: int, maximum: int) -> TypeFn:
    """An integer in [minimum, maximum]; maximum is one of the bounds in limits.py."""
    def convert(v: _Val, key: str) -> int:
        if v.kind != "int":
            raise _fail_at(v, f"'{key}' expects an integer, found {_describe(v)}")
        if v.data < minimum:
            need = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise _fail_at(v, f"'{key}' must be {need}, found {v.data}")
        if v.data > maximum:
            raise _fail_at(v, f"'{key}' = {v.data} is more than the {maximum} this compiler accepts")
        return v.data

    return convert


def _positive_float(v: _Val, key: str) -> float:
    if v.kind not in ("int", "float"):
        raise _fail_at(v, f"'{key}' expects a number, found {_describe(v)}")
    value = float(v.data)
    if not math.isfinite(value):
        raise _fail_at(v, f"'{key}' must be a finite number, found {value}")
    if value <= 0:
        raise _fail_at(v, f"'{key}' must be > 0, found {v.data}")
    return value


def _bool(v: _Val, key: str) -> bool:
    if v.kind != "name" or v.data not in ("true", "false"):
        raise _fail_at(v, f"'{key}' expects true or false, found {_describe(v)}")
    return v.data == "true"


def _enum(*choices: str) -> TypeFn:
    def convert(v: _Val, key: str) -> str:
        allowed = ", ".join(choices)
        if v.kind != "name":
            raise _fail_at(v, f"'{key}' expects one of {allowed}, found {_describe(v)}")
        if v.data not in choices:
            raise _fail_at(
                v, f"unknown {key} '{v.data}', expected one of {allowed}{_suggest(v.data, choices)}"
            )
        return v.data

    return convert


def _name_list(v: _Val, key: str) -> list[_Val]:
    """A non-empty list of names; items are returned as values so later checks can point at them."""
    if v.kind != "list":
        raise _fail_at(v, f"'{key}' expects a list of block names like [a, b] * 2, found {_describe(v)}")
    if not v.data:
        raise _fail_at(v, f"'{key}' is empty, expected at least one block name")
    for item in v.data:
        if item.kind != "name":
            raise _fail_at(item, f"'{key}' expects block names, found {_describe(item)}")
    return v.data


def _layer_selection(v: _Val, key: str) -> _Val:
    """A variant's layers: an int N (the first N) or a list of indices. Range checks need the model."""
    if v.kind == "int":
        return v
    if v.kind != "list":
        raise _fail_at(v, f"'{key}' expects a layer count or a list of layer indices, found {_describe(v)}")
    for item in v.data:
        if item.kind != "int":
            raise _fail_at(item, f"'{key}' expects layer indices (integers), found {_describe(item)}")
    return v


def _range(v: _Val, key: str) -> tuple[int, int]:
    if v.kind != "range":
        raise _fail_at(v, f"'{key}' expects an expert range like 0..4, found {_describe(v)}")
    start, end = v.data
    if start < 0:
        raise _fail_at(v, f"'{key}' range {start}..{end} starts below 0")
    if end <= start:
        raise _fail_at(v, f"'{key}' range {start}..{end} is empty (ranges are end-exclusive, like Python's)")
    return start, end
