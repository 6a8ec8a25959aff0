"""Progress bars for long work (calibration, tuning, importing a large checkpoint, benchmark
runs): what is being done, how far along, and an estimate of the time left, redrawn in place
on one terminal line.

A bar draws only when its stream is a terminal, so logs, pipes and CI output never fill with
carriage returns; `MOCOMPILE_PROGRESS=0` silences it on a terminal too. It waits `delay`
seconds before drawing anything (work that ends sooner shows nothing), redraws at most
`MAX_REDRAWS_PER_SECOND` times a second, and erases its line when done, so the lines the
work prints itself stay readable.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

T = TypeVar("T")
MAX_REDRAWS_PER_SECOND = 10
DEFAULT_DELAY = 0.5  # seconds of work before a bar first draws


def is_terminal(stream: IO[str]) -> bool:
    """Whether `stream` is an interactive terminal that progress may be drawn on."""
    if os.environ.get("MOCOMPILE_PROGRESS", "").strip() == "0":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or fake stream
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}"


class Bar:
    """One progress bar: `update(n, detail=...)` as work is done, `close()` (or leave the
    `with` block) when it ends. `total` None: a count without a bar (unknown length)."""

    def __init__(self, what: str, total: int | None = None, *, stream: IO[str] | None = None,
                 delay: float | None = None, unit: str = "") -> None:
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = is_terminal(self.stream)
        self.done = 0
        self.detail = ""
        self._start = time.monotonic()
        self._delay = DEFAULT_DELAY if delay is None else delay  # read now, so a caller may change the default
        self._last_draw = 0.0
        self._drawn = False

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1, detail: str | None = None) -> None:
        """Count `n` more units done; `detail` says what is being worked on now."""
        self.done += n
        if detail is not None:
            self.detail = detail
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._start < self._delay:
            return
        finished = self.total is not None and self.done >= self.total
        if finished or now - self._last_draw >= 1.0 / MAX_REDRAWS_PER_SECOND:
            self._last_draw = now
            self._draw(now)

    def line(self, now: float | None = None, width: int | None = None) -> str:
        """The bar's text as it would be drawn now, at most `width` characters."""
        now = time.monotonic() if now is None else now
        width = width or shutil.get_terminal_size((80, 24)).columns
        elapsed = now - self._start
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            share = min(self.done / self.total, 1.0)
            left = elapsed * (1 - share) / share if share > 0 else None
            tail = f" {self.done}/{self.total}{unit} {share:4.0%} {_duration(elapsed)}" + \
                   (f" (~{_duration(left)} left)" if left is not None and share < 1 else "")
            room = max(10, min(30, width - len(self.what) - len(tail) - 4))
            fill = int(round(share * room))
            text = f"{self.what} [{'#' * fill}{'.' * (room - fill)}]{tail}"
        else:
            text = f"{self.what}: {self.done}{unit} {_duration(elapsed)}"
        if self.detail:
            text += f"  {self.detail}"
        return text[:max(width - 1, 1)]

    def _draw(self, now: float) -> None:
        try:
            self.stream.write("\r\x1b[K" + self.line(now))
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: stop drawing, keep working
            self.enabled = False
            return
        self._drawn = True

    def print(self, message: str) -> None:
        """Print a line of the work's own output to the bar's stream above the bar."""
        drawn = self._drawn
        if drawn:
            self.stream.write("\r\x1b[K")
        print(message, file=self.stream, flush=True)
        if drawn:
            self._draw(time.monotonic())

    def close(self) -> None:
        """Erase the bar's line (the work's own output then continues on a clean line)."""
        if self._drawn:
            try:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            except (OSError, ValueError):
                pass
        self._drawn = False
        self.enabled = False


def progress(items: Iterable[T], what: str, total: int | None = None, *, stream: IO[str] | None = None,
             delay: float | None = None, unit: str = "") -> Iterator[T]:
    """`items`, one at a time, with a bar counting them (`total`: len(items) when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Bar(what, total, stream=stream, delay=delay, unit=unit) as bar:
        for item in items:
            yield item
            bar.update()
