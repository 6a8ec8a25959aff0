"""The table-driven checks that turn a `.moe` AST into the frozen dataclasses of `spec.py`:
every block read against its key schema, the cross-key rules, and every variant resolved
and re-checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from mocompile.dsl.spec import ExpertGroup, FFNSpec, MLASpec, Modality, MoESpec, Spec, Variant
from mocompile.dsl.spec_schema import (BLOCK_KEYS, FFN_KEYS, MLA_KEYS, MODALITY_KEYS, MODEL_KEYS, MOE_KEYS,
                                       VARIANT_KEYS, Key, _GROUP_KEY, _MLA_REQUIRED, _home_of)
from mocompile.dsl.spec_syntax import _Block, _Entry, _Fail, _Val, _fail_at, _plural, _runs, _suggest
from mocompile.dsl.spec_values import _evaluate, _range
from mocompile.dsl.variants import resolve_variant


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
