"""The artifact directory: written atomically, checked by checksum before anything runs.

Layout: `manifest.json` (format, model, target, signature, program, pass reports,
verification, sha256 of every other file) beside the files a backend produced. The
directory is assembled under a hidden staging name and renamed into place only once
complete, so a crash mid-compile never leaves something that looks like an artifact.

An output directory that already exists is replaced only when it is a mocompile artifact
holding nothing but the files its manifest lists (`check_output_dir`): a compile never
deletes a file it did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from mocompile.errors import ArtifactError, MocompileError
from mocompile.files import current_umask, refuse_overwriting_inputs, same_or_inside, user_permissions

FORMAT = "mocompile-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _artifact_files(path: Path) -> set[str] | None:
    """The files an existing artifact directory's manifest lists (the manifest included),
    or None when `path` holds no mocompile manifest. Checksums are not checked: a tampered
    or older artifact may still be replaced."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    return {MANIFEST, *manifest.get("files", {})}


def _listing(paths: list[Path], root: Path) -> str:
    names = sorted(str(p.relative_to(root)) + ("/" if p.is_dir() else "") for p in paths)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_output_dir(out_dir: str | Path, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse an output path whose replacement would destroy something of the user's: the
    root, home or current directory (or one holding it), a directory holding one of the
    compile's `inputs`, a symbolic link, a file, or a directory that is not an artifact or
    holds files its manifest does not list. A missing or empty directory, or an artifact, is
    fine; it is replaced only once the new artifact is complete (`finalize`)."""
    out = Path(out_dir).expanduser()
    advice = "choose a new directory for -o"
    for special, name in ((Path("/"), "the root directory"), (Path.home(), "your home directory"),
                          (Path.cwd(), "the current directory")):
        if same_or_inside(special, out):
            held = "is" if special.resolve() == out.resolve() else "holds"
            raise MocompileError(f"{out}: refusing to write an artifact there: it {held} {name}; {advice}")
    refuse_overwriting_inputs(out, inputs, "the artifact")
    if out.is_symlink():
        raise MocompileError(f"{out}: is a symbolic link; refusing to replace it, {advice}")
    if out.exists() and not out.is_dir():
        raise MocompileError(f"{out}: exists and is a file, not an artifact directory; {advice}")
    if out.is_dir() and any(out.iterdir()):
        listed = _artifact_files(out)
        if listed is None:
            raise MocompileError(f"{out}: exists and is not a mocompile artifact (it holds "
                                 f"{_listing(list(out.iterdir()), out)}); {advice} or empty this one yourself")
        extra = [p for p in out.rglob("*") if p.is_file() or p.is_symlink() or not any(p.iterdir())]
        extra = [p for p in extra if str(p.relative_to(out)) not in listed]
        if extra:
            raise MocompileError(f"{out}: is an artifact but also holds files it did not write "
                                 f"({_listing(extra, out)}); move them out or {advice}")
    return out


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
    """Checksum the staged files, write the manifest last, then swap the directory into place
    (after checking once more that what is there may be replaced). Every file gets the
    permissions of the user's umask."""
    mask = current_umask()
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    for p in [stage, *stage.rglob("*")]:
        user_permissions(p, mask)
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION)
    manifest["files"] = {str(p.relative_to(stage)): sha256_file(p) for p in files}
    tmp = stage / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    user_permissions(tmp, mask)
    tmp.rename(stage / MANIFEST)
    out_dir = check_output_dir(out_dir)
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
        for rel in manifest.get("files", {}):
            check_file(path, manifest, rel)
    return manifest


def check_file(path: Path, manifest: dict[str, Any], rel: str) -> None:
    """Refuse file `rel` of the artifact at `path` unless it is listed with this sha256 (a
    process that reads only some files, one rank of an expert-parallel run, checks those)."""
    f = path / rel
    digest = manifest.get("files", {}).get(rel)
    if digest is None:
        raise ArtifactError(f"{f}: not listed in the manifest; refusing to load")
    if not f.is_file():
        raise ArtifactError(f"{f}: missing (listed in the manifest)")
    if sha256_file(f) != digest:
        raise ArtifactError(f"{f}: checksum mismatch, the file was modified after compilation; refusing to load")


def placement_plan(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The expert placement the artifact's `place` pass recorded in its report (the `mocompile
    place --json` shape), or None when no place pass ran. The runtime's expert-parallel ranks
    and the report page both read it, so both find it the same way."""
    for report in manifest.get("passes") or []:
        if not isinstance(report, dict) or str(report.get("pass", "")).split("(")[0] != "place":
            continue
        plan = report.get("plan")
        if isinstance(plan, dict) and isinstance(plan.get("devices"), list):
            return plan
    return None
