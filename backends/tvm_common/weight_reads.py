"""How a matmul's lowering reads its weights: float32 panels, 16-bit panels the kernel widens
(`widen`), or low-bit code panels with their scale panels (`dequantize`), which the target's
integer kernels take where it has them (activations as int8 codes, kernels_int8.py on a CPU
with AVX-512 VNNI) and its float kernels otherwise. `dequantize` and `widen` have no code of
their own (their lowerings, in lowerings.py, only check the readers): the matmul reading the
weight does the work, so weights stay narrow in memory.
"""

from __future__ import annotations

from tvm import relax

from mocompile.backends.tvm_common.lower import LowerContext, LoweringError
from mocompile.backends.tvm_common.specs import F32_WEIGHTS, Epilogue, MatmulShape, WeightFormat
from mocompile.ir.graph import Node, Value
from mocompile.ir.registry import get_op, input_side_weights

F32 = "float32"


def low_bit(w: Value) -> Node | None:
    """The `dequantize` node producing matmul weight `w` from low-bit graph weights, if any."""
    deq = w.producer
    return deq if deq is not None and deq.op == "dequantize" else None


def widened(w: Value) -> Node | None:
    """The `widen` node producing weight `w` from 16-bit float bits (ir/ops/widen.py), if any."""
    node = w.producer
    return node if node is not None and node.op == "widen" else None


def matmul_weights(ctx: LowerContext, node: Node, kind: str, weights: list[Value], experts: int, k: int, n: int):
    """The weight arguments of a matmul kernel reading `weights` in layout `kind` (float32
    panels; for weights produced by `widen`, 16-bit panels the kernel widens as it reads
    them; for weights produced by `dequantize`, low-bit code panels + scale panels that the
    kernel dequantizes as it reads them) and its MatmulConfig (tuned or default)."""
    deqs = [low_bit(w) for w in weights]
    halves = [widened(w) for w in weights]
    dtypes = {h.attrs["dtype"] if h is not None else None for h in halves}
    if dtypes != {None} and all(d is None for d in deqs):
        if len(dtypes) != 1:
            raise LoweringError(f"{node.op} at {node.loc or '?'}: its weights {', '.join(w.name for w in weights)} "
                                "are stored in different dtypes; store them alike (the kernel reads them as one panel)")
        half = dtypes.pop()
        fmt = WeightFormat(16, 1, half, pairs=half == "bfloat16" and k % 2 == 0)
        sources = [([h.inputs[0] for h in halves], "k_pairs" if fmt.pairs else "")]
    elif all(d is None for d in deqs):
        fmt, sources = F32_WEIGHTS, [(weights, "")]
    else:
        formats = {low_bit_format(ctx, d) if d is not None else None for d in deqs}
        if len(formats) != 1:
            raise LoweringError(f"{node.op} at {node.loc or '?'}: its weights {', '.join(w.name for w in weights)} "
                                "are quantized differently; quantize them alike (the kernel reads them as one panel)")
        fmt = formats.pop()
        sources = [([d.inputs[0] for d in deqs], ""), ([d.inputs[1] for d in deqs], fmt.scale_store)]
    config = ctx.matmul_config(MatmulShape(experts, k, n, len(weights) == 2, fmt))
    return [ctx.weight(kind, src, config.tj, store) for src, store in sources], config


def low_bit_format(ctx: LowerContext, deq: Node) -> WeightFormat:
    """How the kernels read a dequantize's weight: its bits and scale groups, and its scales
    in float16 where the quantize pass rounded them so and the target's kernels read that."""
    scales = deq.attrs.get("scales", "float32") if ctx.kernels.half_scales else "float32"
    return WeightFormat(deq.attrs["bits"], int(deq.inputs[1].type.shape[-1]), scales=scales)


def integer_format(ctx: LowerContext, deq: Node | None) -> WeightFormat | None:
    """The format of a low-bit weight if the target's integer kernels read it, else None."""
    if deq is None:
        return None
    fmt = low_bit_format(ctx, deq)
    return fmt if ctx.kernels.integer_format(fmt, int(deq.outputs[0].type.shape[-1])) else None


def int8_reader(ctx: LowerContext, node: Node) -> tuple[Node, list[Node]] | None:
    """(quantize_act, dequantize nodes of the weights reading its output) if `node` is an op
    that reads its input as int8 under W8A8 (`act_quant_input`: linear, feed-forward block,
    experts; each of their lowerings calls this) over int8-quantized activations whose
    input-side weights (a linear's, the gate|up of a block) the integer kernels read
    (the target's int8_matmul); None where they do not, e.g. for a CPU without VNNI."""
    if not get_op(node.op).act_quant_input:
        return None
    qa = node.inputs[0].producer
    if qa is None or qa.op != "quantize_act" or qa.attrs["mode"] not in ("static", "token"):
        return None
    deqs = integer_weights(ctx, input_side_weights(node))
    return (qa, deqs) if deqs is not None else None


def activation_codes(ctx: LowerContext, x_rows: relax.Expr, rows, k: int, mode: str, group: int,
                      static: list = ()) -> list[relax.Expr]:
    """[codes, scales, group sums] of activation rows for the integer kernels (quantize_packed),
    once per value, mode and group size."""
    key = ("codes", id(x_rows), mode, group)
    source, packed = ctx.derived.get(key, (None, None))
    if source is not x_rows:  # (kept with its source: an id is reused once its object is gone)
        digits = ctx.kernels.digits_of(mode)
        packed = list(ctx.call(ctx.kernels.quantize_packed(k, mode, group), [x_rows, *static],
                               [((rows, digits * k), "int8"), ((rows,), F32), ((rows, digits * (k // group)), "int32")]))
        ctx.derived[key] = (x_rows, packed)
    return packed


def integer_weights(ctx: LowerContext, weights: list[Value]) -> list[Node] | None:
    """The dequantize nodes of a matmul's low-bit weights when the integer kernels read them
    (a target with integer_matmuls, e.g. a CPU with AVX-512 VNNI; all in one format they
    take), else None."""
    deqs = [low_bit(w) for w in weights]
    formats = {integer_format(ctx, d) for d in deqs}
    return deqs if ctx.kernels.integer_matmuls and None not in formats and len(formats) == 1 else None


def int8_call(ctx: LowerContext, x_rows: relax.Expr, rows, mode: str, deqs: list[Node], epi: Epilogue,
               plan: list = (), extra: list = (), static: list = (), gather: tuple = ()) -> relax.Expr:
    """x_rows @ the low-bit weights of `deqs` (one, or a gate|up pair) through the target's int8_matmul:
    activation codes as `mode` says (quantize_act's static / token rounding, or "float" for a
    weight-only matmul), weights as VNNI panels with their scale panels, per expert when
    `plan` ([indptr]) is given. With `gather` (row_token, pairs), x_rows are the tokens and
    the expert-sorted rows read their codes through row_token (quantized once per token)."""
    codes, scales = [d.inputs[0] for d in deqs], [d.inputs[1] for d in deqs]
    *lead, n, k = (int(d) for d in deqs[0].outputs[0].type.shape)
    experts = lead[0] if plan else 0
    fmt = integer_format(ctx, deqs[0])
    scale_kind = ("expert_" if experts else "") + ("glu_panels" if len(deqs) == 2 else "panels")
    weights = [ctx.weight("vnni_panels", codes),
               ctx.weight(scale_kind, scales, ctx.kernels.integer_lanes, fmt.scale_store)]
    packed = activation_codes(ctx, x_rows, rows, k, mode, k // fmt.groups, static)
    index, out_rows = ([gather[0]], gather[1]) if gather else ([], rows)
    return ctx.call(ctx.kernels.int8_matmul(k, n, epi, experts, fmt, ctx.kernels.digits_of(mode), bool(gather)),
                    [*packed, *plan, *index, *weights, *extra], [((out_rows, n), F32)],
                    (plan[0], weights, experts) if plan else None, flops_per_row=2 * k * n * len(deqs))
