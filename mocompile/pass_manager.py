"""Passes, their registry, and the textual pipeline (as in MLIR).

A pipeline is text: `"dce,fold-constants"` or `"quantize(w=int8,skip=router|attention),dce"`.
Each pass gets a clone of the graph (so a failing pass leaves the caller's graph intact),
the verifier runs after every pass, and every pass returns a report that ends up in the
artifact's manifest. User passes register with `@register_pass` from their own file and
run through the same manager (see examples/custom_pass.py). A pass's options are the
annotated parameters of its __init__ (see `Pass`): the pipeline parser checks the text
against them, with one-line errors that give the column, and `describe_passes` lists them.
"""

from __future__ import annotations

import collections.abc
import difflib
import importlib.util
import inspect
import json
import re
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from mocompile.calibration import Calibration
from mocompile.errors import MocompileError
from mocompile.ir.active_params import active_params
from mocompile.ir.graph import Graph
from mocompile.ir.verifier import VerifyError, verify


@dataclass
class PassContext:
    """What a pass may need beyond the graph: calibration inputs, the target, free-form notes."""

    # The user's calibration data: a Calibration or a list of input dicts (None: passes draw
    # random inputs, see mocompile.calibration.for_graph).
    calibration: Calibration | list[dict[str, Any]] | None = None
    input_ranges: dict[str, int] = field(default_factory=dict)  # integer (token) inputs: ids are in [0, n)
    target: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    graph: Graph
    report: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class: subclasses are registered with `register_pass` and implement `run`.

    Options come from the pipeline text (`name(key=value,...)`) as keyword arguments to
    __init__, so a pass declares them once, as its __init__ parameters: the annotation
    (int, float, bool, str, Literal[...], X | None, tuple[X, ...]) says how the text is read
    and checked, the default is what an absent option means, and both are listed by
    `describe_passes` along with the first line of the class docstring."""

    name: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        if options:
            raise MocompileError(f"pass {self.name!r} takes no options (got {', '.join(options)})")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def stored_bytes_per_param(self) -> float | None:
        """Bytes per parameter of the weights this pass stores (a quantize pass's codes and
        scales, a 16-bit weight format), or None where it leaves their storage alone. A streamed
        compile's memory estimate reads it before any weight exists."""
        return None


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


_LOADED_PLUGINS: set[Path] = set()


def load_plugin(path: str | Path) -> None:
    """Import a user's Python file so the passes it registers become available. A file
    already loaded is not imported again (its passes would register twice)."""
    path = Path(path)
    if not path.is_file():
        raise MocompileError(f"{path}: pass plugin not found")
    if path.resolve() in _LOADED_PLUGINS:
        return
    spec = importlib.util.spec_from_file_location(f"mocompile_plugin_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:
        raise MocompileError(f"{path}: pass plugin failed to load: {type(e).__name__}: {e}") from None
    _LOADED_PLUGINS.add(path.resolve())


# ---- pass options ---------------------------------------------------------------------------
# A pass declares its options once, as the keyword parameters of its __init__; the annotations
# say how pipeline text is read and checked, so a plugin written like examples/custom_pass.py
# gets checked options and a listing without declaring anything else.

_REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class PassOption:
    """One option of a pass: its name, annotation (None when it has none) and default."""

    name: str
    annotation: Any = None
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def __str__(self) -> str:
        text = self.name if self.annotation is None else f"{self.name}: {_type_text(self.annotation)}"
        return f"{text} (required)" if self.required else f"{text} = {self.default!r}"


def pass_options(cls: type[Pass]) -> list[PassOption]:
    """The options of a pass class, in signature order, read from its __init__."""
    if cls.__init__ is Pass.__init__:
        return []
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: use the raw ones, unchecked
        hints = {}
    out = []
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:  # [0] is self
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            annotation = hints.get(p.name, None if p.annotation is _REQUIRED else p.annotation)
            out.append(PassOption(p.name, annotation, p.default))
    return out


def _takes_any_option(cls: type[Pass]) -> bool:
    """A pass whose own __init__ has **kwargs: its options are not checked here."""
    return cls.__init__ is not Pass.__init__ and any(
        p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def _type_text(ann: Any) -> str:
    """An annotation as the option listing shows it: int, {int8,int4}, float or none, str|..."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if _is_union(origin):
        text = " or ".join(_type_text(a) for a in args if a is not type(None))
        return text + " or none" if type(None) in args else text
    if origin in (tuple, list, collections.abc.Sequence):
        return f"{_type_text(args[0]) if args else 'value'}|..."
    if ann is Any:
        return "any"
    return getattr(ann, "__name__", str(ann))


def _expects(ann: Any) -> str:
    """What an annotation accepts, in words, for "option 'x' expects ..." errors."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if isinstance(ann, type) and ann in words:
        return words[ann]
    if origin is typing.Literal:
        choices = [str(a) for a in args]
        return " or ".join([", ".join(choices[:-1]), choices[-1]] if len(choices) > 1 else choices)
    if _is_union(origin):
        parts = [_expects(a) for a in args if a is not type(None)] + (["none"] if type(None) in args else [])
        return " or ".join(parts)
    if origin in (tuple, list, collections.abc.Sequence):
        return f"{_expects(args[0]) if args else 'values'}, several separated by '|'"
    return _type_text(ann)


class _BadValue(ValueError):
    """An option value that does not read as its annotation."""


def _value(text: str) -> Any:
    """Values of unannotated options: int, float, true/false, a|b tuples, else the string itself."""
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


def _convert(text: str, ann: Any) -> Any:
    """Option text read as annotation `ann` (raises _BadValue). Understood: bool (true/false),
    int, float, str, Literal[...], X | None ("none" is None), tuple[X, ...] and list[X] (a|b);
    other or missing annotations read the value as `_value` does, unchecked."""
    text = text.strip()
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if _is_union(origin):
        if type(None) in args and text.lower() == "none":
            return None
        for member in (a for a in args if a is not type(None)):
            try:
                return _convert(text, member)
            except _BadValue:
                pass
        raise _BadValue
    if origin is typing.Literal:
        for choice in args:
            if text == str(choice):
                return choice
        raise _BadValue
    if origin in (tuple, list, collections.abc.Sequence):
        items = [_convert(t, args[0] if args else None) for t in text.split("|")] if text else []
        return items if origin is list else tuple(items)
    if ann is bool:
        if text.lower() not in ("true", "false"):
            raise _BadValue
        return text.lower() == "true"
    if ann in (int, float):
        try:
            return ann(text)
        except ValueError:
            raise _BadValue from None
    if ann is str:
        return text
    return _value(text)


# ---- pipeline text ------------------------------------------------------------------------
_NAME = re.compile(r"[A-Za-z_][\w-]*")


@dataclass
class _Written:
    """A `key=value` as written, with the 0-based offsets of the key and the value."""

    key: str
    key_at: int
    value: str
    value_at: int


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _written_options(text: str, start: int, end: int, fail: Callable[[str], MocompileError],
                     name: str) -> list[_Written]:
    """The `key=value` items of text[start:end] (between a pass's parentheses)."""
    out = []
    i = start
    while i <= end:
        comma = text.find(",", i, end)
        stop = end if comma < 0 else comma
        piece = text[i:stop]
        at = i + len(piece) - len(piece.lstrip())
        if piece.strip():  # empty items (a trailing comma) are allowed
            if "=" not in piece:
                raise fail(f"cannot parse at column {at + 1}: option {piece.strip()!r} of pass {name!r} "
                           "is not key=value")
            key, value = piece.split("=", 1)
            value_at = i + len(key) + 1
            value_at += len(value) - len(value.lstrip())
            if not _NAME.fullmatch(key.strip()):
                raise fail(f"cannot parse at column {at + 1}: {key.strip()!r} is not an option name")
            out.append(_Written(key.strip(), at, value.strip(), value_at))
        i = stop + 1
    return out


def _bind(cls: type[Pass], name: str, at: int, written: list[_Written],
          fail: Callable[[str], MocompileError]) -> dict[str, Any]:
    """Check written options against the pass's declared ones and read their values."""
    declared = {o.name: o for o in pass_options(cls)}
    listing = f"options: {', '.join(str(o) for o in declared.values())}"
    bad = f"bad options for pass {name!r} at column"
    values: dict[str, Any] = {}
    for w in written:
        option = declared.get(w.key)
        if w.key in values:
            raise fail(f"{bad} {w.key_at + 1}: option {w.key!r} is given twice")
        if option is None and _takes_any_option(cls):
            values[w.key] = _value(w.value)
            continue
        if option is None and not declared:
            raise fail(f"{bad} {w.key_at + 1}: it takes no options (got {w.key!r})")
        if option is None:
            close = difflib.get_close_matches(w.key, list(declared), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise fail(f"{bad} {w.key_at + 1}: it has no option {w.key!r}{hint} ({listing})")
        try:
            values[w.key] = _convert(w.value, option.annotation)
        except _BadValue:
            raise fail(f"{bad} {w.value_at + 1}: option {w.key!r} expects "
                       f"{_expects(option.annotation)}, got {w.value!r}") from None
    missing = [o.name for o in declared.values() if o.required and o.name not in values]
    if missing:
        raise fail(f"{bad} {at + 1}: option {missing[0]!r} is required ({listing})")
    return values


def parse_pipeline(text: str) -> list[Pass]:
    """`"a,b(k=v,k2=v2)"` -> pass instances. Every error is one line that quotes the text and
    gives the 1-based column of the problem: an unknown pass (with the known ones), an unknown
    option or a value of the wrong type (with the pass's options, types and defaults), an
    unclosed '('."""
    quoted = json.dumps(text, ensure_ascii=False)  # escapes newlines: the error stays one line

    def fail(message: str) -> MocompileError:
        return MocompileError(f"pipeline {quoted}: {message}")

    known = registered_passes()
    passes: list[Pass] = []
    i = _skip_space(text, 0)
    while i < len(text):
        m = _NAME.match(text, i)
        if not m:
            raise fail(f"cannot parse at column {i + 1}: expected a pass name, found {text[i]!r} "
                       "(a pipeline is name or name(key=value,...), separated by commas)")
        name, at = m.group(), i
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise fail(f"unknown pass {name!r} at column {at + 1}{hint} (known: {', '.join(sorted(known))})")
        i = _skip_space(text, m.end())
        written: list[_Written] = []
        if i < len(text) and text[i] == "(":
            close_at, reopen = text.find(")", i), text.find("(", i + 1)
            if close_at < 0 or 0 <= reopen < close_at:
                found = "the end of the pipeline" if close_at < 0 and reopen < 0 else f"'(' at column {reopen + 1}"
                raise fail(f"cannot parse at column {i + 1}: the '(' after {name!r} is not closed "
                           f"(expected ')' before {found})")
            written = _written_options(text, i + 1, close_at, fail, name)
            i = _skip_space(text, close_at + 1)
        if i < len(text):
            if text[i] != ",":
                raise fail(f"cannot parse at column {i + 1}: expected ',' after pass {name!r}, found {text[i]!r}")
            i = _skip_space(text, i + 1)
        values = _bind(known[name], name, at, written, fail)
        try:
            passes.append(known[name](**values))
        except MocompileError as e:  # the pass's own checks (e.g. combinations of options)
            raise fail(f"bad options for pass {name!r} at column {at + 1}: "
                       f"{str(e).removeprefix(name + ': ')}") from None
        except TypeError as e:
            raise fail(f"bad options for pass {name!r} at column {at + 1}: {e}") from None
    return passes


# ---- listing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassInfo:
    """What `mocompile passes` shows of one registered pass."""

    name: str
    description: str  # first line of the class docstring (else of its module's)
    options: list[PassOption]
    takes_any_option: bool = False


def _first_line(doc: str | None) -> str:
    lines = inspect.cleandoc(doc or "").splitlines()
    return lines[0].strip() if lines else ""


def pass_infos() -> list[PassInfo]:
    """Every registered pass (built-ins, and plugins loaded so far), sorted by name."""
    out = []
    for name, cls in sorted(registered_passes().items()):
        module = sys.modules.get(cls.__module__)
        description = _first_line(cls.__dict__.get("__doc__")) or _first_line(getattr(module, "__doc__", None))
        out.append(PassInfo(name, description, pass_options(cls), _takes_any_option(cls)))
    return out


def describe_passes() -> str:
    """The registered passes with their one-line descriptions and options (name: type =
    default), as printable text (no trailing newline); plugins must be loaded first."""
    infos = pass_infos()
    width = max(len(info.name) for info in infos)
    lines = ['Passes for --passes "name,name(option=value,...)"; options are name: type = default, where',
             "{a,b} is one of the words, X|... a list written a|b, and 'or none' also takes the word none:"]
    for info in infos:
        lines.append(f"  {info.name.ljust(width)}  {info.description}".rstrip())
        options = [str(o) for o in info.options] + (["(any other option, unchecked)"] if info.takes_any_option else [])
        lines.extend(f"  {'':{width}}    {o}" for o in options or ["(no options)"])
    return "\n".join(lines)


class PassManager:
    """Runs passes in order, verifying after each, collecting their reports."""

    def __init__(self, passes: list[Pass] | str) -> None:
        self.passes = parse_pipeline(passes) if isinstance(passes, str) else list(passes)

    def run(self, graph: Graph, ctx: PassContext | None = None) -> tuple[Graph, list[dict[str, Any]]]:
        ctx = ctx or PassContext()
        reports = []
        for p in self.passes:
            before_nodes, before_bytes, before_params = len(graph.nodes), graph.weight_bytes(), active_params(graph)
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
                "params_per_token": [before_params, active_params(graph)],
                **result.report,
            })
        return graph, reports
