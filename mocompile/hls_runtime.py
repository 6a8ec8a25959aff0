"""Running an fpga artifact here: its C simulation (a g++-built shared library of the HLS
project, called through ctypes) with the runtime's API (`run`, `new_cache` / `step`,
`run_cached`, `generate`) and the same input and output names as a CPU artifact.

The design computes one position of one sequence at a time through its KV caches, as the
FPGA does; `run` feeds each sequence's positions through a fresh cache. Cache contents are
the fixed-point codes the design stores (int16), kept here per sequence. Nothing here imports
the compiler or torch.
"""

from __future__ import annotations

import ctypes
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mocompile.errors import ArtifactError, ArtifactInputError
from mocompile.kv_cache import decode_steps
from mocompile.runtime_inputs import as_arrays, bounded_ids, check_batch, check_ids, check_positions, positive_int, \
    segments, token_ids
from mocompile.signature import Signature, TensorSpec

PROGRAM_KIND = "hls-csim"


class HlsCache:
    """KV caches of `batch` sequences: per sequence, per cache array, the codes [capacity * width]."""

    def __init__(self, entries: list[dict[str, Any]], batch: int, capacity: int, positions: int) -> None:
        self.batch, self.capacity, self.length = batch, capacity, 0
        self.arrays = [[np.zeros(positions * e["width"], np.int16) for e in entries] for _ in range(batch)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for row in self.arrays for a in row)

    def describe(self) -> str:
        return f"{self.batch} sequence(s) x {self.capacity} positions, {self.nbytes:,} bytes of fixed-point codes"


class HlsCsimArtifact:
    """An fpga artifact loaded for C simulation."""

    def __init__(self, path: Path, manifest: dict[str, Any], **options: Any) -> None:
        self.path, self.manifest = path, manifest
        self.signature = Signature.from_json(manifest["signature"])
        program = manifest["program"]
        self.max_seq: int = program["capacity"]
        self._caches = program["caches"]
        library = path / program["library"]
        if not library.is_file():
            raise ArtifactError(f"{library}: the C simulation library is missing (rebuild: sh "
                                f"{path / 'hls' / 'build_csim.sh'})")
        try:
            self._lib = _private_copy(library)
        except OSError as e:
            raise ArtifactError(f"{library}: cannot load the C simulation ({e}); rebuild it with sh "
                                f"{path / 'hls' / 'build_csim.sh'}") from None
        self._lib.mc_run.restype = ctypes.c_int
        self._blob = np.fromfile(path / program["weights"], dtype=np.uint8)
        self._lib.mc_load_weights(self._blob.ctypes.data_as(ctypes.c_void_p))
        self._highs = {t.name: t.high for t in self.signature.inputs if t.high is not None}
        self._outputs = [t for t in self.signature.outputs]

    # ---- the C simulation ----------------------------------------------------------------
    def _call(self, sample: list[np.ndarray], start: int, caches: list[np.ndarray]) -> list[np.ndarray]:
        counts = (ctypes.c_int * len(sample))(*[a.shape[0] if a.ndim else 0 for a in sample])
        count = sum(counts)
        ins = (ctypes.c_void_p * len(sample))(*[a.ctypes.data for a in sample])
        outs = [np.zeros((count, t.shape[-1]), np.float32) for t in self._outputs]
        cache_ptrs = (ctypes.c_void_p * max(len(caches), 1))(*[c.ctypes.data for c in caches])
        out_ptrs = (ctypes.c_void_p * len(outs))(*[o.ctypes.data for o in outs])
        if self._lib.mc_run(start, counts, ins, cache_ptrs, out_ptrs) != 0:
            raise ArtifactError(f"{self.path}: the C simulation failed")
        return outs

    def _sample(self, arrays: Mapping[str, np.ndarray], b: int) -> list[np.ndarray]:
        out = []
        for t in self.signature.inputs:
            a = arrays[t.name][b]
            out.append(np.ascontiguousarray(a, np.int64 if t.dtype.startswith("int") else np.float32))
        return out

    def _forward(self, arrays: Mapping[str, np.ndarray], caches: list[list[np.ndarray]], start: int) -> dict[str, np.ndarray]:
        per_sample = [self._call(self._sample(arrays, b), start, caches[b]) for b in range(len(caches))]
        return {t.name: np.stack([s[i] for s in per_sample]) for i, t in enumerate(self._outputs)}

    def _check(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = as_arrays(inputs)
        self.signature.check(arrays)
        check_batch(arrays)
        check_ids(bounded_ids(arrays, self._highs), arrays)
        return arrays

    # ---- the runtime's API ---------------------------------------------------------------
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every position of every sequence, each sequence through a fresh cache."""
        arrays = self._check(inputs)
        check_positions(segments(arrays), self.max_seq)
        batch = next(iter(arrays.values())).shape[0]
        return self._forward(arrays, self.new_cache(batch).arrays, 0)

    @property
    def can_decode(self) -> bool:
        return len(self.signature.inputs) == 1

    @property
    def token_input(self) -> TensorSpec:
        return next(t for t in self.signature.inputs if len(t.shape) == 2 and t.dtype.startswith("int"))

    def new_cache(self, batch: int, capacity: int | None = None) -> HlsCache:
        batch = positive_int(batch, "new_cache: batch")
        capacity = positive_int(capacity if capacity is not None else self.max_seq, "new_cache: capacity")
        if capacity > self.max_seq:
            raise ArtifactInputError(f"new_cache: capacity {capacity} is past the design's cache of {self.max_seq} "
                                     "positions")
        return HlsCache(self._caches, batch, capacity, self.max_seq)

    def step(self, inputs: Mapping[str, np.ndarray], cache: HlsCache, last_only: bool = False) -> dict[str, np.ndarray]:
        """The next positions of every sequence in `cache`, appended to it; `last_only`: the
        outputs at the last position only (sliced: the design computes every position)."""
        arrays = self._check(inputs)
        n = sum(segments(arrays).values())
        if next(iter(arrays.values())).shape[0] != cache.batch:
            raise ArtifactInputError(f"the cache holds {cache.batch} sequences, the inputs "
                                     f"{next(iter(arrays.values())).shape[0]}")
        if cache.length + n > cache.capacity:
            raise ArtifactInputError(f"the cache holds {cache.length} of {cache.capacity} positions; {n} more do "
                                     "not fit")
        out = self._forward(arrays, cache.arrays, cache.length)
        cache.length += n
        return self.signature.last_positions(out) if last_only else out

    def run_cached(self, inputs: Mapping[str, np.ndarray], prompt: int) -> dict[str, np.ndarray]:
        arrays = self._check(inputs)
        steps = decode_steps(arrays, self.token_input.name, prompt)
        cache = self.new_cache(next(iter(arrays.values())).shape[0], sum(segments(arrays).values()))
        outs = [self.step(x, cache) for x in steps]
        return {k: np.concatenate([o[k] for o in outs], axis=1) for k in outs[0]}

    def generate(self, prompt: np.ndarray | Mapping[str, np.ndarray], new_tokens: int, capacity: int | None = None,
                 timings: list[float] | None = None, cache: HlsCache | None = None) -> np.ndarray:
        """Greedy decoding through the C simulation, one position at a time after the prompt."""
        spec = self.token_input
        inputs = as_arrays(prompt) if isinstance(prompt, Mapping) else \
            {spec.name: token_ids(spec.name, prompt, spec.dtype, spec.high)}
        batch, positions = inputs[spec.name].shape
        if cache is None:
            cache = self.new_cache(batch, capacity or min(self.max_seq, positions + new_tokens))
        out, x = [], inputs
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            logits = self.step(x, cache)[self._outputs[0].name]
            if timings is not None:
                timings.append(time.perf_counter() - t0)
            token = logits[:, -1].argmax(-1).astype(spec.dtype)[:, None]
            out.append(token)
            x = {spec.name: token}
        return np.concatenate(out, axis=1) if out else np.zeros((batch, 0), spec.dtype)

    def time_run(self, inputs: Mapping[str, np.ndarray], repeat: int = 10) -> float:
        """Median seconds per call of the C simulation (after one warm-up call)."""
        from mocompile.runtime import median_seconds

        return median_seconds(self.run, inputs, repeat)


def _private_copy(library: Path) -> ctypes.CDLL:
    """The library loaded from a private copy: the dynamic loader hands out one instance per
    file, and each loaded artifact needs its own weights and caches (the same artifact loaded
    twice, or a library rebuilt at the same path)."""
    with tempfile.TemporaryDirectory(prefix="mocompile-csim-") as tmp:
        copy = Path(tmp) / library.name
        shutil.copyfile(library, copy)
        return ctypes.CDLL(str(copy))  # stays loaded after the file is gone


def _register() -> None:
    from mocompile.runtime import register_program_kind

    register_program_kind(PROGRAM_KIND, HlsCsimArtifact)


_register()
