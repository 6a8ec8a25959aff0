"""Measured decode latency of a graph on this machine, for passes that choose by it (the
elastic pass's `metric=latency`): the graph is compiled by the compile's own backend into a
scratch directory, loaded through the runtime, and a single-token step after `past` cached
positions is timed (median of several calls; a graph without a KV-cached step times a
one-position forward instead). Passes cannot import a backend, so the compiler hands them
this probe through `PassContext.options["decode_latency"]`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping

from mocompile.backends.base import Backend
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.runtime import open_artifact
from mocompile.signature import random_inputs, signature_of

PROBE = "decode_latency"  # PassContext.options key of the probe


def _median_seconds(fn: Callable[[], object], calls: int) -> float:
    fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def decode_step_seconds(backend: Backend, graph: Graph, int_high: Mapping[str, int], past: int = 16,
                        calls: int = 30) -> float:
    """Median seconds of one single-token step of `graph` compiled by `backend`."""
    with tempfile.TemporaryDirectory(prefix="mocompile-latency-") as scratch:
        program = backend.emit(graph, Path(scratch), tuning=None)
        target = {"name": backend.name, "text": backend.target_text, **program.pop("target_info", {})}
        signature = signature_of(graph, dict(int_high))
        manifest = {"model": graph.meta, "target": target, "signature": signature.to_json(), "program": program}
        why_not = backend.cannot_run_here(manifest)
        if why_not is not None:
            raise MocompileError(f"cannot measure decode latency for {backend.target_text} here: {why_not}")
        art = open_artifact(Path(scratch), manifest)
        if getattr(art, "can_decode", False):
            ids = random_inputs(art.signature, 1, past + 1, seed=0)
            name = next(iter(ids))
            cache = art.new_cache(1, past + 1)
            art.step({name: ids[name][:, :past]}, cache, last_only=True)  # the prompt, as `generate` fills it
            token = {name: ids[name][:, past:]}

            def step() -> object:
                cache.length = past
                return art.step(token, cache)

            return _median_seconds(step, calls)
        inputs = random_inputs(art.signature, 1, 1, seed=0)
        return _median_seconds(lambda: art.run(inputs), calls)


def latency_probe(backend: Backend, int_high: Mapping[str, int]) -> Callable[[Graph], float]:
    """The probe a compile hands its passes: graph -> measured seconds per decode step."""
    return lambda graph: decode_step_seconds(backend, graph, int_high)
