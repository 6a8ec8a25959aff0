"""The CPU's KernelSet: the hand-scheduled kernels of this package for the shared lowering
(tvm_common/lowerings.py), shaped by a CpuTarget (integer VNNI or float low-bit matmuls,
register tiles within its accumulator budget, tuned tilings from the tuning database)."""

from __future__ import annotations

import json
from typing import Any, Mapping

import tvm
from tvm import tirx

from mocompile.backends.tvm_common.kernels import KernelSet
from mocompile.backends.tvm_common.layout import VNNI_LANES, panel_width
from mocompile.backends.tvm_common.specs import AttentionSpec, Epilogue, LatentSpec, MatmulShape, RouterSpec, WeightFormat
from mocompile.backends.tvm_cpu import (kernels_attention, kernels_gather, kernels_int8, kernels_matmul, kernels_mla,
                                        kernels_moe, kernels_norm, kernels_quant, kernels_router, metaschedule)
from mocompile.backends.tvm_cpu.kernels_matmul import MatmulConfig, Tiling
from mocompile.backends.tvm_cpu.schedule import schedule_module
from mocompile.backends.tvm_cpu.target import CpuTarget


class CpuKernels(KernelSet):
    name = "tvm_cpu"
    integer_lanes = VNNI_LANES

    def __init__(self, target: CpuTarget) -> None:
        super().__init__(target)
        self.integer_matmuls = target.integer_matmuls

    def matmul_config(self, shape: MatmulShape, record: Mapping | None) -> MatmulConfig:
        """The tuned tiling of a matmul if the tuning database has a record, else the
        default within the target's accumulator budget."""
        if record is None:
            return MatmulConfig(shape, panel_width(shape.n), budget=self.target.accumulator_bytes)
        tuned_rows = tuple(sorted((int(rows), json.dumps(trace)) for rows, trace in record.get("metaschedule", {}).items()))
        return MatmulConfig(shape, int(record["tj"]), Tiling(int(record["ti"]), int(record["ku"])), tuned_rows)

    def dense(self, config: MatmulConfig, epi: Epilogue) -> list[tirx.PrimFunc]:
        return metaschedule.dense_kernels(config, epi)

    def grouped_matmul(self, config: MatmulConfig, epi: Epilogue) -> tirx.PrimFunc:
        s = config.shape
        return kernels_matmul.grouped_matmul(s.experts, s.k, s.n, config.tj, epi, s.fmt, config.tiling, config.budget)

    def integer_format(self, fmt: WeightFormat, k: int) -> bool:
        return kernels_int8.supports(fmt, k)

    def digits_of(self, mode: str) -> int:
        return kernels_int8.digits_of(mode)

    def quantize_packed(self, k: int, mode: str, group: int) -> tirx.PrimFunc:
        return kernels_int8.quantize_packed(k, mode, group)

    def int8_matmul(self, k: int, n: int, epi: Epilogue, experts: int, fmt: WeightFormat, digits: int,
                    gather: bool) -> tirx.PrimFunc:
        return kernels_int8.int8_matmul(k, n, epi, experts, fmt, digits, gather)

    def gather_rows(self, hidden: int, index_dtype: str = "int32", table_rows: int | None = None) -> tirx.PrimFunc:
        return kernels_gather.gather_rows(hidden, index_dtype, table_rows)

    def norm(self, kind: str, hidden: int, eps: float) -> tirx.PrimFunc:
        return kernels_norm.norm(kind, hidden, eps)

    def quantize_rows(self, k: int, mode: str) -> tirx.PrimFunc:
        return kernels_quant.quantize_rows(k, mode)

    def router_topk(self, spec: RouterSpec) -> tirx.PrimFunc:
        return kernels_router.router_topk(spec)

    def moe_plan(self, experts: int, top_k: int) -> tirx.PrimFunc:
        return kernels_moe.moe_plan(experts, top_k)

    def moe_combine(self, hidden: int, top_k: int, residuals: int) -> tirx.PrimFunc:
        return kernels_moe.moe_combine(hidden, top_k, residuals)

    def padded_len(self, s: Any) -> Any:
        return kernels_attention.padded_len(s)

    def rope_table(self, head_dim: int) -> tirx.PrimFunc:
        return kernels_attention.rope_table(head_dim)

    def attention_keys(self, spec: AttentionSpec) -> tirx.PrimFunc:
        return kernels_attention.attention_keys(spec)

    def cache_rows(self, width: int) -> tirx.PrimFunc:
        return kernels_attention.cache_rows(width)

    def attention(self, spec: AttentionSpec) -> tirx.PrimFunc:
        return kernels_attention.attention(spec)

    def latent_keys(self, spec: LatentSpec) -> tirx.PrimFunc:
        return kernels_mla.latent_keys(spec)

    def latent_attention(self, spec: LatentSpec) -> tirx.PrimFunc:
        return kernels_mla.latent_attention(spec)

    def schedule(self, mod: tvm.IRModule) -> tvm.IRModule:
        return schedule_module(mod)
