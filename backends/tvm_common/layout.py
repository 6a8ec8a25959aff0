"""Compile-time weight re-layout: torch-layout weights -> the panel layout the kernels read.

Why panels: a matmul kernel computes TJ output columns at a time; storing those TJ columns
of the weight contiguously per input index ([N/TJ, K, TJ], "panel-major") makes every
weight read a contiguous vector load and every panel one sequential stream, which is what
both the single-token GEMV (memory bound) and the batched GEMM (register tiles) want.

Layouts (float32 weights, or the uint16 bits of bfloat16/float16 ones; low-bit codes int8 [.., N, K] or uint8 [.., N, K/2] (int4 pairs)
and their float32 scales [.., N, G] go through the same layouts, so code panel b and scale
panel b cover the same output columns):
- `panels`        w[N, K]       -> [ceil(N/TJ), K, TJ]         p[b, k, j] = w[b*TJ + j, k]
- `glu_panels`    gate, up[F, K]-> [ceil(F/TJ), K, 2*TJ]       lanes [0,TJ) gate, [TJ,2TJ) up
- `expert_panels` w[E, N, K]    -> [E*ceil(N/TJ), K, TJ]       expert e owns panels e*NB..e*NB+NB-1
- `expert_glu_panels` gate, up[E, F, K] -> [E*ceil(F/TJ), K, 2*TJ]
- `vnni_panels`   int8 w[N, K]  -> int32 [ceil(N/16), K/4, 16]: lane j of row k4 holds the
                  four bytes w[b*16 + j, 4*k4 .. 4*k4+3] + 128 (unsigned), the weight operand
                  of one AVX-512 VNNI dot product (vpdpbusd) for 16 columns; int4 codes
                  (uint8 [N, K/2]) -> [ceil(N/16), K/8, 16]: byte t of a lane's word holds
                  code 8*k8 + t (low nibble) and 8*k8 + 4 + t (high nibble), each + 8; per
                  expert w[E, N, K] -> [E*ceil(N/16), ...]; two sources (gate, up) -> 32
                  lanes, gate's first (see kernels_int8.py for the offsets)
- `column_norms`  one or more w[(E,) N, K] -> [(E,) K] float32: ||w[:, k]|| over the rows of them all,
                  the constant contextual sparsity scores channels with (mocompile.ir.contextual)
- `identity`      any array, passed through unchanged
Columns past N (when TJ does not divide N) are zero and never stored by the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mocompile.ir.contextual import column_norms

LAYOUT_KINDS = ("identity", "panels", "glu_panels", "expert_panels", "expert_glu_panels", "vnni_panels",
                "column_norms")
VNNI_LANES = 16  # int32 lanes of one AVX-512 register: output columns per VNNI panel
PACKABLE_DTYPES = {"float32", "uint16", "int8", "uint8"}  # uint16: bfloat16/float16 bits


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


def vnni_offset(bits: int) -> int:
    """What the VNNI layout adds to a signed code to store it unsigned (vpdpbusd's operand)."""
    return 128 if bits == 8 else 8


def _vnni_one(w: np.ndarray) -> np.ndarray:
    """One source [..., N, K] of int8 or packed int4 codes -> panels [..., NB, words, 16]."""
    if w.dtype not in (np.int8, np.uint8) or w.ndim not in (2, 3):
        raise ValueError(f"vnni_panels: needs int8 [N, K] or int4 (uint8 [N, K/2]) codes, optionally per expert, "
                         f"got {w.dtype}{list(w.shape)}")
    int4 = w.dtype == np.uint8
    if int4:  # nibbles (code + 8) of inputs 2j, 2j + 1
        codes = np.empty((*w.shape[:-1], 2 * w.shape[-1]), np.int32)
        codes[..., 0::2], codes[..., 1::2] = w & 15, w >> 4
    else:
        codes = w.astype(np.int32) + vnni_offset(8)
    *lead, n, k = codes.shape
    per_word = 8 if int4 else 4
    if k % per_word:
        raise ValueError(f"vnni_panels: {k} inputs do not fill whole {per_word}-input words")
    nb = -(-n // VNNI_LANES)
    padded = np.zeros((*lead, nb * VNNI_LANES, k), np.int32)
    padded[..., :n, :] = codes
    words = padded.reshape(*lead, nb, VNNI_LANES, k // per_word, per_word)
    if int4:  # byte t: inputs t (low nibble) and t + 4 (high) of each 8
        words = words[..., :4] | (words[..., 4:] << 4)
    as_bytes = np.swapaxes(words, -3, -2).astype(np.uint8)
    return np.ascontiguousarray(as_bytes).view(np.int32).reshape(*lead, nb, k // per_word, VNNI_LANES)


def _vnni(sources: list[np.ndarray]) -> np.ndarray:
    """VNNI panels of one weight, or of a gate|up pair side by side; the experts of a
    stacked weight one after another."""
    joined = np.concatenate([_vnni_one(w) for w in sources], axis=-1)
    return np.ascontiguousarray(joined.reshape(-1, *joined.shape[-2:]))


def pack(kind: str, sources: list[np.ndarray], tj: int, store: str = "") -> np.ndarray:
    """Apply one layout to its source weights (see the module docstring), the result kept in
    dtype `store` when given: float32 values stored as float16 (the group scales the quantize
    pass rounded to float16, which the kernels widen as they read them); a value float16
    cannot hold exactly is refused, since the kernels would then compute something else."""
    packed = _arrange(kind, sources, tj)
    if not store:
        return packed
    if store == "k_pairs":
        return pair_rows(kind, packed)
    if store != "float16" or packed.dtype != np.float32:
        raise ValueError(f"{kind}: stores float32 values as float16 only, not {packed.dtype} as {store!r}")
    half = packed.astype(np.float16)
    if not np.array_equal(half.astype(np.float32), packed):
        raise ValueError(f"{kind}: values not exact in float16 cannot be stored as float16")
    return half


def pair_rows(kind: str, packed: np.ndarray) -> np.ndarray:
    """16-bit panels [.., K, TJ] -> uint32 [.., K/2, TJ]: row i's word j holds input 2i's bits
    in its low half and input 2i+1's in its high half (WeightFormat.pairs)."""
    if packed.dtype != np.uint16 or packed.shape[-2] % 2:
        raise ValueError(f"{kind}: pairs the rows of 16-bit panels of an even depth, not {packed.dtype}{list(packed.shape)}")
    lo, hi = packed[..., 0::2, :].astype(np.uint32), packed[..., 1::2, :].astype(np.uint32)
    return np.ascontiguousarray(lo | (hi << np.uint32(16)))


def _arrange(kind: str, sources: list[np.ndarray], tj: int) -> np.ndarray:
    if kind == "identity":
        return np.ascontiguousarray(sources[0])
    if kind == "column_norms":
        return column_norms(sources)
    dtypes = {str(a.dtype) for a in sources}
    if len(dtypes) != 1 or not dtypes <= PACKABLE_DTYPES:
        raise ValueError(f"{kind}: packs float32, uint16, int8 or uint8 weights of one dtype, got {sorted(dtypes)}")
    if kind == "panels":
        return _panels(sources[0], tj)
    if kind == "glu_panels":
        return np.ascontiguousarray(np.concatenate([_panels(sources[0], tj), _panels(sources[1], tj)], axis=-1))
    if kind == "vnni_panels":
        return _vnni(sources)
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
    store: str = ""  # "float16": float32 values kept in 16 bits; "k_pairs": 16-bit rows paired (see pack)

    def pack(self, graph_weights: Mapping[str, np.ndarray]) -> np.ndarray:
        out = pack(self.kind, [graph_weights[s] for s in self.sources], self.panel, self.store)
        if tuple(out.shape) != self.shape or str(out.dtype) != self.dtype:
            raise ValueError(f"weight {self.name}: packed to {out.dtype}{list(out.shape)}, expected {self.dtype}{list(self.shape)}")
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "sources": list(self.sources), "panel": self.panel,
                "shape": list(self.shape), "dtype": self.dtype, **({"store": self.store} if self.store else {})}

    @staticmethod
    def from_json(d: Mapping) -> "WeightLayout":
        return WeightLayout(d["name"], d["kind"], tuple(d["sources"]), int(d["panel"]), tuple(d["shape"]), d["dtype"],
                            d.get("store", ""))


def make_layout(name: str, kind: str, sources: list[tuple[str, np.ndarray]], tj: int = 0,
                store: str = "") -> tuple[WeightLayout, np.ndarray]:
    """Pack `sources` ((graph name, array) pairs) and describe the result."""
    packed = pack(kind, [a for _, a in sources], tj, store)
    spec = WeightLayout(name, kind, tuple(n for n, _ in sources), tj if kind not in ("identity", "column_norms") else 0,
                        tuple(int(d) for d in packed.shape), str(packed.dtype), store)
    return spec, packed
