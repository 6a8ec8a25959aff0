"""An IR graph as a torch.nn.Module, and its torch.export: how the mlir target exports the
model after the pass pipeline rather than the torch module the compile started from.

`GraphModule(graph)` holds the graph's weights as buffers (int8 / packed int4 codes stay
integer tensors) and its forward runs each node's registered torch code (lowering.py) in
graph order; torch.export traces that into one ATen program, which torch-mlir imports
(export.py). Symbolic dims of the graph inputs become torch.export dims of the same name, so
the exported functions take any batch and sequence length (a static dialect gets the
compile's sizes instead).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
import torch

from mocompile.backends.mlir.lower import LowerContext, lower_node, register_builtin_lowerings
from mocompile.ir.graph import Graph

EXAMPLE_SIZES = (2, 3, 5, 7, 11)  # example sizes of distinct symbols (distinct, so none is taken for another)


class GraphModule(torch.nn.Module):
    """The graph's computation in torch: `forward(*inputs)` in graph-input order returns the
    graph's outputs in order. `weights` (name -> tensor) may be shared between modules (the
    main function and the cached step of one model), so an importer sees each weight once."""

    def __init__(self, graph: Graph, ctx: LowerContext, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        register_builtin_lowerings()
        self.graph, self.ctx = graph, ctx
        self.slots: dict[str, str] = {}
        for i, name in enumerate(graph.params):
            self.slots[name] = f"w{i}"
            self.register_buffer(f"w{i}", weights[name])

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env: dict[int, Any] = {id(v): t for v, t in zip(self.graph.inputs, inputs)}
        for name, v in self.graph.params.items():
            env[id(v)] = getattr(self, self.slots[name])
        for node in self.graph.nodes:
            outs = lower_node(self.ctx, node, [env[id(v)] for v in node.inputs])
            for v, t in zip(node.outputs, outs):
                env[id(v)] = t
        return tuple(env[id(v)] for v in self.graph.outputs)


def torch_weights(graph: Graph) -> dict[str, torch.Tensor]:
    """The graph's weights as tensors; uint8 (packed int4 codes) as the same bytes read as int8:
    IREE 3.13 cannot take an unsigned StableHLO constant (its arith.constant keeps the ui8
    resource type for a signless i8 result), and every dialect's MLIR is signless anyway."""
    return {name: torch.from_numpy(np.ascontiguousarray(a.view(np.int8) if a.dtype == np.uint8 else a))
            for name, a in graph.weights.items()}


def symbols(graph: Graph) -> list[str]:
    """The symbolic dims of the graph inputs, in order of appearance."""
    out: list[str] = []
    for v in graph.inputs:
        for d in v.type.shape:
            if isinstance(d, str) and d not in out:
                out.append(d)
    return out


def example_inputs(graph: Graph, sizes: Mapping[str, int]) -> list[torch.Tensor]:
    """Tensors of the graph inputs' types with each symbol at `sizes[symbol]` (zeros for
    integers: every token id is in range; random floats)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for v in graph.inputs:
        shape = [d if isinstance(d, int) else sizes[d] for d in v.type.shape]
        dtype = getattr(torch, v.type.dtype)
        out.append(torch.randn(shape, generator=gen) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype))
    return out


def dynamic_shapes(graph: Graph, may_be_empty: frozenset[str]) -> list[dict[int, Any]]:
    """torch.export dims for every symbolic axis of every input (one Dim per symbol, so axes
    that share a symbol stay equal); `may_be_empty`: the symbols that may be 0 at run time."""
    dims = {s: torch.export.Dim(re.sub(r"\W", "_", s), min=0 if s in may_be_empty else 1) for s in symbols(graph)}
    return [{i: dims[d] for i, d in enumerate(v.type.shape) if isinstance(d, str)} for v in graph.inputs]


def export_graph(graph: Graph, ctx: LowerContext, weights: Mapping[str, torch.Tensor], sizes: Mapping[str, int],
                 dynamic: bool, may_be_empty: frozenset[str] = frozenset()) -> torch.export.ExportedProgram:
    """torch.export of GraphModule(graph): with every symbolic dim dynamic, or (`dynamic`
    False) at `sizes`."""
    module = GraphModule(graph, ctx, weights)
    examples = tuple(example_inputs(graph, sizes))
    shapes = (tuple(dynamic_shapes(graph, may_be_empty)),) if dynamic else None
    with torch.no_grad():
        return torch.export.export(module, examples, dynamic_shapes=shapes, strict=False)


def example_sizes(graph: Graph, given: Mapping[str, int] | None = None) -> dict[str, int]:
    """A size per symbol: `given` where it says, else distinct small sizes."""
    free = iter(s for s in EXAMPLE_SIZES if s not in (given or {}).values())
    return {s: (given or {}).get(s) or next(free) for s in symbols(graph)}
