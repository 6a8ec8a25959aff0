"""The torch-side columns of bench_models.py, each checked against eager before it is timed.

`eager` runs the reference model as dsl/ builds it, whose experts run in a Python loop over
the experts a batch hits (Hugging Face style). That loop reads `nonzero(...).tolist()`, so
torch.compile cuts the graph at every MoE block and runs the experts eagerly (its times then
equal eager's), and an ONNX export cannot express it at all. The two graph baselines
therefore run a copy of the model written to compile: the same weights with the experts in
their loop-free gathered form (`Experts.forward_gathered`: same arithmetic, only the chosen
experts read). torch.compile gets it with fullgraph=True after torch._dynamo.explain has
counted its graph breaks: a row with any is not timed, its cell says how many.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import engines
from harness import NotMeasured
from mocompile.dsl.kv_cache import CachedStep
from mocompile.dsl.modules import Experts

COMPILED_MODEL = ("the reference model with its experts in the loop-free gathered form (`Experts.forward_gathered`), "
                  "`torch.compile(fullgraph=True, dynamic=False)` per row")


def loop_free(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` (same weights) whose experts run in the gathered form, in eval mode
    (the reference has no dropout or batch statistics: eval only tells the exporter so)."""
    twin = copy.deepcopy(model).eval()
    for m in twin.modules():
        if isinstance(m, Experts):
            m.export_friendly = True
    return twin


class TokenStep(torch.nn.Module):
    """A decode step of a reference model fed only new tokens (a multimodal model's other
    segments are empty in it), with the cache passed explicitly: what is exported and compiled."""

    def __init__(self, model: torch.nn.Module, token_name: str) -> None:
        super().__init__()
        self.step, self.token_name = CachedStep(model), token_name

    def forward(self, token: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.step.segments({self.token_name: token}, *past)


def logits(out) -> np.ndarray:
    """The logits of a model's or a step's output (a step also returns the cache)."""
    return (out[0] if isinstance(out, (tuple, list)) else out).numpy()


def check_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    if not np.abs(got - want).max() <= 1e-4 * np.abs(want).max():
        raise RuntimeError(f"{what} output disagrees with eager (max abs difference {np.abs(got - want).max():.3g})")


def graph_breaks(fn: Callable, args: tuple, kwargs: dict) -> tuple[int, list[str]]:
    """torch._dynamo.explain's count of graph breaks of fn(*args, **kwargs), and their reasons."""
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    torch._dynamo.reset()  # explain's traces must not count against the compiled model's cache
    return explained.graph_break_count, [str(r.reason).splitlines()[0] for r in explained.break_reasons]


def compiled_runner(fn: Callable, args: tuple, kwargs: dict, want: np.ndarray, row: dict) -> Callable[[], object]:
    """The torch.compile column's timed call, checked against eager: fn compiled whole, or
    NotMeasured if torch._dynamo.explain finds a graph break (their count goes in row) or if
    a second call compiles again (a guard that fails every call would time compilation)."""
    breaks, reasons = graph_breaks(fn, args, kwargs)
    row["graph_breaks"] = breaks
    if breaks:
        raise NotMeasured(f"not measured: {breaks} graph breaks", "; ".join(dict.fromkeys(reasons)))
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    check_close(logits(compiled(*args, **kwargs)), want, "torch.compile")
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled(*args, **kwargs)
    if torch._dynamo.utils.counters["stats"]["unique_graphs"] != frames:
        raise NotMeasured("not measured: recompiles", "torch.compile compiled again on the second call")
    engines.record_compiled()
    return lambda: compiled(*args, **kwargs)


def ort_runner(model: torch.nn.Module, args: tuple[torch.Tensor, ...], names: list[str], path: Path,
               want: np.ndarray) -> Callable[[], object]:
    """An ONNX Runtime session on a torch.onnx (dynamo) export of `model` for these input
    shapes, checked against eager."""
    torch.onnx.export(model, args, str(path), input_names=names, dynamo=True, verbose=False)
    session = engines.ort_session(str(path))
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    check_close(session.run(None, feeds)[0], want, "ONNX Runtime")
    return lambda: session.run(None, feeds)
