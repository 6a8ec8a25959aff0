"""Property-based tests (hypothesis): random command lines and random runtime inputs thrown at
a compiled example. Whatever comes in, the answer is a correct result or one error line with a
usage (2) or input (1) exit code: never a traceback, an internal error, or a changed file
other than in the command's output directory, and there only where that was an artifact."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mocompile
from mocompile import cli
from mocompile.dsl import build_model, load_spec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SPEC = EXAMPLES / "mixtral_tiny.moe"
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, artifact_cache) -> Path:
    """A working directory as a user has it: a spec, a compiled artifact, their own files."""
    root = tmp_path_factory.mktemp("sandbox")
    (root / "model.moe").write_bytes(SPEC.read_bytes())
    (root / "userdir" / "sub").mkdir(parents=True)
    (root / "userdir" / "notes.txt").write_text("mine")
    (root / "file.txt").write_text("data")
    artifact_cache.copy(root / "art", SPEC, batch=1, seq=2)  # the compile of model.moe, shared
    return root


def tree(root: Path, skip: Path | None) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


PATHS = ["art", "out", "userdir", "file.txt", "model.moe", ".", "/", "missing/dir"]
SIZES = (["1", "2"], ["-1", "0", "x", "100000"])  # (valid, invalid) values
PIPELINES = (["", "dce", "dce,fold-constants"], ["quantize(bits=8)", "quantize(w=int8", "bogus", "dce,,", "quantize(w=int3)"])


def option(flag: str, values: tuple[list[str], list[str]]) -> st.SearchStrategy[list[str]]:
    """The flag mostly left out or given a valid value, sometimes an invalid one: most command
    lines then fail on at most one thing, so that its one-line error (or, for `-o`, what happens
    to the directory) is what is tested."""
    good, bad = values
    return st.sampled_from([[]] * 4 + [[flag, v] for v in good * 2] + [[flag, v] for v in bad])


def command() -> st.SearchStrategy[list[str]]:
    shape = st.tuples(option("--batch", SIZES), option("--seq", SIZES)).map(lambda t: t[0] + t[1])
    compile_ = st.tuples(st.sampled_from(["model.moe"] * 4 + ["missing.moe", "userdir", "art"]), st.sampled_from(PATHS),
                         option("--passes", PIPELINES), option("--tune", (["0"], ["-1"])),
                         option("--target", (["cpu"], ["tpu"])), option("--tuning-db", ([], ["file.txt", "none.json"])),
                         shape).map(lambda t: ["compile", t[0], "-o", t[1], *t[2], *t[3], *t[4], *t[5], *t[6]])
    run = st.tuples(st.sampled_from(PATHS), option("--generate", (["0", "2"], ["-3"])),
                    option("--repeat", (["1"], ["0"])), option("--seed", (["0", "7"], ["-1"])), shape).map(
        lambda t: ["run", t[0], *t[1], *(t[2] or ["--repeat", "1"]), *t[3], *t[4]])
    isolation = st.tuples(st.sampled_from(PATHS), st.booleans(), shape).map(
        lambda t: ["check-isolation", t[0], *(["--json"] if t[1] else []), *t[2]])
    inspect = st.tuples(st.sampled_from(PATHS + ["model.moe"]), st.booleans()).map(
        lambda t: ["inspect", t[0], *(["--ir"] if t[1] else [])])
    passes = st.just(["passes"])
    return st.one_of(compile_, compile_, compile_, run, isolation, inspect, passes)


@PROPERTY
@given(argv=command())
def test_random_command_lines_fail_in_one_line_and_touch_nothing_else(sandbox: Path, argv: list[str]) -> None:
    out_dir = sandbox / argv[3] if argv[0] == "compile" else None
    if out_dir is not None and out_dir.exists() and not (out_dir / "manifest.json").is_file():
        out_dir = None  # not an artifact: nothing in it may change either
    before = tree(sandbox, out_dir)
    stdout, stderr = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(sandbox)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse's usage errors
                code = e.code
    finally:
        os.chdir(cwd)
    err = stderr.getvalue()
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    assert code in (0, 1, 2, 3), (argv, code, err)
    if code in (1, 2):
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("[", "      "))]
        assert len(lines) == 1 and "error" in lines[0], (argv, err)
    assert tree(sandbox, out_dir) == before, argv


@pytest.fixture(scope="module")
def eager(sandbox: Path) -> torch.nn.Module:
    return build_model(load_spec(sandbox / "model.moe"), seed=0).eval()


def token_arrays() -> st.SearchStrategy[np.ndarray]:
    dtypes = st.sampled_from(["int64", "int32", "float32", "float64"])
    shapes = st.lists(st.integers(0, 4), min_size=1, max_size=3)
    return st.tuples(dtypes, shapes, st.integers(0, 2 ** 31 - 1)).map(
        lambda t: np.random.default_rng(t[2]).integers(-2, 515, size=t[1]).astype(t[0]))


@PROPERTY
@given(ids=token_arrays(), name=st.sampled_from(["text", "ids"]))
def test_random_runtime_inputs_are_refused_in_one_line_or_computed_right(sandbox: Path, eager: torch.nn.Module,
                                                                         ids: np.ndarray, name: str) -> None:
    art = mocompile.runtime.load(sandbox / "art")
    valid = (name == "text" and ids.dtype == np.int64 and ids.ndim == 2 and ids.size > 0
             and ids.min() >= 0 and ids.max() < 512)
    batch = ids.shape[0] if ids.ndim and ids.shape[0] else 1
    calls = {"run": lambda: art.run({name: ids}),
             "step": lambda: art.step({name: ids}, art.new_cache(batch, max(1, ids.shape[-1] if ids.ndim else 1)))}
    for call, fn in calls.items():
        try:
            got = fn()["logits"]
        except ValueError as e:
            assert not valid, (call, ids, e)
            assert "\n" not in str(e) and str(e), repr(e)
            continue
        assert valid, (call, name, ids.dtype, ids.shape, ids.min() if ids.size else None)
        with torch.no_grad():
            ref = eager(torch.from_numpy(ids)).numpy()
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), call
