"""The isolation check of any torch module torch.export can capture: capture, analyse,
and run the differential witness where the verdict is not a proof of isolation."""

from __future__ import annotations

from typing import Mapping

import torch

from mocompile.aten.analysis import analyze_program
from mocompile.aten.capture import capture
from mocompile.aten.witness import ProgramRunner, find_witness, shown_leak
from mocompile.isolation import IsolationReport


def check_module(module: torch.nn.Module, inputs: Mapping[str, torch.Tensor], axes: Mapping[str, int | None],
                 sample_ids: str | None = None, seed: int = 0) -> IsolationReport:
    """The verdict of `module(**inputs)` (inputs in forward order, each with its batch axis
    or None). A leak comes with its witness; an unknown verdict is tested by the same search,
    and a change it finds makes the verdict a leak."""
    names = list(inputs)
    tensors = [inputs[n] for n in names]
    captured = capture(module, inputs, axes, packed=sample_ids is not None)
    analysis = analyze_program(captured.program, captured.batch, {n: axes[n] for n in names}, sample_ids)
    report = analysis.report
    if report.verdict != "isolated" and any(a is not None for a in axes.values()):
        find_witness(analysis, ProgramRunner(captured.program, seed), tensors, names, sample_ids, seed)
        shown_leak(report)
    return report
