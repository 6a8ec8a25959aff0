"""Op properties (facets) declared in the registry: every registered op declares them
consistently, a new op's facets are honoured by the KV-cache analysis, the quantize pass and
constant folding without any other file knowing its name, and no table of op names is left
outside the op definitions and the lowering registries."""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
from dataclasses import fields
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from conftest import EXAMPLE_SPECS, EXAMPLES, ROOT
from mocompile.dsl import load_spec
from mocompile.frontend import lower_source, source_for
from mocompile.ir import registry
from mocompile.ir.batch_flow import elementwise
from mocompile.ir.graph import Graph, Node
from mocompile.ir.interpreter import run
from mocompile.ir.ops.moe import ROUTER_ATTRS
from mocompile.ir.registry import OpDef, all_ops, get_op, input_side_weights, register_op, weight_inputs
from mocompile.ir.types import TensorType
from mocompile.kv_cache import cached_graph, decode_steps, decode_support, run_cached_graph
from mocompile.pass_manager import PassContext
from mocompile.passes.fold_constants import FoldConstants
from mocompile.passes.quantize import Quantize

OPS = sorted(all_ops())
WEIGHT_ROLES = (None, "router", "experts", "ffn")


# ---- (a) every registered op declares its facets consistently --------------------------------
@pytest.mark.parametrize("name", OPS)
def test_declared_facets_agree_with_each_other(name: str) -> None:
    op = get_op(name)
    if op.positionwise or op.position_check is not None or op.cached_inputs:
        assert op.batch_flow is not None, "an op the decode analysis lets in needs a batch-flow rule"
    assert not (op.positionwise and op.position_check), "position_check is for ops positionwise only sometimes"
    assert not (op.positionwise and op.cached_inputs), "attention reads other positions: not positionwise"
    if op.cached_inputs is not None:
        assert op.cached_inputs and all(isinstance(i, int) and i >= 1 for i in op.cached_inputs)
        assert len(set(op.cached_inputs.values())) == len(op.cached_inputs), "cache names must be distinct"
    if op.weight_slots is not None:
        s = op.weight_slots
        assert isinstance(s, slice) and s.step is None and s.start >= 1, "input 0 is the activation, never a weight"
        assert s.stop is None or s.stop > s.start
    for declared in (op.down_projection, op.act_quant_input, op.weight_role is not None):
        if declared:
            assert op.weight_slots is not None, "a property of the weights an op reads needs weight_slots"
    if op.down_projection:
        assert "hidden_quant" in op.attrs, "W8A8 rounds the hidden activation through hidden_quant"
    assert op.weight_role in WEIGHT_ROLES
    assert op.routing_choices is None or (isinstance(op.routing_choices, int) and op.routing_choices >= 0)
    if op.routing_weights is not None:
        assert op.routing_choices is not None and op.routing_weights != op.routing_choices
    if op.expert_pools is not None or op.keep_experts is not None or op.top_k_attr is not None:
        assert op.routing_choices is not None and op.per_expert_inputs is not None, "expert pruning reads the router"
        assert op.expert_pools is not None and op.keep_experts is not None and op.top_k_attr in op.attrs
    if op.hidden_abs_sum is not None:
        assert op.down_projection, "hidden neurons are what the down projection reads"


@pytest.fixture(scope="module")
def example_graphs() -> list[Graph]:
    """Every example model, and one with layer norms (the examples use RMS norms)."""
    layernorm = dataclasses.replace(load_spec(EXAMPLES / "mixtral_tiny.moe"), norm="layernorm")
    return [lower_source(source_for(model, None, None, 0)) for model in [*EXAMPLE_SPECS, layernorm]]


def _check_node_facets(graph: Graph, node: Node) -> None:
    """The declared facets hold for this node: the slots, indices and inputs they name exist
    and have the types their readers assume."""
    op = get_op(node.op)
    where = f"{node.op}@{node.loc}"
    x = node.inputs[0]
    if op.weight_slots is not None:
        weights = weight_inputs(node)
        assert weights, f"{where}: weight_slots {op.weight_slots} select no input"
        for w in weights:
            assert graph.params.get(w.name) is w and w.type.dtype == "float32" and w.type.rank >= 2, (where, w)
        side = input_side_weights(node)
        assert side and all(w.type.shape[-1] == x.type.shape[-1] for w in side), f"{where}: weights do not read x"
        if op.down_projection:
            assert weights[-1].type.shape[-2] == x.type.shape[-1], f"{where}: the down projection does not give x back"
    if op.cached_inputs:
        for index in op.cached_inputs:
            kv = node.inputs[index]
            assert kv.type.rank == 3 and kv.type.shape[0] == x.type.shape[0], (where, index, kv)
    if op.embeds_tokens:
        assert x.type.dtype.startswith("int") and node.inputs[1].type.rank == 2, where
    if op.routing_choices is not None:
        assert node.outputs[op.routing_choices].type.dtype == "int32", where
    if op.per_expert_inputs is not None:
        experts = {node.inputs[i].type.shape[0] for i in op.per_expert_inputs(node)}
        assert len(experts) == 1, f"{where}: per-expert inputs disagree on the expert count {experts}"
    if op.expert_pools is not None:
        pools = op.expert_pools(node)
        ids = sorted(e for p in pools.pools for e in p)
        assert ids == list(range(next(iter(experts)))), f"{where}: expert pools do not partition the experts"
    if op.affine_channels and node.attrs.get("group") is None:
        assert all(graph.params.get(p.name) is p and p.type.shape == (x.type.shape[-1],) for p in node.inputs[1:]), where


def _has_node_facets(op: OpDef) -> bool:
    """Does `op` declare a facet that _check_node_facets checks on nodes?"""
    return bool(op.weight_slots is not None or op.cached_inputs or op.embeds_tokens or op.routing_choices is not None
                or op.affine_channels or op.per_expert_inputs is not None)


def test_declared_facets_hold_on_every_example_model(example_graphs: list[Graph]) -> None:
    seen = set()
    for graph in example_graphs:
        for node in graph.nodes:
            _check_node_facets(graph, node)
            seen.add(node.op)
    checked = {name for name in OPS if _has_node_facets(get_op(name))}
    assert checked <= seen, f"no example model holds {sorted(checked - seen)}: their facets went unchecked"


def test_router_kernel_spec_is_the_router_attributes() -> None:
    """The router kernel is specialised on router.topk's own attributes, read by name; the
    attributes it has no field for are the ones the backend refuses."""
    from mocompile.backends.tvm_cpu.kernels_router import RouterSpec
    from mocompile.backends.tvm_common.lowerings import _router_refusal

    names = {f.name for f in fields(RouterSpec)} - {"experts"}
    assert names <= set(ROUTER_ATTRS)
    g = Graph("router")
    x = g.add_input("x", TensorType(("batch", "seq", 8), "float32"))
    w = g.add_param("w", np.zeros((4, 8), np.float32))
    for attr, value in [("capacity_factor", 1.0), ("routing", "balanced")]:
        assert attr not in names
        g.add_node("router.topk", [x, w], {"top_k": 2, attr: value})
        assert _router_refusal(g.nodes[-1]), f"{attr} neither shapes the kernel nor is refused"
    assert set(ROUTER_ATTRS) - names == {"capacity_factor", "routing"}
    spec = RouterSpec.of(4, {"top_k": 2, "groups": [[0, 0, 2]], "routed_scale": 2})
    assert spec.groups == ((0, 0, 2),) and spec.routed_scale == 2.0 and spec.scoring == ROUTER_ATTRS["scoring"]


# ---- (b) a toy op's facets are honoured with no other file knowing its name --------------------
def _scale(x: np.ndarray, by: float) -> np.ndarray:
    return (x * np.float32(by)).astype(np.float32)


@pytest.fixture(scope="module")
def toy_ops() -> Iterator[None]:
    linear = get_op("linear")
    defs = [
        # positionwise elementwise: x * 2
        OpDef("toy.double", lambda ts, a: [ts[0]], lambda xs, a: [_scale(xs[0], 2)], batch_flow=elementwise,
              positionwise=True),
        # the same computation, declaring nothing
        OpDef("toy.undeclared", lambda ts, a: [ts[0]], lambda xs, a: [_scale(xs[0], 2)], batch_flow=elementwise),
        # a projection x @ w.T whose weight a quantizer may replace, reading x as int8 under W8A8
        OpDef("toy.project", linear.infer, linear.compute, batch_flow=linear.batch_flow, positionwise=True,
              weight_slots=slice(1, 2), act_quant_input=True),
        # the same, declared a router's weights (quantized only when asked)
        OpDef("toy.gate", linear.infer, linear.compute, batch_flow=linear.batch_flow, positionwise=True,
              weight_slots=slice(1, 2), weight_role="router"),
        # expands weights that must stay low-bit
        OpDef("toy.expand", lambda ts, a: [ts[0]], lambda xs, a: [_scale(xs[0], 1)], batch_flow=elementwise,
              keeps_weights_low_bit=True),
    ]
    for d in defs:
        register_op(d)
    yield
    for d in defs:
        registry._OPS.pop(d.name)


def _decoder(tail: str, hidden: int = 8, vocab: int = 11) -> Graph:
    """ids -> embedding -> causal attention -> `tail` op -> logits."""
    rng = np.random.default_rng(0)
    g = Graph("toy_decoder")
    ids = g.add_input("ids", TensorType(("batch", "seq"), "int64"))
    p = {n: g.add_param(n, rng.standard_normal(s).astype(np.float32))
         for n, s in [("emb", (vocab, hidden)), ("wq", (hidden, hidden)), ("wk", (hidden, hidden)),
                      ("wv", (hidden, hidden)), ("head", (vocab, hidden))]}
    x = g.add("embedding", ids, p["emb"], loc="embed")
    q, k, v = (g.add("linear", x, p[w], loc=f"attn.{w}") for w in ("wq", "wk", "wv"))
    a = g.add("attention", q, k, v, heads=2, kv_heads=2, head_dim=hidden // 2, loc="attn")
    h = g.add(tail, a, loc="tail")
    g.outputs.append(g.add("linear", h, p["head"], loc="lm_head", name="logits"))
    return g


def test_kv_cache_decodes_through_a_declared_positionwise_op(toy_ops: None) -> None:
    g = _decoder("toy.double")
    assert decode_support(g) is None
    inputs = {"ids": np.random.default_rng(1).integers(0, 11, (2, 6))}
    full = run(g, inputs)["logits"]
    steps = run_cached_graph(cached_graph(g), decode_steps(inputs, "ids", prompt=3))
    np.testing.assert_allclose(np.concatenate([s["logits"] for s in steps], axis=1), full, rtol=1e-5, atol=1e-5)
    assert decode_support(_decoder("toy.undeclared")) == "toy.undeclared at tail may mix positions"


def _projection_graph(op: str) -> tuple[Graph, dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    g = Graph("toy_projection")
    x = g.add_input("x", TensorType(("batch", "seq", 16), "float32"))
    w = g.add_param("w", rng.standard_normal((8, 16)).astype(np.float32))
    g.outputs.append(g.add("toy.double", g.add(op, x, w, loc="block.proj"), loc="block.out", name="y"))
    return g, {"x": rng.standard_normal((1, 4, 16)).astype(np.float32)}


def test_quantize_pass_reads_a_new_ops_weight_slots_and_activations(toy_ops: None) -> None:
    g, sample = _projection_graph("toy.project")
    result = Quantize(w="int8", a="int8", calib=1).run(g, PassContext(calibration=[sample]))
    (proj,) = [n for n in result.graph.nodes if n.op == "toy.project"]
    assert proj.inputs[1].producer.op == "dequantize" and proj.inputs[0].producer.op == "quantize_act"
    assert [t["tensor"] for t in result.report["tensors"]] == ["w"]
    assert result.report["accuracy"]["rel_error"] < 0.05


def test_quantize_pass_reads_a_new_ops_weight_role(toy_ops: None) -> None:
    g, sample = _projection_graph("toy.gate")
    kept = Quantize(w="int8", calib=1).run(g, PassContext(calibration=[sample]))
    assert kept.report["tensors"] == [] and "dequantize" not in {n.op for n in kept.graph.nodes}
    g, sample = _projection_graph("toy.gate")
    asked = Quantize(w="int8", calib=1, router=True).run(g, PassContext(calibration=[sample]))
    assert [t["tensor"] for t in asked.report["tensors"]] == ["w"]


def test_fold_constants_leaves_an_op_that_keeps_weights_low_bit(toy_ops: None) -> None:
    g = Graph("toy_fold")
    x = g.add_input("x", TensorType(("batch", 4), "float32"))
    w = g.add_param("w", np.ones(4, np.float32))
    kept = g.add("toy.expand", w, loc="kept")
    folded = g.add("toy.double", w, loc="folded")
    g.outputs.append(g.add("add", g.add("add", x, kept), folded, name="y"))
    result = FoldConstants().run(g, PassContext())
    assert result.report["folded_nodes"] == ["toy.double@folded"]
    assert [n.op for n in result.graph.nodes] == ["toy.expand", "add", "add"]


# ---- (c) no op-name side tables outside the op definitions and the lowering registries -----
SCANNED = ("mocompile", "passes", "backends", "dsl")
EXEMPT = (
    "mocompile/ir/ops/*",  # the op definitions: where facets are declared
    "backends/*/lower.py", "backends/*/lowerings.py",  # a backend's lowering registry, keyed by op name
    "mocompile/fx_tables.py", "mocompile/lower_fx.py", "mocompile/lower_tensor_code.py",  # torch.fx -> IR lowerings
)


def _is_op(expr: ast.expr) -> bool:
    """`<anything>.op` or a variable named `op`: an op name being looked up."""
    return (isinstance(expr, ast.Attribute) and expr.attr == "op") or (isinstance(expr, ast.Name) and expr.id == "op")


def _names_ops(expr: ast.expr, op_names: set[str]) -> bool:
    """A collection literal with at least one registered op name among its elements (or keys)."""
    if isinstance(expr, (ast.Tuple, ast.List, ast.Set)):
        elements = expr.elts
    elif isinstance(expr, ast.Dict):
        elements = [k for k in expr.keys if k is not None]
    else:
        return False
    return any(isinstance(e, ast.Constant) and e.value in op_names for e in elements)


def op_name_tables(source: str, op_names: set[str]) -> list[int]:
    """Lines of `source` holding a side table of op names: a set of op names, an op looked up
    in a collection (`node.op in (...)`, `node.op in TABLE`), or a table indexed by an op
    (`TABLE[node.op]`, `TABLE.get(node.op)`). A test of one op (`node.op == "x"`) is not one."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Set) and _names_ops(node, op_names):
            hits.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("set", "frozenset")
              and node.args and _names_ops(node.args[0], op_names)):
            hits.append(node.lineno)
        elif isinstance(node, ast.Compare) and _is_op(node.left):
            for cmp, right in zip(node.ops, node.comparators):
                if isinstance(cmp, (ast.In, ast.NotIn)) and (
                        _names_ops(right, op_names) or isinstance(right, (ast.Name, ast.Attribute))):
                    hits.append(node.lineno)
        elif isinstance(node, ast.Subscript) and _is_op(node.slice):
            hits.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and _is_op(node.args[0])):
            hits.append(node.lineno)
    return sorted(set(hits))


def test_the_side_table_finder_finds_tables_and_only_tables() -> None:
    names = set(OPS)
    planted = {
        'READERS = ("linear", "mlp")\nif node.op in READERS:\n    pass\n': [2],
        'KEEP = frozenset({"dequantize"})\n': [1],
        'if n.op not in ("linear", "experts"):\n    pass\n': [1],
        'slot = SLOTS[node.op]\n': [1],
        'fn = TABLE.get(n.op)\n': [1],
        'ROLES = ("attention", "experts", "shared")\n': [],  # role names, never looked up with an op
        'if node.op == "rmsnorm":\n    pass\n': [],  # a test of one op
        'if node.op in ("placeholder", "output"):\n    pass\n': [],  # not IR op names
    }
    for source, lines in planted.items():
        assert op_name_tables(source, names) == lines, source


def _scanned_files() -> Iterator[Path]:
    for root in SCANNED:
        for path in sorted((ROOT / root).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not any(fnmatch.fnmatch(rel, pattern) for pattern in EXEMPT):
                yield path


def test_no_op_name_side_tables_outside_op_definitions_and_lowering_registries() -> None:
    names = set(OPS)
    found = {path.relative_to(ROOT).as_posix(): lines for path in _scanned_files()
             if (lines := op_name_tables(path.read_text(), names))}
    assert not found, ("op-name tables (declare a property on the op, ir/registry.py OpDef, and ask "
                       f"get_op(name) instead): {found}")
