"""Batch isolation: the static verdict on small models (leaks and look-alikes that are not),
witnesses that really change another sample's output, MoE routing schemes, the unknown
case, the pass, the compile gate, the differential check and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest
import torch

import mocompile
from conftest import EXAMPLES, example_variants
from isolation_models import (
    HIDDEN,
    BatchNormNet,
    CenterByBatchMean,
    CumsumAcross,
    KVCacheAttention,
    Norms,
    PackedAttention,
    QuantLinear,
    SoftmaxOverBatch,
    SortedDispatchMoE,
    TopkOverBatch,
    TopkRoutedMoE,
    seeded,
)
from mocompile.cli import EXIT_NOT_ISOLATED, main
from mocompile.dsl import parse_spec
from mocompile.errors import MocompileError
from mocompile.ir.graph import Graph
from mocompile.ir.interpreter import run
from mocompile.ir.ops.moe import balanced, expert_choice
from mocompile.ir.registry import OpDef, all_ops, register_op
from mocompile.ir.types import TensorType
from mocompile.isolation import IsolationReport, analyze
from mocompile.isolation_check import check_graph, check_spec
from mocompile.pass_manager import PassManager
from mocompile.runtime import Signature, TensorSpec
from mocompile.witness import differential_check, find_witness

CAPACITY_SPEC = """
model capacity_tiny {
    hidden = 32
    heads = 2
    kv_heads = 2
    max_seq = 64
    modality text { vocab = 64 }
    moe sparse { experts = 4  top_k = 2  expert_hidden = 32  capacity_factor = 1.0 }
    layers = [sparse] * 2
}
"""

PACKED_IDS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rows() -> tuple:  # [batch, hidden]
    return (_x(4, HIDDEN),)


def tokens() -> tuple:  # [batch, seq, hidden]
    return (_x(3, 5, HIDDEN),)


def packed() -> tuple:  # [tokens of 3 samples, hidden], sequence id per token
    return _x(8, HIDDEN), PACKED_IDS


def decode_step() -> tuple:  # new token [batch, 1, hidden], cached keys and values [batch, heads, past, dim]
    return _x(3, 1, HIDDEN), _x(3, 2, 4, 4, seed=1), _x(3, 2, 4, 4, seed=2)


SEQ_IDS = {"sample_ids": "seq_ids"}

# (name, model factory, example inputs, check_isolation kwargs, expected verdict, op of the first leak)
TORCH_CASES: list[tuple[str, Callable[[], torch.nn.Module], Callable[[], tuple], dict, str, str]] = [
    # leaks
    ("per_tensor_dynamic_quant", lambda: seeded(QuantLinear(per_token=False)), rows, {}, "leaks", "amax"),
    ("batchnorm_batch_statistics", lambda: seeded(BatchNormNet()).train(), rows, {}, "leaks", "batch_norm"),
    ("softmax_over_batch", lambda: seeded(SoftmaxOverBatch()), rows, {}, "leaks", "softmax"),
    ("reduction_over_batch", CenterByBatchMean, rows, {}, "leaks", "mean"),
    ("topk_over_batch", lambda: seeded(TopkOverBatch()), rows, {}, "leaks", "topk"),
    ("cumsum_across_samples_feeds_values", lambda: seeded(CumsumAcross(0)), tokens, {}, "leaks", "cumsum"),
    ("packed_attention_without_block_mask", lambda: seeded(PackedAttention(masked=False)), packed, SEQ_IDS, "leaks",
     "sdpa"),
    ("sorted_dispatch_never_put_back", lambda: seeded(SortedDispatchMoE(5, "none")), tokens, {}, "leaks", "reshape"),
    # isolated
    ("per_token_dynamic_quant", lambda: seeded(QuantLinear(per_token=True)), tokens, {}, "isolated", ""),
    ("batchnorm_running_statistics", lambda: seeded(BatchNormNet()).eval(), rows, {}, "isolated", ""),
    ("layer_and_rms_norm", lambda: seeded(Norms()), tokens, {}, "isolated", ""),
    ("cumsum_within_sample", lambda: seeded(CumsumAcross(1)), tokens, {}, "isolated", ""),
    ("per_token_topk_routing", lambda: seeded(TopkRoutedMoE()), tokens, {}, "isolated", ""),
    ("sorted_dispatch_gather_back", lambda: seeded(SortedDispatchMoE(5, "gather")), tokens, {}, "isolated", ""),
    ("sorted_dispatch_scatter_back", lambda: seeded(SortedDispatchMoE(5, "scatter")), tokens, {}, "isolated", ""),
    ("packed_attention_block_diagonal_mask", lambda: seeded(PackedAttention(masked=True)), packed, SEQ_IDS, "isolated",
     ""),
    ("kv_cache_attention_within_sample", lambda: seeded(KVCacheAttention()), decode_step, {}, "isolated", ""),
]


def _eager_rows(inputs: tuple, sample: int, kwargs: dict) -> Any:
    """Index of one sample's rows along axis 0 (by sequence id for packed inputs)."""
    return PACKED_IDS == sample if kwargs.get("sample_ids") else sample


def _eager_leak(model: torch.nn.Module, inputs: tuple, kwargs: dict) -> float:
    """Independently of the IR: scale sample j in eager torch; the largest move of sample i's output."""
    worst = 0.0
    for j, i in ((0, 2), (2, 0)):
        for factor in (100.0, -100.0):
            pick_j, pick_i = _eager_rows(inputs, j, kwargs), _eager_rows(inputs, i, kwargs)
            changed = list(inputs)
            changed[0] = inputs[0].clone()
            changed[0][pick_j] = inputs[0][pick_j] * factor + 1
            with torch.no_grad():
                a, b = model(*inputs), model(*changed)
            worst = max(worst, float((a[pick_i] - b[pick_i]).abs().max()))
    return worst


@pytest.mark.parametrize("name,factory,inputs,kwargs,verdict,op", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_torch_model_verdict(name: str, factory, inputs, kwargs: dict, verdict: str, op: str) -> None:
    model, example = factory(), inputs()
    report = mocompile.check_isolation(model, example, **kwargs)
    assert isinstance(report, mocompile.IsolationReport)
    assert report.verdict == verdict, report.format()
    if verdict == "leaks":
        leak = report.leaks[0]
        assert leak.op == op and leak.reason and leak.chain and leak.chain[0].startswith(op + "@")
        w = report.witness
        assert w["changed"] and w["max_change"] > 0 and w["perturbed_sample"] != w["observed_sample"]
        assert _eager_leak(model, example, kwargs) > 0  # the leak is real in the torch model too
    else:
        assert report.findings == [] and report.witness is None


def test_isolated_models_show_no_change_under_the_witness_search() -> None:
    """Not the proof (that is static), but the same search that exposes leaks finds nothing here."""
    for name, factory, inputs, kwargs, verdict, _ in TORCH_CASES:
        if verdict != "isolated":
            continue
        from mocompile.isolation_check import _named_inputs
        from mocompile.lower_fx import lower_module

        model, named = factory(), _named_inputs(factory(), inputs())
        sym = "tokens" if kwargs else "batch"
        types = {n: TensorType((sym, *t.shape[1:]), str(t.dtype).removeprefix("torch.")) for n, t in named.items()}
        graph = lower_module(model, types)
        report = analyze(graph, sample_ids=kwargs.get("sample_ids"))
        w = find_witness(graph, report, {n: t.numpy() for n, t in named.items()})
        assert not w["changed"] and w["max_change"] == 0.0, name


def test_location_names_the_submodule_that_mixes() -> None:
    report = mocompile.check_isolation(seeded(QuantLinear(per_token=False)), _x(4, HIDDEN))
    leak = report.leaks[0]
    assert (leak.op, leak.loc) == ("amax", "quant")
    assert "batch axis" in leak.reason and leak.chain[-1] == "linear@proj"


# ---- specs ------------------------------------------------------------------------------------
def test_spec_with_capacity_factor_leaks_at_the_router() -> None:
    report, _ = check_spec(parse_spec(CAPACITY_SPEC, "capacity.moe"), batch=3, seq=8)
    assert report.verdict == "leaks"
    assert [(f.op, f.loc) for f in report.leaks] == [("router.topk", "layers.0.ffn.router"),
                                                     ("router.topk", "layers.1.ffn.router")]
    first = report.leaks[0]
    assert "capacity_factor=1" in first.reason and first.outputs == ["logits"]
    assert first.chain[0] == "router.topk@layers.0.ffn.router" and first.chain[-1] == "linear@lm_head"
    assert report.witness["changed"] and report.witness["max_change"] > 1e-3
    assert first.witness["max_change"] > 0  # sample i's routing weights change right at the router
    text = report.format()
    assert "router.topk at layers.0.ffn.router" in text and "witness:" in text


@pytest.mark.parametrize("spec_name,variant", example_variants())
def test_example_specs_are_proven_isolated(spec_name: str, variant: str | None) -> None:
    report, graph = check_spec(EXAMPLES / spec_name, variant)
    assert report.verdict == "isolated", report.format()
    assert report.findings == [] and report.outputs == {"logits": "axis 0"}
    # the analysis reports its own time (how long it takes is not asserted: that depends on the host)
    assert report.seconds > 0 and report.to_json()["seconds"] == round(report.seconds, 4)


def test_verdict_holds_after_a_pass_pipeline() -> None:
    report, _ = check_spec(EXAMPLES / "deepseek_tiny.moe", passes="fold-constants,dce")
    assert report.verdict == "isolated"


# ---- MoE routing schemes in the IR ---------------------------------------------------------------
def routed_graph(routing: str, capacity: float | None = None) -> Graph:
    rng = np.random.default_rng(0)
    g = Graph(f"routing_{routing}")
    x = g.add_input("x", TensorType(("batch", "seq", HIDDEN), "float32"))
    router = g.add_param("moe.router.weight", rng.standard_normal((4, HIDDEN)).astype(np.float32))
    w, idx = g.add_node("router.topk", [x, router], {"top_k": 2, "routing": routing, "capacity_factor": capacity},
                        loc="moe.router")
    ws = [g.add_param(f"moe.experts.{n}", (rng.standard_normal(s) / 4).astype(np.float32))
          for n, s in (("gate", (4, 16, HIDDEN)), ("up", (4, 16, HIDDEN)), ("down", (4, HIDDEN, 16)))]
    g.outputs = [g.add("experts", x, w, idx, *ws, loc="moe.experts")]
    return g


@pytest.mark.parametrize("routing,capacity,verdict", [
    ("token_choice", None, "isolated"),
    ("token_choice", 1.0, "leaks"),
    ("expert_choice", None, "leaks"),
    ("balanced", None, "leaks"),
])
def test_routing_schemes(routing: str, capacity: float | None, verdict: str) -> None:
    graph = routed_graph(routing, capacity)
    inputs = {"x": np.random.default_rng(1).standard_normal((3, 6, HIDDEN)).astype(np.float32)}
    report = check_graph(graph, inputs)
    assert report.verdict == verdict
    if verdict == "leaks":
        assert (report.leaks[0].op, report.leaks[0].loc) == ("router.topk", "moe.router")
        assert report.witness["changed"] and report.witness["max_change"] > 0
        expected = {"token_choice": "capacity_factor", "expert_choice": "expert-choice", "balanced": "load balancing"}
        assert expected[routing] in report.leaks[0].reason


def test_batch_level_routing_reference_semantics() -> None:
    choice = np.random.default_rng(0).standard_normal((10, 4))
    idx, served = expert_choice(choice, k=2, factor=1.0)
    assert (np.bincount(idx[served], minlength=4) <= 5).all()  # ceil(10 * 2 / 4) = 5 tokens per expert
    top5 = np.argsort(-choice, axis=0, kind="stable")[:5]
    assert all(t in top5[:, idx[t, slot]] for t, slot in zip(*np.nonzero(served)))  # each expert chose its tokens
    idx, served = balanced(choice, k=2, factor=1.0)
    assert (np.bincount(idx[served], minlength=4) <= 5).all()
    assert all(len(set(row[ok])) == ok.sum() for row, ok in zip(idx, served))  # no expert twice for a token


# ---- never "isolated" by default --------------------------------------------------------------------
def test_op_without_a_rule_makes_the_verdict_unknown() -> None:
    if "test.opaque" not in all_ops():
        register_op(OpDef("test.opaque", lambda ts, a: [ts[0]], lambda xs, a: [xs[0]], doc="no batch_flow"))
    g = Graph("opaque")
    x = g.add_input("x", TensorType(("batch", HIDDEN), "float32"))
    w = g.add_param("w", np.eye(HIDDEN, dtype=np.float32))
    g.outputs = [g.add("linear", g.add("test.opaque", x, loc="block.opaque"), w, loc="block.proj")]
    report = analyze(g)
    assert report.verdict == "unknown"
    (f,) = report.findings
    assert (f.kind, f.op, f.loc) == ("unknown", "test.opaque", "block.opaque") and "no batch-flow rule" in f.reason


def test_concat_along_the_batch_axis_is_unknown() -> None:
    g = Graph("cat")
    x = g.add_input("x", TensorType(("batch", HIDDEN), "float32"))
    g.outputs = [g.add("concat", x, x, axis=0, loc="cat")]
    assert analyze(g).verdict == "unknown"


def test_a_graph_without_a_batch_axis_is_unknown() -> None:
    g = Graph("static")
    x = g.add_input("x", TensorType((4, HIDDEN), "float32"))
    g.outputs = [g.add("silu", x)]
    report = analyze(g)
    assert report.verdict == "unknown" and "no input has a batch axis" in report.findings[0].reason
    assert analyze(g, batch_axes={"x": 0}).verdict == "isolated"


def test_every_builtin_op_declares_a_batch_flow_rule() -> None:
    missing = [name for name, op in all_ops().items() if op.batch_flow is None and not name.startswith("test.")]
    assert missing == []


# ---- pass, compile gate, report ---------------------------------------------------------------------
def test_check_isolation_pass_reports_and_leaves_the_graph_alone() -> None:
    from mocompile.frontend import lower_source, source_from_spec
    from mocompile.ir.printer import format_graph

    graph = lower_source(source_from_spec(parse_spec(CAPACITY_SPEC, "capacity.moe"), None, None, 0))
    out, reports = PassManager("check-isolation").run(graph)
    assert format_graph(out) == format_graph(graph)
    iso = reports[0]["isolation"]
    assert iso["verdict"] == "leaks" and iso["findings"][0]["loc"] == "layers.0.ffn.router"
    assert IsolationReport.from_json(json.loads(json.dumps(iso))).verdict == "leaks"


PLAIN_SPEC = CAPACITY_SPEC.replace("  capacity_factor = 1.0", "")

# A plugin that turns every router into expert-choice routing (the DSL has no spelling for
# it; the IR op does), to see what a compile of such a model does.
EXPERT_CHOICE_PLUGIN = """
from mocompile.pass_manager import Pass, PassResult, register_pass


@register_pass("expert-choice")
class ExpertChoice(Pass):
    def run(self, graph, ctx):
        for node in graph.nodes_of("router.topk"):
            node.attrs["routing"] = "expert_choice"
        return PassResult(graph, {})
"""

def head_plugin(op: str, pass_name: str, loc: str, op_def: str, rule: str = "") -> str:
    """A plugin registering `op` (`op_def`: its OpDef, `rule`: code it refers to) and a pass
    `pass_name` inserting the op, identity in value, before the LM head at `lm_head.{loc}`."""
    return f"""
from mocompile.ir.batch_flow import Out, elementwise, one
from mocompile.ir.registry import OpDef, all_ops, register_op
from mocompile.pass_manager import Pass, PassResult, register_pass
{rule}

if "{op}" not in all_ops():
    register_op({op_def})


@register_pass("{pass_name}")
class BeforeHead(Pass):
    def run(self, graph, ctx):
        head = next(n for n in graph.nodes if n.loc == "lm_head")
        (x,) = graph.add_node("{op}", [head.inputs[0]], {{}}, loc="lm_head.{loc}")
        graph.nodes.insert(graph.nodes.index(head), graph.nodes.pop())
        head.inputs[0] = x
        return PassResult(graph, {{}})
"""


# An op that declares no batch-flow rule: the verdict becomes "unknown" (the analysis never
# assumes isolation).
OPAQUE_PLUGIN = head_plugin("test.plugin_opaque", "opaque-head", "opaque",
                            'OpDef("test.plugin_opaque", lambda ts, a: [ts[0]], lambda xs, a: [xs[0]], '
                            'doc="no batch_flow")')

# A positionwise op whose batch-flow rule mixes the batch's rows when it sees one position:
# the forward and the KV-cached step (every position) are isolated, the prompt prefill (the
# op runs after the cut, on the last position) is not.
ONE_ROW_PLUGIN = head_plugin("test.plugin_one_row", "one-row-head", "one_row",
                             'OpDef("test.plugin_one_row", lambda ts, a: [ts[0]], lambda xs, a: [xs[0]], '
                             'batch_flow=flow, positionwise=True, doc="mixes samples at one position")', """
def flow(args):
    if args.in_types[0].shape[1] == 1:
        return one(Out(mixes="pools the batch's rows when it sees one position"))
    return elementwise(args)
""")

BATCH_ROUTING = {
    "capacity": ("capacity_factor=1", "capacity_factor (token dropping) makes one sample's output depend on the rest "
                                      "of the batch; the tvm_cpu backend does not compile it"),
    "expert_choice": ("expert-choice routing", "routing=expert_choice decides a token's experts from the whole batch; "
                                               "the tvm_cpu backend compiles token-choice routing only"),
}


@pytest.mark.parametrize("routing", list(BATCH_ROUTING))
def test_compile_reports_the_verdict_of_batch_routing_and_the_cpu_backend_refuses_it(routing, tmp_path, capsys) -> None:
    """Capacity-limited and expert-choice models: the compile computes the verdict and
    reports it (a witnessed leak at the router), then the CPU backend refuses the router in
    one line, before generating code, and writes nothing. With --require-isolation the
    verdict stops the compile before the backend is asked."""
    spec = tmp_path / "model.moe"
    args = ["--batch", "3", "--seq", "4"]
    if routing == "capacity":
        spec.write_text(CAPACITY_SPEC)
    else:
        spec.write_text(PLAIN_SPEC)
        (tmp_path / "expert_choice.py").write_text(EXPERT_CHOICE_PLUGIN)
        args += ["--plugin", str(tmp_path / "expert_choice.py"), "--passes", "expert-choice"]
    written = sorted(tmp_path.iterdir())
    why_leak, why_refused = BATCH_ROUTING[routing]
    out = tmp_path / "out"
    assert main(["compile", str(spec), "-o", str(out), *args]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    (verdict,) = [line.strip() for line in lines if line.strip().startswith("batch isolation:")]
    assert verdict.startswith("batch isolation: leaks: router.topk at layers.0.ffn.router: ") and why_leak in verdict
    assert lines[-1] == f"mocompile: error: router.topk at layers.0.ffn.router: {why_refused}"
    assert not any(line.startswith("[5/6]") for line in lines)  # nothing was verified: no code was generated
    assert sorted(tmp_path.iterdir()) == written  # no artifact, no staging directory left behind
    assert main(["compile", str(spec), "-o", str(out), *args, "--require-isolation"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("mocompile: error: batch isolation required, but leaks: router.topk at "
                                "layers.0.ffn.router: ") and "(witness: sample " in lines[-1]
    assert not any(line.startswith("[4/6]") for line in lines)  # stopped before the backend
    assert sorted(tmp_path.iterdir()) == written


def test_require_isolation_refuses_an_unknown_verdict(tmp_path, capsys) -> None:
    """An unknown verdict is not isolation: an op without a batch-flow rule (here from a plugin pass)
    makes check-isolation exit 3 and compile --require-isolation refuse, naming the op."""
    spec, plugin, out = tmp_path / "plain.moe", tmp_path / "opaque.py", tmp_path / "out"
    spec.write_text(PLAIN_SPEC)
    plugin.write_text(OPAQUE_PLUGIN)
    opts = ["--plugin", str(plugin), "--passes", "opaque-head"]
    assert main(["check-isolation", str(spec), *opts]) == EXIT_NOT_ISOLATED
    text = capsys.readouterr().out
    assert "UNKNOWN" in text and "unknown: test.plugin_opaque at lm_head.opaque" in text
    assert "no batch-flow rule" in text
    assert main(["compile", str(spec), "-o", str(out), *opts, "--require-isolation"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "mocompile: error: batch isolation required, but unknown: test.plugin_opaque at lm_head.opaque: op "
        "'test.plugin_opaque' declares no batch-flow rule")
    assert not out.exists()


def test_require_isolation_checks_the_prompt_prefill(tmp_path, capsys) -> None:
    """The prefill's verdict (the KV-cached graph cut to the last position) is computed beside
    the step's, before code generation: a prefill that mixes samples fails --require-isolation
    like a step that does, though the forward and the step are isolated."""
    from mocompile.compiler import cached_isolation
    from mocompile.frontend import lower_source, source_from_spec
    from mocompile.pass_manager import load_plugin

    spec, plugin, out = tmp_path / "plain.moe", tmp_path / "one_row.py", tmp_path / "out"
    spec.write_text(PLAIN_SPEC)
    plugin.write_text(ONE_ROW_PLUGIN)
    load_plugin(plugin)
    graph = lower_source(source_from_spec(parse_spec(PLAIN_SPEC, "plain.moe"), None, None, 0))
    assert cached_isolation(graph) == {"step": "isolated", "prefill": "isolated"}
    graph, _ = PassManager("one-row-head").run(graph)
    assert analyze(graph).verdict == "isolated"
    assert cached_isolation(graph) == {"step": "isolated", "prefill": "leaks"}
    # a target that builds no prefill (mlir, fpga) runs prompts through the step: only its verdict counts
    assert cached_isolation(graph, prefill=False) == {"step": "isolated"}
    opts = ["--plugin", str(plugin), "--passes", "one-row-head"]
    assert main(["compile", str(spec), "-o", str(out), *opts, "--require-isolation"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "mocompile: error: batch isolation required, but the prompt prefill's verdict is leaks")
    assert not out.exists()


def test_require_isolation_refuses_a_module_without_a_batch_axis(tmp_path) -> None:
    """From Python: a torch module whose inputs have no `batch` dim cannot be shown isolated."""
    model = seeded(torch.nn.Sequential(torch.nn.Linear(HIDDEN, 4)))
    with pytest.raises(MocompileError, match=r"^batch isolation required, but unknown: the graph: no input has a "
                                             r"batch axis"):
        mocompile.compile(model, out_dir=tmp_path / "lin", input_types={"input": TensorType((4, HIDDEN), "float32")},
                          require_isolation=True)
    assert not (tmp_path / "lin").exists()


# ---- differential check and CLI -------------------------------------------------------------------------
def _runner(graph: Graph) -> Callable[[dict], dict]:
    return lambda inputs: run(graph, inputs)


def test_differential_check_compares_the_other_samples_bit_for_bit() -> None:
    inputs = {"x": np.random.default_rng(2).standard_normal((3, 6, HIDDEN)).astype(np.float32)}
    axes = {"x": 0}
    ok = differential_check(_runner(routed_graph("token_choice")), inputs, axes, {"experts": 0})
    assert ok["bitwise_identical"] and ok["compared_samples"] == [1, 2]
    bad = differential_check(_runner(routed_graph("expert_choice")), inputs, axes, {"experts": 0})
    assert not bad["bitwise_identical"] and bad["max_abs_diff"] > 0


def test_cli_check_isolation_on_specs(tmp_path, capsys) -> None:
    assert main(["check-isolation", str(EXAMPLES / "mixtral_tiny.moe")]) == 0
    assert "ISOLATED" in capsys.readouterr().out
    spec = tmp_path / "capacity.moe"
    spec.write_text(CAPACITY_SPEC)
    assert main(["check-isolation", str(spec)]) == EXIT_NOT_ISOLATED
    out = capsys.readouterr().out
    assert "LEAKS" in out and "router.topk at layers.0.ffn.router" in out and "chain to output %logits" in out
    assert "witness:" in out and "changed by" in out
    assert main(["check-isolation", str(spec), "--json"]) == EXIT_NOT_ISOLATED
    assert json.loads(capsys.readouterr().out)["findings"][0]["op"] == "router.topk"
    assert main(["compile", str(spec), "-o", str(tmp_path / "out"), "--require-isolation"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("mocompile: error: batch isolation required, but leaks: router.topk")


@pytest.mark.parametrize("routing,code", [("token_choice", 0), ("expert_choice", EXIT_NOT_ISOLATED)])
def test_cli_check_isolation_on_an_artifact(tmp_path, capsys, monkeypatch, routing: str, code: int) -> None:
    """The artifact branch: recorded verdict plus a differential run (a fake artifact runs the IR)."""
    import mocompile.runtime

    graph = routed_graph(routing)
    recorded = analyze(graph).to_json()
    sig = Signature((TensorSpec("x", "float32", ("batch", "seq", HIDDEN)),),
                    (TensorSpec("experts", "float32", ("batch", "seq", HIDDEN)),))
    fake = SimpleNamespace(manifest={"isolation": recorded}, signature=sig, run=_runner(graph), can_decode=False)
    monkeypatch.setattr(mocompile.runtime, "load", lambda path: fake)
    assert main(["check-isolation", str(tmp_path)]) == code
    out = capsys.readouterr().out
    assert ("bit for bit identical" in out) == (code == 0) and ("DIFFERENT" in out) == (code != 0)


def test_package_stays_importable_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import mocompile\n"
            "from mocompile.isolation import analyze\n"
            "assert mocompile.IsolationReport.__name__ == 'IsolationReport'\n"
            "assert callable(mocompile.check_isolation)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
