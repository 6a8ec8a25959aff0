"""Progress bars: drawn in place on a terminal (a real pseudo-terminal here), silent on a pipe
and with MOCOMPILE_PROGRESS=0, erased when the work ends; and the calibration of a real model
shows one."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COUNTING = textwrap.dedent("""
    import sys, time
    from mocompile.progress import Bar, progress
    for i in progress(range(5), "counting things", delay=0, unit="things"):
        time.sleep(0.12)
    with Bar("open-ended", delay=0) as bar:
        for i in range(3):
            time.sleep(0.12)
            bar.update(1, f"item {i}")
            bar.print(f"line {i}")
    print("finished", file=sys.stderr)
""")


def _on_pty(code: str, env: dict[str, str] | None = None) -> str:
    """stderr and stdout of `python -c code` run on a pseudo-terminal, as a terminal shows them."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                            env={**os.environ, **(env or {})}, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0, b"".join(chunks).decode(errors="replace")[-2000:]
    return b"".join(chunks).decode(errors="replace")


def test_bar_draws_in_place_on_a_terminal() -> None:
    out = _on_pty(COUNTING)
    frames = out.split("\r\x1b[K")
    assert any(f.startswith("counting things [") and "things" in f for f in frames)
    assert any("5/5 things 100%" in f for f in frames)  # the last frame is drawn before the line is erased
    assert "open-ended: 3 " in out and "item 2" in out  # a bar without a total counts
    for i in range(3):  # the work's own lines each start on a clean line
        assert f"\r\x1b[Kline {i}" in out
    assert out.rstrip().endswith("finished") and "\r\x1b[Kfinished" in out  # erased before the next output


def test_bar_is_silent_on_a_pipe_and_when_asked() -> None:
    done = subprocess.run([sys.executable, "-c", COUNTING], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and "\r" not in done.stderr and "[" not in done.stderr
    assert done.stderr.splitlines() == ["line 0", "line 1", "line 2", "finished"]
    quiet = _on_pty(COUNTING, {"MOCOMPILE_PROGRESS": "0"})
    assert "\r\x1b[K" not in quiet and "counting things" not in quiet and "line 2" in quiet


def test_calibration_shows_its_progress_on_a_terminal() -> None:
    code = textwrap.dedent("""
        import mocompile.progress
        mocompile.progress.DEFAULT_DELAY = 0  # draw however fast this machine calibrates
        from mocompile.calibration import observe, random_calibration
        from mocompile.frontend import lower_source, source_for
        from mocompile.signature import signature_of
        src = source_for("examples/mixtral_tiny.moe", None, None, 0)
        graph = lower_source(src)
        calib = random_calibration(signature_of(graph, src.int_high), 48, 16, 0)
        seen = []
        observe(graph, calib, [lambda node, outs: seen.append(node.op)])
        print("nodes seen", len(seen))
    """)
    out = _on_pty(code)
    assert "calibrating: interpreting the model [" in out and "48/48 samples" in out
    assert "\r\x1b[Knodes seen" in out
