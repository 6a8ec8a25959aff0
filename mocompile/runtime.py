"""Run a compiled artifact without the compiler: numpy in, numpy out, no torch.

`load(path)` checks every file's checksum, loads the compiled library and the weights once,
and returns an object with `.signature` and `.run(inputs)`; every call's inputs are checked
at this boundary (runtime_inputs.py), since the compiled kernels trust them. This module
imports only numpy, safetensors and the TVM runtime; tvm-ffi opportunistically imports
torch when it is installed (a workaround for a Windows symbol clash), which would drag ~1 s
and a GB-sized dependency into every deployment, so that import is blocked while TVM loads.
"""

from __future__ import annotations

import importlib
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from mocompile.artifact import read_manifest
from mocompile.cpu_features import missing_cpu_features
from mocompile.errors import ArtifactError, ArtifactInputError
from mocompile.kv_cache import decode_steps
from mocompile.safetensors_io import MissingTensorError, read_arrays
from mocompile.signature import Signature, TensorSpec, random_inputs  # noqa: F401  (the runtime's API)
from mocompile.runtime_inputs import (DEFAULT_CACHE_POSITIONS, KVCache, as_arrays, bounded_ids, check_batch,
                                      check_ids, check_positions, positive_int, segments, token_ids)
from mocompile.threads import configure_tvm_threads
from mocompile.weight_arena import WeightArena


def import_tvm_without_torch() -> Any:
    """Import tvm; if torch is not loaded yet, keep tvm-ffi from loading it."""
    configure_tvm_threads()
    if "tvm" in sys.modules or "torch" in sys.modules:
        import tvm

        return tvm
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        import tvm
        import tvm.relax  # noqa: F401
    finally:
        del sys.modules["torch"]
    return tvm


ALIGNMENT = 64  # bytes: what TVM requires of tensor data it does not allocate itself
MAX_PLANS = 256  # call plans kept per artifact (one per set of input shapes seen)


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    """A copy of `a` whose data is ALIGNMENT-aligned."""
    buf = np.empty(a.nbytes + ALIGNMENT, dtype=np.uint8)
    start = -buf.ctypes.data % ALIGNMENT
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@dataclass
class _CallPlan:
    """How to pass one set of input shapes: per signature input its name and, for an empty
    one, the zero-size tensor passed instead of a copy; seq = the positions the call covers;
    bounded = the token inputs whose values every call checks (runtime_inputs.check_ids);
    copied = the outputs that alias an input and are copied (known after the first call);
    prefill_copied: the same for a `prefill` call's outputs; driver_outputs = the buffers a
    decode driver call writes (made at its first call)."""

    args: tuple[tuple[str, Any], ...]
    seq: int
    env: dict[str, int]  # the symbols the inputs bind
    bounded: tuple[tuple[str, int], ...] = ()
    copied: tuple[int, ...] | None = None
    prefill_copied: tuple[int, ...] | None = None  # the same for the outputs of `prefill`
    driver_outputs: list[tuple[np.ndarray, Any]] | None = None  # the decode driver's output tensors


class LoadedArtifact:
    """A loaded artifact: call `.run({name: array})` for a plain forward; artifacts of token
    models also decode incrementally: `cache = .new_cache(batch, capacity)`, then `.step(inputs,
    cache)` over the prompt (`last_only=True`: the last position's outputs only) and over each
    new token (or `.generate(ids, n)`). Every call refuses, with an ArtifactInputError (a
    ValueError), inputs the compiled code would silently get wrong: see runtime_inputs.py."""

    _prefill: Any = None  # the program's `prefill` function (None: last-only steps slice the step's outputs)

    def __init__(self, path: Path, manifest: dict[str, Any], driver: bool = True) -> None:
        self.path = path
        self.manifest = manifest
        self.signature = Signature.from_json(manifest["signature"])
        program = manifest["program"]
        # The longest sequence the model was built for (None: a traced module states none).
        self.max_seq: int | None = (manifest.get("model") or {}).get("max_seq") \
            or (program.get("step") or {}).get("max_positions")
        self._highs = {t.name: t.high for t in self.signature.inputs if t.high is not None}
        if program.get("kind") != "tvm-relax-vm":
            raise ArtifactError(f"{path}: program kind {program.get('kind')!r} cannot run on this host")
        target = manifest.get("target", {})
        missing = missing_cpu_features(target.get("features", ()))
        if missing:  # loading would crash the process at the first such instruction
            raise ArtifactError(f"{path}: built for {target.get('spec') or target.get('mcpu')}; this CPU lacks "
                                f"{', '.join(missing)} (recompile with --target cpu for this machine)")
        tvm = import_tvm_without_torch()
        lib = tvm.runtime.load_module(str(path / program["library"]))
        self._vm = tvm.relax.VirtualMachine(lib, tvm.cpu())
        self._fn = self._vm[program.get("function", "main")]
        step = program.get("step")
        decode = (step or {}).get("driver") if driver else None
        constants = decode["constants"] if decode else []
        # One tensor at a time, with plain reads (not through safe_open's memory map, whose pages
        # would count as resident memory beside the copies kept: twice a real-size artifact's
        # weights), straight into one block of huge pages (weight_arena) that TVM reads in place:
        # the weights are held once, as stored (low-bit stays low-bit); every name is looked up
        # in the header before any tensor is read.
        file = path / program["weights"]

        def arena(shapes: list) -> Callable[[tuple[int, ...], np.dtype], np.ndarray]:
            return WeightArena(WeightArena.size_of(shapes, ALIGNMENT), ALIGNMENT).take
        try:
            tensors = [tvm.runtime.from_dlpack(a)
                       for a in read_arrays(file, program["weight_order"] + constants, arena)]
        except MissingTensorError as e:
            raise ArtifactError(f"{file}: missing weight {e.name!r}") from None
        except MemoryError as e:
            raise ArtifactError(f"{file}: {e}") from None
        except (OSError, ValueError, KeyError, struct.error) as e:
            raise ArtifactError(f"{file}: unreadable weights ({e})") from None
        self._weights, self._constants = tensors[:len(program["weight_order"])], tensors[len(program["weight_order"]):]
        self._driver = self._driver_positions = None
        if decode:
            # The driver is a PrimFunc of the library the VM executable imports (driver.py).
            library = next((m for m in lib.imports if m.implements_function(decode["function"])), None)
            if library is None:
                raise ArtifactError(f"{path / program['library']}: no decode driver {decode['function']!r} in it")
            self._driver, self._driver_positions = library[decode["function"]], decode["positions"]
        self._tensor = tvm.runtime.tensor
        # tvm.runtime.ShapeTuple validates its items through abc isinstance checks (3-5 us, a
        # fortieth of a tiny model's decode step); the registered constructor takes ints as is.
        self._shape = tvm.get_global_func("ffi.Shape")
        self._from_dlpack = tvm.runtime.from_dlpack
        self._plans: dict[tuple, _CallPlan] = {}
        self._output_names = [t.name for t in self.signature.outputs]
        self._empties: dict[tuple, Any] = {}
        self._staging: dict[str, tuple[np.ndarray, Any]] = {}  # input name -> (buffer, its TVM tensor)
        self._step = self._vm[step["function"]] if step else None
        self._prefill = self._vm[program["prefill"]["function"]] if step and program.get("prefill") else None
        layers = program.get("layers")
        self._layers = self._vm[layers["function"]] if layers else None

    def _plan(self, arrays: Mapping[str, np.ndarray], batch: int | None) -> "_CallPlan":
        """The plan of calls with these input names, shapes and dtypes: validated once (a
        decode loop repeats one set; checking every call would cost a fifth of a small model's
        step). `batch` set (a `step`): inputs left out are empty segments of that batch."""
        key = (batch, *[(k, a.shape, a.dtype.str) for k, a in arrays.items()])
        plan = self._plans.get(key)
        if plan is None:
            full = dict(arrays)
            check_batch(arrays)
            if batch is not None:
                first = next(iter(arrays.values()), None)
                given = first.shape[0] if first is not None and first.ndim else batch
                if given != batch:
                    raise ArtifactInputError(f"the cache holds {batch} sequences, the inputs {given}")
                for t in self.signature.inputs:
                    if t.name not in full:
                        full[t.name] = np.zeros([batch if d == "batch" else d if isinstance(d, int) else 0
                                                 for d in t.shape], t.dtype)
            env = self.signature.check(full)
            args = tuple((t.name, self._empty_tensor(full[t.name]) if full[t.name].size == 0 else None)
                         for t in self.signature.inputs)
            seq = sum(segments(full).values())
            if batch is not None and seq == 0:
                raise ArtifactInputError("a step needs at least one position")
            if batch is None:  # a step's bound depends on the cache too (`step`)
                check_positions(segments(full), self.max_seq)
            if len(self._plans) >= MAX_PLANS:  # a server seeing ever new prompt lengths
                self._plans.clear()
            plan = self._plans[key] = _CallPlan(args, seq, env, bounded_ids(full, self._highs))
        return plan

    def _inputs(self, plan: "_CallPlan", arrays: Mapping[str, np.ndarray]) -> list[Any]:
        """The plan's inputs as TVM tensors: each given input's values copied into its staging buffer."""
        return [self._staged(name, arrays[name]) if empty is None else empty for name, empty in plan.args]

    def _staged(self, name: str, a: np.ndarray) -> Any:
        """The TVM tensor of input `name` holding `a`'s values: a 64-byte aligned numpy buffer
        shared with TVM through DLPack, made when the input's shape or dtype changes and
        refilled on every other call. Wrapping a new array for every call costs 10-15 us,
        a tenth of a tiny model's decode step; a decode loop repeats one shape."""
        slot = self._staging.get(name)
        if slot is None or slot[0].shape != a.shape or slot[0].dtype != a.dtype:
            buf = _aligned_copy(a)
            slot = self._staging[name] = (buf, self._from_dlpack(buf))
        else:
            np.copyto(slot[0], a)
        return slot[1]

    def _empty_tensor(self, a: np.ndarray) -> Any:
        """A zero-size TVM tensor of `a`'s shape and dtype (an empty segment of a multimodal
        decode step). numpy gives zero-size arrays strides TVM refuses, so these are TVM's own;
        they hold nothing, so one per shape serves every call (making one costs more than a
        tiny model's whole step)."""
        key = (a.shape, a.dtype.str)
        if key not in self._empties:
            self._empties[key] = self._tensor(a)
        return self._empties[key]

    def _outputs(self, result: Any, plan: "_CallPlan", prefill: bool = False) -> dict[str, np.ndarray]:
        names = self._output_names
        arrays = [np.from_dlpack(result)] if len(names) == 1 else [np.from_dlpack(o) for o in result]
        field = "prefill_copied" if prefill else "copied"
        if getattr(plan, field) is None:
            # An output that is a view of an input (a graph returning its input reshaped) would
            # change with the next call's inputs: it gets its own memory. Whether one is, is a
            # property of the function, so the first call of a plan finds out for all.
            staged = [self._staging[name][0] for name, empty in plan.args if empty is None]
            setattr(plan, field, tuple(i for i, v in enumerate(arrays)
                                       if any(np.may_share_memory(v, b) for b in staged)))
        for i in getattr(plan, field):
            arrays[i] = arrays[i].copy()
        return dict(zip(names, arrays))

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward over every position of `inputs` ({name: array}, dtypes exactly the
        signature's); refuses empty batches and sequences, more positions than the model's
        max_seq, and token ids outside the vocabulary."""
        arrays = as_arrays(inputs)
        plan = self._plan(arrays, None)
        check_ids(plan.bounded, arrays)
        return self._outputs(self._fn(*self._inputs(plan, arrays), *self._weights), plan)

    def run_layers(self, inputs: Mapping[str, np.ndarray], copy: bool = True) -> dict[str, np.ndarray]:
        """Each layer's output (the residual stream leaving it) for a forward over `inputs`,
        by the IR value names the manifest's program lists under "layers"; an artifact
        compiled to be verified layer by layer (a streamed compile) has this function.
        `copy=False` returns the VM's own arrays, for a caller that reads them before the
        next call and keeps none (a real-size model's states are a copy of its activations)."""
        if self._layers is None:
            raise ArtifactError(f"{self.path}: this artifact has no per-layer states (compiled without --stream)")
        arrays = as_arrays(inputs)
        plan = self._plan(arrays, None)
        check_ids(plan.bounded, arrays)
        names = self.manifest["program"]["layers"]["outputs"]
        result = self._layers(*self._inputs(plan, arrays), *self._weights)
        outs = [result] if len(names) == 1 else list(result)
        arrays = {name: np.from_dlpack(o) for name, o in zip(names, outs)}
        return {name: a.copy() for name, a in arrays.items()} if copy else arrays

    # ---- incremental decoding ------------------------------------------------------------
    @property
    def can_decode(self) -> bool:
        return self._step is not None

    @property
    def has_driver(self) -> bool:
        """Whether single-position steps run through the decode driver (no Relax VM)."""
        return self._driver is not None

    def _require_step(self) -> dict[str, Any]:
        if self._step is None:
            why = self.manifest["program"].get("no_step_reason") or "it was compiled without one"
            raise ArtifactError(f"{self.path}: this artifact has no cached step function ({why})")
        return self.manifest["program"]["step"]

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `capacity` positions, allocated
        up front (`cache.nbytes`, `cache.describe()`). Size it to the prompt plus the tokens to
        generate: the default is DEFAULT_CACHE_POSITIONS (2048) or max_seq if smaller, not
        max_seq itself, which is 131072 for many imported checkpoints (gigabytes per sequence
        of a large model). Refuses a capacity past max_seq and a cache larger than the memory
        available."""
        step = self._require_step()
        batch = positive_int(batch, "new_cache: batch")
        if capacity is None:
            capacity = min(DEFAULT_CACHE_POSITIONS, self.max_seq or DEFAULT_CACHE_POSITIONS)
        capacity = positive_int(capacity, "new_cache: capacity")
        if self.max_seq is not None and capacity > self.max_seq:
            raise ArtifactInputError(f"new_cache: capacity {capacity} is past the model's max_seq of {self.max_seq}")
        return KVCache(step["cache"], batch, capacity, step["block"], self._tensor)

    @property
    def token_input(self) -> TensorSpec:
        """The input decoding feeds the chosen tokens back into (ids [batch, seq])."""
        return next(t for t in self.signature.inputs if len(t.shape) == 2 and t.dtype.startswith("int"))

    @property
    def has_prefill(self) -> bool:
        """Whether last-only steps run the program's `prefill` (else they slice the step's outputs)."""
        return self._prefill is not None

    def step(self, inputs: Mapping[str, np.ndarray], cache: KVCache,
             last_only: bool = False) -> dict[str, np.ndarray]:
        """Forward over the next positions of every sequence in `cache` (the whole prompt
        first, then one token at a time), appending their keys and values to it. A multimodal
        model's segments left out are empty this step: `step({"text": ids}, cache)` after an
        image/audio prompt continues with text.

        `last_only`: the outputs with a positions axis come back at the last position only
        ([batch, 1, ...]; a multimodal call's last is the last of its segments joined), what
        a prompt needs for the next token. The program's `prefill` computes just that (the
        final norm and LM head on one row, not every position's) and fills the cache as the
        step does; a program without one (an older artifact) runs the step and slices. A flag,
        not a method of its own, so that the checks, the cache bookkeeping and the dispatch to
        the decode driver of single positions (already the last) stay one path."""
        plan, arrays = self._step_plan(inputs, cache)
        if self._driver is not None and plan.seq == self._driver_positions:
            out = self._drive(plan, arrays, cache)
            return self.signature.last_positions(out) if last_only else out
        prefill = last_only and plan.seq > 1 and self._prefill is not None
        fn = self._prefill if prefill else self._step
        result = fn(*self._inputs(plan, arrays), self._shape(cache.length), *cache.tensors, *self._weights)
        cache.length += plan.seq
        out = self._outputs(result, plan, prefill)
        return self.signature.last_positions(out) if last_only and not prefill else out

    def _step_plan(self, inputs: Mapping[str, np.ndarray], cache: KVCache) -> tuple[_CallPlan, dict[str, np.ndarray]]:
        """The plan of a step over `inputs` and the inputs as arrays, after refusing a step
        the cache or the model's max_seq has no room for and token ids out of range."""
        if self._step is None:
            self._require_step()
        arrays = as_arrays(inputs)
        plan = self._plan(arrays, cache.batch)
        end = cache.length + plan.seq
        if end > cache.capacity:
            raise ArtifactInputError(f"the cache holds {cache.length} of {cache.capacity} positions; "
                                     f"{plan.seq} more do not fit")
        if self.max_seq is not None and end > self.max_seq:
            raise ArtifactInputError(f"the cache holds {cache.length} positions; {plan.seq} more would pass the "
                                     f"model's max_seq of {self.max_seq}")
        check_ids(plan.bounded, arrays)
        return plan, arrays

    def _drive(self, plan: _CallPlan, arrays: Mapping[str, np.ndarray], cache: KVCache) -> dict[str, np.ndarray]:
        """A step through the decode driver (the step's kernel calls without the VM, same
        results bit for bit): it writes into output buffers kept per plan, copied out so that
        results never change under the caller."""
        if plan.driver_outputs is None:
            plan.driver_outputs = []
            for t in self.signature.outputs:
                buf = _aligned_copy(np.zeros(t.type.concrete(plan.env), t.dtype))
                plan.driver_outputs.append((buf, self._from_dlpack(buf)))
        outs = plan.driver_outputs
        self._driver(*self._inputs(plan, arrays), cache.length, *cache.tensors, *self._weights, *self._constants,
                     *[t for _, t in outs])
        cache.length += plan.seq
        return {name: buf.copy() for name, (buf, _) in zip(self._output_names, outs)}

    def run_cached(self, inputs: Mapping[str, np.ndarray], prompt: int) -> dict[str, np.ndarray]:
        """`inputs` through a fresh KV cache (kv_cache.decode_steps: every segment with the first
        `prompt` tokens, then one token per step); the outputs concatenated along the sequence in
        that order (for a token model: what `run(inputs)` computes)."""
        inputs = as_arrays(inputs)
        self.signature.check(inputs)
        check_batch(inputs)
        check_positions(segments(inputs), self.max_seq)
        steps = decode_steps(inputs, self.token_input.name, prompt)
        cache = self.new_cache(next(iter(inputs.values())).shape[0], sum(segments(inputs).values()))
        outs = [self.step(x, cache) for x in steps]
        return {k: np.concatenate([out[k] for out in outs], axis=1) for k in outs[0]}

    def generate(self, prompt: np.ndarray | Mapping[str, np.ndarray], new_tokens: int,
                 capacity: int | None = None, timings: list[float] | None = None,
                 cache: KVCache | None = None) -> np.ndarray:
        """Greedy decoding: the prompt (token ids [batch, prompt], or every segment of a
        multimodal model by name) once, then single-token steps each fed the previous argmax,
        until `new_tokens` are chosen; returns the new ids [batch, new_tokens]. The cache is a
        fresh one of `capacity` positions (default: just enough) unless `cache` is given;
        `timings`, if given, receives the seconds of each step call (the prefill first: a
        last-only step, see `step`).
        Refuses up front a prompt and new tokens past the model's max_seq or the cache."""
        self._require_step()
        spec = self.token_input
        inputs = as_arrays(prompt, "the prompt") if isinstance(prompt, Mapping) else \
            {spec.name: token_ids(spec.name, prompt, spec.dtype, spec.high)}
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, (int, np.integer)) or new_tokens < 0:
            raise ArtifactInputError(f"generate: new_tokens must be a non-negative integer (got {new_tokens!r})")
        first = next(iter(inputs.values()), None)
        batch = cache.batch if cache is not None else first.shape[0] if first is not None and first.ndim else 1
        positions = self._plan(inputs, batch).seq  # validates the prompt; the prefill step reuses the plan
        held = cache.length if cache is not None else 0
        if self.max_seq is not None and held + positions + new_tokens > self.max_seq:
            cached = f"{held} cached positions, " if held else ""
            raise ArtifactInputError(f"generate: {cached}the prompt's {positions} positions and {new_tokens} new "
                                     f"tokens make {held + positions + new_tokens}, past the model's max_seq of "
                                     f"{self.max_seq}")
        if cache is None:
            cache = self.new_cache(batch, positions + new_tokens if capacity is None else capacity)
        fed = positions + max(new_tokens - 1, 0)  # the last token chosen is not fed back
        if cache.length + fed > cache.capacity:
            raise ArtifactInputError(f"generate: the cache has room for {cache.capacity - cache.length} more "
                                     f"positions; the prompt's {positions} and {new_tokens} new tokens need {fed}")
        output = self.signature.outputs[0].name

        def timed_step(x: Mapping[str, np.ndarray], last_only: bool = False) -> np.ndarray:
            t0 = time.perf_counter()
            logits = self.step(x, cache, last_only)[output]
            if timings is not None:
                timings.append(time.perf_counter() - t0)
            return logits

        logits = timed_step(inputs, last_only=True)
        out = []
        for i in range(new_tokens):
            token = logits[:, -1].argmax(-1).astype(spec.dtype)[:, None]
            out.append(token)
            if i + 1 < new_tokens:
                logits = timed_step({spec.name: token})
        return np.concatenate(out, axis=1) if out else np.zeros((batch, 0), spec.dtype)

    def time_run(self, inputs: Mapping[str, np.ndarray], repeat: int = 10) -> float:
        """Median seconds per call (after one warm-up call)."""
        return median_seconds(self.run, inputs, repeat)


def median_seconds(run: Callable[[Mapping[str, np.ndarray]], Any], inputs: Mapping[str, np.ndarray],
                   repeat: int) -> float:
    """Median seconds of `repeat` calls of run(inputs), after one warm-up call (any program kind's time_run)."""
    run(inputs)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# program kind (the manifest's program.kind) -> what opens an artifact of that kind:
# loader(path, manifest, **options) -> an object with .signature and .run (and, where the
# program decodes, .new_cache / .step / .run_cached / .generate). A loader ignores options it
# does not know. Backends whose artifacts run through other runtimes register theirs.
ProgramLoader = Callable[..., Any]
# A module path stands for a loader its import registers (the GPU runtime loads pyopencl or
# the CUDA driver, the fpga one its C simulation, the mlir one IREE's runtime, only for
# artifacts that need them).
_LOADERS: dict[str, ProgramLoader | str] = {"tvm-relax-vm": LoadedArtifact, "iree-vmfb": "mocompile.runtime_iree",
                                            "gpu-launch-plan": "mocompile.runtime_gpu",
                                            "hls-csim": "mocompile.hls_runtime"}


def register_program_kind(kind: str, loader: ProgramLoader) -> None:
    """Make artifacts whose manifest says `program.kind == kind` loadable by `load`."""
    if not isinstance(_LOADERS.get(kind, loader), str) and _LOADERS.get(kind, loader) is not loader:
        raise ValueError(f"program kind {kind!r} registered twice")
    _LOADERS[kind] = loader


def open_artifact(path: Path, manifest: dict[str, Any], **options: Any) -> Any:
    """The loaded program of an artifact whose manifest is already read (and checked)."""
    kind = manifest.get("program", {}).get("kind")
    loader = _LOADERS.get(kind)
    if isinstance(loader, str):
        importlib.import_module(loader)  # registers the loader under its kind
        loader = _LOADERS[kind]
    if loader is None:
        raise ArtifactError(f"{path}: program kind {kind!r} has no loader here (this runtime loads: "
                            f"{', '.join(sorted(_LOADERS))})")
    return loader(path, manifest, **options)


def load(path: str | Path, driver: bool = True) -> Any:
    """Load an artifact directory after verifying the checksum of every file in it, with the
    loader of its program kind (a TVM Relax VM artifact: LoadedArtifact). `driver=False`: run
    every step through the VM's `step`, never the decode driver (to compare the two)."""
    path = Path(path)
    manifest = read_manifest(path)
    return open_artifact(path, manifest, driver=driver)
