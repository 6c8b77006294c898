"""Plain-text views of a scan: the layer-status table and the Keras-like model summary.

These functions return text; only the ``print_*`` helpers in ``layer_utils`` print it.
"""

from __future__ import annotations

import unicodedata
from itertools import groupby

from layerscope.scan import ModelScan
from layerscope.units import format_bytes, format_count

FROZEN, ACTIVE, PARTIAL, NONE = "FROZEN", "ACTIVE", "PARTIAL", "none"


def status_of(s: ModelScan, names: tuple[str, ...] | frozenset[str]) -> str:
    """FROZEN, ACTIVE or PARTIAL for a set of parameter names (``none`` when empty)."""
    flags = {s.by_name[n].requires_grad for n in names}
    if not flags:
        return NONE
    if flags == {True}:
        return ACTIVE
    return FROZEN if flags == {False} else PARTIAL


def layer_status_text(s: ModelScan, show_all: bool = False) -> str:
    """The reference's layer table: runs of blocks with the same status, then the rest."""
    rule, thin = "=" * 48, "-" * 48
    lines = [rule, "LAYER STATUS", rule]
    if s.primary is None:
        lines.append(f"Blocks: none found ({', '.join(s.candidates) or 'no submodules'})")
    else:
        stack = s.layers
        per_block = [(i, status_of(s, s.block_names(i))) for i in range(len(stack))]
        if show_all:
            runs = [[b] for b in per_block]
        else:
            runs = [list(g) for _, g in groupby(per_block, key=lambda b: b[1])]
        labels = []
        for run in runs:
            first, last = run[0][0], run[-1][0]
            label = f"Layer {first}" if first == last else f"Layer {first}-{last}"
            names = {n for i, _ in run for n in s.block_names(i)}
            labels.append((label + ":", run[0][1], format_count(s.numel(names))))
        width = max(len(label) for label, _, _ in labels) + 1
        lines += [f"{label:<{width}}{status:<8}({count} params)" for label, status, count in labels]
        for k, other in enumerate(s.stacks):
            if k != s.primary:
                names = {n for i in range(len(other)) for n in s.block_names(i, stack=k)}
                lines.append(
                    f"Stack {other.path} ({len(other)} x {other.block_type}): "
                    f"{status_of(s, frozenset(names))}"
                )
    lines.append(thin)
    head = s.names_with_role("head")
    tied = any(s.by_name[h].tensor in {s.by_name[e].tensor for e in s.embedding_names} for h in head)
    rows = [
        ("Embeddings:", status_of(s, s.names_with_role("embedding")), ""),
        ("LM Head:", status_of(s, head), " (tied to the embeddings)" if tied else ""),
    ]
    rest = s.names_with_role("other")
    if rest:
        rows.append(("Other:", status_of(s, rest), f" ({format_count(s.numel(set(rest)))} params)"))
    lines += [f"{label:<13}{status}{note}" for label, status, note in rows]
    lines.append(rule)
    return "\n".join(lines)


def _width(text: str) -> int:
    """Terminal columns of ``text`` (wide characters such as emoji take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _width(text))


def _summary_rows(s: ModelScan, max_depth: int) -> list[tuple[str, int, str]]:
    """Modules at ``max_depth``, or shallower leaves, that hold parameters."""
    rows = []
    for m in s.modules:
        if not m.name or m.depth > max_depth or (m.depth < max_depth and not m.is_leaf):
            continue
        names = [p.name for p in s.params if p.name.startswith(m.name + ".")]
        if not names:
            continue
        status = {ACTIVE: "✓", FROZEN: "✗", PARTIAL: "◐ partial"}[status_of(s, tuple(names))]
        owners = {
            o.rpartition(".")[0]
            for n in names
            for o in s.aliases(n)
            if not o.startswith(m.name + ".")
        }
        if owners:
            status += f" (tied: {', '.join(sorted(owners))})"
        rows.append((m.name, s.numel(set(names)), status))
    return rows


def model_summary_text(s: ModelScan, max_depth: int = 3) -> str:
    """The Keras-like box table of the reference, down to ``max_depth`` module levels."""
    total, trainable, frozen = s.total_params, s.trainable_params, s.frozen_params

    def pct(n: int) -> str:
        return f"{100 * n / total:.1f}%" if total else "0.0%"

    header = [
        f"Model: {s.model_type}",
        f"Total Parameters: {total:,}",
        f"Trainable: {trainable:,} ({pct(trainable)})",
        f"Frozen: {frozen:,} ({pct(frozen)})",
        f"Memory: ~{format_bytes(s.param_bytes, 1)} (parameters)",
    ]
    rows = _summary_rows(s, max_depth)
    name_w = max([len("Layer")] + [len(r[0]) for r in rows])
    status_w = max([len("Status")] + [_width(r[2]) for r in rows])
    count_w = max([len("Parameters")] + [len(f"{r[1]:,}") for r in rows])

    def row(name: str, count: str, status: str) -> str:
        return f"{_pad(name, name_w)} │ {count:>{count_w}} │ {_pad(status, status_w)}"

    table = [row(name, f"{count:,}", status) for name, count, status in rows]
    inner = max(_width(x) for x in header + table + [row("Layer", "Parameters", "Status")]) + 4

    def line(text: str) -> str:
        return "║  " + _pad(text, inner - 2) + "║"

    top, mid, bottom = "╔" + "═" * inner + "╗", "╠" + "═" * inner + "╣", "╚" + "═" * inner + "╝"
    out = [top, line("📊 MODEL SUMMARY"), mid, *map(line, header), mid]
    out += [line(row("Layer", "Parameters", "Status")), mid, *map(line, table), bottom]
    return "\n".join(out)
