"""mocompile: a compiler for mixture-of-experts models.

Importing the package is cheap and torch-free (deployments import `mocompile.runtime`);
the compiler entry points load torch and TVM on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["compile", "check_isolation", "IsolationReport", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "compile":
        from mocompile.compiler import compile

        return compile
    if name == "check_isolation":
        from mocompile.isolation_check import check_isolation

        return check_isolation
    if name == "IsolationReport":
        from mocompile.isolation import IsolationReport

        return IsolationReport
    raise AttributeError(f"module 'mocompile' has no attribute {name!r}")
