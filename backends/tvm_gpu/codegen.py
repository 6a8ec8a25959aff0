"""GPU kernels -> device source and a launch table, with TVM's own lowering.

`generate(kernels, target)` compiles the module's PrimFuncs with `tvm.compile` for OpenCL or
CUDA and keeps two things: the device source TVM's code generator wrote (OpenCL C, CUDA C++),
and, from the module right after TVM's SplitHostDevice pass (captured with a pass
instrument), what the host side of each kernel does: the device kernels it launches, with
which arguments (a buffer parameter's data, or a scalar expression of the shape variables) and
with which grid and block extents. That host side is what our runtime replays (no TVM, no
compiled host code): each PrimFunc becomes a `KernelEntry` of the launch plan.

`check_launches` is the schedule check both GPU targets run in compile: a host side holding a
loop (work left outside any kernel: an unscheduled loop) or a launch whose blocks have a single
thread is refused, naming the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tvm
import tvm_ffi
from tvm import tirx

from mocompile.backends.tvm_common.kernels import NAME_ATTR
from mocompile.backends.tvm_gpu.target import GpuTarget
from mocompile.errors import MocompileError

SPLIT_PASS = "tirx.SplitHostDevice"
THREAD_TAGS = ("threadIdx.x", "threadIdx.y", "threadIdx.z")
BLOCK_TAGS = ("blockIdx.x", "blockIdx.y", "blockIdx.z")


class ScheduleError(MocompileError):
    """A kernel that would not run as a GPU launch (a loop left on the host, one thread)."""


@dataclass
class Launch:
    kernel: str  # the device function's name in the source
    args: list[dict]  # {"param": i} (buffer data) | {"expr": text, "dtype": scalar type}
    grid: list[str]  # blockIdx.x/y/z extents (expressions of the kernel's shape variables)
    block: list[int]  # threadIdx.x/y/z extents

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "args": self.args, "grid": self.grid, "block": self.block}


@dataclass
class KernelEntry:
    """One PrimFunc as the runtime calls it: its parameters (buffers with symbolic shapes,
    or int64 scalars) and the device launches that make up its body."""

    name: str
    params: list[dict]
    launches: list[Launch] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"params": self.params, "launches": [launch.to_json() for launch in self.launches]}


_BINARY = {tirx.Add: "+", tirx.Sub: "-", tirx.Mul: "*", tirx.FloorDiv: "//", tirx.FloorMod: "%"}


def expr_text(e: Any, lets: dict[str, Any] | None = None) -> str:
    """An integer expression of shape variables as text the runtime evaluates (+ - * // %,
    min, max, integers, names); let-bound names are inlined."""
    lets = lets or {}
    if isinstance(e, int):
        return str(e)
    if isinstance(e, tirx.IntImm):
        return str(int(e.value))
    if isinstance(e, tirx.Var):
        return f"({expr_text(lets[e.name], lets)})" if e.name in lets else e.name
    if isinstance(e, tirx.Cast):
        return expr_text(e.value, lets)
    for kind, op in _BINARY.items():
        if isinstance(e, kind):
            return f"({expr_text(e.a, lets)} {op} {expr_text(e.b, lets)})"
    if isinstance(e, (tirx.Min, tirx.Max)):
        return f"{'min' if isinstance(e, tirx.Min) else 'max'}({expr_text(e.a, lets)}, {expr_text(e.b, lets)})"
    if isinstance(e, tirx.Div):  # integer division of non-negative sizes
        return f"({expr_text(e.a, lets)} // {expr_text(e.b, lets)})"
    raise ValueError(f"the launch plan cannot express {type(e).__name__} {e}")


def _dtype_name(var: Any) -> str:
    """The scalar type of a variable as text ("int64")."""
    ty = var.ty
    return str(ty.dtype if isinstance(ty, tvm.ir.PrimType) else var.dtype)


def _params(func: tirx.PrimFunc) -> list[dict]:
    out = []
    for p in func.params:
        ty = p.ty
        if isinstance(ty, tvm.ir.PrimType):
            out.append({"name": p.name, "scalar": _dtype_name(p)})
        else:
            out.append({"name": p.name, "shape": [expr_text(d) for d in ty.shape], "dtype": str(ty.dtype)})
    return out


def _is_buffer_data(e: Any) -> bool:
    return isinstance(e, tvm.ir.Call) and getattr(e.op, "name", "") == "tirx.buffer_data"


def _param_of(name: str, func: tirx.PrimFunc, params: dict[str, int], views: dict[str, Any], var: Any) -> int:
    """The index of the buffer parameter whose data `var` (a buffer) is, following buffers
    declared over another's data (`views`: buffer name -> its data expression)."""
    for _ in range(8):
        index = next((i for i, p in enumerate(func.params) if p.same_as(var)), params.get(var.name))
        if index is not None:
            return index
        data = views.get(var.name)
        if not _is_buffer_data(data):
            break
        var = data.args[0]
    raise ValueError(f"kernel {name}: a device argument is the data of {var.name}, which is no buffer parameter")


def _host_side(name: str, func: tirx.PrimFunc, split: tvm.IRModule) -> list[Launch]:
    """The launches of one host function after SplitHostDevice (ScheduleError for a loop);
    `split` holds the device functions (their parameters' scalar types)."""
    lets: dict[str, Any] = {}
    loops: list[Any] = []
    calls: list[Any] = []

    views: dict[str, Any] = {}

    def on_bind(stmt: Any) -> None:
        lets[stmt.var.name] = stmt.value

    def on_decl(stmt: Any) -> None:
        views[stmt.buffer.name] = stmt.data

    def on_call(call: Any) -> None:
        if getattr(call.op, "name", "") == "tirx.call_ffi_kernel":
            calls.append(call)

    entries = [(tirx.For, loops.append), (tvm.ir.Call, on_call), (tirx.DeclBuffer, on_decl)]
    for kind in ("LetStmt", "Bind"):
        if hasattr(tirx, kind):
            entries.append((getattr(tirx, kind), on_bind))
    tvm_ffi.structural_walk(func.body, entries)
    if loops:
        raise ScheduleError(f"kernel {name}: a loop over {loops[0].loop_var.name} is not bound to GPU blocks or "
                            "threads (it would run on the host)")
    params = {p.name: i for i, p in enumerate(func.params)}
    launches = []
    for call in calls:
        kernel = str(call.args[0].value)
        tags = [str(t) for t in call.attrs.launch_params]
        device_args = list(call.args[1:len(call.args) - len(tags)])
        extents = dict(zip(tags, call.args[len(call.args) - len(tags):]))
        device_params = split[kernel].params
        args = []
        for a, p in zip(device_args, device_params, strict=True):
            if _is_buffer_data(a):
                args.append({"param": _param_of(name, func, params, views, a.args[0])})
            else:
                args.append({"expr": expr_text(a, lets), "dtype": _dtype_name(p)})
        threads = []
        for tag in THREAD_TAGS:
            extent = extents.get(tag, 1)
            if not isinstance(extent, (int, tirx.IntImm)):
                raise ScheduleError(f"kernel {name}: its {tag} extent {extent} is not a constant")
            threads.append(int(extent))
        if threads[0] * threads[1] * threads[2] <= 1:
            raise ScheduleError(f"kernel {name}: launches {kernel} with a single thread per block")
        grid = [expr_text(extents.get(tag, 1), lets) for tag in BLOCK_TAGS]
        launches.append(Launch(kernel, args, grid, threads))
    if not launches:
        raise ScheduleError(f"kernel {name}: no GPU launch (its work would run on the host)")
    return launches


@dataclass
class DeviceCode:
    source: str  # OpenCL C or CUDA C++
    kernels: dict[str, KernelEntry]


def generate(mod: tvm.IRModule, target: GpuTarget) -> DeviceCode:
    """Device source and launch table of every PrimFunc of `mod` (a lowered module whose te
    kernels are scheduled); raises ScheduleError for a kernel that is not a GPU launch."""
    funcs = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            name = str(func.attrs[NAME_ATTR]) if func.attrs is not None and NAME_ATTR in func.attrs else gv.name_hint
            funcs[gv.name_hint] = (name, func.with_attr("global_symbol", gv.name_hint))
    tir_mod = tvm.IRModule({gname: func for gname, (_, func) in funcs.items()})
    captured: dict[str, tvm.IRModule] = {}

    @tvm.instrument.pass_instrument
    class _AfterSplit:
        def run_after_pass(self, module: tvm.IRModule, info: Any) -> None:
            if info.name == SPLIT_PASS:
                captured["mod"] = module

    # TVM's common-subexpression pass leaves declarations the later simplification no longer
    # reads in the device code (nvcc warns: "declared but never referenced"); kernels name
    # their shared values themselves, so it is off.
    with tvm.transform.PassContext(instruments=[_AfterSplit()], config={"tirx.disable_cse_tir": True}):
        built = tvm.compile(tir_mod, target=target.tvm())
    split = captured["mod"]
    kernels = {}
    for gname, (name, func) in funcs.items():
        entry = KernelEntry(gname, _params(func))
        entry.launches = _host_side(name, split[gname], split)
        kernels[gname] = entry
    device = [m for m in built.mod.imports if m.kind in ("opencl", "cuda")]
    if len(device) != 1:
        raise RuntimeError(f"expected one {target.kind} module from TVM, got {[m.kind for m in built.mod.imports]}")
    return DeviceCode(device[0].inspect_source(), kernels)
