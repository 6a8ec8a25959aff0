"""Measurements of the Relax VM itself for bench_models.py: what one kernel launch costs on
this machine, and where a step's time goes kernel by kernel. They explain an artifact's time
rather than compare it, so they sit apart from the side-by-side rows.
"""

from __future__ import annotations

import numpy as np

from harness import PAST, artifact_step, median_ms
from mocompile import vm_trace
from mocompile.runtime import random_inputs


def kernel_launch_us(calls: int = 64) -> float:
    """Cost of one kernel launch through the Relax VM, measured on this machine: a function of
    `calls` chained 16-float kernels against one with a single call."""
    import tvm
    from tvm import relax

    from mocompile.backends.tvm_cpu import tir_util as U
    from mocompile.backends.tvm_cpu.build import relax_pipeline
    from mocompile.backends.tvm_cpu.target import host_target

    with U.kernel("bump16", serial=True) as kern:
        x, y = U.arg("x", (16,)), U.arg("y", (16,))
        with U.vectorized(0, 16) as i:
            U.store(y, (i,), x[i] + U.f32(1))
    bb = relax.BlockBuilder()
    gv = bb.add_func(kern.func, "bump16")
    for name, n in (("one", 1), ("many", calls)):
        x = relax.Var("x", relax.TensorType([16], "float32"))
        with bb.function(name, [x]):
            with bb.dataflow():
                v = x
                for _ in range(n):
                    v = bb.emit(relax.call_tir(gv, [v], relax.TensorType([16], "float32")))
                out = bb.emit_output(v)
            bb.emit_func_output(out)
    target = host_target()
    with target:
        exe = relax.build(bb.get(), target, relax_pipeline=relax_pipeline())
    vm = relax.VirtualMachine(exe, tvm.cpu())
    arg = tvm.runtime.tensor(np.zeros(16, np.float32))
    one = median_ms(lambda: vm["one"](arg), max_calls=2000)
    many = median_ms(lambda: vm["many"](arg), max_calls=2000)
    return 1e3 * (many - one) / (calls - 1)


def kernel_profile(art, steps: int = 200) -> list[tuple[str, float, int]]:
    """Per-call time of a batch-1 decode step (or one-position forward without a step
    function) through the Relax VM's instrumentation hook (mocompile.vm_trace, the hook's own
    cost subtracted): [(kernel or VM builtin, us per step, calls per step)] sorted by time.
    `art` must be a freshly loaded artifact (its VM stays instrumented)."""
    if art.can_decode:
        segments = len(art.signature.inputs)
        prompt = random_inputs(art.signature, 1, PAST // segments, seed=2)
        token = {art.token_input.name: random_inputs(art.signature, 1, 1, seed=3)[art.token_input.name]}
        call = artifact_step(art, prompt, token)
    else:
        inputs = random_inputs(art.signature, 1, 1, seed=2)
        call = lambda: art.run(inputs)  # noqa: E731
    return [(k.name, k.us, k.calls) for k in vm_trace.kernel_profile(art, call, repeat=steps)]


def profile_lines(model: str, case: str, artifact_ms: float, prof: list[tuple[str, float, int]]) -> list[str]:
    """The profile of one step as a paragraph and a table, every figure from `prof`."""
    builtin = [p for p in prof if p[0].startswith("vm.builtin")]
    kernels = [p for p in prof if not p[0].startswith("vm.builtin")]
    total = sum(p[1] for p in prof)
    return ["", f"Profile of the VM's `step` for {model} {case} through the Relax VM's instrumentation hook (prompts take "
            "this path; the timed single-token step runs through the decode driver instead). The hook runs Python "
            f"around every call: the instrumented step took {total:.0f} us, {total / (1e3 * artifact_ms):.1f}x the "
            "artifact column's time, so read the shares and the call counts. Per step: "
            f"{sum(p[2] for p in kernels)} calls of {len(kernels)} kernels ({sum(p[1] for p in kernels):.0f} us here) "
            f"and {sum(p[2] for p in builtin)} VM builtin calls ({sum(p[1] for p in builtin):.0f} us here):", "",
            "| kernel or builtin | us per step | calls per step |", "|---|---|---|",
            *[f"| {name} | {us:.1f} | {calls} |" for name, us, calls in prof[:14]]]
