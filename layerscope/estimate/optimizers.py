"""Optimizer state and step temporaries, per trainable tensor, from the optimizers' source.

Each entry says what the optimizer keeps between steps (``state``) and what its ``step()``
allocates on top of weights, gradients and state at its highest point (``temporary``), for
PyTorch 2.x on CUDA with default arguments (weight decay as the class defaults it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from layerscope.estimate.trace import rounded

# (numel, element bytes, shape) of each trainable tensor
Tensors = Sequence[tuple[int, int, tuple[int, ...]]]


@dataclass(frozen=True)
class OptimizerMemory:
    """Bytes an optimizer holds: ``state`` between steps, ``temporary`` at the peak of ``step()``."""

    state: int
    temporary: int


def _adam_foreach(tensors: Tensors) -> OptimizerMemory:
    """``torch.optim.AdamW``/``Adam``, foreach (the CUDA default).

    State: ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype; ``step`` is a CPU tensor.
    Temporary: ``_multi_tensor_adam`` takes ``torch._foreach_sqrt(device_exp_avg_sqs)``, a full
    copy of the second moments of every tensor of the dtype group, alive until the update.
    """
    state = sum(2 * rounded(n * b) for n, b, _ in tensors)
    return OptimizerMemory(state=state, temporary=sum(rounded(n * b) for n, b, _ in tensors))


def _adam_fused(tensors: Tensors) -> OptimizerMemory:
    """``AdamW(fused=True)``: one CUDA kernel per tensor list, no temporaries; ``step`` on the GPU."""
    state = sum(2 * rounded(n * b) + rounded(4) for n, b, _ in tensors)
    return OptimizerMemory(state=state, temporary=0)


def _sgd(tensors: Tensors) -> OptimizerMemory:
    """``torch.optim.SGD`` without momentum: in-place ``_foreach_add_``, nothing kept."""
    return OptimizerMemory(state=0, temporary=0)


def _sgd_momentum(tensors: Tensors) -> OptimizerMemory:
    """``SGD(momentum=0.9)``: one ``momentum_buffer`` per tensor, updated in place."""
    return OptimizerMemory(state=sum(rounded(n * b) for n, b, _ in tensors), temporary=0)


def _adamw_8bit(tensors: Tensors) -> OptimizerMemory:
    """bitsandbytes ``AdamW8bit``: blockwise 8-bit moments, fused update kernel.

    Tensors with at least 4096 elements (``min_8bit_size``) keep two uint8 moments, one fp32
    ``absmax`` per block of 256 elements for each, and two 256-entry fp32 quantisation maps;
    smaller tensors keep fp32 moments (bitsandbytes ``Optimizer8bit.init_state``).
    """
    state = 0
    for n, _, _ in tensors:
        if n >= 4096:
            blocks = -(-n // 256)
            state += 2 * rounded(n) + 2 * rounded(4 * blocks) + 2 * rounded(4 * 256)
        else:
            state += 2 * rounded(4 * n)
    return OptimizerMemory(state=state, temporary=0)


def _adafactor(tensors: Tensors) -> OptimizerMemory:
    """``torch.optim.Adafactor`` (foreach): factored second moment, no first moment.

    State: ``row_var`` and ``col_var`` for tensors of two or more dimensions, ``variance`` for
    vectors, in the parameter's dtype. Temporary: ``var_estimates``, one full-size tensor per
    parameter (``row_var @ col_var``, or a clone of the variance), alive until the update.
    """
    state = 0
    for n, b, shape in tensors:
        if len(shape) >= 2:
            rows = n // shape[-1]
            state += rounded(rows * b) + rounded((n // shape[-2]) * b)
        else:
            state += rounded(n * b)
    return OptimizerMemory(state=state, temporary=sum(rounded(n * b) for n, b, _ in tensors))


OPTIMIZERS: dict[str, Callable[[Tensors], OptimizerMemory]] = {
    "adamw": _adam_foreach,
    "adamw-fused": _adam_fused,
    "adam": _adam_foreach,
    "sgd": _sgd,
    "sgd-momentum": _sgd_momentum,
    "adamw-8bit": _adamw_8bit,
    "adafactor": _adafactor,
}
