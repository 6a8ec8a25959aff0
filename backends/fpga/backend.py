"""The FPGA target as a `Backend`:

    --target "fpga [-device=alveo-u280|zcu104|FILE.toml] [-bits=16] [-positions=N]"

(`mocompile compile --device X` adds -device=X). It chooses fixed-point formats from
calibration (precision.py), reuse factors and memory placement for the device
(estimate.py), writes the HLS project (project.py) and builds its C simulation with g++; the
artifact runs here through that simulation (mocompile.hls_runtime) and is verified against
the fixed-point emulation of the same design (emulate.py), bit for bit, with its drift from
the fp32 model recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from mocompile.backends.base import Backend, register_backend
from mocompile.backends.fpga.design import Design
from mocompile.backends.fpga.lowerings import kernel_for, load_kernels
from mocompile.backends.fpga.devices import PRESETS, Device, load_device
from mocompile.backends.fpga.emulate import emulate
from mocompile.backends.fpga.estimate import plan
from mocompile.backends.fpga.precision import choose_formats, describe
from mocompile.backends.fpga.project import build_csim, cache_entries, ident_model, segment_of, write_project
from mocompile.backends.fpga.report import summary
from mocompile.calibration import Calibration, for_graph
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph

PROGRAM_KIND = "hls-csim"
DEFAULT_DEVICE = "alveo-u280"
MAX_POSITIONS = 4096  # default KV cache positions when the model's max_seq is larger
CALIBRATION_SAMPLES, CALIBRATION_SEQ = 8, 32


@register_backend
class FpgaBackend(Backend):
    name = "fpga"
    description = "a fixed-point dataflow design as a Vitis HLS C++ project (hls4ml dense kernels), C-simulated here"
    program_kind = PROGRAM_KIND
    dtypes = frozenset({"float32", "int64", "int32"})
    weight_formats = frozenset({"float32", "int8", "int4"})  # low-bit codes become fixed point like the rest

    def parse_options(self, words: list[str]) -> dict[str, Any]:
        opts: dict[str, Any] = {"device": DEFAULT_DEVICE, "bits": 16, "positions": None}
        for word in words:
            key, _, value = word.lstrip("-").partition("=")
            if key not in opts or not value:
                raise MocompileError(f"target fpga: unknown option {word!r} (options: -device=NAME|FILE.toml, "
                                     f"-bits=8..16, -positions=N)")
            if key in ("bits", "positions"):
                if not value.isdigit() or int(value) < 1 or (key == "bits" and not 8 <= int(value) <= 16):
                    raise MocompileError(f"target fpga: -{key} must be {'8..16' if key == 'bits' else 'a positive integer'}"
                                         f" (got {value!r})")
                opts[key] = int(value)
            else:
                opts[key] = value
        opts["device"] = load_device(opts["device"])
        return opts

    @property
    def device(self) -> Device:
        return self.options["device"]

    def ops(self) -> frozenset[str]:
        return frozenset(load_kernels())

    def unsupported(self, graph: Graph) -> str | None:
        found = super().unsupported(graph)
        if found:
            return found
        for node in graph.nodes:
            refuse = kernel_for(node).refuse
            why = refuse(node) if refuse else None
            if why:
                return why
        if len(graph.inputs) > 1:  # a multimodal model: its sequence joins the inputs in order
            joins = [n for n in graph.nodes if n.op == "concat" and n.attrs["axis"] == 1]
            segments = segment_of(graph)
            for node in joins:
                owners = [segments.get(id(v.producer)) if v.producer else graph.inputs.index(v) if v in graph.inputs
                          else None for v in node.inputs]
                if owners != list(range(len(graph.inputs))):
                    return (f"concat at {node.loc or '?'}: the fpga target joins the model's inputs along the "
                            "sequence in the order they are declared")
        return None

    # ---- data-driven preparation -------------------------------------------------------------
    def prepare(self, graph: Graph, calibration: Calibration | None, input_ranges: Mapping[str, int],
                seed: int) -> None:
        calib = for_graph(graph, calibration, input_ranges, CALIBRATION_SAMPLES, CALIBRATION_SEQ, seed)
        self._calibration = calib.source
        self._design = choose_formats(graph, calib, self.options["bits"])

    def design(self, graph: Graph) -> Design:
        if getattr(self, "_design", None) is None or self._design.graph is not graph:
            raise RuntimeError("FpgaBackend.prepare was not called with this graph")
        return self._design

    def reference(self, graph: Graph) -> tuple[str, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]]:
        design = self.design(graph)
        return "fixed-point emulation of the design", lambda x: emulate(design, x)

    def positions(self, graph: Graph) -> int:
        return self.options["positions"] or min(graph.meta.get("max_seq") or MAX_POSITIONS, MAX_POSITIONS)

    # ---- code --------------------------------------------------------------------------------
    def emit(self, graph: Graph, out_dir: Path, *, tuning: Any = None) -> dict[str, Any]:
        design = self.design(graph)
        capacity = self.positions(graph)
        estimate = plan(design, self.device, capacity)  # chooses the reuse factors the project is written with
        cpp = write_project(design, out_dir, capacity, self.device.part, self.device.clock_mhz)
        build_csim(out_dir)
        (out_dir / "estimate.json").write_text(json.dumps(estimate, indent=1) + "\n")
        (out_dir / "precision.json").write_text(json.dumps(describe(design), indent=1) + "\n")
        (out_dir / "fpga_report.txt").write_text(summary(design, estimate, self._calibration))
        return {
            "kind": PROGRAM_KIND, "library": "csim/libcsim.so", "weights": "hls/weights.bin", "project": "hls",
            "top": f"{ident_model(design)}_step", "capacity": capacity, "caches": cache_entries(cpp),
            "estimate": "estimate.json", "precision": "precision.json", "report": "fpga_report.txt",
            "calibration": self._calibration,
            "summary": {"dsp": estimate["totals"]["dsp"], "bram18": estimate["totals"]["bram18"],
                        "uram": estimate["totals"]["uram"], "lut": estimate["totals"]["lut"],
                        "cycles_per_token": estimate["cycles_per_token"], "fits_on_chip": estimate["fits_on_chip"]},
            "target_info": {"device": self.device.name, "part": self.device.part, "clock_mhz": self.device.clock_mhz,
                            "bits": self.options["bits"], "presets": sorted(PRESETS)},
        }
