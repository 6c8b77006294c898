"""Terminal text for the ``estimate``, ``time`` and ``fit`` documents (see ``layerscope.preflight``).

Functions return text; only the command line prints it. Colour is a pair of ANSI codes around
the verdict, used only when :func:`use_color` says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import IO, Any

from tabulate import tabulate

from layerscope.units import format_bytes, format_count, format_duration

GREEN, RED, BOLD, RESET = "\033[32m", "\033[31m", "\033[1m", "\033[0m"

COMPONENTS = (
    ("weights", "weights_bytes"),
    ("gradients", "gradient_bytes"),
    ("optimizer states", "optimizer_state_bytes"),
    ("optimizer temporaries", "optimizer_temporary_bytes"),
    ("activations", "activation_bytes"),
    ("logits and loss", "logits_bytes"),
)
"""Memory components in the order they are shown: label, key in an estimate dict."""

SHARDED_COMPONENTS = (
    ("fp32 master weights", "master_weights_bytes"),
    ("collective buffers", "buffer_bytes"),
    ("held at the peak", "held_bytes"),
)
"""Shown for a sharded run: ZeRO's master partition, buffers kept for the run (DDP buckets,
ZeRO's bucket and gradient partition), what the strategy holds at the peak (gathered
parameters, all-gather/reduce-scatter buffers, buckets)."""


def component_rows(e: Mapping[str, Any], f: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(label, bytes of ``e``, bytes of ``f``) per component; with a quantized base the weights
    are shown as the quantized layers and the rest, and paged optimizer state (outside the
    peak) gets a row of its own."""
    rows = []
    quantized = e.get("quantized_base_bytes", 0) or f.get("quantized_base_bytes", 0)
    for label, key in COMPONENTS:
        if key == "weights_bytes" and quantized:
            qe, qf = e.get("quantized_base_bytes", 0), f.get("quantized_base_bytes", 0)
            rows.append(("quantized base", qe, qf))
            rows.append(("other weights", e[key] - qe, f[key] - qf))
            continue
        rows.append((label, e[key], f[key]))
    if e.get("paged_optimizer_bytes", 0) or f.get("paged_optimizer_bytes", 0):
        rows.append(("paged optimizer states (not in peak)", e.get("paged_optimizer_bytes", 0),
                     f.get("paged_optimizer_bytes", 0)))
    return rows


def base_text(settings: Mapping[str, Any]) -> str | None:
    """One line on a quantized or 16-bit base and the adapters' dtype; None when the base is
    unquantized in the precision's own dtype."""
    q = settings.get("quantization")
    if q is None:
        return None
    if q.get("library") == "torchao":  # NF4Tensor: its own layout and dequantization
        version = q.get("torchao_version")
        described = f"nf4 (torchao{'' if version is None else ' ' + version}, torchtune's build)"
    else:
        described = (f"{q['method']}{' + double quant' if q['double_quant'] else ''} "
                     f"(compute {q['compute_dtype']}, storage {q['quant_storage']})")
    parts = [described,
             f"loaded in {settings['base_dtype']}"]
    if settings.get("prepare_kbit"):
        parts.append("prepare_model_for_kbit_training (frozen norms, embeddings, head in fp32)")
    if settings.get("lora_dtype"):
        parts.append(f"adapters {settings['lora_dtype']}")
    return "Base: " + ", ".join(parts)


def use_color(stream: IO[str], environ: Mapping[str, str] = os.environ) -> bool:
    """ANSI colour when ``stream`` is a terminal or ``FORCE_COLOR`` is set, never when
    ``NO_COLOR`` is set to anything non-empty (https://no-color.org), nor for ``TERM=dumb``."""
    if environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    return bool(environ.get("FORCE_COLOR")) or (hasattr(stream, "isatty") and stream.isatty())


def _paint(text: str, code: str, color: bool) -> str:
    return f"{BOLD}{code}{text}{RESET}" if color else text


def gib(n: float) -> str:
    return format_bytes(n, 2)


def _seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 10 else format_duration(s)


def plan_label(doc: Mapping[str, Any]) -> str:
    plan = doc["plan"]
    if plan["lora_rank"] is not None:
        return f"LoRA rank {plan['lora_rank']}"
    return str(plan["text"])


def header_text(doc: Mapping[str, Any], per_gpu: bool = False) -> str:
    """Model, step settings and plan: three lines (plus the plan's notes)."""
    m, s, plan = doc["model"], doc["settings"], doc["plan"]
    layers = f", {m['num_layers']} layers" if m["num_layers"] is not None else ""
    ckpt = "gradient checkpointing" if s["gradient_checkpointing"] else "no gradient checkpointing"
    attention = s.get("attn_implementation")
    tokens = f"{s['seq_len']} tokens" + (" per GPU" if per_gpu else "")
    batch = f"batch {s['batch_size']} x {tokens}" if doc["command"] != "fit" else f"sequences of {tokens}"
    steps = s.get("gradient_accumulation_steps", 1)
    if steps > 1:
        batch += f", {steps} micro-batches accumulated per optimizer step"
    total = m["total_params"]
    if plan["lora_rank"] is not None:
        base = (f"the {format_count(total)} base parameters frozen" if plan["json"] is None
                else f"{plan['text'].partition('+')[2]} freezes "
                f"{format_count(plan['frozen_params'])} of the base")
        what = (f"LoRA rank {plan['lora_rank']} on {plan.get('lora_targets', 0)} modules "
                f"({base})")
    elif plan["frozen_params"] == 0:
        what = f"{plan['text']} (full fine-tuning: all {format_count(total)} parameters train)"
    else:
        what = (f"{plan['text']} (freezes {format_count(plan['frozen_params'])} of "
                f"{format_count(total)} parameters)")
    lines = [
        f"{m['name']}: {m['class']}, {format_count(total)} parameters{layers}",
        f"Step: {batch}, {s['precision']}, {s['optimizer']}, {ckpt}"
        + (f", {attention} attention" if attention else ""),
        f"Plan: {what}",
    ]
    if s.get("distributed"):
        offload = f", {s['offload']} offloaded to the CPU" if s.get("offload") else ""
        n, per_node = s["num_gpus"], s["gpus_per_node"]
        nodes = -(-n // per_node)
        where = f"{nodes} nodes of {per_node}" if nodes > 1 else "one node"
        lines.append(f"Sharding: {s['distributed']} over {n} GPU{'s' if n > 1 else ''} ({where})"
                     f"{offload}; memory below is per GPU (the busiest)")
    base_line = base_text(s)
    if base_line:
        lines.insert(2, base_line)
    inputs = (doc.get("estimate") or doc.get("at_max") or {}).get("inputs") or []
    if inputs and not (len(inputs) == 2 and inputs[1] == "labels = input_ids"):
        lines.append(f"Inputs: {'; '.join(inputs)}")  # a model that is not a plain causal LM
    lines += [f"note: {w}" for w in plan["warnings"]]
    return "\n".join(lines)


def rule_text(doc: Mapping[str, Any]) -> str:
    a = doc["assumptions"]
    return (f"Needed = reserved (the caching allocator, simulated) + "
            f"{a['cuda_context_bytes'] >> 20} MiB (CUDA context), against the GPU's total memory.")


def comparison_table(doc: Mapping[str, Any]) -> str:
    """The plan's memory next to full fine-tuning's, same settings."""
    e, f = doc["estimate"], doc["full_finetune"]
    rows = [(label, gib(a), gib(b)) for label, a, b in component_rows(e, f)]
    if e.get("distributed"):
        rows += [(label, gib(e[key]), gib(f[key])) for label, key in SHARDED_COMPONENTS
                 if e.get(key) or f.get(key)]
    total = e["total_params"]

    def trainable(d: Mapping[str, Any]) -> str:
        return f"{format_count(d['trainable_params'])} ({100 * d['trainable_params'] / total:.1f}%)"

    rows += [
        ("peak", gib(e["peak_bytes"]), gib(f["peak_bytes"])),
        ("peak during", e["peak_phase"], f["peak_phase"]),
        ("reserved (allocator)", gib(e["reserved_bytes"]), gib(f["reserved_bytes"])),
        ("GPU memory needed", gib(e["required_bytes"]), gib(f["required_bytes"])),
        ("trainable parameters", trainable(e), trainable(f)),
    ]
    if e.get("host_bytes") or f.get("host_bytes"):
        rows.append(("CPU memory per node", gib(e["host_bytes"]), gib(f["host_bytes"])))
    return str(tabulate(rows, headers=("", plan_label(doc), "full fine-tuning"),
                        colalign=("left", "right", "right"), disable_numparse=True))


def verdict_text(doc: Mapping[str, Any], color: bool = False) -> str:
    """One line: fits or not on the GPU, by how much; or where it fits without a GPU."""
    v = doc["verdict"]
    if v is None:
        where = ", ".join(f"{g['gpu']} ({gib(g['memory_bytes'])})" for g in doc["fits_on"])
        return f"No --gpu given. Fits as is on: {where or 'none of the catalogue GPUs'}."
    on = f"On {v['gpu']} ({gib(v['available_bytes'])}): "
    if v["fits"]:
        more = ""
        if v.get("max_batch_size"):
            more = f"; largest batch that fits: {v['max_batch_size']}"
        return (on + _paint("FITS", GREEN, color) + f". Needs {gib(v['required_bytes'])}, "
                f"{gib(v['margin_bytes'])} to spare{more}.")
    return (on + _paint("DOES NOT FIT", RED, color) + f". Needs {gib(v['required_bytes'])}, "
            f"{gib(-v['margin_bytes'])} too much.")


def suggestions_text(doc: Mapping[str, Any]) -> str:
    rows = []
    for a in doc["suggestions"]:
        ratio = a["time_per_token_ratio"]
        rows.append((a["change"], gib(a["peak_bytes"]), gib(a["required_bytes"]),
                     "yes" if a["fits"] else "no", "" if ratio is None else f"{ratio:.2f}x"))
    table = tabulate(rows, headers=("change", "peak", "needed", "fits", "time/token"),
                     colalign=("left", "right", "right", "left", "right"), disable_numparse=True)
    fit = any(a["fits"] for a in doc["suggestions"])
    title = ("What would make it fit (each estimated; those that fit first, then by how little "
             "they change the training):" if fit else "Nothing tried makes it fit on this GPU:")
    return (f"{title}\n{table}\nchange: the flags to add or replace. time/token: the step time "
            "per token, against the run as asked.")


def estimate_text(doc: Mapping[str, Any], color: bool = False) -> str:
    """``layerscope estimate``: header, side-by-side table, verdict and alternatives."""
    parts = [header_text(doc), comparison_table(doc),
             "Each component is at its own highest; they overlap in time, so they do not add "
             "up to the peak."]
    verdict = verdict_text(doc, color)
    if doc["verdict"] is not None:
        verdict += "\n" + rule_text(doc)
    parts.append(verdict)
    if doc["suggestions"]:
        parts.append(suggestions_text(doc))
    if doc["verdict"] is not None and not doc["verdict"]["fits"]:
        bigger = ", ".join(f"{g['gpu']} ({gib(g['memory_bytes'])})" for g in doc["fits_on"])
        parts.append(f"Fits as is on: {bigger or 'none of the catalogue GPUs'}.")
    return "\n\n".join(parts)


def _gpu_line(doc: Mapping[str, Any]) -> str:
    g, t = doc["gpu"], doc["training"]
    price = g["price_per_hour"]
    cost = f"${price:.2f} per GPU-hour" if price is not None else "no price known (--price-per-hour)"
    return f"GPU: {t['num_gpus']} x {g['name']}, {g['full_name']}, {cost}"


LINKS = {"nvlink": "NVLink", "pcie": "PCIe"}


def communication_text(comm: Mapping[str, Any] | None) -> str | None:
    """One line on a step's communication (None on one GPU): what compute waited for, what
    moved over which links, and the CPU optimizer under offload."""
    if comm is None:
        return None
    moved = ", ".join(f"{kind} {gib(t['bytes'])}" for kind, t in comm["transfers"].items())
    total = sum(t["seconds"] for t in comm["transfers"].values())
    links = f"{LINKS.get(comm['intra_node'], comm['intra_node'])} within a node"
    if comm["nodes"] > 1:
        links += f", {comm['fabric']} between {comm['nodes']} nodes"
    text = (f"{_seconds(comm['exposed_seconds'])} exposed of {_seconds(total)} of transfers "
            f"({moved or 'none'}; {links})")
    if comm["cpu_optimizer"]:
        text += (f"; optimizer on the CPU ({comm['cpu_optimizer']}): "
                 f"{_seconds(comm['optimizer_seconds'])}")
    return text


def time_text(doc: Mapping[str, Any], color: bool = False) -> str:
    """``layerscope time``: steps, step time, wall time, GPU-hours, cost, memory per GPU."""
    t, step, v = doc["training"], doc["training"]["step"], doc["verdict"]
    phases = [("forward", step["forward_seconds"]), ("backward", step["backward_seconds"]),
              ("recompute", step["recompute_seconds"]), ("optimizer", step["optimizer_seconds"])]
    comm = step.get("communication")
    if comm:
        phases.append(("communication", comm["exposed_seconds"]))
    split = ", ".join(f"{name} {_seconds(s)}" for name, s in phases if s)
    fits = _paint("fits", GREEN, color) if v["fits"] else _paint("does not fit", RED, color)
    rows = [
        ("samples x epochs", f"{t['samples']:,} x {t['epochs']}"),
        ("steps", f"{t['total_steps']:,} ({t['steps_per_epoch']:,} per epoch)"),
        ("step time", f"{_seconds(step['seconds'])} ({split})"),
        *([("communication", communication_text(comm))] if comm else []),
        ("likely range", f"{_seconds(step['low_seconds'])} - {_seconds(step['high_seconds'])} "
                         f"per step ({step['regime']})"),
        *([("average step", f"{_seconds(t['total_seconds'] / t['total_steps'])} "
                            "(padded batches of the real lengths)")]
          if t.get("lengths") and t["total_steps"] else []),
        ("throughput", f"{t['tokens_per_second']:,.0f} tokens/s"),
        ("wall time", f"{format_duration(t['total_seconds'])} "
                      f"({format_duration(t['low_seconds'])} - "
                      f"{format_duration(t['high_seconds'])})"),
        ("GPU-hours", f"{t['gpu_hours']:,.2f}"),
        ("cost", "unknown" if t["cost"] is None else f"${t['cost']:,.2f}"),
        ("memory per GPU", f"{fits}: needs {gib(v['required_bytes'])} of "
                           f"{gib(v['available_bytes'])}"),
    ]
    note = ("Step time: a roofline estimate from the kernels' FLOPs and bytes against the GPU's "
            f"datasheet peaks;\nthe likely range is where {step['band_coverage']:.0%} of measured "
            "steps of the same regime fell around the estimate (one-GPU steps).")
    if comm:
        note += ("\nCommunication: NCCL's cost model for each collective over the links, "
                 "scheduled against this GPU's\ncompute as the strategy overlaps it; "
                 "'exposed' is what compute waited for.")
    parts = [header_text(doc, per_gpu=True), _gpu_line(doc),
             tabulate(rows, tablefmt="plain", disable_numparse=True)]
    if t.get("lengths"):
        parts.append(lengths_text(t["lengths"], t["samples"]))
    return "\n\n".join([*parts, note])


def lengths_text(lengths: Mapping[str, Any], samples: int) -> str:
    """The batching strategies of a run over real data lengths, side by side."""
    names = {"padded": "padded (random)", "grouped": "grouped by length", "packed": "packed"}
    rows = []
    for key, r in lengths.items():
        rows.append((
            names.get(key, key), f"{r['steps_per_epoch']:,}",
            f"{r['padding_share']:.0%}", f"{r['truncated_tokens']:,}",
            format_duration(r["total_seconds"]),
            f"{format_duration(r['low_seconds'])} - {format_duration(r['high_seconds'])}",
            "-" if r["required_bytes"] is None else
            f"{gib(r['required_bytes'])} at {r['longest_seq_len']:,} tokens",
        ))
    table = tabulate(rows, headers=("batching", "steps/epoch", "padding", "tokens cut",
                                    "wall time", "likely range", "memory (longest batch)"),
                     disable_numparse=True)
    return f"Real lengths of {samples:,} examples:\n{table}"


def fit_text(doc: Mapping[str, Any], color: bool = False) -> str:
    """``layerscope fit``: the largest batch, the step at it and just above it."""
    g, best = doc["gpu"], doc["max_batch_size"]
    lines = [header_text(doc), ""]
    on = f"{g['name']} ({gib(g['memory_bytes'])})"
    if best:
        lines.append(f"Largest batch that fits on {on}: " + _paint(str(best), GREEN, color))
    else:
        lines.append(f"On {on}: " + _paint("DOES NOT FIT", RED, color) + " even at batch 1.")
    for batch, e in ((best, doc["at_max"]), (best + 1, doc["above_max"])):
        if e is None:
            continue
        margin = g["memory_bytes"] - e["required_bytes"]
        room = f"{gib(margin)} to spare" if margin >= 0 else f"{gib(-margin)} too much"
        speed = ""
        if batch == best and doc["step"] is not None:
            speed = f"; {doc['step']['tokens_per_second']:,.0f} tokens/s"
        lines.append(f"  batch {batch}: peak {gib(e['peak_bytes'])} during {e['peak_phase']}, "
                     f"needs {gib(e['required_bytes'])}, {room}{speed}")
    lines.append(rule_text(doc))
    if doc["suggestions"]:
        lines += ["", suggestions_text(doc)]
    return "\n".join(lines)


def _setting(c: Mapping[str, Any]) -> str:
    """A chosen setting in a few words: ``zero3 + checkpointing``, ``one GPU``."""
    s = c["settings"]
    words = [s["distributed"] or "one GPU"]
    if s["offload"]:
        words.append(f"offload {s['offload']}")
    if s["gradient_checkpointing"]:
        words.append("checkpointing")
    return " + ".join(words)


def gpus_text(doc: Mapping[str, Any], color: bool = False) -> str:
    """``layerscope gpus``: per GPU type the fewest GPUs that fit, how, and what it costs."""
    run = doc["run"]
    offloads = any(c["fits"] and c["settings"]["offload"] for c in doc["gpus"])
    rows = []
    for c in doc["gpus"]:
        g = c["gpu"]
        if not c["fits"]:
            rows.append((g["name"], _paint("none", RED, color), "nothing fits", "", "", "", "",
                         *([""] if offloads else [])))
            continue
        e, step = c["estimate"], c["step"]
        memory = f"{gib(e['required_bytes'])} of {gib(g['memory_bytes'])}"
        tail: tuple[str, ...]
        if run is not None:
            r = c["run"]
            money = ("no price" if r["cost"] is None else f"${r['cost']:,.2f}")
            tail = (format_duration(r["total_seconds"]), money)
        else:
            per = c["cost_per_million_tokens"]
            tail = ("no price" if per is None else f"${per:,.2f}",)
        rows.append((g["name"], str(c["num_gpus"]), _setting(c), memory,
                     _seconds(step["seconds"]), f"{c['tokens_per_second']:,.0f}", *tail,
                     *([gib(e["host_bytes"]) if e["host_bytes"] else ""] if offloads else [])))
    money_headers = (("wall time", "cost") if run is not None else ("per 1M tokens",))
    headers = ("GPU", "GPUs", "setting", "memory per GPU (needed)", "step", "tokens/s",
               *money_headers, *(["CPU per node"] if offloads else []))
    table = tabulate(rows, headers=headers, disable_numparse=True)
    size = (f" for {run['samples']:,} samples x {run['epochs']} epoch(s)" if run is not None
            else "; cost of a million training tokens")
    why = "\n".join(f"  {c['gpu']['name']}: {c['reason']}" for c in doc["gpus"])
    a = doc["assumptions"]
    tried = (f"Tried: one GPU, then {', '.join(a['strategies'])} on "
             f"{', '.join(str(n) for n in a['gpu_counts'][1:])} GPUs, each without and with "
             "gradient checkpointing;\noffload (" + ", ".join(f"{s} {o}" for s, o in a["offloads"])
             + ") only where nothing else fits. At the fewest count that fits, the fastest step "
             "wins.")
    return "\n\n".join([
        header_text(doc, per_gpu=True),
        f"Fewest GPUs of each type that fit, cheapest first{size}:\n{table}",
        f"Why:\n{why}",
        tried + "\n" + rule_text(doc),
    ])
