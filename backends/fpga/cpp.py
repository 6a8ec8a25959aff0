"""The C++ of one design as it is written: declarations for parameters.h (types, hls4ml
dense configs, tables), the statements of the per-position step function, the arrays held in
the weights blob (weights, biases, rotary tables) and the KV cache arrays the step takes.
The kernels' `emit` functions write through this."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mocompile.backends.fpga.design import Design, ident
from mocompile.backends.fpga.fixed import Fmt, Lut
from mocompile.ir.graph import Value


@dataclass
class BlobArray:
    """An array stored in weights.bin: its C++ name and element type, its codes and their width."""

    name: str
    ctype: str
    codes: np.ndarray
    bits: int  # 16, 32 or 64: the integer type of the codes in the blob
    frac: int | None = None  # fixed-point arrays: fraction bits (for the ROM initialisers)


@dataclass
class CacheArray:
    name: str
    ctype: str
    fmt: Fmt
    width: int  # values per position


@dataclass
class Cpp:
    design: Design
    capacity: int  # positions of each KV cache
    decls: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    arrays: dict[str, BlobArray] = field(default_factory=dict)
    caches: list[CacheArray] = field(default_factory=list)
    luts: dict[str, Lut] = field(default_factory=dict)

    def decl(self, text: str) -> None:
        if text not in self.decls:
            self.decls.append(text)

    def line(self, text: str) -> None:
        self.body.append(text)

    def name(self, v: Value) -> str:
        return ident(v.name)

    def v(self, v: Value) -> str:
        """The per-position array of an activation (or of a graph input / output)."""
        return f"v_{ident(v.name)}"

    def t(self, v: Value) -> str:
        return f"t_{ident(v.name)}" if v.type.dtype.startswith("float") else "int"

    def w(self, v: Value) -> str:
        """A weight's array, added to the blob on first use."""
        name = f"W_{ident(self.design.param_name(v))}"
        if name not in self.arrays:
            f = self.design.wfmt(v)
            self.arrays[name] = BlobArray(name, self.wt(v), self.design.codes(v).reshape(-1), 16 if f.width <= 16 else 32,
                                          f.frac)
        return name

    def wt(self, v: Value) -> str:
        f = self.design.wfmt(v)
        return f"ap_fixed<{f.width}, {f.integer}>"

    def array(self, name: str, ctype: str, codes: np.ndarray, bits: int, frac: int | None = None) -> str:
        """A constant array of the design other than a weight (biases in an accumulator's
        format, rotary tables, score biases), held in the blob."""
        self.arrays[name] = BlobArray(name, ctype, np.asarray(codes, np.int64).reshape(-1), bits, frac)
        return name

    def cache(self, name: str, ctype: str, fmt: Fmt, width: int) -> str:
        self.caches.append(CacheArray(name, ctype, fmt, width))
        return name

    def lut(self, table: Lut) -> str:
        self.luts[table.name] = table
        return f"LUT_{table.name}"
