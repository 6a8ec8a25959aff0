"""A model too big for this machine is refused before anything is allocated, in one line with
the figures (not with an allocator error from inside torch halfway through a compile)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mocompile import memory
from mocompile.compiler import compile
from mocompile.errors import MocompileError
from mocompile.isolation_check import check_spec

from conftest import EXAMPLES

HUGE = """model huge {
    hidden = 65536  heads = 512  max_seq = 64
    modality text { vocab = 4000000 }
    moe big { experts = 4096  top_k = 2  expert_hidden = 262144 }
    layers = [big] * 64
}
"""


def test_a_spec_too_big_for_the_machine_is_refused_with_the_figures(tmp_path):
    spec = tmp_path / "huge.moe"
    spec.write_text(HUGE)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "mocompile.cli", "compile", str(spec), "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith(f"mocompile: error: {spec}: huge has ") and "parameters" in line, run.stderr
    assert "bytes) of memory" in line and "is available on this machine" in line, line
    assert "Traceback" not in run.stderr and not out.exists()


def test_the_refusal_follows_the_free_memory(tmp_path, monkeypatch):
    """mixtral_tiny (~3.5M parameters) is refused where only 1 MB is free, for a compile and
    for the isolation check alike, and nothing is written."""
    monkeypatch.setattr(memory, "available_memory", lambda: 1_000_000)
    with pytest.raises(MocompileError, match=r"mixtral_tiny.moe: mixtral_tiny has [\d,]+ parameters.*only 976.6 KiB"):
        compile(EXAMPLES / "mixtral_tiny.moe", out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MocompileError, match="of memory"):
        check_spec(EXAMPLES / "mixtral_tiny.moe")
