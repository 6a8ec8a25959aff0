"""CPU targets (backends/tvm_cpu/target.py): target texts and what LLVM says each CPU has,
whether this machine runs a target's code, and every kernel path (integer VNNI / float
low-bit, AVX-512 / AVX2 register tiles) lowered and cross-compiled for its target here and,
wherever this host can execute it (/proc/cpuinfo), run against numpy references and the IR
interpreter. Paths this host cannot run are skipped with the features it lacks."""

from __future__ import annotations

import os

os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np
import pytest
import tvm
from safetensors import safe_open

import test_quantize_kernels as reference  # the kernel tests and their numpy references, run here per target
from mocompile.backends.tvm_cpu import CpuTarget, build, emit, host_target, lower, missing_features, runs_here
from mocompile.backends.tvm_cpu.kernels_matmul import Epilogue, dense_matmul
from mocompile.backends.tvm_cpu.target import CPUINFO_FLAGS, TargetError, cpu_flags, host_cpu
from mocompile.errors import MocompileError
from mocompile.frontend import lower_source, source_for
from mocompile.ir.graph import Graph
from mocompile.ir.interpreter import run
from mocompile.ir.types import TensorType
from mocompile.pass_manager import PassContext, PassManager

from conftest import EXAMPLES
from cpu_targets import HOST, PATHS, TARGETS, perturbed_kernel_output, skip_unless_runs_here

NAMED = ["haswell", "skylake-avx512", "icelake-server", "znver4", "sapphirerapids", "alderlake"]
PIPELINES = ["quantize(w=int8)", "quantize(w=int4,a=int8)"]
TOLERANCE = 1e-4  # max |artifact - interpreter| / max |interpreter|: float32 summation order only
# Integer kernels over rounded activations sum exactly where the interpreter's float sums
# round, so a value on a rounding boundary can take the next code and move its layer's output
# by a quantization step; their exact check is the kernel tests (test_quantize_kernels.py, per path).
ROUNDING_TOLERANCE = 5e-2


# ---- target texts ----------------------------------------------------------------------------
def test_target_texts_name_llvm_cpus_and_their_features():
    assert CpuTarget.parse("cpu") == HOST == CpuTarget.parse("llvm -mcpu=native")
    haswell, skylake, icelake = (CpuTarget.parse(f"cpu -mcpu={c}") for c in ("haswell", "skylake-avx512",
                                                                                 "icelake-server"))
    assert "avx2" in haswell.features and "avx512f" not in haswell.features
    assert (haswell.integer_matmuls, haswell.vector_register_bytes, haswell.accumulator_bytes) == (False, 512, 256)
    assert (skylake.integer_matmuls, skylake.vector_register_bytes, skylake.accumulator_bytes) == (False, 2048, 1024)
    assert icelake.integer_matmuls and "avx512vnni" in icelake.info()["features"]
    no_vnni = CpuTarget.parse("cpu -mcpu=icelake-server -mattr=-avx512vnni")
    assert not no_vnni.integer_matmuls and "avx512f" in no_vnni.features
    no_avx512 = CpuTarget.parse("cpu -mcpu=icelake-server -mattr=-avx512f")  # LLVM drops what depends on it
    assert not any(f.startswith("avx512") for f in no_avx512.features) and no_avx512.vector_register_bytes == 512
    assert CpuTarget.parse("cpu -mcpu=alderlake").features >= {"avxvnni"}  # AVX-VNNI (256-bit): float path
    assert not CpuTarget.parse("cpu -mcpu=alderlake").integer_matmuls
    for t in (haswell, no_vnni, CpuTarget.parse("cpu -mcpu=znver4 -num-cores=3")):
        assert CpuTarget.parse(t.text()) == t
    llvm = CpuTarget.parse("cpu -mcpu=icelake-server -mattr=-avx512vnni -num-cores=3").llvm()
    assert (str(llvm.attrs["mcpu"]), list(llvm.attrs["mattr"]), int(llvm.attrs["num-cores"])) == (
        "icelake-server", ["-avx512vnni"], 3)


@pytest.mark.parametrize("text,message", [
    ("gpu", "starts with 'cpu'"), ("cpu -mcpu=pentium9", "no CPU named 'pentium9'"),
    ("cpu -mattr=avx2", "'avx2' is not"), ("cpu -mattr=+avx512_vnni", "'\\+avx512_vnni' is not"),
    ("cpu -num-cores=0", "positive integer"), ("cpu -O3", "'-O3' is not one of"),
    ("cpu -mcpu=haswell -mcpu=znver4", "at most once")])
def test_bad_target_texts_are_refused_in_one_line(text, message):
    with pytest.raises(TargetError, match=message) as info:
        CpuTarget.parse(text)
    assert isinstance(info.value, MocompileError) and "\n" not in str(info.value)


# ---- where code runs -------------------------------------------------------------------------
def test_the_host_target_runs_here_and_matches_the_default_llvm_target():
    """The host target is LLVM's name for this CPU, minus the extensions /proc/cpuinfo hides;
    its LLVM target is what the backend has always built for (mattr only for hidden ones)."""
    flags = cpu_flags()
    assert HOST.mcpu == host_cpu() and runs_here(HOST) and missing_features(HOST.info()) == []
    assert all(CPUINFO_FLAGS[f] in flags for f in HOST.isa_features) or not flags
    expected = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": 2}
    if HOST.mattr:
        expected["mattr"] = list(HOST.mattr)
    exported = {k: v for k, v in host_target(num_cores=2).export().items()
                if k in ("kind", "mcpu", "num-cores", "mattr")}
    assert {k: list(v) if k == "mattr" else v for k, v in exported.items()} == expected


@pytest.mark.parametrize("cpu", NAMED)
def test_runs_here_compares_the_target_isa_with_cpuinfo(cpu):
    """Recomputed from /proc/cpuinfo: code for a CPU runs here iff every extension LLVM may
    use for it is a flag of this CPU; an artifact's recorded target says the same, also one
    that records only its llvm_target (no features list)."""
    target = CpuTarget.parse(f"cpu -mcpu={cpu}")
    flags = cpu_flags()
    lacking = sorted(f for f in target.isa_features if CPUINFO_FLAGS[f] not in flags) if flags else []
    assert runs_here(target) == (not lacking)
    assert missing_features(target.info()) == lacking
    assert missing_features({"llvm_target": {"kind": "llvm", "mcpu": cpu, "num-cores": "2"}}) == lacking
    assert missing_features({}) == []


# ---- what the target decides ------------------------------------------------------------------
def _low_bit_linear(bits: int = 8, group: int = 0, bias: bool = True) -> Graph:
    g = Graph("low_bit_linear")
    x = g.add_input("x", TensorType(("rows", 64), "float32"))
    w, _ = reference.quantized_param(g, "w", reference.rng(3).standard_normal((48, 64)).astype(np.float32), bits,
                                     group)
    extra = [g.add_param("b", np.ones(48, np.float32))] if bias else []
    g.outputs = [g.add("linear", x, w, *extra)]
    return g


def test_default_lowering_is_the_host_target_and_tiles_follow_the_target():
    """lower() without a target lowers for the host (the same module as naming it); a float
    matmul's untuned register tile follows the target's registers, and the kernel cache
    keeps the two apart."""
    g = reference.int8_activation_block_graph("token", 64, 32, 8, seed=5)[0]
    default, named = lower(g), lower(g, target=HOST)
    assert default.target == HOST
    tvm.ir.assert_structural_equal(default.mod, named.mod)
    avx2, avx512 = (dense_matmul(128, 128, 32, Epilogue(), budget=b) for b in (256, 1024))
    assert avx2 is not avx512 and avx2.script() != avx512.script()  # 2 x 32 vs 4 x 32 lanes
    assert dense_matmul(128, 128, 32, Epilogue(), budget=256) is avx2


def _assembly(exe) -> str:
    return exe.exe.mod.imports[0].inspect_source("asm")


@pytest.mark.parametrize("path", PATHS)
def test_each_path_compiles_to_its_instructions(path):
    """Cross-compiled here whatever this host is: the integer path's kernels are VNNI dot
    products (vpdpbusd), the AVX-512 paths use zmm registers, the AVX2 path never does."""
    cpu = TARGETS[path]
    program = lower(_low_bit_linear(), target=cpu)
    kernels = {gv.name_hint for gv in program.mod.functions}
    assert any(k.startswith("int8_dense") for k in kernels) == cpu.integer_matmuls
    asm = _assembly(build(program))
    assert ("vpdpbusd" in asm) == cpu.integer_matmuls
    assert ("zmm" in asm) == (path != "avx2") and "ymm" in asm


def test_integer_kernels_are_not_built_for_a_target_without_vnni():
    program = lower(_low_bit_linear(), target=CpuTarget.parse("cpu -mcpu=icelake-server"))
    with pytest.raises(ValueError, match="avx512vnni"):
        build(program, CpuTarget.parse("cpu -mcpu=haswell"))


# ---- a quantized model per target, end to end ------------------------------------------------------
@pytest.fixture(scope="module")
def mixtral() -> Graph:
    return lower_source(source_for(EXAMPLES / "mixtral_tiny.moe", None, None, 0))


def _quantized(graph: Graph, pipeline: str) -> Graph:
    return PassManager(pipeline).run(graph, PassContext())[0]


def _run_artifact(out_dir, entry: dict, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The artifact's files run as the program entry says (library, weights, weight_order)."""
    vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(out_dir / entry["library"])), tvm.cpu())
    with safe_open(str(out_dir / entry["weights"]), "np") as f:
        weights = [tvm.runtime.tensor(f.get_tensor(n)) for n in entry["weight_order"]]
    return vm[entry["function"]](*[tvm.runtime.tensor(a) for a in inputs.values()], *weights).numpy()


def _relative_error(graph: Graph, out_dir, entry: dict) -> float:
    vocab = int(graph.nodes_of("embedding")[0].inputs[1].type.shape[0])
    inputs = {graph.inputs[0].name: np.random.default_rng(0).integers(0, vocab, (2, 8)).astype(np.int64)}
    want = run(graph, inputs)[graph.outputs[0].name]
    got = _run_artifact(out_dir, entry, inputs)
    return float(np.abs(got - want).max() / np.abs(want).max())


# The integer (VNNI) and AVX2 float paths with W4A8 (int4 weights, int8 activations: the most
# kernels) in the default suite; plain int8 weights, and the AVX-512 float path (the AVX2 one's
# kernels with wider tiles), under -m slow.
PER_TARGET = [pytest.param(path, pipeline,
                           marks=[pytest.mark.slow] if pipeline == PIPELINES[0] or path == "avx512" else [])
              for path in PATHS for pipeline in PIPELINES]


@pytest.mark.parametrize("path,pipeline", PER_TARGET)
def test_quantized_model_per_target(path, pipeline, mixtral, tmp_path):
    """mixtral_tiny quantized, emitted for each path's target: the program entry's
    target_info says what it is built for, its weight layouts show the path taken (VNNI
    panels only for the integer path), and where it runs here it matches the interpreter."""
    cpu = TARGETS[path]
    graph = _quantized(mixtral, pipeline)
    entry = emit(graph, tmp_path, target=cpu)
    info = entry["target_info"]
    assert (info["spec"], info["mcpu"], info["features"]) == (cpu.text(), cpu.mcpu, cpu.isa_features)
    assert info["low_bit_matmuls"] == ("integer (avx512vnni)" if path == "vnni" else "float")
    assert info["vector_register_bytes"] == (512 if path == "avx2" else 2048)
    assert info["llvm_target"]["mcpu"] == cpu.mcpu
    assert missing_features(info) == missing_features(cpu.info())
    layouts = {w["kind"] for w in entry["weight_layouts"]}
    assert ("vnni_panels" in layouts) == (path == "vnni")
    skip_unless_runs_here(cpu)
    rounding = path == "vnni" and ",a=int8" in pipeline
    assert _relative_error(graph, tmp_path, entry) <= (ROUNDING_TOLERANCE if rounding else TOLERANCE)


# ---- a perturbed kernel fails the tests ----------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_a_kernel_off_by_one_percent_fails_its_kernel_test(path):
    """The knob (cpu_targets.perturbed_kernel_output) scales the biased linear kernel's output
    by 1.01: test_quantize_kernels's kernel test, which passes for this path, then fails."""
    skip_unless_runs_here(TARGETS[path])
    reference.test_low_bit_linear_and_mlp_kernels(8, 0, path)
    with perturbed_kernel_output(1.01) as hits:
        with pytest.raises(AssertionError):
            reference.test_low_bit_linear_and_mlp_kernels(8, 0, path)
    assert hits and all(epi.bias for epi in hits)


@pytest.mark.slow  # the kernel-level knob above and test_backend_interface's 1%-off backend run by default
def test_a_kernel_off_by_one_percent_fails_the_model_check(mixtral, tmp_path):
    """The same knob on the model's plain matmuls (projections, LM head): the end-to-end
    comparison with the interpreter, which passes unperturbed (test above), fails."""
    path = next((p for p in PATHS if runs_here(TARGETS[p])), None)
    if path is None:
        pytest.skip("this host runs none of the kernel paths")
    graph = _quantized(mixtral, "quantize(w=int8)")
    with perturbed_kernel_output(1.01, when=lambda epi: epi.tag() == "plain") as hits:
        entry = emit(graph, tmp_path, target=TARGETS[path])
    assert hits
    assert _relative_error(graph, tmp_path, entry) > TOLERANCE


def test_a_kernel_off_by_one_percent_fails_the_rounding_aware_verification(mixtral, tmp_path):
    """With int8 activations the verification may round boundary values the artifact's way
    (mocompile.verification.resolve_roundings); no choice of such flips explains a projection
    kernel 1% off, so the fixed tolerance still fails it, while the unperturbed artifact passes."""
    from types import SimpleNamespace

    from mocompile.errors import VerificationError
    from mocompile.signature import signature_of
    from mocompile.verification import interpreter_reference, verify_artifact

    path = next((p for p in PATHS if runs_here(TARGETS[p])), None)
    if path is None:
        pytest.skip("this host runs none of the kernel paths")
    graph = _quantized(mixtral, "quantize(w=int8,a=int8,dynamic=token)")
    reference = interpreter_reference(graph)
    assert reference.graph is not None
    vocab = int(graph.nodes_of("embedding")[0].inputs[1].type.shape[0])
    signature = signature_of(graph, {graph.inputs[0].name: vocab})

    def artifact(out_dir, entry):
        run_it = lambda inputs: {graph.outputs[0].name: _run_artifact(out_dir, entry, inputs)}  # noqa: E731
        return SimpleNamespace(signature=signature, run=run_it)

    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good = emit(graph, tmp_path / "good", target=TARGETS[path])
    assert verify_artifact(artifact(tmp_path / "good", good), reference, [(2, 8)], 0)["max_rel_error"] <= 1e-4
    with perturbed_kernel_output(1.01, when=lambda epi: epi.tag() == "plain") as hits:
        bad = emit(graph, tmp_path / "bad", target=TARGETS[path])
    assert hits
    with pytest.raises(VerificationError, match="relative error"):
        verify_artifact(artifact(tmp_path / "bad", bad), reference, [(2, 8)], 0)
