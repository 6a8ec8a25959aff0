"""Compile-time weight re-layout: torch-layout weights -> the panel layout the kernels read.

Why panels: a matmul kernel computes TJ output columns at a time; storing those TJ columns
of the weight contiguously per input index ([N/TJ, K, TJ], "panel-major") makes every
weight read a contiguous vector load and every panel one sequential stream, which is what
both the single-token GEMV (memory bound) and the batched GEMM (register tiles) want.

Layouts (float32 weights; low-bit codes int8 [.., N, K] or uint8 [.., N, K/2] (int4 pairs)
and their float32 scales [.., N, G] go through the same layouts, so code panel b and scale
panel b cover the same output columns):
- `panels`        w[N, K]       -> [ceil(N/TJ), K, TJ]         p[b, k, j] = w[b*TJ + j, k]
- `glu_panels`    gate, up[F, K]-> [ceil(F/TJ), K, 2*TJ]       lanes [0,TJ) gate, [TJ,2TJ) up
- `expert_panels` w[E, N, K]    -> [E*ceil(N/TJ), K, TJ]       expert e owns panels e*NB..e*NB+NB-1
- `expert_glu_panels` gate, up[E, F, K] -> [E*ceil(F/TJ), K, 2*TJ]
- `vnni_panels`   int8 w[N, K]  -> int32 [ceil(N/16), K/4, 16]: lane j of row k4 holds the
                  four bytes w[b*16 + j, 4*k4 .. 4*k4+3], the operand of one AVX-512 VNNI
                  dot product (vpdpbusd) for 16 columns
- `vnni_colsum`   int8 w[N, K]  -> int32 [ceil(N/16), 16]: 128 * sum_k w[n, k], which undoes
                  the +128 that makes activation codes unsigned for vpdpbusd
- `identity`      any array, passed through unchanged
Columns past N (when TJ does not divide N) are zero and never stored by the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

LAYOUT_KINDS = ("identity", "panels", "glu_panels", "expert_panels", "expert_glu_panels", "vnni_panels", "vnni_colsum")
VNNI_LANES = 16  # int32 lanes of one AVX-512 register: output columns per VNNI panel
PACKABLE_DTYPES = {"float32", "int8", "uint8"}


def panel_width(n: int) -> int:
    """Output columns per panel: 32 (two AVX-512 vectors) when it divides n, else the largest
    of 16/8 that does, else 16 with zero padding."""
    for tj in (32, 16, 8):
        if n % tj == 0:
            return tj
    return 16


def _panels(w: np.ndarray, tj: int) -> np.ndarray:
    """[..., N, K] -> [..., ceil(N/TJ), K, TJ] (zero-padded columns)."""
    *lead, n, k = w.shape
    nb = -(-n // tj)
    if nb * tj != n:
        pad = np.zeros((*lead, nb * tj - n, k), dtype=w.dtype)
        w = np.concatenate([w, pad], axis=-2)
    w = w.reshape(*lead, nb, tj, k)
    return np.ascontiguousarray(np.swapaxes(w, -1, -2))


def _vnni(kind: str, w: np.ndarray) -> np.ndarray:
    if w.dtype != np.int8 or w.ndim != 2 or w.shape[1] % 4:
        raise ValueError(f"{kind}: needs int8 [N, K] codes with K a multiple of 4, got {w.dtype}{list(w.shape)}")
    n, k = w.shape
    nb = -(-n // VNNI_LANES)
    padded = np.zeros((nb * VNNI_LANES, k), np.int8)
    padded[:n] = w
    if kind == "vnni_colsum":
        return (128 * padded.astype(np.int32).sum(axis=1)).astype(np.int32).reshape(nb, VNNI_LANES)
    grouped = padded.reshape(nb, VNNI_LANES, k // 4, 4).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(grouped).view(np.int32).reshape(nb, k // 4, VNNI_LANES)


def pack(kind: str, sources: list[np.ndarray], tj: int) -> np.ndarray:
    """Apply one layout to its source weights (see the module docstring)."""
    if kind == "identity":
        return np.ascontiguousarray(sources[0])
    dtypes = {str(a.dtype) for a in sources}
    if len(dtypes) != 1 or not dtypes <= PACKABLE_DTYPES:
        raise ValueError(f"{kind}: packs float32, int8 or uint8 weights of one dtype, got {sorted(dtypes)}")
    if kind == "panels":
        return _panels(sources[0], tj)
    if kind == "glu_panels":
        return np.ascontiguousarray(np.concatenate([_panels(sources[0], tj), _panels(sources[1], tj)], axis=-1))
    if kind in ("vnni_panels", "vnni_colsum"):
        return _vnni(kind, sources[0])
    if kind == "expert_panels":
        p = _panels(sources[0], tj)
        return p.reshape(-1, *p.shape[2:])
    if kind == "expert_glu_panels":
        p = np.concatenate([_panels(sources[0], tj), _panels(sources[1], tj)], axis=-1)
        return np.ascontiguousarray(p.reshape(-1, *p.shape[2:]))
    raise ValueError(f"unknown weight layout {kind!r}")


@dataclass(frozen=True)
class WeightLayout:
    """One runtime weight of the compiled program and how it derives from graph weights.

    `name` is the key in the artifact's safetensors and the order of these entries in
    `LoweredProgram.weights` is the order of the trailing parameters of `main`.
    """

    name: str
    kind: str
    sources: tuple[str, ...]
    panel: int  # TJ; 0 for identity
    shape: tuple[int, ...]
    dtype: str

    def pack(self, graph_weights: Mapping[str, np.ndarray]) -> np.ndarray:
        out = pack(self.kind, [graph_weights[s] for s in self.sources], self.panel)
        if tuple(out.shape) != self.shape or str(out.dtype) != self.dtype:
            raise ValueError(f"weight {self.name}: packed to {out.dtype}{list(out.shape)}, expected {self.dtype}{list(self.shape)}")
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "sources": list(self.sources), "panel": self.panel,
                "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(d: Mapping) -> "WeightLayout":
        return WeightLayout(d["name"], d["kind"], tuple(d["sources"]), int(d["panel"]), tuple(d["shape"]), d["dtype"])


def make_layout(name: str, kind: str, sources: list[tuple[str, np.ndarray]], tj: int = 0) -> tuple[WeightLayout, np.ndarray]:
    """Pack `sources` ((graph name, array) pairs) and describe the result."""
    packed = pack(kind, [a for _, a in sources], tj)
    spec = WeightLayout(name, kind, tuple(n for n, _ in sources), tj if kind != "identity" else 0,
                        tuple(int(d) for d in packed.shape), str(packed.dtype))
    return spec, packed
