"""TVM's thread pool as the runtime and the compiler set it up (mocompile/threads.py), seen
from a fresh process (the settings are read once, when TVM's pool starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mocompile.threads import SPIN_YIELDS

PROBE = ("import json, os\nfrom mocompile.threads import configure_tvm_threads\nconfigure_tvm_threads()\n"
         "print(json.dumps({k: os.environ.get(k) for k in ('TVM_THREAD_POOL_SPIN_COUNT', 'TVM_NUM_THREADS')}))")


def _settings(**env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("TVM_THREAD_POOL_SPIN_COUNT", "TVM_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_idle_workers_spin_briefly_on_every_cpu_the_process_may_use() -> None:
    got = _settings()
    assert got["TVM_THREAD_POOL_SPIN_COUNT"] == str(SPIN_YIELDS) and 0 < SPIN_YIELDS <= 10_000
    assert got["TVM_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))


def test_what_the_user_set_wins() -> None:
    got = _settings(TVM_THREAD_POOL_SPIN_COUNT="0", TVM_NUM_THREADS="1")
    assert got == {"TVM_THREAD_POOL_SPIN_COUNT": "0", "TVM_NUM_THREADS": "1"}
