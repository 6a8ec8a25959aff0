"""Passes, their registry, and the textual pipeline (as in MLIR).

A pipeline is text: `"dce,fold-constants"` or `"quantize(w=int8,skip=router|attention),dce"`.
Each pass gets a clone of the graph (so a failing pass leaves the caller's graph intact),
the verifier runs after every pass, and every pass returns a report that ends up in the
artifact's manifest. User passes register with `@register_pass` from their own file and
run through the same manager (see examples/custom_pass.py).
"""

from __future__ import annotations

import importlib.util
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.ir.verifier import VerifyError, verify


@dataclass
class PassContext:
    """What a pass may need beyond the graph: calibration inputs, the target, free-form notes."""

    calibration: list[dict[str, Any]] = field(default_factory=list)  # input dicts of numpy arrays
    input_ranges: dict[str, int] = field(default_factory=dict)  # integer (token) inputs: ids are in [0, n)
    target: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    graph: Graph
    report: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class: subclasses set `name` and implement `run`. Options come from the
    pipeline text (`name(key=value,...)`) as keyword arguments to __init__."""

    name: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        if options:
            raise MocompileError(f"pass {self.name!r} takes no options (got {', '.join(options)})")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


_PASSES: dict[str, type[Pass]] = {}


def register_pass(name: str) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: make a pass available to pipelines by `name`."""

    def deco(cls: type[Pass]) -> type[Pass]:
        if name in _PASSES and _PASSES[name] is not cls:
            raise ValueError(f"pass {name!r} registered twice")
        cls.name = name
        _PASSES[name] = cls
        return cls

    return deco


def registered_passes() -> dict[str, type[Pass]]:
    import mocompile.passes  # noqa: F401  (registers the built-in passes)

    return dict(_PASSES)


def load_plugin(path: str | Path) -> None:
    """Import a user's Python file so the passes it registers become available."""
    path = Path(path)
    if not path.is_file():
        raise MocompileError(f"{path}: pass plugin not found")
    spec = importlib.util.spec_from_file_location(f"mocompile_plugin_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:
        raise MocompileError(f"{path}: pass plugin failed to load: {type(e).__name__}: {e}") from None


# ---- pipeline text ------------------------------------------------------------------------
_ITEM = re.compile(r"\s*([A-Za-z_][\w-]*)\s*(?:\(([^()]*)\))?\s*(?:,|$)")


def _value(text: str) -> Any:
    """Option values: int, float, true/false, a|b lists, else the string itself."""
    text = text.strip()
    if "|" in text:
        return tuple(_value(t) for t in text.split("|"))
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_pipeline(text: str) -> list[Pass]:
    """`"a,b(k=v,k2=v2)"` -> pass instances; errors name the position in the text."""
    passes: list[Pass] = []
    known = registered_passes()
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise MocompileError(f"pipeline {text!r}: cannot parse at column {pos + 1} (expected name or name(key=value,...))")
        name, args = m.group(1), m.group(2)
        if name not in known:
            raise MocompileError(f"pipeline: unknown pass {name!r} (known: {', '.join(sorted(known))})")
        options: dict[str, Any] = {}
        for item in filter(None, (a.strip() for a in (args or "").split(","))):
            if "=" not in item:
                raise MocompileError(f"pipeline: option {item!r} of pass {name!r} is not key=value")
            k, v = item.split("=", 1)
            options[k.strip()] = _value(v)
        try:
            passes.append(known[name](**options))
        except TypeError as e:
            raise MocompileError(f"pipeline: bad options for pass {name!r}: {e}") from None
        pos = m.end()
    return passes


class PassManager:
    """Runs passes in order, verifying after each, collecting their reports."""

    def __init__(self, passes: list[Pass] | str) -> None:
        self.passes = parse_pipeline(passes) if isinstance(passes, str) else list(passes)

    def run(self, graph: Graph, ctx: PassContext | None = None) -> tuple[Graph, list[dict[str, Any]]]:
        ctx = ctx or PassContext()
        reports = []
        for p in self.passes:
            before_nodes, before_bytes = len(graph.nodes), graph.weight_bytes()
            start = time.perf_counter()
            result = p.run(graph.clone(), ctx)
            try:
                verify(result.graph)
            except VerifyError as e:
                raise MocompileError(f"pass {p.describe()} produced an invalid graph: {e}") from None
            graph = result.graph
            reports.append({
                "pass": p.describe(),
                "seconds": round(time.perf_counter() - start, 4),
                "nodes": [before_nodes, len(graph.nodes)],
                "weight_bytes": [before_bytes, graph.weight_bytes()],
                **result.report,
            })
        return graph, reports
