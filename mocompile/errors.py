"""User-facing errors. Anything raised as a MocompileError is shown as one line by the CLI
(no traceback); anything else escaping is a compiler bug."""

from __future__ import annotations


class MocompileError(Exception):
    """A problem with the user's input (spec, checkpoint, artifact, device file, options)."""


class SpecError(MocompileError):
    """A malformed spec, located at file:line:col."""

    def __init__(self, message: str, source: str = "<spec>", line: int = 0, column: int = 0) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.column = column
        where = f"{source}:{line}:{column}" if line else source  # line 0: the file as a whole
        super().__init__(f"{where}: {message}")


class ArtifactError(MocompileError):
    """An artifact directory that is incomplete, tampered with, or of another format."""


class VerificationError(MocompileError):
    """A compiled artifact that does not agree with its reference."""


class ArtifactInputError(MocompileError, ValueError):
    """An input an artifact refuses at its boundary (a token id outside the vocabulary, an
    empty or too long sequence, a wrong dtype or shape, a KV cache too large to allocate).
    Also a ValueError: callers catching either kind of error get it."""
