"""Keeping the log lines of TVM's C++ code off the user's terminal.

TVM's native code logs warnings straight to file descriptor 2 (`[14:12:14] /project/src/
relax/ir/block_builder.cc:67: Warning: ...`), below Python, where no logging setting reaches.
They are notes for TVM's developers, not the user's concern, and they break the promise of
one line per failure. `native_log_filter` points descriptor 2 at a pipe for the duration of a
command and forwards every line to the real stderr except those of that form; with
MOCOMPILE_DEBUG=1 the CLI leaves stderr alone.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

NATIVE_LOG_LINE = re.compile(rb"^\[\d\d:\d\d:\d\d\] \S+\.(cc|cpp|h):\d+: ")


@contextmanager
def native_log_filter(enabled: bool = True) -> Iterator[None]:
    """Drop TVM's native log lines from stderr while the block runs (see the module doc)."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2 (an embedding host): nothing to filter
        yield
        return
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def forward() -> None:
        with os.fdopen(read, "rb") as lines:
            for line in lines:
                if not NATIVE_LOG_LINE.match(line):
                    try:
                        os.write(saved, line)
                    except OSError:
                        pass

    pump = threading.Thread(target=forward, name="native-log-filter", daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the pump reads to the end and stops
        pump.join(timeout=5)
        os.close(saved)
