"""The isolation check from what a user has: a torch module with example inputs, a spec, or
an IR graph. Lowers to the IR, runs the static analysis (the verdict) and, for a leak, the
witness (the numbers). `mocompile.check_isolation` is `check_isolation` here."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.ir.types import TensorType
from mocompile.isolation import BATCH_SYMBOL, IsolationReport, analyze
from mocompile.witness import find_witness


def check_graph(graph: Graph, inputs: Mapping[str, np.ndarray] | None = None, *,
                batch_axes: Mapping[str, int | None] | None = None, sample_ids: str | None = None,
                int_high: Mapping[str, int] | None = None, seed: int = 0) -> IsolationReport:
    """Analyse `graph`; if it leaks and `inputs` are given, attach a witness run on them."""
    try:
        report = analyze(graph, batch_axes, sample_ids)
    except ValueError as e:
        raise MocompileError(str(e)) from None
    if report.verdict == "leaks" and inputs is not None:
        find_witness(graph, report, inputs, seed, int_high)
    return report


def _named_inputs(module: Any, example_inputs: Any) -> dict[str, Any]:
    import torch

    names = [n for n, p in inspect.signature(module.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if isinstance(example_inputs, Mapping):
        unknown = set(example_inputs) - set(names)
        if unknown:
            raise MocompileError(f"{type(module).__name__}.forward has no argument(s) {sorted(unknown)}")
        return {n: example_inputs[n] for n in names if n in example_inputs}
    values = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if len(values) > len(names):
        raise MocompileError(f"{type(module).__name__}.forward takes {len(names)} inputs, got {len(values)}")
    return dict(zip(names, values))


def check_isolation(module: Any, example_inputs: Any, batch_dim: int | Mapping[str, int | None] = 0, *,
                    sample_ids: str | None = None, seed: int = 0) -> IsolationReport:
    """Trace a torch module and decide whether any sample of a batch can influence another's output.

    `example_inputs`: a tensor, a tuple in forward order, or a dict by argument name.
    `batch_dim`: the axis carrying the sample index, for every input or per input name
    (None: shared by all samples); it becomes the symbolic dim "batch", the others stay
    static. `sample_ids`: the input holding each position's sample id when sequences of
    several samples are packed along `batch_dim` (continuous batching).
    The verdict is `.verdict` ("isolated", "leaks", "unknown"), the details `.findings`; a
    leak comes with `.witness`, a run on the example inputs showing the change.
    """
    from mocompile.ir.verifier import VerifyError, verify
    from mocompile.lower_fx import lower_module

    named = _named_inputs(module, example_inputs)
    sym = "tokens" if sample_ids else BATCH_SYMBOL
    types, axes = {}, {}
    for name, t in named.items():
        axis = batch_dim.get(name) if isinstance(batch_dim, Mapping) else batch_dim
        shape: list[Any] = list(t.shape)
        if axis is not None:
            if not -t.dim() <= axis < t.dim():
                raise MocompileError(f"input {name!r} of shape {tuple(t.shape)} has no axis {axis}")
            axis %= t.dim()
            shape[axis] = sym
        types[name] = TensorType(tuple(shape), str(t.dtype).removeprefix("torch."))
        axes[name] = axis
    graph = lower_module(module, types, type(module).__name__)
    try:
        verify(graph)
    except VerifyError as e:
        raise MocompileError(f"lowering {type(module).__name__} produced an invalid graph: {e}") from None
    inputs = {n: t.detach().cpu().numpy() for n, t in named.items()}
    return check_graph(graph, inputs, batch_axes=axes, sample_ids=sample_ids, seed=seed)


def check_spec(spec: Any, variant: str | None = None, *, weights: str | Path | None = None, seed: int = 0,
               batch: int = 2, seq: int = 8, passes: str = "") -> tuple[IsolationReport, Graph]:
    """Build, lower (and run `passes` on) a spec or Hugging Face checkpoint, analyse it, and
    witness a leak on random inputs of `batch` samples and `seq` positions per segment."""
    from mocompile.compiler import lower_source, signature_of, source_for
    from mocompile.pass_manager import PassManager
    from mocompile.runtime import random_inputs

    if batch < 2:
        raise MocompileError(f"--batch must be at least 2 to compare samples (got {batch})")
    src = source_for(spec, variant, weights, seed)
    graph = lower_source(src)
    if passes:
        graph, _ = PassManager(passes).run(graph)
    inputs = random_inputs(signature_of(graph, src.int_high), batch, seq, seed)
    return check_graph(graph, inputs, int_high=src.int_high, seed=seed), graph


def input_axes_of(shapes: Mapping[str, Sequence[Any]]) -> dict[str, int | None]:
    """The batch axis of each tensor of a signature: where its dim is the symbol "batch"."""
    return {n: next((a for a, d in enumerate(s) if d == BATCH_SYMBOL), None) for n, s in shapes.items()}
