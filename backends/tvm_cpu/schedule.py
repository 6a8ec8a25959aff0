"""Scheduling of the te-generated kernels, and the check that nothing runs unscheduled.

Hand-written kernels (tir_util.kernel) carry their schedule in their loops. Everything else
in the module comes from te (tvm_common/injective.py) and is a single injective block; it gets
one generic CPU schedule: the innermost axis split into vector lanes when its extent is
static, all other axes fused into one loop that runs in parallel only when the call moves
enough bytes to repay waking the thread pool (the same rule as tir_util.parallel_for; a
decode step's elementwise adds and concats run on the calling thread).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import Schedule

from mocompile.backends.tvm_cpu import tir_util
from mocompile.backends.tvm_cpu.tir_util import HAND_SCHEDULED_ATTR, SERIAL_ATTR, lanes_for


def _attr(func: tirx.PrimFunc, key: str) -> bool:
    return bool(func.attrs is not None and key in func.attrs and func.attrs[key])


def schedule_injective(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Vector lanes on the innermost axis (static extent), one parallel loop over the rest."""
    sch = Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) != 1:
        raise ValueError(f"expected one injective block, got {len(blocks)} in\n{func}")
    loops = sch.get_loops(blocks[0])
    if not loops:
        return sch.mod["main"]
    extent = sch.get(loops[-1]).extent
    outer = list(loops[:-1])
    if isinstance(extent, tirx.IntImm):
        lanes = lanes_for(int(extent))
        if lanes > 1:
            rest, lane = sch.split(loops[-1], [None, lanes])
            sch.vectorize(lane)
            outer.append(rest)
        else:
            outer.append(loops[-1])
    else:
        outer.append(loops[-1])
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    return _serial_when_small(sch.mod["main"])


def _bytes_moved(func: tirx.PrimFunc) -> tirx.PrimExpr:
    """Bytes of all the kernel's buffers, an expression of their (symbolic) shapes."""
    total: tirx.PrimExpr = tirx.IntImm("int64", 0)
    for param in func.params:
        if not hasattr(param.ty, "shape"):  # a scalar parameter
            continue
        size: tirx.PrimExpr = tirx.IntImm("int64", tvm.DataType(param.ty.dtype).bits // 8)
        for d in param.ty.shape:
            size = size * d
        total = total + size
    return total


def _serial_when_small(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`if bytes >= PARALLEL_MIN_BYTES: <parallel loop> else: <the same loop, serial>`.

    The block is lowered to plain loops first so the outer loop can be duplicated;
    ConvertSSA gives the copy its own loop variable."""
    lowered = tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(), s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.LowerOpaqueBlock(),
    ])(tvm.IRModule({"main": func}))["main"]
    loop = lowered.body
    if not isinstance(loop, tirx.For) or loop.kind != tirx.ForKind.PARALLEL:
        raise ValueError(f"expected the injective kernel to start with its parallel loop, got\n{lowered}")
    serial_loop = tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body)
    body = tirx.IfThenElse(_bytes_moved(lowered) >= tir_util.PARALLEL_MIN_BYTES, loop, serial_loop)
    return tirx.transform.ConvertSSA()(tvm.IRModule({"main": lowered.with_body(body)}))["main"]


def schedule_module(mod: tvm.IRModule) -> tvm.IRModule:
    """Schedule every te-generated PrimFunc in `mod`, then check that all are scheduled."""
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and not _attr(func, HAND_SCHEDULED_ATTR):
            updates[gv] = schedule_injective(func)
    for gv, func in updates.items():
        mod.update_func(gv, func)
    check_scheduled(mod)
    return mod


def loop_kinds(func: tirx.PrimFunc) -> set[int]:
    """The ForKind values of all loops in `func`."""
    kinds: set[int] = set()
    tvm_ffi.structural_walk(func.body, [(tirx.For, lambda loop: kinds.add(int(loop.kind)))])
    return kinds


def has_parallel_loop(func: tirx.PrimFunc) -> bool:
    return int(tirx.ForKind.PARALLEL) in loop_kinds(func)


def check_scheduled(mod: tvm.IRModule) -> None:
    """Raise if any PrimFunc lacks a parallel loop (unless it is marked deliberately serial)."""
    bad = [gv.name_hint for gv, f in mod.functions.items()
           if isinstance(f, tirx.PrimFunc) and not _attr(f, SERIAL_ATTR) and not has_parallel_loop(f)]
    if bad:
        raise RuntimeError(f"unscheduled kernels (no parallel loop): {', '.join(sorted(bad))}")
