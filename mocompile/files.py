"""Writing the user's files safely: the permissions their umask asks for, whole files only,
and never over something the command is reading.

Libraries that write through temporary files (safetensors does) create them 0600, so a
weights file would be the one part of an artifact that a service user cannot read; every
file mocompile writes goes through `user_permissions` instead. Outputs are written to a
hidden sibling and renamed into place, so an interrupted command leaves the old file or the
new one, never half of either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

from mocompile.errors import MocompileError


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: POSIX has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def user_permissions(path: Path, mask: int | None = None) -> None:
    """Give `path` the mode a plain `open()` or `mkdir` would have given it under the umask:
    0666 (0777 for directories and files executable by their owner) less the umask."""
    mask = current_umask() if mask is None else mask
    executable = path.is_dir() or bool(path.stat().st_mode & 0o100)
    os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def same_or_inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies below it (both resolved, symbolic links followed)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def refuse_overwriting_inputs(out: Path, inputs: Iterable[str | Path], what: str) -> None:
    """Refuse to write `out` where it would replace or contain one of the files being read."""
    for given in inputs:
        src = Path(given).expanduser()
        if src.exists() and same_or_inside(src, out):
            rel = "is" if src.resolve() == out.resolve() else "holds"
            raise MocompileError(f"{out}: {what} would overwrite its own input ({out} {rel} {given}); "
                                 "write it somewhere else")


def write_atomically(path: str | Path, write: Callable[[Path], None], what: str) -> Path:
    """Call `write(tmp)` on a hidden sibling of `path`, then rename it over `path` with the
    user's permissions; an existing directory at `path` is refused, and a failure leaves
    `path` as it was."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise MocompileError(f"{path}: is a directory; give a file name for the {what}")
    if not path.parent.is_dir():
        raise MocompileError(f"{path}: cannot write the {what} (no directory {path.parent})")
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        write(tmp)
        user_permissions(tmp)
        tmp.replace(path)
    except OSError as e:
        raise MocompileError(f"{path}: cannot write the {what} ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_document(path: str | Path, what: str, loads: Callable[[str], Any], errors: tuple[type[Exception], ...],
                  format_name: str) -> Any:
    """A user's text file (`what`: "device file") parsed by `loads`, or one error line naming
    it: missing, unreadable, or not valid `format_name`."""
    path = Path(path)
    if not path.is_file():
        raise MocompileError(f"{path}: {what} not found")
    try:
        return loads(path.read_text())
    except (*errors, UnicodeDecodeError) as e:
        raise MocompileError(f"{path}: not valid {format_name} ({e})") from None
