"""The pre-flight behind each command: it runs the estimates a command needs (and searches
the alternatives for a run that does not fit) and returns a typed, frozen document.

Every document has ``to_dict()``: plain data (ints in bytes, floats in seconds, strings, lists
and dicts), which the command line prints (``--json``) and from which the terminal text and the
HTML report are rendered (``render.console``, ``render.report``), so ``--json`` and what a
person reads always agree. Every estimate comes from one :class:`~layerscope.setup.
TrainingSetup` and the shared caches, so the alternatives and the report re-use the traces of
the run as asked.

The schema is versioned by :data:`SCHEMA_VERSION`; keys are only ever added within a version.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from layerscope.errors import EstimateError, StructureError
from layerscope.estimate.accumulation import micro_batch_seconds
from layerscope.estimate.band import BAND_COVERAGE
from layerscope.estimate.choose import GPU_COUNTS as GPU_COUNTS_TRIED
from layerscope.estimate.choose import OFFLOADS as OFFLOADS_TRIED
from layerscope.estimate.choose import STRATEGIES as STRATEGIES_TRIED
from layerscope.estimate.choose import GpuChoice, Tried, choose_gpus
from layerscope.estimate.comm import CommTime
from layerscope.estimate.hardware import GPU, Fabric, get_gpu, gpus
from layerscope.estimate.lengths import StrategyTime, run_times
from layerscope.estimate.memory import (
    CUDA_CONTEXT_BYTES,
    MemoryEstimate,
    max_batch_size,
    memory_of,
)
from layerscope.estimate.run import RunCost, run_cost
from layerscope.estimate.time import StepTime, step_time_of, step_timer
from layerscope.plan import FreezePlan
from layerscope.quantization import Quantization
from layerscope.setup import TrainingSetup

SCHEMA_VERSION = 1
DEFAULT_TIME_GPU = "h100-sxm"
"""The GPU step times are estimated on when none is named."""
REPORT_GPUS = ("l4", "l40s", "h100-sxm", "h200")
"""Capacity lines drawn in the report's charts: 24, 48, 80 and 141 GB boards."""
SWEEP_BATCHES = (1, 2, 4, 8, 16, 32)
"""Batch sizes of the report's memory-against-batch chart."""
MAX_BATCH_LIMIT = 4096
"""Largest batch size ``fit`` and ``estimate`` search up to."""
ALTERNATIVE_LORA_RANK = 16
"""The LoRA rank the alternatives try."""
ALTERNATIVE_QUANTIZATION = Quantization("nf4", double_quant=True)
"""The quantized base the QLoRA alternative tries: NF4 with double quantisation, computing in
the precision's dtype (the QLoRA paper's setting, and what QLoRA scripts pass to
``BitsAndBytesConfig``)."""

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# -- pieces of a document ----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """The model as the documents name it."""

    name: str
    class_name: str
    total_params: int
    num_layers: int | None

    @classmethod
    def of(cls, name: str, setup: TrainingSetup) -> ModelInfo:
        s = setup.scan
        try:
            layers: int | None = s.num_layers
        except StructureError:
            layers = None
        return cls(name, type(setup.model).__name__, s.total_params, layers)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "class": self.class_name, "total_params": self.total_params,
                "num_layers": self.num_layers}


@dataclass(frozen=True)
class PlanInfo:
    """The plan as text and JSON, with what it freezes on this model (LoRA: the whole base,
    but for what the plan leaves trainable)."""

    text: str
    json: dict[str, Any] | None
    lora_rank: int | None
    lora_targets: int
    frozen_params: int
    warnings: tuple[str, ...]

    @classmethod
    def of(cls, setup: TrainingSetup) -> PlanInfo:
        s = setup.scan
        frozen = s.total_params - s.numel(setup.trainable)
        resolved = (setup.plan or FreezePlan.none()).resolve(s)
        plan = resolved.plan or FreezePlan.none()  # records the model's fingerprint
        warnings = resolved.warnings if setup.plan is not None else ()
        if setup.lora is not None:
            text = f"lora:{setup.lora.rank}" + (f"+{plan}" if setup.plan is not None else "")
            return cls(text, None if setup.plan is None else plan.to_dict(), setup.lora.rank,
                       len(setup.lora.targets), frozen, tuple(warnings))
        return cls(str(plan), plan.to_dict(), None, 0, frozen, tuple(warnings))

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "json": self.json, "lora_rank": self.lora_rank,
                "lora_targets": self.lora_targets, "frozen_params": self.frozen_params,
                "warnings": list(self.warnings)}


def estimate_dict(e: MemoryEstimate) -> dict[str, Any]:
    """Every number of a :class:`MemoryEstimate`, plus the GPU memory it needs."""
    return {
        "peak_bytes": e.peak_bytes,
        "peak_phase": e.peak_phase,
        "reserved_bytes": e.reserved_bytes,
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
        "distributed": e.distributed,
        "num_gpus": e.num_gpus,
        "offload": e.offload,
        "master_weights_bytes": e.master_weights_bytes,
        "buffer_bytes": e.buffer_bytes,
        "held_bytes": e.held_bytes,
        "host_bytes": e.host_bytes,
        "quantized_base_bytes": e.quantized_base_bytes,
        "paged_optimizer_bytes": e.paged_optimizer_bytes,
        "inputs": list(e.inputs.describe()) if e.inputs is not None else [],
    }


def gpu_dict(gpu: GPU) -> dict[str, Any]:
    return {"name": gpu.name, "full_name": gpu.full_name, "memory_bytes": gpu.memory_bytes,
            "price_per_hour": gpu.price_per_hour,
            "fabric": gpu.fabric.name if isinstance(gpu.fabric, Fabric) else gpu.fabric}


def assumptions_dict() -> dict[str, Any]:
    return {
        "cuda_context_bytes": CUDA_CONTEXT_BYTES,
        "rule": "fits when the memory the caching allocator reserves (simulated) + "
                f"{CUDA_CONTEXT_BYTES >> 20} MiB (CUDA context) <= the GPU's total memory (nvidia-smi)",
    }


def communication_dict(comm: CommTime | None) -> dict[str, Any] | None:
    """A step's communication (None on one GPU): the setting, what compute waited for, and per
    kind of transfer its bytes (full tensor sizes, summed), its seconds (overlapped or not)
    and the seconds compute waited for it."""
    if comm is None:
        return None
    return {
        "strategy": comm.strategy, "num_gpus": comm.num_gpus, "nodes": comm.nodes,
        "offload": comm.offload, "intra_node": comm.intra_node,
        "fabric": comm.fabric if comm.nodes > 1 else None,
        "exposed_seconds": comm.exposed_seconds, "compute_seconds": comm.compute_seconds,
        "optimizer_seconds": comm.optimizer_seconds, "cpu_optimizer": comm.cpu_optimizer,
        "transfers": {kind: {"bytes": comm.bytes_of(kind), "seconds": comm.seconds_of(kind),
                             "exposed_seconds": comm.exposed_of(kind),
                             "count": sum(t.op == kind for t in comm.transfers)}
                      for kind in comm.kinds},
    }


def step_dict(step: StepTime | None) -> dict[str, Any] | None:
    """A ``StepTime`` in seconds (None stays None)."""
    if step is None:
        return None
    return {
        "seconds": step.seconds, "low_seconds": step.low_seconds,
        "high_seconds": step.high_seconds, "regime": step.regime,
        "band_coverage": BAND_COVERAGE, "forward_seconds": step.forward.seconds,
        "backward_seconds": step.backward.seconds, "recompute_seconds": step.recompute.seconds,
        "optimizer_seconds": step.optimizer.seconds, "flops": step.flops, "tokens": step.tokens,
        "tokens_per_second": step.tokens_per_second, "gpu": step.assumptions.gpu,
        "communication": communication_dict(step.communication),
    }


def lengths_dict(runs: Mapping[str, StrategyTime]) -> dict[str, Any]:
    """Each batching strategy of a run over real data lengths, in seconds, tokens and bytes."""
    return {name: {
        "steps_per_epoch": r.batching.steps, "longest_seq_len": r.batching.longest,
        "real_tokens": r.batching.real_tokens, "padding_tokens": r.batching.padding_tokens,
        "padding_share": r.batching.padding_share,
        "truncated_tokens": r.batching.truncated_tokens, "total_seconds": r.seconds,
        "low_seconds": r.low_seconds, "high_seconds": r.high_seconds,
        "peak_bytes": r.peak_bytes, "required_bytes": r.required_bytes,
    } for name, r in runs.items()}


@dataclass(frozen=True)
class Verdict:
    """Whether the step fits on a GPU, by the rule in :func:`assumptions_dict`."""

    gpu: str
    fits: bool
    required_bytes: int
    available_bytes: int
    max_batch_size: int | None = None

    @classmethod
    def of(cls, e: MemoryEstimate, gpu: GPU, max_batch: int | None = None) -> Verdict:
        return cls(gpu.name, e.fits(gpu.memory_bytes), e.required_bytes(), gpu.memory_bytes,
                   max_batch)

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "fits": self.fits, "required_bytes": self.required_bytes,
                "available_bytes": self.available_bytes,
                "margin_bytes": self.available_bytes - self.required_bytes,
                "max_batch_size": self.max_batch_size}


def fits_on(e: MemoryEstimate) -> list[dict[str, Any]]:
    """Catalogue GPUs the step fits on, smallest memory first."""
    boards = sorted((get_gpu(n) for n in gpus()), key=lambda g: (g.memory_bytes, g.name))
    return [{"gpu": g.name, "memory_bytes": g.memory_bytes} for g in boards
            if e.fits(g.memory_bytes)]


@dataclass(frozen=True)
class Header:
    """What every document starts with: versions, command, model, settings and plan."""

    command: str
    model: ModelInfo
    setup: TrainingSetup

    def to_dict(self) -> dict[str, Any]:
        from layerscope import __version__

        return {"layerscope_version": __version__, "schema_version": SCHEMA_VERSION,
                "command": self.command, "model": self.model.to_dict(),
                "settings": self.setup.to_dict(), "plan": PlanInfo.of(self.setup).to_dict()}


class Context:
    """The model's name for the documents and a progress callback (told before each estimate
    that may need a new trace)."""

    def __init__(self, name: str, progress: Progress = _quiet) -> None:
        self.name = name
        self.progress = progress
        self.count = 0

    def memory(self, setup: TrainingSetup) -> MemoryEstimate:
        self.count += 1
        self.progress(f"estimate {self.count}: {setup.describe()}")
        return memory_of(setup)

    def max_batch(self, setup: TrainingSetup, gpu: GPU, limit: int) -> int:
        self.progress(f"searching the largest batch for {setup.describe()}")
        return max_batch_size(setup, gpu.memory_bytes, limit=limit)

    def header(self, command: str, setup: TrainingSetup) -> Header:
        return Header(command, ModelInfo.of(self.name, setup), setup)


def full_finetune(setup: TrainingSetup) -> TrainingSetup:
    """The same step training every parameter, without LoRA, of an unquantized base."""
    return setup.replace(plan=FreezePlan.none(), lora=None, quantization=None, prepare_kbit=None)


# -- alternatives for a run that does not fit -----------------------------------------------
@dataclass(frozen=True)
class Change:
    """One alternative run: the command-line flags that make it, and its setup.

    ``kind`` names the change (one of :data:`CHANGE_KINDS`, joined by ``+`` when combined)."""

    label: str
    kind: str
    setup: TrainingSetup


@dataclass(frozen=True)
class Alternative:
    """An alternative, estimated: its peak, what it needs, whether it fits and its speed."""

    change: str
    kind: str
    setup: TrainingSetup
    estimate: MemoryEstimate
    fits: bool
    margin_bytes: int
    step_seconds: float | None
    time_per_token_ratio: float | None
    communication_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "change": self.change, "kind": self.kind, "plan": PlanInfo.of(self.setup).text,
            "settings": self.setup.to_dict(), "peak_bytes": self.estimate.peak_bytes,
            "reserved_bytes": self.estimate.reserved_bytes,
            "required_bytes": self.estimate.required_bytes(), "fits": self.fits,
            "margin_bytes": self.margin_bytes, "step_seconds": self.step_seconds,
            "time_per_token_ratio": self.time_per_token_ratio,
            "exposed_communication_seconds": self.communication_seconds,
        }


CHANGE_KINDS = ("checkpointing", "batch", "optimizer", "freeze", "lora", "qlora", "sharding")
"""The single changes the alternatives try (combined with checkpointing when none fits)."""

SHARDING_ALTERNATIVES = ("zero3", "fsdp")
"""Strategies tried, as asked, for a one-GPU run that does not fit: the fewest GPUs each needs
(ZeRO-3 first: its trace is shared by every GPU count, and its count is where FSDP's search
starts; FSDP keeps fp32 parameter and gradient shards where ZeRO-3 keeps 16-bit ones beside its
fp32 master, so with fp32 parameters (the mixed precisions) FSDP is not tried on fewer GPUs
than ZeRO-3 needs: each FSDP2 count is a trace of its own)."""

GPU_COUNTS = (2, 4, 8, 16, 32, 64)
"""GPU counts the sharding alternatives search (memory per GPU falls as the count grows)."""


def _deeper_plans(setup: TrainingSetup) -> list[FreezePlan]:
    """LP-LoRA and ``except-last:N`` plans that train fewer parameters than ``setup``."""
    s = setup.scan
    try:
        layers = s.num_layers
    except StructureError:
        return []
    now = s.numel(setup.trainable)
    candidates = [FreezePlan.lp_lora()] + [
        FreezePlan.except_last(n) for n in sorted({max(1, layers // 4), max(1, layers // 8)},
                                                  reverse=True)
    ]
    plan = setup.plan or FreezePlan.none()
    return [p for p in candidates if p != plan and p.resolve(s).trainable_params < now]


def _single_changes(setup: TrainingSetup) -> list[Change]:
    """One-step changes, least disruptive to the training first (the batch is searched later).

    Order: checkpointing recomputes (same maths, more time); 8-bit AdamW approximates the
    optimizer states; a deeper freeze trains fewer weights; LoRA trains adapters instead, on the
    base loaded in bf16 as peft users load it (fp32 adapters, as peft upcasts them); QLoRA
    trains them on an NF4 base (:data:`ALTERNATIVE_QUANTIZATION`). Under a data-parallel
    strategy neither base is modelled yet: LoRA is tried on the base as it is, QLoRA not at all.
    """
    out = []
    if not setup.gradient_checkpointing:
        out.append(Change("--gradient-checkpointing", "checkpointing",
                          setup.replace(gradient_checkpointing=True)))
    if setup.optimizer not in ("adamw-8bit", "sgd"):
        out.append(Change("--optimizer adamw-8bit", "optimizer",
                          setup.replace(optimizer="adamw-8bit")))
    if setup.lora is None:
        for deeper in _deeper_plans(setup):
            out.append(Change(f"--plan {deeper}", "freeze", setup.replace(plan=deeper)))
        planned = setup.plan is not None and setup.plan != FreezePlan.none()
        instead = " (instead of --plan)" if planned else ""
        lora = setup.replace(plan=None, lora=ALTERNATIVE_LORA_RANK)
        one_gpu = setup.distributed is None
        # a base in fp32: load it in bf16 instead
        base16 = one_gpu and lora.loaded_dtype.itemsize > 2
        flag = " --base-dtype bf16" if base16 else ""
        out.append(Change(f"--lora-rank {ALTERNATIVE_LORA_RANK}{flag}{instead}", "lora",
                          lora.replace(base_dtype="bf16") if base16 else lora))
        if one_gpu:
            out.append(Change(f"--quantization nf4 --double-quant --lora-rank "
                              f"{ALTERNATIVE_LORA_RANK}{instead}", "qlora",
                              lora.replace(quantization=ALTERNATIVE_QUANTIZATION)))
    elif setup.quantization is None and setup.distributed is None and (
            setup.plan is None or not setup.trainable):
        out.append(Change("--quantization nf4 --double-quant", "qlora",
                          setup.replace(quantization=ALTERNATIVE_QUANTIZATION)))
    return out


def _step_time(setup: TrainingSetup, gpu: GPU) -> StepTime | None:
    """The step's time, or None for a multi-GPU setup on a GPU whose links are unknown (a
    hand-made ``GPU`` without NVLink or PCIe figures): its memory is still estimated."""
    if setup.num_gpus != 1 and (gpu.intra_node_bandwidth is None or gpu.pcie_bandwidth is None):
        return None
    return step_time_of(setup, gpu)


def _alternative(ctx: Context, change: Change, gpu: GPU, base_step: StepTime | None,
                 note: str = "") -> Alternative:
    e = ctx.memory(change.setup)
    step = _step_time(change.setup, gpu)
    slowdown = None
    if step is not None and base_step is not None:
        slowdown = base_step.tokens_per_second / step.tokens_per_second
    return Alternative(change.label + note, change.kind, change.setup, e,
                       e.fits(gpu.memory_bytes), gpu.memory_bytes - e.required_bytes(),
                       None if step is None else step.seconds, slowdown,
                       0.0 if step is None else step.exposed_communication_seconds)


def _smaller_batch(ctx: Context, change: Change, gpu: GPU, base_step: StepTime | None,
                   batch: int) -> Alternative | None:
    """``change`` at the largest batch below ``batch`` that fits (gradient accumulation keeps
    the effective batch); None when ``batch`` is 1."""
    if batch <= 1:
        return None
    best = ctx.max_batch(change.setup, gpu, limit=batch - 1)
    b = max(best, 1)
    label = f"{change.label} --batch-size {b}".strip()
    kind = f"{change.kind}+batch" if change.kind else "batch"
    smaller = Change(label, kind, change.setup.replace(batch_size=b))
    note = f" (x {math.ceil(batch / b)} accumulation)" if best else " (still too big)"
    return _alternative(ctx, smaller, gpu, base_step, note)


def _shardable(setup: TrainingSetup, strategy: str) -> bool:
    """Whether ``setup`` can run under ``strategy`` at all (a quantized base that FSDP or
    ZeRO-3 cannot shard, such as int8, is refused by the setup)."""
    try:
        setup.replace(distributed=strategy, num_gpus=2)
    except EstimateError:
        return False
    return True


def _fewest_gpus(ctx: Context, setup: TrainingSetup, gpu: GPU, strategy: str,
                 base_step: StepTime | None, start: int = 8,
                 go_down: bool = True) -> Alternative | None:
    """``setup`` sharded with ``strategy`` on the fewest of :data:`GPU_COUNTS` GPUs that fit
    (searched from ``start`` down or up: memory per GPU falls as the count grows; not down
    without ``go_down``), or on the most tried when none does."""

    def at(count: int) -> Alternative:
        sharded = setup.replace(distributed=strategy, num_gpus=count)
        label = f"--distributed {strategy} --num-gpus {count}"
        return _alternative(ctx, Change(label, "sharding", sharded), gpu, base_step)

    first = GPU_COUNTS.index(start) if start in GPU_COUNTS else GPU_COUNTS.index(8)
    best = at(GPU_COUNTS[first])
    if best.fits:
        for count in reversed(GPU_COUNTS[:first] if go_down else ()):
            fewer = at(count)
            if not fewer.fits:
                break
            best = fewer
        return best
    for count in GPU_COUNTS[first + 1:]:
        best = at(count)
        if best.fits:
            break
    return best


def suggestions(ctx: Context, setup: TrainingSetup, gpu: GPU) -> list[Alternative]:
    """Alternatives for a run that does not fit on ``gpu``, each estimated, not guessed.

    Single changes first (checkpointing, a smaller batch with gradient accumulation, 8-bit
    AdamW, deeper freezes, LoRA: least change to the training first); if none fits, gradient
    checkpointing combined with each other change; if still none fits, checkpointing, the
    last change and 8-bit AdamW at once. A run on one GPU is also tried sharded
    (:data:`SHARDING_ALTERNATIVES`) on the fewest GPUs that fit, with a strategy that can
    shard its base (:func:`_shardable`: not an int8 base under FSDP or ZeRO-3, say). Those
    that fit are listed first, order kept.
    """
    base_step = step_time_of(setup, gpu)
    singles = _single_changes(setup)
    found = [_alternative(ctx, c, gpu, base_step) for c in singles]
    batch = _smaller_batch(ctx, Change("", "", setup), gpu, base_step, setup.batch_size)
    if batch:  # right after checkpointing: the same training, in more steps
        found.insert(0 if setup.gradient_checkpointing else 1, batch)
    if not any(a.fits for a in found) and not setup.gradient_checkpointing:
        ckpt, others = singles[0], singles[1:]
        combos = [Change(f"{ckpt.label} {c.label}", f"checkpointing+{c.kind}",
                         c.setup.replace(gradient_checkpointing=True)) for c in others]
        found += [_alternative(ctx, c, gpu, base_step) for c in combos]
        batch = _smaller_batch(ctx, ckpt, gpu, base_step, setup.batch_size)
        found += [batch] if batch else []
        last = combos[-1] if combos else None  # LoRA (or the deepest freeze) + checkpointing
        if not any(a.fits for a in found) and last and last.setup.optimizer != "adamw-8bit":
            everything = Change(f"{last.label} --optimizer adamw-8bit", f"{last.kind}+optimizer",
                                last.setup.replace(optimizer="adamw-8bit"))
            found.append(_alternative(ctx, everything, gpu, base_step))
            batch = _smaller_batch(ctx, everything, gpu, base_step, setup.batch_size)
            found += [batch] if batch else []
    if setup.distributed is None and not setup.inference:
        start, go_down = 8, True
        for strategy in SHARDING_ALTERNATIVES:
            if not _shardable(setup, strategy):
                continue
            sharded = _fewest_gpus(ctx, setup, gpu, strategy, base_step, start, go_down)
            found += [sharded] if sharded else []
            needs = sharded.setup.num_gpus or 1 if sharded else 0
            if sharded and sharded.fits:
                start = needs
                # with fp32 parameters FSDP holds at least ZeRO-3's states per GPU
                go_down = setup.precision_info.param_dtype != torch.float32
            if needs > 8 and not setup.gradient_checkpointing:
                recompute = setup.replace(gradient_checkpointing=True)
                fewer = _fewest_gpus(ctx, recompute, gpu, strategy, base_step)
                if fewer and (fewer.setup.num_gpus or 1) < needs:
                    found.append(dataclasses.replace(
                        fewer, change="--gradient-checkpointing " + fewer.change,
                        kind="checkpointing+sharding"))
    return sorted(found, key=lambda a: not a.fits)


# -- documents ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EstimateDocument:
    """``layerscope estimate``: the plan next to full fine-tuning, the verdict, what to change."""

    header: Header
    estimate: MemoryEstimate
    full_finetune: MemoryEstimate
    gpu: GPU | None
    verdict: Verdict | None
    suggestions: tuple[Alternative, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.header.to_dict(),
            "estimate": estimate_dict(self.estimate),
            "full_finetune": estimate_dict(self.full_finetune),
            "gpu": None if self.gpu is None else gpu_dict(self.gpu),
            "assumptions": assumptions_dict(),
            "verdict": None if self.verdict is None else self.verdict.to_dict(),
            "suggestions": [a.to_dict() for a in self.suggestions],
            "fits_on": fits_on(self.estimate),
        }


def estimate_document(ctx: Context, setup: TrainingSetup, gpu: GPU | None) -> EstimateDocument:
    e = ctx.memory(setup)
    full = ctx.memory(full_finetune(setup))
    verdict: Verdict | None = None
    found: tuple[Alternative, ...] = ()
    if gpu is not None:
        if e.fits(gpu.memory_bytes):
            verdict = Verdict.of(e, gpu, ctx.max_batch(setup, gpu, MAX_BATCH_LIMIT))
        else:
            verdict = Verdict.of(e, gpu, 0 if setup.batch_size == 1 else None)
            found = tuple(suggestions(ctx, setup, gpu))
    return EstimateDocument(ctx.header("estimate", setup), e, full, gpu, verdict, found)


@dataclass(frozen=True)
class Training:
    """A run's step and cost on ``num_gpus`` data-parallel GPUs.

    ``lengths``: over real data lengths, each batching strategy (the cost is then the padded
    strategy's); ``low_seconds``/``high_seconds``: the run's likely range.
    """

    step: StepTime
    cost: RunCost
    gpu: str
    lengths: Mapping[str, StrategyTime] | None = None

    @property
    def low_seconds(self) -> float:
        if self.lengths is not None:
            return self.lengths["padded"].low_seconds
        return self.cost.total_steps * self.step.low_seconds

    @property
    def high_seconds(self) -> float:
        if self.lengths is not None:
            return self.lengths["padded"].high_seconds
        return self.cost.total_steps * self.step.high_seconds

    def to_dict(self) -> dict[str, Any]:
        c = self.cost
        return {
            "samples": c.num_samples, "epochs": c.epochs, "num_gpus": c.num_gpus, "gpu": self.gpu,
            "steps_per_epoch": c.steps_per_epoch, "total_steps": c.total_steps,
            "total_seconds": c.total_seconds, "low_seconds": self.low_seconds,
            "high_seconds": self.high_seconds, "gpu_hours": c.gpu_hours,
            "price_per_hour": c.price_per_hour, "cost": c.cost,
            "tokens_per_second": self.step.tokens_per_second * c.num_gpus,
            "step": step_dict(self.step),
            "lengths": None if self.lengths is None else lengths_dict(self.lengths),
        }


def training(setup: TrainingSetup, gpu: GPU, samples: int, epochs: int, num_gpus: int,
             seq_lens: Sequence[int] | None = None,
             memory: Callable[[TrainingSetup], MemoryEstimate] | None = None) -> Training:
    """Steps, time, GPU-hours and cost of ``epochs`` over ``samples`` (price: ``gpu``'s).

    ``seq_lens``: the examples' token counts (``samples`` of them); the run is then timed
    padded, length-grouped and packed (:mod:`layerscope.estimate.lengths`), with ``memory``
    estimating each strategy's longest batch."""
    step = step_time_of(setup, gpu)
    if seq_lens is None:  # a step: gradient_accumulation_steps micro-batches on each GPU
        cost = run_cost(step.seconds, samples, setup.batch_size * setup.gradient_accumulation_steps,
                        epochs, num_gpus=num_gpus,
                        price_per_hour=gpu.price_per_hour)
        return Training(step, cost, gpu.name)
    timer = step_timer(setup, gpu)

    def times(length: int, masked: bool) -> tuple[float, float, float]:
        return micro_batch_seconds(timer.at(setup.batch_size, length, padded=masked), setup)

    def longest(length: int) -> tuple[int, int]:
        e = (memory or memory_of)(setup.replace(seq_len=length))
        return e.peak_bytes, e.required_bytes()

    runs = run_times(seq_lens, setup.batch_size, setup.seq_len, epochs, times, num_gpus,
                     longest)
    padded = runs["padded"]
    steps = setup.gradient_accumulation_steps  # micro-batches per optimizer step
    per_step = steps * padded.seconds / (padded.batching.steps * epochs) if epochs else 0.0
    cost = run_cost(per_step, samples, setup.batch_size * steps, epochs, num_gpus=num_gpus,
                    price_per_hour=gpu.price_per_hour)
    return Training(step, cost, gpu.name, runs)


@dataclass(frozen=True)
class TimeDocument:
    """``layerscope time``: how long and how much, and whether each GPU's batch fits."""

    header: Header
    gpu: GPU
    training: Training
    estimate: MemoryEstimate

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.header.to_dict(),
            "gpu": gpu_dict(self.gpu),
            "training": self.training.to_dict(),
            "estimate": estimate_dict(self.estimate),
            "assumptions": assumptions_dict(),
            "verdict": Verdict.of(self.estimate, self.gpu).to_dict(),
        }


def time_document(ctx: Context, setup: TrainingSetup, gpu: GPU, samples: int, epochs: int,
                  num_gpus: int, seq_lens: Sequence[int] | None = None) -> TimeDocument:
    run = training(setup, gpu, samples, epochs, num_gpus, seq_lens, ctx.memory)
    return TimeDocument(ctx.header("time", setup), gpu, run, ctx.memory(setup))


@dataclass(frozen=True)
class FitDocument:
    """``layerscope fit``: the largest batch that fits, the step at it and one above it."""

    header: Header
    gpu: GPU
    max_batch_size: int
    at_max: MemoryEstimate | None
    above_max: MemoryEstimate | None
    step: StepTime | None
    suggestions: tuple[Alternative, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.header.to_dict(),
            "gpu": gpu_dict(self.gpu),
            "assumptions": assumptions_dict(),
            "max_batch_size": self.max_batch_size,
            "at_max": None if self.at_max is None else estimate_dict(self.at_max),
            "above_max": None if self.above_max is None else estimate_dict(self.above_max),
            "step": step_dict(self.step),
            "suggestions": [a.to_dict() for a in self.suggestions],
        }


def fit_document(ctx: Context, setup: TrainingSetup, gpu: GPU) -> FitDocument:
    best = ctx.max_batch(setup, gpu, MAX_BATCH_LIMIT)
    at = above = step = None
    found: tuple[Alternative, ...] = ()
    if best:
        at_setup = setup.replace(batch_size=best)
        at, step = ctx.memory(at_setup), step_time_of(at_setup, gpu)
    if best < MAX_BATCH_LIMIT:
        above = ctx.memory(setup.replace(batch_size=best + 1))
    if not best:
        found = tuple(suggestions(ctx, setup.replace(batch_size=1), gpu))
    return FitDocument(ctx.header("fit", setup), gpu, best, at, above, step, found)


def tried_dict(t: Tried) -> dict[str, Any]:
    """One setting the GPU search tried: its flags, whether it fits, what it needs."""
    return {"change": t.label, "distributed": t.setup.distributed, "num_gpus": t.setup.num_gpus,
            "offload": t.setup.offload, "gradient_checkpointing": t.setup.gradient_checkpointing,
            "fits": t.fits, "estimated": t.memory is not None,
            "required_bytes": t.required_bytes,
            "step_seconds": None if t.step is None else t.step.seconds}


def choice_dict(c: GpuChoice) -> dict[str, Any]:
    """A GPU type's answer: the setting chosen (None when nothing fits), why, its per-GPU
    memory, its step, throughput of all its GPUs, cost, and what else was tried."""
    chosen = c.chosen
    run = c.run
    return {
        "gpu": gpu_dict(c.gpu),
        "fits": chosen is not None,
        "num_gpus": c.num_gpus,
        "change": None if chosen is None else chosen.label,
        "settings": None if chosen is None else chosen.setup.to_dict(),
        "reason": c.reason,
        "estimate": None if chosen is None or chosen.memory is None
        else estimate_dict(chosen.memory),
        "step": None if chosen is None else step_dict(chosen.step),
        "tokens_per_second": c.tokens_per_second,
        "cost_per_million_tokens": c.cost_per_million_tokens,
        "run": None if run is None else {
            "samples": run.num_samples, "epochs": run.epochs, "steps_per_epoch": run.steps_per_epoch,
            "total_steps": run.total_steps, "total_seconds": run.total_seconds,
            "gpu_hours": run.gpu_hours, "price_per_hour": run.price_per_hour, "cost": run.cost},
        "closest_below": None if c.fewer is None else tried_dict(c.fewer),
        "tried": [tried_dict(t) for t in c.tried],
    }


@dataclass(frozen=True)
class GpusDocument:
    """``layerscope gpus``: for every GPU type, the fewest GPUs and the setting that fit,
    cheapest first."""

    header: Header
    choices: tuple[GpuChoice, ...]
    samples: int | None
    epochs: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.header.to_dict(),
            "assumptions": {**assumptions_dict(), "gpu_counts": list(GPU_COUNTS_TRIED),
                            "strategies": list(STRATEGIES_TRIED),
                            "offloads": [list(o) for o in OFFLOADS_TRIED]},
            "run": None if self.samples is None else {"samples": self.samples,
                                                      "epochs": self.epochs},
            "gpus": [choice_dict(c) for c in self.choices],
        }


def gpus_document(ctx: Context, setup: TrainingSetup, samples: int | None, epochs: int | None,
                  fabric: str | None = None) -> GpusDocument:
    choices = choose_gpus(setup, num_samples=samples, num_epochs=epochs, fabric=fabric,
                          progress=ctx.progress)
    return GpusDocument(ctx.header("gpus", setup), choices, samples, epochs)


def structure(setup: TrainingSetup) -> list[dict[str, Any]]:
    """The model's parts in order (embeddings, each block, head, rest): parameters (each
    tensor counted once, where it first appears) and status under the setup (``lora`` for a
    block carrying adapters on a frozen base)."""
    sc = setup.scan
    trainable = setup.trainable
    lora_blocks: set[str] = set()
    if setup.lora is not None:
        lora_blocks = {p for p in sc.layers.blocks for t in setup.lora.targets
                       if t.startswith(p + ".")} if sc.primary is not None else set()
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
        flags = {n not in trainable for n in names}
        status = "frozen" if flags == {True} else "trainable" if flags == {False} else "partial"
        if label in lora_blocks and status == "frozen":
            status = "lora"
        tensors = {sc.by_name[n].tensor: sc.by_name[n].numel for n in names}
        params = sum(v for t, v in tensors.items() if t not in seen)
        tied = params == 0 and bool(tensors)
        seen |= set(tensors)
        parts.append({"name": label, "kind": kind, "params": params, "status": status,
                      "tied": tied})
    return parts


@dataclass(frozen=True)
class ReportDocument:
    """Everything the HTML report shows: the estimate document, the structure, memory against
    batch size for the setup and for full fine-tuning, and time and cost of both."""

    estimate: EstimateDocument
    structure: tuple[dict[str, Any], ...]
    batch_sizes: tuple[int, ...]
    plan_required: tuple[int, ...]
    full_required: tuple[int, ...]
    training_plan: Training | None
    training_full: Training
    capacity_lines: tuple[GPU, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        doc = self.estimate.to_dict()
        doc["command"] = "report"
        doc["structure"] = list(self.structure)
        doc["batch_sweep"] = {"batch_sizes": list(self.batch_sizes),
                              "plan_required_bytes": list(self.plan_required),
                              "full_finetune_required_bytes": list(self.full_required)}
        doc["training"] = {
            "plan": None if self.training_plan is None else self.training_plan.to_dict(),
            "full_finetune": self.training_full.to_dict(),
        }
        doc["capacity_lines"] = [{"gpu": g.name, "memory_bytes": g.memory_bytes}
                                 for g in self.capacity_lines]
        return doc


def report_document(ctx: Context, setup: TrainingSetup, gpu: GPU | None, samples: int,
                    epochs: int, num_gpus: int) -> ReportDocument:
    est = estimate_document(ctx, setup, gpu)
    full = full_finetune(setup)
    batches = tuple(sorted(set(SWEEP_BATCHES) | {setup.batch_size}))
    time_gpu = gpu or get_gpu(DEFAULT_TIME_GPU)
    lines = [get_gpu(n) for n in REPORT_GPUS]
    if gpu is not None and gpu not in lines:
        lines.append(gpu)
    return ReportDocument(
        estimate=dataclasses.replace(est, header=ctx.header("report", setup)),
        structure=tuple(structure(setup)),
        batch_sizes=batches,
        plan_required=tuple(ctx.memory(setup.replace(batch_size=b)).required_bytes()
                            for b in batches),
        full_required=tuple(ctx.memory(full.replace(batch_size=b)).required_bytes()
                            for b in batches),
        training_plan=None if setup.inference else training(setup, time_gpu, samples, epochs,
                                                             num_gpus),
        training_full=training(full.replace(inference=False), time_gpu, samples, epochs,
                               num_gpus),
        capacity_lines=tuple(lines),
    )
