"""The CPU's KernelSet: the hand-scheduled kernels of this package for the shared lowering
(tvm_common/lowerings.py), shaped by a CpuTarget (integer VNNI or float low-bit matmuls,
register tiles within its accumulator budget, tuned tilings from the tuning database)."""

from __future__ import annotations

import json
from typing import Mapping

import tvm
from tvm import tirx

from mocompile.backends.tvm_common.kernels import KernelSet
from mocompile.backends.tvm_common.layout import VNNI_LANES, panel_width
from mocompile.backends.tvm_common.specs import Epilogue, MatmulShape, WeightFormat
from mocompile.backends.tvm_cpu import (kernels_attention, kernels_contextual, kernels_gather, kernels_int8, kernels_matmul, kernels_mla,
                                        kernels_moe, kernels_norm, kernels_quant, kernels_router, metaschedule)
from mocompile.backends.tvm_cpu.kernels_matmul import MatmulConfig, Tiling
from mocompile.backends.tvm_cpu.schedule import schedule_module
from mocompile.backends.tvm_cpu.target import CpuTarget, last_level_cache_bytes, runs_here


class CpuKernels(KernelSet):
    name = "tvm_cpu"
    integer_lanes = VNNI_LANES
    half_scales = True  # float16 scale panels, widened by vcvtph2ps as the kernels read them

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

    def gathered_pays(self, k: int, n: int, m: int, glu: bool, weight_bytes: int) -> dict:
        """Measured here (kernels_contextual.measure), with the caches flushed before each call
        where the model's weights exceed the last-level cache (a decode step streams them)."""
        if not runs_here(self.target):
            return {"gathered": True, "why": "not measured (built for another CPU): gathered"}
        cold = weight_bytes > last_level_cache_bytes()
        times = kernels_contextual.measure(k, n, m, glu, str(self.target.llvm()), cold)
        return {"gathered": times["gathered_us"] < times["dense_us"], **times, "cold": cold}

    def integer_format(self, fmt: WeightFormat, k: int) -> bool:
        return kernels_int8.supports(fmt, k)

    # each kernel role is the factory of the same name in this package's kernel modules
    digits_of = staticmethod(kernels_int8.digits_of)
    quantize_packed = staticmethod(kernels_int8.quantize_packed)
    int8_matmul = staticmethod(kernels_int8.int8_matmul)
    gather_rows = staticmethod(kernels_gather.gather_rows)
    select_channels = staticmethod(kernels_contextual.select_channels)
    gathered_matmul = staticmethod(kernels_contextual.gathered_matmul)
    norm = staticmethod(kernels_norm.norm)
    quantize_rows = staticmethod(kernels_quant.quantize_rows)
    router_topk = staticmethod(kernels_router.router_topk)
    moe_plan = staticmethod(kernels_moe.moe_plan)
    moe_combine = staticmethod(kernels_moe.moe_combine)
    padded_len = staticmethod(kernels_attention.padded_len)
    rope_table = staticmethod(kernels_attention.rope_table)
    attention_keys = staticmethod(kernels_attention.attention_keys)
    cache_rows = staticmethod(kernels_attention.cache_rows)
    attention = staticmethod(kernels_attention.attention)
    latent_keys = staticmethod(kernels_mla.latent_keys)
    latent_attention = staticmethod(kernels_mla.latent_attention)

    def schedule(self, mod: tvm.IRModule) -> tvm.IRModule:
        return schedule_module(mod)
