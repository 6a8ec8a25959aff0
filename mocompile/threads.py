"""TVM thread-pool settings, applied before TVM's pool starts (its first parallel kernel).

- An idle TVM worker spins for a while (SPIN_YIELDS calls of sched_yield) before it sleeps:
  a decode step launches ~40 parallel kernels microseconds apart, and waking a sleeping
  worker for each costs 10-50 us on a VM (a futex wake and the scheduler's latency), a large
  share of a ~1 ms step. The spin is bounded (~1 ms here, TVM's own default is ~300x that)
  and yields the core at each iteration, so a torch pool sharing the cores in the same
  process (the compiler verifying against its reference) is not starved for long;
- TVM sizes its pool at half the logical CPUs on x86 (it assumes hyper-threading), which on
  a machine without SMT runs every kernel on half the cores: use every CPU this process may.
Both the compiler (which runs artifacts to verify them) and the runtime call this; a value the
user set in the environment wins.
"""

from __future__ import annotations

import os

SPIN_YIELDS = 1000  # sched_yield calls of an idle worker before it sleeps (~1.2 us each on this VM)


def configure_tvm_threads() -> None:
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(SPIN_YIELDS))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("TVM_NUM_THREADS", str(cpus))
