"""Verification of activation-quantized artifacts: a fixed tolerance against the interpreter
that rounds like the artifact at values lying on a rounding boundary (mocompile.ir.rounding),
never a bound widened by the reference's own spread."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mocompile.errors import VerificationError
from mocompile.ir.graph import Graph
from mocompile.ir.interpreter import run as interpret
from mocompile.ir.ops.quant import quantize_weight
from mocompile.ir.rounding import RoundingTrace, round_half_even, tracing
from mocompile.ir.types import TensorType
from mocompile.signature import signature_of
from mocompile.verification import TOLERANCE, interpreter_reference, resolve_roundings, traced_runner, verify_artifact


def rounding_graph() -> Graph:
    """x -> int8 per-token activation rounding -> int8-weight linear."""
    g = Graph("rounding")
    x = g.add_input("x", TensorType(("batch", "seq", 8), "float32"))
    w = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    q, s = quantize_weight(w, 8, 0)
    deq = g.add("dequantize", g.add_param("w.q", q), g.add_param("w.s", s), bits=8)
    g.outputs = [g.add("linear", g.add("quantize_act", x, mode="token"), deq)]
    return g


def boundary_input() -> np.ndarray:
    """Row max 127 (scale exactly 1): 2.5 + 2^-20 lies on the 2|3 boundary to within float
    noise, 10.25 is far from any boundary."""
    x = np.array([[[127.0, 2.5 + 2.0 ** -20, 10.25, -40.0, 0.0, 1.0, -3.0, 5.0]]], np.float32)
    return x


def runner_for(g: Graph, x: np.ndarray):
    return traced_runner(lambda: list(interpret(g, {"x": x}).values()))


def interpret_with_codes(g: Graph, x: np.ndarray, codes: dict[int, float]) -> list[np.ndarray]:
    """The graph's output when the rounding of element i of x yields codes[i] (what a kernel
    that rounded those elements otherwise would compute)."""
    deq = (g.weights["w.q"].astype(np.float32) * g.weights["w.s"]).astype(np.float32)
    q = np.round(x)  # the row max is 127: the scale is 1
    for i, c in codes.items():
        q.reshape(-1)[i] = c
    return [(q.astype(np.float32) @ deq.T).astype(np.float32)]


def test_the_trace_records_values_on_a_boundary_and_flips_them():
    v = np.array([2.5 + 2.0 ** -20, 10.25, -0.5, 3.0], np.float32)
    with tracing(RoundingTrace()) as trace:
        plain = round_half_even(v)
    assert [f for _, f in trace.ambiguous] == [(0, 0), (0, 2)]  # 10.25 and 3.0 are far from a boundary
    with tracing(RoundingTrace(frozenset({(0, 0), (0, 2)}))):
        flipped = round_half_even(v)
    assert list(plain) == [3, 10, -0, 3] and list(flipped) == [2, 10, -1, 3]
    assert list(round_half_even(v)) == list(plain)  # no trace: plain rounding


def test_a_flip_at_a_boundary_value_is_resolved_with_the_fixed_tolerance():
    g, x = rounding_graph(), boundary_input()
    plain = list(interpret(g, {"x": x}).values())
    artifact = interpret_with_codes(g, x, {1: 2.0})  # the artifact rounded 2.5+ down
    assert not np.allclose(artifact[0], plain[0], rtol=0, atol=TOLERANCE * np.abs(plain[0]).max())
    ref, report = resolve_roundings(artifact, runner_for(g, x))
    assert report == {"ambiguous_roundings": 1, "rounding_flips": 1}
    np.testing.assert_array_equal(ref[0], artifact[0])


def test_a_flip_away_from_any_boundary_is_not_explained():
    g, x = rounding_graph(), boundary_input()
    artifact = interpret_with_codes(g, x, {2: 11.0})  # 10.25 rounded to 11: a wrong kernel
    ref, report = resolve_roundings(artifact, runner_for(g, x))
    assert report["rounding_flips"] == 0
    assert np.abs(ref[0] - artifact[0]).max() > TOLERANCE * np.abs(ref[0]).max()


def test_verification_fails_an_artifact_one_percent_off_and_passes_an_exact_one():
    g = rounding_graph()
    reference = interpreter_reference(g)
    assert reference.graph is g
    signature = signature_of(g, {})
    exact = SimpleNamespace(signature=signature, run=reference.run)
    result = verify_artifact(exact, reference, [(1, 4), (2, 4)], 0)
    assert result["max_rel_error"] == 0 and result["tolerance"] == TOLERANCE
    off = SimpleNamespace(signature=signature, run=lambda i: {k: v * 1.01 for k, v in reference.run(i).items()})
    with pytest.raises(VerificationError, match=r"relative error 0.01 > 0.0001"):
        verify_artifact(off, reference, [(1, 4)], 0)


def test_a_graph_without_rounding_points_has_no_rounding_reference():
    plain = Graph("plain")
    y = plain.add_input("x", TensorType(("batch", 8), "float32"))
    plain.outputs = [plain.add("silu", y)]
    assert interpreter_reference(plain).graph is None


def test_a_router_near_tie_at_the_kth_place_is_recorded_and_swapped():
    """A router's k-th and (k+1)-th scores that tie to within float noise are an ambiguous
    choice like a rounding: recorded, and when flipped the (k+1)-th expert is taken instead."""
    from mocompile.ir.rounding import top_k_choices

    choice = np.array([[0.5, 0.25 + 1e-9, 0.25, 0.0], [0.4, 0.3, 0.2, 0.1]], np.float32)
    with tracing(RoundingTrace()) as trace:
        plain = top_k_choices(choice, 2)
    assert plain.tolist() == [[0, 1], [0, 1]] and [f for _, f in trace.ambiguous] == [(0, 0)]
    with tracing(RoundingTrace(frozenset({(0, 0)}))):
        flipped = top_k_choices(choice, 2)
    assert flipped.tolist() == [[0, 2], [0, 1]]
    assert top_k_choices(choice, 2).tolist() == plain.tolist()
