"""Running the mlir target's artifacts: the IREE module (`model.vmfb`, compiled by IREE for
llvm-cpu from the exported MLIR) through IREE's runtime, behind the same API as a CPU
artifact: `run`, and where the model decodes `new_cache` / `step` / `run_cached` /
`generate`, with the same input names and the same input checks (runtime_inputs.py).

The module's `main(*inputs)` returns the outputs; `step(*inputs, *past)` returns the outputs
and then, per cache entry, the keys/values of every position so far (`present`, the cache
as inputs and outputs: the IR's kv_cache.cached_graph). The cache is a KVCache of numpy
arrays allocated up front for its capacity: each step passes the `length` positions held
and copies the new positions of `present` back in. Imports numpy and iree.runtime only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mocompile.errors import ArtifactError
from mocompile.runtime import LoadedArtifact, _CallPlan, register_program_kind
from mocompile.runtime_inputs import KVCache
from mocompile.signature import Signature

PROGRAM_KIND = "iree-vmfb"


def _host(result: Any) -> list[np.ndarray]:
    items = result if isinstance(result, (list, tuple)) else [result]
    return [np.asarray(r.to_host() if hasattr(r, "to_host") else r) for r in items]


class IreeArtifact(LoadedArtifact):
    """An mlir-target artifact loaded into IREE's runtime (local-task driver, this CPU).
    Input planning, checks, decoding loops and `generate` are LoadedArtifact's; what differs
    is how a call reaches the module."""

    def __init__(self, path: Path, manifest: dict[str, Any], **options: Any) -> None:
        self.path, self.manifest = path, manifest
        self.signature = Signature.from_json(manifest["signature"])
        program = manifest["program"]
        if program.get("kind") != PROGRAM_KIND:
            raise ArtifactError(f"{path}: program kind {program.get('kind')!r} is not {PROGRAM_KIND}")
        if not program.get("vmfb"):
            raise ArtifactError(f"{path}: this artifact holds MLIR only ({program.get('no_vmfb_reason')})")
        try:
            import iree.runtime as ireert
        except ImportError:
            raise ArtifactError(f"{path}: running it needs IREE's runtime (pip install 'mocompile[mlir]')") from None
        step = program.get("step")
        self.max_seq = (manifest.get("model") or {}).get("max_seq") or (step or {}).get("max_positions")
        self._highs = {t.name: t.high for t in self.signature.inputs if t.high is not None}
        config = ireert.Config(program.get("driver", "local-task"))
        self._context = ireert.SystemContext(config=config)
        self._context.add_vm_module(ireert.VmModule.mmap(self._context.instance, str(path / program["vmfb"])))
        module = self._context.modules[program.get("module", "module")]
        self._fn = module[program.get("function", "main")]
        self._step = module[step["function"]] if step else None
        self._weights: list[Any] = []  # constants of the module
        self._driver = self._driver_positions = None
        self._tensor = np.array  # a KVCache of host arrays
        self._plans: dict[tuple, _CallPlan] = {}
        self._output_names = [t.name for t in self.signature.outputs]
        self._empties: dict[tuple, Any] = {}
        self._staging: dict[str, tuple[np.ndarray, Any]] = {}

    def _staged(self, name: str, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a)

    def _empty_tensor(self, a: np.ndarray) -> np.ndarray:
        return a

    def _outputs(self, result: Any, plan: _CallPlan, prefill: bool = False) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, _host(result)))

    def step(self, inputs: Mapping[str, np.ndarray], cache: KVCache, last_only: bool = False) -> dict[str, np.ndarray]:
        """As LoadedArtifact.step: the cache's `length` positions go in, the new ones are copied
        back; `last_only` slices the outputs to the last position (the module has no prefill)."""
        plan, arrays = self._step_plan(inputs, cache)
        held, end = cache.length, cache.length + plan.seq
        past = [np.ascontiguousarray(t[:, :held]) for t in cache.tensors]
        results = _host(self._step(*self._inputs(plan, arrays), *past))
        outputs, present = results[:len(self._output_names)], results[len(self._output_names):]
        for buf, new in zip(cache.tensors, present):
            buf[:, held:end] = new[:, held:end]
        cache.length = end
        out = dict(zip(self._output_names, outputs))
        return self.signature.last_positions(out) if last_only else out


register_program_kind(PROGRAM_KIND, IreeArtifact)
