"""The batch-flow rules of ATen ops, keyed by the op overload (or the Python callable an
exported graph calls: operator.getitem, operator.mul on sizes, higher-order ops).

The rule modules in `mocompile.aten.rules` register here; `core_ops()` enumerates the Core
ATen IR from torch itself (overloads tagged `torch.Tag.core`), and a test checks that each of
them has a rule. A rule that always answers "unknown" says so with `by_design` (its reason),
so the set of ops left unknown on purpose can be listed.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from mocompile.aten.call import Call
from mocompile.aten.state import Flow, Out

Rule = Callable[[Call], Flow]
RULES: dict[Any, Rule] = {}


def rule(*targets: Any) -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule of every target."""
    def deco(fn: Rule) -> Rule:
        for t in targets:
            RULES[t] = fn
        return fn
    return deco


def by_design(reason: str) -> Rule:
    """A rule that always answers unknown, for an op whose batch flow is not worked out."""
    def fn(call: Call) -> Flow:
        return Flow(tuple(Out(unknown=reason) for _ in call.outs))
    fn.by_design = reason  # type: ignore[attr-defined]
    return fn


def rule_for(target: Any) -> Rule | None:
    import mocompile.aten.rules  # noqa: F401  (registers every rule module)

    return RULES.get(target)


def core_ops() -> list[torch._ops.OpOverload]:
    """Every aten overload tagged core: the Core ATen IR of this torch (from the schemas
    torch registers, since torch.ops.aten lists only the ops already looked up)."""
    found = {}
    for schema in torch._C._jit_get_all_schemas():
        ns, name = schema.name.split("::", 1)
        if ns != "aten":
            continue
        try:
            op = getattr(getattr(torch.ops.aten, name), schema.overload_name or "default")
        except (AttributeError, RuntimeError):
            continue
        if torch.Tag.core in op.tags:
            found[str(op)] = op
    return [found[k] for k in sorted(found)]


def op_name(target: Any) -> str:
    """A short readable name: "sum.dim_IntList", "_softmax", "mctest::batch_center", "mul"."""
    if isinstance(target, torch._ops.OpOverload):
        ns, rest = target.name().split("::", 1)
        rest = rest.removesuffix(".default") if "." in rest else rest
        return rest if ns == "aten" else f"{ns}::{rest}"
    return getattr(target, "__name__", str(target))
