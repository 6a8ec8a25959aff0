"""Parse `.moe` spec files into `Spec` objects, with located, one-line errors.

Two stages. Lark turns the text into a small AST whose nodes remember their line and
column (`spec_syntax`). Table-driven checks (`spec_checker`, reading each block against the
key schemas of `spec_schema` with the value readers of `spec_values`) then turn that AST
into the frozen dataclasses of `spec.py`. Everything that can be checked from the spec alone is checked here, and every variant is resolved and re-checked, so downstream
code (the torch builder, the importers) can trust any `Spec` this module returns.

Every failure is a `SpecError` (`file:line:col: error: message`); no lark exception,
KeyError or ValueError escapes.
"""

from __future__ import annotations

import os
from pathlib import Path

from lark.exceptions import UnexpectedInput, VisitError

from mocompile.dsl.spec import Spec
from mocompile.dsl.spec_checker import _Checker
from mocompile.dsl.spec_syntax import _Fail, _ToAst, _lark, _syntax_error
from mocompile.errors import SpecError



def parse_spec(text: str, source: str = "<string>") -> Spec:
    """Parse and validate the text of a `.moe` file. Raises SpecError located at file:line:col."""
    try:
        try:
            tree = _lark().parse(text)
        except UnexpectedInput as err:
            raise _syntax_error(err) from None
        try:
            entries = _ToAst().transform(tree)
        except VisitError as err:  # the transformer raises only _Fail (an over-long integer)
            if isinstance(err.orig_exc, _Fail):
                raise err.orig_exc from None
            raise _Fail(f"internal parser error: {err.orig_exc}", 1, 1) from None
        return _Checker().check(entries, source)
    except _Fail as fail:
        raise SpecError(fail.message, source, fail.line, fail.column) from None
    except RecursionError:
        raise SpecError("spec is nested too deeply", source, 1, 1) from None


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Read and parse a `.moe` file; a missing or unreadable file is a SpecError at line 0."""
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("spec file not found", source, 0, 0) from None
    except IsADirectoryError:
        raise SpecError("spec path is a directory, expected a .moe file (or a Hugging Face checkpoint directory, "
                        "which has a config.json)", source, 0, 0) from None
    except UnicodeDecodeError as err:
        raise SpecError(f"spec file is not valid UTF-8 (byte {err.start})", source, 0, 0) from None
    except OSError as err:
        raise SpecError(f"cannot read spec file: {err.strerror or err}", source, 0, 0) from None
    return parse_spec(text, source)
