"""Shared fixtures: example specs, the session's cache of compiled artifacts, and a process
environment where torch and TVM share cores politely."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
EXAMPLE_SPECS = sorted(EXAMPLES.glob("*.moe"))
# The verification shape test_compile.py compiles every example at: a test that needs an
# example's plain CPU artifact, and no particular verification shape, asks artifact_cache for
# it with these options and so shares that compile.
EXAMPLE_SHAPE = {"batch": 3, "seq": 5}


def example_variants() -> list[tuple[str, str | None]]:
    """(spec file name, variant or None) for every example and each of its elastic variants."""
    from mocompile.dsl import load_spec

    out = []
    for path in EXAMPLE_SPECS:
        spec = load_spec(path)
        out.append((path.name, None))
        out.extend((path.name, v.name) for v in spec.variants)
    return out


def cli_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `mocompile ARGS` run in this process through
    mocompile.cli.main: for tests of what a command prints or refuses, without a fresh
    interpreter importing torch and TVM again (several seconds each on two cores). What only a
    real process shows (exit status, a closed stdout, native log lines on descriptor 2) is tested
    in real subprocesses (test_cli_boundary.py and one `_cli` compile in test_compile.py)."""
    from mocompile.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


class OnFirstUse(dict):
    """key -> make(key), made the first time a test asks for the key: a module's artifacts
    that only some of its (maybe deselected) tests read are compiled only when one of them runs."""

    def __init__(self, make: Callable[[Any], Any]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: Any) -> Any:
        self[key] = value = self._make(key)
        return value


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return EXAMPLES


class CompiledArtifacts:
    """Artifacts of `mocompile.compile` shared by the whole test session.

    Compiling an example takes tens of seconds on CI's two cores and many test files need the
    same one, so each distinct compile runs once per session (once per worker process: the
    suite runs in two, pytest-xdist's -n 2 in pyproject.toml, each with its own cache). An artifact is keyed by every
    argument of the compile, defaults filled in (spec, target, passes, batch, seq, seed, any
    option): two tests share one only when they asked for the same compile. The shared directory
    is made read-only, so a test that changes an artifact (tampering, compiling over it) must work
    on `copy()` of it and sharing never carries one test's changes into another."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._paths: dict[str, Path] = {}

    def _key(self, model: object, options: dict) -> tuple[str, dict]:
        import inspect

        import mocompile

        bound = inspect.signature(mocompile.compile).bind(model, **options)
        bound.apply_defaults()
        args = dict(bound.arguments)
        if args.pop("out_dir") is not None or args.pop("progress") is not None:
            raise ValueError("a shared artifact gets its own out_dir and reports no progress")
        if isinstance(args["model"], (str, Path)):
            args["model"] = Path(args["model"]).resolve()
        return repr(sorted((k, str(v) if isinstance(v, Path) else v) for k, v in args.items())), args

    def path(self, model: object, **options: object) -> Path:
        """The directory of `model` compiled with `options` (keyword arguments of mocompile.compile)."""
        import mocompile

        key, args = self._key(model, options)
        if key not in self._paths:
            out = self._root / f"artifact{len(self._paths)}"
            mocompile.compile(out_dir=out, **args)
            for p in (out, *out.rglob("*")):
                p.chmod(p.stat().st_mode & ~0o222)
            self._paths[key] = out
        return self._paths[key]

    def load(self, model: object, **options: object):  # noqa: ANN201 (the runtime's artifact class)
        """The shared artifact loaded afresh (its own runtime object, so a test may patch it)."""
        from mocompile.runtime import load

        return load(self.path(model, **options))

    def copy(self, dest: Path, model: object, **options: object) -> Path:
        """A writable copy of the shared artifact at `dest`, for a test that changes it."""
        import shutil

        shutil.copytree(self.path(model, **options), dest)
        for p in (dest, *dest.rglob("*")):
            p.chmod(p.stat().st_mode | 0o200)
        return dest


@pytest.fixture(scope="session")
def artifact_cache(tmp_path_factory: pytest.TempPathFactory) -> CompiledArtifacts:
    """The session's shared compiled artifacts (see CompiledArtifacts)."""
    return CompiledArtifacts(tmp_path_factory.mktemp("compiled"))
