"""A plan as people read it: a table per device, the summary against the baselines, and a
heatmap PNG of the tokens each device serves of each expert (matplotlib, the `plot` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mocompile.errors import MocompileError
from mocompile.files import write_atomically
from mocompile.placement.devices import GIB
from mocompile.placement.plan import Plan


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b > 0 else "-"


def text(plan: Plan, title: str) -> str:
    """The human output of `mocompile place`."""
    doc = plan.to_json()
    layers = len(plan.placed.layers)
    lines = [f"{title}: {layers} layer(s) on {plan.cluster.name} ({len(plan.cluster.devices)} devices, "
             f"{len(plan.cluster.nodes)} node(s)); expert {plan.shape.hidden}x{plan.shape.inner} "
             f"{'gated ' if plan.shape.gated else ''}{plan.shape.dtype} ({plan.shape.weight_bytes / 2**20:.1f} MiB); "
             f"{plan.replicas} redundant replica(s) per layer allowed",
             f"{'device':<12} {'kind':<5} {'replicas':>8} {'memory GiB':>10} {'tokens':>10} {'time ms':>9}"]
    for dev, row in zip(plan.cluster.devices, doc["devices"]):
        lines.append(f"{dev.name:<12} {dev.kind:<5} {len(row['experts']):>8} {row['memory_bytes'] / GIB:>10.2f} "
                     f"{row['tokens']:>10.1f} {row['time_s'] * 1e3:>9.4f}")
    lines.append("")
    lines.append(f"{'placement':<12} {'step ms':>10} {'imbalance':>9} {'traffic MB':>10} {'fits':>5}  vs plan")
    for name, scheme in (("plan", plan.placed), ("round-robin", plan.round_robin), ("eplb", plan.eplb)):
        lines.append(f"{name:<12} {scheme.step_time_s * 1e3:>10.4f} {scheme.imbalance:>9.3f} "
                     f"{scheme.traffic_bytes / 1e6:>10.2f} {'yes' if scheme.fits else 'NO':>5}  "
                     f"{_ratio(scheme.step_time_s, plan.placed.step_time_s)}x")
    return "\n".join(lines)


def heatmap(plan: Plan, tokens: dict[int, np.ndarray], path: str | Path) -> Path:
    """Write a PNG of the tokens each device serves of each expert (rows: devices)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MocompileError("the heatmap needs matplotlib: pip install 'mocompile[plot]' (or pass --no-heatmap)") \
            from None
    blocks = []
    for layer, r in sorted(plan.placed.layers.items()):
        t = tokens[layer]
        block = np.zeros((len(r.placement), len(t)))
        for d, held in enumerate(r.placement):
            for e, s in held.items():
                block[d, e] = s * t[e]
        blocks.append(block)
    grid = np.concatenate(blocks, axis=1)
    names = [d.name for d in plan.cluster.devices]
    fig, ax = plt.subplots(figsize=(min(24, 3 + grid.shape[1] * 0.12), min(16, 1.5 + len(names) * 0.3)))
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(names)), labels=names, fontsize=max(4, 9 - len(names) // 16))
    ax.set_xlabel("expert (layers side by side)")
    edge = 0
    for b in blocks[:-1]:
        edge += b.shape[1]
        ax.axvline(edge - 0.5, color="white", linewidth=0.8)
    ax.set_title(f"tokens per device and expert: step {plan.placed.step_time_s * 1e3:.3f} ms modelled, "
                 f"imbalance {plan.placed.imbalance:.3f}")
    fig.colorbar(im, ax=ax, label="tokens")
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    try:
        return write_atomically(path, write, "heatmap")
    finally:
        plt.close(fig)
