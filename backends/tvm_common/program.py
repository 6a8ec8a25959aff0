"""The lowered program of a TVM-based target: the Relax module plus the weights it expects,
in order (the same for every target; the kernels inside are the target's).

Calling convention of `main` (what an artifact writer / runtime must follow):

    main(*inputs, *weights) -> output | (output_0, output_1, ...)

- inputs: the graph inputs in `input_names` order (the graph's own order), with the graph's
  dtypes; symbolic dims are free (bound from the arrays at call time);
- weights: `weights` in list order: each entry's `name` is its key in the artifact's
  safetensors, its array is already in the backend layout (see layout.py); `WeightLayout.
  pack` re-derives it from the graph's (torch-layout) weights;
- outputs: `output_names` order; a tuple when there are several.

and, for graphs that can decode with a KV cache (mocompile.kv_cache.decode_support), of `step`:

    step(*inputs, past, *caches, *weights) -> outputs

- inputs cover positions past..past+seq-1, seq the sum of the segments' lengths in input order
  (prefill: past = 0; decode: seq = 1; a multimodal model's other segments may be empty);
- past: a shape value (ShapeTuple([past])), the positions already in the cache;
- caches: float32 tensors in `cache` order, shapes as listed there with the symbols
  "batch" and "cache_len" (any multiple of kernels_attention.KB >= past + seq, the same for
  all); zero-filled at first, then owned by the caller and updated in place by each call.

and, for the same graphs, of `prefill` (tvm_common/prefill.py): a prompt step that returns
each output with a positions axis at the last position only, for `generate`'s prompt and
llama-bench's prompt case, which read nothing else:

    prefill(*inputs, past, *caches, *weights) -> outputs, those listed in the manifest's
                                                 program.prefill.last_only as [batch, 1, ...]

- the same parameters as `step`, the same cache slots (checked when it is built): it writes
  the cache exactly as `step` does, and its outputs equal the step's at the last position bit
  for bit (checked before a compile succeeds); the last position of a multimodal model's
  call is the last of its segments joined in the model's order;
- absent, with the manifest's program.no_prefill_reason, where the graph has no step or no
  output with a positions axis; a runtime then slices the step's outputs.

and, when driver.py could build it, of the decode driver (a TIR function making the step's
kernel calls without the VM; the library's PrimFunc `decode`, see driver.py):

    decode(*inputs, past, *caches, *weights, *constants, *outputs) -> None
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm

from mocompile.backends.tvm_common.layout import WeightLayout


@dataclass
class LoweredProgram:
    mod: tvm.IRModule
    input_names: list[str]
    output_names: list[str]
    weights: list[WeightLayout]  # order of the trailing parameters of `main`
    arrays: dict[str, np.ndarray] = field(repr=False)  # weight name -> array in backend layout
    cache: list[dict] | None = None  # the step function's cache tensors (None: no step function)
    no_step_reason: str | None = None
    kernel_calls: dict[str, int] = field(default_factory=dict)  # kernel launches per Relax function
    matmuls: list = field(default_factory=list)  # the MatmulShapes the program uses (what tuning can tune)
    driver_constants: list[np.ndarray] | None = None  # the decode driver's constants (None: no driver)
    no_driver_reason: str | None = None
    target: Any = None  # what the kernels are shaped for (the target's own description; build's default)
    routers: list[tuple[str, str]] = field(default_factory=list)  # (router kernel, node place) in main's call order
    expert_reads: dict[str, dict] = field(default_factory=dict)  # kernel -> its per-expert weight arguments
    kernel_flops: dict[str, int] = field(default_factory=dict)  # matmul kernel -> flops per output row
    contextual: list[dict] = field(default_factory=list)  # the step's contextual matmuls (tvm_common/contextual.py)
    layer_states: list[str] | None = None  # outputs of the `layers` function (None: not built)
    prefill: list[str] | None = None  # the outputs `prefill` keeps at the last position (None: not built)
    no_prefill_reason: str | None = None

    @property
    def weight_names(self) -> list[str]:
        return [w.name for w in self.weights]

    def weight_arrays(self) -> list[np.ndarray]:
        return [self.arrays[w.name] for w in self.weights]

    def manifest(self) -> dict[str, Any]:
        """JSON-serialisable description of the calling convention (for the artifact)."""
        return {
            "inputs": list(self.input_names),
            "outputs": list(self.output_names),
            "weights": [w.to_json() for w in self.weights],
            "cache": self.cache,
        }
