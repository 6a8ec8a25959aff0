"""The GPU's KernelSet: the kernels of this package for the shared lowering, the same for
OpenCL and CUDA. Matmuls read the shared panel layouts with a panel width of 32 (16 or 8 where
that divides the output width): a panel is a warp's columns. bfloat16 / float16 weights stay
16-bit in device memory and are widened in registers; low-bit weights are read as codes and
dequantised in registers (there is no integer path: `integer_matmuls` is False)."""

from __future__ import annotations

from typing import Mapping

import tvm
from tvm import tirx

from mocompile.backends.tvm_common.kernels import KernelSet
from mocompile.backends.tvm_common.layout import panel_width
from mocompile.backends.tvm_common.specs import Epilogue, MatmulShape
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

    # each kernel role is the factory of the same name in this package's kernel modules
    gather_rows = staticmethod(kernels_rows.gather_rows)
    norm = staticmethod(kernels_rows.norm)
    quantize_rows = staticmethod(kernels_quant.quantize_rows)
    router_topk = staticmethod(kernels_moe.router_topk)
    moe_plan = staticmethod(kernels_moe.moe_plan)
    moe_combine = staticmethod(kernels_rows.moe_combine)
    padded_len = staticmethod(kernels_attention.padded_len)
    rope_table = staticmethod(kernels_rows.rope_table)
    attention_keys = staticmethod(kernels_attention.attention_keys)
    cache_rows = staticmethod(kernels_rows.cache_rows)
    attention = staticmethod(kernels_attention.attention)
    latent_keys = staticmethod(kernels_attention.latent_keys)
    latent_attention = staticmethod(kernels_attention.latent_attention)

    def schedule(self, mod: tvm.IRModule) -> tvm.IRModule:
        return schedule_module(mod, self.target)
