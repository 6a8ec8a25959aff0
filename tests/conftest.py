"""Shared fixtures: example specs and a process environment where torch and TVM share cores politely."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
EXAMPLE_SPECS = sorted(EXAMPLES.glob("*.moe"))


def example_variants() -> list[tuple[str, str | None]]:
    """(spec file name, variant or None) for every example and each of its elastic variants."""
    from mocompile.dsl import load_spec

    out = []
    for path in EXAMPLE_SPECS:
        spec = load_spec(path)
        out.append((path.name, None))
        out.extend((path.name, v.name) for v in spec.variants)
    return out


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return EXAMPLES
