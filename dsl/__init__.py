"""The `.moe` spec language: parse specs, resolve elastic variants, build torch models.

`build_model` is loaded on first use (module `__getattr__`), so that importing this
package — e.g. just to validate a spec — does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mocompile.dsl.parser import load_spec, parse_spec
from mocompile.dsl.spec import Spec
from mocompile.dsl.variants import resolve_variant

if TYPE_CHECKING:  # for type checkers only; at run time it is loaded lazily below
    from mocompile.dsl.builder import build_model

__all__ = ["Spec", "build_model", "load_spec", "parse_spec", "resolve_variant"]


def __getattr__(name: str) -> Any:
    if name == "build_model":
        from mocompile.dsl.builder import build_model

        globals()["build_model"] = build_model  # later lookups skip this hook
        return build_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
