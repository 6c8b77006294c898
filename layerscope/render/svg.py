"""Inline SVG charts for the HTML report: no scripts, no fonts fetched, no network.

Each function takes plain numbers (bytes, counts) and returns an ``<svg>`` string.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from layerscope.units import GIB

FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;font-size:12px"
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")
FROZEN_COLOR, TRAINABLE_COLOR, PARTIAL_COLOR = "#9aa5b1", "#2f9e44", "#f59f00"


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {extra}>'
            f"{escape(text)}</text>")


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def stacked_bars(
    bars: Sequence[tuple[str, Sequence[tuple[str, int]]]],
    limits: Sequence[tuple[str, int]] = (),
    width: int = 760,
) -> str:
    """Horizontal stacked bars (one per label) of byte segments, with vertical limit lines.

    Args:
        bars: ``(label, [(segment, bytes), ...])`` per bar; segments share colours by name.
        limits: ``(label, bytes)`` lines drawn across all bars (e.g. GPU capacities).
    """
    names = list(dict.fromkeys(name for _, segs in bars for name, _ in segs))
    color = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    top = max([sum(b for _, b in segs) for _, segs in bars] + [b for _, b in limits] + [1])
    left, right, bar_h, gap = 150, 30, 26, 14
    plot_w = width - left - right
    legend_y = 20
    y0 = legend_y + 28
    height = y0 + len(bars) * (bar_h + gap) + 30
    scale = plot_w / (top * 1.05)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" style="{FONT}" role="img">']
    x = left
    for name in names:  # legend
        out.append(f'<rect x="{x}" y="{legend_y - 10}" width="12" height="12" fill="{color[name]}"/>')
        out.append(_text(x + 16, legend_y, name))
        x += 24 + 7 * len(name)
    for i, (label, segs) in enumerate(bars):
        y = y0 + i * (bar_h + gap)
        out.append(_text(left - 8, y + bar_h / 2 + 4, label, "end"))
        x = float(left)
        for name, value in segs:
            w = value * scale
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{max(w, 0):.1f}" height="{bar_h}" '
                       f'fill="{color[name]}"><title>{escape(name)}: {_gib(value)}</title></rect>')
            x += w
        out.append(_text(x + 4, y + bar_h / 2 + 4, _gib(sum(v for _, v in segs))))
    bottom = y0 + len(bars) * (bar_h + gap)
    for label, value in limits:
        x = left + value * scale
        out.append(f'<line x1="{x:.1f}" y1="{y0 - 6}" x2="{x:.1f}" y2="{bottom}" stroke="#c92a2a" '
                   'stroke-dasharray="4 3"/>')
        out.append(_text(x, bottom + 14, f"{label} ({_gib(value)})", "middle", 'fill="#c92a2a"'))
    out.append("</svg>")
    return "".join(out)


def line_chart(
    xs: Sequence[int],
    series: Sequence[tuple[str, Sequence[int]]],
    limits: Sequence[tuple[str, int]] = (),
    x_label: str = "batch size",
    width: int = 760,
    height: int = 300,
) -> str:
    """Bytes against ``xs`` (one line per series), with horizontal limit lines."""
    left, right, top_pad, bottom_pad = 70, 160, 20, 40
    plot_w, plot_h = width - left - right, height - top_pad - bottom_pad
    top = max([v for _, ys in series for v in ys] + [v for _, v in limits] + [1]) * 1.08
    span = max(xs) - min(xs) or 1

    def px(x: float) -> float:
        return left + (x - min(xs)) / span * plot_w

    def py(v: float) -> float:
        return top_pad + plot_h - v / top * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" style="{FONT}" role="img">',
           f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}" stroke="#333"/>',
           f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + plot_h}" stroke="#333"/>']
    for k in range(5):
        v = top / 1.08 * k / 4
        out.append(_text(left - 6, py(v) + 4, _gib(v), "end"))
    for x in xs:
        out.append(_text(px(x), top_pad + plot_h + 16, str(x), "middle"))
    out.append(_text(left + plot_w / 2, height - 6, x_label, "middle"))
    for i, (name, ys) in enumerate(series):
        c = PALETTE[i % len(PALETTE)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        out.append(f'<polyline points="{points}" fill="none" stroke="{c}" stroke-width="2"/>')
        for x, y in zip(xs, ys):
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}">'
                       f"<title>{escape(name)}, {x_label} {x}: {_gib(y)}</title></circle>")
        out.append(_text(left + plot_w + 8, py(ys[-1]) + 4, name, extra=f'fill="{c}"'))
    for label, v in limits:
        out.append(f'<line x1="{left}" y1="{py(v):.1f}" x2="{left + plot_w}" y2="{py(v):.1f}" '
                   'stroke="#c92a2a" stroke-dasharray="4 3"/>')
        out.append(_text(left + plot_w + 8, py(v) + 4, label, extra='fill="#c92a2a"'))
    out.append("</svg>")
    return "".join(out)


def block_strip(
    cells: Sequence[tuple[str, int, str]], width: int = 760, height: int = 70
) -> str:
    """The model's parts left to right, width by parameters, coloured by status.

    Args:
        cells: ``(label, parameters, status)`` with status ``ACTIVE``, ``FROZEN`` or
            ``PARTIAL``.
    """
    colors = {"ACTIVE": TRAINABLE_COLOR, "FROZEN": FROZEN_COLOR, "PARTIAL": PARTIAL_COLOR}
    total = sum(max(n, 0) for _, n, _ in cells) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" style="{FONT}" role="img">']
    x = 0.0
    for label, n, status in cells:
        w = max(n / total * width, 1.0)
        out.append(f'<rect x="{x:.2f}" y="4" width="{w:.2f}" height="34" '
                   f'fill="{colors.get(status, "#ddd")}" stroke="#fff" stroke-width="0.5">'
                   f"<title>{escape(label)}: {n:,} parameters, {status.lower()}</title></rect>")
        x += w
    legend = [("trainable", TRAINABLE_COLOR), ("frozen", FROZEN_COLOR), ("partly frozen", PARTIAL_COLOR)]
    lx = 0
    for name, c in legend:
        out.append(f'<rect x="{lx}" y="{height - 20}" width="12" height="12" fill="{c}"/>')
        out.append(_text(lx + 16, height - 10, name))
        lx += 30 + 7 * len(name)
    out.append("</svg>")
    return "".join(out)
