"""Inline SVG charts for the HTML report: no scripts, no fonts fetched, no network.

Each function takes plain numbers (bytes, counts) and returns an ``<svg>`` string. Text widths
are estimated (no font metrics without a browser), so labels that could collide are spread.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from html import escape

from layerscope.units import GIB

FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;font-size:12px"
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")
LIMIT_COLOR = "#c92a2a"
FROZEN_COLOR, TRAINABLE_COLOR, PARTIAL_COLOR, LORA_COLOR = "#9aa5b1", "#2f9e44", "#f59f00", "#7048e8"
STATUS_COLORS = {"trainable": TRAINABLE_COLOR, "frozen": FROZEN_COLOR, "partial": PARTIAL_COLOR,
                 "lora": LORA_COLOR}
STATUS_LABELS = {"trainable": "trainable", "frozen": "frozen", "partial": "partly frozen",
                 "lora": "frozen + LoRA adapters"}
CHAR_W = 6.6
"""Estimated width of one character of the 12 px font, in pixels."""


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {extra}>'
            f"{escape(text)}</text>")


def _open(width: int, height: float, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" '
            f'viewBox="0 0 {width} {height:.0f}" style="{FONT}" role="img" '
            f'aria-label="{escape(label)}">')


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _spread(positions: Sequence[float], gap: float) -> list[float]:
    """Positions moved apart (in order, keeping the first) so neighbours are ``gap`` apart."""
    order = sorted(range(len(positions)), key=lambda i: positions[i])
    out = list(positions)
    last = None
    for i in order:
        if last is not None and out[i] < last + gap:
            out[i] = last + gap
        last = out[i]
    return out


def _legend(names: Sequence[str], colors: dict[str, str], x0: float, y: float,
            width: float) -> tuple[list[str], float]:
    """Legend items left to right, wrapping at ``width``; returns the elements and the y
    of the last row."""
    out, x = [], x0
    for name in names:
        w = 24 + CHAR_W * len(name)
        if x + w > width and x > x0:
            x, y = x0, y + 18
        out.append(f'<rect x="{x:.0f}" y="{y - 10:.0f}" width="12" height="12" fill="{colors[name]}"/>')
        out.append(_text(x + 16, y, name))
        x += w
    return out, y


def stacked_bars(
    bars: Sequence[tuple[str, Sequence[tuple[str, int]]]],
    limits: Sequence[tuple[str, int]] = (),
    width: int = 860,
) -> str:
    """Horizontal stacked bars (one per label) of byte segments, with vertical limit lines.

    Args:
        bars: ``(label, [(segment, bytes), ...])`` per bar; segments share colours by name.
        limits: ``(label, bytes)`` lines drawn across all bars (e.g. GPU capacities).
    """
    names = list(dict.fromkeys(name for _, segs in bars for name, _ in segs))
    color = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    top = max([sum(b for _, b in segs) for _, segs in bars] + [b for _, b in limits] + [1])
    left, right, bar_h, gap = 170, 80, 30, 16
    plot_w = width - left - right
    legend, legend_end = _legend(names, color, left, 20, width)
    y0 = legend_end + 26
    bottom = y0 + len(bars) * (bar_h + gap)
    scale = plot_w / top
    label_x = [left + v * scale for _, v in limits]
    label_w = max([CHAR_W * len(f"{n} {_gib(v)}") for n, v in limits] + [0])
    rows = _stagger(label_x, label_w + 8)
    height = bottom + 20 + 15 * (max(rows, default=0) + 1)
    out = [_open(width, height, "memory breakdown"), *legend]
    for i, (label, segs) in enumerate(bars):
        y = y0 + i * (bar_h + gap)
        short = label if len(label) <= 24 else label[:23] + "…"
        out.append(_text(left - 8, y + bar_h / 2 + 4, short, "end", 'font-weight="600"'))
        x = float(left)
        for name, value in segs:
            w = max(value * scale, 0)
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                       f'fill="{color[name]}"><title>{escape(label)}: {escape(name)}, '
                       f"{_gib(value)}</title></rect>")
            x += w
        out.append(_text(x + 4, y + bar_h / 2 + 4, _gib(sum(v for _, v in segs))))
    for (label, value), x, row in zip(limits, label_x, rows):
        out.append(f'<line x1="{x:.1f}" y1="{y0 - 6}" x2="{x:.1f}" y2="{bottom - gap + 6}" '
                   f'stroke="{LIMIT_COLOR}" stroke-width="1.5" stroke-dasharray="5 3"/>')
        out.append(_text(x, bottom + 10 + 15 * row, f"{label} {_gib(value)}", "middle",
                         f'fill="{LIMIT_COLOR}"'))
    out.append("</svg>")
    return "".join(out)


def _stagger(xs: Sequence[float], width: float) -> list[int]:
    """Row index per centred label so that labels in one row do not overlap."""
    rows: list[int] = [0] * len(xs)
    ends: list[float] = []  # right end of the last label in each row
    for i in sorted(range(len(xs)), key=lambda k: xs[k]):
        start = xs[i] - width / 2
        row = next((r for r, end in enumerate(ends) if start >= end), len(ends))
        if row == len(ends):
            ends.append(0.0)
        ends[row] = xs[i] + width / 2
        rows[i] = row
    return rows


def _nice_step(top: float, ticks: int = 5) -> float:
    """A round tick step (1, 2 or 5 times a power of ten GiB) giving about ``ticks`` ticks."""
    raw = max(top / GIB / ticks, 1e-3)
    power = 10 ** math.floor(math.log10(raw))
    return float(next(m * power for m in (1, 2, 5, 10) if m * power >= raw) * GIB)


def line_chart(
    xs: Sequence[int],
    series: Sequence[tuple[str, Sequence[int]]],
    limits: Sequence[tuple[str, int]] = (),
    x_label: str = "batch size",
    y_label: str = "",
    width: int = 860,
    height: int = 320,
    even_x: bool = True,
    y_max: int | None = None,
) -> str:
    """Bytes against ``xs`` (one line per series), with horizontal limit lines.

    Args:
        even_x: place the xs evenly (for doubling batch sizes) instead of to scale.
        y_max: clip the y axis here (lines leave the plot through its top edge).
    """
    left, right, top_pad, bottom_pad = 76, 190, 16, 46
    plot_w, plot_h = width - left - right, height - top_pad - bottom_pad
    top = max([v for _, ys in series for v in ys] + [v for _, v in limits] + [1]) * 1.05
    if y_max is not None:
        top = min(top, y_max)
    step = _nice_step(top)
    top = step * -(-top // step)

    def px(i: int) -> float:
        if even_x:
            return left + i / max(len(xs) - 1, 1) * plot_w
        span = max(xs) - min(xs) or 1
        return left + (xs[i] - min(xs)) / span * plot_w

    def py(v: float) -> float:
        return top_pad + plot_h - v / top * plot_h

    clip = f"plot-{zlib.crc32(repr((list(xs), series, x_label)).encode()):08x}"  # unique per page
    out = [_open(width, height, y_label or "chart"),
           f'<defs><clipPath id="{clip}"><rect x="{left - 5}" y="{top_pad - 5}" '
           f'width="{plot_w + 10}" height="{plot_h + 5}"/></clipPath></defs>']
    if y_label:
        out.append(f'<text transform="translate(14 {top_pad + plot_h / 2:.0f}) rotate(-90)" '
                   f'text-anchor="middle">{escape(y_label)}</text>')
    v = 0.0
    while v <= top + 1:
        out.append(f'<line x1="{left}" y1="{py(v):.1f}" x2="{left + plot_w}" y2="{py(v):.1f}" '
                   'stroke="#e9ecef"/>')
        out.append(_text(left - 6, py(v) + 4, f"{v / GIB:g} GiB", "end"))
        v += step
    out.append(f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" '
               f'y2="{top_pad + plot_h}" stroke="#333"/>')
    out.append(f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + plot_h}" stroke="#333"/>')
    for i, x in enumerate(xs):
        out.append(_text(px(i), top_pad + plot_h + 16, str(x), "middle"))
    out.append(_text(left + plot_w / 2, height - 8, x_label, "middle"))
    labels: list[tuple[float, str, str]] = []  # (y, text, colour) at the right edge
    for label, value in limits:
        if value > top:
            continue
        out.append(f'<line x1="{left}" y1="{py(value):.1f}" x2="{left + plot_w}" '
                   f'y2="{py(value):.1f}" stroke="{LIMIT_COLOR}" stroke-width="1.2" '
                   'stroke-dasharray="5 3"/>')
        labels.append((py(value), f"{label} {_gib(value)}", LIMIT_COLOR))
    for k, (name, ys) in enumerate(series):
        c = PALETTE[k % len(PALETTE)]
        points = " ".join(f"{px(i):.1f},{py(y):.1f}" for i, y in enumerate(ys))
        out.append(f'<g clip-path="url(#{clip})">'
                   f'<polyline points="{points}" fill="none" stroke="{c}" stroke-width="2.5"/>')
        for i, y in enumerate(ys):
            out.append(f'<circle cx="{px(i):.1f}" cy="{py(y):.1f}" r="3.5" fill="{c}">'
                       f"<title>{escape(name)}, {x_label} {xs[i]}: {_gib(y)}</title></circle>")
        out.append("</g>")
        labels.append((py(min(ys[-1], top)), name, c))
    spread = _spread([y for y, _, _ in labels], 14)
    for (_, text, c), label_y in zip(labels, spread):
        out.append(_text(left + plot_w + 8, label_y + 4, text, extra=f'fill="{c}"'))
    out.append("</svg>")
    return "".join(out)


def block_strip(
    cells: Sequence[tuple[str, int, str]], width: int = 860, height: int = 84
) -> str:
    """The model's parts left to right, width by parameters, coloured by status.

    Args:
        cells: ``(label, parameters, status)`` with status ``trainable``, ``frozen``,
            ``partial`` or ``lora`` (a frozen base with trainable adapters).
    """
    total = sum(max(n, 0) for _, n, _ in cells) or 1
    out = [_open(width, height, "model structure")]
    x = 0.0
    for label, n, status in cells:
        w = max(n / total * width, 1.0)
        out.append(f'<rect x="{x:.2f}" y="4" width="{w:.2f}" height="34" '
                   f'fill="{STATUS_COLORS.get(status, "#ddd")}" stroke="#fff" stroke-width="0.5">'
                   f"<title>{escape(label)}: {n:,} parameters, "
                   f"{STATUS_LABELS.get(status, status)}</title></rect>")
        short = {"embeddings": "emb"}.get(label, label.rpartition(".")[2])
        if w > CHAR_W * len(short) + 4:
            out.append(_text(x + w / 2, 25, short, "middle", 'fill="#fff"'))
        x += w
    present = [s for s in STATUS_COLORS if any(st == s for _, _, st in cells)]
    legend, _ = _legend([STATUS_LABELS[s] for s in present],
                        {STATUS_LABELS[s]: STATUS_COLORS[s] for s in present}, 0, height - 12, width)
    out += legend
    out.append("</svg>")
    return "".join(out)
