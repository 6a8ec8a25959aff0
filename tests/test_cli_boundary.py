"""The command line at its edges, in real subprocesses: a closed stdout, TVM's native log
lines, the pass listing, usage errors in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def mocompile(*args: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MOCOMPILE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "mocompile.cli", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=300, env=env)


def test_a_closed_stdout_ends_quietly() -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written, as with `| head` done early
    try:
        r = mocompile("passes", stdout=write)
    finally:
        os.close(write)
    assert r.returncode == 141 and r.stderr == ""


def test_native_log_lines_stay_off_stderr(tmp_path) -> None:
    """A graph the backend refuses used to leave TVM warning "BlockBuilder destroyed with
    remaining blocks!" on stderr after the error line."""
    spec = tmp_path / "capacity.moe"
    text = (EXAMPLES / "mixtral_tiny.moe").read_text()
    spec.write_text(text.replace("top_k          = 2", "top_k          = 2\n        capacity_factor = 1.0", 1))
    r = mocompile("compile", str(spec), "-o", str(tmp_path / "out"), "--batch", "1", "--seq", "2")
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if not line.startswith(("[", "      "))]
    assert lines == [lines[0]] and "capacity_factor" in lines[0], r.stderr
    assert "BlockBuilder" not in r.stderr and ".cc:" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_passes_lists_every_pass_with_its_options() -> None:
    r = mocompile("passes", "--plugin", str(EXAMPLES / "custom_pass.py"))
    assert r.returncode == 0, r.stderr
    for name in ("dce", "fold-constants", "quantize", "check-isolation", "flops-report"):  # the last from the plugin
        assert f"\n  {name} " in r.stdout, name
    assert "w: {int8,int4} = 'int8'" in r.stdout and "allow_batch_leak: bool = False" in r.stdout


def test_usage_errors_are_one_line_before_any_work() -> None:
    for args in (["run", "nowhere", "--batch", "0"], ["run", "nowhere", "--generate", "-3"],
                 ["compile", "x.moe", "-o", "y", "--tune", "-1"], ["compile", "x.moe"]):
        r = mocompile(*args)
        assert r.returncode == 2, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mocompile") and "error:" in lines[0], (args, r.stderr)


def test_bad_pipeline_text_names_the_pass_column_and_options(tmp_path) -> None:
    r = mocompile("compile", str(EXAMPLES / "mixtral_tiny.moe"), "-o", str(tmp_path / "o"), "--passes", "quantize(bits=8)")
    assert r.returncode == 1
    error = [line for line in r.stderr.splitlines() if line.startswith("mocompile: error:")]
    assert len(error) == 1 and "'quantize'" in error[0] and "column" in error[0] and "w: {int8,int4}" in error[0]
