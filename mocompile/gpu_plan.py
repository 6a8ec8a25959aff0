"""Replaying a GPU artifact's launch plan on a device: no TVM, no torch, no compiled host code.

The artifact (backends/tvm_gpu) holds device code and, per function (`main`, `step`), the
plan of allocations, views and kernel calls its Relax function makes; per kernel, its
parameters and device launches (argument order, grid and block extents as expressions of the
kernel's shape symbols). `PlanRunner` follows it: symbols are bound from the arrays' shapes,
each allocation is made on the device, each view shares its root's memory, each kernel call
binds the kernel's own symbols from its arguments and makes its launches in order.

A `Device` (runtime_opencl.py's OpenCL device, runtime_cuda.py's CUDA device) does the
memory and the launches; `DeviceArray` is a buffer of it with a shape and dtype.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from mocompile.errors import ArtifactError

_ALLOWED = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.Name, ast.Load,
            ast.Constant, ast.Call, ast.UnaryOp, ast.USub)


@functools.lru_cache(maxsize=4096)
def _compiled(text: str) -> Any:
    """An integer expression of the plan (+ - * // %, min, max, names, integers) compiled
    once; anything else in an artifact's plan is refused, never evaluated."""
    tree = ast.parse(text, mode="eval")
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED) or (isinstance(node, ast.Constant) and type(node.value) is not int) or \
                (isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in ("min", "max"))):
            raise ArtifactError(f"launch plan expression {text!r} is not an integer expression of sizes")
    return compile(tree, "<plan>", "eval")


def evaluate(text: str, env: Mapping[str, int]) -> int:
    try:
        return int(eval(_compiled(text), {"__builtins__": {}, "min": min, "max": max}, dict(env)))  # noqa: S307
    except NameError as e:
        raise ArtifactError(f"launch plan expression {text!r}: {e}") from None


class Device(Protocol):
    """What a plan needs of a device: memory, copies, and kernel launches."""

    def alloc(self, nbytes: int) -> Any: ...
    def upload(self, array: np.ndarray) -> Any: ...
    def download(self, buffer: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray: ...
    def launch(self, kernel: str, args: Sequence[Any], grid: Sequence[int], block: Sequence[int]) -> None: ...
    def scalar(self, value: int, dtype: str) -> Any: ...


@dataclass
class DeviceArray:
    """A tensor in device memory (`buffer` None for an empty one)."""

    buffer: Any
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _bind(shapes: Sequence[tuple[Sequence[str], Sequence[int], str]], env: dict[str, int]) -> None:
    """Bind the plain symbols of the (shape expressions, shape, what) triples from their
    shapes, then check every shape against its expressions."""
    for exprs, shape, what in shapes:
        if len(exprs) != len(shape):
            raise ArtifactError(f"{what}: rank {len(shape)}, the plan says {len(exprs)}")
        for text, size in zip(exprs, shape):
            if text.isidentifier() and text not in env:
                env[text] = int(size)
    for exprs, shape, what in shapes:
        if any(evaluate(text, env) != size for text, size in zip(exprs, shape)):
            raise ArtifactError(f"{what}: shape {tuple(shape)} does not match the plan's ({', '.join(exprs)})")


class PlanRunner:
    """One artifact's functions and kernels on one device."""

    def __init__(self, device: Device, functions: Mapping[str, Any], kernels: Mapping[str, Any]) -> None:
        self.device = device
        self.functions = functions
        self.kernels = kernels

    def array(self, a: np.ndarray) -> DeviceArray:
        a = np.ascontiguousarray(a)
        return DeviceArray(self.device.upload(a) if a.size else None, tuple(a.shape), a.dtype)

    def empty(self, shape: Sequence[int], dtype: str | np.dtype) -> DeviceArray:
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        return DeviceArray(self.device.alloc(nbytes) if nbytes else None, tuple(int(d) for d in shape), dt)

    def fetch(self, a: DeviceArray) -> np.ndarray:
        if a.buffer is None:
            return np.zeros(a.shape, a.dtype)
        return self.device.download(a.buffer, a.shape, a.dtype)

    def run(self, function: str, tensors: Mapping[str, DeviceArray], past: int = 0) -> list[DeviceArray]:
        """Run `function` with its tensor parameters by name (inputs, caches, weights,
        constants) and `past`; returns its results (device arrays; views of inputs included)."""
        fn = self.functions[function]
        env: dict[str, int] = {}
        values: dict[int, DeviceArray] = {}
        shapes = []
        for p in fn["params"]:
            if p["role"] == "past":
                env[p["expr"]] = int(past)
                continue
            a = tensors.get(p["name"])
            if a is None:
                raise ArtifactError(f"{function}: no tensor given for parameter {p['name']!r}")
            shapes.append((p["shape"], a.shape, f"{function} parameter {p['name']}"))
            values[p["id"]] = a
        _bind(shapes, env)
        for op in fn["ops"]:
            if op["op"] == "alloc":
                values[op["id"]] = self.empty([evaluate(d, env) for d in op["shape"]], op["dtype"])
            elif op["op"] == "view":
                root = values[op["of"]]
                values[op["id"]] = DeviceArray(root.buffer, tuple(evaluate(d, env) for d in op["shape"]), root.dtype)
            else:
                args = [values[a["id"]] if "id" in a else evaluate(a["expr"], env) for a in op["args"]]
                self.call(op["kernel"], args)
        return [values[r] for r in fn["results"]]

    def call(self, name: str, args: Sequence[DeviceArray | int]) -> None:
        """Launch kernel `name` (its launches in order) with buffers and scalars."""
        kernel = self.kernels[name]
        env: dict[str, int] = {}
        shapes = []
        for p, a in zip(kernel["params"], args, strict=True):
            if "scalar" in p:
                env[p["name"]] = int(a)
            else:
                shapes.append((p["shape"], a.shape, f"kernel {name} argument {p['name']}"))
        _bind(shapes, env)
        for launch in kernel["launches"]:
            grid = [evaluate(g, env) for g in launch["grid"]]
            if min(grid) <= 0:
                continue  # no rows: nothing to do (and a zero-size launch is an error on devices)
            device_args = []
            for a in launch["args"]:
                if "param" in a:
                    buf = args[a["param"]].buffer
                    device_args.append(buf if buf is not None else self.device.alloc(4))
                else:
                    device_args.append(self.device.scalar(evaluate(a["expr"], env), a["dtype"]))
            self.device.launch(launch["kernel"], device_args, grid, launch["block"])


def describe_launches(manifest: Mapping[str, Any]) -> list[str]:
    """One line per device launch of a GPU artifact's kernels: the kernel, its grid (blocks,
    expressions of the sizes a call binds) and its block (threads), then the calls per
    function; `mocompile inspect ART --kernels` prints it."""
    program = manifest.get("program", {})
    if program.get("kind") != "gpu-launch-plan":
        raise ArtifactError(f"the artifact's program ({program.get('kind')!r}) is not a GPU launch plan; "
                            "--kernels lists a GPU artifact's kernels")
    target = manifest.get("target", {})
    lines = [f"{len(program['kernels'])} kernels for {target.get('spec') or program.get('api')} "
             f"(source: {program['source']}{', binary: ' + program['binary'] if program.get('binary') else ''})"]
    width = max(len(name) for name in program["kernels"])
    for name, launches in sorted(program["kernels"].items()):
        for launch in launches:
            grid = " x ".join(g for g in launch["grid"])
            block = " x ".join(str(b) for b in launch["block"])
            lines.append(f"  {name:<{width}}  grid {grid:<28}  block {block}")
    calls = ", ".join(f"{fn} {n}" for fn, n in program.get("kernel_calls", {}).items())
    lines.append(f"kernel launches per call: {calls}")
    return lines
