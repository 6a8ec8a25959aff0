"""Contextual sparsity (mocompile.ir.contextual) in the TVM targets: the kernel roles'
parameters and how a matmul with `keep` is lowered, shared by every TVM target.

Two ways compute exactly the interpreter's selection (the same float32 scores
|x_i| * ||W[:, i]||, the same threshold, ties to the lower channel):
- gathered: `select_channels` writes each token's kept channels (ascending) and their
  values, [rows, m]; `gathered_matmul` reads only those rows of the weight stored
  transposed in panels ([in, block] per block of output columns: one contiguous row per
  input channel in each panel), so a skipped channel's bytes are never read. This is what
  makes a decode step cheaper.
- masked: `select_channels` with `mask` writes x with the other channels zeroed, [rows, k],
  and the dense kernel runs on it. The plain forward (`main`: prompts and batches, where
  the dense GEMM reuses each weight row across tokens) takes this way, and so does the
  step function where the target measured that the gathered kernel does not beat the dense
  one for the matmul's shape and kept count (`KernelSet.gathered_pays`).
At keep where every channel is kept the lowering is the dense one, kernel for kernel.
"""

from __future__ import annotations

from tvm import relax

from mocompile.backends.tvm_common.lower import LoweringError
from mocompile.backends.tvm_common.tir_build import arg, dim, residual_args
from mocompile.backends.tvm_common.specs import Epilogue
from mocompile.ir.contextual import kept_channels
from mocompile.ir.graph import Node, Value

F32 = "float32"


# ---- kernel parameters (every target's kernel for the role takes exactly these) -------------
def select_channels_args(k: int, m: int, mask: bool, experts: int = 0) -> tuple:
    """x[rows, k], norms[k] (per expert: norms[E, k] and indptr[E+1], rows sorted by expert)
    -> xm[rows, k] (mask) or idx[rows, m] int32, xs[rows, m]: (rows, x, norms, indptr, outputs)."""
    rows = dim("rows")
    x, norms = arg("x", (rows, k)), arg("norms", (experts, k) if experts else (k,))
    indptr = arg("indptr", (experts + 1,), "int32") if experts else None
    outs = [arg("xm", (rows, k))] if mask else [arg("idx", (rows, m), "int32"), arg("xs", (rows, m))]
    return rows, x, norms, indptr, outs


def gathered_matmul_args(k: int, n: int, m: int, epi: Epilogue, experts: int = 0) -> tuple:
    """xs[rows, m], idx[rows, m] (+ indptr[E+1], rows sorted by expert), the weight in
    panels of column_block(n) columns, [(E *) n / block, k, block (2 block with glu)]
    (+ bias[n]) (+ scale[rows]) (+ residuals [rows, n]) -> y[rows, n]:
    (rows, xs, idx, indptr, wt, bias, scale, residuals, y)."""
    rows = dim("rows")
    xs, idx = arg("xs", (rows, m)), arg("idx", (rows, m), "int32")
    indptr = arg("indptr", (experts + 1,), "int32") if experts else None
    block = column_block(n, epi.glu)
    wt = arg("wt", (max(experts, 1) * (n // block), k, 2 * block if epi.glu else block))
    bias = arg("bias", (n,)) if epi.bias else None
    scale = arg("scale", (rows,)) if epi.row_scale else None
    return rows, xs, idx, indptr, wt, bias, scale, residual_args(epi.residual, rows, n), arg("y", (rows, n))


def column_block(n: int, glu: bool) -> int:
    """Output columns one task of the gathered kernel accumulates in registers (at most 128
    floats, 64 per gate and up with glu): the largest power of two up to that dividing n. It
    is also the panel width of the weight the kernel reads: per block of columns, the
    transposed weight [k, block] is contiguous, so a task's kept channels are rows read
    forward through one panel (what the hardware prefetcher streams), and a skipped channel
    skips its bytes in every panel."""
    block = 64 if glu else 128
    while n % block:
        block //= 2
    return block


# ---- lowering ---------------------------------------------------------------------------
def kept(node: Node, width: int) -> int | None:
    """Channels of `width` a token keeps at the node's `keep`; None where it reads all."""
    keep = node.attrs.get("keep")
    if keep is None:
        return None
    m = kept_channels(width, keep)
    return m if m < width else None


def check_float_weights(ctx, node: Node, weights: list[Value]) -> None:
    """Refuse a node with `keep` whose weights are not stored float32 weights (quantized
    after contextual-sparsity: the kernels select rows of float weights only)."""
    for w in weights:
        if not ctx.is_weight(w):
            raise LoweringError(f"{node.op} at {node.loc or '?'}: contextual sparsity reads float32 weights, but {w.name} "
                                f"is computed by {w.producer.op if w.producer is not None else '?'}; quantize and weight-dtype "
                                "cannot follow contextual-sparsity")


def gathered_or_masked(ctx, node: Node, x_rows: relax.Expr, rows, weights: list[Value], m: int, epi: Epilogue,
                       extra: list, dense, indptr: relax.Expr | None = None) -> relax.Expr:
    """x_rows @ weights (one, or a gate|up pair with `epi.glu`; stacked per expert with
    `indptr`, the rows sorted by expert) over each row's kept channels: the gathered kernels
    in the step function where they pay on this target, else `dense(masked x)` (the dense
    or grouped kernel with the same epilogue; `extra`: its bias, row scale, residuals)."""
    check_float_weights(ctx, node, weights)
    *lead, n, k = (int(d) for d in weights[0].type.shape)
    experts = lead[0] if lead else 0
    weight_bytes = sum(int(a.nbytes) for a in ctx.graph.weights.values())
    choice = ctx.kernels.gathered_pays(k, n, m, epi.glu, weight_bytes)  # measured once per shape
    norms = ctx.weight("column_norms", weights)
    # main and step take the same weights: both declare the transposed one the step reads
    kind = ("expert_" if experts else "") + ("glu_panels" if epi.glu else "panels")
    wt = ctx.weight(kind, weights, column_block(n, epi.glu)) if choice["gathered"] else None
    if ctx.cache is not None:  # the step function: decode
        ctx.contextual.append({"node": node.loc or node.outputs[0].name, "k": k, "n": n, "kept": m,
                               "experts": experts, **choice})
    plan = [indptr] if experts else []
    if ctx.cache is None or wt is None:
        return dense(ctx.call(ctx.kernels.select_channels(k, m, True, experts), [x_rows, norms, *plan],
                              [((rows, k), F32)]))
    idx, xs = ctx.call(ctx.kernels.select_channels(k, m, False, experts), [x_rows, norms, *plan],
                       [((rows, m), "int32"), ((rows, m), F32)])
    return ctx.call(ctx.kernels.gathered_matmul(k, n, m, epi, experts), [xs, idx, *plan, wt, *extra], [((rows, n), F32)],
                    (indptr, [wt], experts) if experts else None, flops_per_row=2 * m * n * len(weights))


def summary(decisions: list[dict]) -> str | None:
    """What the step function's contextual matmuls run, in one phrase for the pass's summary."""
    if not decisions:
        return None
    gathered = [d for d in decisions if d["gathered"]]
    shapes = {}
    for d in decisions:
        shapes.setdefault((d["k"], d["n"], d["kept"]), d)
    parts = [f"{k}x{n}@{m}: {'gathered' if d['gathered'] else 'dense'} {d['gathered_us']:.1f} vs {d['dense_us']:.1f} us"
             if d.get("dense_us") is not None else f"{k}x{n}@{m}: {d['why']}" for (k, n, m), d in shapes.items()]
    verdict = ("decode uses the gathered kernels" if len(gathered) == len(decisions) else
               "the gathered kernel does not beat the dense one here: decode falls back to the dense kernels"
               if not gathered else f"decode uses the gathered kernels in {len(gathered)} of {len(decisions)} matmuls, "
               "dense elsewhere")
    return f"{verdict} (measured per matmul, in/out@kept: {'; '.join(parts)})"
