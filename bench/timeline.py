"""The failover timeline of one migration as SVG: the operation's steps as bands, the guest's
ping probes as marks (lost ones red), one row per guest variant, on one time axis.

`make bench` draws docs/failover-timeline.svg from its own runs (bench/lab_bench.py)."""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import escape

STEP_COLOURS = {"plan": "#d0d7de", "reserve": "#c6dbef", "unplug": "#fdd0a2",
                "migrate": "#9ecae1", "replug": "#fdae6b", "verify": "#c7e9c0"}  # fmt: skip
ROW_H, BAND_H, LEFT, WIDTH = 90, 26, 150, 900


def timeline_svg(rows: list[dict[str, Any]], title: str) -> str:
    """`rows`: {"label", "steps": [{"step", "duration_s"}], "probes": [{"t", "ok"}]}, probe
    times in seconds from the operation's start."""
    end = max(
        max(sum(s.get("duration_s", 0.0) for s in r["steps"]),
            max((p["t"] for p in r["probes"]), default=0.0))
        for r in rows
    ) or 1.0  # fmt: skip
    scale = (WIDTH - LEFT - 20) / end
    height = 50 + ROW_H * len(rows) + 30
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for i, r in enumerate(rows):
        y = 40 + i * ROW_H
        lost = sum(1 for p in r["probes"] if not p["ok"])
        out.append(f'<text x="10" y="{y + 18}">{escape(r["label"])}</text>')
        out.append(f'<text x="10" y="{y + 36}" fill="#555">{lost} of {len(r["probes"])} '
                   "probes lost</text>")  # fmt: skip
        t = 0.0
        for s in r["steps"]:
            d = s.get("duration_s", 0.0)
            x = LEFT + t * scale
            colour = STEP_COLOURS.get(s["step"], "#eeeeee")
            out.append(f'<rect class="step" x="{x:.1f}" y="{y}" width="{max(d * scale, 1):.1f}" '
                       f'height="{BAND_H}" fill="{colour}" stroke="#888"/>')  # fmt: skip
            if d * scale > 40:
                out.append(f'<text x="{x + 4:.1f}" y="{y + 17}">{escape(s["step"])}</text>')
            t += d
        for p in r["probes"]:
            x = LEFT + p["t"] * scale
            colour, cls = ("#2ca02c", "probe ok") if p["ok"] else ("#d62728", "probe lost")
            out.append(f'<line class="{cls}" x1="{x:.1f}" y1="{y + BAND_H + 6}" x2="{x:.1f}" '
                       f'y2="{y + BAND_H + 22}" stroke="{colour}" stroke-width="1.5"/>')  # fmt: skip
    axis_y = 40 + ROW_H * len(rows)
    out.append(f'<line x1="{LEFT}" y1="{axis_y}" x2="{WIDTH - 20}" y2="{axis_y}" stroke="#000"/>')
    step = 1.0 if end <= 15 else 5.0
    k = 0.0
    while k <= end:
        x = LEFT + k * scale
        out.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 5}" '
                   'stroke="#000"/>')  # fmt: skip
        out.append(f'<text x="{x - 4:.1f}" y="{axis_y + 18}">{k:g}s</text>')
        k += step
    out.append("</svg>")
    return "\n".join(out) + "\n"
