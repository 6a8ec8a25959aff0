"""Expert load statistics: how many tokens each expert of each MoE layer receives, and which
experts are chosen together for the same token.

The file format (JSON), which users may also write from their own serving logs:

    {
      "layers": {
        "1": {"tokens": [t_0, ..., t_{E-1}],             # assignments per expert (required)
              "coactivation": [[c_00, ...], ...]},       # optional [E][E]: tokens that chose
        "2": {...}                                       #   both e and f (symmetric; diagonal ignored)
      },
      "model": {"hidden": 7168, "expert_hidden": 2048,   # optional: what one expert is, for the
                "gated": true, "dtype": "bf16",          #   cost model (else command-line flags
                "top_k": 8, "n_group": 8},               #   or DeepSeek-V3's figures)
      "source": "free text: where the counts come from"  # optional
    }

A layer key is the layer's index in the model. The counts are taken as one step's batch; the
cost model can rescale them to another number of tokens per step (`step_tokens`).
`collect` fills the same structure from a compiled graph by running it over calibration
inputs with a hook after every routing node (an op with the `routing_choices` facet).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mocompile.errors import MocompileError
from mocompile.files import read_document

MODEL_KEYS = {"hidden": int, "expert_hidden": int, "gated": bool, "dtype": str, "top_k": int, "n_group": int}


@dataclass
class LayerStats:
    tokens: np.ndarray  # [E] float64, assignments per expert
    coactivation: np.ndarray | None = None  # [E, E] float64, zero diagonal

    @property
    def experts(self) -> int:
        return int(self.tokens.shape[0])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [_num(x) for x in self.tokens]}
        if self.coactivation is not None:
            out["coactivation"] = [[_num(x) for x in row] for row in self.coactivation]
        return out


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


@dataclass
class ExpertStats:
    layers: dict[int, LayerStats]
    model: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": {str(k): v.to_json() for k, v in sorted(self.layers.items())}}
        if self.model:
            out["model"] = dict(self.model)
        if self.source:
            out["source"] = self.source
        return out


def _matrix(value: Any, n: int, where: str) -> np.ndarray:
    if not isinstance(value, list) or len(value) != n or not all(isinstance(r, list) and len(r) == n for r in value):
        raise MocompileError(f"{where}: coactivation must be a {n} x {n} list of lists (one row per expert)")
    try:
        m = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise MocompileError(f"{where}: coactivation holds a value that is not a number") from None
    if not np.isfinite(m).all() or (m < 0).any():
        raise MocompileError(f"{where}: coactivation counts must be finite and non-negative")
    if not np.allclose(m, m.T):
        i, j = np.argwhere(~np.isclose(m, m.T))[0]
        raise MocompileError(f"{where}: coactivation is not symmetric ([{i}][{j}] = {m[i, j]:g}, "
                             f"[{j}][{i}] = {m[j, i]:g})")
    np.fill_diagonal(m, 0.0)
    return m


def parse_stats(data: Any, where: str) -> ExpertStats:
    """Check a statistics document (see the module docstring); errors name the entry."""
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict) or not data["layers"]:
        raise MocompileError(f"{where}: expected {{\"layers\": {{\"<layer>\": {{\"tokens\": [...]}}}}}} "
                             "with at least one layer")
    unknown = sorted(set(data) - {"layers", "model", "source"})
    if unknown:
        raise MocompileError(f"{where}: unknown key {unknown[0]!r} (known: layers, model, source)")
    layers: dict[int, LayerStats] = {}
    for key, entry in data["layers"].items():
        at = f"{where}: layer {key!r}"
        if not re.fullmatch(r"\d+", key):
            raise MocompileError(f"{at}: a layer key is the layer's index, a non-negative integer")
        if not isinstance(entry, dict) or "tokens" not in entry:
            raise MocompileError(f"{at}: expected {{\"tokens\": [count per expert, ...]}}")
        extra = sorted(set(entry) - {"tokens", "coactivation"})
        if extra:
            raise MocompileError(f"{at}: unknown key {extra[0]!r} (known: tokens, coactivation)")
        tokens = entry["tokens"]
        if (not isinstance(tokens, list) or not tokens
                or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in tokens)):
            raise MocompileError(f"{at}: tokens must be a non-empty list of numbers (one per expert)")
        t = np.array(tokens, dtype=np.float64)
        if not np.isfinite(t).all() or (t < 0).any():
            bad = int(np.argmax(~np.isfinite(t) | (t < 0)))
            raise MocompileError(f"{at}: tokens[{bad}] = {tokens[bad]} is not a non-negative count")
        if t.sum() <= 0:
            raise MocompileError(f"{at}: no expert received any token")
        co = _matrix(entry["coactivation"], len(t), at) if entry.get("coactivation") is not None else None
        if co is not None and (co > np.minimum.outer(t, t) * (1 + 1e-9) + 1e-9).any():
            i, j = np.argwhere(co > np.minimum.outer(t, t) * (1 + 1e-9) + 1e-9)[0]
            raise MocompileError(f"{at}: coactivation[{i}][{j}] = {co[i, j]:g} exceeds the tokens of expert "
                                 f"{i if t[i] < t[j] else j} ({min(t[i], t[j]):g})")
        layers[int(key)] = LayerStats(t, co)
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise MocompileError(f"{where}: model must be an object")
    for key, value in model.items():
        kind = MODEL_KEYS.get(key)
        if kind is None:
            raise MocompileError(f"{where}: model: unknown key {key!r} (known: {', '.join(MODEL_KEYS)})")
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
            raise MocompileError(f"{where}: model.{key} must be {'a positive integer' if kind is int else kind.__name__}"
                                 f", got {value!r}")
    source = data.get("source", "")
    return ExpertStats(layers, dict(model), source if isinstance(source, str) else str(source))


def load_stats(path: str | Path) -> ExpertStats:
    """Read and check a statistics file (see the module docstring)."""
    return parse_stats(read_document(path, "statistics file", json.loads, (ValueError,), "JSON"), str(path))


def from_choices(choices: np.ndarray, experts: int) -> LayerStats:
    """Statistics of one layer from the chosen experts of each token ([tokens, k] ids; a
    negative id is a slot that was not served)."""
    onehot = np.zeros((choices.shape[0], experts), dtype=np.float64)
    rows = np.repeat(np.arange(choices.shape[0]), choices.shape[1])
    flat = choices.reshape(-1)
    keep = flat >= 0
    onehot[rows[keep], flat[keep]] = 1.0
    co = onehot.T @ onehot
    tokens = np.diag(co).copy()
    np.fill_diagonal(co, 0.0)
    return LayerStats(tokens, co)


def zipf_choices(experts: int, top_k: int, tokens: int, alpha: float, rng: np.random.Generator,
                 n_group: int = 1, topk_group: int = 1) -> np.ndarray:
    """Synthetic routing with a Zipf-skewed popularity: expert of rank r (a random order) is
    chosen with weight 1/r**alpha, top_k distinct experts per token (Gumbel top-k sampling);
    with groups, as DeepSeek's router, a token first keeps the topk_group groups whose two best
    scores sum highest."""
    ranks = rng.permutation(experts) + 1
    logits = -alpha * np.log(ranks.astype(np.float64))
    scores = logits[None, :] + rng.gumbel(size=(tokens, experts))
    if n_group > 1:
        grouped = scores.reshape(tokens, n_group, experts // n_group)
        group_score = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
        drop = np.argsort(-group_score, axis=-1)[:, topk_group:]
        mask = np.zeros((tokens, n_group), dtype=bool)
        np.put_along_axis(mask, drop, True, axis=-1)
        scores = np.where(np.repeat(mask, experts // n_group, axis=-1), -np.inf, scores)
    return np.argsort(-scores, axis=-1)[:, :top_k]


def zipf_stats(experts: int, top_k: int, tokens: int, alpha: float, layers: int = 1, seed: int = 0,
               n_group: int = 1, topk_group: int = 1) -> ExpertStats:
    """Zipf-skewed statistics for `layers` layers (each its own random popularity order)."""
    if experts % n_group:
        raise MocompileError(f"{experts} experts do not split into {n_group} groups")
    rng = np.random.default_rng(seed)
    out = {i: from_choices(zipf_choices(experts, top_k, tokens, alpha, rng, n_group, topk_group), experts)
           for i in range(layers)}
    return ExpertStats(out, {"top_k": top_k, "n_group": n_group},
                       f"synthetic Zipf load (alpha {alpha:g}, {tokens} tokens, seed {seed})")


def tokens_per_step(stats: ExpertStats, layer: int) -> float:
    """Tokens in the statistics' window for one layer: assignments over top_k (when known)."""
    k = stats.model.get("top_k", 1)
    return float(stats.layers[layer].tokens.sum()) / max(1, k)


def layer_index(loc: str) -> int | None:
    """The layer index in a node's location (`layers.3.ffn.router` -> 3)."""
    for part in loc.split("."):
        if part.isdigit():
            return int(part)
    return None

