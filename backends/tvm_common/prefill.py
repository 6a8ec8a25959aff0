"""The `prefill` Relax function: a prompt step that returns the outputs at the last position
only (the graph's last-position form, mocompile/prefill.py), beside `main` and `step` in the
same module.

It takes exactly what `step` takes (inputs, past, the same cache tensors in the same order,
the same weights) and fills the cache the same way: the nodes before the cut are the step's,
lowered the same way, so the same kernels write the same cache rows. After the cut the final
norm, the LM head (and whatever else moved) run on one row per sample, so a prompt of P
positions no longer pays P rows of the vocabulary-wide matmul.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mocompile.backends.tvm_common.lower import LowerContext, emit_beside_main
from mocompile.prefill import last_position_graph

if TYPE_CHECKING:
    from mocompile.backends.tvm_common.lower import LoweredModule

PREFILL_FUNCTION = "prefill"


def emit_prefill(main: LowerContext, step: LowerContext) -> tuple[LowerContext, list[str]] | str:
    """Lower the last-position form of main's graph into PREFILL_FUNCTION of main's module:
    (its context, the names of the outputs cut to the last position), or why there is none."""
    cut = last_position_graph(main.graph)
    if isinstance(cut, str):
        return cut
    ctx = LowerContext(cut.graph, main=main)
    emit_beside_main(ctx, PREFILL_FUNCTION)
    if [s.to_json() for s in ctx.cache] != [s.to_json() for s in step.cache]:
        raise RuntimeError(f"the prefill function's cache slots {[s.name for s in ctx.cache]} are not the step's "
                           f"{[s.name for s in step.cache]}: one cache could not serve both")
    return ctx, cut.cut


def prefill_fields(lowered: "LoweredModule") -> dict[str, Any]:
    """The LoweredProgram fields saying whether the module has a prefill function."""
    return {"prefill": lowered.prefill_outputs, "no_prefill_reason": lowered.no_prefill_reason}


def manifest_entry(prefill: list[str] | None, no_prefill_reason: str | None) -> dict[str, Any]:
    """The manifest program's `prefill` entry (its function and `prefill`, the outputs it keeps
    at the last position), or its `no_prefill_reason`."""
    if prefill is None:
        return {"no_prefill_reason": no_prefill_reason}
    return {"prefill": {"function": PREFILL_FUNCTION, "last_only": list(prefill)}}
