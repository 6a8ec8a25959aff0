"""A torch module captured for the isolation analysis: torch.export with the batch dimension
symbolic, decomposed to the Core ATen op set.

With the batch a symbol (`torch.export.Dim`), every shape read (x.shape, x.size(), .T, views
with computed sizes, chunk, indexing, in-place updates) arrives as ordinary ops whose fake
outputs carry the symbol, so the rules can tell which axis holds the batch. A model whose
code fixes the batch size (x.view(4, -1), a branch on x.shape[0]) is captured again with the
example's batch size, and its verdict holds for that size alone. A branch on tensor values
cannot be captured at all; that is one line saying where and what to write instead.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import torch

from mocompile.aten.shapes import Batch, dim_of
from mocompile.errors import MocompileError


@dataclass
class Captured:
    program: Any  # torch.export.ExportedProgram, core ATen
    batch: Batch


@lru_cache(maxsize=1)
def _core_decompositions() -> tuple[dict, dict] | None:
    """The Core ATen decomposition table, split the way run_decompositions() splits it.
    Building it takes most of a second on every call; it is the same table every time.
    None where this torch does not expose the split (then run_decompositions() is used)."""
    try:
        from torch.export import exported_program as ep_module

        table = ep_module.default_decompositions().materialize()
        return ep_module._split_decomp_table_to_cia_and_python_decomp(table)
    except (AttributeError, ImportError, TypeError):
        return None


def decompose(program: Any) -> Any:
    """program.run_decompositions() (to Core ATen), with the table built once per process."""
    split = _core_decompositions()
    if split is None:
        return program.run_decompositions()
    from torch.export import exported_program as ep_module

    try:
        return ep_module._decompose_exported_program(program, cia_to_decomp=dict(split[0]),
                                                     python_decomp_table=dict(split[1]), joint_loss_index=None,
                                                     decompose_custom_triton_ops=False)
    except TypeError:  # the private signature changed: the public road
        return program.run_decompositions()


def _where(message: str) -> str:
    """The user's line torch names in a data-dependent error: "file.py:12 (`code`)"."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.+)', message)
    if not frames:
        return "forward"
    file, line, code = frames[-1]
    return f"{file.rsplit('/', 1)[-1]}:{line} (`{code.strip()}`)"


def _first_line(e: Exception) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def capture(module: Any, inputs: Mapping[str, torch.Tensor], axes: Mapping[str, int | None],
            packed: bool = False) -> Captured:
    """Export `module(**inputs)` with one shared batch symbol on each input's axis in `axes`;
    the program's user inputs come in the order of `inputs`."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    name = type(module).__name__
    sizes = {int(t.shape[axes[n]]) for n, t in inputs.items() if axes[n] is not None}
    if len(sizes) > 1:
        raise MocompileError(f"the inputs of {name} disagree on the batch size along batch_dim: {sorted(sizes)}")
    if sizes and min(sizes) < 2:
        raise MocompileError(f"the example inputs of {name} hold {min(sizes)} sample(s): give at least 2, so that "
                             "the batch size can stay symbolic and samples can be compared")
    dim = torch.export.Dim("tokens" if packed else "batch")
    dynamic = {n: None if axes[n] is None else {axes[n]: dim} for n in inputs}
    fixed = False
    try:
        try:
            program = _decomposed(module, inputs, dynamic)
        except GuardOnDataDependentSymNode:
            raise
        except Exception:  # the code fixes the batch size, or torch cannot decompose it symbolically
            program, fixed = _decomposed(module, inputs, None), True
    except GuardOnDataDependentSymNode as e:
        raise MocompileError(
            f"torch.export cannot capture {name}: its control flow depends on tensor values at {_where(str(e))}; "
            "write it with torch.where or torch.cond, loop over a fixed range, or decide it outside forward") from None
    except Exception as e:  # torch.export raises many kinds of errors on code it cannot trace
        raise MocompileError(f"torch.export cannot capture {name}: {_first_line(e)}") from None
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user = [n for n, s in zip(placeholders, program.graph_signature.input_specs) if s.kind.name == "USER_INPUT"]
    symbol = next((dim_of(node.meta["val"].shape[axes[n]]) for node, n in zip(user, inputs) if axes[n] is not None), 0)
    return Captured(program, Batch(symbol, packed=packed, fixed=fixed))


def _decomposed(module: Any, inputs: Mapping[str, torch.Tensor], dynamic: Any) -> Any:
    """The exported program in Core ATen; where torch's decompositions fail on it (some
    reshapes of transposed tensors are re-traced with strides they cannot view), in
    functional ATen with the composite ops kept whole (layer_norm, scaled_dot_product_attention)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation notices, not the user's concern
        program = torch.export.export(module, (), dict(inputs), dynamic_shapes=dynamic)
        try:
            return decompose(program)
        except Exception:  # a torch decomposition that cannot handle this graph
            return program.run_decompositions({})
