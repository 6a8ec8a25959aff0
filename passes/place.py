"""place: decide where every expert lives on a set of devices, from the model's own routing.

    place(preset=8node-64gpu)                 a named device setup
    place(devices=cluster.toml,replicas=8)    a device file, 8 redundant experts per layer
    place(preset=2node-4gpu,calib=32,seq=64)  statistics from 32 calibration sequences of 64

The pass runs the graph over the calibration inputs (the compile's `--calib` data, else
random tokens, which the report says), counts per MoE layer the tokens each expert receives
and the experts chosen together (mocompile.placement.collect), and places the experts
(mocompile.placement.plan). The graph is unchanged; the artifact's manifest keeps, in this
pass's report, the statistics (`stats`, the documented statistics format, so
`mocompile place --stats` can re-plan from them for another cluster) and the plan (`plan`,
the `mocompile place --json` shape).
"""

from __future__ import annotations

from typing import Any

from mocompile.calibration import for_graph
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.pass_manager import Pass, PassContext, PassResult, register_pass
from mocompile.passes.quantize import token_ranges
from mocompile.placement.collect import collect
from mocompile.placement.devices import Cluster, load_cluster
from mocompile.placement.plan import make_plan, shape_of
from mocompile.placement.presets import PRESETS, preset


@register_pass("place")
class Place(Pass):
    """Place experts on devices (a device file or a preset) from expert load on calibration data."""

    def __init__(self, devices: str | None = None, preset: str | None = None, replicas: int | None = None,
                 calib: int = 8, seq: int = 16, seed: int = 0) -> None:
        if (devices is None) == (preset is None):
            raise MocompileError("place: give exactly one of devices=FILE.toml or preset=NAME "
                                 f"(presets: {', '.join(PRESETS)})")
        if preset is not None and preset not in PRESETS:
            raise MocompileError(f"place: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        if replicas is not None and replicas < 0 or calib < 1 or seq < 1:
            raise MocompileError("place: replicas must be >= 0, calib and seq >= 1")
        self.devices, self.preset, self.replicas = devices, preset, replicas
        self.calib, self.seq, self.seed = calib, seq, seed

    def describe(self) -> str:
        where = f"devices={self.devices}" if self.devices else f"preset={self.preset}"
        return f"place({where}{'' if self.replicas is None else f',replicas={self.replicas}'})"

    def cluster(self) -> Cluster:
        return load_cluster(self.devices) if self.devices else preset(self.preset)  # type: ignore[arg-type]

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cluster = self.cluster()
        calibration = for_graph(graph, ctx.calibration, token_ranges(graph, ctx.input_ranges), self.calib,
                                self.seq, self.seed)
        stats = collect(graph, calibration)
        plan = make_plan(stats, cluster, shape_of(stats), self.replicas)
        report: dict[str, Any] = {
            "devices": cluster.name, "calibration": calibration.to_json(), "replicas": plan.replicas,
            "step_time_s": plan.placed.step_time_s, "imbalance": plan.placed.imbalance,
            "stats": stats.to_json(), "plan": plan.to_json()}
        return PassResult(graph, report)
