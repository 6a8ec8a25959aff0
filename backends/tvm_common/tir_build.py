"""The IR-builder helpers every target's hand-written kernels use: parameters, stores and
conditionals emitted through TVMScript's IR builder (inside a `T.prim_func` frame, Python
code *emits* TIR). Loop kinds and scratch memory differ per target (tvm_cpu/tir_util.py:
parallel and vector loops; tvm_gpu/gpu_util.py: thread bindings, shared memory)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from tvm import tirx
from tvm.script.ir_builder import tirx as T

serial = T.serial  # `with serial(0, n) as i:` emits a sequential loop


def arg(name: str, shape: Sequence, dtype: str = "float32") -> tirx.Buffer:
    """A tensor parameter. Symbolic dims (tirx.Var) are bound from the first buffer using them."""
    return T.arg(name, T.Buffer(tuple(shape), dtype, buffer_name=name))


def scalar_arg(var: tirx.Var) -> tirx.Var:
    """A scalar int64 parameter (a shape value no buffer argument carries)."""
    return T.arg(var.name, var)


def dim(name: str) -> tirx.Var:
    """A symbolic int64 dimension of a kernel's buffers."""
    return tirx.Var(name, "int64")


def store(buf: tirx.Buffer, indices: Sequence, value) -> None:
    T.buffer_store(buf, value, list(indices))


@contextmanager
def when(cond) -> Iterator[None]:
    """`if cond:` in the emitted code."""
    with T.If(cond):
        with T.Then():
            yield


@contextmanager
def if_else(cond) -> Iterator[tuple]:
    """Usage: `with if_else(c) as (then, orelse): with then(): ...; with orelse(): ...`."""
    with T.If(cond):
        yield (T.Then, T.Else)


def i64(x) -> tirx.PrimExpr:
    return tirx.Cast("int64", x) if getattr(x, "dtype", "int64") != "int64" else x


def residual_args(count: int, rows, n: int) -> list[tirx.Buffer]:
    """`count` residual inputs of an epilogue, [rows, n] each, added in this order."""
    return [arg("residual" + (str(i + 1) if i else ""), (rows, n)) for i in range(count)]
