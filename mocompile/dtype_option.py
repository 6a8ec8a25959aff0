"""`--dtype bf16|fp16|fp32` (and `compile(dtype=...)`): the storage type of the weights the
matmuls and embeddings read, as a pass the compile appends to the pipeline.

bf16 and fp16 append `weight-dtype(dtype=...)` (passes/weight_dtype.py): the weights are
stored in 16 bits and widened to float32 inside the kernels; activations, norms and biases
stay float32. After a quantize pass it stores the weights quantize left float (the embedding
table, a router, skipped roles) in 16 bits: the codes are quantize's. Without --dtype a bf16
checkpoint keeps its weights bf16 (where the target reads bf16 weights), quantized or not;
everything else stays float32. Everything here is checked before the model is built, so a
bad choice costs one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mocompile.backends.base import Backend
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.ir.ops.widen import SHORT_NAMES
from mocompile.ir.registry import get_op
from mocompile.pass_manager import PassManager
from mocompile.passes.weight_dtype import weight_inputs

CHOICES = ("bf16", "fp16", "fp32")
NAMES = {**SHORT_NAMES, "fp32": "float32"}
# Passes that decide how every weight is stored: weight-dtype itself, and contextual-sparsity,
# whose gathered kernels select rows of float32 weights. (quantize stores only the weights it
# quantizes; weight-dtype after it stores the rest.)
_SETS_WEIGHT_STORAGE = ("weight-dtype", "contextual-sparsity")


def _default(model: Any) -> str:
    """bf16 for a bf16 Hugging Face checkpoint, else fp32."""
    from mocompile.dsl.hf_dtype import checkpoint_dtype
    from mocompile.dsl.hf_import import is_checkpoint

    if isinstance(model, (str, Path)) and is_checkpoint(model) and checkpoint_dtype(model) == "bfloat16":
        return "bf16"
    return "fp32"


def resolve_dtype(model: Any, dtype: str | None, passes: str, backend: Backend, float_experts: bool = False) -> str:
    """The pipeline to run for `--dtype dtype` (None: the default for `model`), refusing
    what cannot be honoured in one line. `float_experts`: the compile also writes the
    expert-parallel pieces (--ep), whose expert programs read float32 weights, so the default
    stays float32."""
    if dtype is not None and dtype not in CHOICES:
        raise MocompileError(f"--dtype must be one of {', '.join(CHOICES)} (got {dtype!r})")
    storage = [p.describe() for p in PassManager(passes).passes if p.name in _SETS_WEIGHT_STORAGE]
    if dtype is None:
        dtype = _default(model)
        if storage or float_experts or NAMES[dtype] not in backend.weight_formats:
            dtype = "fp32"  # the pipeline or the target decides; nothing to change
    elif dtype != "fp32":
        if storage:
            raise MocompileError(f"--dtype {dtype}: {storage[0]} in the pipeline decides how every weight is "
                                 "stored: drop one of the two")
        if NAMES[dtype] not in backend.weight_formats:
            raise MocompileError(f"--dtype {dtype}: the {backend.name} target does not read {NAMES[dtype]} weights "
                                 f"(it reads {', '.join(sorted(backend.weight_formats))}); use --dtype fp32")
    if dtype == "fp32":
        return passes
    return ",".join(p for p in (passes, f"weight-dtype(dtype={dtype})") if p)


def stored_weight_dtype(graph: Graph) -> str:
    """How the weights the matmuls and embeddings read are stored in `graph` (what the
    manifest records): "bfloat16", "float16", "float32", "int8", "int4", or several joined by
    "+" where parts differ (a quantize pass that skips the router leaves it float32)."""
    formats = set()
    for node in graph.nodes:
        for i in weight_inputs(node):
            producer = node.inputs[i].producer
            stored_as = get_op(producer.op).weight_format if producer is not None else None
            formats.add(stored_as(producer.attrs) if stored_as is not None else node.inputs[i].type.dtype)
    return "+".join(sorted(formats)) or "float32"
