"""What a kernel computes, independent of the target that generates it: the descriptions
the lowerings (lowerings.py) hand to a target's kernel factories (kernels.py's KernelSet),
and the keys kernels are named and tuned by.

- `Epilogue`: what a matmul's write-back applies (GLU, activation, bias, row scale, residuals);
- `WeightFormat`: how a matmul's weights are stored (float32, bfloat16/float16, int8 or int4 codes with scales);
- `MatmulShape`: a matmul whatever its tiling (the key of a tuning record);
- `AttentionSpec`, `LatentSpec`: an attention core (grouped-query with rope; latent/MLA);
- `RouterSpec`: a router.topk's attributes as typed, hashable values;
- `rope_inv_freq`: the rotary frequencies, computed once in numpy so that every target and
  the interpreter round alike.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from mocompile.ir.ops.moe import ROUTER_ATTRS
from mocompile.ir.registry import REQUIRED


@dataclass(frozen=True)
class Epilogue:
    """What the write-back does with an accumulated tile (applied in this order)."""

    glu: bool = False  # accumulator has 2*TJ lanes: out = act(gate lanes) * up lanes
    activation: str | None = None  # "silu" | "gelu" | None
    bias: bool = False  # + b[col]           (extra input bias[N])
    row_scale: bool = False  # * s[row]      (extra input scale[rows])
    residual: int = 0  # + r1[row, col] (+ r2[row, col]): extra inputs residual[rows, N] (, residual2)

    def tag(self) -> str:
        parts = ["glu" if self.glu else ""] + [self.activation or ""]
        parts += [n for n in ("bias", "row_scale") if getattr(self, n)]
        parts += ["residual" + (str(self.residual) if self.residual > 1 else "")] if self.residual else []
        return "_".join(p for p in parts if p) or "plain"



@dataclass(frozen=True)
class WeightFormat:
    """How a kernel's weight panels are stored (see layout.py for the packing)."""

    bits: int = 32  # 32: float32; 16: `half` floats as uint16 bits; 8: int8 codes; 4: int4 codes, two per uint8
    groups: int = 1  # scale groups along k per output channel (1: one scale per channel)
    half: str = ""  # bits 16: "bfloat16" | "float16" (how the kernel widens the bits, ir/ops/widen.py)
    scales: str = "float32"  # bits 8/4: the scale panels' dtype (float16 where the quantize pass rounded them so)
    # bits 16: two inputs per uint32 word (input 2i in the low half, 2i+1 in the high half), so
    # bfloat16 widens by a shift or a mask of the whole word, with no zero-extension (a shuffle)
    pairs: bool = False

    @property
    def dtype(self) -> str:
        return "uint32" if self.pairs else {32: "float32", 16: "uint16", 8: "int8", 4: "uint8"}[self.bits]

    @property
    def paired(self) -> bool:
        """A panel row holds two inputs (int4 nibbles, or 16-bit pairs): `depth` is k / 2."""
        return self.bits == 4 or self.pairs

    @property
    def quantized(self) -> bool:
        """Low-bit codes with scales (16-bit floats have none)."""
        return self.bits in (8, 4)

    @property
    def scale_store(self) -> str:
        """How the scale panels are stored (layout.pack's `store`): "float16", or "" as float32."""
        return "float16" if self.quantized and self.scales == "float16" else ""

    def depth(self, k: int) -> int:
        """Rows of a panel: one per input, or one per pair of inputs (int4, 16-bit pairs)."""
        return k // 2 if self.paired else k

    def tag(self) -> str:
        if self.bits == 16:
            return {"bfloat16": "_bf16", "float16": "_fp16"}[self.half] + ("p" if self.pairs else "")
        if not self.quantized:
            return ""
        return f"_q{self.bits}" + (f"g{self.groups}" if self.groups > 1 else "") + ("h" if self.scales == "float16" else "")


F32_WEIGHTS = WeightFormat()



@dataclass(frozen=True)
class MatmulShape:
    """What a matmul kernel computes, whatever its tiling: the key of a tuning record."""

    experts: int  # 0: a dense matmul; else a grouped (per-expert) one over this many experts
    k: int
    n: int
    glu: bool  # gate and up panels fused (2*TJ accumulator lanes)
    fmt: WeightFormat = F32_WEIGHTS

    def key(self) -> str:
        kind = f"grouped_e{self.experts}" if self.experts else "dense"
        return f"{kind}_{self.k}x{self.n}{'_glu' if self.glu else ''}{self.fmt.tag()}"



@dataclass(frozen=True)
class AttentionSpec:
    heads: int
    kv_heads: int
    head_dim: int
    rope: bool
    causal: bool

    def tag(self) -> str:
        return f"h{self.heads}kv{self.kv_heads}d{self.head_dim}{'_rope' if self.rope else ''}{'_causal' if self.causal else ''}"


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """inv_freq[D/2], bit-identical to the interpreter's rope_tables."""
    return (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)



@dataclass(frozen=True)
class LatentSpec:
    heads: int
    nope_dim: int
    rope_dim: int
    v_dim: int

    @property
    def qk_dim(self) -> int:
        return self.nope_dim + self.rope_dim

    def tag(self) -> str:
        return f"h{self.heads}n{self.nope_dim}r{self.rope_dim}v{self.v_dim}"



@dataclass(frozen=True)
class RouterSpec:
    """What a router kernel is specialised on: the expert count, and the router.topk
    attributes of the same names (their meaning and defaults: mocompile.ir.ops.moe's
    ROUTER_ATTRS), as the hashable, typed values `of` reads from a node's attributes."""

    experts: int
    top_k: int
    scoring: str
    normalize: bool
    routed_scale: float
    n_group: int
    topk_group: int
    groups: tuple[tuple[int, int, int], ...]  # (modality_id, start, end)
    score_bias: bool  # extra input bias[E]: experts are chosen by score + bias (DeepSeek-V3)
    group_score: str  # a routing group's score: sum of its top-2 choice scores | "max"

    @classmethod
    def of(cls, experts: int, attrs: Mapping[str, Any]) -> RouterSpec:
        """The spec of a router over `experts` experts with router.topk attributes `attrs`
        (absent ones take the op's defaults), each converted to its field's type."""
        given = {**{k: v for k, v in ROUTER_ATTRS.items() if v is not REQUIRED}, **attrs}
        hints = typing.get_type_hints(cls)
        return cls(int(experts), **{f.name: _as_type(hints[f.name], given[f.name]) for f in fields(cls)[1:]})

    def tag(self) -> str:
        groups = "".join(f"_m{m}r{a}to{b}" for m, a, b in self.groups)
        scale = str(self.routed_scale).replace(".", "p").replace("-", "m")
        extra = ("_bias" if self.score_bias else "") + ("_gmax" if self.group_score == "max" else "")
        return (f"e{self.experts}_k{self.top_k}_{self.scoring}{'_norm' if self.normalize else ''}"
                f"_g{self.n_group}x{self.topk_group}{groups}_s{scale}{extra}")


def _as_type(hint: Any, value: Any) -> Any:
    """`value` as the type `hint` names: a scalar type's constructor, tuples element by element."""
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_as_type(args[0], v) for v in value)
        return tuple(_as_type(a, v) for a, v in zip(args, value, strict=True))
    return hint(value)
