"""argparse types shared by every command line of mocompile: the `mocompile` command (driver)
and a rank's own process (`python -m mocompile.distributed.worker`, which may not import the
driver). A bad value fails at parsing, before any work, as one usage-error line."""

from __future__ import annotations

import argparse
from typing import Callable


def integer(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `low`, so a bad value fails before any work."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low} (got {value})")
        return value

    parse.__name__ = "integer"
    return parse


POSITIVE, COUNT = integer(1), integer(0)
