"""The wheel holds every module of the source tree: built here, installed into a fresh
virtual environment (the dependencies reached through a plain path entry, so this checkout's
editable install cannot stand in for the wheel), and every module imported from there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"dsl": "mocompile/dsl", "passes": "mocompile/passes", "backends": "mocompile/backends",
          "mocompile": "mocompile"}


def source_files() -> dict[str, Path]:
    """Installed path -> source file, for every module and data file the package ships."""
    out = {}
    for folder, installed in MAPPED.items():
        for f in (ROOT / folder).rglob("*"):
            if f.suffix in (".py", ".lark") and "__pycache__" not in f.parts:
                out[f"{installed}/{f.relative_to(ROOT / folder).as_posix()}"] = f
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, tree = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "setup.py", "README.md"):  # a copy: the build writes build/ and egg-info
        shutil.copy(ROOT / name, tree / name)
    for folder in MAPPED:
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(tree)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("mocompile-*.whl")
    return whl


def test_the_wheel_holds_every_module_of_the_tree(wheel) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(set(source_files()) - names)
    assert not missing, f"left out of the wheel: {missing}"


def test_every_module_imports_from_the_installed_wheel(wheel, tmp_path) -> None:
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    # The dependencies: this environment's packages as a plain path entry (its .pth files,
    # the editable install among them, are not processed there).
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    modules = sorted(p[:-3].replace("/", ".").removesuffix(".__init__") for p in source_files() if p.endswith(".py"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "import mocompile\n"
            f"assert mocompile.__file__.startswith({str(site)!r}), mocompile.__file__\n"
            "print(len(sys.modules))\n")
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
