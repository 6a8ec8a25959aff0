"""`mocompile place`: plan where the experts live, from load statistics and a device file.

    mocompile place --stats S.json --devices cluster.toml [--replicas R] [--json]
    mocompile place --stats S.json --preset 2node-4gpu --heatmap load.png
    mocompile place --stats ARTIFACT/ --preset 1node-8gpu    # what the place pass counted
    mocompile place --simulate --preset 8node-64gpu          # DeepSeek-V3-sized layer, Zipf load
    mocompile place --preset gpu+cpu --print-devices          # a preset as a device file

`--simulate` draws the statistics instead of reading them: `--experts` routed experts
(default 256), top `--top-k` (8) within `--topk-group` (4) of `--groups` (8) groups, as
DeepSeek-V3 routes, over `--tokens` tokens (8192) with Zipf popularity `--alpha` (1.0), for
`--layers` layers (1), so a cluster one does not have can be compared against another.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mocompile.errors import MocompileError
from mocompile.placement.devices import Cluster, load_cluster
from mocompile.placement.plan import make_plan, shape_of
from mocompile.placement.presets import PRESETS, preset, preset_toml
from mocompile.placement.stats import ExpertStats, load_stats, parse_stats, zipf_stats

DEFAULT_HEATMAP = "placement-heatmap.png"


def add_parser(sub: Any, positive: Any, count: Any) -> None:
    """Register the `place` subcommand (`positive`/`count`: the CLI's integer types)."""
    p = sub.add_parser("place", help="place experts on devices from load statistics (or a simulated load)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--stats", metavar="S.json", help="expert load statistics (format: README, 'Expert placement'), "
                                                       "or an artifact compiled with the place pass")
    src.add_argument("--simulate", action="store_true", help="a synthetic Zipf load on a DeepSeek-V3-sized layer")
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--devices", metavar="FILE.toml", help="device description file")
    dev.add_argument("--preset", choices=sorted(PRESETS), help="a named device setup")
    p.add_argument("--replicas", type=count, help="redundant experts per layer (default: chosen by the cost model)")
    p.add_argument("--step-tokens", type=positive, help="tokens per step to model (default: the statistics' own)")
    p.add_argument("--hidden", type=positive, help="expert input size (default: from the statistics, else 7168)")
    p.add_argument("--expert-hidden", type=positive, help="expert inner size (default: statistics, else 2048)")
    p.add_argument("--dtype", help="expert weight dtype: fp32, bf16, fp16, fp8, int8, int4 (default: statistics, "
                                   "else bf16)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--heatmap", metavar="PNG", default=DEFAULT_HEATMAP,
                   help=f"where the human output writes its load heatmap (default {DEFAULT_HEATMAP})")
    p.add_argument("--no-heatmap", action="store_true", help="write no heatmap")
    p.add_argument("--print-devices", action="store_true", help="print the --preset as a device file and stop")
    sim = p.add_argument_group("simulation (--simulate)")
    sim.add_argument("--experts", type=positive, default=256)
    sim.add_argument("--top-k", type=positive, default=8)
    sim.add_argument("--groups", type=positive, default=8)
    sim.add_argument("--topk-group", type=positive, default=4)
    sim.add_argument("--tokens", type=positive, default=8192)
    sim.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of expert popularity")
    sim.add_argument("--layers", type=positive, default=1)
    sim.add_argument("--seed", type=count, default=0)


def _cluster(a: argparse.Namespace) -> Cluster:
    if a.devices:
        return load_cluster(a.devices)
    if a.preset:
        return preset(a.preset)
    if a.simulate:
        return preset("8node-64gpu")
    raise MocompileError("place needs --devices FILE or --preset NAME")


def artifact_stats(path: Path) -> ExpertStats:
    """The statistics the place pass stored in an artifact's manifest."""
    from mocompile.artifact import read_manifest

    manifest = read_manifest(path, check_files=False)
    report = next((p for p in manifest.get("passes", []) if isinstance(p, dict) and "stats" in p), None)
    if report is None:
        raise MocompileError(f"{path}: this artifact was compiled without the place pass, so it holds no expert "
                             "statistics (compile with --passes \"place(preset=...)\")")
    return parse_stats(report["stats"], f"{path} (the place pass's statistics)")


def _stats(a: argparse.Namespace) -> ExpertStats:
    if a.stats and Path(a.stats).is_dir():
        return artifact_stats(Path(a.stats))
    if a.stats:
        return load_stats(a.stats)
    if not a.simulate:
        raise MocompileError("place needs --stats S.json (or --simulate)")
    if a.groups < 1 or a.experts % a.groups or not 1 <= a.topk_group <= a.groups:
        raise MocompileError(f"--simulate: {a.experts} experts must split into --groups {a.groups}, and --topk-group "
                             f"({a.topk_group}) must be in 1..{a.groups}")
    if a.top_k > a.topk_group * (a.experts // a.groups):
        raise MocompileError(f"--simulate: --top-k {a.top_k} is more than the {a.topk_group} groups a token may use hold")
    if a.alpha < 0:
        raise MocompileError(f"--alpha must be >= 0 (got {a.alpha})")
    stats = zipf_stats(a.experts, a.top_k, a.tokens, a.alpha, a.layers, a.seed, a.groups, a.topk_group)
    stats.model.update({"hidden": 7168, "expert_hidden": 2048, "gated": True, "dtype": "bf16"})
    return stats


def cmd_place(a: argparse.Namespace) -> int:
    if a.print_devices:
        if not a.preset:
            raise MocompileError("--print-devices prints a --preset")
        print(preset_toml(a.preset), end="")
        return 0
    cluster, stats = _cluster(a), _stats(a)
    shape = shape_of(stats, a.hidden, a.expert_hidden, a.dtype)
    plan = make_plan(stats, cluster, shape, a.replicas, a.step_tokens)
    if a.json:
        print(json.dumps(plan.to_json(), indent=1))
        return 0
    from mocompile.placement.report import heatmap, text

    title = "simulated" if a.simulate else str(a.stats)
    # the heatmap first: a failure to write it is the command's one line, with nothing printed before
    path = None if a.no_heatmap else heatmap(plan, {k: v.tokens for k, v in stats.layers.items()}, Path(a.heatmap))
    print(text(plan, title))
    if path is not None:
        print(f"heatmap: {path}")
    return 0
