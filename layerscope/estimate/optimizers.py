"""Optimizer state and step temporaries, per trainable tensor, from the optimizers' source.

Each entry says what the optimizer keeps between steps (``state``) and what its ``step()``
allocates on top of weights, gradients and state at its highest point (``temporary``), for
PyTorch 2.x on CUDA with default arguments (weight decay as the class defaults it). Both are
also given block by block, in the order ``step()`` allocates them, for the caching-allocator
simulation (:mod:`layerscope.estimate.allocator`): the state is created lazily inside the first
``step()``, while the gradients are alive, and the temporaries all live until the update ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from layerscope.estimate.trace import rounded

# (numel, element bytes, shape) of each trainable tensor
Tensors = Sequence[tuple[int, int, tuple[int, ...]]]


@dataclass(frozen=True)
class OptimizerMemory:
    """Bytes an optimizer holds, block by block (allocator-rounded, in allocation order).

    Attributes:
        state_blocks: what it keeps between steps, allocated in the first ``step()``.
        temporary_blocks: what each ``step()`` allocates and frees again, all alive together.
    """

    state_blocks: tuple[int, ...]
    temporary_blocks: tuple[int, ...] = ()

    @property
    def state(self) -> int:
        """Bytes kept between steps."""
        return sum(self.state_blocks)

    @property
    def temporary(self) -> int:
        """Bytes ``step()`` allocates at its highest point."""
        return sum(self.temporary_blocks)


def _adam_foreach(tensors: Tensors) -> OptimizerMemory:
    """``torch.optim.AdamW``/``Adam``, foreach (the CUDA default).

    State: ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype, tensor by tensor
    (``_init_group``); ``step`` is a CPU tensor. Temporary: ``_multi_tensor_adam`` takes
    ``torch._foreach_sqrt(device_exp_avg_sqs)``, a full copy of the second moments of every
    tensor of the dtype group, alive until the update.
    """
    state = tuple(r for n, b, _ in tensors for r in (rounded(n * b), rounded(n * b)))
    return OptimizerMemory(state, tuple(rounded(n * b) for n, b, _ in tensors))


def _adam_fused(tensors: Tensors) -> OptimizerMemory:
    """``AdamW(fused=True)``: one CUDA kernel per tensor list, no temporaries; ``step`` is a
    0-dim fp32 tensor on the GPU, made before the two moments (``_init_group``)."""
    state = tuple(r for n, b, _ in tensors for r in (rounded(4), rounded(n * b), rounded(n * b)))
    return OptimizerMemory(state)


def _sgd(tensors: Tensors) -> OptimizerMemory:
    """``torch.optim.SGD`` without momentum: in-place ``_foreach_add_``, nothing kept."""
    return OptimizerMemory(())


def _sgd_momentum(tensors: Tensors) -> OptimizerMemory:
    """``SGD(momentum=0.9)``: one ``momentum_buffer`` per tensor (a clone of the first
    gradient), updated in place."""
    return OptimizerMemory(tuple(rounded(n * b) for n, b, _ in tensors))


def _adamw_8bit(tensors: Tensors) -> OptimizerMemory:
    """bitsandbytes ``AdamW8bit``: blockwise 8-bit moments, fused update kernel.

    Tensors with at least 4096 elements (``min_8bit_size``) keep two uint8 moments, one fp32
    ``absmax`` per block of 256 elements for each, and two 256-entry fp32 quantisation maps;
    smaller tensors keep fp32 moments (bitsandbytes ``Optimizer8bit.init_state``).
    """
    state: list[int] = []
    for n, _, _ in tensors:
        if n >= 4096:
            blocks = -(-n // 256)
            state += [rounded(n), rounded(4 * 256), rounded(n), rounded(4 * 256),
                      rounded(4 * blocks), rounded(4 * blocks)]
        else:
            state += [rounded(4 * n), rounded(4 * n)]
    return OptimizerMemory(tuple(state))


def _adafactor(tensors: Tensors) -> OptimizerMemory:
    """``torch.optim.Adafactor`` (foreach): factored second moment, no first moment.

    State: ``row_var`` and ``col_var`` for tensors of two or more dimensions, ``variance`` for
    vectors, in the parameter's dtype. Temporary: ``var_estimates``, one full-size tensor per
    parameter (``row_var @ col_var``, or a clone of the variance), alive until the update.
    """
    state: list[int] = []
    for n, b, shape in tensors:
        if len(shape) >= 2:
            state += [rounded((n // shape[-1]) * b), rounded((n // shape[-2]) * b)]
        else:
            state.append(rounded(n * b))
    return OptimizerMemory(tuple(state), tuple(rounded(n * b) for n, b, _ in tensors))


OPTIMIZERS: dict[str, Callable[[Tensors], OptimizerMemory]] = {
    "adamw": _adam_foreach,
    "adamw-fused": _adam_fused,
    "adam": _adam_foreach,
    "sgd": _sgd,
    "sgd-momentum": _sgd_momentum,
    "adamw-8bit": _adamw_8bit,
    "adafactor": _adafactor,
}
