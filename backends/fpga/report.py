"""The human summary of an fpga artifact (fpga_report.txt, what `mocompile inspect` prints):
the device and its budget, each kernel's precision, resources, II and cycles, the whole
step's cycles per token, and where the weights live (the streaming plan when they do not all
fit on chip)."""

from __future__ import annotations

from typing import Any

from mocompile.backends.fpga.design import Design


def _pct(used: float, total: float) -> str:
    return f"{used:,.0f} / {total:,.0f} ({used / max(total, 1):.1%})"


def summary(design: Design, est: dict[str, Any], calibration: str) -> str:
    d = est["device"]
    t = est["totals"]
    lines = [f"fpga design of {design.graph.name} for {d['name']} ({d['part']}, {d['clock_mhz']:g} MHz)",
             f"  precision: ap_fixed<{design.bits},*> activations and weights, AP_RND / AP_SAT, formats from "
             f"calibration ({calibration})",
             f"  DSP  {_pct(t['dsp'], d['dsp'])}", f"  BRAM18 {_pct(t['bram18'], d['bram18'])}",
             f"  URAM {_pct(t['uram'], d['uram'])}", f"  LUT  {_pct(t['lut'], d['lut'])}",
             f"  (the design may use {est['utilization_limit']:.0%} of each; dense reuse target {est['reuse_target']})",
             f"  cycles per token: {est['cycles_per_token']['at_position_0']:,} at position 0, "
             f"{est['cycles_per_token']['at_full_cache']:,} with a full cache of {est['kv_cache_positions']} positions "
             f"({est['tokens_per_second_at_full_cache']:,} tokens/s at {d['clock_mhz']:g} MHz)", "",
             f"  {'kernel':<28} {'op':<12} {'output format':<16} {'DSP':>7} {'LUT':>9} {'II':>6} {'cycles':>9}"]
    for row in est["kernels"]:
        fmt = design.fmts.get(row["node"])
        ii = max((u["ii"] for u in row["dense"]), default=1)
        lines.append(f"  {row['loc'] or row['node']:<28} {row['op']:<12} {fmt.text() if fmt else 'int':<16} "
                     f"{row['dsp']:>7,} {row['lut']:>9,} {ii:>6} {row['cycles']:>9,}")
    lines += ["", "  on-chip memory:"]
    lines += [f"    {p['array']:<40} {p['memory']:<7} {p['blocks']:>5}" for p in est["placement"]]
    if est["off_chip"]:
        lines += ["", f"  does not fit on chip; streaming plan ({est['cycles_per_token']['streaming']:,} more cycles "
                      f"per token at {d['offchip_gbps']:g} GB/s):"]
        lines += [f"    {o['array']:<40} {o['kind']:<8} {o['bytes_per_token']:>12,} bytes/token "
                  f"{o['cycles_per_token']:>10,} cycles" for o in est["off_chip"]]
    else:
        lines.append("  every weight and KV cache fits on chip")
    lines += ["", "  parts: dense products = hls4ml 1.3.0 nnet::dense (resource strategy); RMSNorm, attention with its "
              "KV cache, the router (top-k as k rounds of argmax), expert dispatch and the silu/exp/sigmoid tables = "
              "mocompile_hls.h"]
    return "\n".join(lines) + "\n"
