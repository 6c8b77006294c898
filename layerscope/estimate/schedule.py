"""A gradual-unfreezing schedule, epoch by epoch: the plan, its memory and its time.

Each epoch of a :class:`~layerscope.GradualUnfreezer` trains another set of blocks, so both its
peak memory and its step time change; the schedule fits a GPU only if its worst epoch does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from layerscope.errors import EstimateError
from layerscope.estimate.hardware import GPU, check_price, get_gpu
from layerscope.estimate.memory import MemoryEstimate, estimate_memory
from layerscope.estimate.settings import resolve_optimizer, resolve_precision
from layerscope.estimate.time import StepTime, estimate_step_time, steps_per_epoch
from layerscope.plan import FreezePlan


@dataclass(frozen=True)
class EpochEstimate:
    """One epoch of the schedule: its plan, peak memory and time."""

    epoch: int
    plan: FreezePlan
    trainable_params: int
    memory: MemoryEstimate
    step: StepTime
    steps: int
    seconds: float


@dataclass(frozen=True)
class ScheduleEstimate:
    """A whole schedule (data parallel: each of ``num_gpus`` GPUs takes ``batch_size`` samples
    per step). ``peak_bytes`` is the highest per-epoch peak, reached first in ``peak_epoch``."""

    epochs: tuple[EpochEstimate, ...]
    peak_bytes: int
    peak_epoch: int
    seconds: float
    num_gpus: int
    gpu_hours: float
    price_per_hour: float | None
    cost: float | None

    @property
    def slowest_epoch(self) -> EpochEstimate:
        return max(self.epochs, key=lambda e: e.seconds)


def _count(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EstimateError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def estimate_unfreezing_schedule(
    unfreezer: Any,
    num_samples: int,
    batch_size: int,
    *,
    seq_len: int = 2048,
    gpu: str | GPU = "h100-sxm",
    precision: str = "bf16-mixed",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    num_gpus: int = 1,
    price_per_hour: float | None = None,
) -> ScheduleEstimate:
    """Per-epoch plan, peak memory, step time and epoch time of a gradual-unfreezing schedule.

    Epoch ``e`` runs ``unfreezer.plan(e)`` for ``ceil(num_samples / (batch_size * num_gpus))``
    steps. The model is not modified (the plans are resolved, not applied).

    Raises:
        EstimateError: not a GradualUnfreezer, or invalid settings.
    """
    from layerscope.layer_utils import GradualUnfreezer

    if not isinstance(unfreezer, GradualUnfreezer):
        raise EstimateError(f"expected a GradualUnfreezer, got {type(unfreezer).__name__}")
    _count(num_samples, "num_samples", 0)
    _count(num_gpus, "num_gpus", 1)
    device = get_gpu(gpu)
    price = check_price(price_per_hour) if price_per_hour is not None else device.price_per_hour
    settings = dict(
        batch_size=batch_size, seq_len=seq_len, precision=resolve_precision(precision).name,
        optimizer=resolve_optimizer(optimizer), gradient_checkpointing=gradient_checkpointing,
    )
    steps = steps_per_epoch(num_samples, _count(batch_size, "batch_size", 1), num_gpus)
    epochs = []
    for epoch in range(unfreezer.total_epochs):
        plan = unfreezer.plan(epoch)
        memory = estimate_memory(unfreezer.model, plan, **settings)
        step = estimate_step_time(unfreezer.model, plan, gpu=device, **settings)
        epochs.append(EpochEstimate(epoch, plan, step.trainable_params, memory, step, steps,
                                    steps * step.seconds))
    worst = max(epochs, key=lambda e: (e.memory.peak_bytes, -e.epoch))
    seconds = sum(e.seconds for e in epochs)
    gpu_hours = seconds / 3600 * num_gpus
    return ScheduleEstimate(
        tuple(epochs), worst.memory.peak_bytes, worst.epoch, seconds, num_gpus, gpu_hours, price,
        None if price is None else gpu_hours * price,
    )
