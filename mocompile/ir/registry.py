"""The op registry: every facet of an op registered once, in one place.

Facets a registered op carries:
- `infer`: output types from input types and attrs (the verifier and every pass use it);
- `compute`: reference semantics on numpy arrays (the interpreter: the oracle that every
  backend and pass is checked against);
- `batch_flow`: how the batch (sample) axis of each input reaches each output, and whether
  the op mixes samples (the isolation analysis; vocabulary and helpers in
  `mocompile.ir.batch_flow`). `batch_flow(FlowArgs) -> Flow`: from the inputs' abstract
  states (which axes carry the sample index, which mixing points they already depend on,
  their role: data, sample label, same-sample mask, batch-wide permutation), input/output
  types and attrs, to each output's state, with `Out(mixes="why")` where the op itself
  makes an output depend on other samples. An op without one makes the verdict "unknown",
  never "isolated";
- `cost`: FLOPs and bytes moved for concrete shapes (placement, reports, rooflines);
- properties (positionwise, weight slots, cached inputs, ...): typed fields of `OpDef`,
  declared where the op is registered, that passes and backends ask through `get_op(name)`
  instead of keeping lists of op names (the `OpDef` docstring says what each means and who
  reads it).
Backend lowerings live with each backend (a backend registers a lowering per op name and
refuses a graph holding an op it has none for), so the core never imports TVM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import numpy as np

from mocompile.ir.batch_flow import BatchFlowFn
from mocompile.ir.types import Dim, TensorType

if TYPE_CHECKING:  # the graph module imports this one
    from mocompile.ir.graph import Node, Value


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


class _Optional:
    def __repr__(self) -> str:
        return "OPTIONAL"


# An attribute default meaning "may be absent": not filled in, so graphs that never set it
# print and compare as before (readers use attrs.get).
OPTIONAL: Any = _Optional()

InferFn = Callable[[Sequence[TensorType], Mapping[str, Any]], list[TensorType]]
ComputeFn = Callable[[Sequence[np.ndarray], Mapping[str, Any]], list[np.ndarray]]
# (node, the sequence dims of the graph's segment inputs) -> why the node's outputs at new
# positions could depend on earlier positions other than through a KV cache, or None
PositionCheck = Callable[["Node", Sequence[Dim]], "str | None"]
WeightRole = Literal["router", "experts", "ffn"]
# (node inputs, attrs) -> (sum of |hidden activation| per neuron [E, F], tokens seen [E]), E = 1
# for a single feed-forward block
HiddenAbsSum = Callable[[Sequence[np.ndarray], Mapping[str, Any]], "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True)
class ExpertPools:
    """How a router's experts may be pruned while its routing stays well defined: `pools`
    partition the expert ids (modality groups, DeepSeek routing groups, else one pool);
    with `equal` every pool keeps the same number (routing groups are an equal split);
    each pool keeps at least `min_keep` (a token routed within a pool needs top_k there)."""

    pools: tuple[tuple[int, ...], ...]
    equal: bool
    min_keep: int


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes: int  # bytes read and written, weights included


@dataclass(frozen=True)
class OpDef:
    """One op: its semantics (infer, compute, batch_flow, cost; see the module doc) and its
    properties, which passes and backends read from here instead of testing op names. A
    property at its default makes no claim, and its readers then treat the op conservatively.

    positionwise: the output at a position depends only on the inputs at that position (and
        weights), whatever the attributes. mocompile.kv_cache.decode_support lets such ops
        into a graph that decodes token by token with a KV cache; an op without it, a
        `position_check` or `cached_inputs` is taken to mix positions.
    position_check: for an op that keeps positions apart only for some attributes or inputs
        (concat along the features, routing without capacity, a per-token scale; attention
        only if causal): `check(node, segments)` says why this node's outputs at new positions
        would depend on earlier ones other than through a KV cache, None if they do not
        (`segments`: the sequence dims of the graph's segment inputs). Read by decode_support.
    cached_inputs: attention ops: the inputs holding keys and values (index -> short name).
        mocompile.kv_cache.cached_graph feeds the earlier positions in front of them
        (past.<layer>.<short name>); decode_support requires them to be this call's.
    weight_slots: the inputs that are weights a quantizer may replace by low-bit codes behind
        a `dequantize` (the quantize pass; input 0, the activation x, never is one). Backends
        read the codes of those inputs inside their matmul kernels.
    down_projection: the op computes a hidden activation inside (a feed-forward block) and its
        last weight slot projects it back: that weight multiplies the hidden activation, not
        x (`input_side_weights`, read by the quantize pass's SmoothQuant and by the backends'
        integer kernels), and W8A8 rounds the hidden activation per row through the op's
        `hidden_quant` attribute (the quantize pass sets it).
    act_quant_input: under W8A8 the op reads its input x as int8: the quantize pass puts a
        `quantize_act` in front of it, and a backend's integer kernel reads the codes.
    rounds_input: the op rounds its input to a quantization grid, so float noise in that
        input can move a result by a whole step (verification's rounding envelope perturbs
        there; blocks with a `hidden_quant` attribute round inside).
    keeps_weights_low_bit: the op expands low-bit weights (`dequantize`): fold-constants
        leaves it even when all its inputs are weights, since the float32 result would undo
        the quantization.
    weight_format: ops that expand weights stored in another format (`dequantize`, `widen`):
        `f(attrs)` -> the format's name ("int8", "int4", "bfloat16", "float16"), which a backend
        must list in its `weight_formats` to compile the graph (backends/base.py).
    affine_channels: the output channels (last axis) are scaled (and shifted) one by one by
        the op's parameter inputs 1..: dividing those by s divides output channel c by s[c].
        The quantize pass's SmoothQuant folds its factors into such ops (norms) unless they
        are grouped (attribute `group`).
    weight_role: what the weights the op reads are in a model, for passes that treat the
        parts of a model apart (the quantize pass's roles and skip=): "router", "experts"
        (routed experts), "ffn" (a feed-forward block: a shared expert or a dense block, told
        apart by where it sits), or None (a plain projection, whose role where it sits says:
        attention, lm_head or dense).
    embeds_tokens: input 0 holds token ids indexing the rows of input 1 (a vocabulary table).
        The quantize pass takes a graph with such an op for a language model (its report
        compares next-token distributions) and draws calibration ids below the table's rows.
    routing_choices: the index of the output holding the experts chosen for each token. The
        quantize report counts how many of those choices quantization kept.
    routing_weights: the index of the output holding the gate weight of each chosen expert
        (calibration records the gate mass per expert from it).
    per_expert_inputs: `f(node)` -> the input indices whose axis 0 is the routed expert
        (a router's scoring rows and score bias, an experts op's stacked weights):
        expert pruning takes the kept rows of exactly these.
    expert_pools: router ops: `f(node)` -> ExpertPools, the constraints expert pruning keeps.
    keep_experts: router ops: `f(attrs, keep)` -> the attributes once only the experts `keep`
        (sorted ids of the old numbering) remain, renumbered 0..len(keep)-1 (group ranges).
    top_k_attr: the attribute holding how many experts each token is routed to (top-k pass).
    contextual_shares: ops that take the attribute `keep` (contextual sparsity, see
        mocompile.ir.contextual): `f(node)` -> {weight input index: the share of that weight
        one token reads}; {} while the node has no `keep`. The contextual-sparsity pass sets
        `keep` on such ops; active_params counts the shares.
    hidden_abs_sum: feed-forward ops (`down_projection`): recomputes the hidden activation from
        the node's inputs and returns its |.| summed per neuron and the tokens counted, per
        expert (calibration's running means; WINA neuron scores). The hidden axis is axis -2
        of the input-side weights and axis -1 of the down projection.
    """

    name: str
    infer: InferFn
    compute: ComputeFn
    attrs: Mapping[str, Any] = field(default_factory=dict)  # name -> default (REQUIRED if none)
    batch_flow: BatchFlowFn | None = None
    cost: Callable[[Sequence[TensorType], Sequence[TensorType], Mapping[str, Any], Mapping[str, int]], Cost] | None = None
    doc: str = ""
    # ---- properties (see the class docstring) ----------------------------------------------
    positionwise: bool = False
    position_check: PositionCheck | None = None
    cached_inputs: Mapping[int, str] | None = None
    weight_slots: slice | None = None
    down_projection: bool = False
    act_quant_input: bool = False
    rounds_input: bool = False
    keeps_weights_low_bit: bool = False
    weight_format: Callable[[Mapping[str, Any]], str] | None = None
    affine_channels: bool = False
    weight_role: WeightRole | None = None
    embeds_tokens: bool = False
    routing_choices: int | None = None
    routing_weights: int | None = None
    per_expert_inputs: Callable[["Node"], tuple[int, ...]] | None = None
    expert_pools: Callable[["Node"], ExpertPools] | None = None
    keep_experts: Callable[[Mapping[str, Any], Sequence[int]], dict[str, Any]] | None = None
    top_k_attr: str | None = None
    hidden_abs_sum: HiddenAbsSum | None = None
    contextual_shares: Callable[["Node"], dict[int, float]] | None = None

    def check_attrs(self, attrs: dict[str, Any], where: str = "") -> None:
        """Fill defaults in place; reject unknown or missing attributes."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise ValueError(f"{self.name}{' at ' + where if where else ''}: unknown attribute(s) {sorted(unknown)}")
        for k, default in self.attrs.items():
            if k not in attrs:
                if default is OPTIONAL:
                    continue
                if default is REQUIRED:
                    raise ValueError(f"{self.name}{' at ' + where if where else ''}: missing attribute {k!r}")
                attrs[k] = default


_OPS: dict[str, OpDef] = {}


def register_op(opdef: OpDef) -> OpDef:
    """Make `opdef` known by its name (to graphs, the verifier, the interpreter, passes)."""
    if opdef.name in _OPS:
        raise ValueError(f"op {opdef.name!r} registered twice")
    _OPS[opdef.name] = opdef
    return opdef


def get_op(name: str) -> OpDef:
    _load_builtin_ops()
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}") from None


def all_ops() -> dict[str, OpDef]:
    _load_builtin_ops()
    return dict(_OPS)


def _load_builtin_ops() -> None:
    # Importing the package registers the built-in ops (each file calls register_op).
    import mocompile.ir.ops  # noqa: F401


# ---- queries on a node's properties ---------------------------------------------------------
def weight_inputs(node: Node) -> list[Value]:
    """The node's inputs in its op's weight slots (none for an op without)."""
    slots = get_op(node.op).weight_slots
    return [] if slots is None else node.inputs[slots]


def input_side_weights(node: Node) -> list[Value]:
    """The weights that multiply the node's input x: all its weights but a down projection
    (the gate/up of a feed-forward block, not its down)."""
    weights = weight_inputs(node)
    return weights[:-1] if get_op(node.op).down_projection else weights
