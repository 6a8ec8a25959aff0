"""One thread count for every engine a benchmark times, set explicitly and read back.

Each engine keeps its own thread pool and sizes it itself unless told: torch its intra-op
pool; torch.compile's generated C++ kernels a count fixed when they are generated (the aten
calls between them use torch's pool); ONNX Runtime an intra-op and an inter-op pool per
session; TVM one pool, sized from TVM_NUM_THREADS when it first starts (mocompile/threads.py
sets that variable to every CPU the process may use unless it is already set). A column
with more threads than another would win by that alone, so `set_threads` gives all of them
one count before anything starts a pool, and each engine's count is read back from the
engine itself for the header. An engine that reports another count stops the run.
"""

from __future__ import annotations

import os


class Threads:
    """The requested count and, per column, what its engine reported."""

    def __init__(self) -> None:
        self.requested = 0
        self.seen: dict[str, dict[str, int]] = {}

    def record(self, column: str, counts: dict[str, int], expected: dict[str, int] | None = None) -> None:
        """Keep `counts` (what the engine reported) for `column`; each must equal the requested
        count, or the count in `expected` for that entry."""
        for what, n in counts.items():
            want = (expected or {}).get(what, self.requested)
            if n != want:
                raise RuntimeError(f"{column}: {what} runs {n} threads where {want} were set: the columns would "
                                   "not run on equal threads")
        self.seen.setdefault(column, {}).update(counts)

    def check(self) -> None:
        """Read torch's and TVM's pools back (before each row: nothing may resize them mid-run)."""
        import torch

        self.record("eager", {"torch intra-op": torch.get_num_threads()})
        self.record("artifact", {"TVM pool": tvm_pool_threads()})

    def header(self, columns: list[str]) -> str:
        """'threads: artifact 2 (TVM pool), eager 2 (torch intra-op), ...' for the columns
        that were read back, in this order; a column no engine reported is said so."""
        parts = []
        for column in columns:
            counts = self.seen.get(column)
            if not counts:
                parts.append(f"{column} not read back (no {column} ran)")
                continue
            main = next(iter(counts.values()))
            detail = ", ".join(f"{what} {n}" for what, n in counts.items())
            parts.append(f"{column} {main} ({detail})")
        return "threads: " + ", ".join(parts)


THREADS = Threads()


def set_threads(n: int) -> None:
    """Give torch, torch.compile's kernels and TVM `n` threads (ONNX Runtime gets them per
    session, in `ort_session`). TVM reads TVM_NUM_THREADS when its pool starts, so this must
    run before the first artifact does: reading the pool back here starts it, and a pool that
    had already started with another count stops the run."""
    if n < 1:
        raise SystemExit(f"--threads must be at least 1 (got {n})")
    os.environ["TVM_NUM_THREADS"] = str(n)  # mocompile/threads.py keeps a value already set
    from mocompile.threads import configure_tvm_threads

    configure_tvm_threads()  # its other setting: TVM's idle workers spin ~1 ms, then sleep
    import torch
    import torch._inductor.config as inductor

    torch.set_num_threads(n)
    inductor.cpp.threads = n  # generated kernels' OpenMP count (default: torch's count at generation)
    THREADS.requested = n
    THREADS.check()


def set_iree_threads() -> None:
    """Give IREE's local-task driver the requested count of workers: the flag sizes the task
    topology of every driver made after it; IREE's Python API has no call reading it back,
    so the header says it was set, not read."""
    import iree.runtime as ireert

    ireert.flags.parse_flags(f"--task_topology_group_count={THREADS.requested}")
    THREADS.seen["iree"] = {"task_topology_group_count flag, set": THREADS.requested}


def tvm_pool_threads() -> int:
    """Workers of TVM's thread pool, as the runtime reports them (starts the pool if needed)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())


def record_compiled() -> None:
    """Read back the thread counts torch.compile's code runs with: its generated C++ kernels
    (fixed when generated) and the aten calls between them (torch's pool)."""
    import torch
    from torch._inductor.utils import parallel_num_threads

    THREADS.record("torch.compile", {"inductor kernels": parallel_num_threads(), "aten": torch.get_num_threads()})


def ort_session(path: str):
    """An ONNX Runtime CPU session on `path`: the requested threads inside each operator, one
    node at a time (sequential execution, so an inter-op pool of 1), both read back from the
    session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS.requested
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    got = session.get_session_options()
    THREADS.record("onnxruntime", {"intra": got.intra_op_num_threads, "inter": got.inter_op_num_threads},
                   expected={"inter": 1})
    return session
