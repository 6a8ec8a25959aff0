"""Calibration: the inputs a data-driven pass learns from, and a bounded-memory way to
collect statistics of a graph's values on them.

Inputs come from the user (`compile(..., calibration=...)`, `--calib FILE`: token ids as a
`.npy` array `[n, seq]`, or a list of input dicts) or, when nothing is given, are drawn at
random from the graph's signature, and then `Calibration.source` says so, because random
tokens tell a pass little about real activations.

`observe` runs the interpreter over every input with hooks after each node. The interpreter
frees each intermediate once nothing reads it, and the hooks keep running statistics (per
channel maxima, counts), so memory grows with the statistics, not with tokens x activations.
The quantization pass uses it today; the sparsity, layer-skipping and placement passes use
the same inputs and the same hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mocompile.errors import MocompileError
from mocompile.progress import progress
from mocompile.ir.graph import Graph, Node, Value
from mocompile.ir.interpreter import run as interpret
from mocompile.signature import Signature, random_inputs, signature_of

Inputs = dict[str, np.ndarray]
Hook = Callable[[Node, list[np.ndarray]], None]


@dataclass
class Calibration:
    """Calibration inputs (one dict per sample) and where they came from."""

    inputs: list[Inputs]
    source: str  # "FILE (n sequences of s tokens)", "given", or "random tokens (no calibration data given)"

    @property
    def random(self) -> bool:
        return self.source.startswith("random")

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "samples": len(self.inputs), "random": self.random}


def random_calibration(signature: Signature, samples: int, seq: int, seed: int) -> Calibration:
    """`samples` random single sequences of `seq` positions."""
    return Calibration([random_inputs(signature, 1, seq, seed + i) for i in range(samples)],
                       "random tokens (no calibration data given)")


def for_graph(graph: Graph, given: Sequence[Mapping[str, np.ndarray]] | Calibration | None,
              input_ranges: Mapping[str, int], samples: int, seq: int, seed: int) -> Calibration:
    """The calibration of a pass over `graph`: what was given, else random inputs."""
    if isinstance(given, Calibration):
        return given
    if given:
        return Calibration([dict(x) for x in given], "given")
    return random_calibration(signature_of(graph, input_ranges), samples, seq, seed)


TEXT_SEQUENCE = 64  # tokens per calibration sequence cut from a plain-text file


def _token_input(path: Path, signature: Signature) -> Any:
    tokens = [t for t in signature.inputs if t.high is not None]
    if len(tokens) != 1 or len(signature.inputs) != 1:
        raise MocompileError(f"{path}: a token file calibrates a model with one token input; this one takes "
                             f"{', '.join(t.name for t in signature.inputs)} (pass calibration= input dicts instead)")
    return tokens[0]


def _checked_ids(path: Path, ids: np.ndarray, spec: Any, what: str) -> Calibration:
    """[n, seq] ids checked against the vocabulary, one sequence per sample."""
    bad = np.argwhere((ids < 0) | (ids >= spec.high))
    if bad.size:
        i, j = bad[0]
        raise MocompileError(f"{path}: token id {ids[i, j]} at [{i}, {j}] is outside the vocabulary [0, {spec.high})")
    rows = ids.astype(spec.dtype)
    return Calibration([{spec.name: rows[i:i + 1]} for i in range(rows.shape[0])],
                       f"{path} ({rows.shape[0]} sequences of {rows.shape[1]} {what})")


def load_token_file(path: str | Path, signature: Signature, tokenizer: str | Path | None = None,
                    max_seq: int | None = None) -> Calibration:
    """Calibration sequences from a file: token ids as a `.npy` array [n, seq] (n sequences),
    or, when the model comes with a tokenizer (`tokenizer`: its `tokenizer.json`), plain text,
    encoded and cut into sequences of TEXT_SEQUENCE tokens (at most `max_seq`). Checked
    against the signature's token input (integer ids inside its vocabulary); a model with
    other inputs (image or audio features) needs its calibration as input dicts from Python."""
    path = Path(path)
    spec = _token_input(path, signature)
    if not path.is_file():
        raise MocompileError(f"{path}: calibration file not found")
    if path.suffix != ".npy":
        if tokenizer is None:
            raise MocompileError(f"{path}: calibration data must be token ids as a .npy array [n, seq] (plain text "
                                 "needs a model from a checkpoint directory with a tokenizer.json)")
        return load_text_file(path, spec, Path(tokenizer), min(TEXT_SEQUENCE, max_seq or TEXT_SEQUENCE))
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise MocompileError(f"{path}: not a readable .npy array ({e})") from None
    if ids.ndim != 2 or ids.size == 0:
        raise MocompileError(f"{path}: token ids must be a non-empty [n, seq] array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise MocompileError(f"{path}: token ids must be integers, got {ids.dtype}")
    return _checked_ids(path, ids, spec, "tokens")


def load_text_file(path: Path, spec: Any, tokenizer: Path, seq: int) -> Calibration:
    """Plain UTF-8 text encoded with the checkpoint's tokenizer (the `tokenizers` library),
    cut into [n, seq] sequences (a shorter tail is dropped unless it is all there is)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MocompileError(f"{path}: calibration text is not UTF-8 (byte {e.start}); give plain text or a .npy "
                             "array of token ids") from None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MocompileError(f"{path}: plain-text calibration needs the tokenizers package "
                             "(pip install tokenizers)") from None
    try:
        tok = Tokenizer.from_file(str(tokenizer))
    except Exception as e:  # the library raises its own exception types for a bad file
        raise MocompileError(f"{tokenizer}: not a readable tokenizer ({str(e).splitlines()[0] if str(e) else e})") \
            from None
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    if ids.size == 0:
        raise MocompileError(f"{path}: calibration text holds no tokens")
    n = max(ids.size // seq, 1)
    width = seq if ids.size >= seq else ids.size
    return _checked_ids(path, ids[:n * width].reshape(n, width), spec, "tokens of text")


def observe(graph: Graph, calibration: Calibration | Sequence[Inputs], hooks: Sequence[Hook],
            before: Sequence[Hook] = ()) -> None:
    """Run `graph` on every calibration input, calling each hook after every node with its
    outputs, and each `before` hook ahead of every node with its inputs."""
    inputs = calibration.inputs if isinstance(calibration, Calibration) else calibration

    def after(node: Node, outputs: list[np.ndarray]) -> None:
        for hook in hooks:
            hook(node, outputs)

    def ahead(node: Node, args: list[np.ndarray]) -> None:
        for hook in before:
            hook(node, args)

    for sample in progress(inputs, "calibrating: interpreting the model", unit="samples"):
        interpret(graph, sample, after=after, before=ahead if before else None)


@dataclass
class ChannelMax:
    """Running per-channel max |value| (last axis kept) of chosen values: the activation
    ranges that static quantization scales come from."""

    values: Sequence[Value]
    amax: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._wanted = {id(v): v for v in self.values}

    def __call__(self, node: Node, outputs: list[np.ndarray]) -> None:
        for v, a in zip(node.outputs, outputs):
            if id(v) in self._wanted:
                m = np.abs(a).reshape(-1, a.shape[-1]).max(0)
                self.amax[v.name] = np.maximum(self.amax.get(v.name, m), m)

    def of_inputs(self, graph: Graph, inputs: Sequence[Inputs]) -> None:
        """Graph inputs are made by no node: their maxima come straight from the samples."""
        for v in self.values:
            if v in graph.inputs:
                for sample in inputs:
                    self(_InputNode(v), [np.asarray(sample[v.name])])


@dataclass
class _InputNode:
    """Stands for the (absent) producer of a graph input, for hooks that key on outputs."""

    value: Value

    @property
    def outputs(self) -> list[Value]:
        return [self.value]


def channel_max(graph: Graph, values: Sequence[Value], calibration: Calibration | Sequence[Inputs]) -> dict[str, np.ndarray]:
    """Per-channel max |value| of `values` over all calibration inputs."""
    inputs = calibration.inputs if isinstance(calibration, Calibration) else list(calibration)
    stats = ChannelMax(values)
    stats.of_inputs(graph, inputs)
    observe(graph, inputs, [stats])
    return stats.amax
