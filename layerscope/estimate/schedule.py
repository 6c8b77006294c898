"""A gradual-unfreezing schedule, epoch by epoch: the plan, its memory and its time.

Each epoch of a :class:`~layerscope.plan.GradualSchedule` trains another set of blocks, so both
its peak memory and its step time change; the schedule fits a GPU only if its worst epoch does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from typing_extensions import Unpack

from layerscope.errors import EstimateError
from layerscope.estimate.hardware import GPU, get_gpu
from layerscope.estimate.memory import MemoryEstimate, memory_of
from layerscope.estimate.run import run_cost
from layerscope.estimate.time import StepTime, step_time_of
from layerscope.plan import FreezePlan, GradualSchedule
from layerscope.setup import StepSettings, make_setup


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


def estimate_unfreezing_schedule(
    unfreezer: Any,
    num_samples: int,
    batch_size: int,
    *,
    gpu: str | GPU = "h100-sxm",
    price_per_hour: float | None = None,
    **settings: Unpack[StepSettings],
) -> ScheduleEstimate:
    """Per-epoch plan, peak memory, step time and epoch time of a gradual-unfreezing schedule.

    Args:
        unfreezer: a :class:`~layerscope.GradualUnfreezer` (its ``model`` and ``schedule``).
        num_samples, batch_size: each epoch runs ``ceil(num_samples / (batch_size * num_gpus))``
            steps.
        **settings: the step, as for :func:`~layerscope.estimate.memory.estimate_memory`.
        gpu, price_per_hour: where it runs and what a GPU-hour costs (default the catalogue's
            price); ``num_gpus`` (a setting) is how many GPUs take a batch each.

    The model is not modified (the plans are resolved, not applied).

    Raises:
        EstimateError: not a GradualUnfreezer, or invalid settings.
    """
    schedule = getattr(unfreezer, "schedule", None)
    if not isinstance(schedule, GradualSchedule):
        raise EstimateError(f"expected a GradualUnfreezer, got {type(unfreezer).__name__}")
    device = get_gpu(gpu)
    base = make_setup(unfreezer.model, schedule.plan(schedule.total_epochs - 1),
                      batch_size=batch_size, **settings)
    num_gpus = base.num_gpus or 1
    price = device.price_per_hour if price_per_hour is None else price_per_hour
    epochs, costs = [], []
    for epoch in range(schedule.total_epochs):
        setup = base.replace(plan=schedule.plan(epoch))
        memory = memory_of(setup)
        step = step_time_of(setup, device)
        cost = run_cost(step.seconds, num_samples,
                        base.batch_size * base.gradient_accumulation_steps, 1, num_gpus=num_gpus,
                        price_per_hour=price)
        costs.append(cost)
        epochs.append(EpochEstimate(epoch, setup.plan or FreezePlan.none(),
                                    step.trainable_params, memory, step, cost.total_steps,
                                    cost.total_seconds))
    worst = max(epochs, key=lambda e: (e.memory.peak_bytes, -e.epoch))
    gpu_hours = sum(c.gpu_hours for c in costs)
    return ScheduleEstimate(
        tuple(epochs), worst.memory.peak_bytes, worst.epoch, sum(c.total_seconds for c in costs),
        num_gpus, gpu_hours, costs[0].price_per_hour,
        None if costs[0].price_per_hour is None else gpu_hours * costs[0].price_per_hour,
    )
