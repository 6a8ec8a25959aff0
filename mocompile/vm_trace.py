"""Watching a loaded artifact's Relax VM call by call, without the compiler: where the time of
a prefill or a decode step goes kernel by kernel, how it compares with what this machine's
memory and arithmetic allow (the roofline), and which experts each token's router chose.

All of it goes through the VM's instrumentation hook, called before and after every call
instruction with the callee's name and arguments (TVM tensors, outputs included, since kernels
write into buffers passed to them). The hook runs Python around every call, so its own cost
(the median time of `vm.builtin.null_value`, which does nothing) is subtracted from each
kernel's time. A VM stays instrumented once hooked: trace an artifact loaded for the purpose
(`runtime.load(path, driver=False)`, so that single-token steps go through the VM too).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mocompile.errors import ArtifactError

Call = Callable[[str, Sequence[Any]], None]  # (callee name, its arguments)
BUILTIN = "vm.builtin."
NO_OP = 0  # relax.VMInstrumentReturnKind.NO_OP


def instrument(art: Any, before: Call | None = None, after: Call | None = None) -> None:
    """Hook `before`/`after` into every call instruction of `art`'s VM (a LoadedArtifact)."""
    vm = getattr(art, "_vm", None)
    if vm is None:
        raise ArtifactError(f"{getattr(art, 'path', art)}: its program has no Relax VM to trace")

    def hook(func: Any, name: str, is_before: bool, ret: Any, *args: Any) -> int:
        fn = before if is_before else after
        if fn is not None:
            fn(str(name), args)
        return NO_OP

    vm.set_instrument(hook)


def _nbytes(a: Any) -> int:
    shape, dtype = getattr(a, "shape", None), getattr(a, "dtype", None)
    if shape is None or dtype is None:
        return 0  # a scalar or shape argument
    return int(np.prod(tuple(shape), dtype=np.int64)) * np.dtype(str(dtype)).itemsize


def tensor_bytes(args: Sequence[Any], expert_reads: Mapping[str, Any] | None = None) -> int:
    """Bytes a kernel call must read or write at least once (its compulsory memory traffic):
    every tensor argument once, except that the per-expert weights of a kernel listed in the
    manifest's `program.expert_reads` count only for the experts its offsets give rows to."""
    if not expert_reads:
        return sum(_nbytes(a) for a in args)
    offsets = np.from_dlpack(args[expert_reads["offsets_arg"]])
    active = int(np.count_nonzero(np.diff(offsets.astype(np.int64)) > 0))
    weights = set(expert_reads["weight_args"])
    return sum(_nbytes(a) * active // expert_reads["experts"] if i in weights else _nbytes(a)
               for i, a in enumerate(args))


def matmul_flops(args: Sequence[Any], per_row: int | None) -> int:
    """Flops of a matmul kernel call: `per_row` (the manifest's `program.kernel_flops`) times
    the rows of its output, the last argument; 0 for a kernel without a count."""
    out = next((a for a in reversed(args) if getattr(a, "shape", None) is not None), None)
    if not per_row or out is None:
        return 0
    return per_row * int(np.prod(tuple(out.shape)[:-1], dtype=np.int64))


@dataclass
class KernelTime:
    """One kernel (or VM builtin) of a profiled call: microseconds and calls per call of the
    profiled function, and per call the bytes its arguments hold and, for a matmul, its flops.
    Its roofline floor is the longer of moving those bytes at the machine's bandwidth and doing
    those flops at its peak rate."""

    name: str
    us: float
    calls: int
    bytes: int
    flops: int = 0

    @property
    def builtin(self) -> bool:
        return self.name.startswith(BUILTIN)

    def roofline_us(self, bandwidth: float, peak: float) -> float:
        return 1e6 * max(self.bytes / bandwidth, self.flops / peak)

    def bound(self, bandwidth: float, peak: float) -> str:
        """Which roof the floor comes from: "memory" or "compute"."""
        return "compute" if self.flops / peak > self.bytes / bandwidth else "memory"

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.name, "us": round(self.us, 3), "calls": self.calls, "bytes": self.bytes,
                "flops": self.flops}


def kernel_profile(art: Any, call: Callable[[], object], repeat: int = 20) -> list[KernelTime]:
    """Time of every kernel and builtin per `call()` (once to warm up, then `repeat` times),
    sorted by time; `art` gets instrumented for good."""
    program = art.manifest.get("program", {})
    reads, per_row = program.get("expert_reads", {}), program.get("kernel_flops", {})
    spent: dict[str, list[float]] = {}
    moved: dict[str, int] = {}
    flops: dict[str, int] = {}
    start: dict[str, float] = {}

    def before(name: str, args: Sequence[Any]) -> None:
        start[name] = time.perf_counter()

    def after(name: str, args: Sequence[Any]) -> None:
        spent.setdefault(name, []).append(time.perf_counter() - start[name])
        if not name.startswith(BUILTIN):
            moved[name] = moved.get(name, 0) + tensor_bytes(args, reads.get(name))
            flops[name] = flops.get(name, 0) + matmul_flops(args, per_row.get(name))

    instrument(art, before, after)
    call()
    spent.clear()
    moved.clear()
    flops.clear()
    for _ in range(repeat):
        call()
    hook_s = float(np.median(spent.get(BUILTIN + "null_value", [0.0])))
    rows = [KernelTime(name, max(0.0, 1e6 * (sum(t) - hook_s * len(t)) / repeat), len(t) // repeat,
                       moved.get(name, 0) // repeat, flops.get(name, 0) // repeat) for name, t in spent.items()]
    return sorted(rows, key=lambda r: -r.us)


def expert_load(art: Any, inputs: Sequence[Mapping[str, np.ndarray]]) -> tuple[list[str], np.ndarray]:
    """How many tokens each router sent to each expert over `inputs` (each run through `main`):
    (the routers' places, counts [routers, experts]), read from the router kernels' outputs as
    the manifest's `program.routing` lists them; ([], empty) for a model without routers.
    Raises ArtifactError for an artifact whose manifest predates that entry."""
    routing = art.manifest.get("program", {}).get("routing")
    if routing is None:
        raise ArtifactError(f"{art.path}: its manifest has no `program.routing` (compiled by an older "
                            "mocompile); recompile it to see its expert load")
    if not routing:
        return [], np.zeros((0, 0), np.int64)
    kernels = {r["kernel"] for r in routing}
    seen: list[np.ndarray] = []

    def after(name: str, args: Sequence[Any]) -> None:
        if name in kernels:
            seen.append(np.from_dlpack(args[routing[len(seen) % len(routing)]["indices_arg"]]).copy())

    instrument(art, None, after)
    chosen: list[list[np.ndarray]] = [[] for _ in routing]
    for sample in inputs:
        seen.clear()
        art.run(sample)
        if len(seen) != len(routing):
            raise ArtifactError(f"{art.path}: expected {len(routing)} router calls per forward, saw {len(seen)}")
        for i, ids in enumerate(seen):
            chosen[i].append(ids.reshape(-1))
    experts = 1 + max(int(np.concatenate(c).max(initial=0)) for c in chosen)
    counts = np.stack([np.bincount(np.concatenate(c), minlength=experts) for c in chosen])
    return [r["router"] for r in routing], counts


def memory_bandwidth(megabytes: int = 64, repeat: int = 10) -> float:
    """Bytes per second this machine's memory moves in a large copy (read + write, best of
    `repeat`): the slope of the memory roofline. The buffer outgrows common last-level caches."""
    a = np.ones(megabytes * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    best = min(_seconds(lambda: np.copyto(b, a)) for _ in range(repeat))
    return 2 * a.nbytes / best


def peak_flops(budget_s: float = 0.3) -> float:
    """Float32 flops per second (a multiply-add counts 2) this process reaches in matrix
    products: the flat part of the roofline. The larger of numpy's 256 x 256 product (which its
    BLAS may spread over threads) and its 60 x 60 one (one thread: OpenBLAS splits only
    products of 64^3 multiply-adds and more) times the CPUs this process may use; a BLAS
    whose threads wait on a busy machine's scheduler would otherwise make the roof far too low."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(_matmul_rate(256, budget_s), cpus * _matmul_rate(60, budget_s))


def _matmul_rate(n: int, budget_s: float, repeat: int = 2000) -> float:
    """Flops per second of the best of up to `repeat` n x n products within `budget_s`: each
    takes well under a millisecond, so on a busy machine some of them run undisturbed."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    a @ b
    best, start = float("inf"), time.perf_counter()
    for _ in range(repeat):
        best = min(best, _seconds(lambda: a @ b))
        if time.perf_counter() - start > budget_s:
            break
    return 2 * n ** 3 / best


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
