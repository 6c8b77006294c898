"""The HTML report: one self-contained file drawn from a report document.

Inline CSS and inline SVG only: no script, stylesheet, font or image is fetched, so the file
opens the same offline, attached to a ticket or in a CI artifact. The document itself is
embedded as ``<script type="application/json" id="layerscope-data">`` (data, never run).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from itertools import groupby
from typing import Any

from layerscope.render import svg
from layerscope.render.console import (
    communication_text,
    component_rows,
    header_text,
    plan_label,
    rule_text,
    verdict_text,
)
from layerscope.units import format_bytes, format_count, format_duration

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; color: #212529;
       margin: 0 auto; max-width: 920px; padding: 24px 28px 40px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px;
     border-bottom: 1px solid #dee2e6; padding-bottom: 4px; }
.meta { color: #495057; white-space: pre-line; margin: 0 0 12px; }
.verdict { padding: 10px 14px; border-radius: 6px; font-weight: 600; margin: 8px 0 4px; }
.fits { background: #d3f9d8; border-left: 6px solid #2f9e44; }
.nofit { background: #ffe3e3; border-left: 6px solid #c92a2a; }
.unknown { background: #f1f3f5; border-left: 6px solid #868e96; }
.note { color: #6c757d; font-size: 12.5px; margin: 4px 0; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 12px 3px 0; text-align: right; border-bottom: 1px solid #f1f3f5; }
th:first-child, td:first-child { text-align: left; }
th { border-bottom: 1px solid #adb5bd; font-weight: 600; }
.status { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
          margin-right: 6px; vertical-align: baseline; }
.yes { color: #2b8a3e; font-weight: 600; } .no { color: #c92a2a; }
footer { margin-top: 32px; color: #868e96; font-size: 12px; }
svg { display: block; margin: 6px 0; max-width: 100%; height: auto; }
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], raw: bool = False,
           align: str = "") -> str:
    """An HTML table; cells are escaped unless ``raw`` (then they are trusted markup).
    ``align`` has one letter per column, ``l`` or ``r`` (default: the first left, others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    style = ['' if a == "r" else ' style="text-align:left"' for a in align]
    cell = (lambda v: v) if raw else escape
    head = "".join(f"<th{s}>{escape(h)}</th>" for h, s in zip(headers, style))
    body = "".join("<tr>" + "".join(f"<td{s}>{cell(v)}</td>" for v, s in zip(r, style))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _gib(n: int) -> str:
    return format_bytes(n, 2)


def peak_segments(e: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The peak split into parts that add up to it exactly, then the margin up to the memory
    needed. Weights and optimizer states are alive throughout; what else is alive depends on
    the phase the peak falls in, and is named by that phase."""
    peak, w, o = e["peak_bytes"], e["weights_bytes"], e["optimizer_state_bytes"]
    quantized = e.get("quantized_base_bytes", 0)
    segs = [("quantized base", quantized), ("other weights", w - quantized)] if quantized else [
        ("weights", w)]
    segs.append(("optimizer states", o))
    rest = peak - w - o
    if e["peak_phase"] == "optimizer" and rest >= e["gradient_bytes"] + e["optimizer_temporary_bytes"]:
        segs += [("gradients", e["gradient_bytes"]),
                 ("optimizer temporaries", e["optimizer_temporary_bytes"])]
        rest -= e["gradient_bytes"] + e["optimizer_temporary_bytes"]
        segs.append(("other", rest))
    elif e["peak_phase"] == "forward":
        segs.append(("activations + logits (forward peak)", rest))
    else:
        segs.append(("activations + gradients + logits (peak)", rest))
    segs.append(("allocator cache (reserved, not in use)", e["reserved_bytes"] - peak))
    segs.append(("CUDA context", e["required_bytes"] - e["reserved_bytes"]))
    return [(n, v) for n, v in segs if v > 0]


def _structure_section(doc: Mapping[str, Any]) -> str:
    parts = doc["structure"]
    strip = svg.block_strip([(p["name"], p["params"], p["status"]) for p in parts])
    rows = []
    for (kind, status, params), group in groupby(parts, key=lambda p: (p["kind"], p["status"],
                                                                        p["params"])):
        run = list(group)
        name = run[0]["name"] if len(run) == 1 else f"{run[0]['name']} … {run[-1]['name']}"
        count = (format_count(params) if len(run) == 1
                 else f"{len(run)} × {format_count(params)} = {format_count(params * len(run))}")
        if run[0]["tied"]:
            count = "tied to the embeddings"
        dot = f'<span class="status" style="background:{svg.STATUS_COLORS[status]}"></span>'
        rows.append((escape(name), escape(kind), count, dot + escape(svg.STATUS_LABELS[status])))
    return ("<h2>Model structure</h2>"
            f"<p class=\"note\">Each part's width is its share of the "
            f"{format_count(doc['model']['total_params'])} parameters; colour: its status under "
            f"the plan.</p>{strip}"
            + _table(("part", "kind", "parameters", "status"), rows, raw=True, align="llrl"))


def _bar_limits(doc: Mapping[str, Any]) -> list[tuple[str, int]]:
    """GPU lines for the bars: those not far beyond the bars (so the bars stay readable), the
    first one above the longest bar, and the GPU asked about."""
    longest = max(doc["estimate"]["required_bytes"], doc["full_finetune"]["required_bytes"])
    lines = sorted(doc["capacity_lines"], key=lambda c: c["memory_bytes"])
    above = [c for c in lines if c["memory_bytes"] > longest]
    asked = doc["gpu"]["name"] if doc["gpu"] else None
    keep = [c for c in lines if c["memory_bytes"] <= 1.3 * longest or c["gpu"] == asked
            or (above and c is above[0])]
    return [(c["gpu"], c["memory_bytes"]) for c in keep]


def _memory_section(doc: Mapping[str, Any]) -> str:
    e, f = doc["estimate"], doc["full_finetune"]
    bars = svg.stacked_bars([(f"plan: {plan_label(doc)}", peak_segments(e)),
                             ("full fine-tuning", peak_segments(f))], _bar_limits(doc))
    rows = [(label, _gib(a), _gib(b)) for label, a, b in component_rows(e, f)]
    rows += [("peak", _gib(e["peak_bytes"]), _gib(f["peak_bytes"])),
             ("peak during", e["peak_phase"], f["peak_phase"]),
             ("GPU memory needed", _gib(e["required_bytes"]), _gib(f["required_bytes"])),
             ("trainable parameters", format_count(e["trainable_params"]),
              format_count(f["trainable_params"]))]
    return ("<h2>Memory: the plan next to full fine-tuning</h2>"
            "<p class=\"note\">Each bar is the step's peak, split into what is alive at that "
            "moment, plus the margin the fit rule adds; dashed lines: GPU memory.</p>"
            + bars + _table(("", plan_label(doc), "full fine-tuning"), rows)
            + "<p class=\"note\">The table's components are each at their own highest; they "
              "overlap in time, so they do not add up to the peak.</p>")


def _batch_section(doc: Mapping[str, Any]) -> str:
    sweep = doc["batch_sweep"]
    limits = [(c["gpu"], c["memory_bytes"]) for c in doc["capacity_lines"]]
    series = [(f"plan: {plan_label(doc)}", sweep["plan_required_bytes"]),
              ("full fine-tuning", sweep["full_finetune_required_bytes"])]
    # Keep the GPU lines readable: the y axis stops at twice the largest GPU's memory.
    cap = 2 * max(v for _, v in limits)
    chart = svg.line_chart(sweep["batch_sizes"], series, limits,
                           x_label=f"batch size (sequences of {doc['settings']['seq_len']} tokens)",
                           y_label="GPU memory needed", y_max=cap)
    rows = [(str(b), *(_gib(ys[i]) for _, ys in series))
            for i, b in enumerate(sweep["batch_sizes"])]
    clipped = any(v > cap for _, ys in series for v in ys)
    return ("<h2>Memory against batch size</h2>"
            "<p class=\"note\">GPU memory needed (peak with the fit rule's margin) at each "
            "batch size; a point below a dashed line fits on that GPU"
            + ("; lines that leave the top of the chart go on in the table" if clipped else "")
            + ".</p>" + chart
            + _table(("batch size", plan_label(doc), "full fine-tuning"), rows))


def _time_section(doc: Mapping[str, Any]) -> str:
    t = doc["training"]
    runs = [(plan_label(doc), t["plan"]), ("full fine-tuning", t["full_finetune"])]
    some = next((r for _, r in runs if r is not None), None)
    if some is None:
        return "<h2>Time and cost</h2><p>Nothing trains under this plan.</p>"

    def col(r: Mapping[str, Any] | None, key: str) -> str:
        if r is None:
            return "nothing trains"
        if key == "step":
            return f"{r['step']['seconds'] * 1000:,.0f} ms"
        if key == "range":
            st = r["step"]
            return (f"{st['low_seconds'] * 1000:,.0f} – {st['high_seconds'] * 1000:,.0f} ms "
                    f"({escape(st['regime'])})")
        if key == "tps":
            return f"{r['tokens_per_second']:,.0f}"
        if key == "time":
            return format_duration(r["total_seconds"])
        if key == "comm":
            return escape(communication_text(r["step"].get("communication")) or "none (one GPU)")
        if key == "hours":
            return f"{r['gpu_hours']:,.2f}"
        return "unknown (no price)" if r["cost"] is None else f"${r['cost']:,.2f}"

    labels = (("step time", "step"), ("likely range", "range"), ("communication", "comm"),
              ("tokens/s", "tps"), ("wall time", "time"), ("GPU-hours", "hours"),
              ("cost", "cost"))
    rows = [(label, *(col(r, key) for _, r in runs)) for label, key in labels]
    price = some["price_per_hour"]
    return ("<h2>Time and cost</h2>"
            f"<p class=\"note\">{some['samples']:,} samples × {some['epochs']} epoch(s) on "
            f"{some['num_gpus']} × {escape(some['gpu'])} at batch "
            f"{doc['settings']['batch_size']} per GPU: {some['total_steps']:,} steps; "
            + (f"${price:.2f} per GPU-hour" if price is not None else "no price known")
            + ". Step times are roofline estimates; the likely range is where "
            + f"{some['step']['band_coverage']:.0%} of measured steps of the same regime "
              "(compute-, memory- or host-bound) fell around the estimate; communication "
              "between GPUs: NCCL's cost model for each collective, scheduled against the "
              "compute as the strategy overlaps it ('exposed': what compute waited for).</p>"
            + _table(("", *(n for n, _ in runs)), rows))


def _suggestions_section(doc: Mapping[str, Any]) -> str:
    if not doc["suggestions"]:
        return ""
    rows = []
    for a in doc["suggestions"]:
        ratio = a["time_per_token_ratio"]
        fits = '<span class="yes">yes</span>' if a["fits"] else '<span class="no">no</span>'
        rows.append((escape(a["change"]), _gib(a["peak_bytes"]), _gib(a["required_bytes"]), fits,
                     "" if ratio is None else f"{ratio:.2f}×"))
    return ("<h2>What would make it fit</h2>"
            "<p class=\"note\">Each alternative estimated; those that fit first, then by how "
            "little they change the training. change: the command-line flags to add or "
            "replace; time/token: the step time per token, against the run as asked.</p>"
            + _table(("change", "peak", "needed", "fits", "time/token"), rows, raw=True,
                     align="lrrlr"))


def report_html(doc: Mapping[str, Any]) -> str:
    """The whole report page for a ``report`` document."""
    v = doc["verdict"]
    kind = "unknown" if v is None else "fits" if v["fits"] else "nofit"
    verdict = escape(verdict_text(doc))
    rule = f"<p class=\"note\">{escape(rule_text(doc))}</p>" if v is not None else ""
    data = json.dumps(doc, indent=1).replace("</", "<\\/")
    model = escape(doc["model"]["name"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>layerscope: {model}</title>
<style>{CSS}</style></head>
<body>
<h1>{model}: will it fit?</h1>
<p class="meta">{escape(header_text(doc))}</p>
<div class="verdict {kind}">{verdict}</div>
{rule}
{_suggestions_section(doc)}
{_structure_section(doc)}
{_memory_section(doc)}
{_batch_section(doc)}
{_time_section(doc)}
<footer>layerscope {escape(doc["layerscope_version"])}, report schema {doc["schema_version"]}.
Estimates, not measurements: the step is traced on fake tensors, not run on a GPU.
The numbers behind this page are embedded in it as JSON (id "layerscope-data").</footer>
<script type="application/json" id="layerscope-data">{data}</script>
</body></html>
"""
