"""benchmarks/RESULTS.md holds one section per benchmark script; each run rewrites only its own.

A section is the text between `<!-- begin NAME -->` and `<!-- end NAME -->`; a script
whose section is not there yet appends it.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(name: str, text: str, path: Path = RESULTS) -> None:
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old.rstrip() + "\n\n" + block
    path.write_text(new)
