"""One rank of an expert-parallel run of an artifact compiled with `--ep` (ep_build.py has the files).

Every rank loads the dense program (attention, norms, routers, shared experts, LM head:
small, so replicated) and only the routed experts the placement gives it. The batch is
split over the ranks by sequence (data parallel: each rank runs the dense program, with its
own KV cache, on its own sequences), since attention needs a sequence's every position and
replicating it would make every rank do all the dense work. At each MoE layer the dense
program calls `serve` (the packed function ir/ops/moe_remote.SERVICE): the (token row,
expert id, gate weight) of every routing choice go with one all-to-all to the rank holding
that expert, each rank runs its experts over what it received, a second all-to-all brings
the gated outputs back, and each token's slots are summed in slot order, as the
single-process kernel does. All ranks make the same calls in the same order (each forward
calls each MoE layer once, in graph order); a rank with no sequence left still takes part
through `idle_forward`.

How the rows move is a `Transport`: `LocalTransport` (one rank: the compile's own
verification) or mocompile/distributed's torch.distributed one (gloo on CPUs; the same calls
run over NCCL). This module imports neither torch nor the compiler.

Placement: the plan of the artifact's `place` pass (one rank per device of the plan; an
expert with replicas has its tokens split over them by the plan's shares) or round-robin
(expert e of every layer on rank e mod N).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from mocompile.artifact import check_file, placement_plan
from mocompile.errors import ArtifactError, MocompileError
from mocompile.ir.ops.moe_remote import SERVICE
from mocompile.runtime import LoadedArtifact, import_tvm_without_torch

EP_DIR = "ep"
PLACEMENTS = ("plan", "round-robin")


def expert_weights(layer: int, expert: int) -> str:
    """The file (relative to the artifact) of one routed expert's packed weights."""
    return f"{EP_DIR}/L{layer}/e{expert}.safetensors"


class Transport(Protocol):
    """How the ranks exchange rows: `exchange(send)` sends send[r] (a 2-D float32 array, any
    number of rows) to rank r and returns what each rank sent here, by rank; every rank
    calls it the same number of times. `gather(obj)` gives every rank's `obj`, on every rank."""

    rank: int
    size: int

    def exchange(self, send: Sequence[np.ndarray]) -> list[np.ndarray]: ...

    def gather(self, obj: Any) -> list[Any]: ...


class LocalTransport:
    """One rank that holds every expert (no other process)."""

    rank, size = 0, 1

    def exchange(self, send: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(send)

    def gather(self, obj: Any) -> list[Any]:
        return [obj]


@dataclass
class Placement:
    """Per MoE layer (the plan's number) and expert: the ranks holding it and the cumulative
    shares of its tokens they serve."""

    size: int
    holders: dict[int, list[tuple[np.ndarray, np.ndarray]]]

    @staticmethod
    def round_robin(layers: Sequence[dict[str, Any]], size: int) -> "Placement":
        return Placement(size, {d["layer"]: [(np.array([e % size]), np.ones(1)) for e in range(d["experts"])]
                                for d in layers})

    @staticmethod
    def from_plan(plan: dict[str, Any], layers: Sequence[dict[str, Any]], size: int) -> "Placement":
        devices = plan["devices"]
        if len(devices) != size:
            raise MocompileError(f"the artifact's placement plan has {len(devices)} devices "
                                 f"({', '.join(d['name'] for d in devices)}) but {size} ranks were asked for: give "
                                 f"--nproc {len(devices)}, or use --placement round-robin")
        shares: dict[tuple[int, int], list[tuple[int, float]]] = {}
        for rank, device in enumerate(devices):
            for x in device["experts"]:
                shares.setdefault((int(x["layer"]), int(x["expert"])), []).append((rank, float(x["share"])))
        holders = {}
        for d in layers:
            per = []
            for e in range(d["experts"]):
                held = shares.get((d["layer"], e))
                if not held:
                    raise MocompileError(f"the artifact's placement plan puts expert {e} of layer {d['layer']} on "
                                         f"no device")
                cum = np.cumsum([s for _, s in held])
                per.append((np.array([r for r, _ in held]), cum / cum[-1]))
            holders[d["layer"]] = per
        return Placement(size, holders)

    def held(self, rank: int) -> list[tuple[int, int]]:
        """The (layer, expert) pairs `rank` holds."""
        return [(layer, e) for layer, per in self.holders.items() for e, (ranks, _) in enumerate(per) if rank in ranks]

    def destinations(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """The rank serving each routing choice: an expert's only holder, or, for an expert
        with replicas, its k-th choice of this call (in order) goes to the holder whose
        cumulative share covers (k + 1/2) / choices."""
        per = self.holders[layer]
        dest = np.empty(experts.shape, np.int64)
        for e in np.unique(experts):
            where = np.nonzero(experts == e)[0]
            ranks, cum = per[int(e)]
            dest[where] = ranks[0] if len(ranks) == 1 else \
                ranks[np.minimum(np.searchsorted(cum, (np.arange(where.size) + 0.5) / where.size), len(ranks) - 1)]
        return dest


def default_placement(manifest: dict[str, Any], asked: str | None) -> str:
    """The placement a run uses (PLACEMENTS): the one `asked` for, else the artifact's plan
    when its place pass made one, else round-robin."""
    return asked or ("plan" if placement_plan(manifest) else "round-robin")


def placement_of(manifest: dict[str, Any], size: int, how: str) -> Placement:
    """The placement `how` (PLACEMENTS) of the artifact's expert-parallel layers over `size` ranks."""
    layers = manifest["ep"]["layers"]
    if how == "round-robin":
        return Placement.round_robin(layers, size)
    plan = placement_plan(manifest)
    if plan is None:
        raise MocompileError("the artifact has no placement plan (compile with the place pass, or use "
                             "--placement round-robin)")
    return Placement.from_plan(plan, layers, size)


class RankExperts:
    """The routed experts one rank holds: the expert programs, and each held expert's weights
    read from its own file (no other expert's bytes are read)."""

    def __init__(self, path: Path, ep: dict[str, Any], held: list[tuple[int, int]]) -> None:
        tvm = import_tvm_without_torch()
        from safetensors import safe_open

        self._tensor = tvm.runtime.tensor
        self._fns = []
        for program in ep["programs"]:
            lib = tvm.runtime.load_module(str(path / program["library"]))
            self._fns.append(tvm.relax.VirtualMachine(lib, tvm.cpu())[program["function"]])
        program_of = {d["layer"]: d["program"] for d in ep["layers"]}
        self.files: list[str] = []
        self._weights: dict[tuple[int, int], tuple[Any, list[Any]]] = {}
        for layer, e in held:
            rel = expert_weights(layer, e)
            order = ep["programs"][program_of[layer]]["weight_order"]
            with safe_open(str(path / rel), "np") as f:
                self._weights[(layer, e)] = (self._fns[program_of[layer]],
                                             [self._tensor(f.get_tensor(n)) for n in order])
            self.files.append(rel)

    def compute(self, layer: int, x: np.ndarray, experts: np.ndarray, gates: np.ndarray) -> np.ndarray:
        """Each row through its expert, scaled by its gate weight."""
        out = np.empty_like(x)
        for e in np.unique(experts):
            rows = np.nonzero(experts == e)[0]
            held = self._weights.get((layer, int(e)))
            if held is None:
                raise ArtifactError(f"received rows for expert {int(e)} of layer {layer}, which this rank does not "
                                    f"hold")
            fn, weights = held
            y = fn(self._tensor(np.ascontiguousarray(x[rows])), self._tensor(np.ascontiguousarray(gates[rows, None])),
                   self._tensor(np.zeros((rows.size, 1), np.int32)), *weights)
            out[rows] = np.from_dlpack(y)
        return out


class ExpertParallelRank:
    """One rank: `model` is the dense program (a LoadedArtifact: run / new_cache / step /
    run_cached / generate on this rank's sequences), whose MoE layers call `serve`. The
    packed function's name is process-wide, but the VM looks it up when it loads the program,
    so each rank's program calls its own `serve`, however many ranks a process opens."""

    def __init__(self, path: Path, manifest: dict[str, Any], transport: Transport, placement: Placement,
                 check: bool = True) -> None:
        self.transport, self.placement = transport, placement
        self.layers = manifest["ep"]["layers"]
        self.held = placement.held(transport.rank)
        ep = manifest["ep"]
        for rel in [ep["dense"]["library"], ep["dense"]["weights"], *(p["library"] for p in ep["programs"]),
                    *(expert_weights(layer, e) for layer, e in self.held)] if check else []:
            check_file(path, manifest, rel)  # the files this rank reads, and no other
        self.experts = RankExperts(path, ep, self.held)
        self.calls = 0  # experts calls served, for the fault hook of the distributed worker
        # The error that ended a `serve` called from the program: the VM passes on only its text.
        self.failure: MocompileError | None = None
        tvm = import_tvm_without_torch()
        self._tvm_tensor = tvm.runtime.tensor
        # The VM resolves the packed function when it loads; the dense program is loaded after this.
        tvm.register_global_func(SERVICE, self._packed, override=True)
        self.model = LoadedArtifact(path, {**manifest, "program": manifest["ep"]["dense"]}, driver=False)

    def _packed(self, x: Any, weights: Any, indices: Any, layer: Any) -> Any:
        try:
            y = self.serve(int(layer[0]), np.from_dlpack(x).copy(), np.from_dlpack(weights).copy(),
                           np.from_dlpack(indices).copy())
        except MocompileError as e:
            self.failure = e
            raise
        return self._tvm_tensor(y)

    def serve(self, layer: int, x: np.ndarray, weights: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """The routed experts of MoE layer `layer` for this rank's rows x [rows, hidden]."""
        self.calls += 1
        rows, k = indices.shape
        hidden = x.shape[1]
        ids = indices.reshape(-1).astype(np.int64)
        token = np.repeat(np.arange(rows), k)
        dest = self.placement.destinations(layer, ids)
        order = np.argsort(dest, kind="stable")
        counts = np.bincount(dest, minlength=self.transport.size)
        payload = np.concatenate([x[token[order]], ids[order, None].astype(np.float32),
                                  weights.reshape(-1)[order, None]], axis=1).astype(np.float32)
        received = self.transport.exchange(np.split(payload, np.cumsum(counts)[:-1]))
        got = np.concatenate(received) if received else np.zeros((0, hidden + 2), np.float32)
        y = self.experts.compute(layer, got[:, :hidden], got[:, hidden].astype(np.int64), got[:, hidden + 1])
        back = self.transport.exchange(np.split(y, np.cumsum([len(r) for r in received])[:-1]))
        slots = np.empty((rows * k, hidden), np.float32)
        slots[order] = np.concatenate(back) if back else slots[:0]
        return slots.reshape(rows, k, hidden).sum(axis=1)

    def idle_forward(self) -> None:
        """Take part in one forward without sequences of its own: every MoE layer's exchanges
        with no rows to send."""
        for d in self.layers:
            self.serve(d["layer"], np.zeros((0, d["hidden"]), np.float32), np.zeros((0, d["top_k"]), np.float32),
                       np.zeros((0, d["top_k"]), np.int32))


def check_rank_count(manifest: dict[str, Any], size: int) -> None:
    """Refuse more ranks than a layer has experts: round-robin would leave ranks without any."""
    fewest = min(d["experts"] for d in manifest["ep"]["layers"])
    if size > fewest:
        raise MocompileError(f"{size} ranks: the artifact's MoE layers have {fewest} experts; start at most {fewest}")


def open_rank(path: str | Path, manifest: dict[str, Any], transport: Transport,
              placement: str = "plan", check: bool = True) -> ExpertParallelRank:
    """This process's rank of an expert-parallel run (`placement`: "plan" or "round-robin");
    `check`: refuse files whose checksum is not the manifest's (False: a staged artifact,
    not yet checksummed, that the compile verifies)."""
    if "ep" not in manifest:
        raise ArtifactError(f"{path}: has no expert-parallel pieces (compile it with --ep)")
    if placement not in PLACEMENTS:
        raise MocompileError(f"--placement {placement}: choose one of {', '.join(PLACEMENTS)}")
    check_rank_count(manifest, transport.size)
    return ExpertParallelRank(Path(path), manifest, transport, placement_of(manifest, transport.size, placement),
                              check)
