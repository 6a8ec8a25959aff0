"""Elastic sub-models: turn a named variant into a plain spec and a map into the full weights.

Kept experts are the first ones of every partition the router knows about (modality groups,
or DeepSeek routing groups), split evenly, so a sub-model routes like the full model does,
only over fewer experts. The parser has already checked the counts divide evenly.
"""

from __future__ import annotations

from dataclasses import replace

from mocompile.dsl.spec import ExpertGroup, MoESpec, ResolvedVariant, Spec


def _partitions(moe: MoESpec) -> list[tuple[int, int]]:
    """The [start, end) ranges the block's experts are split into for routing."""
    if moe.groups:
        return [(g.start, g.end) for g in moe.groups]
    size = moe.experts // moe.n_group
    return [(i * size, (i + 1) * size) for i in range(moe.n_group)]


def shrink_moe(moe: MoESpec, experts: int | None, top_k: int | None) -> tuple[MoESpec, tuple[int, ...]]:
    """A smaller version of one MoE block and the full-model indices of the experts it keeps."""
    parts = _partitions(moe)
    keep_n = moe.experts if experts is None else experts
    per_part = keep_n // len(parts)
    kept: list[int] = []
    groups: list[ExpertGroup] = []
    for (start, _end), group in zip(parts, moe.groups or [None] * len(parts)):
        if group is not None:
            groups.append(ExpertGroup(group.modality, len(kept), len(kept) + per_part))
        kept.extend(range(start, start + per_part))
    small = replace(
        moe,
        experts=len(kept),
        top_k=moe.top_k if top_k is None else top_k,
        groups=tuple(groups),
    )
    return small, tuple(kept)


def resolve_variant(spec: Spec, name: str | None) -> ResolvedVariant:
    """The spec of variant `name` (None = the full model) with its weight maps."""
    if name is None:
        full_maps = {m.name: tuple(range(m.experts)) for m in spec.moes}
        return ResolvedVariant(spec, tuple(range(len(spec.layers))), full_maps)
    v = spec.variant(name)
    layer_map = tuple(range(len(spec.layers))) if v.layers is None else tuple(v.layers)
    moes = []
    expert_map: dict[str, tuple[int, ...]] = {}
    for moe in spec.moes:
        small, kept = shrink_moe(moe, v.experts, v.top_k)
        moes.append(small)
        expert_map[moe.name] = kept
    small_spec = replace(
        spec,
        name=f"{spec.name}.{v.name}",
        layers=tuple(spec.layers[i] for i in layer_map),
        moes=tuple(moes),
        variants=(),
    )
    return ResolvedVariant(small_spec, layer_map, expert_map)
