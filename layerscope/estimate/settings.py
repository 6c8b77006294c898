"""The settings every estimate shares, defined once: precisions, optimizers and LoRA.

Precision names are Lightning's (``"bf16-mixed"``, ``"32-true"``, ...) with short aliases;
optimizer names are layerscope's (``"adamw"`` is PyTorch's default foreach AdamW).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerscope.errors import EstimateError


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

OPTIMIZERS = ("adamw", "adamw-fused", "adam", "sgd", "sgd-momentum", "adamw-8bit", "adafactor")
"""``adamw``/``adam``: torch.optim, foreach (the CUDA default); ``adamw-fused``:
``AdamW(fused=True)``; ``sgd``/``sgd-momentum``: torch.optim.SGD without/with momentum;
``adamw-8bit``: bitsandbytes ``AdamW8bit``; ``adafactor``: ``torch.optim.Adafactor``."""
OPTIMIZER_ALIASES = {
    "adamw_fused": "adamw-fused", "fused_adamw": "adamw-fused", "fused-adamw": "adamw-fused",
    "sgd_momentum": "sgd-momentum", "sgdm": "sgd-momentum", "adamw_8bit": "adamw-8bit",
    "adamw8bit": "adamw-8bit",
}


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


def block_linear_names(model: nn.Module) -> list[str]:
    """Leaf names (``q_proj``, ``c_attn``, ...) of the Linear layers inside the block stack."""
    from layerscope.scan import scan

    prefix = scan(model).layers.path + "."
    names = {
        name.rpartition(".")[2]
        for name, m in model.named_modules()
        if name.startswith(prefix) and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
    }
    return sorted(names)


def lora_rank(lora: Any) -> int | None:
    """The rank of ``lora`` (a peft ``LoraConfig`` or a rank), None for None.

    Raises:
        EstimateError: anything else, or a rank below 1.
    """
    if lora is None:
        return None
    rank = getattr(lora, "r", lora) if type(lora).__name__ == "LoraConfig" else lora
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise EstimateError(f"lora must be a peft LoraConfig or a rank >= 1, got {lora!r}")
    return rank


def lora_config(model: nn.Module, lora: Any) -> Any:
    """``lora`` as a peft ``LoraConfig`` (None stays None).

    An int is a rank: adapters on every Linear layer of the blocks, ``lora_alpha = 2 * rank``,
    no dropout (the calibration set's adapters).

    Raises:
        EstimateError: not a LoraConfig, a positive int or None.
    """
    if lora is None:
        return None
    from peft import LoraConfig

    if isinstance(lora, LoraConfig):
        return lora
    if isinstance(lora, bool) or not isinstance(lora, int) or lora < 1:
        raise EstimateError(f"lora must be a peft LoraConfig or a rank >= 1, got {lora!r}")
    targets = block_linear_names(model)
    if not targets:
        raise EstimateError(f"lora={lora}: {type(model).__name__} has no Linear layer in its blocks")
    return LoraConfig(r=lora, lora_alpha=2 * lora, lora_dropout=0.0, target_modules=targets)
