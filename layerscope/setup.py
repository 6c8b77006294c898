"""``TrainingSetup``: the one frozen, validated description of a training run.

Every estimate (memory, step time, training time, the largest batch, the savings of a plan, the
command line's alternatives and report) consumes a :class:`TrainingSetup`, so one setting has one
meaning everywhere. The public estimators keep their keyword arguments; they build the setup.
The settings' vocabularies are defined here once: precisions (Lightning's names), optimizers,
attention implementations and LoRA (as peft adds it).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, TypedDict, cast

import torch
from torch import nn
from typing_extensions import Unpack

from layerscope.build import as_model
from layerscope.checks import MAX_SIZE, flag, whole
from layerscope.errors import EstimateError, LayerscopeWarning
from layerscope.estimate.sharding import FsdpSettings, Sharding, make_sharding
from layerscope.plan import FreezePlan
from layerscope.process import import_once
from layerscope.quantization import Quantization, QuantizedLinear, config_dtype, quantized_modules
from layerscope.scan import ModelScan, scan


# -- precisions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """How a precision setting stores and computes.

    Attributes:
        name: Lightning's name, e.g. ``"bf16-mixed"``.
        param_dtype: dtype of weights, gradients and optimizer states.
        autocast_dtype: the CUDA autocast dtype, or None without autocast.
        matmul: the GPU catalogue's dtype key for matmuls and attention.
    """

    name: str
    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    matmul: str

    @property
    def autocast(self) -> bool:
        """Weights are cast to the autocast dtype before each matmul."""
        return self.autocast_dtype is not None

    @property
    def weight_bytes(self) -> int:
        """Bytes per weight, gradient and optimizer-state element."""
        return self.param_dtype.itemsize

    @property
    def act_bytes(self) -> int:
        """Bytes per element of matmul outputs."""
        return (self.autocast_dtype or self.param_dtype).itemsize

    @property
    def stream_bytes(self) -> int:
        """Bytes per element of the residual stream and norms (the weights' dtype: under
        autocast, embeddings and residual adds stay fp32)."""
        return self.param_dtype.itemsize


PRECISIONS: dict[str, Precision] = {
    "32-true": Precision("32-true", torch.float32, None, "fp32"),
    "bf16-true": Precision("bf16-true", torch.bfloat16, None, "bf16"),
    "16-true": Precision("16-true", torch.float16, None, "fp16"),
    "bf16-mixed": Precision("bf16-mixed", torch.float32, torch.bfloat16, "bf16"),
    "16-mixed": Precision("16-mixed", torch.float32, torch.float16, "fp16"),
}
PRECISION_ALIASES = {
    "32": "32-true", "fp32": "32-true", "float32": "32-true",
    "bf16": "bf16-true", "bfloat16": "bf16-true", "16": "16-true", "fp16": "16-true",
    "float16": "16-true", "amp_bf16": "bf16-mixed", "amp-bf16": "bf16-mixed",
    "bf16-amp": "bf16-mixed", "amp_fp16": "16-mixed", "amp-fp16": "16-mixed",
}

OPTIMIZERS = ("adamw", "adamw-fused", "adam", "sgd", "sgd-momentum", "adamw-8bit", "adafactor",
              "paged-adamw-8bit", "paged-adamw-32bit", "adamw-hf")
"""``adamw``/``adam``: torch.optim, foreach (the CUDA default); ``adamw-fused``:
``AdamW(fused=True)``; ``adamw-hf``: transformers' own ``AdamW`` (``optim="adamw_hf"``, a
per-tensor loop); ``sgd``/``sgd-momentum``: torch.optim.SGD without/with momentum;
``adamw-8bit``: bitsandbytes ``AdamW8bit``; ``adafactor``: ``torch.optim.Adafactor``;
``paged-adamw-8bit``/``paged-adamw-32bit``: bitsandbytes ``PagedAdamW8bit``/``PagedAdamW32bit``
(transformers' ``optim="paged_adamw_8bit"``/``"paged_adamw_32bit"``)."""
OPTIMIZER_ALIASES = {
    "adamw_fused": "adamw-fused", "fused_adamw": "adamw-fused", "fused-adamw": "adamw-fused",
    "sgd_momentum": "sgd-momentum", "sgdm": "sgd-momentum", "adamw_8bit": "adamw-8bit",
    "adamw_hf": "adamw-hf",
    "adamw8bit": "adamw-8bit", "paged_adamw_8bit": "paged-adamw-8bit",
    "pagedadamw8bit": "paged-adamw-8bit", "paged_adamw_32bit": "paged-adamw-32bit",
    "pagedadamw32bit": "paged-adamw-32bit", "paged-adamw": "paged-adamw-32bit",
    "paged_adamw": "paged-adamw-32bit", "pagedadamw": "paged-adamw-32bit",
}

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
"""transformers' names: ``sdpa`` (``F.scaled_dot_product_attention``: flash or memory-efficient
kernel on a GPU, or the math fallback), ``eager`` (scores materialised), ``flash_attention_2``
(the flash-attn package), ``flex_attention`` (``torch.nn.attention.flex_attention``)."""


EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")
"""transformers 5's ``experts_implementation`` for mixture-of-experts layers on a CUDA GPU
(``transformers/integrations/moe.py``): ``grouped_mm`` (tokens sorted by expert, one
``torch._grouped_mm`` per projection; transformers' default), ``batched_mm`` (each token
gathers its experts' weights, one ``bmm``), ``eager`` (a Python loop over the experts)."""

_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")


def resolve_precision(precision: object) -> Precision:
    """A precision name or alias -> :class:`Precision`.

    Raises:
        EstimateError: an unknown name; the message lists the allowed ones.
    """
    if isinstance(precision, Precision):
        return precision
    if not isinstance(precision, str):
        raise EstimateError(f"precision must be a str, got {precision!r}")
    key = PRECISION_ALIASES.get(precision.lower(), precision.lower())
    if key not in PRECISIONS:
        allowed = [*PRECISIONS, *sorted(PRECISION_ALIASES)]
        raise EstimateError(f"unknown precision {precision!r}; allowed: {', '.join(allowed)}")
    return PRECISIONS[key]


def resolve_optimizer(optimizer: object) -> str:
    """An optimizer name or alias -> its canonical name in :data:`OPTIMIZERS`.

    Raises:
        EstimateError: an unknown name; the message lists the allowed ones.
    """
    if not isinstance(optimizer, str):
        raise EstimateError(f"optimizer must be a str, got {optimizer!r}")
    key = OPTIMIZER_ALIASES.get(optimizer.lower(), optimizer.lower())
    if key not in OPTIMIZERS:
        allowed = [*OPTIMIZERS, *sorted(OPTIMIZER_ALIASES)]
        raise EstimateError(f"unknown optimizer {optimizer!r}; allowed: {', '.join(allowed)}")
    return key


FLOAT_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "16": torch.float16, "half": torch.float16,
}
"""Names of the floating dtypes a base or adapter can be kept in."""


def resolve_float_dtype(value: object, name: str, model: nn.Module | None = None) -> torch.dtype | None:
    """``None``, a ``torch.dtype`` or a name from :data:`FLOAT_DTYPES` (``"auto"``: the model
    config's dtype, as ``from_pretrained(torch_dtype="auto")``) -> fp32, bf16, fp16 or None.

    Raises:
        EstimateError: anything else, e.g. an integer dtype; the message names the setting.
    """
    if value is None:
        return None
    dtype: object = value
    if isinstance(value, str):
        key = value.lower().removeprefix("torch.")
        if key == "auto" and model is not None:
            return config_dtype(model)
        dtype = FLOAT_DTYPES.get(key)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise EstimateError(
            f"{name} must be a floating dtype (fp32, bf16, fp16{', auto' if model is not None else ''}"
            f"), got {value!r}"
        )
    assert isinstance(dtype, torch.dtype)
    return dtype


def default_attention(model: nn.Module) -> str:
    """What transformers picks for ``model`` on a CUDA GPU when none is asked for: the
    implementation its config records after building (``sdpa`` where the class supports it,
    else ``eager``); ``sdpa`` for a module without a config."""
    config = getattr(model, "config", None)
    chosen = getattr(config, "_attn_implementation", None)
    return chosen if chosen in ATTENTION_IMPLEMENTATIONS else "sdpa" if config is None else "eager"


def resolve_attention(name: object, model: nn.Module) -> str:
    """``None`` -> :func:`default_attention`; else one of :data:`ATTENTION_IMPLEMENTATIONS`.

    The implementation asked for is estimated even where the installed transformers refuses it
    for this model (Gemma-2 with ``sdpa`` in transformers >= 5.23): users run other versions.

    Raises:
        EstimateError: an unknown name.
    """
    if name is None:
        return default_attention(model)
    if not isinstance(name, str) or name not in ATTENTION_IMPLEMENTATIONS:
        raise EstimateError(
            f"unknown attn_implementation {name!r}; allowed: {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    return name


def default_experts(model: nn.Module) -> str | None:
    """What transformers runs a mixture-of-experts ``model``'s experts with on a CUDA GPU when
    none is asked for: the implementation its config records (``grouped_mm`` where the class
    supports it); None for a model without routed experts."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    if not any(getattr(config, key, None) for key in _EXPERT_COUNTS):
        return None
    chosen = getattr(config, "_experts_implementation", None)
    return chosen if chosen in EXPERTS_IMPLEMENTATIONS else "grouped_mm"


def resolve_experts(name: object, model: nn.Module) -> str | None:
    """``None`` -> :func:`default_experts`; else one of :data:`EXPERTS_IMPLEMENTATIONS`
    (accepted for any model: a dense model has no experts to run with it).

    Raises:
        EstimateError: an unknown name.
    """
    if name is None:
        return default_experts(model)
    if not isinstance(name, str) or name not in EXPERTS_IMPLEMENTATIONS:
        raise EstimateError(f"unknown experts_implementation {name!r}; allowed: "
                            f"{', '.join(EXPERTS_IMPLEMENTATIONS)}")
    return name


# -- LoRA ------------------------------------------------------------------------------------
def block_linear_names(model: nn.Module) -> list[str]:
    """Leaf names (``q_proj``, ``c_attn``, ...) of the Linear layers inside the block stack."""
    prefix = scan(model).layers.path + "."
    names = {
        name.rpartition(".")[2]
        for name, m in model.named_modules()
        if name.startswith(prefix) and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
    }
    return sorted(names)


@dataclass(frozen=True)
class Lora:
    """LoRA adapters as peft adds them, resolved against one model.

    Attributes:
        rank: ``r``.
        targets: the full names of the modules that get an adapter (peft's matching of
            ``target_modules``, ``exclude_modules``, ``layers_to_transform``; ``None`` targets
            resolved from peft's per-architecture defaults, ``"all-linear"`` as peft expands it).
        modules_to_save: full names of the modules peft trains as full copies.
        config: the peft ``LoraConfig`` as JSON (every field, for tracing and equality).
    """

    rank: int
    targets: frozenset[str]
    modules_to_save: frozenset[str]
    config: str = field(repr=False)

    @classmethod
    def of(cls, value: object, model: nn.Module) -> Lora | None:
        """``None``, a rank, a peft ``LoraConfig`` or a :class:`Lora` -> a :class:`Lora` for
        ``model``. A rank adds adapters to every Linear of the blocks with ``lora_alpha = 2 *
        rank`` and no dropout.

        Raises:
            EstimateError: anything else, a rank below 1, or targets that match no module.
        """
        if value is None:
            return None
        import_once("peft")  # the first import, safe against other threads
        if isinstance(value, Lora):
            modules = {name for name, _ in model.named_modules()}
            if value.targets <= modules:
                return value
            value = value.peft_config()  # made for another model: match its config again
        from peft import LoraConfig

        if isinstance(value, LoraConfig):
            config = value
        elif isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SIZE:
            targets = block_linear_names(model)
            if not targets:
                raise EstimateError(
                    f"lora={value}: {type(model).__name__} has no Linear layer in its blocks"
                )
            config = LoraConfig(r=value, lora_alpha=2 * value, lora_dropout=0.0,
                                target_modules=targets)
        else:
            raise EstimateError(
                f"lora must be a peft LoraConfig or a rank from 1 to 2**31 - 1, got {value!r}"[:300]
            )
        whole(config.r, "LoraConfig.r", EstimateError, minimum=1, maximum=MAX_SIZE)
        data: dict[str, Any] = config.to_dict()  # type: ignore[no-untyped-call]
        for key, item in data.items():
            if isinstance(item, set):
                data[key] = sorted(item)
        return cls(
            rank=config.r,
            targets=_lora_targets(model, config),
            modules_to_save=_modules_to_save(model, config),
            config=json.dumps(data, sort_keys=True, default=str),
        )

    def peft_config(self) -> Any:
        """The peft ``LoraConfig`` this was made from."""
        from peft import LoraConfig

        data = json.loads(self.config)
        known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        return LoraConfig(**{k: v for k, v in data.items() if k in known})


def _lora_targets(model: nn.Module, config: Any) -> frozenset[str]:
    """The modules peft would adapt in ``model``, by peft's own matching rules."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if config.target_modules is None:
        model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if default is None:
            raise EstimateError(
                f"LoraConfig.target_modules is None and peft has no default targets for "
                f"model_type {model_type!r}; name the target modules"
            )
        config = dataclasses.replace(config, target_modules=default)
    supported = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)
    out_emb = getattr(model, "get_output_embeddings", lambda: None)()
    all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear"
    names = set()
    for name, module in model.named_modules():
        is_conv1d = type(module).__name__ == "Conv1D"  # transformers' GPT-2 projection
        if not name or not (isinstance(module, supported) or is_conv1d):
            continue
        if all_linear:
            hit = (isinstance(module, nn.Linear) or is_conv1d) and module is not out_emb
        else:
            hit = bool(check_target_module_exists(config, name))
        if hit:
            names.add(name)
    if not names:
        raise EstimateError(
            f"LoRA target_modules={config.target_modules!r} match no Linear/Embedding/Conv module "
            f"of {type(model).__name__}"
        )
    return frozenset(names)


def _modules_to_save(model: nn.Module, config: Any) -> frozenset[str]:
    wanted = config.modules_to_save or []
    return frozenset(
        name for name, _ in model.named_modules()
        if name and any(name == w or name.endswith("." + w) for w in wanted)
    )


# -- the setup -------------------------------------------------------------------------------
class StepSettings(TypedDict, total=False):
    """:class:`Settings` but the batch size, for functions that take it positionally."""

    seq_len: int | None
    precision: str | None
    optimizer: str | None
    gradient_checkpointing: bool | None
    lora: Any
    attn_implementation: str | None
    experts_implementation: str | None
    inference: bool | None
    distributed: str | None
    num_gpus: int | None
    gpus_per_node: int | None
    offload: str | None
    fsdp_version: int | None
    sharding: Sharding | None
    quantization: Any
    base_dtype: Any
    lora_dtype: Any
    prepare_kbit: bool | None
    gradient_accumulation_steps: int | None
    target_len: int | None
    images: int | None
    image_size: int | None
    audio_seconds: float | None


class Settings(StepSettings, total=False):
    """The keyword arguments every estimator takes besides the model and the plan: those of
    :class:`TrainingSetup` (which documents them); ``None`` means not given."""

    batch_size: int | None


SETTINGS = ("batch_size", *StepSettings.__annotations__)
"""The names of :class:`Settings`."""
INPUT_SETTINGS = ("target_len", "images", "image_size", "audio_seconds")
"""The settings that size the inputs of models that are not causal LMs (``None``: the model's
default, see :class:`TrainingSetup`)."""


def _positive_int(value: object, name: str) -> int:
    return whole(value, name, EstimateError, minimum=1, maximum=MAX_SIZE)


def _optional_int(value: object, name: str, minimum: int) -> int | None:
    return None if value is None else whole(value, name, EstimateError, minimum=minimum,
                                            maximum=MAX_SIZE)


MAX_AUDIO_SECONDS = MAX_SIZE / 16_000
"""Longest audio setting: 2**31 - 1 samples at the 16 kHz every speech feature extractor uses
(about 37 hours)."""


def _optional_seconds(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 < value <= MAX_AUDIO_SECONDS):  # compared before any float(): no overflow
        raise EstimateError(f"{name} must be None or a number of seconds > 0 and <= "
                            f"{MAX_AUDIO_SECONDS:.0f}, got {str(value)[:40]}")
    return float(value)


def _bool(value: object, name: str) -> bool:
    return flag(value, name, EstimateError)


@dataclass(frozen=True)
class TrainingSetup:
    """Everything one step's memory and time depend on besides the GPU. Immutable, validated
    on construction (a :class:`~layerscope.errors.EstimateError` names the bad value and what is
    allowed), hashable: equal setups share one trace.

    Args:
        model: an ``nn.Module`` (meta skeleton or real model; never modified) or a model source
            (a preset name, ``config.json`` path, dict or ``PretrainedConfig``).
        plan: what to freeze; ``None`` takes the model's ``requires_grad`` flags as they are
            when the setup is made.
        batch_size: sequences per step (per GPU).
        seq_len: tokens per sequence.
        precision: ``"32-true"``, ``"bf16-true"``, ``"16-true"``, ``"bf16-mixed"``,
            ``"16-mixed"`` or an alias (``"fp32"``, ``"bf16"``, ``"fp16"``, ``"amp_bf16"``...).
        optimizer: one of :data:`OPTIMIZERS` (or an alias).
        gradient_checkpointing: transformers' ``gradient_checkpointing_enable()``
            (non-reentrant): every block's forward is recomputed in backward.
        lora: a rank (adapters on every Linear of the blocks), a peft ``LoraConfig`` (its
            ``target_modules``, ``modules_to_save``...), or None. With LoRA the base model is
            frozen, as peft freezes it; with a ``plan`` as well, the base parameters the plan
            leaves trainable train too.
        attn_implementation: one of :data:`ATTENTION_IMPLEMENTATIONS`; None is what
            transformers picks for this model (:func:`default_attention`).
        experts_implementation: one of :data:`EXPERTS_IMPLEMENTATIONS` for a mixture-of-
            experts model; None is what transformers picks (:func:`default_experts`).
        inference: a forward only, under ``no_grad`` in eval mode (no loss, no optimizer).
        distributed: ``None`` (one GPU) or a data-parallel strategy: ``"ddp"``, ``"fsdp"``,
            ``"fsdp-grad-op"``, ``"hsdp"``, ``"zero1"``, ``"zero2"``, ``"zero3"``
            (:mod:`layerscope.estimate.sharding`). Memory is then per GPU (the busiest).
        num_gpus: GPUs in the run; with a strategy and no count, one node (``gpus_per_node``).
        gpus_per_node: GPUs per node (default 8): HSDP shards within a node; host memory is
            per node.
        offload: ``None``, ``"optimizer"`` (ZeRO-Offload) or ``"params"`` (ZeRO-3
            ``offload_param``, FSDP ``CPUOffload``: parameters, gradients and the optimizer step
            on the CPU).
        fsdp_version: 2 (``fully_shard``, the default) or 1 (``FullyShardedDataParallel``, the
            HF Trainer's and accelerate's default) for the FSDP strategies.
        sharding: a whole :class:`~layerscope.estimate.sharding.Sharding` (the ZeRO, FSDP and
            DDP knobs too, e.g. from :mod:`layerscope.distributed_config`); the five settings
            above, when given, replace its values.
        quantization: a quantized frozen base: ``"nf4"``, ``"fp4"``, ``"int8"``, a transformers
            ``BitsAndBytesConfig`` or a :class:`~layerscope.quantization.Quantization` (see
            there for what is quantized and the defaults); None is an unquantized base. The
            quantized weights never train (a plan that trains one is an error).
        base_dtype: the dtype the base's frozen parameters are loaded in (``"fp32"``,
            ``"bf16"``, ``"fp16"``, ``"auto"`` = the config's dtype, or a ``torch.dtype``).
            None: the config's dtype with ``quantization`` (``from_pretrained(torch_dtype=
            "auto")``, bf16 for current LLMs), else the precision's parameter dtype (fp32 under
            ``bf16-mixed``, as the calibration runs load it). Trainable parameters are always in
            the precision's parameter dtype.
        lora_dtype: the adapters' dtype: None is fp32 (peft upcasts bf16/fp16 adapters,
            ``autocast_adapter_dtype=True``), except on a quantized base sharded by FSDP or
            ZeRO-3, where they follow the base's dtype (TRL's ``autocast_adapter_dtype=False``);
            ``"bf16"`` for scripts that keep them in bf16.
        prepare_kbit: peft's ``prepare_model_for_kbit_training``: frozen non-quantized bf16/fp16
            parameters (norms, embeddings, the head) upcast to fp32, and with gradient
            checkpointing the embedding output made to require grad. None: on for a quantized
            base on one GPU, DDP or ZeRO-1/2, off under FSDP or ZeRO-3 (TRL skips it there) and
            for an unquantized base.
        gradient_accumulation_steps: micro-batches of ``batch_size`` per optimizer step (1: no
            accumulation). The gradients a strategy keeps between micro-steps (autograd's
            ``.grad``, ZeRO-2's gradient partition, FSDP's unsharded gradients under
            ``no_sync``) are then alive during the next micro-step's forward and backward
            (:mod:`layerscope.estimate.accumulation`); the optimizer step and a strategy's
            boundary-only communication happen once per ``gradient_accumulation_steps``
            micro-steps.
        target_len: decoder tokens per sequence of an encoder-decoder (T5, BART, Whisper);
            None: ``seq_len``, capped at the decoder's maximum length (Whisper: 448).
        images: images per sequence of a vision-language model; their tokens count in
            ``seq_len``; 0 trains on text only. None: 1.
        image_size: pixels per image side; None: the vision config's ``image_size`` (models
            that take any size: :data:`~layerscope.estimate.image_inputs.IMAGE_SIZE`).
        audio_seconds: seconds of audio per sample of a speech model; None: what the model
            takes (Whisper: 30 s), else :data:`~layerscope.estimate.audio_inputs.AUDIO_SECONDS`.

    What each kind of model is fed is in :mod:`layerscope.estimate.inputs`.

    A model wrapped for data parallelism (``fully_shard``, FSDP1, DDP, a DeepSpeed engine) is
    estimated on a skeleton of its config with the same trainable names, never touched; its
    wrapper gives the strategy and GPU count unless they are given.

    Attributes:
        trainable: the base parameter names that train (every alias of a tied tensor).
    """

    model: nn.Module
    plan: FreezePlan | None = None
    batch_size: int = 1
    seq_len: int = 2048
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    lora: Lora | None = None
    attn_implementation: str | None = None
    inference: bool = False
    experts_implementation: str | None = None
    distributed: str | None = None
    num_gpus: int | None = None
    gpus_per_node: int | None = None
    offload: str | None = None
    fsdp_version: int | None = None
    sharding: Sharding | None = None
    quantization: Quantization | None = None
    base_dtype: torch.dtype | None = None
    lora_dtype: torch.dtype | None = None
    prepare_kbit: bool | None = None
    gradient_accumulation_steps: int = 1
    target_len: int | None = None
    images: int | None = None
    image_size: int | None = None
    audio_seconds: float | None = None
    trainable: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        implied: Sharding | None = None
        model = self.model
        if isinstance(model, nn.Module):
            from layerscope.estimate.wrapped import unwrap

            model, implied = unwrap(model)  # FSDP/DDP/DeepSpeed: estimated, never touched
        model = as_model(model)
        if self.plan is not None and not isinstance(self.plan, FreezePlan):
            raise EstimateError(
                f"plan must be a FreezePlan or None, got {type(self.plan).__name__}"
            )
        _positive_int(self.batch_size, "batch_size")
        _positive_int(self.seq_len, "seq_len")
        _bool(self.gradient_checkpointing, "gradient_checkpointing")
        _bool(self.inference, "inference")
        if self.prepare_kbit is not None:
            _bool(self.prepare_kbit, "prepare_kbit")
        _positive_int(self.gradient_accumulation_steps, "gradient_accumulation_steps")
        if self.inference and self.gradient_accumulation_steps > 1:
            raise EstimateError(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} with "
                "inference=True: a forward only has no gradients to accumulate; use 1"
            )
        _optional_int(self.target_len, "target_len", 1)
        _optional_int(self.images, "images", 0)
        _optional_int(self.image_size, "image_size", 1)
        values: dict[str, Any] = {
            "audio_seconds": _optional_seconds(self.audio_seconds, "audio_seconds"),
            "model": model,
            "precision": resolve_precision(self.precision).name,
            "optimizer": resolve_optimizer(self.optimizer),
            "attn_implementation": resolve_attention(self.attn_implementation, model),
            "experts_implementation": resolve_experts(self.experts_implementation, model),
            "lora": Lora.of(self.lora, model),
            "quantization": Quantization.of(self.quantization),
            "base_dtype": resolve_float_dtype(self.base_dtype, "base_dtype", model),
            "lora_dtype": resolve_float_dtype(self.lora_dtype, "lora_dtype"),
        }
        sharding = self._resolve_sharding(implied)
        values.update(sharding=sharding, distributed=sharding.distributed,
                      num_gpus=sharding.num_gpus, gpus_per_node=sharding.gpus_per_node,
                      offload=sharding.offload, fsdp_version=sharding.fsdp.version)
        for key, value in values.items():
            object.__setattr__(self, key, value)
        if self.distributed is not None and self.quantization is not None:
            object.__setattr__(self, "quantization", self._sharded_quantization(self.quantization))
        config = getattr(model, "config", None)
        get_text = getattr(config, "get_text_config", None)
        text = get_text() if callable(get_text) else config
        max_pos = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        if isinstance(max_pos, int) and self.seq_len > max_pos:
            warnings.warn(
                f"seq_len={self.seq_len} exceeds the model's max_position_embeddings={max_pos}",
                LayerscopeWarning, stacklevel=3,
            )
        s = self.scan
        if self.plan is not None:
            trainable = self.plan.resolve(s).trainable
        elif self.lora is not None:
            trainable = frozenset()  # peft freezes the base model
        else:
            trainable = frozenset(p.name for p in s.params if p.requires_grad)
        floating = frozenset(n for n in trainable if s.by_name[n].dtype.is_floating_point)
        if self.quantization is not None:
            floating = self._without_quantized(floating)
        object.__setattr__(self, "trainable", floating)
        if not self.inference and not floating and self.lora is None:
            what = f"plan {self.plan} freezes" if self.plan is not None else "the model's flags freeze"
            raise EstimateError(
                f"nothing is trainable ({what} every parameter and lora is None): a training "
                "step has no backward; use inference=True for a forward-only estimate"
            )

    def _resolve_sharding(self, implied: Sharding | None) -> Sharding:
        """The :class:`Sharding` of the settings: ``sharding`` (or what a wrapper implies),
        with the five flat settings given replacing its values."""
        flat = {k: getattr(self, k) for k in ("distributed", "num_gpus", "gpus_per_node", "offload")}
        version = self.fsdp_version
        if self.sharding is not None and not isinstance(self.sharding, Sharding):
            raise EstimateError(f"sharding must be a Sharding, got {type(self.sharding).__name__}")
        base = self.sharding if self.sharding is not None else implied
        if base is None:
            knobs = {} if version is None else {"fsdp": FsdpSettings(version=version)}
            return make_sharding(**flat, **knobs)
        given: dict[str, Any] = {k: v for k, v in flat.items() if v is not None}
        if version is not None:
            given["fsdp"] = dataclasses.replace(base.fsdp, version=version)
        return base.replace(**given) if given else base

    def _sharded_quantization(self, q: Quantization) -> Quantization:
        """``q`` under the setup's strategy: DDP and ZeRO-1/2 keep a whole quantized base on
        every GPU as one GPU does; FSDP and ZeRO-3 shard it, which they do for float storage
        only (bitsandbytes' FSDP-QLoRA guide: ``bnb_4bit_quant_storage`` must match the dtype
        of the rest of the model so FSDP flattens the packed weights with it; peft's DeepSpeed
        ZeRO-3 QLoRA guide sets the same). Storage not given becomes the base's dtype, as those
        guides and answer.ai's ``fsdp_qlora`` set it; anything else is refused, as is int8
        (``Int8Params`` is int8 storage, and its row scales are not a parameter to shard)."""
        sharding = self.sharding
        assert sharding is not None
        if q.library == "torchao":
            raise EstimateError(
                f"quantization library='torchao' with distributed={sharding.distributed!r}: "
                "only torchtune's single-device build is modelled; use one GPU or "
                "library='bitsandbytes'"
            )
        if not (sharding.is_fsdp or sharding.stage == 3):
            return q
        where = f"distributed={sharding.distributed!r}"
        if not q.four_bit:
            raise EstimateError(
                f"quantization='int8' with {where}: FSDP and ZeRO-3 shard float parameters only, "
                "and bitsandbytes' int8 weights are int8; use nf4/fp4 (FSDP-QLoRA) or a "
                "strategy that keeps the whole base on each GPU (ddp, zero1, zero2)"
            )
        if self.prepare_kbit:
            raise EstimateError(
                f"prepare_kbit=True with {where}: prepare_model_for_kbit_training upcasts the "
                "norms to fp32 beside the 16-bit packed weights, and FSDP flattens one dtype per "
                "unit (TRL and the FSDP-QLoRA guides skip it for a sharded QLoRA base); drop "
                "prepare_kbit"
            )
        base = self.loaded_dtype
        if q.quant_storage is None:
            return q.with_storage(base)
        if q.quant_storage != base:
            name = str(q.quant_storage).removeprefix("torch.")
            raise EstimateError(
                f"bnb_4bit_quant_storage={name} with {where} and a "
                f"{str(base).removeprefix('torch.')} base: FSDP and ZeRO-3 shard the packed "
                "4-bit weights only when their storage is the float dtype of the rest of the "
                f"model; set bnb_4bit_quant_storage={str(base).removeprefix('torch.')} (or "
                "base_dtype to match)"
            )
        return q

    def _without_quantized(self, trainable: frozenset[str]) -> frozenset[str]:
        """``trainable`` less the quantized weights: an error when a plan asks to train one,
        dropped when they came from the model's flags (transformers freezes them)."""
        q = self.quantization
        assert q is not None
        layers = self.quantized_layers
        if not layers:
            raise EstimateError(
                f"quantization={q.method!r}: {type(self.model).__name__} has no nn.Linear or "
                "Conv1D that transformers would quantize"
            )
        if self.lora is not None and '"use_dora": true' in self.lora.config:
            raise EstimateError("LoRA with use_dora=True on a quantized base is not modelled")
        s = self.scan
        quantized = {f"{m.name}.weight" for m in layers}
        hit = {n for n in trainable if any(a in quantized for a in s.aliases(n))}
        if hit and self.plan is not None and not self.inference:
            shown = ", ".join(sorted(hit)[:3]) + (f" and {len(hit) - 3} more" if len(hit) > 3 else "")
            raise EstimateError(
                f"plan {self.plan} trains quantized weights ({shown}): {q.describe()} weights "
                "cannot receive gradients (bitsandbytes keeps them frozen). Train LoRA adapters on "
                "them, keep those modules in full precision (llm_int8_skip_modules), or drop "
                "quantization; inference on a quantized base is fine"
            )
        return trainable - hit

    # -- derived ---------------------------------------------------------------------------
    @property
    def quantized_layers(self) -> tuple[QuantizedLinear, ...]:
        """The modules transformers replaces by bitsandbytes layers (none without quantization)."""
        if self.quantization is None:
            return ()
        return quantized_modules(self.model, self.quantization)

    @property
    def kbit_prepared(self) -> bool:
        """Whether ``prepare_model_for_kbit_training`` ran (default: with a bitsandbytes
        base, unless FSDP or ZeRO-3 shards it: TRL's ``SFTTrainer`` skips it for a sharded QLoRA
        base, whose fp32 norms FSDP could not flatten with the 16-bit storage; torchtune, which
        quantizes with torchao, keeps every parameter in the recipe's dtype)."""
        if self.prepare_kbit is None:
            sharding = self.sharding
            sharded = sharding is not None and (sharding.is_fsdp or sharding.stage == 3)
            q = self.quantization
            return q is not None and q.library == "bitsandbytes" and not sharded
        return self.prepare_kbit

    @property
    def loaded_dtype(self) -> torch.dtype:
        """The dtype the base's floating parameters are loaded in (see ``base_dtype``)."""
        if self.base_dtype is not None:
            return self.base_dtype
        if self.quantization is not None:
            return config_dtype(self.model)
        return self.precision_info.param_dtype

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The dtype of frozen, non-quantized floating parameters during the step: the loaded
        dtype, upcast to fp32 by ``prepare_model_for_kbit_training`` when it ran."""
        loaded = self.loaded_dtype
        if self.kbit_prepared and loaded in (torch.float16, torch.bfloat16):
            return torch.float32
        return loaded

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The LoRA adapters' dtype: ``lora_dtype``; when not given fp32 (peft upcasts them),
        except on a 4-bit base that FSDP or ZeRO-3 shards, whose adapters stay in the base's
        float storage dtype so FSDP can flatten them with it (TRL's SFTTrainer makes them with
        ``autocast_adapter_dtype=False`` for a sharded QLoRA base; older peft made adapters in
        the base weight's float dtype)."""
        if self.lora_dtype is not None:
            return self.lora_dtype
        q, sharding = self.quantization, self.sharding
        if (q is not None and q.four_bit and sharding is not None
                and (sharding.is_fsdp or sharding.stage == 3)):
            return q.storage
        return torch.float32

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype a quantized layer dequantises to and multiplies in: the quantization's
        ``compute_dtype``, else the precision's autocast (or parameter) dtype."""
        prec = self.precision_info
        given = self.quantization.compute_dtype if self.quantization is not None else None
        return given or prec.autocast_dtype or prec.param_dtype

    @property
    def scan(self) -> ModelScan:
        """The model's scan (cached per model and its flags)."""
        return scan(self.model)

    @property
    def attention(self) -> str:
        """The attention implementation (resolved on construction, never None)."""
        return self.attn_implementation or default_attention(self.model)

    @property
    def experts(self) -> str | None:
        """The experts implementation (resolved on construction; None without experts)."""
        return self.experts_implementation

    @property
    def precision_info(self) -> Precision:
        return PRECISIONS[self.precision]

    @property
    def lora_rank(self) -> int | None:
        return None if self.lora is None else self.lora.rank

    def replace(self, **changes: Any) -> TrainingSetup:
        """A copy with ``changes`` (any of the constructor's keyword arguments), validated."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self) if f.init}
        if unknown:
            raise EstimateError(
                f"unknown setting(s) {sorted(unknown)}; allowed: model, plan, {', '.join(SETTINGS)}"
            )
        flat = ("distributed", "num_gpus", "gpus_per_node", "offload", "fsdp_version")
        if any(k in changes for k in (*flat, "sharding")):
            # resolve against the current sharding; distributed=None given means one GPU
            base = changes.pop("sharding", None) or self.sharding
            if "distributed" in changes and changes["distributed"] is None:
                base = Sharding()
            given = {k: changes.pop(k) for k in flat if k in changes}
            version = given.pop("fsdp_version", None)
            assert base is not None
            if version is not None:
                given["fsdp"] = dataclasses.replace(base.fsdp, version=version)
            given = {k: v for k, v in given.items() if v is not None}
            changes["sharding"] = base.replace(**given) if given else base
            changes.update(dict.fromkeys(flat))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready data (the model and plan are described elsewhere)."""
        q = self.quantization
        return {
            "batch_size": self.batch_size, "seq_len": self.seq_len, "precision": self.precision,
            "optimizer": self.optimizer, "gradient_checkpointing": self.gradient_checkpointing,
            "lora_rank": self.lora_rank, "attn_implementation": self.attn_implementation,
            "experts_implementation": self.experts_implementation, "inference": self.inference,
            "distributed": self.distributed, "num_gpus": self.num_gpus,
            "gpus_per_node": self.gpus_per_node, "offload": self.offload,
            "quantization": None if q is None else {
                **q.to_dict(), "compute_dtype": str(self.compute_dtype).removeprefix("torch.")},
            "base_dtype": str(self.loaded_dtype).removeprefix("torch."),
            "lora_dtype": None if self.lora is None else str(self.adapter_dtype).removeprefix("torch."),
            "prepare_kbit": self.kbit_prepared,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "target_len": self.target_len, "images": self.images,
            "image_size": self.image_size, "audio_seconds": self.audio_seconds,
        }

    def describe(self) -> str:
        """A short label: ``"plan lp-lora:0.5, batch 4, adamw"``."""
        parts = [f"LoRA rank {self.lora.rank}" if self.lora else f"plan {self.plan or 'none'}",
                 f"batch {self.batch_size}", self.optimizer]
        if self.quantization is not None:
            parts.insert(0, f"{self.quantization.describe()} base")
        elif self.base_dtype is not None:
            parts.insert(0, f"{str(self.base_dtype).removeprefix('torch.')} base")
        if self.gradient_checkpointing:
            parts.append("checkpointing")
        if self.gradient_accumulation_steps > 1:
            parts.append(f"{self.gradient_accumulation_steps} accumulated micro-batches")
        if self.distributed is not None:
            assert self.sharding is not None
            parts.append(self.sharding.describe())
        return ", ".join(parts)


def make_setup(model: Any, plan: Any = None, **settings: Unpack[Settings]) -> TrainingSetup:
    """What every public estimator does with its arguments: ``model`` may be a model, a model
    source or a :class:`TrainingSetup`; a setting given as ``None`` is not given (the setup's,
    or the default). With a setup, ``plan`` and any setting given replace the setup's.

    Raises:
        EstimateError: an unknown setting name or an invalid value.
    """
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise EstimateError(f"unknown setting(s) {sorted(unknown)}; allowed: {', '.join(SETTINGS)}")
    given = {k: v for k, v in settings.items() if v is not None}
    if isinstance(model, TrainingSetup):
        if plan is not None:
            given["plan"] = plan
        return model.replace(**given) if given else model
    return TrainingSetup(model, plan, **cast(Any, given))
