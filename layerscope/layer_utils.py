"""The "Layer Utils" API of the reference, each function a thin composition of scan, plan and
apply. Every function takes any ``nn.Module``, real or meta, plain or wrapped for training
(FSDP2, FSDP1, DDP, a DeepSpeed engine: by the original parameter names, with the wrappers'
rules of :mod:`layerscope.apply`), and only ever toggles ``requires_grad``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from typing_extensions import Unpack

from layerscope.apply import apply_plan, emit, set_requires_grad
from layerscope.checks import MAX_SIZE, finite, flag, whole
from layerscope.errors import ArgumentError, EstimateError, PlanError
from layerscope.estimate.hardware import GPU, get_gpu
from layerscope.estimate.run import run_cost
from layerscope.plan import FreezePlan, GradualSchedule
from layerscope.render.text import layer_status_text, model_summary_text
from layerscope.scan import check_module, scan
from layerscope.setup import Settings, StepSettings, make_setup
from layerscope.units import GIB, dtype_bytes, format_duration


def _freeze(model: nn.Module, plan: FreezePlan, func: str) -> int:
    """Freeze what ``plan`` selects (leaving other flags alone); return the elements covered."""
    check_module(model, func)
    res = plan.resolve(scan(model))
    set_requires_grad(model, res.frozen, False)
    emit(res.warnings)
    return res.frozen_params


def freeze_model(model: nn.Module) -> int:
    """Freeze every parameter. Returns the number of parameter elements frozen."""
    return _freeze(model, FreezePlan.all(), "freeze_model")


def unfreeze_model(model: nn.Module) -> int:
    """Make every (floating-point) parameter trainable. Returns the elements covered."""
    check_module(model, "unfreeze_model")
    s = scan(model)
    set_requires_grad(model, s.by_name, True)
    return s.total_params


def freeze_first_n_layers(model: nn.Module, n: int) -> int:
    """Freeze blocks ``0 .. n-1`` of the main block stack."""
    return _freeze(model, FreezePlan.first(n), "freeze_first_n_layers")


def freeze_last_n_layers(model: nn.Module, n: int) -> int:
    """Freeze blocks ``L-n .. L-1`` of the main block stack."""
    return _freeze(model, FreezePlan.last(n), "freeze_last_n_layers")


def freeze_except_last_n(model: nn.Module, n: int) -> int:
    """Freeze everything except the last ``n`` blocks and the head side (final norm, head).

    A head tied to the embeddings keeps the shared tensor trainable (with a warning).
    """
    return _freeze(model, FreezePlan.except_last(n), "freeze_except_last_n")


def freeze_embeddings(model: nn.Module) -> int:
    """Freeze the input embeddings outside the blocks (token, position, token-type).

    A head tied to them is frozen too (with a warning).
    """
    return _freeze(model, FreezePlan.embeddings(), "freeze_embeddings")


def freeze_by_name(model: nn.Module, patterns: str | Sequence[str], case_sensitive: bool = True) -> int:
    """Freeze every parameter whose full name matches a pattern (``re.search``).

    Raises:
        PlanError (a ValueError): an invalid regex, or no pattern matches any name.
    """
    check_module(model, "freeze_by_name")
    if not isinstance(case_sensitive, bool):
        raise PlanError(f"freeze_by_name: case_sensitive must be a bool, got {case_sensitive!r}")
    return _freeze(model, FreezePlan.regex(patterns, case_sensitive), "freeze_by_name")


def setup_lp_lora_style(model: nn.Module, freeze_ratio: float = 0.5, freeze_embed: bool = True) -> int:
    """LP-LoRA style: freeze blocks ``0 .. int(L * freeze_ratio) - 1`` and the embeddings."""
    check_module(model, "setup_lp_lora_style")
    return _freeze(model, FreezePlan.lp_lora(freeze_ratio, freeze_embed), "setup_lp_lora_style")


def get_trainable_params(model: nn.Module) -> int:
    """Trainable parameter elements, a shared tensor counted once."""
    return scan(check_module(model, "get_trainable_params")).trainable_params


def get_frozen_percentage(model: nn.Module) -> float:
    """Frozen share of the parameter elements, in percent (0.0 without parameters)."""
    s = scan(check_module(model, "get_frozen_percentage"))
    return 100.0 * s.frozen_params / s.total_params if s.total_params else 0.0


def get_num_layers(model: nn.Module) -> int:
    """Blocks in the main block stack (``StructureError`` when there is none)."""
    return scan(check_module(model, "get_num_layers")).num_layers


def get_layer_names(model: nn.Module, include_params: bool = False) -> list[str]:
    """Modules that directly own parameters, in registration order; with ``include_params``,
    the parameter names instead (every alias of a tied tensor)."""
    s = scan(check_module(model, "get_layer_names"))
    if flag(include_params, "get_layer_names: include_params", ArgumentError):
        return [p.name for p in s.params]
    return [m.name for m in s.modules if m.own_params]


def layer_status(model: nn.Module, show_all: bool = False) -> str:
    """The text :func:`print_layer_status` prints."""
    s = scan(check_module(model, "layer_status"))
    return layer_status_text(s, show_all=flag(show_all, "layer_status: show_all", ArgumentError))


def print_layer_status(model: nn.Module, show_all: bool = False) -> None:
    """Print which blocks are frozen, grouped into runs, then the embeddings and the head."""
    print(layer_status(check_module(model, "print_layer_status"), show_all))


def model_summary(model: nn.Module, max_depth: int = 3) -> str:
    """The text :func:`print_model_summary` prints."""
    check_module(model, "model_summary")
    whole(max_depth, "max_depth", ArgumentError, maximum=MAX_SIZE)
    return model_summary_text(scan(model), max_depth)


def print_model_summary(model: nn.Module, max_depth: int = 3) -> None:
    """Print the Keras-like summary: totals, then one row per module down to ``max_depth``."""
    print(model_summary(check_module(model, "print_model_summary"), max_depth))


def get_memory_savings_estimate(
    model: nn.Module,
    **settings: Unpack[Settings],
) -> dict[str, Any]:
    """Memory the current freezing saves against full fine-tuning.

    ``gradient_saved_*`` and ``optimizer_saved_*`` come from the frozen parameters' own dtypes
    (no gradient, and no state of ``optimizer``: two AdamW moments, one SGD momentum, ...),
    each tensor rounded to the CUDA caching allocator's 512-byte blocks. For
    models the memory estimator supports (Hugging Face causal LMs), the peak of a training step
    is estimated too, with and without the freezing
    (:func:`layerscope.estimate.memory.estimate_memory_savings`), which adds the activation
    memory freezing the first blocks saves: ``peak_saved_*``, ``activation_saved_*``,
    ``baseline_peak_bytes``, ``planned_peak_bytes``. For other models those are None and
    ``estimate_note`` says why. ``*_gb`` values are GiB (2**30 bytes).

    Args:
        **settings: the step estimated, as for ``estimate_memory`` (the keyword arguments of
            :class:`~layerscope.setup.TrainingSetup`), except that without a ``precision`` it
            is the "-true" precision of the model's parameter dtype (fp32 -> "32-true", bf16 ->
            "bf16-true", fp16 -> "16-true").
    """
    from layerscope.estimate.memory import estimate_memory_savings
    from layerscope.estimate.optimizers import OPTIMIZERS
    from layerscope.estimate.trace import rounded
    from layerscope.setup import resolve_optimizer

    s = scan(check_module(model, "get_memory_savings_estimate"))
    frozen = [g[0] for g in s.tensors if not g[0].requires_grad]
    grad = sum(rounded(int(p.numel * dtype_bytes(p.dtype))) for p in frozen)
    opt_name = resolve_optimizer(settings.get("optimizer") or "adamw")
    sizes = [(p.numel, int(dtype_bytes(p.dtype)), p.shape) for p in frozen]
    optim = OPTIMIZERS[opt_name](sizes).state
    out: dict[str, Any] = {
        "gradient_saved_gb": grad / GIB,
        "optimizer_saved_gb": optim / GIB,
        "total_saved_gb": (grad + optim) / GIB,
        "gradient_saved_bytes": grad,
        "optimizer_saved_bytes": optim,
        "total_saved_bytes": grad + optim,
        "frozen_params": s.frozen_params,
        "trainable_params": s.trainable_params,
    }
    if settings.get("precision") is None:
        dtypes = {g[0].dtype for g in s.tensors if g[0].dtype.is_floating_point}
        settings["precision"] = {"torch.bfloat16": "bf16-true", "torch.float16": "16-true"}.get(
            str(dtypes.pop()) if len(dtypes) == 1 else "", "32-true"
        )
    settings["optimizer"] = opt_name
    try:
        saved = estimate_memory_savings(model, None, **settings)
    except EstimateError as exc:  # e.g. no vocabulary, or the forward fails at this seq_len
        keys = ("peak_saved_bytes", "peak_saved_gb", "activation_saved_bytes",
                "activation_saved_gb", "baseline_peak_bytes", "planned_peak_bytes")
        out.update({k: None for k in keys})
        out["estimate_note"] = f"no step estimate: {exc}"
        return out
    activations = saved.baseline.activation_bytes - saved.planned.activation_bytes
    out.update({
        "peak_saved_bytes": saved.saved_bytes,
        "peak_saved_gb": saved.saved_bytes / GIB,
        "activation_saved_bytes": activations,
        "activation_saved_gb": activations / GIB,
        "baseline_peak_bytes": saved.baseline.peak_bytes,
        "planned_peak_bytes": saved.planned.peak_bytes,
        "estimate_settings": {"batch_size": saved.planned.batch_size,
                              "seq_len": saved.planned.seq_len,
                              "precision": saved.planned.precision, "optimizer": opt_name},
    })
    return out


def estimate_training_time(
    model: nn.Module,
    num_samples: int,
    batch_size: int,
    num_epochs: int,
    ms_per_step: float = 500.0,
    *,
    gpu: str | GPU | None = None,
    plan: FreezePlan | None = None,
    price_per_hour: float | None = None,
    seq_lens: Sequence[int] | None = None,
    **settings: Unpack[StepSettings],
) -> dict[str, Any]:
    """Steps, wall time, GPU-hours and cost of a run.

    ``total_steps = ceil(num_samples / (batch_size * num_gpus)) * num_epochs``: data parallel,
    each of the ``num_gpus`` GPUs takes ``batch_size`` samples per step. Without ``gpu`` a step
    takes ``ms_per_step``; with one, the step time comes from
    :func:`layerscope.estimate.time.estimate_step_time` (``ms_per_step`` is then ignored), with
    ``plan`` and ``**settings`` (``seq_len``, ``precision``, ``distributed``, ...: as for
    ``estimate_memory``) describing the step; on more than one GPU it includes the strategy's
    communication that compute waits for (DDP when no strategy is named).
    ``gpu_hours = total_hours * num_gpus``;
    ``cost = gpu_hours * price``, the price being ``price_per_hour`` or the catalogue's (None
    when neither is known). ``num_gpus`` (a setting, 1 by default) may be given without a
    ``gpu``.

    ``seq_lens`` (one token count per example; needs ``gpu``; ``num_samples`` must be its
    length): examples of different lengths, ``seq_len`` being the truncation (and packing)
    length. ``"lengths"`` then holds, per batching strategy (``"padded"``: random batches
    padded to their longest; ``"grouped"``: batches of similar length; ``"packed"``: rows of
    ``seq_len`` tokens), a :class:`~layerscope.estimate.lengths.StrategyTime` (steps, padding
    and truncated tokens, wall time with its band, memory of the longest batch), and the run's
    totals are the padded strategy's (transformers' default collator).

    Raises:
        EstimateError (a ValueError): a count or time out of range, or settings given without a
            ``gpu`` (they describe a step that is only estimated on a GPU).
    """
    check_module(model, "estimate_training_time")
    given_gpus = settings.get("num_gpus")
    num_gpus = 1 if given_gpus is None else given_gpus
    if seq_lens is not None:
        return _training_time_with_lengths(model, num_samples, batch_size, num_epochs, gpu,
                                           plan, num_gpus, price_per_hour, seq_lens, settings)
    step = None
    price = price_per_hour
    per_step = batch_size  # samples per GPU per optimizer step
    if gpu is not None:
        from layerscope.estimate.time import step_time_of

        device = get_gpu(gpu)
        setup = make_setup(model, plan, batch_size=batch_size, **settings)
        num_gpus = setup.num_gpus or num_gpus  # a strategy without a count: one node
        step = step_time_of(setup, device)
        ms_per_step = step.seconds * 1000.0
        per_step = batch_size * setup.gradient_accumulation_steps
        if price is None:
            price = device.price_per_hour
    else:
        given = [k for k, v in settings.items() if v is not None and k != "num_gpus"]
        given += ["plan"] if plan else []
        if given:
            raise EstimateError(
                f"estimate_training_time: {', '.join(given)} describe the step, which is "
                "estimated only when gpu is given"
            )
    finite(ms_per_step, "ms_per_step", EstimateError)
    run = run_cost(ms_per_step / 1000.0, num_samples, per_step, num_epochs, num_gpus=num_gpus,
                   price_per_hour=price)
    return {
        "steps_per_epoch": run.steps_per_epoch,
        "total_steps": run.total_steps,
        "ms_per_step": float(ms_per_step),
        "total_seconds": run.total_seconds,
        "total_hours": run.total_seconds / 3600.0,
        "formatted": format_duration(run.total_seconds),
        "num_gpus": num_gpus,
        "gpu": None if gpu is None else get_gpu(gpu).name,
        "gpu_hours": run.gpu_hours,
        "price_per_hour": run.price_per_hour,
        "cost": run.cost,
        "step_time": step,
    }


def _training_time_with_lengths(model: nn.Module, num_samples: int, batch_size: int,
                                num_epochs: int, gpu: str | GPU | None,
                                plan: FreezePlan | None, num_gpus: int,
                                price_per_hour: float | None, seq_lens: Sequence[int],
                                settings: StepSettings) -> dict[str, Any]:
    """``estimate_training_time`` over real data lengths (see its docstring)."""
    from layerscope.estimate.accumulation import micro_batch_seconds
    from layerscope.estimate.lengths import check_lengths, run_times
    from layerscope.estimate.memory import estimate_memory
    from layerscope.estimate.time import step_timer

    lengths = check_lengths(seq_lens)
    if gpu is None:
        raise EstimateError("estimate_training_time: seq_lens needs gpu (the step time at each "
                            "length is estimated)")
    if num_samples != len(lengths):
        raise EstimateError(f"estimate_training_time: num_samples={num_samples} but seq_lens "
                            f"has {len(lengths)} lengths (one per example)")
    device = get_gpu(gpu)
    setup = make_setup(model, plan, batch_size=batch_size, **settings)
    num_gpus = setup.num_gpus or num_gpus  # a strategy without a count: one node
    timer = step_timer(setup, device)

    def times(length: int, masked: bool) -> tuple[float, float, float]:
        return micro_batch_seconds(timer.at(batch_size, length, padded=masked), setup)

    def memory(length: int) -> tuple[int, int]:
        e = estimate_memory(setup.replace(seq_len=length))
        return e.peak_bytes, e.required_bytes()

    strategies = run_times(lengths, batch_size, setup.seq_len, num_epochs, times, num_gpus,
                           memory)
    padded = strategies["padded"]
    price = device.price_per_hour if price_per_hour is None else price_per_hour
    steps = setup.gradient_accumulation_steps  # micro-batches per optimizer step
    per_step = steps * padded.seconds / (padded.batching.steps * num_epochs) if num_epochs else 0.0
    run = run_cost(per_step, num_samples, batch_size * steps, num_epochs, num_gpus=num_gpus,
                   price_per_hour=price)
    return {
        "steps_per_epoch": run.steps_per_epoch,
        "total_steps": run.total_steps,
        "ms_per_step": per_step * 1000.0,
        "total_seconds": run.total_seconds,
        "total_hours": run.total_seconds / 3600.0,
        "formatted": format_duration(run.total_seconds),
        "num_gpus": num_gpus,
        "gpu": device.name,
        "gpu_hours": run.gpu_hours,
        "price_per_hour": run.price_per_hour,
        "cost": run.cost,
        "step_time": timer.at(batch_size, setup.seq_len),
        "lengths": strategies,
    }


class GradualUnfreezer:
    """Unfreeze blocks from the top, epoch by epoch (ULMFiT-style gradual unfreezing).

    The schedule is a :class:`~layerscope.plan.GradualSchedule`: epoch 0 trains only the head
    side; at epoch ``e`` the top ``L * e // (total_epochs - 1)`` blocks train, so all blocks
    train by the last epoch and none refreezes. The embeddings stay frozen unless
    ``freeze_embeddings=False`` or ``epoch >= unfreeze_embeddings_at``; a head tied to them
    trains with the head side (with a warning). Everything else (e.g. a vision tower) stays
    frozen until the last epoch.

    ``step(e)`` sets the flags for epoch ``e`` from scratch, so resuming at any epoch gives the
    same flags. With an optimizer built before unfreezing, give it *all* parameters (frozen ones
    included): PyTorch optimizers skip parameters whose ``.grad`` is None, so frozen ones are
    not updated and start updating as soon as they are unfrozen. An optimizer built from only
    the trainable parameters never sees the ones unfrozen later.
    """

    def __init__(
        self,
        model: nn.Module,
        total_epochs: int,
        unfreeze_embeddings_at: int | None = None,
        freeze_embeddings: bool = True,
        verbose: bool = True,
    ) -> None:
        check_module(model, "GradualUnfreezer")
        flag(verbose, "GradualUnfreezer: verbose", PlanError)
        self.model = model
        self.schedule = GradualSchedule(
            scan(model).num_layers, total_epochs, unfreeze_embeddings_at, freeze_embeddings
        )
        self.verbose = verbose
        self.epoch: int | None = None

    @property
    def total_epochs(self) -> int:
        return self.schedule.total_epochs

    @property
    def num_layers(self) -> int:
        return self.schedule.num_layers

    @property
    def unfreeze_embeddings_at(self) -> int | None:
        return self.schedule.unfreeze_embeddings_at

    @property
    def freeze_embeddings(self) -> bool:
        return self.schedule.freeze_embeddings

    def trainable_blocks(self, epoch: int) -> int:
        """How many of the top blocks train at ``epoch``."""
        return self.schedule.trainable_blocks(epoch)

    def plan(self, epoch: int) -> FreezePlan:
        """The freeze plan of ``epoch``."""
        return self.schedule.plan(epoch)

    def step(self, epoch: int) -> int:
        """Set the flags for ``epoch``; returns the trainable parameter elements."""
        plan = self.plan(epoch)
        res = apply_plan(self.model, plan)
        self.epoch = epoch
        if self.verbose:
            print(
                f"[GradualUnfreezer] epoch {epoch}: top {self.trainable_blocks(epoch)}/"
                f"{self.num_layers} blocks trainable, {res.trainable_params:,} parameters"
            )
        return res.trainable_params

    def state_dict(self) -> dict[str, Any]:
        return {
            "total_epochs": self.total_epochs,
            "unfreeze_embeddings_at": self.unfreeze_embeddings_at,
            "freeze_embeddings": self.freeze_embeddings,
            "num_layers": self.num_layers,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the schedule and re-apply the saved epoch's flags (validated first)."""
        keys = {"total_epochs", "unfreeze_embeddings_at", "freeze_embeddings", "num_layers", "epoch"}
        if isinstance(state, dict) and state.get("num_layers") != self.num_layers:
            raise PlanError(
                f"GradualUnfreezer.load_state_dict: state is for {state.get('num_layers')!r} "
                f"layers, this model has {self.num_layers}"
            )
        if not isinstance(state, dict) or not keys <= set(state):
            raise PlanError(
                f"GradualUnfreezer.load_state_dict: expected a dict with {sorted(keys)}, got "
                f"{state!r}"[:300]
            )
        schedule = GradualSchedule(self.num_layers, state["total_epochs"],
                                   state["unfreeze_embeddings_at"], state["freeze_embeddings"])
        if state["epoch"] is not None:
            schedule.check_epoch(state["epoch"])
        self.schedule = schedule
        if state["epoch"] is not None:
            verbose, self.verbose = self.verbose, False
            self.step(state["epoch"])
            self.verbose = verbose
