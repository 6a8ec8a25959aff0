"""What an artifact takes and returns: named tensors with dtypes, shapes (symbolic dims as
names) and, for token inputs, the vocabulary bound; plus random inputs of a signature.

It sits below the compiler, the passes and the runtime, which all speak it: a pass drawing
calibration inputs, the compiler writing the manifest, the runtime checking a call.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

import numpy as np

from mocompile.errors import ArtifactInputError
from mocompile.ir.graph import Graph
from mocompile.ir.types import PositionsAxis, TensorType, bind_shape


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]
    high: int | None = None  # integer inputs (token ids) take values in [0, high)

    @property
    def type(self) -> TensorType:
        return TensorType(self.shape, self.dtype)

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        return d if self.high is None else {**d, "high": self.high}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "TensorSpec":
        return TensorSpec(d["name"], d["dtype"], tuple(d["shape"]), d.get("high"))


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "Signature":
        return Signature(tuple(map(TensorSpec.from_json, d["inputs"])), tuple(map(TensorSpec.from_json, d["outputs"])))

    def check(self, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Validate inputs (names, dtypes, shapes); return the bound symbolic dims. Dtypes
        must match exactly: a silent cast would hide float64 data losing precision, or ids
        meant for another vocabulary."""
        env: dict[str, int] = {}
        names = {t.name for t in self.inputs}
        extra = set(inputs) - names
        if extra:
            raise ArtifactInputError(f"unexpected input(s) {sorted(extra)}; the artifact takes {sorted(names)}")
        for t in self.inputs:
            if t.name not in inputs:
                raise ArtifactInputError(f"missing input {t.name!r} ({t.type})")
            a = inputs[t.name]
            if str(a.dtype) != t.dtype:
                raise ArtifactInputError(f"input {t.name!r}: expected {t.dtype}, got {a.dtype} "
                                         f"(convert it with .astype({t.dtype!r}))")
            wrong = next(((i, d) for i, d in enumerate(t.shape)
                          if isinstance(d, int) and a.ndim == len(t.shape) and a.shape[i] != d), None)
            if wrong is not None:
                raise ArtifactInputError(f"input {t.name!r}: axis {wrong[0]} is {a.shape[wrong[0]]} "
                                         f"(shape {a.shape}), the artifact takes {wrong[1]} ({t.type})")
            try:
                bind_shape(t.type, a.shape, env, f"input {t.name!r}")
            except ValueError as e:
                raise ArtifactInputError(str(e)) from None
        return env

    @cached_property
    def position_outputs(self) -> frozenset[str]:
        """The outputs with a positions axis (ir/types.PositionsAxis): the ones a last-only
        step returns at the last position. Computed once per signature, not per call."""
        pos = PositionsAxis(t.shape for t in self.inputs)
        return frozenset(t.name for t in self.outputs if pos.carries(t.shape))

    def last_positions(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`outputs` with each of `position_outputs` ([batch, positions, ...]) cut to its last
        position [batch, 1, ...], as a `prefill` function returns them (mocompile/prefill.py):
        what a runtime without one returns for a last-only step."""
        cut = self.position_outputs
        return {k: np.ascontiguousarray(a[:, -1:]) if k in cut else a for k, a in outputs.items()}


def signature_of(graph: Graph, int_high: Mapping[str, int]) -> Signature:
    return Signature(
        tuple(TensorSpec(v.name, v.type.dtype, v.type.shape, int_high.get(v.name)) for v in graph.inputs),
        tuple(TensorSpec(v.name, v.type.dtype, v.type.shape) for v in graph.outputs),
    )


def random_inputs(signature: Signature, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for a signature: the symbolic dim `batch` gets `batch`, every other
    symbol gets `seq`; integer inputs draw ids in [0, high)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in signature.inputs:
        shape = tuple(d if isinstance(d, int) else (batch if d == "batch" else seq) for d in t.shape)
        if t.dtype.startswith("int"):
            out[t.name] = rng.integers(0, t.high or 2, size=shape).astype(t.dtype)
        else:
            out[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return out
