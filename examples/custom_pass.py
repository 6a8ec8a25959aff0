"""A pass written outside the compiler, run through the same pass manager.

Run it from Python:   python examples/custom_pass.py
or from the command line, as a plugin:
    mocompile compile examples/mixtral_tiny.moe -o build/mixtral_flops \
        --plugin examples/custom_pass.py --passes "dce,flops-report(seq=128)"
Its report lands in the artifact's manifest.json next to the built-in passes' reports.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mocompile.ir.graph import Graph
from mocompile.ir.registry import get_op
from mocompile.pass_manager import Pass, PassContext, PassManager, PassResult, register_pass


@register_pass("flops-report")
class FlopsReport(Pass):
    """Counts FLOPs and bytes per op kind for one batch/sequence size, from each op's cost facet.

    It changes nothing; a pass that rewrites the graph works the same way: mutate the graph
    it is given (a private copy) and return it. The verifier runs after it either way.
    Its options are the annotated parameters of __init__: the pipeline parser reads and
    checks them from those (`flops-report(seq=long)`: option 'seq' expects an integer).
    """

    def __init__(self, batch: int = 1, seq: int = 1) -> None:
        self.batch, self.seq = batch, seq

    def describe(self) -> str:
        return f"{self.name}(batch={self.batch},seq={self.seq})"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        env: dict[str, int] = {}
        for v in graph.inputs:
            for d in v.type.shape:
                if isinstance(d, str):
                    env[d] = self.batch if d == "batch" else self.seq
        flops: Counter[str] = Counter()
        moved: Counter[str] = Counter()
        for node in graph.nodes:
            cost_fn = get_op(node.op).cost
            if cost_fn is None:
                continue
            c = cost_fn([v.type for v in node.inputs], [v.type for v in node.outputs], node.attrs, env)
            flops[node.op] += c.flops
            moved[node.op] += c.bytes
        return PassResult(graph, {"flops": dict(flops), "bytes": dict(moved), "total_flops": sum(flops.values())})


def main() -> None:
    from mocompile.frontend import lower_source, source_from_spec

    spec = Path(__file__).parent / "mixtral_tiny.moe"
    graph = lower_source(source_from_spec(spec, variant=None, weights=None, seed=0))
    graph, reports = PassManager("dce,fold-constants,flops-report(seq=128)").run(graph)
    for report in reports:
        print(report["pass"], {k: v for k, v in report.items() if k not in ("pass", "seconds")})


if __name__ == "__main__":
    main()
