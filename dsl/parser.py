"""Parse `.moe` spec files into `Spec` objects, with located, one-line errors.

Two stages. Lark turns the text into a small AST whose nodes remember their line and
column (`_ToAst`, the only tree visitor). Table-driven checks (`_Checker`) then turn that
AST into the frozen dataclasses of `spec.py`. Everything that can be checked from the
spec alone is checked here, and every variant is resolved and re-checked, so downstream
code (the torch builder, the importers) can trust any `Spec` this module returns.

Every failure is a `SpecError` (`file:line:col: error: message`); no lark exception,
KeyError or ValueError escapes.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, NamedTuple

from lark import Lark, Transformer
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from mocompile.dsl import limits
from mocompile.dsl.spec import ExpertGroup, FFNSpec, MLASpec, Modality, MoESpec, Spec, Variant
from mocompile.dsl.variants import resolve_variant
from mocompile.errors import SpecError

__all__ = ["parse_spec", "load_spec"]

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


# ---- value evaluation and types ------------------------------------------------------------


def _evaluate(v: _Val, key: str) -> _Val:
    """Expand list expressions: `[a] + [b] * 3` -> one list value (items keep positions).
    A list longer than limits.MAX_LAYERS is refused before it is built, naming `key`."""
    if v.kind == "list":
        _check_length(len(v.data), key, v)
        return _Val("list", [_evaluate(x, key) for x in v.data], v.line, v.column)
    if v.kind == "concat":
        lhs, rhs = (_evaluate(x, key) for x in v.data)
        for side in (lhs, rhs):
            if side.kind != "list":
                raise _fail_at(side, f"'+' joins lists, found {_describe(side)}")
        _check_length(len(lhs.data) + len(rhs.data), key, v)
        return _Val("list", lhs.data + rhs.data, lhs.line, lhs.column)
    if v.kind == "repeat":
        lhs, count = (_evaluate(x, key) for x in v.data)
        if lhs.kind != "list":
            raise _fail_at(lhs, f"'*' repeats a list, found {_describe(lhs)}")
        if count.kind != "int" or count.data < 0:
            raise _fail_at(count, f"repeat count must be a non-negative integer, found {_describe(count)}")
        _check_length(len(lhs.data) * count.data, key, count)
        return _Val("list", lhs.data * count.data, lhs.line, lhs.column)
    return v


def _check_length(n: int, key: str, at: _Val) -> None:
    if n > limits.MAX_LAYERS:
        raise _fail_at(at, f"'{key}' would have {n} items, more than the {limits.MAX_LAYERS} this compiler accepts")


# A type turns a value into a Python value or raises a located error naming the key.
TypeFn = Callable[[_Val, str], Any]


def _int(minimum: int, maximum: int) -> TypeFn:
    """An integer in [minimum, maximum]; maximum is one of the bounds in limits.py."""
    def convert(v: _Val, key: str) -> int:
        if v.kind != "int":
            raise _fail_at(v, f"'{key}' expects an integer, found {_describe(v)}")
        if v.data < minimum:
            need = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise _fail_at(v, f"'{key}' must be {need}, found {v.data}")
        if v.data > maximum:
            raise _fail_at(v, f"'{key}' = {v.data} is more than the {maximum} this compiler accepts")
        return v.data

    return convert


def _positive_float(v: _Val, key: str) -> float:
    if v.kind not in ("int", "float"):
        raise _fail_at(v, f"'{key}' expects a number, found {_describe(v)}")
    value = float(v.data)
    if not math.isfinite(value):
        raise _fail_at(v, f"'{key}' must be a finite number, found {value}")
    if value <= 0:
        raise _fail_at(v, f"'{key}' must be > 0, found {v.data}")
    return value


def _bool(v: _Val, key: str) -> bool:
    if v.kind != "name" or v.data not in ("true", "false"):
        raise _fail_at(v, f"'{key}' expects true or false, found {_describe(v)}")
    return v.data == "true"


def _enum(*choices: str) -> TypeFn:
    def convert(v: _Val, key: str) -> str:
        allowed = ", ".join(choices)
        if v.kind != "name":
            raise _fail_at(v, f"'{key}' expects one of {allowed}, found {_describe(v)}")
        if v.data not in choices:
            raise _fail_at(
                v, f"unknown {key} '{v.data}', expected one of {allowed}{_suggest(v.data, choices)}"
            )
        return v.data

    return convert


def _name_list(v: _Val, key: str) -> list[_Val]:
    """A non-empty list of names; items are returned as values so later checks can point at them."""
    if v.kind != "list":
        raise _fail_at(v, f"'{key}' expects a list of block names like [a, b] * 2, found {_describe(v)}")
    if not v.data:
        raise _fail_at(v, f"'{key}' is empty, expected at least one block name")
    for item in v.data:
        if item.kind != "name":
            raise _fail_at(item, f"'{key}' expects block names, found {_describe(item)}")
    return v.data


def _layer_selection(v: _Val, key: str) -> _Val:
    """A variant's layers: an int N (the first N) or a list of indices. Range checks need the model."""
    if v.kind == "int":
        return v
    if v.kind != "list":
        raise _fail_at(v, f"'{key}' expects a layer count or a list of layer indices, found {_describe(v)}")
    for item in v.data:
        if item.kind != "int":
            raise _fail_at(item, f"'{key}' expects layer indices (integers), found {_describe(item)}")
    return v


def _range(v: _Val, key: str) -> tuple[int, int]:
    if v.kind != "range":
        raise _fail_at(v, f"'{key}' expects an expert range like 0..4, found {_describe(v)}")
    start, end = v.data
    if start < 0:
        raise _fail_at(v, f"'{key}' range {start}..{end} starts below 0")
    if end <= start:
        raise _fail_at(v, f"'{key}' range {start}..{end} is empty (ranges are end-exclusive, like Python's)")
    return start, end


# ---- key schemas -------------------------------------------------------------------------


class Key(NamedTuple):
    """One key of a block kind: how to read it, its default, whether it must be given."""

    type: TypeFn
    default: Any = None
    required: bool = False


# Each size is bounded (limits.py) so a huge number fails here, before anything uses it.
_HIDDEN = _int(1, limits.MAX_HIDDEN)
_FFN_HIDDEN = _int(1, limits.MAX_FFN_HIDDEN)
_HEADS = _int(1, limits.MAX_HEADS)
_VOCAB = _int(1, limits.MAX_VOCAB)
_EXPERTS = _int(1, limits.MAX_EXPERTS)
_ACTIVATION = _enum("silu", "gelu")

MODEL_KEYS: dict[str, Key] = {
    "hidden": Key(_HIDDEN, required=True),
    "heads": Key(_HEADS, required=True),
    "kv_heads": Key(_HEADS),  # default: heads
    "head_dim": Key(_HIDDEN),  # default: hidden // heads
    "max_seq": Key(_int(1, limits.MAX_SEQ), required=True),
    "norm": Key(_enum("rmsnorm", "layernorm"), "rmsnorm"),
    "norm_eps": Key(_positive_float, 1e-5),
    "rope_theta": Key(_positive_float, 10000.0),
    "tie_embeddings": Key(_bool, False),
    "qkv_bias": Key(_bool, False),
    "out_bias": Key(_bool, False),
    "qk_norm": Key(_enum("none", "whole", "per_head"), "none"),
    "attention": Key(_enum("gqa", "mla"), "gqa"),
    # latent attention (attention = mla) only; see MLA_KEYS
    "q_lora_rank": Key(_int(0, limits.MAX_HIDDEN), 0),
    "kv_lora_rank": Key(_HIDDEN),
    "qk_nope_head_dim": Key(_HIDDEN),
    "qk_rope_head_dim": Key(_HIDDEN),
    "v_head_dim": Key(_HIDDEN),
    "layers": Key(_name_list, required=True),
}
MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_MLA_REQUIRED = MLA_KEYS[1:]

# Exactly one of vocab / features is checked separately (neither is required alone).
MODALITY_KEYS: dict[str, Key] = {
    "vocab": Key(_VOCAB),
    "features": Key(_VOCAB),
}

FFN_KEYS: dict[str, Key] = {
    "hidden": Key(_FFN_HIDDEN, required=True),
    "activation": Key(_ACTIVATION, "silu"),
    "gated": Key(_bool, True),
}

MOE_KEYS: dict[str, Key] = {
    "experts": Key(_EXPERTS, required=True),
    "top_k": Key(_EXPERTS, required=True),
    "expert_hidden": Key(_FFN_HIDDEN, required=True),
    "activation": Key(_ACTIVATION, "silu"),
    "gated": Key(_bool, True),
    "shared_experts": Key(_int(0, limits.MAX_EXPERTS), 0),
    "shared_hidden": Key(_FFN_HIDDEN),  # default: expert_hidden
    "scoring": Key(_enum("softmax", "sigmoid"), "softmax"),
    "normalize_topk": Key(_bool, True),
    "routed_scale": Key(_positive_float, 1.0),
    "n_group": Key(_EXPERTS, 1),
    "topk_group": Key(_EXPERTS, 1),
    "group_score": Key(_enum("top2_sum", "max"), "top2_sum"),
    "score_bias": Key(_bool, False),
    "shared_gate": Key(_bool, False),
    "capacity_factor": Key(_positive_float),  # default: None (no capacity limit)
}

VARIANT_KEYS: dict[str, Key] = {
    "layers": Key(_layer_selection),
    "experts": Key(_EXPERTS),
    "top_k": Key(_EXPERTS),
}

# Block kinds allowed inside `model { }` and their keys. `group <modality> = a..b` is the
# one qualified key, and only moe blocks take it.
BLOCK_KEYS: dict[str, dict[str, Key]] = {
    "modality": MODALITY_KEYS,
    "ffn": FFN_KEYS,
    "moe": MOE_KEYS,
    "variant": VARIANT_KEYS,
}
_GROUP_KEY = "group"
_SCHEMAS: dict[str, dict[str, Key]] = {"model": MODEL_KEYS, **BLOCK_KEYS}


def _home_of(key: str) -> str:
    """Where a misplaced key belongs, for hints like "it belongs in a moe block"."""
    homes = [kind for kind, schema in _SCHEMAS.items() if key in schema]
    if key == _GROUP_KEY:
        homes = ["moe"]
    return " or ".join(f"a {h} block" if h != "model" else "the model block" for h in homes)


# ---- the checker -------------------------------------------------------------------------


@dataclass
class _Read:
    """A block's keys after reading: values (defaults filled in) and where each was written."""

    values: dict[str, Any]
    entries: dict[str, _Entry]
    groups: list[_Entry] = field(default_factory=list)

    def at(self, key: str, fallback: Any) -> Any:
        """Position of a key's value, or `fallback` (the block's name) when it was defaulted."""
        entry = self.entries.get(key)
        return entry.value if entry is not None else fallback


@dataclass
class _NamePos:
    """A bare position, for errors located at a name rather than at an entry or value."""

    line: int
    column: int


class _Checker:
    """Reads the AST against the key schemas and checks the cross-key rules."""

    # -- reading blocks --------------------------------------------------------------------
    def read(self, what: str, entries: list[_Entry | _Block], schema: dict[str, Key],
             name_at: Any, allow_groups: bool = False) -> _Read:
        """Type-check the plain `key = value` entries of one block against its schema."""
        values: dict[str, Any] = {}
        seen: dict[str, _Entry] = {}
        groups: dict[str, _Entry] = {}
        for entry in entries:
            if isinstance(entry, _Block):
                raise _fail_at(entry, f"'{entry.kind} {entry.name} {{ ... }}' cannot be nested inside {what}")
            if entry.qualifier is not None:
                if entry.key != _GROUP_KEY:
                    raise _Fail(
                        f"unexpected name '{entry.qualifier}' after '{entry.key}', expected '='",
                        entry.q_line, entry.q_column,
                    )
                if not allow_groups:
                    raise _fail_at(entry, f"'group' entries belong in a moe block, not in {what}")
                first = groups.get(entry.qualifier)
                if first is not None:
                    raise _Fail(
                        f"duplicate key 'group {entry.qualifier}' in {what} (first set at line {first.line})",
                        entry.q_line, entry.q_column,
                    )
                groups[entry.qualifier] = entry
                continue
            if entry.key == _GROUP_KEY and allow_groups:
                raise _fail_at(entry, "'group' needs a modality name: group <modality> = a..b")
            if entry.key not in schema:
                raise _fail_at(entry, self._unknown_key(entry.key, what, schema))
            if entry.key in seen:
                raise _fail_at(
                    entry, f"duplicate key '{entry.key}' in {what} (first set at line {seen[entry.key].line})"
                )
            seen[entry.key] = entry
            values[entry.key] = schema[entry.key].type(_evaluate(entry.value, entry.key), entry.key)
        missing = [k for k, spec in schema.items() if spec.required and k not in seen]
        if missing:
            keys = ", ".join(f"'{k}'" for k in missing)
            raise _fail_at(name_at, f"{what} is missing required key{'s' if len(missing) > 1 else ''} {keys}")
        for key, spec in schema.items():
            values.setdefault(key, spec.default)
        return _Read(values, seen, list(groups.values()))

    @staticmethod
    def _unknown_key(key: str, what: str, schema: dict[str, Key]) -> str:
        if key in BLOCK_KEYS or key == "model":
            return f"'{key}' starts a block ('{key} <name> {{ ... }}'), it is not a key of {what}"
        hint = _suggest(key, list(schema))
        if not hint and _home_of(key):
            hint = f" ('{key}' belongs in {_home_of(key)})"
        known = ", ".join(schema)
        return f"unknown key '{key}' in {what}{hint}; known keys: {known}"

    # -- whole file ------------------------------------------------------------------------
    def check(self, entries: list[_Entry | _Block], source: str) -> Spec:
        model = self._the_model(entries)
        where = f"model '{model.name}'"
        model_at = model.name_at

        # Split the model's entries: its own keys, and its blocks in declaration order.
        own: list[_Entry | _Block] = []
        blocks: dict[str, list[_Block]] = {kind: [] for kind in BLOCK_KEYS}
        named: dict[str, _Block] = {}  # modality / ffn / moe names share one namespace
        variant_names: dict[str, _Block] = {}
        for entry in model.entries:
            if isinstance(entry, _Entry):
                own.append(entry)
                continue
            if entry.kind not in BLOCK_KEYS:
                kinds = ", ".join(BLOCK_KEYS)
                raise _fail_at(
                    entry,
                    f"unknown block kind '{entry.kind}'{_suggest(entry.kind, list(BLOCK_KEYS))}, "
                    f"expected one of {kinds}",
                )
            space = variant_names if entry.kind == "variant" else named
            first = space.get(entry.name)
            if first is not None:
                raise _Fail(
                    f"duplicate name '{entry.name}': {entry.kind} '{entry.name}' clashes with "
                    f"{first.kind} '{first.name}' at line {first.name_line}",
                    entry.name_line, entry.name_column,
                )
            space[entry.name] = entry
            blocks[entry.kind].append(entry)

        top = self.read(where, own, MODEL_KEYS, model_at)
        modalities = [self.modality(b) for b in blocks["modality"]]
        ffns = [self.ffn(b) for b in blocks["ffn"]]
        moes = [self.moe(b, modalities) for b in blocks["moe"]]

        hidden, heads = top.values["hidden"], top.values["heads"]
        mla = self.mla(top, model_at)
        kv_heads = top.values["kv_heads"] or heads
        if heads % kv_heads:
            raise _fail_at(
                top.at("kv_heads", model_at),
                f"'heads' = {heads} is not divisible by 'kv_heads' = {kv_heads} (grouped-query attention "
                "shares each kv head among an equal number of query heads)",
            )
        head_dim = top.values["head_dim"]
        if mla is not None:
            head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        elif head_dim is None:
            if hidden % heads:
                raise _fail_at(
                    top.at("heads", model_at),
                    f"'hidden' = {hidden} is not divisible by 'heads' = {heads}; "
                    "change one, or set 'head_dim' explicitly",
                )
            head_dim = hidden // heads
        if mla is None and head_dim % 2:
            raise _fail_at(
                top.at("head_dim", top.at("heads", model_at)),
                f"head_dim = {head_dim} must be even (rotary embeddings rotate pairs of channels)",
            )
        if not any(m.is_tokens for m in modalities):
            raise _fail_at(
                model_at,
                f"{where} has no token modality: declare one with 'vocab', e.g. "
                "'modality text { vocab = 32000 }' (the LM head predicts its tokens)",
            )

        layers = self.layers(top.values["layers"], named)
        variant_reads = [self.read(f"variant '{b.name}'", b.entries, VARIANT_KEYS,
                                   b.name_at) for b in blocks["variant"]]
        variants = [
            self.variant(b, r, len(layers), moes)
            for b, r in zip(blocks["variant"], variant_reads)
        ]

        spec = Spec(
            name=model.name,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            max_seq=top.values["max_seq"],
            layers=tuple(layers),
            modalities=tuple(modalities),
            ffns=tuple(ffns),
            moes=tuple(moes),
            variants=tuple(variants),
            norm=top.values["norm"],
            norm_eps=top.values["norm_eps"],
            rope_theta=top.values["rope_theta"],
            tie_embeddings=top.values["tie_embeddings"],
            qkv_bias=top.values["qkv_bias"],
            out_bias=top.values["out_bias"],
            qk_norm=top.values["qk_norm"],
            mla=mla,
            source=source,
        )
        for block, read in zip(blocks["variant"], variant_reads):
            self.recheck_variant(spec, block, read)
        return spec

    @staticmethod
    def mla(top: _Read, model_at: Any) -> MLASpec | None:
        """The latent-attention settings: all of them with `attention = mla`, none without."""
        if top.values["attention"] != "mla":
            for key in MLA_KEYS:
                if key in top.entries:
                    raise _fail_at(top.entries[key], f"'{key}' only applies to latent attention; set 'attention = mla'")
            return None
        missing = [k for k in _MLA_REQUIRED if k not in top.entries]
        if missing:
            keys = ", ".join(f"'{k}'" for k in missing)
            raise _fail_at(top.at("attention", model_at), f"'attention = mla' needs {keys}")
        for key, why in (("head_dim", "the query/key head is qk_nope_head_dim + qk_rope_head_dim"),
                         ("kv_heads", "keys and values are expanded per query head from one latent"),
                         ("qkv_bias", "the latent projections have no bias"),
                         ("qk_norm", "the latents are normalised instead")):
            if key in top.entries and top.values[key] not in (False, "none", top.values["heads"]):
                raise _fail_at(top.entries[key], f"'{key}' cannot be set with 'attention = mla' ({why})")
        rope = top.values["qk_rope_head_dim"]
        if rope % 2:
            raise _fail_at(top.entries["qk_rope_head_dim"],
                           f"qk_rope_head_dim = {rope} must be even (rotary embeddings rotate pairs of channels)")
        return MLASpec(**{k: top.values[k] for k in MLA_KEYS})

    @staticmethod
    def _the_model(entries: list[_Entry | _Block]) -> _Block:
        """Exactly one `model <name> { ... }` and nothing else at the top level."""
        model: _Block | None = None
        for entry in entries:
            if isinstance(entry, _Entry):
                raise _fail_at(entry, f"expected 'model <name> {{ ... }}', found key '{entry.key}' outside it")
            if entry.kind != "model":
                if entry.kind in BLOCK_KEYS:
                    message = f"'{entry.kind}' blocks go inside the model block, expected 'model <name> {{ ... }}'"
                else:
                    message = (f"unknown block kind '{entry.kind}'{_suggest(entry.kind, ['model'])}, "
                               "expected 'model <name> { ... }'")
                raise _fail_at(entry, message)
            if model is not None:
                raise _fail_at(
                    entry, f"only one model per file: '{model.name}' is already defined at line {model.line}"
                )
            model = entry
        if model is None:
            raise _Fail("empty spec, expected 'model <name> { ... }'", 1, 1)
        return model

    # -- blocks ----------------------------------------------------------------------------
    def modality(self, block: _Block) -> Modality:
        what = f"modality '{block.name}'"
        name_at = block.name_at
        read = self.read(what, block.entries, MODALITY_KEYS, name_at)
        given = [read.entries[k] for k in ("vocab", "features") if k in read.entries]
        if not given:
            raise _fail_at(
                name_at, f"{what} needs exactly one of 'vocab' (a token modality) or 'features' (a feature modality)"
            )
        if len(given) > 1:
            second = max(given, key=lambda e: (e.line, e.column))
            raise _fail_at(second, f"{what} sets both 'vocab' and 'features', expected exactly one of them")
        return Modality(block.name, vocab=read.values["vocab"], features=read.values["features"])

    def ffn(self, block: _Block) -> FFNSpec:
        read = self.read(f"ffn '{block.name}'", block.entries, FFN_KEYS,
                         block.name_at)
        return FFNSpec(block.name, **read.values)

    def moe(self, block: _Block, modalities: list[Modality]) -> MoESpec:
        what = f"moe '{block.name}'"
        name_at = block.name_at
        read = self.read(what, block.entries, MOE_KEYS, name_at, allow_groups=True)
        known = [m.name for m in modalities]
        groups: list[ExpertGroup] = []
        for entry in read.groups:
            if entry.qualifier not in known:
                raise _Fail(
                    f"group for unknown modality '{entry.qualifier}' in {what}"
                    f"{_suggest(entry.qualifier or '', known)}; known modalities: {', '.join(known) or 'none'}",
                    entry.q_line, entry.q_column,
                )
            start, end = _range(_evaluate(entry.value, f"group {entry.qualifier}"), f"group {entry.qualifier}")
            groups.append(ExpertGroup(entry.qualifier, start, end))
        values = dict(read.values)
        if values["shared_hidden"] is None:
            values["shared_hidden"] = values["expert_hidden"]
        moe = MoESpec(block.name, groups=tuple(sorted(groups, key=lambda g: g.start)), **values)

        group_at = {f"group:{e.qualifier}": e.value for e in read.groups}
        self.check_moe(moe, what, lambda key: group_at.get(key) or read.at(key, name_at),
                       modalities, first_group=read.groups[0] if read.groups else name_at)
        return moe

    @staticmethod
    def check_moe(moe: MoESpec, what: str, at: Callable[[str], Any], modalities: list[Modality],
                  first_group: Any) -> None:
        """Cross-key rules of one MoE block. `at(key)` locates a key (or a group's modality)."""
        if moe.top_k > moe.experts:
            raise _fail_at(at("top_k"), f"'top_k' = {moe.top_k} is larger than 'experts' = {moe.experts} in {what}")
        if moe.shared_gate and not moe.shared_experts:
            raise _fail_at(at("shared_gate"), f"'shared_gate' gates the shared experts, but {what} has none "
                                              "(set 'shared_experts')")
        if moe.topk_group > moe.n_group:
            raise _fail_at(
                at("topk_group"),
                f"'topk_group' = {moe.topk_group} is larger than 'n_group' = {moe.n_group} in {what}",
            )
        if moe.groups:
            if moe.n_group > 1:
                raise _fail_at(
                    at("n_group"),
                    f"{what} uses modality groups together with 'n_group' = {moe.n_group}; "
                    "group-limited routing and modality groups are not supported together",
                )
            ordered = sorted(moe.groups, key=lambda g: (g.start, g.end))
            for g in ordered:
                if g.end > moe.experts:
                    raise _fail_at(
                        at(f"group:{g.modality}"),
                        f"group {g.modality} = {g.start}..{g.end} exceeds the {moe.experts} experts of {what} "
                        f"(valid experts are 0..{moe.experts})",
                    )
            for prev, g in zip(ordered, ordered[1:]):
                if g.start < prev.end:
                    raise _fail_at(
                        at(f"group:{g.modality}"),
                        f"group {g.modality} = {g.start}..{g.end} overlaps "
                        f"group {prev.modality} = {prev.start}..{prev.end} in {what}",
                    )
            covered = {e for g in moe.groups for e in range(g.start, g.end)}
            left_out = [e for e in range(moe.experts) if e not in covered]
            if left_out:
                raise _fail_at(
                    first_group,
                    f"the groups of {what} leave expert{'s' if len(left_out) > 1 else ''} {_runs(left_out)} "
                    f"in no group; groups must cover 0..{moe.experts} exactly",
                )
            grouped = {g.modality for g in moe.groups}
            without = [m.name for m in modalities if m.name not in grouped]
            if without:
                raise _fail_at(
                    first_group,
                    f"{what} has modality groups but none for modality {', '.join(repr(n) for n in without)}; "
                    "with groups, every modality needs one",
                )
            smallest = min(moe.groups, key=lambda g: (g.end - g.start, g.start))
            size = smallest.end - smallest.start
            if moe.top_k > size:
                raise _fail_at(
                    at("top_k"),
                    f"'top_k' = {moe.top_k} is larger than the smallest modality group of {what} "
                    f"({smallest.modality} = {smallest.start}..{smallest.end}, {_plural(size, 'expert')})",
                )
        if moe.n_group > 1:
            if moe.experts % moe.n_group:
                raise _fail_at(
                    at("n_group"),
                    f"'n_group' = {moe.n_group} does not divide 'experts' = {moe.experts} in {what}",
                )
            per_group = moe.experts // moe.n_group
            if per_group < 2 and moe.group_score == "top2_sum":
                raise _fail_at(
                    at("n_group"),
                    f"'n_group' = {moe.n_group} leaves {_plural(per_group, 'expert')} per routing group in {what}; "
                    "group-limited routing scores each group by its top 2 experts, so it needs at least 2",
                )
            reachable = moe.topk_group * per_group
            if moe.top_k > reachable:
                raise _fail_at(
                    at("top_k"),
                    f"'top_k' = {moe.top_k} is larger than the {reachable} experts a token can reach in {what} "
                    f"(topk_group {moe.topk_group} x {per_group} experts per group)",
                )

    def layers(self, items: list[_Val], named: dict[str, _Block]) -> list[str]:
        """Layer list items must name ffn or moe blocks."""
        known = [name for name, block in named.items() if block.kind in ("ffn", "moe")]
        known_text = ", ".join(known) if known else "none (declare ffn or moe blocks)"
        for item in items:
            if item.data in known:
                continue
            other = named.get(item.data)
            if other is not None:
                raise _fail_at(
                    item, f"'layers' names {other.kind} '{item.data}', expected an ffn or moe block; "
                          f"known blocks: {known_text}",
                )
            raise _fail_at(
                item, f"'layers' names unknown block '{item.data}'{_suggest(item.data, known)}; "
                      f"known blocks: {known_text}",
            )
        return [item.data for item in items]

    def variant(self, block: _Block, read: _Read, n_layers: int, moes: list[MoESpec]) -> Variant:
        """Variant rules that need the model: layer indices in range, expert counts that split evenly."""
        what = f"variant '{block.name}'"
        name_at = block.name_at
        layers: tuple[int, ...] | None = None
        sel: _Val | None = read.values["layers"]
        if sel is not None and sel.kind == "int":
            if sel.data < 1:
                raise _fail_at(sel, f"'layers' = {sel.data} in {what} keeps no layers, expected 1 to {n_layers}")
            if sel.data > n_layers:
                raise _fail_at(
                    sel, f"'layers' = {sel.data} in {what} is more than the model's {_plural(n_layers, 'layer')}"
                )
            layers = tuple(range(sel.data))
        elif sel is not None:
            if not sel.data:
                raise _fail_at(sel, f"'layers' in {what} is empty, expected at least one layer index")
            previous: int | None = None
            for item in sel.data:
                if not 0 <= item.data < n_layers:
                    raise _fail_at(
                        item,
                        f"layer index {item.data} in {what} is out of range: the model has "
                        f"{_plural(n_layers, 'layer')} (indices 0..{n_layers - 1})",
                    )
                if previous is not None and item.data <= previous:
                    raise _fail_at(
                        item, f"layer indices in {what} must be strictly increasing, found {item.data} after {previous}"
                    )
                previous = item.data
            layers = tuple(item.data for item in sel.data)

        experts, top_k = read.values["experts"], read.values["top_k"]
        for key, value in (("experts", experts), ("top_k", top_k)):
            if value is not None and not moes:
                raise _fail_at(read.at(key, name_at), f"'{key}' in {what} needs a moe block, but the model has none")
        for moe in moes:
            parts = len(moe.groups) or moe.n_group
            part_word = "modality groups" if moe.groups else "routing groups (n_group)"
            if experts is not None:
                if experts > moe.experts:
                    raise _fail_at(
                        read.at("experts", name_at),
                        f"'experts' = {experts} in {what} is more than the {moe.experts} experts of moe '{moe.name}'",
                    )
                if experts % parts:
                    raise _fail_at(
                        read.at("experts", name_at),
                        f"'experts' = {experts} in {what} does not split evenly across the {parts} "
                        f"{part_word} of moe '{moe.name}'",
                    )
            kept = moe.experts if experts is None else experts
            k = moe.top_k if top_k is None else top_k
            k_at = read.at("top_k", read.at("experts", name_at))
            k_from = "" if top_k is not None else f" (top_k {k} inherited from moe '{moe.name}'; set a smaller top_k)"
            if moe.groups and k > kept // parts:
                raise _fail_at(
                    k_at,
                    f"'top_k' = {k} in {what} is larger than the {_plural(kept // parts, 'expert')} it keeps per "
                    f"modality group of moe '{moe.name}'{k_from}",
                )
            if k > kept:
                raise _fail_at(
                    k_at, f"'top_k' = {k} in {what} is larger than the {_plural(kept, 'expert')} it keeps of moe '{moe.name}'"
                          f"{k_from}",
                )
        return Variant(block.name, layers=layers, experts=experts, top_k=top_k)

    def recheck_variant(self, spec: Spec, block: _Block, read: _Read) -> None:
        """Resolve the variant and re-run the MoE rules on the result: a valid variant always builds."""
        what = f"variant '{block.name}'"
        name_at = block.name_at
        resolved = resolve_variant(spec, block.name)

        def at(key: str) -> Any:
            if key == "top_k":
                return read.at("top_k", read.at("experts", name_at))
            return read.at("experts", name_at)

        for moe in resolved.spec.moes:
            where = f"{what} (moe '{moe.name}' shrunk to {moe.experts} experts, top_k {moe.top_k})"
            self.check_moe(moe, where, at, list(spec.modalities), first_group=at("experts"))


# ---- public API --------------------------------------------------------------------------


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
