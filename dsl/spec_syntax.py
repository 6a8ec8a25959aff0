"""The `.moe` syntax: the lark grammar, the AST whose nodes remember their line and column
(`_ToAst`, the only tree visitor), and located errors (`_Fail`) with the wording helpers
the checks share, syntax errors included."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from lark import Lark, Transformer
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from mocompile.dsl import limits


_GRAMMAR_PATH = Path(__file__).with_name("grammar.lark")


@lru_cache(maxsize=1)
def _lark() -> Lark:
    """The parser, built once (building the LALR tables is the slow part)."""
    return Lark(
        _GRAMMAR_PATH.read_text(encoding="utf-8"),
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=False,
    )


# ---- AST ---------------------------------------------------------------------------------
# Plain objects rather than lark trees, so the checks below read like the language.


@dataclass
class _Val:
    """A value as written. kind: int | float | name | range | list | concat | repeat."""

    kind: str
    data: Any  # int, float, str, (start, end), list[_Val], or (lhs, rhs) for operators
    line: int
    column: int


@dataclass
class _Entry:
    """`key = value`, or `key qualifier = value` (only `group <modality> = a..b`)."""

    key: str
    line: int
    column: int
    value: _Val
    qualifier: str | None = None
    q_line: int = 0
    q_column: int = 0


@dataclass
class _NamePos:
    """A bare position, for errors located at a name rather than at an entry or value."""

    line: int
    column: int


@dataclass
class _Block:
    """`kind name { entries }`; positions of both the kind and the name."""

    kind: str
    name: str
    line: int
    column: int
    name_line: int
    name_column: int
    entries: list[_Entry | _Block] = field(default_factory=list)

    @property
    def name_at(self) -> _NamePos:
        """Where the block's name is: missing keys and block-level errors point here."""
        return _NamePos(self.name_line, self.name_column)


class _ToAst(Transformer):
    """Lark tree -> `_Block` / `_Entry` / `_Val`. Raises only for an integer too long to
    read (`_read_int`); all other checks come later."""

    def start(self, items: list) -> list:
        return list(items)

    def block(self, items: list) -> _Block:
        kind, name, *entries = items
        return _Block(str(kind), str(name), kind.line, kind.column, name.line, name.column, entries)

    def assign(self, items: list) -> _Entry:
        key, value = items
        return _Entry(str(key), key.line, key.column, value)

    def keyed(self, items: list) -> _Entry:
        key, qual, value = items
        return _Entry(str(key), key.line, key.column, value, str(qual), qual.line, qual.column)

    def integer(self, items: list) -> _Val:
        (tok,) = items
        return _Val("int", _read_int(tok), tok.line, tok.column)

    def number(self, items: list) -> _Val:
        (tok,) = items
        return _Val("float", float(tok), tok.line, tok.column)

    def ident(self, items: list) -> _Val:
        (tok,) = items
        return _Val("name", str(tok), tok.line, tok.column)

    def expert_range(self, items: list) -> _Val:
        start, _dots, end = items
        return _Val("range", (_read_int(start), _read_int(end)), start.line, start.column)

    def bracket_list(self, items: list) -> _Val:
        bracket, *values = items
        return _Val("list", values, bracket.line, bracket.column)

    def concat(self, items: list) -> _Val:
        lhs, op, rhs = items
        return _Val("concat", (lhs, rhs), op.line, op.column)

    def repeat(self, items: list) -> _Val:
        lhs, op, rhs = items
        return _Val("repeat", (lhs, rhs), op.line, op.column)


# ---- errors ------------------------------------------------------------------------------


class _Fail(Exception):
    """A located error before the source name is attached (parse_spec adds it)."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


def _read_int(tok: Any) -> int:
    """An INT token's value; past limits.MAX_INT_DIGITS digits (where Python's own int() limit
    would raise ValueError) a located error instead."""
    digits = len(tok.lstrip("-"))
    if digits > limits.MAX_INT_DIGITS:
        raise _Fail(f"integer of {digits} digits is too long (at most {limits.MAX_INT_DIGITS})", tok.line, tok.column)
    return int(tok)


def _fail_at(node: Any, message: str) -> _Fail:
    """An error at a node with .line/.column (a value, an entry's key, a block's kind)."""
    return _Fail(message, node.line, node.column)


def _describe(v: _Val) -> str:
    """How a found value is named in messages: "integer 3", "name 'silu'", ..."""
    if v.kind == "int":
        return f"integer {v.data}"
    if v.kind == "float":
        return f"float {v.data:g}"
    if v.kind == "name":
        return f"boolean {v.data}" if v.data in ("true", "false") else f"name '{v.data}'"
    if v.kind == "range":
        return f"range {v.data[0]}..{v.data[1]}"
    return "a list"


def _suggest(word: str, known: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _runs(indices: list[int]) -> str:
    """[4, 5, 6, 9] -> "4..7, 9" (end-exclusive, like the language's ranges)."""
    parts: list[str] = []
    i = 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{indices[i]}..{indices[j] + 1}")
        else:
            parts.extend(str(x) for x in indices[i : j + 1])
        i = j + 1
    return ", ".join(parts)


# ---- syntax errors -----------------------------------------------------------------------

_TERMINAL_WORDS = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "$END": "end of file",
}


def _terminal_word(name: str) -> str:
    """A terminal in human terms: NAME -> "a name", RBRACE -> "'}'"."""
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    try:
        pattern = _lark().get_terminal(name).pattern
    except KeyError:
        return name
    return f"'{pattern.value}'" if pattern.type == "str" else name


def _expected(names: set[str] | frozenset[str] | None) -> str:
    words = sorted({_terminal_word(n) for n in names or ()}, key=lambda w: (not w.startswith("'"), w))
    if len(words) == 1:
        return f"expected {words[0]}"
    return "expected one of: " + ", ".join(words) if words else "expected nothing more"


def _syntax_error(err: UnexpectedInput) -> _Fail:
    """Lark's exception -> a one-line "unexpected X, expected one of: ..." error."""
    if isinstance(err, UnexpectedToken):
        tok = err.token
        expected = _expected(err.accepts or err.expected)
        if tok.type == "$END":
            # lark gives $END the position of the last token; point just past it instead.
            line = getattr(tok, "end_line", None) or err.line or 1
            column = getattr(tok, "end_column", None) or err.column or 1
            if not isinstance(line, int) or line < 1:
                line, column = 1, 1
            return _Fail(f"unexpected end of file, {expected}", line, column)
        if tok.type == "NAME":
            found = f"name '{tok}'"
        elif tok.type in ("INT", "FLOAT"):
            found = f"number {tok}"
        else:
            found = f"'{tok}'"
        return _Fail(f"unexpected {found}, {expected}", err.line, err.column)
    if isinstance(err, UnexpectedCharacters):
        return _Fail(f"unexpected character {err.char!r}, {_expected(err.allowed)}", err.line, err.column)
    # UnexpectedEOF and anything newer: still one located line.
    line = getattr(err, "line", 1)
    column = getattr(err, "column", 1)
    return _Fail(
        f"syntax error, {_expected(getattr(err, 'expected', None))}",
        line if isinstance(line, int) and line > 0 else 1,
        column if isinstance(column, int) and column > 0 else 1,
    )
