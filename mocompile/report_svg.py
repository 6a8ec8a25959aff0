"""The report's plots as inline SVG: a heatmap (expert load per layer) and horizontal bars with
a second marker per bar (a kernel's measured time against its roofline floor).

SVG written by hand keeps the report one self-contained file with no plotting dependency and
no script; a `viewBox` with `width: 100%` in the page's CSS scales each plot to a phone or a
laptop screen. Every text is escaped; every number is formatted here.
"""

from __future__ import annotations

from html import escape
from typing import Sequence

import numpy as np

FONT = "font-family='system-ui, sans-serif'"


def _open(width: int, height: int, title: str) -> list[str]:
    """The start of a plot `width` x `height` user units wide, drawn at most 1.4 times its size."""
    return [f"<div class='plotbox'><svg class='plot' role='img' viewBox='0 0 {width} {height}' style='max-width:{round(1.4 * width)}px' "
            f"xmlns='http://www.w3.org/2000/svg' {FONT}>", f"<title>{escape(title)}</title>",
            f"<text x='0' y='14' font-size='13' font-weight='600'>{escape(title)}</text>"]


def _color(share: float) -> str:
    """White (0) through yellow and orange to deep red (1): a sequential scale readable in grey."""
    stops = [(255, 255, 255), (255, 237, 160), (254, 178, 76), (240, 59, 32), (128, 0, 38)]
    x = min(max(share, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(x), len(stops) - 2)
    t = x - i
    r, g, b = (round(a + (c - a) * t) for a, c in zip(stops[i], stops[i + 1]))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(values: np.ndarray, rows: Sequence[str], columns: Sequence[str], title: str,
            caption: str = "share of tokens") -> str:
    """A rows x columns heatmap of `values` (shares, 0..1 or counts), each cell labelled with
    its value as a percentage of its row's total."""
    values = np.asarray(values, dtype=np.float64)
    totals = values.sum(axis=1, keepdims=True)
    shares = np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)
    top = float(shares.max()) if shares.size else 1.0
    label_w = 8 * max((len(r) for r in rows), default=4) + 12
    cell = max(22, min(56, 640 // max(len(columns), 1)))
    width, height = label_w + cell * len(columns) + 10, 40 + 18 * 2 + cell * len(rows)
    out = _open(width, height, title)
    y0 = 40
    for j, col in enumerate(columns):
        out.append(f"<text x='{label_w + cell * j + cell / 2:.1f}' y='{y0 - 6}' font-size='11' "
                   f"text-anchor='middle'>{escape(col)}</text>")
    for i, row in enumerate(rows):
        y = y0 + cell * i
        out.append(f"<text x='{label_w - 6}' y='{y + cell / 2 + 4:.1f}' font-size='11' text-anchor='end'>"
                   f"{escape(row)}</text>")
        for j in range(len(columns)):
            share = shares[i, j]
            fill = _color(share / top if top > 0 else 0.0)
            ink = "#fff" if top > 0 and share / top > 0.6 else "#222"
            out.append(f"<rect class='cell' x='{label_w + cell * j}' y='{y}' width='{cell - 1}' height='{cell - 1}' "
                       f"fill='{fill}'><title>{escape(row)}, expert {escape(columns[j])}: {share:.1%} "
                       f"({values[i, j]:g})</title></rect>")
            if cell >= 28:
                out.append(f"<text x='{label_w + cell * j + cell / 2:.1f}' y='{y + cell / 2 + 4:.1f}' font-size='10' "
                           f"text-anchor='middle' fill='{ink}'>{100 * share:.0f}</text>")
    out.append(f"<text x='{label_w}' y='{height - 6}' font-size='11' fill='#555'>{escape(caption)} "
               f"(% of the row; darkest {top:.0%})</text>")
    out.append("</svg></div>")
    return "".join(out)


def bars(labels: Sequence[str], values: Sequence[float], floors: Sequence[float | None], title: str,
         unit: str = "us") -> str:
    """One horizontal bar per label (`values`), each with a tick at its `floor` (None: none):
    measured time against the roofline's lower bound."""
    label_w = min(7 * max((len(s) for s in labels), default=4) + 12, 340)
    plot_w, bar_h = 360, 18
    width, height = label_w + plot_w + 90, 44 + (bar_h + 6) * len(labels) + 24
    top = max([*values, *[f for f in floors if f is not None], 1e-9])
    scale = plot_w / top
    out = _open(width, height, title) + [
           f"<rect x='{label_w}' y='24' width='12' height='10' fill='#3b7dd8'/>"
           f"<text x='{label_w + 16}' y='33' font-size='11'>measured</text>"
           f"<rect x='{label_w + 90}' y='24' width='3' height='10' fill='#d62728'/>"
           f"<text x='{label_w + 98}' y='33' font-size='11'>roofline floor</text>"]
    for i, (label, value, floor) in enumerate(zip(labels, values, floors)):
        y = 44 + (bar_h + 6) * i
        short = label if len(label) * 7 < label_w - 12 else label[:(label_w - 12) // 7 - 1] + "…"
        out.append(f"<text x='{label_w - 6}' y='{y + 13}' font-size='11' text-anchor='end'>{escape(short)}"
                   f"<title>{escape(label)}</title></text>")
        out.append(f"<rect class='bar' x='{label_w}' y='{y}' width='{max(value * scale, 1):.1f}' height='{bar_h}' "
                   f"fill='#3b7dd8'><title>{escape(label)}: {value:.1f} {unit}</title></rect>")
        if floor is not None:
            out.append(f"<rect x='{label_w + floor * scale - 1:.1f}' y='{y - 2}' width='3' height='{bar_h + 4}' "
                       f"fill='#d62728'><title>floor {floor:.2f} {unit}</title></rect>")
        out.append(f"<text x='{label_w + max(value * scale, 1) + 4:.1f}' y='{y + 13}' font-size='11'>"
                   f"{value:.1f}</text>")
    out.append(f"<text x='{label_w}' y='{height - 6}' font-size='11' fill='#555'>{unit} per call of the function</text>")
    out.append("</svg></div>")
    return "".join(out)
