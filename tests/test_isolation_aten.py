"""Batch isolation of ordinary torch modules through torch.export and Core ATen
(`mocompile.aten`): each verdict checked by a perturbation experiment on the eager module
(an isolated verdict: changing any sample leaves every other sample's outputs bit for bit
the same; a leak: its witness, and an eager run in which another sample's output moves),
the Core ATen coverage of the rules, unknown ops shown leaking by the differential run, the
routing between the IR and ATen roads, and the one-line refusals."""

from __future__ import annotations

import re
from typing import Any, Callable

import pytest
import torch
from torch import nn

import mocompile
from aten_models import (
    H,
    AlongAxis,
    Attention,
    BatchStatistics,
    BranchOnValues,
    Branches,
    ConvNet,
    CrossSampleIndex,
    CumsumCapacityMoE,
    DynamicQuant,
    ExpertChoiceMoE,
    ExpertLoopMoE,
    FixedBatch,
    Gathers,
    HandNorms,
    MLP,
    OrdinaryOps,
    PackedAttention,
    SdpaAttention,
    SortedMoE,
    TorchMHA,
    TorchNorms,
    seeded,
)
from mocompile.aten.registry import RULES, core_ops, rule_for
from mocompile.errors import MocompileError
from mocompile.isolation import IsolationReport

SEQ_IDS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tokens() -> tuple:  # [batch, seq, hidden]
    return (_x(3, 5, H),)


def rows() -> tuple:  # [batch, hidden]
    return (_x(4, H),)


def padded() -> tuple:  # tokens and which of them are real (every sample keeps its first token)
    keep = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    keep[:, 0] = True
    return _x(3, 5, H), keep


def seq_first() -> tuple:  # [seq, batch, hidden]
    return (_x(5, 3, H),)


def packed() -> tuple:  # tokens of 3 samples packed along one axis, and each token's sample
    return _x(8, H), SEQ_IDS


def labelled() -> tuple:  # [batch, hidden] and a class per sample
    return _x(4, H), torch.tensor([1, 0, 3, 2])


def train(module: nn.Module) -> nn.Module:
    return module.train()


PACKED = {"sample_ids": "seq_ids"}
# (name, model factory, example inputs, check_isolation kwargs, verdict, op of the first leak)
CASES: list[tuple[str, Callable[[], nn.Module], Callable[[], tuple], dict, str, str]] = [
    ("norms_by_hand", lambda: seeded(HandNorms()), tokens, {}, "isolated", ""),
    ("torch_nn_norms", lambda: seeded(TorchNorms()), lambda: (_x(3, 4, H),), {}, "isolated", ""),
    ("layernorm_relu_mlp_dropout_eval", lambda: seeded(MLP()), tokens, {}, "isolated", ""),
    ("dropout_in_training", lambda: train(seeded(MLP())), tokens, {}, "isolated", ""),
    ("shape_reads_chunk_flip_cumsum_sort_scatter", OrdinaryOps, tokens, {}, "isolated", ""),
    ("attention_causal_mask", lambda: seeded(Attention("causal")), tokens, {}, "isolated", ""),
    ("attention_padding_mask", lambda: seeded(Attention("padding")), padded, {}, "isolated", ""),
    ("sdpa_causal", lambda: seeded(SdpaAttention()), tokens, {}, "isolated", ""),
    ("multihead_attention_batch_first", lambda: seeded(TorchMHA(True)), tokens, {}, "isolated", ""),
    ("multihead_attention_seq_first", lambda: seeded(TorchMHA(False)), seq_first, {"batch_dim": 1}, "isolated",
     ""),
    ("packed_attention_block_diagonal_mask", lambda: seeded(PackedAttention(True)), packed, PACKED, "isolated", ""),
    ("conv1d_batchnorm_eval_pool", lambda: seeded(ConvNet()), lambda: (_x(3, 4, 7),), {}, "isolated", ""),
    ("flip_roll_cumsum_sort_max_over_seq", lambda: AlongAxis(("flip", "roll", "cumsum", "sort", "max"), 1), tokens,
     {}, "isolated", ""),
    ("per_token_dynamic_quant", lambda: seeded(DynamicQuant(per_token=True)), tokens, {}, "isolated", ""),
    ("per_sample_gathers", Gathers, labelled, {"batch_dim": 0}, "isolated", ""),
    ("moe_loop_over_experts_index_add", lambda: seeded(ExpertLoopMoE()), tokens, {}, "isolated", ""),
    ("moe_sorted_dispatch_index_add", lambda: seeded(SortedMoE()), tokens, {}, "isolated", ""),
    # leaks
    ("batch_statistics", BatchStatistics, rows, {}, "leaks", "mean.dim"),
    ("batchnorm_training", lambda: train(seeded(ConvNet())), lambda: (_x(3, 4, 7),), {}, "leaks",
     "_native_batch_norm_legit_functional"),
    ("flip_over_batch", lambda: AlongAxis(("flip",), 0), tokens, {}, "leaks", "flip"),
    ("roll_over_batch", lambda: AlongAxis(("roll",), 0), tokens, {}, "leaks", "index_select"),
    ("cumsum_over_batch", lambda: AlongAxis(("cumsum",), 0), tokens, {}, "leaks", "cumsum"),
    ("sort_over_batch", lambda: AlongAxis(("sort",), 0), tokens, {}, "leaks", "sort"),
    ("per_tensor_dynamic_quant", lambda: seeded(DynamicQuant(per_token=False)), tokens, {}, "leaks", "max"),
    ("packed_attention_without_mask", lambda: seeded(PackedAttention(False)), packed, PACKED, "leaks", "_softmax"),
    ("index_chosen_by_another_sample", CrossSampleIndex, rows, {}, "leaks", "argmax"),
    ("moe_capacity_limit", lambda: seeded(ExpertLoopMoE(capacity=3)), tokens, {}, "leaks", "slice.Tensor"),
    ("moe_capacity_by_cumsum", lambda: seeded(CumsumCapacityMoE()), tokens, {}, "leaks", "cumsum"),
    ("moe_expert_choice", lambda: seeded(ExpertChoiceMoE()), tokens, {}, "leaks", "topk"),
]


def _axis(kwargs: dict) -> int:
    return kwargs.get("batch_dim", 0)


def _outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    torch.manual_seed(0)  # dropout in training mode draws the same mask for every run
    with torch.no_grad():
        out = model(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _sample(t: torch.Tensor, axis: int, s: int, kwargs: dict) -> torch.Tensor:
    """Sample s's part of a tensor whose samples lie along `axis` (packed: by sequence id)."""
    return t[SEQ_IDS == s] if kwargs.get("sample_ids") else t.select(axis, s)


def _changed(inputs: tuple, j: int, kind: str, kwargs: dict) -> tuple:
    """The inputs with sample j (and only it) changed: floats scaled or redrawn, masks
    flipped (its first token kept), class labels redrawn; sequence ids stay."""
    out, axis = list(inputs), _axis(kwargs)
    for k, t in enumerate(inputs):
        if k == 1 and kwargs.get("sample_ids"):
            continue
        t = t.clone()
        pick = (SEQ_IDS == j) if kwargs.get("sample_ids") else j
        view = t[pick] if kwargs.get("sample_ids") else t.select(axis, j)
        if t.dtype == torch.bool:
            new = ~view
            new[..., 0] = True
        elif t.dtype.is_floating_point:
            new = view * 100 + 1 if kind == "scale" else torch.randn(view.shape, generator=torch.Generator()
                                                                      .manual_seed(j)) * 3
        else:
            new = (view + 1 + j) % H
        if kwargs.get("sample_ids"):
            t[pick] = new
        else:
            t.select(axis, j).copy_(new)
        out[k] = t
    return tuple(out)


def _samples(inputs: tuple, kwargs: dict) -> list[int]:
    return [0, 1, 2] if kwargs.get("sample_ids") else list(range(inputs[0].shape[_axis(kwargs)]))


def _out_axis(model: nn.Module, k: int, kwargs: dict) -> int:
    """Which axis of output k holds the samples (MultiheadAttention's weights: axis 0)."""
    return 0 if isinstance(model, TorchMHA) and k == 1 else _axis(kwargs)


def confirm_isolated(model: nn.Module, inputs: tuple, kwargs: dict) -> None:
    """Change each sample in turn; every other sample's outputs stay bit for bit the same."""
    base = _outputs(model, inputs)
    for j in _samples(inputs, kwargs):
        for kind in ("scale", "redraw"):
            new = _outputs(model, _changed(inputs, j, kind, kwargs))
            for k, (a, b) in enumerate(zip(base, new)):
                axis = _out_axis(model, k, kwargs)
                for i in _samples(inputs, kwargs):
                    if i != j:
                        assert torch.equal(_sample(a, axis, i, kwargs), _sample(b, axis, i, kwargs)), \
                            f"sample {i}'s output {k} moved when sample {j} was {kind}d"


def eager_leak(model: nn.Module, inputs: tuple, kwargs: dict) -> float:
    """Independently of mocompile: the largest move of another sample's output when one changes."""
    base, worst = _outputs(model, inputs), 0.0
    for j in _samples(inputs, kwargs):
        for kind in ("scale", "redraw"):
            new = _outputs(model, _changed(inputs, j, kind, kwargs))
            for k, (a, b) in enumerate(zip(base, new)):
                axis = _out_axis(model, k, kwargs)
                for i in (i for i in _samples(inputs, kwargs) if i != j):
                    d = (_sample(a, axis, i, kwargs) - _sample(b, axis, i, kwargs)).abs()
                    worst = max(worst, float(torch.nan_to_num(d, nan=float("inf")).max()))
    return worst


@pytest.mark.parametrize("name,factory,inputs,kwargs,verdict,op", CASES, ids=[c[0] for c in CASES])
def test_verdict_matches_the_perturbation_experiment(name: str, factory, inputs, kwargs: dict, verdict: str,
                                                     op: str) -> None:
    model, example = factory(), inputs()
    report = mocompile.check_isolation(model, example, lowering="aten", **kwargs)
    assert isinstance(report, IsolationReport)
    assert report.verdict == verdict, report.format()
    if verdict == "isolated":
        assert report.findings == [] and report.witness is None
        confirm_isolated(model, example, kwargs)
        return
    leak = report.leaks[0]
    assert leak.op == op and leak.reason and leak.chain and leak.chain[0].startswith(op + "@"), report.format()
    assert leak.loc and "aten_models.py" in leak.loc or name == "batchnorm_training", leak.loc
    w = report.witness
    assert w["changed"] and w["max_change"] > 0 and w["perturbed_sample"] != w["observed_sample"], report.format()
    assert eager_leak(model, example, kwargs) > 0  # the leak is real in the eager module too


def test_every_core_aten_op_has_a_rule() -> None:
    """The Core ATen IR as this torch defines it (ops tagged core), each with a rule."""
    ops = core_ops()
    assert len(ops) > 150
    assert [str(op) for op in ops if rule_for(op) is None] == []
    by_design = sorted(str(op) for op in ops if hasattr(RULES[op], "by_design"))
    assert by_design == []  # every core op is worked out; only higher-order ops are unknown on purpose


@torch.library.custom_op("mocompile_test::batch_center", mutates_args=())
def batch_center(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(0, keepdim=True)


@torch.library.custom_op("mocompile_test::double", mutates_args=())
def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


for _op in (batch_center, double):
    _op.register_fake(lambda x: torch.empty_like(x))


class CustomOp(nn.Module):
    def __init__(self, op: Any) -> None:
        super().__init__()
        self.op, self.proj = op, nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.op(x))


def test_an_op_without_a_rule_that_mixes_is_shown_leaking_by_the_differential_run() -> None:
    report = mocompile.check_isolation(CustomOp(batch_center), _x(4, H))
    assert report.verdict == "leaks", report.format()
    (f,) = report.findings
    assert f.kind == "leak" and f.op == "mocompile_test::batch_center"
    assert "no batch-flow rule" in f.reason and "differential run" in f.reason and f.witness["changed"]
    assert report.witness["changed"] and "leak: mocompile_test::batch_center" in report.format()


def test_an_op_without_a_rule_that_does_not_mix_stays_unknown() -> None:
    report = mocompile.check_isolation(CustomOp(double), _x(4, H))
    assert report.verdict == "unknown"
    (f,) = report.findings
    assert (f.kind, f.op) == ("unknown", "mocompile_test::double") and "no batch-flow rule" in f.reason
    assert report.witness["changed"] is False and report.witness["note"].startswith("tried:")


def test_data_dependent_control_flow_is_one_line_naming_the_branch() -> None:
    with pytest.raises(MocompileError) as e:
        mocompile.check_isolation(BranchOnValues(), _x(4, H))
    msg = str(e.value)
    assert "\n" not in msg and "torch.where" in msg and "torch.cond" in msg
    assert re.search(r"control flow depends on tensor values at aten_models\.py:\d+ \(`if x\.sum\(\) > 0:`\)",
                     msg), msg


def test_torch_cond_branches_are_analysed() -> None:
    """Both branches are followed; a branch chosen by a statistic of the batch is a leak there."""
    model = seeded(Branches(on_batch=False))
    report = mocompile.check_isolation(model, _x(4, H))
    assert report.verdict == "isolated", report.format()
    confirm_isolated(model, (_x(4, H),), {})
    report = mocompile.check_isolation(seeded(Branches(on_batch=True)), _x(4, H))
    assert report.verdict == "leaks" and report.leaks[0].op == "mean", report.format()


def test_code_that_fixes_the_batch_size_is_checked_for_that_size() -> None:
    report = mocompile.check_isolation(FixedBatch(), _x(4, 2, H))
    assert report.verdict == "isolated" and "for batch size 4 only" in report.inputs["x"]


def test_models_the_ir_lowering_understands_keep_its_verdict_and_names() -> None:
    """The default road tries the MoE lowering first: IR op names and submodule paths."""
    from isolation_models import QuantLinear, seeded as ir_seeded

    report = mocompile.check_isolation(ir_seeded(QuantLinear(per_token=False)), _x(4, H))
    assert (report.leaks[0].op, report.leaks[0].loc) == ("amax", "quant")
    with pytest.raises(MocompileError, match="no IR lowering"):
        mocompile.check_isolation(MLP(), tokens(), lowering="ir")
    assert mocompile.check_isolation(seeded(MLP()), tokens()).verdict == "isolated"  # refused by the IR: ATen


@pytest.mark.parametrize("case", ["packed_attention_block_diagonal_mask", "sorted_dispatch_never_put_back",
                                  "sorted_dispatch_scatter_back", "kv_cache_attention_within_sample"])
def test_the_aten_road_agrees_with_the_ir_road(case: str) -> None:
    """The models of the IR path's tests, through the ATen road: the same verdicts."""
    from test_isolation import TORCH_CASES

    _, factory, inputs, kwargs, verdict, _ = next(c for c in TORCH_CASES if c[0] == case)
    report = mocompile.check_isolation(factory(), inputs(), lowering="aten", **kwargs)
    assert report.verdict == verdict, report.format()


def test_a_hugging_face_gpt2_block_whose_graph_torch_cannot_decompose() -> None:
    """torch's Core ATen decompositions fail on GPT-2's attention reshapes; the graph is then
    analysed with its composite ops kept (layer_norm, scaled_dot_product_attention)."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0,
                                eos_token_id=0)).eval()

    class LastHidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt2 = gpt2

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.gpt2(input_ids=ids).last_hidden_state

    model, ids = LastHidden(), torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    report = mocompile.check_isolation(model, ids)
    assert report.verdict == "isolated", report.format()
    confirm_isolated(model, (ids,), {})


def test_the_report_prints_and_round_trips_like_the_ir_one() -> None:
    model = nn.Sequential(nn.Linear(H, H), nn.BatchNorm1d(H)).train()
    report = mocompile.check_isolation(model, _x(4, H), lowering="aten")
    text = report.format()
    leak = report.leaks[0]
    assert leak.loc.startswith("1 (") and "batchnorm.py:" in leak.loc  # the submodule and the line of its source
    assert f"leak: {leak.op} at {leak.loc}" in text and "witness: only sample" in text
    assert report.summary().startswith("leaks: _native_batch_norm_legit_functional at 1 (")
    again = IsolationReport.from_json(report.to_json())
    assert again.verdict == "leaks" and again.findings[0].chain == leak.chain
