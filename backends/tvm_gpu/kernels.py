"""The GPU's KernelSet: the kernels of this package for the shared lowering, the same for
OpenCL and CUDA. Matmuls read the shared panel layouts with a panel width of 32 (16 or 8 where
that divides the output width): a panel is a warp's columns. Low-bit weights are read as codes
and dequantised in registers (there is no integer path: `integer_matmuls` is False)."""

from __future__ import annotations

from typing import Any, Mapping

import tvm
from tvm import tirx

from mocompile.backends.tvm_common.kernels import KernelSet
from mocompile.backends.tvm_common.layout import panel_width
from mocompile.backends.tvm_common.specs import AttentionSpec, Epilogue, LatentSpec, MatmulShape, RouterSpec
from mocompile.backends.tvm_gpu import kernels_attention, kernels_matmul, kernels_moe, kernels_quant, kernels_rows
from mocompile.backends.tvm_gpu.schedule import schedule_module
from mocompile.backends.tvm_gpu.target import GpuTarget


class MatmulTile:
    """A GPU matmul's configuration: the shape and the panel width (its warp's columns)."""

    def __init__(self, shape: MatmulShape) -> None:
        self.shape = shape
        self.tj = panel_width(shape.n)


class GpuKernels(KernelSet):
    name = "tvm_gpu"

    def __init__(self, target: GpuTarget) -> None:
        super().__init__(target)
        self.name = f"{target.kind} (tvm_gpu)"

    def matmul_config(self, shape: MatmulShape, record: Mapping | None) -> MatmulTile:
        return MatmulTile(shape)

    def dense(self, config: MatmulTile, epi: Epilogue) -> list[tirx.PrimFunc]:
        s = config.shape
        return [kernels_matmul.dense(s.k, s.n, config.tj, epi, s.fmt)]

    def grouped_matmul(self, config: MatmulTile, epi: Epilogue) -> tirx.PrimFunc:
        s = config.shape
        return kernels_matmul.grouped(s.experts, s.k, s.n, config.tj, epi, s.fmt)

    def gather_rows(self, hidden: int, index_dtype: str = "int32", table_rows: int | None = None) -> tirx.PrimFunc:
        return kernels_rows.gather_rows(hidden, index_dtype, table_rows)

    def norm(self, kind: str, hidden: int, eps: float) -> tirx.PrimFunc:
        return kernels_rows.norm(kind, hidden, eps)

    def quantize_rows(self, k: int, mode: str) -> tirx.PrimFunc:
        return kernels_quant.quantize_rows(k, mode)

    def router_topk(self, spec: RouterSpec) -> tirx.PrimFunc:
        return kernels_moe.router_topk(spec)

    def moe_plan(self, experts: int, top_k: int) -> tirx.PrimFunc:
        return kernels_moe.moe_plan(experts, top_k)

    def moe_combine(self, hidden: int, top_k: int, residuals: int) -> tirx.PrimFunc:
        return kernels_rows.moe_combine(hidden, top_k, residuals)

    def padded_len(self, s: Any) -> Any:
        return kernels_attention.padded_len(s)

    def rope_table(self, head_dim: int) -> tirx.PrimFunc:
        return kernels_rows.rope_table(head_dim)

    def attention_keys(self, spec: AttentionSpec) -> tirx.PrimFunc:
        return kernels_attention.attention_keys(spec)

    def cache_rows(self, width: int) -> tirx.PrimFunc:
        return kernels_rows.cache_rows(width)

    def attention(self, spec: AttentionSpec) -> tirx.PrimFunc:
        return kernels_attention.attention(spec)

    def latent_keys(self, spec: LatentSpec) -> tirx.PrimFunc:
        return kernels_attention.latent_keys(spec)

    def latent_attention(self, spec: LatentSpec) -> tirx.PrimFunc:
        return kernels_attention.latent_attention(spec)

    def schedule(self, mod: tvm.IRModule) -> tvm.IRModule:
        return schedule_module(mod, self.target)
