"""Which GPU, how many, with which sharding: the fewest GPUs of each catalogue type that fit a
run, the strategy that does it fastest, and what the run costs on them.

For one GPU type the search is a short, fixed ladder (:data:`GPU_COUNTS`):

1. one GPU as the run is asked (and with gradient checkpointing, unless it already has it);
2. then, for each count 2, 4, ... 64, every strategy of :data:`STRATEGIES` (DeepSpeed ZeRO-2,
   FSDP, ZeRO-3), each without and with gradient checkpointing;
3. only when nothing of the above fits on 64 GPUs, the same counts (1 included) with the
   offloads of :data:`OFFLOADS` (the optimizer, then the parameters, to CPU memory).

The first count where something fits is the answer for that GPU type; of the settings that fit
there, the fastest step wins (ties: the order above: least sharding, no recomputation, no
offload first). DDP is never the answer: it keeps a full replica on every GPU, so it fits only
where one GPU already does, and one GPU is fewer.

Whether a setting fits is the rule every command uses (:meth:`~layerscope.estimate.memory.
MemoryEstimate.fits`: the caching allocator's reserved memory plus the CUDA context, against
the GPU's memory). Memory does not depend on the GPU type, so each setting is estimated once
for every type (and DeepSpeed's and FSDP1's traces are shared by every GPU count,
:mod:`layerscope.estimate.distributed`); only step times are per type. GPU types are ranked
cheapest first: by the run's cost when a run size is given, else by the cost of a million
tokens; types without a price after those with one, by throughput; types where nothing fits
last.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from typing_extensions import Unpack

from layerscope.checks import whole
from layerscope.errors import EstimateError, StructureError
from layerscope.estimate.distributed import (
    packed_weights,
    quant_state_sizes,
    stored_sizes,
    trace_dtypes,
)
from layerscope.estimate.hardware import GPU, get_gpu, gpus
from layerscope.estimate.memory import CUDA_CONTEXT_BYTES, MemoryEstimate, memory_of
from layerscope.estimate.run import RunCost, run_cost
from layerscope.estimate.sharding import SINGLE_GPU
from layerscope.estimate.states import rank_states, scan_tensors
from layerscope.estimate.time import StepTime, step_time_of
from layerscope.plan import FreezePlan
from layerscope.setup import Settings, TrainingSetup, make_setup
from layerscope.units import dtype_bytes

GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
"""GPU counts tried, fewest first (powers of two: one node of 8, then whole nodes)."""

STRATEGIES = ("zero2", "fsdp", "zero3")
"""Strategies tried on more than one GPU, least sharding first: ZeRO-2 shards gradients and
optimizer states; FSDP and ZeRO-3 the parameters too."""

OFFLOADS = (("zero3", "optimizer"), ("zero3", "params"), ("fsdp", "params"))
"""(strategy, offload) tried when nothing else fits on :data:`GPU_COUNTS`'s largest count."""


@dataclass(frozen=True)
class Tried:
    """One setting estimated for a GPU type.

    Attributes:
        label: the command-line flags that make it (``--distributed zero3 --num-gpus 8``).
        setup: the setup.
        memory: its per-GPU memory (the busiest GPU); None when it was not estimated because
            it cannot fit: its persistent states alone exceed the GPU, or the same setting
            with gradient checkpointing does not fit (checkpointing never needs more).
        fits: whether it fits on the GPU type.
        step: its step time on the GPU type (estimated for the settings that fit at the chosen
            count only; None otherwise).
    """

    label: str
    setup: TrainingSetup
    memory: MemoryEstimate | None
    fits: bool
    step: StepTime | None = None
    at_least_bytes: int = 0

    @property
    def required_bytes(self) -> int:
        """GPU memory it needs (:meth:`MemoryEstimate.required_bytes`); when not estimated, a
        lower bound (what rules it out)."""
        return self.memory.required_bytes() if self.memory is not None else self.at_least_bytes


@dataclass(frozen=True)
class GpuChoice:
    """The fewest GPUs of one type that fit the run, and how.

    Attributes:
        gpu: the GPU type.
        chosen: the setting chosen (None: nothing tried fits on up to 64 GPUs).
        tried: every setting tried at the chosen count (or, when nothing fits, at the largest
            count), in the order of the search.
        fewer: the setting that came closest at the count below the chosen one (the least
            memory needed), None when the chosen count is 1.
        run: the run's steps, time and cost on ``chosen`` (None without a run size).
        reason: why this setting, in words.
    """

    gpu: GPU
    chosen: Tried | None
    tried: tuple[Tried, ...]
    fewer: Tried | None
    run: RunCost | None
    reason: str

    @property
    def num_gpus(self) -> int | None:
        return None if self.chosen is None else _count(self.chosen.setup)

    @property
    def tokens_per_second(self) -> float | None:
        """Tokens per second of all its GPUs together."""
        if self.chosen is None or self.chosen.step is None:
            return None
        return self.chosen.step.tokens_per_second * _count(self.chosen.setup)

    @property
    def cost_per_million_tokens(self) -> float | None:
        """USD for a million training tokens (None without a price or a fit)."""
        tps = self.tokens_per_second
        price = self.gpu.price_per_hour
        if tps is None or price is None or self.num_gpus is None or not tps:
            return None
        return price * self.num_gpus / 3600.0 / tps * 1e6


def _count(setup: TrainingSetup) -> int:
    return setup.num_gpus or 1


def _label(setup: TrainingSetup, base: TrainingSetup) -> str:
    parts = []
    if setup.distributed is not None:
        parts.append(f"--distributed {setup.distributed} --num-gpus {setup.num_gpus}")
    if setup.offload:
        parts.append(f"--offload {setup.offload}")
    if setup.gradient_checkpointing and not base.gradient_checkpointing:
        parts.append("--gradient-checkpointing")
    return " ".join(parts) or "(as asked, one GPU)"


def candidates(setup: TrainingSetup, count: int,
               offload: bool) -> list[tuple[TrainingSetup, TrainingSetup | None]]:
    """The settings tried on ``count`` GPUs, in the order of the search (see the module), each
    as ``(without checkpointing, with it)``; the first is None when ``setup`` already
    checkpoints."""
    one = setup.replace(distributed=None)
    if offload:
        plain = [one.replace(distributed=strategy, num_gpus=count, offload=what)
                 for strategy, what in OFFLOADS if _allows(one, strategy)]
    elif count == 1:
        plain = [one]
    else:
        plain = [one.replace(distributed=strategy, num_gpus=count) for strategy in STRATEGIES
                 if _allows(one, strategy)]
    if setup.gradient_checkpointing:
        return [(s, None) for s in plain]
    return [(s, s.replace(gradient_checkpointing=True)) for s in plain]


def _allows(setup: TrainingSetup, strategy: str) -> bool:
    """Whether ``setup``'s base can run under ``strategy`` (FSDP and ZeRO-3 refuse an int8
    base, a 4-bit storage other than the base's dtype, ``prepare_kbit=True``: see
    :class:`~layerscope.setup.TrainingSetup`)."""
    try:
        setup.replace(distributed=strategy, num_gpus=2)
    except EstimateError:
        return False
    return True


def choose_gpus(model: Any, plan: FreezePlan | None = None, *,
                gpu_types: Sequence[str | GPU] | None = None, num_samples: int | None = None,
                num_epochs: int | None = None, fabric: str | None = None,
                progress: Callable[[str], None] | None = None,
                **settings: Unpack[Settings]) -> tuple[GpuChoice, ...]:
    """For each GPU type, the fewest GPUs and the setting that fit the run (see the module's
    docstring), cheapest first.

    Args:
        model: a model, a model source or a :class:`~layerscope.setup.TrainingSetup`.
        plan, **settings: the run, as for :func:`~layerscope.estimate.memory.estimate_memory`
            (``batch_size`` is per GPU). The strategy, GPU count and offload are what the
            search chooses: give none of them (``gpus_per_node`` and a ``sharding``'s knobs,
            such as ZeRO's bucket sizes, are kept).
        gpu_types: catalogue names or ``GPU`` values (None: every catalogue GPU).
        num_samples, num_epochs: the run's size, for wall time and cost (both or neither).
        fabric: the network between nodes for every GPU type (None: each type's own).
        progress: told before each new estimate.

    Raises:
        EstimateError: a strategy, GPU count or offload given; a run size given by half; an
            unknown GPU or fabric; an inference setup.
    """
    if gpu_types is not None and (isinstance(gpu_types, (str, bytes))
                                  or not isinstance(gpu_types, (list, tuple))):
        raise EstimateError(f"gpu_types must be a list of GPU names or GPUs, or None; got "
                            f"{gpu_types!r}"[:300])
    types = [get_gpu(g).with_fabric(fabric) for g in (gpus() if gpu_types is None else gpu_types)]
    if not types:
        raise EstimateError("gpu_types is empty; give at least one GPU (or None for all)")
    if progress is not None and not callable(progress):
        raise EstimateError(f"progress must be a callable or None, got {progress!r}"[:300])
    if (num_samples is None) != (num_epochs is None):
        raise EstimateError("give num_samples and num_epochs together (the run's size), or "
                            f"neither; got num_samples={num_samples!r}, "
                            f"num_epochs={num_epochs!r}"[:300])
    given = [f"{k}={settings.get(k)!r}" for k in ("distributed", "num_gpus", "offload")
             if settings.get(k) is not None]
    if given:
        raise EstimateError(f"choose_gpus searches the strategy, GPU count and offload; do not "
                            f"give them (got {', '.join(given)})"[:300])
    setup = make_setup(model, plan, **settings)
    if setup.distributed is not None or setup.offload is not None:
        raise EstimateError(f"choose_gpus searches the strategy, GPU count and offload; the "
                            f"setup already has {setup.sharding.describe() if setup.sharding else ''}")
    if setup.inference:
        raise EstimateError("choose_gpus sizes a training run; inference=True has none")
    if num_samples is not None:  # validated once, before minutes of work (as the CLI: >= 1)
        whole(num_samples, "num_samples", EstimateError, minimum=1)
        whole(num_epochs, "num_epochs", EstimateError, minimum=1)
        run_cost(0.0, num_samples, setup.batch_size, num_epochs or 0)
    search = _Search(setup, progress or (lambda _: None))
    choices = []
    for gpu in types:
        search.tell(f"searching {gpu.name}")
        choices.append(_choose(search, gpu, num_samples, num_epochs))
    return tuple(sorted(choices, key=_rank))


class _Search:
    """The settings and their memory, made and estimated once for every GPU type (``memory``,
    ``floor`` and ``timer`` are the estimators; tests replace them)."""

    def __init__(self, setup: TrainingSetup, tell: Callable[[str], None],
                 memory: Callable[[TrainingSetup], MemoryEstimate] = memory_of,
                 floor: Callable[[TrainingSetup], int] | None = None,
                 timer: Callable[[TrainingSetup, GPU], StepTime] = step_time_of) -> None:
        self.setup, self.tell = setup, tell
        self.estimator, self.timer = memory, timer
        self.lower = floor or (lambda s: persistent_bytes(s) + CUDA_CONTEXT_BYTES)
        self.settings: dict[tuple[int, bool], list[tuple[TrainingSetup, TrainingSetup | None]]] = {}
        self.memory: dict[TrainingSetup, MemoryEstimate] = {}
        self.floors: dict[TrainingSetup, int] = {}

    def floor(self, s: TrainingSetup) -> int:
        """GPU memory ``s`` needs at least: its persistent states and the CUDA context."""
        if s not in self.floors:
            self.floors[s] = self.lower(s)
        return self.floors[s]

    def one(self, s: TrainingSetup, gpu: GPU) -> Tried:
        """``s`` on ``gpu``: estimated, unless its persistent states alone rule it out."""
        floor = self.floor(s)
        if floor > gpu.memory_bytes:
            return Tried(_label(s, self.setup), s, None, False, at_least_bytes=floor)
        if s not in self.memory:
            self.tell(f"memory of {_label(s, self.setup)}")
            self.memory[s] = self.estimator(s)
        e = self.memory[s]
        return Tried(_label(s, self.setup), s, e, e.fits(gpu.memory_bytes))

    def tried(self, gpu: GPU, count: int, offload: bool) -> list[Tried]:
        """Every setting at ``count`` on ``gpu``, in order. Checkpointing never raises memory,
        so a setting that does not fit with it is not estimated without it (it needs at
        least what the checkpointed one needs)."""
        if (count, offload) not in self.settings:
            self.settings[count, offload] = candidates(self.setup, count, offload)
        out = []
        for plain, recompute in self.settings[count, offload]:
            if recompute is None:
                out.append(self.one(plain, gpu))
                continue
            r = self.one(recompute, gpu)
            p = self.one(plain, gpu) if r.fits else Tried(
                _label(plain, self.setup), plain, None, False,
                at_least_bytes=max(r.required_bytes, self.floor(plain)))
            out += [p, r]
        return out


def persistent_bytes(setup: TrainingSetup) -> int:
    """What the busiest GPU of ``setup`` keeps for the whole step, computed from the scan as
    the memory estimate computes it from the trace (weights or shards, fp32 master weights,
    optimizer states, kept buffers: :attr:`~layerscope.estimate.states.RankStates.
    persistent`): a lower bound of its peak, known without tracing the step."""
    sharding = setup.sharding or SINGLE_GPU
    prec = setup.precision_info
    param_dtype, autocast_dtype = trace_dtypes(prec, sharding)
    deepspeed = sharding.stage > 0
    sizes = stored_sizes(setup, deepspeed, param_dtype)
    try:
        blocks = setup.scan.num_layers
    except StructureError:
        blocks = 0
    params = scan_tensors(setup.scan, setup.trainable, setup.lora, itemsize=sizes.trainable,
                          adapter_itemsize=sizes.adapter, packed=packed_weights(setup),
                          frozen_itemsize=sizes.frozen)
    if blocks == 0:
        params = [dataclasses.replace(p, block=None) for p in params]
    states = rank_states(params, num_blocks=blocks, sharding=sharding, optimizer=setup.optimizer,
                         compute_itemsize=int(dtype_bytes(autocast_dtype or param_dtype)),
                         inference=setup.inference,
                         gradient_checkpointing=setup.gradient_checkpointing)
    return states.persistent + sum(quant_state_sizes(setup))


def _choose(search: _Search, gpu: GPU, samples: int | None, epochs: int | None) -> GpuChoice:
    setup = search.setup
    fewer: Tried | None = None
    tried: list[Tried] = []
    for offload in (False, True):
        for count in GPU_COUNTS:
            tried = search.tried(gpu, count, offload)
            fitting = [t for t in tried if t.fits]
            if not fitting:
                fewer = _least(tried)
                continue
            timed = {id(t): Tried(t.label, t.setup, t.memory, True, search.timer(t.setup, gpu))
                     for t in fitting}
            tried = [timed.get(id(t), t) for t in tried]
            best = min((t for t in tried if t.step is not None),
                       key=lambda t: t.step.seconds if t.step else math.inf)
            run = None
            if samples is not None and epochs is not None and best.step is not None:
                run = run_cost(best.step.seconds, samples,
                               setup.batch_size * setup.gradient_accumulation_steps, epochs,
                               num_gpus=_count(best.setup), price_per_hour=gpu.price_per_hour)
            return GpuChoice(gpu, best, tuple(tried), fewer if count > 1 or offload else None,
                             run, _reason(gpu, best, tried, fewer, count, offload))
    least = _least(tried)
    return GpuChoice(gpu, None, tuple(tried), least, None,
                     f"nothing tried fits on up to {GPU_COUNTS[-1]} x {gpu.name}, offload "
                     f"included; the least memory: {least.label} needs "
                     f"{_gib(_needs(least))} of {_gib(gpu.memory_bytes)}")


def _needs(t: Tried) -> int:
    return t.required_bytes


def _least(tried: list[Tried]) -> Tried:
    """The setting that needs the least memory (an estimated one where any was)."""
    return min(tried, key=lambda t: (t.memory is None, t.required_bytes))


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _reason(gpu: GPU, best: Tried, tried: list[Tried], fewer: Tried | None, count: int,
            offload: bool) -> str:
    """Why ``best``: what did not fit below it, and what else fit at its count."""
    words = []
    if count == 1 and not offload:
        words.append(f"fits on one {gpu.name}")
    elif fewer is not None:
        below = _count(fewer.setup)
        what = f"{below} GPU{'s' if below > 1 else ''}"
        if offload:
            words.append(f"nothing fits without offload on up to {GPU_COUNTS[-1]} GPUs")
        else:
            at_least = "" if fewer.memory is not None else "at least "
            words.append(f"nothing fits on {what} (least: {fewer.label}, {at_least}"
                         f"{_gib(_needs(fewer))} of {_gib(gpu.memory_bytes)})")
    others = [t for t in tried if t.fits and t is not best]
    needed = _gib(_needs(best))
    assert best.step is not None
    if others:
        fastest = ", ".join(f"{t.label} {t.step.seconds * 1000:.0f} ms" for t in others
                            if t.step is not None)
        words.append(f"{best.label} needs {needed} and is the fastest of {len(others) + 1} "
                     f"that fit ({best.step.seconds * 1000:.0f} ms a step; {fastest})")
    else:
        words.append(f"{best.label} needs {needed}, the only setting that fits at "
                     f"{count} GPU{'s' if count > 1 else ''}")
    return "; ".join(words)


def _rank(c: GpuChoice) -> tuple[int, float, float]:
    """Cheapest first: fitting types with a price by cost (the run's, else per token), then
    those without a price by throughput, then those where nothing fits."""
    if c.chosen is None:
        return (2, 0.0, 0.0)
    cost = c.run.cost if c.run is not None else c.cost_per_million_tokens
    if cost is None:
        return (1, -(c.tokens_per_second or 0.0), 0.0)
    return (0, cost, c.run.total_seconds if c.run is not None else 0.0)
