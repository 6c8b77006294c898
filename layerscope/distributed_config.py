"""Read a DeepSpeed config (``ds_config.json``) or an accelerate config (``accelerate config``'s
YAML) into layerscope's settings, with those projects' own semantics.

DeepSpeed (``deepspeed/runtime/zero/config.py``, ``offload_config.py``, ``runtime/config.py``):
``zero_optimization.stage`` 1-3, its bucket sizes and ZeRO-3 limits (absent keys take
DeepSpeed's defaults, floats such as ``5e8`` are element counts), ``offload_optimizer`` /
``offload_param`` (``device`` ``cpu`` or ``nvme``; the deprecated ``cpu_offload``), ``bf16`` /
``fp16`` (``enabled``), ``optimizer.type``, ``train_micro_batch_size_per_gpu``. ``"auto"`` is
filled as the Hugging Face Trainer and accelerate fill it: the batch and precision from the
run's own arguments (left to the caller here), ``reduce_bucket_size = hidden_size**2``,
``stage3_prefetch_bucket_size = 0.9 * hidden_size**2`` and
``stage3_param_persistence_threshold = 10 * hidden_size`` (``transformers/integrations/
deepspeed.py``, ``trainer_config_finalize``).

accelerate (``accelerate/commands/config``): ``distributed_type`` (``NO``, ``MULTI_GPU``,
``FSDP``, ``DEEPSPEED``), ``num_processes`` (all GPUs) over ``num_machines``,
``mixed_precision``, ``deepspeed_config`` (``zero_stage``, ``offload_optimizer_device``,
``offload_param_device``, or ``deepspeed_config_file``), ``fsdp_config`` (``fsdp_version``,
``fsdp_sharding_strategy`` or ``fsdp_reshard_after_forward``, ``fsdp_offload_params``,
``fsdp_use_orig_params``, ``fsdp_forward_prefetch``, ``fsdp_backward_prefetch``,
``fsdp_activation_checkpointing``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerscope.errors import ConfigFileError, EstimateError
from layerscope.estimate.sharding import (
    DEFAULT_GPUS_PER_NODE,
    DdpSettings,
    FsdpSettings,
    Sharding,
    ZeroSettings,
)

DEEPSPEED_OPTIMIZERS = {"adam": "adamw-fused", "adamw": "adamw-fused"}
"""DeepSpeed's ``optimizer.type`` -> layerscope's name: DeepSpeed builds ``FusedAdam`` (one
multi-tensor CUDA kernel, no temporaries) for ``Adam``/``AdamW``; with ZeRO-Offload the step
runs on the CPU (``DeepSpeedCPUAdam``), so the GPU sees no optimizer memory either way."""


@dataclass(frozen=True)
class RunConfig:
    """What a DeepSpeed or accelerate config says about a run; ``None`` where it is silent
    (or says ``"auto"``: the training script's own arguments decide).

    Attributes:
        sharding: the strategy, GPU count, offload and knobs.
        precision: a layerscope precision name, or None.
        optimizer: a layerscope optimizer name, or None.
        batch_size: sequences per GPU per step, or None.
        gradient_checkpointing: True/False, or None.
        source: the file read.
        gradient_accumulation_steps: micro-batches per optimizer step, or None.
    """

    sharding: Sharding
    precision: str | None = None
    optimizer: str | None = None
    batch_size: int | None = None
    gradient_checkpointing: bool | None = None
    source: str = field(default="", compare=False)
    gradient_accumulation_steps: int | None = None


def _load(path: Any, kind: str) -> tuple[Any, Path | None]:
    if isinstance(path, Mapping):
        return dict(path), None
    if not isinstance(path, (str, Path)):
        raise ConfigFileError(f"{kind} config must be a path or a dict, got {type(path).__name__}")
    p = Path(path).expanduser()
    try:
        if not p.is_file():
            raise ConfigFileError(f"{kind} config file not found: {str(p)[:200]!r}")
        text = p.read_text()
    except OSError as exc:  # a name too long, a folder without permission, a file gone
        raise ConfigFileError(f"{kind} config {str(p)[:200]!r} cannot be read: {exc.strerror}") from exc
    try:
        if kind == "DeepSpeed":
            return json.loads(text), p
        import yaml

        return yaml.safe_load(text), p
    except (ValueError, ImportError) as exc:  # json.JSONDecodeError is a ValueError
        raise ConfigFileError(f"{kind} config {str(p)!r} cannot be read: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError and its subclasses
        if type(exc).__module__.startswith("yaml"):
            raise ConfigFileError(f"{kind} config {str(p)!r} is not valid YAML: {exc}") from exc
        raise


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def _count(value: Any, key: str, source: str) -> int:
    """A whole count as DeepSpeed accepts it (``5e8``, ``500000000``, ``"5e8"``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigFileError(f"{source}: {key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not number.is_integer() or number < 0:
        raise ConfigFileError(f"{source}: {key} must be a whole number >= 0, got {value!r}")
    return int(number)


def _given_count(data: Mapping[str, Any], key: str, source: str, prefix: str = "") -> int | None:
    """``data[key]`` as a count >= 1, or None when absent or ``"auto"`` (the trainer decides)."""
    value = data.get(key)
    if value is None or _is_auto(value):
        return None
    count = _count(value, prefix + key, source)
    if count == 0:
        raise ConfigFileError(f"{source}: {prefix}{key} must be >= 1")
    return count


def _flag(value: Any, key: str, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigFileError(f"{source}: {key} must be true or false, got {value!r}")


def _offload_device(section: Any, key: str, source: str) -> bool:
    if section is None:
        return False
    if not isinstance(section, Mapping):
        raise ConfigFileError(f"{source}: {key} must be an object, got {section!r}")
    device = str(section.get("device", "none")).lower()
    if device not in ("none", "cpu", "nvme"):
        raise ConfigFileError(f"{source}: {key}.device must be none, cpu or nvme, got {device!r}")
    return device != "none"


def read_deepspeed_config(
    config: Any,
    *,
    hidden_size: int | None = None,
    num_gpus: int | None = None,
    gpus_per_node: int | None = None,
) -> RunConfig:
    """Read a DeepSpeed config (a path to its JSON, or the dict).

    Args:
        config: ``ds_config.json`` or its contents.
        hidden_size: the model's hidden size, to fill ``"auto"`` bucket sizes as the HF Trainer
            and accelerate do; needed only when the config has such ``"auto"`` values.
        num_gpus, gpus_per_node: the launch (DeepSpeed's config does not hold it); defaults:
            one node of 8.

    Raises:
        ConfigFileError: a missing or unreadable file, a ZeRO stage other than 1-3, an
            ``"auto"`` size without ``hidden_size``, a malformed value, or settings that do not
            go together (``offload_param`` below stage 3).
    """
    data, path = _load(config, "DeepSpeed")
    source = str(path) if path else "DeepSpeed config"
    if not isinstance(data, Mapping):
        raise ConfigFileError(f"{source}: a DeepSpeed config is a JSON object, got {type(data).__name__}")
    zero = data.get("zero_optimization", {})
    if isinstance(zero, bool):  # the old boolean form means stage 1
        zero = {"stage": 1 if zero else 0}
    if not isinstance(zero, Mapping):
        raise ConfigFileError(f"{source}: zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (1, 2, 3):
        raise ConfigFileError(
            f"{source}: zero_optimization.stage={stage!r}; layerscope models ZeRO stages 1, 2 "
            "and 3 (stage 0, plain DeepSpeed data parallelism, is not modelled)"
        )

    def size(key: str, *aliases: str) -> int | None:
        for k in (key, *aliases):
            if k in zero:
                value = zero[k]
                if _is_auto(value):
                    if hidden_size is None:
                        raise ConfigFileError(
                            f"{source}: zero_optimization.{k} is 'auto'; it is filled from the "
                            "model's hidden size, so pass hidden_size (the command line does)"
                        )
                    return {
                        "reduce_bucket_size": hidden_size * hidden_size,
                        "prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                        "param_persistence_threshold": 10 * hidden_size,
                    }.get(key)
                return _count(value, f"zero_optimization.{k}", source)
        return None

    knobs: dict[str, Any] = {}
    for key, aliases in (
        ("reduce_bucket_size", ()), ("allgather_bucket_size", ()),
        ("prefetch_bucket_size", ("stage3_prefetch_bucket_size",)),
        ("param_persistence_threshold", ("stage3_param_persistence_threshold",)),
        ("max_live_parameters", ("stage3_max_live_parameters",)),
        ("sub_group_size", ()),
    ):
        value = size(key, *aliases)
        if value is not None:
            knobs[key] = value
    for key in ("overlap_comm", "contiguous_gradients"):
        if key in zero and not _is_auto(zero[key]):
            knobs[key] = _flag(zero[key], f"zero_optimization.{key}", source)
    opt_section = zero.get("offload_optimizer")
    param_section = zero.get("offload_param")
    offload_opt = _offload_device(opt_section, "offload_optimizer", source)
    offload_param = _offload_device(param_section, "offload_param", source)
    if zero.get("cpu_offload") is True:  # deprecated spelling of offload_optimizer
        offload_opt = True
    if zero.get("cpu_offload_params") is True or zero.get("cpu_offload_param") is True:
        offload_param = True
    for section in (opt_section, param_section):
        if isinstance(section, Mapping) and "pin_memory" in section:
            knobs["pin_memory"] = _flag(section["pin_memory"], "pin_memory", source)
    if offload_param and stage != 3:
        raise ConfigFileError(f"{source}: offload_param needs ZeRO stage 3, the config has stage {stage}")
    offload = "params" if offload_param else "optimizer" if offload_opt else None

    def enabled(key: str) -> bool | None:
        section = data.get(key)
        if not isinstance(section, Mapping) or "enabled" not in section:
            return False if section is None else None
        value = section["enabled"]
        return None if _is_auto(value) else _flag(value, f"{key}.enabled", source)

    bf16, fp16 = enabled("bf16" if "bf16" in data else "bfloat16"), enabled("fp16")
    if bf16 and fp16:
        raise ConfigFileError(f"{source}: bf16 and fp16 are both enabled")
    precision: str | None
    if bf16:
        precision = "bf16-mixed"  # DeepSpeed casts the module; fp32 master in the optimizer
    elif fp16:
        precision = "16-mixed"
    elif bf16 is None or fp16 is None:
        precision = None  # "auto": the trainer's --bf16/--fp16 decide
    else:
        precision = "32-true"
    optimizer = None
    opt = data.get("optimizer")
    if isinstance(opt, Mapping) and isinstance(opt.get("type"), str):
        optimizer = DEEPSPEED_OPTIMIZERS.get(opt["type"].lower())
    batch_size = _given_count(data, "train_micro_batch_size_per_gpu", source)
    accumulation = _given_count(data, "gradient_accumulation_steps", source)
    ckpt = data.get("activation_checkpointing")
    try:
        zero_settings = ZeroSettings(**knobs)
        per_node = gpus_per_node if gpus_per_node is not None else DEFAULT_GPUS_PER_NODE
        sharding = Sharding(
            f"zero{stage}", per_node if num_gpus is None else num_gpus, per_node, offload,
            zero=zero_settings,
        )
    except EstimateError as exc:
        raise ConfigFileError(f"{source}: {exc}") from exc
    return RunConfig(
        sharding=sharding, precision=precision, optimizer=optimizer, batch_size=batch_size,
        gradient_checkpointing=True if isinstance(ckpt, Mapping) and ckpt else None,
        source=source, gradient_accumulation_steps=accumulation,
    )


FSDP_STRATEGY_NAMES = {
    "1": "fsdp", "full_shard": "fsdp", "2": "fsdp-grad-op", "shard_grad_op": "fsdp-grad-op",
    "3": "ddp", "no_shard": "ddp", "4": "hsdp", "hybrid_shard": "hsdp",
}
"""accelerate's ``fsdp_sharding_strategy`` (a name or PyTorch's enum value) -> layerscope's
strategy; ``NO_SHARD`` replicates like DDP."""

MIXED_PRECISION = {"no": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def read_accelerate_config(config: Any, *, hidden_size: int | None = None) -> RunConfig:
    """Read an accelerate config (``accelerate config``'s YAML, a path or the dict).

    Raises:
        ConfigFileError: a missing or unreadable file, a ``distributed_type`` or sharding
            strategy layerscope does not model (TPU, Megatron-LM, ``HYBRID_SHARD_ZERO2``,
            fp8), a malformed value, or an unreadable ``deepspeed_config_file``.
    """
    data, path = _load(config, "accelerate")
    source = str(path) if path else "accelerate config"
    if not isinstance(data, Mapping):
        raise ConfigFileError(f"{source}: an accelerate config is a mapping, got {type(data).__name__}")
    kind = str(data.get("distributed_type", "NO")).upper()
    processes = data.get("num_processes", 1)
    machines = data.get("num_machines", 1)
    for key, value in (("num_processes", processes), ("num_machines", machines)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigFileError(f"{source}: {key} must be an int >= 1, got {value!r}")
    if processes % machines:
        raise ConfigFileError(
            f"{source}: num_processes={processes} is not a multiple of num_machines={machines}"
        )
    per_node = processes // machines
    mp = str(data.get("mixed_precision", "no")).lower()
    if mp not in MIXED_PRECISION:
        raise ConfigFileError(
            f"{source}: mixed_precision={mp!r} is not modelled; allowed: {', '.join(MIXED_PRECISION)}"
        )
    precision = MIXED_PRECISION[mp]

    def fail(exc: EstimateError) -> ConfigFileError:
        return ConfigFileError(f"{source}: {exc}")

    if kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        if not isinstance(ds, Mapping):
            raise ConfigFileError(f"{source}: deepspeed_config must be a mapping, got {ds!r}")
        file = ds.get("deepspeed_config_file")
        if file:
            target = Path(file).expanduser()
            if not target.is_absolute() and path is not None and not target.is_file():
                target = path.parent / target
            read = read_deepspeed_config(target, hidden_size=hidden_size, num_gpus=processes,
                                         gpus_per_node=per_node)
            return RunConfig(read.sharding, read.precision or precision, read.optimizer,
                             read.batch_size, read.gradient_checkpointing, source,
                             read.gradient_accumulation_steps)
        stage = ds.get("zero_stage", 2)
        if isinstance(stage, bool) or stage not in (1, 2, 3):
            raise ConfigFileError(
                f"{source}: deepspeed_config.zero_stage={stage!r}; layerscope models ZeRO stages "
                "1, 2 and 3"
            )
        devices = {k: str(ds.get(k, "none")).lower()
                   for k in ("offload_optimizer_device", "offload_param_device")}
        for key, device in devices.items():
            if device not in ("none", "cpu", "nvme"):
                raise ConfigFileError(
                    f"{source}: deepspeed_config.{key} must be none, cpu or nvme, got {device!r}"
                )
        offload = ("params" if devices["offload_param_device"] != "none"
                   else "optimizer" if devices["offload_optimizer_device"] != "none" else None)
        try:
            sharding = Sharding(f"zero{stage}", processes, per_node, offload)
        except EstimateError as exc:
            raise fail(exc) from exc
        accumulation = _given_count(ds, "gradient_accumulation_steps", source, "deepspeed_config.")
        return RunConfig(sharding, precision, source=source,
                         gradient_accumulation_steps=accumulation)
    if kind == "FSDP":
        fsdp = data.get("fsdp_config") or {}
        if not isinstance(fsdp, Mapping):
            raise ConfigFileError(f"{source}: fsdp_config must be a mapping, got {fsdp!r}")
        version = fsdp.get("fsdp_version", 1)
        if version not in (1, 2):
            raise ConfigFileError(f"{source}: fsdp_version must be 1 or 2, got {version!r}")
        if version == 2:
            reshard = fsdp.get("fsdp_reshard_after_forward", True)
            strategy: str | None = (
                "fsdp" if _flag(reshard, "fsdp_reshard_after_forward", source) else "fsdp-grad-op"
            )
        else:  # newer accelerate spells the strategy fsdp_reshard_after_forward for both
            name = fsdp.get("fsdp_sharding_strategy", fsdp.get("fsdp_reshard_after_forward", "FULL_SHARD"))
            strategy = FSDP_STRATEGY_NAMES.get(str(name).lower().replace("-", "_"))
        if strategy is None:
            raise ConfigFileError(
                f"{source}: FSDP sharding strategy {fsdp.get('fsdp_sharding_strategy')!r} is not "
                "modelled; allowed: FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD"
            )
        prefetch = str(fsdp.get("fsdp_backward_prefetch", fsdp.get("fsdp_backward_prefetch_policy",
                                                                   "BACKWARD_PRE"))).upper()
        settings = dict(
            version=version,
            use_orig_params=_flag(fsdp.get("fsdp_use_orig_params", True), "fsdp_use_orig_params", source),
            forward_prefetch=_flag(fsdp.get("fsdp_forward_prefetch", False), "fsdp_forward_prefetch", source),
            backward_prefetch=prefetch in ("BACKWARD_PRE", "BACKWARD_POST"),
        )
        offload = "params" if _flag(fsdp.get("fsdp_offload_params", False), "fsdp_offload_params",
                                    source) else None
        ckpt = fsdp.get("fsdp_activation_checkpointing")
        try:
            sharding = Sharding(strategy, processes, per_node,
                                offload if strategy != "ddp" else None, fsdp=FsdpSettings(**settings))
        except EstimateError as exc:
            raise fail(exc) from exc
        return RunConfig(sharding, precision, gradient_checkpointing=(
            None if ckpt is None else _flag(ckpt, "fsdp_activation_checkpointing", source)),
            source=source)
    if kind in ("MULTI_GPU", "NO"):
        strategy = "ddp" if kind == "MULTI_GPU" and processes > 1 else None
        try:
            sharding = Sharding(strategy, processes if strategy else 1, per_node, ddp=DdpSettings())
        except EstimateError as exc:
            raise fail(exc) from exc
        return RunConfig(sharding, precision, source=source)
    raise ConfigFileError(
        f"{source}: distributed_type={kind!r} is not modelled; allowed: NO, MULTI_GPU, FSDP, DEEPSPEED"
    )
