"""How much memory this machine has free, and refusing work that would not fit in it.

A model too big for the machine must fail with one line giving the figures before anything is
allocated, not with an allocator error from deep inside torch or numpy halfway through a
compile. The runtime (KV caches) and the frontend (reference models) both ask here.
"""

from __future__ import annotations

import os

from mocompile.errors import MocompileError


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation without swapping (Linux MemAvailable;
    elsewhere the free physical pages); None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(n: int) -> str:
    """`n` bytes in binary units, e.g. 1.5 MiB."""
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f}".rstrip("0").rstrip(".") + f" {unit}"


def check_fits(needed: int, what: str, where: str) -> None:
    """Refuse, in one line naming `where` and the figures, work needing more than is free."""
    free = available_memory()
    if free is not None and needed > free:
        raise MocompileError(f"{where}: {what} needs about {format_bytes(needed)} ({needed} bytes) of memory, "
                             f"but only {format_bytes(free)} ({free} bytes) is available on this machine")
