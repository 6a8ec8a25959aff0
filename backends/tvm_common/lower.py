"""IR graph -> Relax module, the part every TVM-based target shares (`lower_module`), and
the context the per-op lowerings use.

What is built here once for every target: the Relax functions `main` and (for graphs that
decode with a KV cache) `step` and `prefill` (a step returning the last position only,
prefill.py), the weight layouts and packed weights, the cache slots of the step, and the
kernel-call plan (which kernel each node becomes, in order). What a target
supplies is its `KernelSet` (kernels.py): the kernel factories the lowerings call, the
matmul tiling, how te-generated kernels are scheduled. The target then builds the module its
own way (the CPU: schedule check, decode driver, LLVM; a GPU: thread bindings, device code).

Every IR op has one lowering function (lowerings.py, registered with `@lowering(op)`); a
lowering emits Relax calls to TIR kernels through `LowerContext` and returns the Relax
values of the node's outputs. Activations enter kernels as 2-D [rows, features] views
(`ctx.rows`), so one kernel serves any number of leading [batch, seq, ...] axes.

Weights become trailing parameters of `main` (never constants in the module): a lowering
asks `ctx.weight(kind, params, panel)` for a weight in a given layout and gets a parameter
back; the packed array and its `WeightLayout` are recorded for the artifact.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tvm
from tvm import relax, tirx

from mocompile.backends.base import register_lowering
from mocompile.backends.tvm_common.kernels import NAME_ATTR, KernelSet
from mocompile.backends.tvm_common.layout import WeightLayout, make_layout
from mocompile.backends.tvm_common.specs import MatmulShape
from mocompile.blocks import LAYER_STATES
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph, Node, Value
from mocompile.ir.types import Dim, dim_terms
from mocompile.kv_cache import decode_support

Lowering = Callable[["LowerContext", Node], Sequence[relax.Expr]]
CACHE_LEN = "cache_len"  # the symbol of the cache tensors' length axis
LOWERINGS: dict[str, Lowering] = {}
LAYERS_FUNCTION = "layers"  # the per-layer states' function, built where the graph's meta asks for it
# Per op, what the lowering refuses to compile: a node -> the reason (where it names the
# backend, as BACKEND_WORD, which `refusal` fills in), or None. Asked for every node before any
# Relax is built, so a refused graph fails before code generation starts.
REFUSALS: dict[str, Callable[[Node], str | None]] = {}
# The ops whose lowering reads low-bit weights (the codes and scales of a `dequantize` in one
# of the op's weight slots) inside its kernels, in registration order.
LOW_BIT_READERS: list[str] = []
BACKEND_WORD = "{backend}"


class LoweringError(MocompileError):
    """The graph uses something this backend cannot compile (an op, a dtype, an attribute)."""


def lowering(*ops: str, refuses: Callable[[Node], str | None] | None = None,
             reads_low_bit: bool = False) -> Callable[[Lowering], Lowering]:
    """Register the decorated function as the lowering of the IR op(s) `ops`; `refuses(node)`
    says why a node of these ops cannot be compiled (None: it can); `reads_low_bit`: the
    lowering reads weights that a `dequantize` produces as low-bit codes in its kernels
    (the dequantize itself then emits nothing)."""

    def register(fn: Lowering) -> Lowering:
        register_lowering(LOWERINGS, REFUSALS, ops, fn, refuses)
        if reads_low_bit:
            LOW_BIT_READERS.extend(ops)
        return fn

    return register


def _register_builtin_lowerings() -> None:
    importlib.import_module("mocompile.backends.tvm_common.lowerings")  # registers on import


def _product(dims: Sequence[tirx.PrimExpr]) -> tirx.PrimExpr:
    out: tirx.PrimExpr = tirx.IntImm("int64", 1)
    for d in dims:
        out = d if isinstance(out, tirx.IntImm) and int(out) == 1 else out * d
    return out


@dataclass
class CacheSlot:
    """One cache tensor of the `step` function (a parameter updated in place)."""

    name: str
    var: relax.Var
    shape: list  # IR-style dims: ints and symbol names ("batch", CACHE_LEN)
    dtype: str = "float32"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype}


class LowerContext:
    """State shared by the lowerings of one graph, for one Relax function: `main` (a plain
    forward: `past` is 0 and there is no cache) or `step` (a cached forward: `past`
    positions are already in the cache tensors). `kernels`: the target's kernel factories
    (its `target` says what they are shaped for)."""

    def __init__(self, graph: Graph, tuning: Mapping[str, Mapping] | None = None,
                 main: "LowerContext | None" = None, kernels: KernelSet | None = None,
                 cached: bool | None = None) -> None:
        """`main`: the context of the plain forward, already lowered; given, this context
        lowers another function into the same module, sharing its kernels, packed weights and
        kernel set: the cached step, or with `cached=False` a plain forward of `graph` (the
        per-layer states' function)."""
        cached = main is not None if cached is None else cached
        self.graph = graph
        if main is None and kernels is None:
            raise ValueError("a LowerContext needs the target's kernel set")
        self.kernels: KernelSet = main.kernels if main else kernels
        self.target = self.kernels.target
        self.bb = main.bb if main else relax.BlockBuilder()
        self.symbols: dict[str, tirx.Var] = {}
        self.past: tirx.PrimExpr = tirx.Var("past", "int64") if cached else tirx.IntImm("int64", 0)
        self.cache: list[CacheSlot] | None = [] if cached else None
        self.kernel_calls = 0  # kernel launches per call of the function (reported in the manifest)
        # (kernel, router node's place) of each routing decision of `main`, in call order: the
        # manifest's `routing` entry, from which a report reads the experts each token chose
        self.routers: list[tuple[str, str]] = main.routers if main else []
        # kernel -> which of its arguments are per-expert weights, read only for the experts that
        # have rows (the offsets argument says which): the manifest's `expert_reads`, for rooflines
        self.expert_reads: dict[str, dict[str, Any]] = main.expert_reads if main else {}
        # matmul kernel -> flops per row of its (last) output: the manifest's `kernel_flops`, for rooflines
        self.kernel_flops: dict[str, int] = main.kernel_flops if main else {}
        self.tuning = main.tuning if main else tuning or {}
        # the step's matmuls with contextual sparsity: which kernel each runs and the timings
        # that chose it (tvm_common/contextual.py), for the manifest and the pass's summary
        self.contextual: list[dict[str, Any]] = main.contextual if main else []
        self.derived: dict[tuple, Any] = {}  # values computed once per function and shared by several nodes
        self.matmuls: dict[str, MatmulShape] = main.matmuls if main else {}  # every matmul, by tuning key
        self._values: dict[int, relax.Expr] = {}
        self._rows: dict[int, relax.Expr] = {}
        self._weight_vars: dict[str, relax.Var] = {}  # this function's weight parameters
        # Packed once per module: the step function reads the same runtime weights as main.
        self.weight_layouts: list[WeightLayout] = main.weight_layouts if main else []
        self.weight_arrays: dict[str, np.ndarray] = main.weight_arrays if main else {}
        self._kernels: dict[str, relax.GlobalVar] = main._kernels if main else {}
        self.callees: dict[str, tirx.PrimFunc] = main.callees if main else {}
        self._users = graph.users()
        self._outputs = {id(v) for v in graph.outputs}
        self.fused: set[int] = set()  # ids of nodes already emitted as part of another node

    # ---- shapes ---------------------------------------------------------------------
    def dim(self, d: Dim) -> tirx.PrimExpr:
        """A static or symbolic IR dim as an int64 PrimExpr (sums become sums of vars)."""
        terms = [tirx.IntImm("int64", t) if isinstance(t, int) else self.symbols.setdefault(t, tirx.Var(t, "int64"))
                 for t in dim_terms(d)]
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total

    def shape(self, v: Value) -> list[tirx.PrimExpr]:
        return [self.dim(d) for d in v.type.shape]

    def rows_of(self, v: Value) -> tirx.PrimExpr:
        """Product of all but the last dim: the number of rows of `rows(v)`."""
        return _product(self.shape(v)[:-1])

    # ---- values ---------------------------------------------------------------------
    def bind(self, v: Value, expr: relax.Expr) -> None:
        self._values[id(v)] = expr

    def has(self, v: Value) -> bool:
        return id(v) in self._values or self.is_weight(v)

    def is_weight(self, v: Value) -> bool:
        return self.graph.params.get(v.name) is v

    def value(self, v: Value) -> relax.Expr:
        """The Relax value of an IR value (a graph weight becomes an identity-layout parameter)."""
        if id(v) in self._values:
            return self._values[id(v)]
        if self.is_weight(v):
            return self.weight("identity", [v])
        raise LoweringError(f"value {v.name} used before it is produced")

    def rows(self, v: Value) -> relax.Expr:
        """`v` viewed as [rows, last dim] (a free reshape)."""
        x = self.value(v)
        if v.type.rank == 2:
            return x
        if id(v) not in self._rows:
            self._rows[id(v)] = self.bb.emit(relax.op.reshape(x, [self.rows_of(v), self.dim(v.type.shape[-1])]))
        return self._rows[id(v)]

    def flat(self, v: Value) -> relax.Expr:
        """`v` viewed as one axis."""
        x = self.value(v)
        if v.type.rank == 1:
            return x
        return self.bb.emit(relax.op.reshape(x, [_product(self.shape(v))]))

    def reshape_to(self, x: relax.Expr, v: Value) -> relax.Expr:
        """Give a kernel result (of shape [rows, last dim]) the shape of IR value `v`."""
        if v.type.rank == 2:
            return x
        self._rows[id(v)] = x  # the 2-D form stays available to consumers
        return self.bb.emit(relax.op.reshape(x, self.shape(v)))

    # ---- weights --------------------------------------------------------------------
    def weight(self, kind: str, params: Sequence[Value], panel: int = 0, store: str = "") -> relax.Var:
        """A runtime weight parameter: graph weights `params` packed with layout `kind` (kept
        as `store`, see layout.pack)."""
        for p in params:
            if not self.is_weight(p):
                raise LoweringError(f"{kind} layout needs a graph weight, but {p.name} is computed at run time")
        names = [p.name for p in params]
        name = names[0] if kind == "identity" else f"{'+'.join(names)}@{kind}{panel}"
        if name not in self.weight_arrays:
            spec, array = make_layout(name, kind, [(n, self.graph.weights[n]) for n in names], panel, store)
            self.weight_layouts.append(spec)
            self.weight_arrays[name] = array
        if name not in self._weight_vars:
            array = self.weight_arrays[name]
            # Rank and dtype only: the VM then skips matching every weight's shape on every call
            # (two builtin calls per weight per step); each kernel's own argument check still
            # verifies the exact shape of the weights it reads.
            ty = relax.TensorType(dtype=str(array.dtype), ndim=array.ndim)
            self._weight_vars[name] = relax.Var(name, ty)
        return self._weight_vars[name]

    def weight_params(self) -> list[relax.Var]:
        """Every runtime weight of the module, in order (each function takes all of them)."""
        for w in self.weight_layouts:  # one the function does not read (the step's gathered matmuls
            if w.name not in self._weight_vars:  # read transposed weights where main reads panels)
                self._weight_vars[w.name] = relax.Var(w.name, relax.TensorType(dtype=w.dtype, ndim=len(w.shape)))
        return [self._weight_vars[w.name] for w in self.weight_layouts]

    # ---- the KV cache (step function only) -----------------------------------------------
    def cache_slot(self, name: str, shape: list) -> relax.Var:
        """A cache tensor parameter of the step function; `shape` in IR dims (the cache length
        is the symbol CACHE_LEN, bound by the tensor the caller passes)."""
        var = relax.Var(name, relax.TensorType([self.dim(d) for d in shape], "float32"))
        self.cache.append(CacheSlot(name, var, list(shape)))
        return var

    # ---- kernels --------------------------------------------------------------------
    def matmul_config(self, shape: MatmulShape) -> Any:
        """The target's tiling of a matmul (tuned where the tuning database has a record for
        it); its `tj` is the panel width of the weight layout."""
        self.matmuls[shape.key()] = shape
        return self.kernels.matmul_config(shape, self.tuning.get(shape.key()))

    def add_callee(self, func: tirx.PrimFunc) -> None:
        """Put a kernel that other kernels call by name (not Relax) into the module."""
        self.callees[str(func.attrs[NAME_ATTR])] = func

    def _kernel(self, func: tirx.PrimFunc) -> relax.GlobalVar:
        name = str(func.attrs[NAME_ATTR])
        if name not in self._kernels:
            self._kernels[name] = self.bb.add_func(func, name)
        return self._kernels[name]

    def call_inplace(self, func: tirx.PrimFunc, args: Sequence[relax.Expr], index: int) -> relax.Expr:
        """Emit a call of `func` that updates args[index] in place and returns it."""
        self.kernel_calls += 1
        return self.bb.emit(relax.call_tir_inplace(self._kernel(func), list(args), [index],
                                                   args[index].ty))

    def call_te(self, compute: Callable, args: Sequence[relax.Expr], name: str) -> relax.Expr:
        """Emit a kernel written as a te compute (scheduled later by schedule.py)."""
        self.kernel_calls += 1
        return self.bb.emit_te(compute, *args, primfunc_name_hint=name)

    def call(self, func: tirx.PrimFunc, args: Sequence[relax.Expr],
             outs: Sequence[tuple[Sequence[tirx.PrimExpr], str]],
             experts: tuple[relax.Expr, Sequence[relax.Expr], int] | None = None,
             flops_per_row: int | None = None) -> relax.Expr | list[relax.Expr]:
        """Emit `call_tir(func, args)` producing tensors `outs` ((shape, dtype) pairs).
        Integer expressions among `args` (shape values) are passed as scalars. `experts`:
        (offsets [E+1], the per-expert weights among `args`, E) of a kernel that reads each
        expert's weights only for the rows routed to it (recorded in `expert_reads`);
        `flops_per_row`: a matmul's flops per row of its output (recorded in `kernel_flops`)."""
        if flops_per_row is not None:
            self.kernel_flops[str(func.attrs[NAME_ATTR])] = int(flops_per_row)
        if experts is not None:
            offsets, weights, count = experts
            where = lambda x: next(i for i, a in enumerate(args) if a.same_as(x))  # noqa: E731
            self.expert_reads[str(func.attrs[NAME_ATTR])] = {
                "offsets_arg": where(offsets), "weight_args": [where(w) for w in weights], "experts": count}
        self.kernel_calls += 1
        types = [relax.TensorType(list(shape), dtype) for shape, dtype in outs]
        call = relax.call_tir(self._kernel(func), list(args), types if len(types) > 1 else types[0])
        result = self.bb.emit(call)
        if len(types) == 1:
            return result
        return [self.bb.emit(relax.TupleGetItem(result, i)) for i in range(len(types))]

    def users(self, v: Value) -> list[Node]:
        """The nodes that read `v`."""
        return self._users.get(id(v), [])

    # ---- fusion ---------------------------------------------------------------------
    def residual_for(self, node: Node) -> tuple[Node, Value] | None:
        """If `node`'s only output feeds exactly one `add` (and nothing else) whose other
        operand has the same shape and is already computed, return (add node, other operand):
        the producer's kernel can add it while writing back instead of a separate pass."""
        (out,) = node.outputs
        users = self.users(out)
        if len(users) != 1 or id(out) in self._outputs:
            return None
        add = users[0]
        if add.op != "add" or len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
            return None
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        if other.type != out.type or add.outputs[0].type != out.type or not self.has(other):
            return None
        return add, other

    def fuse_into(self, consumer: Node) -> None:
        self.fused.add(id(consumer))


def _check_signature(graph: Graph) -> None:
    """Every symbol must appear as a plain dim of some input (so the VM can bind it)."""
    plain = {d for v in graph.inputs for d in v.type.shape if isinstance(d, str) and "+" not in d}
    for v in graph.inputs:
        for d in v.type.shape:
            for t in dim_terms(d):
                if isinstance(t, str) and t not in plain:
                    raise LoweringError(f"input {v.name}: symbol {t!r} is not the whole size of any input axis")


def _emit_function(ctx: LowerContext, name: str) -> None:
    """Lower every node of the graph into Relax function `name` of ctx's BlockBuilder."""
    graph, bb = ctx.graph, ctx.bb
    inputs = []
    for v in graph.inputs:
        var = relax.Var(v.name, relax.TensorType(ctx.shape(v), v.type.dtype))
        ctx.bind(v, var)
        inputs.append(var)
    past = [relax.Var("past", relax.ShapeType([ctx.past]))] if ctx.cache is not None else []
    try:
        _emit_body(ctx, name, inputs, past)
    except BaseException:
        # A lowering that raises leaves the function's binding block and variable scope open
        # (Relax's FunctionScope does not close them on an exception), and TVM then warns on
        # stderr when the builder is freed; close them so a refused graph fails quietly.
        bb._end_block()
        bb.end_scope()
        raise


def _emit_body(ctx: LowerContext, name: str, inputs: list[relax.Var], past: list[relax.Var]) -> None:
    graph, bb = ctx.graph, ctx.bb
    with bb.function(name):
        with bb.dataflow():
            for node in graph.nodes:
                if id(node) in ctx.fused:
                    continue
                try:
                    results = LOWERINGS[node.op](ctx, node)
                except LoweringError:
                    raise
                except ValueError as e:  # a kernel factory refusing this configuration
                    raise LoweringError(f"{node.op} at {node.loc or '?'}: {e}") from e
                except Exception as e:  # a compiler bug: say which node it hit
                    raise RuntimeError(f"lowering {node.op} at {node.loc or '?'} failed: {e}") from e
                for v, r in zip(node.outputs, results):
                    ctx.bind(v, r)
            outs = [bb.emit_output(ctx.value(v)) for v in graph.outputs]
        cache = [slot.var for slot in ctx.cache or []]
        bb.emit_func_output(outs[0] if len(outs) == 1 else relax.Tuple(outs),
                            params=inputs + past + cache + ctx.weight_params())


def refusal(graph: Graph, backend: str) -> str | None:
    """Why `backend` (its name in messages) cannot compile `graph` (an op without a lowering,
    a node its lowering refuses), or None; cheap, so the compiler asks before any code is
    generated."""
    _register_builtin_lowerings()
    missing = sorted({n.op for n in graph.nodes if n.op not in LOWERINGS})
    if missing:
        return f"the {backend} backend has no lowering for op(s): {', '.join(missing)}"
    for node in graph.nodes:
        why = REFUSALS[node.op](node) if node.op in REFUSALS else None
        if why:
            return f"{node.op} at {node.loc or '?'}: {why.replace(BACKEND_WORD, backend)}"
    return None


@dataclass
class LoweredModule:
    """What `lower_module` built: the Relax module (kernels not yet scheduled by the target)
    and the contexts of its functions (`step`: None where the graph does not decode with a
    cache, `no_step_reason` says why)."""

    mod: tvm.IRModule
    main: LowerContext
    step: LowerContext | None
    no_step_reason: str | None
    layer_states: list[str] | None = None  # outputs of the `layers` function (None: not built)
    prefill: LowerContext | None = None  # the `prefill` function (tvm_common/prefill.py; None: not built)
    prefill_outputs: list[str] | None = None  # the outputs it keeps at the last position
    no_prefill_reason: str | None = "not built"  # why there is no prefill function

    @property
    def cache(self) -> list[dict] | None:
        return [slot.to_json() for slot in self.step.cache] if self.step else None

    @property
    def kernel_calls(self) -> dict[str, int]:
        return {"main": self.main.kernel_calls, **({"step": self.step.kernel_calls} if self.step else {}),
                **({"prefill": self.prefill.kernel_calls} if self.prefill else {})}


def lower_module(graph: Graph, kernels: KernelSet, cached_step: bool = True,
                 tuning: Mapping[str, Mapping] | None = None) -> LoweredModule:
    """Lower an IR graph to a Relax module with `main(*inputs, *weights)` and, when the graph
    can decode with a KV cache (`decode_support`) and `cached_step`, `step(*inputs, past,
    *caches, *weights)` and `prefill` (the same, outputs at the last position only; prefill.py),
    calling the kernels of `kernels` (program.py has the calling convention). Raises
    LoweringError for ops or attributes the lowerings refuse. `tuning`: tuning records by
    MatmulShape key, which the kernel set reads (matmul_config)."""
    why = refusal(graph, kernels.name)
    if why:
        raise LoweringError(why)
    _check_signature(graph)
    ctx = LowerContext(graph, tuning=tuning, kernels=kernels)
    _emit_function(ctx, "main")
    step = None
    why_not = decode_support(graph) if cached_step else "not requested"
    prefill, prefill_outputs, no_prefill_reason = None, None, why_not
    if why_not is None:
        step = LowerContext(graph, main=ctx)
        emit_beside_main(step, "step")
        from mocompile.backends.tvm_common.prefill import emit_prefill  # it lowers with this module's context

        built = emit_prefill(ctx, step)
        if isinstance(built, str):
            no_prefill_reason = built
        else:
            (prefill, prefill_outputs), no_prefill_reason = built, None
    states = _emit_layer_states(graph, ctx)
    mod = ctx.bb.get()
    for name, func in ctx.callees.items():
        mod[name] = func
    return LoweredModule(mod, ctx, step, why_not, states, prefill, prefill_outputs, no_prefill_reason)


def emit_beside_main(ctx: LowerContext, name: str) -> None:
    """Lower function `name` of a context built beside main's (`LowerContext(graph, main=...)`)
    into main's module. It must read no weight main does not: the artifact stores main's
    weights, and every function of the module takes that same list."""
    weights = len(ctx.weight_layouts)
    _emit_function(ctx, name)
    if len(ctx.weight_layouts) != weights:
        raise RuntimeError(f"the {name} function reads weight {ctx.weight_layouts[weights].name}, which main does not")


def _emit_layer_states(graph: Graph, main: LowerContext) -> list[str] | None:
    """Where the graph's meta names values under LAYER_STATES (a compile verifying layer by
    layer asks for it), the function `layers(*inputs, *weights)` returning them in order,
    beside `main` and sharing its kernels and weights; their names, or None."""
    names = graph.meta.get(LAYER_STATES)
    if not names:
        return None
    by_name = {v.name: v for n in graph.nodes for v in n.outputs}
    view = copy.copy(graph)  # the same nodes and weights, other outputs
    view.outputs = [by_name[n] for n in names]
    _emit_function(LowerContext(view, main=main, cached=False), LAYERS_FUNCTION)
    return list(names)
