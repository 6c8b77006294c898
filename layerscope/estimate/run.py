"""The cost of a whole run, defined once: steps, wall time, GPU-hours and price.

Used by ``estimate_training_time``, the ``time`` command, the report and unfreezing schedules.
Data parallel: each of ``num_gpus`` GPUs takes ``batch_size`` samples per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from layerscope.checks import finite, whole
from layerscope.errors import EstimateError
from layerscope.estimate.hardware import check_price


@dataclass(frozen=True)
class RunCost:
    """Steps, time and money of ``epochs`` passes over ``num_samples`` samples.

    Attributes:
        steps_per_epoch: ``ceil(num_samples / (batch_size * num_gpus))``.
        total_steps: ``steps_per_epoch * epochs``.
        step_seconds: one optimizer step.
        total_seconds: ``total_steps * step_seconds`` (wall time).
        gpu_hours: ``total_seconds / 3600 * num_gpus``.
        price_per_hour: USD per GPU-hour, or None when unknown.
        cost: ``gpu_hours * price_per_hour``, or None.
    """

    num_samples: int
    batch_size: int
    epochs: int
    num_gpus: int
    steps_per_epoch: int
    total_steps: int
    step_seconds: float
    total_seconds: float
    gpu_hours: float
    price_per_hour: float | None
    cost: float | None


def _count(value: object, name: str, minimum: int) -> int:
    return whole(value, name, EstimateError, minimum=minimum)


def run_cost(
    step_seconds: float,
    num_samples: int,
    batch_size: int,
    epochs: int,
    *,
    num_gpus: int = 1,
    price_per_hour: float | None = None,
) -> RunCost:
    """The cost of ``epochs`` passes over ``num_samples`` at ``step_seconds`` per step.

    Raises:
        EstimateError: a count below its minimum (samples and epochs >= 0, batch and GPUs >= 1),
            a negative or infinite step time or price.
    """
    _count(num_samples, "num_samples", 0)
    _count(batch_size, "batch_size", 1)
    _count(epochs, "num_epochs", 0)
    _count(num_gpus, "num_gpus", 1)
    finite(step_seconds, "step time (seconds)", EstimateError)
    price = check_price(price_per_hour)
    per_epoch = math.ceil(num_samples / (batch_size * num_gpus))
    steps = per_epoch * epochs
    seconds = steps * float(step_seconds)
    gpu_hours = seconds / 3600.0 * num_gpus
    return RunCost(
        num_samples=num_samples, batch_size=batch_size, epochs=epochs, num_gpus=num_gpus,
        steps_per_epoch=per_epoch, total_steps=steps, step_seconds=float(step_seconds),
        total_seconds=seconds, gpu_hours=gpu_hours, price_per_hour=price,
        cost=None if price is None else gpu_hours * price,
    )
