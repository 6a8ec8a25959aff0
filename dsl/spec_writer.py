"""Spec -> `.moe` text: the inverse of the parser, for specs made by code (the Hugging Face
importer) that a person will read, edit and recompile.

The text states every key that says what the model is (sizes, routing) and otherwise only
keys that differ from their defaults, one per line, with optional end-of-line notes (the
importer uses them to name the config.json key each value came from).
`parse_spec(write_spec(spec))` equals `spec` (apart from `source`).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Iterable, Mapping

from mocompile.dsl.spec import FFNSpec, MoESpec, Spec, Variant

__all__ = ["write_spec"]

INDENT = "    "


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)  # shortest text that reads back as the same float
    return str(v)


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls)}


def _lines(items: Iterable[tuple[str, Any]], notes: Mapping[str, str], scope: str, indent: str) -> list[str]:
    """`key = value` lines, values aligned, each with its note (notes[f"{scope}.{key}"])."""
    items = list(items)
    width = max((len(k) for k, _ in items), default=0)
    lines = [(f"{indent}{key.ljust(width)} = {_value(value)}", notes.get(f"{scope}.{key}")) for key, value in items]
    column = max((len(line) for line, _ in lines), default=0) + 3
    return [f"{line.ljust(column)}# {note}" if note else line for line, note in lines]


def _chosen(obj: Any, always: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """`always` keys, then every other field of `obj` that differs from its default."""
    defaults = _defaults(type(obj))
    keys = list(always) + [k for k in defaults if k not in always and k not in skip and k != "name"]
    return [(k, getattr(obj, k)) for k in keys if k in always or getattr(obj, k) != defaults[k]]


def _layers(names: tuple[str, ...]) -> str:
    """The shortest of the list's forms we try: a repeated period `[a, b] * n`, or runs `[a] * n + [b]`."""
    n = len(names)
    for period in range(1, n // 2 + 1):
        if n % period == 0 and names == names[:period] * (n // period):
            return f"[{', '.join(names[:period])}] * {n // period}"
    runs: list[str] = []
    i = 0
    while i < n:
        j = i
        while j < n and names[j] == names[i]:
            j += 1
        runs.append(f"[{names[i]}]" + (f" * {j - i}" if j - i > 1 else ""))
        i = j
    return " + ".join(runs)


def _ffn(block: FFNSpec, notes: Mapping[str, str]) -> list[str]:
    items = _chosen(block, ("hidden",))
    if len(items) == 1 and not notes.get(f"{block.name}.hidden"):
        return [f"{INDENT}ffn {block.name} {{ hidden = {block.hidden} }}"]
    return [f"{INDENT}ffn {block.name} {{", *_lines(items, notes, block.name, INDENT * 2), f"{INDENT}}}"]


def _moe(block: MoESpec, notes: Mapping[str, str]) -> list[str]:
    items = _chosen(block, ("experts", "top_k", "expert_hidden", "scoring", "normalize_topk"),
                    skip=("groups", "shared_hidden"))
    if block.shared_hidden != block.expert_hidden:  # the parser's default for it
        items.append(("shared_hidden", block.shared_hidden))
    lines = _lines(items, notes, block.name, INDENT * 2)
    lines += [f"{INDENT * 2}group {g.modality} = {g.start}..{g.end}" for g in block.groups]
    return [f"{INDENT}moe {block.name} {{", *lines, f"{INDENT}}}"]


def _variant(v: Variant) -> str:
    parts = []
    if v.layers is not None:
        parts.append(f"layers = [{', '.join(str(i) for i in v.layers)}]")
    parts += [f"{k} = {getattr(v, k)}" for k in ("experts", "top_k") if getattr(v, k) is not None]
    return f"{INDENT}variant {v.name} {{ {'  '.join(parts)} }}"


def _model_keys(spec: Spec) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = [("hidden", spec.hidden), ("heads", spec.heads)]
    if spec.mla is None:
        items.append(("kv_heads", spec.kv_heads))
        if spec.head_dim * spec.heads != spec.hidden:
            items.append(("head_dim", spec.head_dim))
    items += [("max_seq", spec.max_seq), ("norm", spec.norm), ("norm_eps", spec.norm_eps),
              ("rope_theta", spec.rope_theta)]
    defaults = _defaults(Spec)
    items += [(k, getattr(spec, k)) for k in ("tie_embeddings", "qkv_bias", "out_bias", "qk_norm")
              if getattr(spec, k) != defaults[k]]
    if spec.mla is not None:
        items.append(("attention", "mla"))
        items += _chosen(spec.mla, ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                    "v_head_dim"))
    return items


def write_spec(spec: Spec, header: Iterable[str] = (), notes: Mapping[str, str] | None = None) -> str:
    """The `.moe` text of `spec`. `header` lines become `#` comments above the model;
    `notes["model.hidden"]` / `notes["<block>.<key>"]` become end-of-line comments."""
    notes = notes or {}
    out = [f"# {line}".rstrip() for line in header]
    if out:
        out.append("")
    out.append(f"model {spec.name} {{")
    out += _lines(_model_keys(spec), notes, "model", INDENT)
    out.append("")
    for m in spec.modalities:
        key, value = ("vocab", m.vocab) if m.is_tokens else ("features", m.features)
        note = notes.get(f"{m.name}.{key}")
        out.append(f"{INDENT}modality {m.name} {{ {key} = {value} }}" + (f"   # {note}" if note else ""))
    for block in spec.ffns:
        out += _ffn(block, notes)
    for block in spec.moes:
        out += _moe(block, notes)
    out.append("")
    layers = f"{INDENT}layers = {_layers(spec.layers)}"
    out.append(layers + (f"   # {notes['model.layers']}" if notes.get("model.layers") else ""))
    if spec.variants:
        out.append("")
        out += [_variant(v) for v in spec.variants]
    out.append("}")
    return "\n".join(out) + "\n"

