"""The fpga target's estimator on a kernel worked out by hand, its streaming plan for weights
that do not fit on chip, and the one-line refusals of bad devices and of models that cannot
fit. No g++ build here: the estimate comes before any code."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mocompile import cli
from mocompile.backends.fpga.design import Design, DenseUnit
from mocompile.backends.fpga.devices import PRESETS, Device, load_device
from mocompile.backends.fpga.estimate import bram18, dsp_per_multiply, plan, reuse_factors, unit_cost, uram
from mocompile.backends.fpga.fixed import Fmt
from mocompile.backends.fpga.precision import choose_formats
from mocompile.calibration import random_calibration
from mocompile.errors import MocompileError
from mocompile.frontend import lower_source, source_for
from mocompile.ir.graph import Graph
from mocompile.ir.types import TensorType
from mocompile.signature import signature_of

from fpga_models import reduced_spec

X, W, Y = Fmt(16, 4), Fmt(16, 1), Fmt(16, 6)


def one_linear() -> Design:
    """y = x @ w.T, 64 inputs to 32 outputs, 16-bit activations and weights."""
    g = Graph("one_linear")
    x = g.add_input("x", TensorType(("batch", "seq", 64), "float32"))
    w = g.add_param("w", np.full((32, 64), 0.125, np.float32))
    g.outputs = [g.add("linear", x, w, name="y")]
    return Design(g, 16, fmts={"x": X, "y": Y}, weight_fmts={"w": W})


def test_a_dense_kernel_costs_what_the_model_says_by_hand() -> None:
    # 64 x 32 at reuse factor 8: 2048 / 8 = 256 multipliers, one DSP48E2 each (16 x 16 fits 27 x 18);
    # an adder of the accumulator's width per multiplier: 16 + 16 + log2(64) + 1 = 39 bits, + 150 LUTs control;
    # weights reshaped to 8 words of 256 * 16 = 4096 bits: ceil(4096 / 36) = 114 BRAM18 in the 512 x 36 shape
    # (the others are worse: 228, 456, ...), or ceil(4096 / 72) = 57 URAM; II 8, 8 + 5 cycles a call.
    cost = unit_cost(DenseUnit("y", 64, 32, X, W, 64 * 32, 1, "dense"), 8)
    assert (cost.multipliers, cost.dsp, cost.lut) == (256, 256, 256 * 39 + 150)
    assert (cost.depth, cost.bits, cost.cycles) == (8, 4096, 13)
    assert bram18(cost.depth, cost.bits) == 114 and uram(cost.depth, cost.bits) == 57
    assert dsp_per_multiply(27, 18) == 1 and dsp_per_multiply(28, 18) == 2 and dsp_per_multiply(32, 32) == 4
    assert reuse_factors(6, 4) == [1, 2, 3, 6, 12, 24]  # divisors of n_in, then n_in * (divisors of n_out)


def test_the_reuse_factor_is_the_smallest_that_fits_the_dsp_budget() -> None:
    # 80 DSPs allowed (80% of 100): reuse 1..16 need 2048..128 multipliers, 32 needs 64: chosen. Its weights:
    # 32 words of 64 * 16 = 1024 bits = ceil(1024 / 36) = 29 BRAM18; 32 + 5 cycles per token.
    device = Device("hand", "none", dsp=100, bram18=1000, uram=0, lut=100_000, clock_mhz=100.0, offchip_gbps=1.0)
    design = one_linear()
    est = plan(design, device, capacity=16)
    assert est["reuse_target"] == 32 and design.reuse == {"y": 32}
    (row,) = est["kernels"]
    assert row["dense"][0]["reuse_factor"] == 32 and row["dsp"] == 64 and row["lut"] == 64 * 39 + 150
    assert est["totals"] == {"dsp": 64, "lut": 64 * 39 + 150, "bram18": 29, "uram": 0}
    assert est["cycles_per_token"] == {"at_position_0": 37, "at_full_cache": 37, "streaming": 0}
    assert est["fits_on_chip"] and est["tokens_per_second_at_full_cache"] == round(100e6 / 37, 1)


@pytest.fixture(scope="module")
def mixtral_design(tmp_path_factory) -> Design:
    spec = reduced_spec("mixtral_tiny", tmp_path_factory.mktemp("spec"))
    src = source_for(spec, None, None, 0)
    graph = lower_source(src)
    return choose_formats(graph, random_calibration(signature_of(graph, src.int_high), 2, 8, 0), 16)


def test_weights_that_do_not_fit_stream_from_off_chip_memory(mixtral_design) -> None:
    # 60 BRAM18 (48 usable), no URAM: the KV caches and dense weights take the block RAM first, the routed
    # experts' weights do not fit and stream: top_k experts' matrices per token, at 1.6 bytes per cycle.
    device = Device("small", "none", dsp=5000, bram18=60, uram=0, lut=10**6, clock_mhz=250.0, offchip_gbps=0.4)
    est = plan(mixtral_design, device, capacity=32)
    assert not est["fits_on_chip"] and est["totals"]["bram18"] <= 48
    experts = [o for o in est["off_chip"] if o["kind"] == "experts"]
    assert {o["array"] for o in experts} == {"experts__gate", "experts__up", "experts__down"}
    per_cycle = 0.4e9 / 250e6
    for o in experts:  # 2 experts x 64 x 64 weights x 2 bytes each
        assert o["bytes_per_token"] == 2 * 64 * 64 * 2 and o["cycles_per_token"] == math.ceil(2 * 64 * 64 * 2 / per_cycle)
    total = sum(o["bytes_per_token"] for o in est["off_chip"])
    assert est["cycles_per_token"]["streaming"] == math.ceil(total / per_cycle)
    assert est["cycles_per_token"]["at_full_cache"] > est["cycles_per_token"]["at_position_0"]
    roomy = plan(mixtral_design, PRESETS["alveo-u280"], capacity=32)
    assert roomy["fits_on_chip"] and roomy["cycles_per_token"]["streaming"] == 0


def test_a_model_that_cannot_fit_is_one_line(mixtral_design) -> None:
    tiny = Device("tiny", "none", dsp=2, bram18=10, uram=0, lut=10**6, clock_mhz=100.0, offchip_gbps=1.0)
    with pytest.raises(MocompileError, match=r"mixtral_tiny cannot fit tiny: even with every dense product at its "
                                             r"largest reuse factor it needs [\d,]+ DSPs"):
        plan(mixtral_design, tiny, capacity=8)


GOOD = 'name = "board"\npart = "xc7z020clg400-1"\ndsp = 220\nbram18 = 280\nlut = 53200\nclock_mhz = 100\noffchip_gbps = 4.2\n'


@pytest.mark.parametrize("text, message", [
    ("dsp = [", "not valid TOML"),
    (GOOD + "fpus = 3\n", "unknown key 'fpus'"),
    (GOOD.replace("dsp = 220\n", ""), "missing key 'dsp'"),
    (GOOD.replace("dsp = 220", "dsp = -4"), "'dsp' must be a positive integer \\(got -4\\)"),
    (GOOD.replace("lut = 53200", "lut = 1.5"), "'lut' must be a positive integer"),
    (GOOD.replace("clock_mhz = 100", "clock_mhz = \"fast\""), "'clock_mhz' must be a positive number"),
])
def test_bad_device_files_are_one_line(tmp_path, text, message) -> None:
    path = tmp_path / "board.toml"
    path.write_text(text)
    with pytest.raises(MocompileError, match=message):
        load_device(str(path))


def test_device_presets_and_files(tmp_path) -> None:
    assert load_device("alveo-u280").dsp == 9024 and load_device("zcu104").bram18 == 624
    path = tmp_path / "board.toml"
    path.write_text(GOOD)
    d = load_device(str(path))
    assert (d.name, d.dsp, d.uram, d.clock_mhz) == ("board", 220, 0, 100)
    with pytest.raises(MocompileError, match="unknown device 'vu9p' \\(presets: alveo-u280, zcu104"):
        load_device("vu9p")
    with pytest.raises(MocompileError, match="device file not found"):
        load_device(str(tmp_path / "none.toml"))


def test_the_command_line_says_one_line_and_writes_nothing(tmp_path, capsys) -> None:
    spec = reduced_spec("mixtral_tiny", tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("dsp = 220", "dsp = 0"))
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(GOOD.replace("dsp = 220", "dsp = 2"))
    for device, message in ((str(bad), "'dsp' must be a positive integer (got 0)"),
                            (str(tiny), "mixtral_tiny cannot fit board: even with every dense product"),
                            ("zcu102", "unknown device 'zcu102'")):
        out = tmp_path / "out"
        assert cli.main(["compile", str(spec), "-o", str(out), "--target", "fpga", "--device", device]) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("[", "      "))]
        assert len(err) == 1 and err[0].startswith("mocompile: error: ") and message in err[0], err  # past progress
        assert not out.exists()
    assert cli.main(["compile", str(spec), "-o", str(tmp_path / "o"), "--device", "zcu104"]) == 1
    assert "only --target fpga takes a device" in capsys.readouterr().err


def test_what_the_target_cannot_build_is_refused_in_one_line(tmp_path) -> None:
    from mocompile.backends.base import get_backend
    from mocompile.pass_manager import PassContext, PassManager

    backend = get_backend("fpga")
    spec = reduced_spec("mixtral_tiny", tmp_path)
    gelu = tmp_path / "gelu.moe"
    gelu.write_text(spec.read_text().replace("activation     = silu", "activation     = gelu"))
    graph = lower_source(source_for(gelu, None, None, 0))
    assert backend.unsupported(graph) == "experts at layers.0.ffn.experts: the fpga target has a silu table only " \
                                         "(activation 'gelu')"
    src = source_for(spec, None, None, 0)
    w8a8, _ = PassManager("quantize(a=int8)").run(lower_source(src), PassContext(calibration=None,
                                                                                input_ranges=dict(src.int_high)))
    assert "the fpga target has no lowering for op(s): quantize_act" in backend.unsupported(w8a8)
    assert backend.unsupported(lower_source(src)) is None
