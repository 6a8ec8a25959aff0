"""skip-layers: remove whole decoder layers.

    skip-layers(speedup=1.5)        Unified Layer Skipping: round(L * (1 - 1/1.5)) layers,
                                    spread evenly over the middle of the stack
    skip-layers(n=2)                the same spacing, a given number of layers
    skip-layers(n=2,by=influence)   ShortGPT: the 2 layers of lowest block influence,
                                    1 - cos(hidden state in, hidden state out), on calibration

A removed layer's output is replaced by its input (the residual stream passes it by), so
the artifact has fewer layers, fewer weights and a KV cache with fewer entries. The uniform
choice does not look at any input (first and last layer always kept); batching and the KV
cache work as before. Layers are the graph's `blocks.Block`s.
"""

from __future__ import annotations

from typing import Any, Literal

from mocompile.blocks import Block, blocks, remove_blocks
from mocompile.calib_record import record
from mocompile.calibration import Calibration
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.pass_manager import PassContext, register_pass
from mocompile.passes.calibrated import CalibratedPass


def layers_for_speedup(layers: int, speedup: float) -> int:
    """How many of `layers` layers Unified Layer Skipping removes for a target speed-up."""
    return int(round(layers * (1 - 1 / speedup)))


def evenly_spaced(layers: int, n: int) -> list[int]:
    """`n` layer indices spread evenly over 1..layers-2 (the first and last layer stay)."""
    middle = layers - 2
    if n > middle:
        raise MocompileError(f"skip-layers: cannot remove {n} of {layers} layers keeping the first and last")
    return [1 + (2 * i + 1) * middle // (2 * n) for i in range(n)]


def lowest_influence(influence: dict[str, float], stack: list[Block], n: int) -> list[int]:
    """Indices of the `n` layers of least influence (ties: the later layer first)."""
    if n >= len(stack):
        raise MocompileError(f"skip-layers: cannot remove {n} of {len(stack)} layers (one must stay)")
    order = sorted(range(len(stack)), key=lambda i: (influence[stack[i].name], -i))
    return sorted(order[:n])


@register_pass("skip-layers")
class SkipLayers(CalibratedPass):
    """Remove decoder layers: evenly spaced middle layers for a speed-up, or the least influential (ShortGPT)."""

    def __init__(self, speedup: float | None = None, n: int | None = None,
                 by: Literal["uniform", "influence"] = "uniform", calib: int = 16, seq: int = 32, seed: int = 0,
                 held_out: float = 0.25) -> None:
        if (speedup is None) == (n is None):
            raise MocompileError("skip-layers: give exactly one of speedup=S or n=N")
        if speedup is not None and (speedup < 1 or by != "uniform"):
            raise MocompileError("skip-layers: speedup=S (S >= 1) spaces the layers evenly; use n=N with by=influence")
        if n is not None and n < 0:
            raise MocompileError(f"skip-layers: n must be >= 0 (got {n})")
        self.speedup, self.n, self.by = speedup, n, by
        self.init_calibration(calib, seq, seed, held_out)

    def describe(self) -> str:
        return f"skip-layers(speedup={self.speedup:g})" if self.speedup is not None else \
            f"skip-layers(n={self.n},by={self.by})"

    def transform(self, graph: Graph, fit: Calibration, ctx: PassContext) -> tuple[dict[str, Any], str]:
        stack = blocks(graph)
        count = self.n if self.n is not None else layers_for_speedup(len(stack), self.speedup)
        report: dict[str, Any] = {"layers": [len(stack), len(stack) - count], "method": self.by}
        if self.by == "influence":
            rec = record(graph, fit, ["influence"]).influence
            influence = {b.name: rec[b.name].mean for b in stack}
            chosen = lowest_influence(influence, stack, count)
            report["influence"] = {k: round(v, 6) for k, v in influence.items()}
        else:
            chosen = evenly_spaced(len(stack), count)
        remove_blocks(graph, [stack[i] for i in chosen])
        report["removed"] = [stack[i].name for i in chosen]
        names = ", ".join(str(stack[i].index) for i in chosen) or "none"
        return report, f"layers {len(stack)} -> {len(stack) - count} (removed {names}; {self.by})"
