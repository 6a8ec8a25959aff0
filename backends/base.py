"""The backend interface: what every code-generation target declares and does, and the
registry the compiler finds targets in by name.

A backend declares its `name` (what `--target` says), the IR ops it lowers, the dtypes and
weight formats it reads, and the `program_kind` of the artifacts it writes; it `emit`s an
artifact's files from a graph and returns the manifest's `program` entry; it may `tune`.
Whether the artifact can run on the machine doing the compile is the backend's to say
(`cannot_run_here`): where it can, the compiler loads it through `mocompile.runtime.load`'s
dispatch on the program kind and checks it against the reference; where it cannot, the
manifest and the compile's output say so plainly, with what the backend could check instead
(`static_checks`).

The registry maps a target name to the backend class, or to the module that registers it, so
that naming a target imports only that backend (TVM stays unloaded for other targets).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

from mocompile.calibration import Calibration
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.ir.registry import all_ops, get_op

Progress = Callable[[str], None]


class Backend:
    """Base class of a code-generation target. Subclasses set the class attributes and
    implement `emit`; the rest has defaults that suit a backend without tuning whose
    artifacts run here."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    program_kind: ClassVar[str] = ""  # the manifest's program.kind, which runtime.load dispatches on
    dtypes: ClassVar[frozenset[str]] = frozenset({"float32", "int64", "int32"})
    weight_formats: ClassVar[frozenset[str]] = frozenset({"float32"})
    can_tune: ClassVar[bool] = False
    # emits a `prefill` function (a prompt's step computing only its last position past the
    # cut, mocompile/prefill.py); without one a last-only step slices the step's outputs
    builds_prefill: ClassVar[bool] = False
    # computes contextual sparsity (the `keep` attribute of ops with `contextual_shares`:
    # each token's matmul over its own kept channels); without it such a graph is refused
    contextual_sparsity: ClassVar[bool] = False

    def __init__(self, target: str = "") -> None:
        """`target` is the whole --target text (`"cpu -mcpu=haswell"`); its first word is
        the backend's name, the rest the backend's own options (`parse_options`)."""
        self.target_text = target or self.name
        self.options = self.parse_options(self.target_text.split()[1:])

    # ---- what the backend declares ---------------------------------------------------------
    def ops(self) -> frozenset[str]:
        """The IR ops this backend lowers (default: every registered op)."""
        return frozenset(all_ops())

    def parse_options(self, words: list[str]) -> dict[str, Any]:
        """The target options after the name (default: none accepted)."""
        if words:
            raise MocompileError(f"target {self.name!r} takes no options (got {' '.join(words)!r})")
        return {}

    def unsupported(self, graph: Graph) -> str | None:
        """Why this backend cannot compile `graph` (an op it does not lower, a dtype it does
        not read), or None; asked before any code is generated."""
        formats = {get_op(n.op).weight_format(n.attrs) for n in graph.nodes if get_op(n.op).weight_format}
        unread = sorted(formats - self.weight_formats)
        if unread:
            return (f"the {self.name} target does not read {', '.join(unread)} weights (it reads "
                    f"{', '.join(sorted(self.weight_formats))}); compile with --dtype fp32 or without the quantize pass")
        missing = sorted({n.op for n in graph.nodes} - self.ops())
        if missing:
            return f"the {self.name} target has no lowering for op(s): {', '.join(missing)}"
        sparse = next((n for n in graph.nodes if n.attrs.get("keep") is not None
                       and get_op(n.op).contextual_shares is not None), None)
        if sparse is not None and not self.contextual_sparsity:
            return (f"the {self.name} target does not compile contextual sparsity ({sparse.op} at {sparse.loc or '?'} "
                    "has keep=); compile for cpu")
        dtypes = sorted({v.type.dtype for v in [*graph.inputs, *graph.outputs]} - self.dtypes)
        if dtypes:
            return f"the {self.name} target does not take tensors of dtype {', '.join(dtypes)}"
        return None

    def cannot_run_here(self, manifest: dict[str, Any]) -> str | None:
        """Why an artifact with this manifest (its program and target entries) cannot run on
        this machine (no such device, missing CPU features), or None where it runs and is
        verified by running it."""
        return None

    def static_checks(self, stage: Path, manifest: dict[str, Any]) -> list[str]:
        """What was checked of an artifact that cannot run here (it compiles, it links, its
        sources parse), each a sentence for the manifest and the compile's output."""
        return []

    # ---- what the backend does ----------------------------------------------------------------
    def prepare(self, graph: Graph, calibration: Calibration | None, input_ranges: Mapping[str, int],
                seed: int) -> None:
        """Called once before `emit` with the compile's calibration data (None: none given),
        for a backend whose code depends on data (the fpga target's fixed-point formats)."""

    def reference(self, graph: Graph) -> tuple[str, Callable[[dict[str, Any]], dict[str, Any]]] | None:
        """A reference of the backend's own that its artifact must match bit for bit (its name
        and a function from inputs to outputs), where the artifact computes something other
        than the model by design (the fpga target's fixed point); None: the model is the
        reference, and with one given, the model's outputs are only compared (the drift
        recorded)."""
        return None

    def emit(self, graph: Graph, out_dir: Path, *, tuning: Any = None) -> dict[str, Any]:
        """Write the artifact's files for `graph` into `out_dir`; return the manifest's
        program entry (its "kind" is `program_kind`; an optional "target_info" goes to the
        manifest's target entry)."""
        raise NotImplementedError

    def load_tuning(self, path: Path) -> tuple[Any, str]:
        """The tuning database at `path` and a note on what was found there."""
        raise MocompileError(f"the {self.name} target has no tuning")

    def tune(self, graph: Graph, trials: int, db: Any, say: Progress) -> dict[str, Any]:
        """Spend `trials` measurements tuning `graph`'s kernels into `db`; return a report."""
        raise MocompileError(f"the {self.name} target has no tuning")


def register_lowering(lowerings: dict[str, Any], refusals: dict[str, Any], ops: tuple[str, ...], fn: Any,
                      refuses: Any = None) -> None:
    """Enter `fn` as the lowering of each IR op of `ops` in a backend's registry (`lowerings`,
    keyed by op name) and `refuses`, where given, as what it refuses (`refusals`): the one
    table per backend where op names are keys (tests/test_op_facets.py)."""
    for name in ops:
        if name in lowerings:
            raise ValueError(f"lowering for {name!r} registered twice")
        lowerings[name] = fn
        if refuses is not None:
            refusals[name] = refuses


# target name -> the backend class, or the module whose import registers it
_BACKENDS: dict[str, type[Backend] | str] = {"cpu": "mocompile.backends.tvm_cpu.backend",
                                             "fpga": "mocompile.backends.fpga.backend",
                                             "opencl": "mocompile.backends.tvm_gpu.backend",
                                             "cuda": "mocompile.backends.tvm_gpu.backend",
                                             "mlir": "mocompile.backends.mlir.backend"}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend available as `--target cls.name`."""
    known = _BACKENDS.get(cls.name)
    if isinstance(known, type) and known is not cls:
        raise ValueError(f"backend {cls.name!r} registered twice")
    _BACKENDS[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(target: str) -> Backend:
    """The backend for a --target text (`"cpu"`, `"cpu -mcpu=haswell"`), with its options parsed."""
    name = (target or "").split()[0] if (target or "").split() else ""
    entry = _BACKENDS.get(name)
    if entry is None:
        raise MocompileError(f"unknown target {name!r} (available: {', '.join(backend_names())})")
    if isinstance(entry, str):
        importlib.import_module(entry)  # registers the class under its name
        entry = _BACKENDS[name]
        if isinstance(entry, str):
            raise RuntimeError(f"{entry} did not register a backend named {name!r}")
    return entry(target)
