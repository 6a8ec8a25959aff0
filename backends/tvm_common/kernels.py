"""What a TVM-based target supplies to the shared lowering: its kernels and their schedules.

The lowerings (lowerings.py) decide, for every target alike, which kernels an op becomes,
with which weight layouts and in which order; each kernel itself comes from the target's
`KernelSet`, a factory per kernel role. A factory returns a PrimFunc named by its parameters
(the function attribute NAME_ATTR, so equal kernels are shared within a module); kernels
written as te computes (injective.py) are scheduled afterwards by `schedule`.

A target implements every factory it lowers with; the base class raises for the rest, so a
kernel set that lacks one fails at lowering with the role named. The integer low-bit path
(`integer_matmuls`: activations quantized to int8 codes, integer dot products) is optional.
"""

from __future__ import annotations

from typing import Any, Mapping

import tvm
from tvm import tirx

from mocompile.backends.tvm_common.specs import AttentionSpec, Epilogue, LatentSpec, MatmulShape, RouterSpec, WeightFormat

# Function attribute holding a kernel's name (the name of its GlobalVar in the module).
NAME_ATTR = "mocompile.kernel"
# Function attribute of a kernel whose loops are already scheduled where they are written.
HAND_SCHEDULED_ATTR = "mocompile.hand_scheduled"


class KernelSet:
    """The kernels of one target. `name` is the backend's name in messages ("tvm_cpu");
    `target` the target's own description (what the kernels are shaped for)."""

    name: str = ""
    integer_matmuls: bool = False  # low-bit matmuls in integers (int8_matmul, quantize_packed)
    integer_lanes: int = 0  # output columns per scale panel of the integer weight layout
    half_scales: bool = False  # low-bit kernels read float16 scale panels (WeightFormat.scales)

    def __init__(self, target: Any) -> None:
        self.target = target

    def _missing(self, role: str) -> Any:
        raise NotImplementedError(f"the {self.name} backend has no {role} kernel")

    # ---- matmuls ----------------------------------------------------------------------
    def matmul_config(self, shape: MatmulShape, record: Mapping | None) -> Any:
        """How a matmul is tiled (its `tj`: the panel width of its weight layout), from the
        tuning `record` for its shape where there is one."""
        return self._missing("matmul_config")

    def dense(self, config: Any, epi: Epilogue) -> list[tirx.PrimFunc]:
        """x[m, k] @ panels + epilogue: the kernel called, then the kernels it calls."""
        return self._missing("dense")

    def grouped_matmul(self, config: Any, epi: Epilogue) -> tirx.PrimFunc:
        """Per-expert matmul over expert-sorted rows (rows indptr[e]..indptr[e+1] by expert e)."""
        return self._missing("grouped_matmul")

    # ---- integer low-bit path (targets with integer_matmuls) ---------------------------------
    def integer_format(self, fmt: WeightFormat, k: int) -> bool:
        """Whether the integer kernels read weights of format `fmt` with reduction `k`."""
        return False

    def digits_of(self, mode: str) -> int:
        return self._missing("digits_of")

    def quantize_packed(self, k: int, mode: str, group: int) -> tirx.PrimFunc:
        return self._missing("quantize_packed")

    def int8_matmul(self, k: int, n: int, epi: Epilogue, experts: int, fmt: WeightFormat, digits: int,
                    gather: bool) -> tirx.PrimFunc:
        return self._missing("int8_matmul")

    # ---- contextual sparsity (tvm_common/contextual.py) ---------------------------------------
    def select_channels(self, k: int, m: int, mask: bool, experts: int = 0) -> tirx.PrimFunc:
        return self._missing("select_channels")

    def gathered_matmul(self, k: int, n: int, m: int, epi: Epilogue, experts: int = 0) -> tirx.PrimFunc:
        return self._missing("gathered_matmul")

    def gathered_pays(self, k: int, n: int, m: int, glu: bool, weight_bytes: int) -> dict[str, Any]:
        """Whether one token's gathered matmul over m of k channels beats the dense kernel for
        [k -> n] on this target (`weight_bytes`: the model's, whether weights stream from
        memory): {"gathered": bool, and the timings or "why"}. A target that does not
        measure keeps the dense kernel."""
        return {"gathered": False, "why": f"not measured on {self.name}: dense"}

    # ---- rows, norms, quantization ------------------------------------------------------------
    def gather_rows(self, hidden: int, index_dtype: str = "int32", table_rows: int | None = None,
                    table_dtype: str = "float32") -> tirx.PrimFunc:
        """Rows of a table by index; a "bfloat16"/"float16" table (uint16 bits) widened to float32."""
        return self._missing("gather_rows")

    def norm(self, kind: str, hidden: int, eps: float) -> tirx.PrimFunc:
        return self._missing("norm")

    def quantize_rows(self, k: int, mode: str) -> tirx.PrimFunc:
        return self._missing("quantize_rows")

    # ---- mixture of experts -------------------------------------------------------------------
    def router_topk(self, spec: RouterSpec) -> tirx.PrimFunc:
        return self._missing("router_topk")

    def moe_plan(self, experts: int, top_k: int) -> tirx.PrimFunc:
        return self._missing("moe_plan")

    def moe_combine(self, hidden: int, top_k: int, residuals: int) -> tirx.PrimFunc:
        return self._missing("moe_combine")

    # ---- attention ----------------------------------------------------------------------------
    def padded_len(self, s: Any) -> Any:
        """The key length of a plain forward's transposed keys for `s` positions."""
        return self._missing("padded_len")

    def rope_table(self, head_dim: int) -> tirx.PrimFunc:
        return self._missing("rope_table")

    def attention_keys(self, spec: AttentionSpec) -> tirx.PrimFunc:
        return self._missing("attention_keys")

    def cache_rows(self, width: int) -> tirx.PrimFunc:
        return self._missing("cache_rows")

    def attention(self, spec: AttentionSpec) -> tirx.PrimFunc:
        return self._missing("attention")

    def latent_keys(self, spec: LatentSpec) -> tirx.PrimFunc:
        return self._missing("latent_keys")

    def latent_attention(self, spec: LatentSpec) -> tirx.PrimFunc:
        return self._missing("latent_attention")

    # ---- the module ---------------------------------------------------------------------------
    def schedule(self, mod: tvm.IRModule) -> tvm.IRModule:
        """Schedule the module's te-generated kernels and check that every kernel is."""
        return self._missing("schedule")
