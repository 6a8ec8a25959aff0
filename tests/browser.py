"""Headless Chromium for the report tests: load a page from a file with no network, and return
its DOM after load, every console message it logged, and a screenshot (PNG bytes) checked to
be a real picture."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0", "--no-first-run",
         "--disable-extensions", "--disable-background-networking", "--disable-sync", "--hide-scrollbars",
         "--host-resolver-rules=MAP * ~NOTFOUND"]  # no name resolves: nothing can be fetched
CONSOLE = re.compile(r":CONSOLE[^\]]*\] (.*)")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Page:
    dom: str
    console: list[str]
    png: bytes


def _run(binary: str, args: list[str], profile: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=timeout)


def load(page: Path, width: int = 1100, height: int = 1800, timeout: float = 120) -> Page:
    binary = chromium()
    assert binary, "chromium is not installed"
    url = page.resolve().as_uri()
    with tempfile.TemporaryDirectory() as tmp:
        dom = _run(binary, ["--dump-dom", url], Path(tmp) / "a", timeout)
        assert dom.returncode == 0, dom.stderr[-2000:]
        shot_path = Path(tmp) / "shot.png"
        shot = _run(binary, [f"--window-size={width},{height}", f"--screenshot={shot_path}", url], Path(tmp) / "b",
                    timeout)
        assert shot.returncode == 0 and shot_path.is_file(), shot.stderr[-2000:]
        console = [m.group(1) for line in (dom.stderr + shot.stderr).splitlines() if (m := CONSOLE.search(line))]
        return Page(dom.stdout, console, shot_path.read_bytes())


def png_size_and_colors(png: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the decoded pixel rows): a blank page has a
    handful, a page of text, tables and plots many."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, data, width, height = 8, b"", 0, 0
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        body = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            data += body
        pos += 12 + length
    return width, height, len(set(zlib.decompress(data)))
