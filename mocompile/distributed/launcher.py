"""Start the ranks of an expert-parallel run and stop them all when one fails.

Each rank is `python -m mocompile.distributed.worker` with the environment torchrun would
give it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free local port). The
launcher watches the processes: when one exits with a non-zero status it stops the others
at once (SIGTERM, then SIGKILL) and raises one MocompileError line naming the rank and its
own error line (or its exit status, when it died without one). A rank that hangs makes the
others' next exchange fail within the worker timeout, which ends the same way; so a run
always ends, with one clear line, never a hang. Progress lines of the ranks are passed on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from mocompile.distributed import PEER_FAILURE
from mocompile.errors import MocompileError

ERROR_PREFIX = "mocompile: error: "
STOP_GRACE_S = 3.0  # seconds a stopped rank gets between SIGTERM and SIGKILL


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _threads_per_rank(nproc: int) -> str:
    """Kernel threads per rank: the machine's cores shared out, so N ranks do not oversubscribe them."""
    return str(max(1, (os.cpu_count() or 1) // nproc))


class _Rank:
    def __init__(self, rank: int, args: Sequence[str], env: dict[str, str]) -> None:
        self.rank = rank
        self.error: str | None = None
        self.proc = subprocess.Popen([sys.executable, "-m", "mocompile.distributed.worker", *args], env=env,
                                     stdout=None, stderr=subprocess.PIPE, text=True, errors="replace")
        self._reader = threading.Thread(target=self._relay, daemon=True)
        self._reader.start()

    def _relay(self) -> None:
        """Keep the rank's error line; pass every other line on."""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.startswith(ERROR_PREFIX) and self.error is None:
                self.error = line[len(ERROR_PREFIX):].strip()
            else:
                sys.stderr.write(line)

    def finished(self) -> None:
        self._reader.join(timeout=2.0)


def _stop(ranks: list[_Rank]) -> None:
    for r in ranks:
        if r.proc.poll() is None:
            r.proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for r in ranks:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()


def _status(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"


def _cause(ranks: list[_Rank], exited: list[_Rank]) -> _Rank:
    """The rank to blame: one with an error of its own (not a peer's failure seen in an
    exchange), else one that died without a message, else the first that exited."""
    own = [r for r in ranks if r.error and PEER_FAILURE not in r.error]
    silent = [r for r in exited if r.error is None]
    return (own or silent or exited)[0]


def launch(nproc: int, args: Sequence[str], poll_s: float = 0.05) -> None:
    """Run `nproc` ranks of the worker with `args`; return when all succeed, else stop them
    all and raise the first failure."""
    env = {**os.environ, "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.setdefault("TVM_NUM_THREADS", _threads_per_rank(nproc))
    ranks: list[_Rank] = []
    try:
        for r in range(nproc):
            ranks.append(_Rank(r, args, {**env, "RANK": str(r), "LOCAL_RANK": str(r)}))
        while True:
            exited = [r for r in ranks if r.proc.poll() not in (None, 0)]
            if exited:
                _stop(ranks)
                for r in ranks:
                    r.finished()
                failed = _cause(ranks, exited)
                others = nproc - 1
                why = (failed.error or f"{_status(failed.proc.returncode)} without an error message")
                why = why.removeprefix(f"rank {failed.rank}: ")
                raise MocompileError(f"run-ep: rank {failed.rank} failed: {why}"
                                     f"{f'; stopped the other {others} rank(s)' if others else ''}")
            if all(r.proc.poll() == 0 for r in ranks):
                for r in ranks:
                    r.finished()
                return
            time.sleep(poll_s)
    except BaseException:
        _stop(ranks)
        raise
