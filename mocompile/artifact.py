"""The artifact directory: written atomically, checked by checksum before anything runs.

Layout: `manifest.json` (format, model, target, signature, program, pass reports,
verification, sha256 of every other file) beside the files a backend produced. The
directory is assembled under a hidden staging name and renamed into place only once
complete, so a crash mid-compile never leaves something that looks like an artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from mocompile.errors import ArtifactError

FORMAT = "mocompile-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def staging_dir(out_dir: Path) -> Path:
    """A fresh hidden sibling of `out_dir` to assemble the artifact in."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    return stage


def finalize(stage: Path, out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Checksum the staged files, write the manifest last, then swap the directory into place."""
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION)
    manifest["files"] = {str(p.relative_to(stage)): sha256_file(p) for p in files}
    tmp = stage / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    tmp.rename(stage / MANIFEST)
    out_dir = Path(out_dir)
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    stage.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)
    return out_dir


def read_manifest(path: str | Path, check_files: bool = True) -> dict[str, Any]:
    """The manifest of an artifact directory, after checking every file's sha256."""
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact directory")
    if not mf.is_file():
        raise ArtifactError(f"{path}: no {MANIFEST} (not a complete mocompile artifact)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mf}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mf}: not a mocompile artifact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mf}: format version {manifest.get('format_version')} (this runtime reads {FORMAT_VERSION})")
    if check_files:
        for rel, digest in manifest.get("files", {}).items():
            f = path / rel
            if not f.is_file():
                raise ArtifactError(f"{f}: missing (listed in the manifest)")
            if sha256_file(f) != digest:
                raise ArtifactError(f"{f}: checksum mismatch, the file was modified after compilation; refusing to load")
    return manifest
