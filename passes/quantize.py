"""quantize: low-bit weights (int8 per channel, int4 group-wise) and int8 activations.

    quantize(w=int8)                      weight-only int8, one scale per output channel
    quantize(w=int4,group=128)            weight-only int4, one scale per 128 inputs of a row
    quantize(w=int8,a=int8,calib=64)      W8A8: static per-tensor activation scales from 64
                                          calibration samples, per-channel weights
    quantize(w=int8,a=int8,smooth=0.5)    ... with SmoothQuant smoothing folded into the norms
    quantize(w=int8,a=int8,dynamic=token) W8A8 with a per-token scale computed at run time
    quantize(w=int4,skip=router|attention)

Under W8A8 every matmul reads int8 activations: the input of a linear layer, feed-forward
block or experts op through a `quantize_act` node (static or dynamic scale, as asked), and
the hidden activation inside a feed-forward block or expert, between its GLU and its down
projection, with a scale per row (`hidden_quant=token` on the op: per token, so batch
isolation holds, and computed at run time, since a static scale per expert would need
calibration data reaching every expert).

Each quantized weight becomes low-bit codes + float32 scales feeding a `dequantize` node
in front of the op that read it (see mocompile/ir/ops/quant.py), so the graph computes the
quantized model exactly and a backend reads the codes inside its matmul. What gets
quantized, by the role of the op that reads the weight: attention projections
(`attention`), routed experts (`experts`), shared experts (`shared`), other feed-forward
blocks and linears (`dense`), the output projection (`lm_head`); the router (`router`)
only when asked (`router=true`): routing decisions flip on small errors.

The report gives per tensor and in total the bytes before and after, and on calibration
inputs (random tokens unless the PassContext brings some) the max and mean error of the
outputs against the unquantized graph and, for a language model, the KL divergence of
the next-token distributions and the top-1 agreement.

A per-tensor *dynamic* activation scale (`dynamic=tensor`) is computed over the whole
batch, so one sample's output depends on the others (a cross-batch leak): it is refused
unless `allow_batch_leak=true`, and the report and the isolation verdict both say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph, Node, Value
from mocompile.ir.ops.quant import INT8_MAX, group_scale_dtype, quantize_weight, symmetric_scales
from mocompile.ir.registry import get_op, input_side_weights
from mocompile.pass_manager import Pass, PassContext, PassResult, register_pass
from mocompile.passes.dce import drop_dead_weights
from mocompile.calibration import channel_max, for_graph
from mocompile.quality import quality_report, token_ranges

ROLES = ("attention", "experts", "shared", "dense", "lm_head", "router")
DEFAULT_ROLES = frozenset(ROLES) - {"router"}




def _names(value: Any) -> tuple[str, ...]:
    if value in (None, "", False):
        return ()
    return tuple(str(v) for v in (value if isinstance(value, tuple) else (value,)))


@dataclass(frozen=True)
class Scheme:
    bits: int
    group: int  # 0: one scale per output channel
    activations: str | None  # None | "static" | "token" | "tensor"
    smooth: float | None


def _role(node: Node, graph: Graph) -> str:
    """What a weight-reading node is in the model (see the module docstring): its op's
    `weight_role`, else where it sits."""
    role = get_op(node.op).weight_role
    parts = node.loc.split(".")
    if role == "ffn":
        return "shared" if "shared" in parts else "dense"
    if role is not None:
        return role
    if any(p.startswith("attn") or p == "attention" for p in parts):
        return "attention"
    if any(v is node.outputs[0] for v in graph.outputs):
        return "lm_head"
    return "dense"


def effective_group(requested: int, k: int, bits: int) -> int:
    """The group size used for an input width k: the largest divisor of k not above the
    requested size (even for int4: a byte holds two inputs of one group); 0 = per channel."""
    if not requested or requested >= k:
        return 0
    step = 2 if bits == 4 else 1
    return next(g for g in range(requested - requested % step, 0, -step) if k % g == 0)


def _insert_before(graph: Graph, consumer: Node, op: str, inputs: Sequence[Value], attrs: dict[str, Any],
                   name: str) -> Value:
    """A new single-output node placed just before `consumer` (keeps the order topological)."""
    (out,) = graph.add_node(op, inputs, attrs, loc=consumer.loc, name=name)
    node = graph.nodes.pop()
    graph.nodes.insert(graph.nodes.index(consumer), node)
    return out


@register_pass("quantize")
class Quantize(Pass):
    """Low-bit weights (int8 per channel, int4 group-wise), optionally int8 activations (W8A8).

    The options are described in the module docstring; their annotations are what the
    pipeline parser checks (see `Pass`).
    """

    preserves_semantics = False  # the compiler then checks the artifact against the IR interpreter

    def __init__(self, w: Literal["int8", "int4"] = "int8", group: int = 0, a: Literal["int8"] | None = None,
                 calib: int = 16, seq: int = 16, skip: tuple[str, ...] = (), router: bool = False,
                 dynamic: Literal["token", "tensor"] | None = None, smooth: float | None = None,
                 allow_batch_leak: bool = False, seed: int = 0) -> None:
        if w not in ("int8", "int4"):
            raise MocompileError(f"quantize: w must be int8 or int4, got {w!r}")
        if a not in (None, "int8", "none"):
            raise MocompileError(f"quantize: a must be int8 (or absent for weight-only), got {a!r}")
        a = None if a == "none" else a
        if dynamic not in (None, "token", "tensor"):
            raise MocompileError(f"quantize: dynamic must be token or tensor, got {dynamic!r}")
        if dynamic and not a:
            raise MocompileError("quantize: dynamic= quantizes activations; give a=int8 with it")
        if dynamic == "tensor" and not allow_batch_leak:
            raise MocompileError("quantize: dynamic=tensor computes one activation scale over the whole batch, so "
                                 "samples influence each other's outputs; use dynamic=token, or add "
                                 "allow_batch_leak=true to accept the leak")
        if smooth is not None and (not a or not 0 < float(smooth) < 1):
            raise MocompileError("quantize: smooth=ALPHA (0 < ALPHA < 1) applies to W8A8 (a=int8) only")
        unknown = set(_names(skip)) - set(ROLES)
        if unknown:
            raise MocompileError(f"quantize: unknown skip target(s) {sorted(unknown)} (known: {', '.join(ROLES)})")
        if int(group) < 0 or int(calib) < 1:
            raise MocompileError("quantize: group must be >= 0 and calib >= 1")
        bits = 8 if w == "int8" else 4
        self.scheme = Scheme(bits, int(group) or (128 if bits == 4 else 0), (dynamic or "static") if a else None,
                             float(smooth) if smooth is not None else None)
        self.roles = (DEFAULT_ROLES | ({"router"} if router else set())) - set(_names(skip))
        self.calib, self.seq, self.seed = int(calib), int(seq), int(seed)
        self.options = {"w": w, "group": self.scheme.group, "a": a, "dynamic": dynamic, "smooth": smooth,
                        "skip": sorted(_names(skip)), "router": router, "calib": self.calib}

    def describe(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items() if v not in (None, False, [], 0) or k == "w")
        return f"quantize({opts})"

    def stored_bytes_per_param(self) -> float:
        """The codes and their scales (float16 per group as the CPU target stores them, float32
        per row). The weights it leaves float are counted as codes: in a MoE model the experts
        it quantizes are the bulk."""
        group = self.scheme.group
        return self.scheme.bits / 8 + (np.dtype(group_scale_dtype(group)).itemsize / group if group else 0)

    # ---- the pass ------------------------------------------------------------------------------
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        original = graph.clone()
        calibration = for_graph(graph, ctx.calibration, token_ranges(graph, ctx.input_ranges), self.calib, self.seq,
                                self.seed)
        inputs = calibration.inputs
        targets = [n for n in graph.nodes if get_op(n.op).weight_slots is not None and _role(n, graph) in self.roles]
        report: dict[str, Any] = {"scheme": self.options, "calibration": calibration.to_json()}
        if self.scheme.smooth is not None:
            report["smoothed"] = self._smooth(graph, targets, inputs)
        if self.scheme.activations:
            report["activations"] = self._quantize_activations(graph, targets, inputs)
            report["hidden_per_token"] = self._quantize_hidden(targets)
        report["tensors"] = self._quantize_weights(graph, targets)
        drop_dead_weights(graph)  # the fp32 originals (a tied embedding keeps its own)
        before = sum(t["bytes_before"] for t in report["tensors"])
        after = sum(t["bytes_after"] for t in report["tensors"])
        report["total"] = {"tensors": len(report["tensors"]), "bytes_before": before, "bytes_after": after,
                           "ratio": round(before / after, 3) if after else 1.0}
        report["accuracy"] = quality_report(original, graph, inputs)
        report["breaks_batch_isolation"] = self.scheme.activations == "tensor"
        if report["breaks_batch_isolation"]:
            report["warning"] = ("dynamic per-tensor activation scales are computed over the whole batch: one "
                                 "sample's output depends on the other samples in the batch")
        return PassResult(graph, report)

    def _quantize_weights(self, graph: Graph, targets: list[Node]) -> list[dict[str, Any]]:
        done: dict[int, Value] = {}
        tensors = []
        for node in targets:
            slot = get_op(node.op).weight_slots
            for i in range(len(node.inputs))[slot]:
                w = node.inputs[i]
                if graph.params.get(w.name) is not w or w.type.dtype != "float32":
                    continue  # computed at run time or already low-bit
                if id(w) not in done:
                    done[id(w)], info = self._quantize_one(graph, node, w)
                    tensors.append(info)
                node.inputs[i] = done[id(w)]
        return tensors

    def _quantize_one(self, graph: Graph, consumer: Node, w: Value) -> tuple[Value, dict[str, Any]]:
        array = graph.weights[w.name]
        k = array.shape[-1]
        group = effective_group(self.scheme.group, k, self.scheme.bits)
        kept = group_scale_dtype(group)
        try:
            codes, scales = quantize_weight(array, self.scheme.bits, group, kept)
        except ValueError as e:
            raise MocompileError(f"quantize: weight {w.name} {list(array.shape)}: {e}") from None
        q = graph.add_param(graph.fresh_name(f"{w.name}.q{self.scheme.bits}"), codes)
        s = graph.add_param(graph.fresh_name(f"{w.name}.scale"), scales)
        out = _insert_before(graph, consumer, "dequantize", [q, s], {"bits": self.scheme.bits, "scales": kept},
                             f"{w.name}.deq")
        info = {"tensor": w.name, "shape": list(array.shape), "bits": self.scheme.bits, "group": group or k,
                "scales": kept, "bytes_before": int(array.nbytes),
                "bytes_after": int(codes.nbytes + scales.size * np.dtype(kept).itemsize)}
        return out, info

    def _quantize_activations(self, graph: Graph, targets: list[Node], inputs: list[dict[str, np.ndarray]]) -> list[dict]:
        """Insert quantize_act in front of every target's input x (shared by its readers)."""
        xs: dict[int, Value] = {}
        for node in targets:
            if get_op(node.op).act_quant_input:
                xs.setdefault(id(node.inputs[0]), node.inputs[0])
        mode = self.scheme.activations
        amax = channel_max(graph, list(xs.values()), inputs) if mode == "static" else {}
        quantized: dict[int, Value] = {}
        out = []
        for node in targets:
            x = node.inputs[0]
            if not get_op(node.op).act_quant_input:
                continue
            if id(x) not in quantized:
                extra = []
                info: dict[str, Any] = {"value": x.name, "mode": mode}
                if mode == "static":
                    scale = symmetric_scales(np.array([amax[x.name].max()]), INT8_MAX)
                    extra = [graph.add_param(graph.fresh_name(f"{x.name}.act_scale"), scale)]
                    info["scale"] = float(scale[0])
                quantized[id(x)] = _insert_before(graph, node, "quantize_act", [x, *extra], {"mode": mode},
                                                  f"{x.name}_q8")
                out.append(info)
            node.inputs[0] = quantized[id(x)]
        return out

    @staticmethod
    def _quantize_hidden(targets: list[Node]) -> list[str]:
        """Round the hidden activation of every op with a `down_projection` (feed-forward
        blocks, experts) per row (their down projections then read int8 too); returns where."""
        blocks = [n for n in targets if get_op(n.op).down_projection]
        for node in blocks:
            node.attrs["hidden_quant"] = "token"
        return [n.loc or n.outputs[0].name for n in blocks]

    def _smooth(self, graph: Graph, targets: list[Node], inputs: list[dict[str, np.ndarray]]) -> list[dict]:
        """SmoothQuant: divide a norm's output channels by s and multiply the input columns of
        every weight reading it by s (exact in real arithmetic), with
        s = act_max^alpha / weight_max^(1-alpha): activation outliers move into the weights,
        which are quantized per output channel and absorb them."""
        alpha = self.scheme.smooth
        users = graph.users()
        target_ids = {id(n) for n in targets}
        plans = []
        for norm in graph.nodes:
            if not get_op(norm.op).affine_channels or norm.attrs.get("group") is not None:
                continue
            x = norm.outputs[0]
            readers = users.get(id(x), [])
            params = norm.inputs[1:]
            if (not readers or any(get_op(r.op).weight_slots is None or r.inputs[0] is not x for r in readers)
                    or not any(id(r) in target_ids for r in readers)
                    or any(graph.params.get(p.name) is not p for p in params) or x in graph.outputs):
                continue  # every reader must be a matmul whose weights can absorb the factor
            plans.append((norm, x, readers))
        if not plans:
            return []
        amax = channel_max(graph, [x for _, x, _ in plans], inputs)
        report = []
        for norm, x, readers in plans:
            weights = [w for r in readers for w in input_side_weights(r)]
            if any(graph.params.get(w.name) is not w for w in weights):
                continue
            wmax = np.max([np.abs(graph.weights[w.name]).reshape(-1, w.type.shape[-1]).max(0) for w in weights], axis=0)
            s = (np.maximum(amax[x.name], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)).astype(np.float32)
            for i, p in enumerate(norm.inputs[1:], start=1):
                self._replace_weight(graph, norm, i, graph.weights[p.name] / s)
            for r in readers:
                for w in input_side_weights(r):
                    self._replace_weight(graph, r, r.inputs.index(w), graph.weights[w.name] * s)
            report.append({"value": x.name, "readers": [r.loc for r in readers],
                           "factor_range": [float(s.min()), float(s.max())]})
        return report

    @staticmethod
    def _replace_weight(graph: Graph, node: Node, index: int, array: np.ndarray) -> None:
        old = node.inputs[index]
        node.inputs[index] = graph.add_param(graph.fresh_name(f"{old.name}.smoothed"), array.astype(np.float32))
