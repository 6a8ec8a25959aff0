"""Hugging Face checkpoint tensors -> the reference model's parameters, streamed shard by shard.

`plan_weights` says, for every parameter of the reference model, which checkpoint tensors
(or which rows of them) it is made of: per-expert projections are stacked into the
[experts, F, H] tensors, fused tensors are split (DeepSeek's kv_a_proj_with_mqa into the
latent and the shared rotary key, kv_b_proj into per-head keys and values), and the rotary
rows of checkpoints that rotate adjacent channel pairs are de-interleaved so that the
reference's rotate-half rope computes the same scores. The plan is checked against the
checkpoint's headers alone (missing shard, missing tensor, shape mismatch, unexpected
tensor: each a one-line MocompileError) before any data is read.

`load_into` then opens one shard at a time with `safe_open` and copies tensor by tensor into
the model's preallocated parameters, so no more than one checkpoint tensor is in memory
beside the model. Shards come from `model.safetensors.index.json` when present, else from
every `*.safetensors` file of the directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

from mocompile.dsl.hf_import import DENSE, HFCheckpoint
from mocompile.dsl.spec import MLASpec, MoESpec, Spec
from mocompile.errors import MocompileError
from mocompile.files import write_atomically
from mocompile.progress import Bar

if TYPE_CHECKING:  # torch is imported only when weights are actually read
    import torch

    from mocompile.dsl.builder import MoEModel

__all__ = ["Piece", "Target", "CheckpointFiles", "Planner", "build_hf_model", "check_checkpoint", "plan_weights",
           "check_plan", "load_into", "copy_pieces", "read_piece", "save_weights"]

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor, or the rows `rows` of its axis `axis` (a tensor of `length`
    along that axis), as it lands in (a slot of) a reference parameter."""

    source: str
    rows: tuple[int, ...] | None = None
    axis: int = 0
    length: int = 0

    def source_shape(self, slot: Sequence[int]) -> tuple[int, ...]:
        """The shape the checkpoint tensor must have for this piece to fill a slot of shape `slot`."""
        shape = list(slot)
        if self.rows is not None:
            shape[self.axis] = self.length
        return tuple(shape)


@dataclass(frozen=True)
class Target:
    """A reference parameter and its pieces: one, or with `stacked` one per leading index (experts)."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    stacked: bool = False

    @property
    def slot(self) -> tuple[int, ...]:
        return self.shape[1:] if self.stacked else self.shape


# ---- the checkpoint's files -----------------------------------------------------------------
class CheckpointFiles:
    """Which shard holds each tensor, from the index file or from the shards' headers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        index = path / INDEX
        self.index_file: Path | None = index if index.is_file() else None
        if self.index_file is not None:
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise MocompileError(f"{index}: not a readable safetensors index ({e})") from None
            self.shard_of: dict[str, str] = {str(k): str(v) for k, v in weight_map.items()}
        else:
            shards = sorted(p.name for p in path.glob("*.safetensors"))
            if not shards:
                extra = " (only PyTorch .bin weights found; convert them to safetensors)" if any(
                    path.glob("*.bin")) else ""
                raise MocompileError(f"{path}: no *.safetensors weights and no {INDEX}{extra}")
            self.shard_of = {}
            for shard in shards:
                for name in self._keys(shard):
                    self.shard_of[name] = shard

    def open(self, shard: str, needed_for: str = ""):  # -> safetensors' safe_open handle
        """safe_open on one shard (as a context manager); `needed_for` names a tensor it should hold."""
        from safetensors import safe_open

        file = self.path / shard
        if not file.is_file():
            listed = f" (listed in {INDEX} for {needed_for!r})" if needed_for else ""
            raise MocompileError(f"{self.path}: missing shard {shard}{listed}")
        try:
            return safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise MocompileError(f"{file}: not a readable safetensors file ({e})") from None

    def _keys(self, shard: str) -> list[str]:
        with self.open(shard) as f:
            return list(f.keys())

    def shapes(self, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """Shapes of `names` from the shard headers (no tensor data is read)."""
        out: dict[str, tuple[int, ...]] = {}
        for shard, group in _by_shard(names, self.shard_of):
            with self.open(shard, group[0]) as f:
                present = set(f.keys())
                for name in group:
                    if name not in present:
                        raise MocompileError(f"{self.path / shard}: tensor {name!r} is missing (the index puts it in "
                                             "this shard)")
                    out[name] = tuple(f.get_slice(name).get_shape())
        return out


def _by_shard(names: Sequence[str], shard_of: Mapping[str, str]) -> Iterator[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(shard_of[name], []).append(name)
    yield from sorted(groups.items())


# ---- the plan ---------------------------------------------------------------------------------
def _rope_rows(base: int, dim: int, interleaved: bool) -> list[int]:
    """Rows of a rotary block as the reference wants them: pairs (2i, 2i+1) de-interleaved to
    (i, i + dim/2), so rotate-half rope pairs the channels the checkpoint's rope paired."""
    order = list(range(0, dim, 2)) + list(range(1, dim, 2)) if interleaved else list(range(dim))
    return [base + r for r in order]


def _per_head(heads: int, width: int, parts: Sequence[tuple[int, list[int]]]) -> tuple[int, ...]:
    """Rows of a per-head [heads * width] block: `parts` are (offset in the head, rows in it)."""
    return tuple(h * width + off + r for h in range(heads) for off, rows in parts for r in rows)


class Planner:
    """Which checkpoint tensors (or rows of them) make each reference parameter, by the
    checkpoint's family and spec: `plan()` lists a Target per parameter. The import reads
    the plan forwards (plan_weights, load_into) and the Mixtral export backwards
    (hf_export), so both directions name the same tensors. `available`: the checkpoint's
    tensor names, where a layout depends on them (transformers 5's fused expert tensors)."""

    def __init__(self, ckpt: HFCheckpoint, shapes: Mapping[str, tuple[int, ...]], available: set[str]) -> None:
        self.ckpt, self.shapes, self.available = ckpt, shapes, available
        self.targets: list[Target] = []

    def add(self, name: str, *pieces: Piece, stacked: bool = False) -> None:
        self.targets.append(Target(name, tuple(self.shapes[name]), tuple(pieces), stacked))

    def copy(self, name: str, source: str) -> None:
        self.add(name, Piece(source))

    def plan(self) -> list[Target]:
        spec = self.ckpt.spec
        self.copy("embed.text.weight", "model.embed_tokens.weight")
        self.copy("norm.weight", "model.norm.weight")
        if not spec.tie_embeddings:
            self.copy("lm_head.weight", "lm_head.weight")
        for i, block in enumerate(spec.layers):
            hf, ref = f"model.layers.{i}", f"layers.{i}"
            self.copy(f"{ref}.attn_norm.weight", f"{hf}.input_layernorm.weight")
            self.copy(f"{ref}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight")
            if spec.mla is not None:
                self.latent_attention(spec, spec.mla, f"{hf}.self_attn", f"{ref}.attn")
            else:
                self.attention(spec, f"{hf}.self_attn", f"{ref}.attn")
            if block == DENSE:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    self.copy(f"{ref}.ffn.{proj}.weight", f"{hf}.mlp.{proj}.weight")
            else:
                self.moe(spec.block(block), f"{hf}.{self.ckpt.family.weights.moe}", f"{ref}.ffn")
        return self.targets

    def attention(self, spec: Spec, hf: str, ref: str) -> None:
        for proj, bias in (("q_proj", spec.qkv_bias), ("k_proj", spec.qkv_bias), ("v_proj", spec.qkv_bias),
                           ("o_proj", spec.out_bias)):
            self.copy(f"{ref}.{proj}.weight", f"{hf}.{proj}.weight")
            if bias:
                self.copy(f"{ref}.{proj}.bias", f"{hf}.{proj}.bias")
        if spec.qk_norm != "none":
            self.copy(f"{ref}.q_norm.weight", f"{hf}.q_norm.weight")
            self.copy(f"{ref}.k_norm.weight", f"{hf}.k_norm.weight")

    def latent_attention(self, spec: Spec, mla: MLASpec, hf: str, ref: str) -> None:
        h, dn, dr, dv, r = spec.heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim, mla.kv_lora_rank
        rope = self.ckpt.rope_interleaved
        q_rows = _per_head(h, dn + dr, [(0, list(range(dn))), (dn, _rope_rows(0, dr, rope))])
        q_out = "q_b_proj" if mla.q_lora_rank else "q_proj"
        self.add(f"{ref}.{q_out}.weight", Piece(f"{hf}.{q_out}.weight", q_rows, 0, h * (dn + dr)))
        if mla.q_lora_rank:
            self.copy(f"{ref}.q_a_proj.weight", f"{hf}.q_a_proj.weight")
            self.copy(f"{ref}.q_a_norm.weight", f"{hf}.q_a_layernorm.weight")
        kv_a = f"{hf}.kv_a_proj_with_mqa.weight"
        self.add(f"{ref}.kv_a_proj.weight", Piece(kv_a, tuple(range(r)), 0, r + dr))
        self.add(f"{ref}.k_rope_proj.weight", Piece(kv_a, tuple(_rope_rows(r, dr, rope)), 0, r + dr))
        self.copy(f"{ref}.kv_a_norm.weight", f"{hf}.kv_a_layernorm.weight")
        kv_b = f"{hf}.kv_b_proj.weight"
        for proj, part in (("k_b_proj", (0, list(range(dn)))), ("v_b_proj", (dn, list(range(dv))))):
            self.add(f"{ref}.{proj}.weight", Piece(kv_b, _per_head(h, dn + dv, [part]), 0, h * (dn + dv)))
        self.copy(f"{ref}.o_proj.weight", f"{hf}.o_proj.weight")
        if spec.out_bias:
            self.copy(f"{ref}.o_proj.bias", f"{hf}.o_proj.bias")

    def moe(self, moe: MoESpec, hf: str, ref: str) -> None:
        names = self.ckpt.family.weights
        self.copy(f"{ref}.router.weight", f"{hf}.gate.weight")
        if moe.score_bias:
            self.copy(f"{ref}.router.score_bias", f"{hf}.gate.e_score_correction_bias")
        f = moe.expert_hidden
        if f"{hf}.experts.gate_up_proj" in self.available:  # transformers 5's fused layout [E, 2F, H]
            fused = f"{hf}.experts.gate_up_proj"
            self.add(f"{ref}.experts.gate", Piece(fused, tuple(range(f)), 1, 2 * f))
            self.add(f"{ref}.experts.up", Piece(fused, tuple(range(f, 2 * f)), 1, 2 * f))
            self.copy(f"{ref}.experts.down", f"{hf}.experts.down_proj")
        else:  # one tensor per expert and projection
            for slot, proj in zip(("gate", "up", "down"), names.expert):
                self.add(f"{ref}.experts.{slot}",
                         *(Piece(f"{hf}.experts.{e}.{proj}.weight") for e in range(moe.experts)), stacked=True)
        if moe.shared_experts:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                self.copy(f"{ref}.shared.{proj}.weight", f"{hf}.{names.shared}.{proj}.weight")
        if moe.shared_gate:
            self.copy(f"{ref}.shared_gate.weight", f"{hf}.{names.shared}_gate.weight")


def _ignorable(name: str, ckpt: HFCheckpoint) -> bool:
    """Checkpoint tensors the forward pass never reads: cached rope tables, the tied LM head,
    and DeepSeek-V3's multi-token-prediction layers (numbered after the last layer)."""
    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and ckpt.spec.tie_embeddings):
        return True
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(m and int(m.group(1)) >= len(ckpt.spec.layers))


def plan_weights(ckpt: HFCheckpoint, param_shapes: Mapping[str, tuple[int, ...]],
                 files: CheckpointFiles | None = None) -> tuple[list[Target], CheckpointFiles]:
    """The plan filling every parameter (`param_shapes`: name -> shape, tied ones once),
    checked against the checkpoint's headers. Raises MocompileError on any mismatch."""
    files = files or CheckpointFiles(ckpt.path)
    targets = Planner(ckpt, param_shapes, set(files.shard_of)).plan()
    planned = {t.name for t in targets}
    if planned != set(param_shapes):  # a planner bug, not a user error
        raise AssertionError(f"weight plan misses {sorted(set(param_shapes) - planned)}, "
                             f"adds {sorted(planned - set(param_shapes))}")
    check_plan(ckpt, targets, files)
    return targets, files


def check_plan(ckpt: HFCheckpoint, targets: Sequence[Target], files: CheckpointFiles) -> None:
    where = files.index_file or files.path
    expected: dict[str, tuple[int, ...]] = {}
    for t in targets:
        for p in t.pieces:
            expected[p.source] = p.source_shape(t.slot)
    missing = [n for n in expected if n not in files.shard_of]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MocompileError(f"{where}: missing tensor {missing[0]!r}{more}, which the {ckpt.family.name} config "
                             "implies")
    shapes = files.shapes(list(expected))
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise MocompileError(f"{files.path / files.shard_of[name]}: tensor {name!r} has shape {shapes[name]}, "
                                 f"but config.json implies {shape}")
    unused = sorted(n for n in files.shard_of if n not in expected and not _ignorable(n, ckpt))
    if unused:
        more = f" (+{len(unused) - 1} more)" if len(unused) > 1 else ""
        raise MocompileError(f"{where}: unexpected tensor {unused[0]!r}{more}; the importer does not know what it "
                             f"does in a {ckpt.family.name} model")


def load_into(model: "torch.nn.Module", targets: Sequence[Target], files: CheckpointFiles) -> None:
    """Stream the planned tensors into `model`'s parameters, one shard open at a time, one
    tensor in memory at a time (cast to the parameter's dtype)."""
    params = dict(model.named_parameters())
    with Bar(f"reading {files.path.name}", sum(len(t.pieces) for t in targets), unit="tensors") as bar:
        copy_pieces(targets, files, lambda t, slot: params[t.name][slot] if t.stacked else params[t.name],
                    lambda shard: bar.update(1, shard))


def copy_pieces(targets: Sequence[Target], files: CheckpointFiles, dest: Callable[[Target, int], "torch.Tensor"],
                copied: Callable[[str], None] | None = None) -> None:
    """Copy every piece of `targets` into `dest(target, slot)` (cast to its dtype while
    copying), grouped by shard: each shard is opened once and one checkpoint tensor is in
    memory at a time. `copied(shard)` follows each piece. The reference model's parameters
    (load_into) and a lazily read weight (stream_source, a numpy array) both fill this way."""
    import torch

    jobs: dict[str, list[tuple[Target, int, Piece]]] = {}
    for t in targets:
        for slot, p in enumerate(t.pieces):
            jobs.setdefault(files.shard_of[p.source], []).append((t, slot, p))
    with torch.no_grad():
        for shard, items in sorted(jobs.items()):
            with files.open(shard, items[0][2].source) as f:
                for t, slot, p in items:
                    dest(t, slot).copy_(read_piece(f, p))
                    if copied is not None:
                        copied(shard)


def read_piece(f, p: Piece) -> "torch.Tensor":
    """A piece's data: the whole tensor, or only the rows it needs (read as one range)."""
    import torch

    if p.rows is None:
        return f.get_tensor(p.source)
    lo, hi = min(p.rows), max(p.rows) + 1
    index = (slice(None),) * p.axis + (slice(lo, hi),)
    block = f.get_slice(p.source)[index]
    return block.index_select(p.axis, torch.tensor([r - lo for r in p.rows]))


def save_weights(model: "torch.nn.Module", path: str | Path) -> None:
    """The reference model's state dict as safetensors (tied tensors written once each name)."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        tensors[name] = t.clone() if t.data_ptr() in seen else t.contiguous()
        seen.add(t.data_ptr())

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp))
        except Exception as e:  # safetensors wraps I/O failures in its own error type
            raise MocompileError(f"{path}: cannot write the weights ({e})") from None

    write_atomically(path, write, "weights")


def check_checkpoint(ckpt: HFCheckpoint) -> None:
    """Check the checkpoint's tensors against the imported spec without reading any data
    (the reference model is built on torch's meta device only for its parameter shapes)."""
    import torch

    from mocompile.dsl.builder import new_model

    with torch.device("meta"):
        model = new_model(ckpt.spec)
    plan_weights(ckpt, {name: tuple(p.shape) for name, p in model.named_parameters()})


def build_hf_model(ckpt: HFCheckpoint) -> "MoEModel":
    """The reference model of an imported checkpoint with the checkpoint's weights, in eval mode."""
    from mocompile.dsl.builder import new_model

    model = new_model(ckpt.spec)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    targets, files = plan_weights(ckpt, shapes)
    load_into(model, targets, files)
    return model.eval()
