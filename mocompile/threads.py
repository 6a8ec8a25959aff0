"""TVM thread-pool settings, applied before TVM's pool starts (its first parallel kernel).

- torch and TVM each keep a thread pool; sharing the cores, spinning workers of one starve
  the other, so TVM's workers sleep when idle;
- TVM sizes its pool at half the logical CPUs on x86 (it assumes hyper-threading), which on
  a machine without SMT runs every kernel on half the cores: use every CPU this process may.
Both the compiler (which runs artifacts to verify them) and the runtime call this.
"""

from __future__ import annotations

import os


def configure_tvm_threads() -> None:
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("TVM_NUM_THREADS", str(cpus))
