"""The pre-flight behind each command: it runs the estimates a command needs (and searches
the alternatives for a run that does not fit) and returns the JSON-ready document the command
line prints (``--json``) and the HTML report draws.

Each ``*_document`` function returns plain data:
ints in bytes, floats in seconds, strings, lists and dicts, nothing else. Text and HTML are
rendered from these documents (``render.console``, ``render.report``), never from live
objects, so ``--json`` and what a person reads always agree.

The schema is versioned by :data:`SCHEMA_VERSION`; keys are only ever added within a version.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from layerscope.estimate.hardware import GPU, get_gpu, gpus
from layerscope.estimate.memory import (
    ALLOCATOR_HEADROOM,
    CUDA_CONTEXT_BYTES,
    MemoryEstimate,
    estimate_memory,
    max_batch_size,
)
from layerscope.errors import EstimateError, StructureError
from layerscope.plan import FreezePlan
from layerscope.scan import ModelScan, scan

SCHEMA_VERSION = 1
DEFAULT_TIME_GPU = "h100-sxm"
"""The GPU step times are estimated on when none is named."""
REPORT_GPUS = ("l4", "l40s", "h100-sxm", "h200")
"""Capacity lines drawn in the report's charts: 24, 48, 80 and 141 GB boards."""
SWEEP_BATCHES = (1, 2, 4, 8, 16, 32)
"""Batch sizes of the report's memory-against-batch chart."""
MAX_BATCH_LIMIT = 4096
"""Largest batch size ``fit`` and ``estimate`` search up to."""

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Settings:
    """What one training step looks like, besides the model and the freeze plan.

    ``lora_rank`` adds LoRA adapters (rank ``r`` on every Linear of the blocks) to a frozen
    base model, as peft does.
    """

    batch_size: int = 1
    seq_len: int = 2048
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    lora_rank: int | None = None

    def estimator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by ``estimate_memory`` and ``estimate_step_time``."""
        return {
            "batch_size": self.batch_size, "seq_len": self.seq_len, "precision": self.precision,
            "optimizer": self.optimizer, "gradient_checkpointing": self.gradient_checkpointing,
            "lora": self.lora_rank,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Estimator:
    """Runs (and remembers) the memory and step-time estimates of one model.

    Args:
        model: the model skeleton.
        progress: called with a short message before each memory estimate (the slow part).
    """

    def __init__(self, model: nn.Module, progress: Progress = _quiet) -> None:
        self.model = model
        self.scan: ModelScan = scan(model)
        self.progress = progress
        self._memory: dict[tuple[Any, Settings], MemoryEstimate] = {}
        self.count = 0

    def memory(self, plan: FreezePlan | None, s: Settings) -> MemoryEstimate:
        key = (plan, s)
        if key not in self._memory:
            self.count += 1
            self.progress(f"estimate {self.count}: {describe_change(plan, s)}")
            self._memory[key] = estimate_memory(self.model, plan, **s.estimator_kwargs())
        return self._memory[key]

    def step(self, plan: FreezePlan | None, s: Settings, gpu: GPU) -> Any:
        """The ``StepTime`` on ``gpu``, or None when there is nothing to train."""
        from layerscope.estimate.time import estimate_step_time

        if s.lora_rank is None and plan is not None and plan.resolve(self.scan).trainable_params == 0:
            return None
        return estimate_step_time(self.model, plan, gpu=gpu, **s.estimator_kwargs())

    def max_batch(self, plan: FreezePlan | None, s: Settings, gpu: GPU, limit: int) -> int:
        self.progress(f"searching the largest batch for {describe_change(plan, s)}")
        kwargs = s.estimator_kwargs()
        del kwargs["batch_size"]
        return max_batch_size(self.model, gpu.memory_bytes, plan, limit=limit, **kwargs)


def describe_change(plan: FreezePlan | None, s: Settings) -> str:
    """A short label of a run: ``"plan lp-lora:0.5, batch 4, adamw"``."""
    parts = [f"LoRA rank {s.lora_rank}" if s.lora_rank else f"plan {plan or 'none'}",
             f"batch {s.batch_size}", s.optimizer]
    if s.gradient_checkpointing:
        parts.append("checkpointing")
    return ", ".join(parts)


# -- pieces of a document ----------------------------------------------------------------------
def model_dict(name: str, model: nn.Module, s: ModelScan) -> dict[str, Any]:
    try:
        layers: int | None = s.num_layers
    except StructureError:
        layers = None
    return {"name": name, "class": type(model).__name__, "total_params": s.total_params,
            "num_layers": layers}


def plan_dict(plan: FreezePlan | None, s: ModelScan, settings: Settings) -> dict[str, Any]:
    """The plan as text and JSON, with what it freezes on this model (LoRA: the whole base)."""
    if settings.lora_rank is not None:
        return {"text": f"lora:{settings.lora_rank}", "json": None, "lora_rank": settings.lora_rank,
                "frozen_params": s.total_params, "warnings": []}
    plan = plan or FreezePlan.none()
    r = plan.resolve(s)
    return {"text": str(plan), "json": plan.to_dict(), "lora_rank": None,
            "frozen_params": r.frozen_params, "warnings": list(r.warnings)}


def estimate_dict(e: MemoryEstimate) -> dict[str, Any]:
    """Every number of a :class:`MemoryEstimate`, plus the GPU memory it needs."""
    return {
        "peak_bytes": e.peak_bytes,
        "peak_phase": e.peak_phase,
        "required_bytes": e.required_bytes(),
        "weights_bytes": e.weights_bytes,
        "gradient_bytes": e.gradient_bytes,
        "optimizer_state_bytes": e.optimizer_state_bytes,
        "optimizer_temporary_bytes": e.optimizer_temporary_bytes,
        "activation_bytes": e.activation_bytes,
        "activation_bytes_per_block": list(e.activation_bytes_per_block),
        "logits_bytes": e.logits_bytes,
        "forward_peak_bytes": e.forward_peak_bytes,
        "backward_peak_bytes": e.backward_peak_bytes,
        "optimizer_peak_bytes": e.optimizer_peak_bytes,
        "trainable_params": e.trainable_params,
        "total_params": e.total_params,
        "forward_flops": e.forward_flops,
        "backward_flops": e.backward_flops,
    }


def gpu_dict(gpu: GPU, price_per_hour: float | None = None) -> dict[str, Any]:
    return {"name": gpu.name, "full_name": gpu.full_name, "memory_bytes": gpu.memory_bytes,
            "price_per_hour": gpu.price_per_hour if price_per_hour is None else price_per_hour}


def assumptions_dict() -> dict[str, Any]:
    return {
        "allocator_headroom": ALLOCATOR_HEADROOM,
        "cuda_context_bytes": CUDA_CONTEXT_BYTES,
        "rule": f"fits when peak x {1 + ALLOCATOR_HEADROOM:.2f} + {CUDA_CONTEXT_BYTES >> 20} MiB "
                "<= the GPU's total memory (nvidia-smi)",
    }


def step_dict(step: Any) -> dict[str, Any] | None:
    """A ``StepTime`` in seconds (None stays None)."""
    if step is None:
        return None
    return {
        "seconds": step.seconds, "forward_seconds": step.forward.seconds,
        "backward_seconds": step.backward.seconds, "recompute_seconds": step.recompute.seconds,
        "optimizer_seconds": step.optimizer.seconds, "flops": step.flops, "tokens": step.tokens,
        "tokens_per_second": step.tokens_per_second, "gpu": step.assumptions.gpu,
    }


def verdict_dict(e: MemoryEstimate, gpu: GPU) -> dict[str, Any]:
    need = e.required_bytes()
    return {"gpu": gpu.name, "fits": e.fits(gpu.memory_bytes), "required_bytes": need,
            "available_bytes": gpu.memory_bytes, "margin_bytes": gpu.memory_bytes - need}


def fits_on(e: MemoryEstimate) -> list[dict[str, Any]]:
    """Catalogue GPUs the step fits on, smallest memory first."""
    boards = sorted((get_gpu(n) for n in gpus()), key=lambda g: (g.memory_bytes, g.name))
    return [{"gpu": g.name, "memory_bytes": g.memory_bytes} for g in boards
            if e.fits(g.memory_bytes)]


def _header(command: str, name: str, est: Estimator, plan: FreezePlan | None,
            s: Settings) -> dict[str, Any]:
    from layerscope import __version__

    return {
        "layerscope_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "model": model_dict(name, est.model, est.scan),
        "settings": s.to_dict(),
        "plan": plan_dict(plan, est.scan, s),
    }


# -- alternatives for a run that does not fit -----------------------------------------------
@dataclass(frozen=True)
class Change:
    """One alternative run: the command-line flags that make it, and the settings.

    ``kind`` names the change (``checkpointing``, ``batch``, ``optimizer``, ``freeze``,
    ``lora``, joined by ``+`` when combined)."""

    label: str
    kind: str
    plan: FreezePlan | None
    settings: Settings


def _deeper_plans(est: Estimator, plan: FreezePlan) -> list[FreezePlan]:
    """LP-LoRA and ``except-last:N`` plans that train fewer parameters than ``plan``."""
    try:
        layers = est.scan.num_layers
    except StructureError:
        return []
    now = plan.resolve(est.scan).trainable_params
    candidates = [FreezePlan.lp_lora()] + [
        FreezePlan.except_last(n) for n in sorted({max(1, layers // 4), max(1, layers // 8)},
                                                  reverse=True)
    ]
    return [p for p in candidates if p != plan and p.resolve(est.scan).trainable_params < now]


def _single_changes(est: Estimator, plan: FreezePlan | None, s: Settings) -> list[Change]:
    """One-step changes, least disruptive to the training first (the batch is searched later).

    Order: checkpointing recomputes (same maths, more time); 8-bit AdamW approximates the
    optimizer states; a deeper freeze trains fewer weights; LoRA trains adapters instead.
    """
    out = []
    if not s.gradient_checkpointing:
        out.append(Change("--gradient-checkpointing", "checkpointing", plan,
                          dataclasses.replace(s, gradient_checkpointing=True)))
    if s.optimizer not in ("adamw-8bit", "sgd"):
        out.append(Change("--optimizer adamw-8bit", "optimizer", plan,
                          dataclasses.replace(s, optimizer="adamw-8bit")))
    if s.lora_rank is None:
        for deeper in _deeper_plans(est, plan or FreezePlan.none()):
            out.append(Change(f"--plan {deeper}", "freeze", deeper, s))
        instead = "" if plan is None or plan == FreezePlan.none() else " (instead of --plan)"
        out.append(Change(f"--lora-rank 16{instead}", "lora", None,
                          dataclasses.replace(s, lora_rank=16)))
    return out


def _alternative(est: Estimator, change: Change, gpu: GPU, base_step: Any,
                 note: str = "") -> dict[str, Any]:
    e = est.memory(change.plan, change.settings)
    step = est.step(change.plan, change.settings, gpu)
    slowdown = None
    if step is not None and base_step is not None:
        slowdown = base_step.tokens_per_second / step.tokens_per_second
    return {
        "change": change.label + note, "kind": change.kind,
        "plan": str(change.plan or FreezePlan.none()) if change.settings.lora_rank is None
        else f"lora:{change.settings.lora_rank}",
        "settings": change.settings.to_dict(),
        "peak_bytes": e.peak_bytes, "required_bytes": e.required_bytes(),
        "fits": e.fits(gpu.memory_bytes), "margin_bytes": gpu.memory_bytes - e.required_bytes(),
        "step_seconds": None if step is None else step.seconds,
        "time_per_token_ratio": slowdown,
    }


def _smaller_batch(est: Estimator, change: Change, gpu: GPU, base_step: Any,
                   batch: int) -> dict[str, Any] | None:
    """``change`` at the largest batch below ``batch`` that fits (gradient accumulation keeps
    the effective batch); None when ``batch`` is 1."""
    if batch <= 1:
        return None
    best = est.max_batch(change.plan, change.settings, gpu, limit=batch - 1)
    b = max(best, 1)
    label = f"{change.label} --batch-size {b}".strip()
    kind = f"{change.kind}+batch" if change.kind else "batch"
    smaller = Change(label, kind, change.plan, dataclasses.replace(change.settings, batch_size=b))
    note = f" (x {math.ceil(batch / b)} accumulation)" if best else " (still too big)"
    return _alternative(est, smaller, gpu, base_step, note)


def suggestions(est: Estimator, plan: FreezePlan | None, s: Settings, gpu: GPU) -> list[dict]:
    """Alternatives for a run that does not fit on ``gpu``, each estimated, not guessed.

    Single changes first (checkpointing, a smaller batch with gradient accumulation, 8-bit
    AdamW, deeper freezes, LoRA: least change to the training first); if none fits, gradient
    checkpointing combined with each other change; if still none fits, checkpointing, the
    last change and 8-bit AdamW at once. Those that fit are listed first, order kept.
    """
    base_step = est.step(plan, s, gpu)
    singles = _single_changes(est, plan, s)
    found = [_alternative(est, c, gpu, base_step) for c in singles]
    batch = _smaller_batch(est, Change("", "", plan, s), gpu, base_step, s.batch_size)
    if batch:  # right after checkpointing: the same training, in more steps
        found.insert(0 if s.gradient_checkpointing else 1, batch)
    if not any(a["fits"] for a in found) and not s.gradient_checkpointing:
        ckpt, others = singles[0], singles[1:]
        combos = [Change(f"{ckpt.label} {c.label}", f"checkpointing+{c.kind}", c.plan,
                         dataclasses.replace(c.settings, gradient_checkpointing=True))
                  for c in others]
        found += [_alternative(est, c, gpu, base_step) for c in combos]
        batch = _smaller_batch(est, ckpt, gpu, base_step, s.batch_size)
        found += [batch] if batch else []
        last = combos[-1] if combos else None  # LoRA (or the deepest freeze) + checkpointing
        if not any(a["fits"] for a in found) and last and last.settings.optimizer != "adamw-8bit":
            everything = Change(f"{last.label} --optimizer adamw-8bit", f"{last.kind}+optimizer",
                                last.plan, dataclasses.replace(last.settings,
                                                               optimizer="adamw-8bit"))
            found.append(_alternative(est, everything, gpu, base_step))
            batch = _smaller_batch(est, everything, gpu, base_step, s.batch_size)
            found += [batch] if batch else []
    return sorted(found, key=lambda a: not a["fits"])


# -- documents ---------------------------------------------------------------------------------
def estimate_document(name: str, est: Estimator, plan: FreezePlan | None, s: Settings,
                      gpu: GPU | None) -> dict[str, Any]:
    """``layerscope estimate``: the plan next to full fine-tuning, the verdict, what to change."""
    doc = _header("estimate", name, est, plan, s)
    e = est.memory(plan, s)
    full = est.memory(FreezePlan.none(), dataclasses.replace(s, lora_rank=None))
    doc.update(estimate=estimate_dict(e), full_finetune=estimate_dict(full),
               gpu=None if gpu is None else gpu_dict(gpu), assumptions=assumptions_dict(),
               verdict=None, suggestions=[], fits_on=fits_on(e))
    if gpu is not None:
        verdict = verdict_dict(e, gpu)
        if verdict["fits"]:
            verdict["max_batch_size"] = est.max_batch(plan, s, gpu, MAX_BATCH_LIMIT)
        else:
            verdict["max_batch_size"] = 0 if s.batch_size == 1 else None
            doc["suggestions"] = suggestions(est, plan, s, gpu)
        doc["verdict"] = verdict
    return doc


def training_dict(est: Estimator, plan: FreezePlan | None, s: Settings, gpu: GPU,
                  samples: int, epochs: int, num_gpus: int,
                  price_per_hour: float | None) -> dict[str, Any] | None:
    """Steps, time, GPU-hours and cost of ``epochs`` over ``samples`` (None: nothing trains)."""
    from layerscope.layer_utils import estimate_training_time

    step = est.step(plan, s, gpu)
    if step is None:
        return None
    price = gpu.price_per_hour if price_per_hour is None else price_per_hour
    # The step time carries every setting; estimate_training_time does the run's arithmetic.
    run = estimate_training_time(est.model, samples, s.batch_size, epochs,
                                 ms_per_step=step.seconds * 1000.0, seq_len=s.seq_len,
                                 num_gpus=num_gpus, price_per_hour=price)
    return {
        "samples": samples, "epochs": epochs, "num_gpus": num_gpus, "gpu": gpu.name,
        "steps_per_epoch": run["steps_per_epoch"], "total_steps": run["total_steps"],
        "total_seconds": run["total_seconds"], "gpu_hours": run["gpu_hours"],
        "price_per_hour": price, "cost": run["cost"],
        "tokens_per_second": step.tokens_per_second * num_gpus, "step": step_dict(step),
    }


def time_document(name: str, est: Estimator, plan: FreezePlan | None, s: Settings, gpu: GPU,
                  samples: int, epochs: int, num_gpus: int,
                  price_per_hour: float | None) -> dict[str, Any]:
    """``layerscope time``: how long and how much, and whether each GPU's batch fits."""
    doc = _header("time", name, est, plan, s)
    training = training_dict(est, plan, s, gpu, samples, epochs, num_gpus, price_per_hour)
    if training is None:
        raise EstimateError(f"plan {plan} freezes every parameter: there is nothing to train")
    e = est.memory(plan, s)
    doc.update(gpu=gpu_dict(gpu, price_per_hour), training=training,
               estimate=estimate_dict(e), assumptions=assumptions_dict(),
               verdict=verdict_dict(e, gpu))
    return doc


def fit_document(name: str, est: Estimator, plan: FreezePlan | None, s: Settings,
                 gpu: GPU) -> dict[str, Any]:
    """``layerscope fit``: the largest batch that fits, the step at it and one above it."""
    doc = _header("fit", name, est, plan, s)
    best = est.max_batch(plan, s, gpu, MAX_BATCH_LIMIT)
    doc.update(gpu=gpu_dict(gpu), assumptions=assumptions_dict(), max_batch_size=best,
               at_max=None, above_max=None, step=None, suggestions=[])
    if best:
        at = dataclasses.replace(s, batch_size=best)
        doc["at_max"] = estimate_dict(est.memory(plan, at))
        doc["step"] = step_dict(est.step(plan, at, gpu))
    if best < MAX_BATCH_LIMIT:
        doc["above_max"] = estimate_dict(est.memory(plan, dataclasses.replace(s, batch_size=best + 1)))
    if not best:
        doc["suggestions"] = suggestions(est, plan, dataclasses.replace(s, batch_size=1), gpu)
    return doc


def structure(est: Estimator, plan: FreezePlan | None, s: Settings) -> list[dict[str, Any]]:
    """The model's parts in order (embeddings, each block, head, rest): parameters (each
    tensor counted once, where it first appears) and status under the plan."""
    sc = est.scan
    frozen = (frozenset(p.name for p in sc.params) if s.lora_rank is not None
              else (plan or FreezePlan.none()).resolve(sc).frozen)
    groups: list[tuple[str, str, Iterable[str]]] = [
        ("embeddings", "embedding", sc.names_with_role("embedding"))]
    try:
        stack = sc.layers
        groups += [(f"{stack.path}.{i}", "block", sc.block_names(i)) for i in range(len(stack))]
    except StructureError:
        pass
    groups += [("head", "head", sc.names_with_role("head")),
               ("other", "other", sc.names_with_role("other"))]
    seen: set[int] = set()
    parts = []
    for label, kind, names in groups:
        names = list(names)
        if not names:
            continue
        flags = {n in frozen for n in names}
        status = "frozen" if flags == {True} else "trainable" if flags == {False} else "partial"
        if s.lora_rank is not None and kind == "block":
            status = "lora"
        tensors = {sc.by_name[n].tensor: sc.by_name[n].numel for n in names}
        params = sum(v for t, v in tensors.items() if t not in seen)
        tied = params == 0 and bool(tensors)
        seen |= set(tensors)
        parts.append({"name": label, "kind": kind, "params": params, "status": status,
                      "tied": tied})
    return parts


def report_document(name: str, est: Estimator, plan: FreezePlan | None, s: Settings,
                    gpu: GPU | None, samples: int, epochs: int, num_gpus: int,
                    price_per_hour: float | None) -> dict[str, Any]:
    """Everything the HTML report shows: the estimate document, the structure, memory
    against batch size for the plan and for full fine-tuning, and time and cost of both."""
    doc = estimate_document(name, est, plan, s, gpu)
    doc["command"] = "report"
    doc["structure"] = structure(est, plan, s)
    full_s = dataclasses.replace(s, lora_rank=None)
    batches = sorted(set(SWEEP_BATCHES) | {s.batch_size})
    doc["batch_sweep"] = {
        "batch_sizes": batches,
        "plan_required_bytes": [est.memory(plan, dataclasses.replace(s, batch_size=b))
                                .required_bytes() for b in batches],
        "full_finetune_required_bytes": [
            est.memory(FreezePlan.none(), dataclasses.replace(full_s, batch_size=b))
            .required_bytes() for b in batches],
    }
    time_gpu = gpu or get_gpu(DEFAULT_TIME_GPU)
    doc["training"] = {
        "plan": training_dict(est, plan, s, time_gpu, samples, epochs, num_gpus, price_per_hour),
        "full_finetune": training_dict(est, FreezePlan.none(), full_s, time_gpu, samples, epochs,
                                       num_gpus, price_per_hour),
    }
    lines = [get_gpu(n) for n in REPORT_GPUS]
    if gpu is not None and gpu not in lines:
        lines.append(gpu)
    doc["capacity_lines"] = [{"gpu": g.name, "memory_bytes": g.memory_bytes} for g in lines]
    return doc
