"""The expert-parallel pieces of an artifact (`mocompile compile --ep`), in its `ep/` directory.

    ep/dense/            the model with every routed-experts node cut out (`experts.remote`,
                         ir/ops/moe_remote.py): attention, norms, routers, shared experts and
                         the LM head, compiled like any artifact (main and the cached step),
                         whose weights file holds no routed expert
    ep/expert<i>/        the program of ONE routed expert of the i-th expert shape (x [rows,
                         hidden], gate weight [rows, 1], expert id [rows, 1] = 0); every
                         expert of that shape in every layer runs through it with its weights
    ep/L<layer>/e<expert>.safetensors
                         one routed expert's weights, packed in that program's layouts: a
                         rank reads only the files of the experts it holds

The manifest's `ep` entry says where everything is (runtime_ep.py reads it):
    {"dense": <program entry>, "programs": [<program entry>, ...],
     "layers": [{"layer": int, "loc": str, "hidden": int, "experts": int, "top_k": int, "program": int}, ...],
     "verification": {...}}
`layers` is in graph order, the order in which every forward calls the experts; `layer` is
the number the placement plan uses for that MoE layer (placement.collect.routing_nodes).

The cut is cheap to build but is a second compile of the model, so it is made only when
asked (`--ep`). Like every artifact, it is verified before the compile succeeds: the dense
program with every expert served in this process (runtime_ep, one rank) against the same
reference as the whole-model artifact, at prefill and for cached decode steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from safetensors.numpy import save_file

from mocompile.backends.base import Backend
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph, Node
from mocompile.ir.registry import get_op
from mocompile.ir.types import TensorType
from mocompile.placement.collect import routing_nodes
from mocompile.runtime_ep import EP_DIR, expert_weights

EP_PROGRAM_KIND = "tvm-relax-vm"  # the runtime's expert-parallel ranks run Relax VM programs


def routed_experts(graph: Graph) -> list[tuple[int, Node]]:
    """(plan layer number, experts node) of every routed-experts node, in graph order."""
    layer_of = {id(router): layer for layer, router in routing_nodes(graph)}
    out = []
    for node in graph.nodes:
        if get_op(node.op).weight_role != "experts":
            continue
        router = node.inputs[2].producer
        if router is None or id(router) not in layer_of:
            raise MocompileError(f"--ep: the experts at {node.loc or '?'} are not fed by a router")
        for w in node.inputs[3:]:
            if graph.params.get(w.name) is not w or w.type.dtype != "float32":
                raise MocompileError(f"--ep: the experts at {node.loc or '?'} read {w.name}, not float32 weights "
                                     f"(expert parallelism takes unquantized experts)")
        if node.attrs.get("hidden_quant") is not None:
            raise MocompileError(f"--ep: the experts at {node.loc or '?'} round their hidden activation (W8A8); "
                                 f"expert parallelism takes unquantized experts")
        out.append((layer_of[id(router)], node))
    if not out:
        raise MocompileError("--ep: the model has no routed experts to spread over processes")
    return out


def dense_graph(graph: Graph, experts: list[tuple[int, Node]]) -> Graph:
    """`graph` with each routed-experts node replaced by `experts.remote` and the routed
    experts' weights dropped."""
    g = graph.clone()
    by_position = {i: layer for i, n in enumerate(graph.nodes) for layer, m in experts if m is n}
    for i, node in enumerate(g.nodes):
        if i not in by_position:
            continue
        up = node.inputs[4 if node.attrs["gated"] else 3]
        node.op, node.inputs = "experts.remote", node.inputs[:3]
        node.attrs = {"layer": by_position[i], "experts": int(up.type.shape[0])}
    used = {id(v) for n in g.nodes for v in n.inputs} | {id(v) for v in g.outputs}
    for name, v in list(g.params.items()):
        if id(v) not in used:
            g.remove_param(name)
    return g


def _shape_key(node: Node) -> tuple:
    up = node.inputs[4 if node.attrs["gated"] else 3]
    return (int(up.type.shape[1]), int(up.type.shape[2]), bool(node.attrs["gated"]), node.attrs["activation"])


def one_expert_graph(node: Node, graph: Graph) -> Graph:
    """The routed experts of `node` reduced to one (its expert 0), fed one slot per row: the
    program every expert of this shape runs through with its own weights."""
    g = Graph(f"expert_{'_'.join(str(k) for k in _shape_key(node))}")
    hidden = int(node.inputs[0].type.shape[-1])
    x = g.add_input("x", TensorType(("rows", hidden), "float32"))
    w = g.add_input("weights", TensorType(("rows", 1), "float32"))
    idx = g.add_input("indices", TensorType(("rows", 1), "int32"))
    names = ["gate", "up", "down"] if node.attrs["gated"] else ["up", "down"]
    params = [g.add_param(n, graph.weights[v.name][:1]) for n, v in zip(names, node.inputs[3:])]
    g.outputs.append(g.add("experts", x, w, idx, *params, activation=node.attrs["activation"],
                           gated=node.attrs["gated"]))
    return g


def _pack_experts(stage: Path, graph: Graph, layer: int, node: Node, layouts: list[dict[str, Any]]) -> None:
    """Write each routed expert of `node` into its own file, in the layouts of its program."""
    from mocompile.backends.tvm_common.layout import WeightLayout

    names = ["gate", "up", "down"] if node.attrs["gated"] else ["up", "down"]
    stacked = [graph.weights[v.name] for v in node.inputs[3:]]
    specs = [WeightLayout.from_json(d) for d in layouts]
    (stage / EP_DIR / f"L{layer}").mkdir(parents=True, exist_ok=True)
    for e in range(stacked[0].shape[0]):
        sources = {n: w[e:e + 1] for n, w in zip(names, stacked)}
        save_file({s.name: s.pack(sources) for s in specs}, str(stage / expert_weights(layer, e)))


def _relative(program: dict[str, Any], sub: str) -> dict[str, Any]:
    """A program entry whose files are named relative to the artifact, not its sub-directory."""
    return {**program, "library": f"{sub}/{program['library']}", "weights": f"{sub}/{program['weights']}"}


def check_ep_target(backend: Backend) -> None:
    """Refuse, before any work, a target whose programs the expert-parallel runtime cannot run."""
    if backend.program_kind != EP_PROGRAM_KIND:
        raise MocompileError(f"--ep: expert-parallel pieces are built for the cpu target (Relax VM programs); "
                             f"the {backend.name} target makes {backend.program_kind} programs")


def build_ep(graph: Graph, experts: list[tuple[int, Node]], backend: Backend, stage: Path,
             say: Callable[[str], None]) -> dict[str, Any]:
    """Write the expert-parallel pieces of `graph` into `stage`/ep and return the manifest's
    `ep` entry (verified by the caller, who has the reference). `experts`: routed_experts(graph),
    which the caller ran (with check_ep_target) to refuse bad input before code generation."""
    say(f"      expert parallelism: cutting {len(experts)} MoE layer(s) out of the dense program")
    dense_dir = stage / EP_DIR / "dense"
    dense_dir.mkdir(parents=True)
    dense = backend.emit(dense_graph(graph, experts), dense_dir)
    dense.pop("target_info", None)
    shapes: list[tuple] = []
    programs: list[dict[str, Any]] = []
    layers = []
    for layer, node in experts:
        key = _shape_key(node)
        if key not in shapes:
            sub = f"{EP_DIR}/expert{len(shapes)}"
            (stage / sub).mkdir(parents=True)
            program = backend.emit(one_expert_graph(node, graph), stage / sub)
            program.pop("target_info", None)
            (stage / sub / program["weights"]).unlink()  # expert 0 of one layer; every expert has its own file
            shapes.append(key)
            programs.append(_relative(program, sub))
        index = shapes.index(key)
        _pack_experts(stage, graph, layer, node, programs[index]["weight_layouts"])
        layers.append({"layer": layer, "loc": node.loc, "hidden": int(node.inputs[0].type.shape[-1]),
                       "experts": int(graph.weights[node.inputs[-1].name].shape[0]),
                       "top_k": int(node.inputs[1].type.shape[-1]), "program": index})
    return {"dense": _relative(dense, f"{EP_DIR}/dense"), "programs": programs, "layers": layers}


def verify_ep(stage: Path, manifest: dict[str, Any], graph: Graph, reference: Any, shapes: list[tuple[int, int]],
              seed: int, decode_tokens: int) -> dict[str, Any]:
    """Run the staged expert-parallel pieces in this process (one rank serving every expert)
    against `reference`: the checks every artifact passes, at prefill and, where the model
    decodes, for cached decode steps."""
    from mocompile.runtime_ep import LocalTransport, open_rank
    from mocompile.verification import verify_with_decode

    rank = open_rank(stage, manifest, LocalTransport(), placement="round-robin", check=False)
    result, decode = verify_with_decode(rank.model, graph, reference, shapes, seed, decode_tokens)
    if decode is not None:
        result["decode"] = decode
    return result
