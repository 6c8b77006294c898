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
        state_blocks: what it keeps between steps through PyTorch's CUDA allocator, allocated
            in the first ``step()``.
        temporary_blocks: what each ``step()`` allocates and frees again, all alive together.
        paged: state bitsandbytes' paged optimizers keep in CUDA unified memory
            (``cudaMallocManaged``), outside PyTorch's allocator: in no block, in no peak.
    """

    state_blocks: tuple[int, ...]
    temporary_blocks: tuple[int, ...] = ()
    paged: int = 0

    @property
    def state(self) -> int:
        """Bytes kept between steps (through PyTorch's allocator)."""
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


def _adam_hf(tensors: Tensors) -> OptimizerMemory:
    """transformers' own ``AdamW`` (``transformers/optimization.py``, the Trainer's
    ``optim="adamw_hf"``, its default before ``adamw_torch``): a Python loop over the tensors.

    State: ``exp_avg`` and ``exp_avg_sq`` (``torch.zeros_like(p)``) per tensor, as torch's.
    Temporary: ``denom = exp_avg_sq.sqrt().add_(eps)``, one tensor's size; the loop's previous
    ``denom`` is freed only when the name is rebound, after the next ``sqrt()`` is made, so
    the two consecutive tensors with the largest sum are alive at once (every other update is
    in place: ``mul_``, ``add_``, ``addcmul_``, ``addcdiv_``).
    """
    state = tuple(r for n, b, _ in tensors for r in (rounded(n * b), rounded(n * b)))
    sizes = [rounded(n * b) for n, b, _ in tensors]
    if len(sizes) < 2:
        return OptimizerMemory(state, tuple(sizes))
    i = max(range(len(sizes) - 1), key=lambda k: sizes[k] + sizes[k + 1])
    return OptimizerMemory(state, (sizes[i], sizes[i + 1]))


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


MIN_8BIT_SIZE = 4096
"""bitsandbytes' ``min_8bit_size``: smaller tensors keep fp32 moments in an 8-bit optimizer."""

PAGED_MIN_NUMEL = 100_000
"""``Optimizer8bit.get_state_buffer``: a paged optimizer pages a state buffer only for tensors of
at least 1e5 elements; smaller ones get ``torch.zeros_like`` on the GPU like any optimizer."""


def _bnb_adam(tensors: Tensors, bits: int, paged: bool) -> OptimizerMemory:
    """bitsandbytes' Adam-family ``Optimizer2State`` (``AdamW8bit``, ``PagedAdamW8bit``,
    ``PagedAdamW32bit``), from ``init_state`` and ``get_state_buffer`` (bitsandbytes 0.50.1):

    * 32-bit, or a tensor under :data:`MIN_8BIT_SIZE`: two fp32 moments (fp32 whatever the
      parameter's dtype);
    * 8-bit: two uint8 moments and two fp32 ``absmax`` of one value per 256 elements; the two
      256-entry fp32 maps (``qmap1``, ``qmap2``) are the optimizer's own, shared by every tensor;
    * paged: a moment of a tensor of at least :data:`PAGED_MIN_NUMEL` elements is allocated with
      ``cudaMallocManaged`` (``F.get_paged``, wrapped as a CPU tensor): outside PyTorch's
      allocator, so never in ``torch.cuda.max_memory_allocated()`` or ``_reserved()``; the
      ``absmax`` stay ordinary CUDA tensors.

    The update is one fused kernel per tensor: no temporaries.
    """
    state: list[int] = []
    paged_bytes = 0
    maps = False
    for n, _, _ in tensors:
        eight = bits == 8 and n >= MIN_8BIT_SIZE
        if eight and not maps:  # the first 8-bit tensor moves the two maps to the GPU
            state += [rounded(4 * 256), rounded(4 * 256)]
            maps = True
        moment = n if eight else 4 * n
        if paged and n >= PAGED_MIN_NUMEL:
            paged_bytes += 2 * moment
        else:
            state += [rounded(moment), rounded(moment)]
        if eight:
            state += [rounded(4 * -(-n // 256)), rounded(4 * -(-n // 256))]
    return OptimizerMemory(tuple(state), paged=paged_bytes)


def _adamw_8bit(tensors: Tensors) -> OptimizerMemory:
    """bitsandbytes ``AdamW8bit`` (see :func:`_bnb_adam`)."""
    return _bnb_adam(tensors, 8, paged=False)


def _paged_adamw_8bit(tensors: Tensors) -> OptimizerMemory:
    """bitsandbytes ``PagedAdamW8bit`` (see :func:`_bnb_adam`)."""
    return _bnb_adam(tensors, 8, paged=True)


def _paged_adamw_32bit(tensors: Tensors) -> OptimizerMemory:
    """bitsandbytes ``PagedAdamW32bit`` (see :func:`_bnb_adam`)."""
    return _bnb_adam(tensors, 32, paged=True)


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
    "adamw-hf": _adam_hf,
    "adam": _adam_foreach,
    "sgd": _sgd,
    "sgd-momentum": _sgd_momentum,
    "adamw-8bit": _adamw_8bit,
    "adafactor": _adafactor,
    "paged-adamw-8bit": _paged_adamw_8bit,
    "paged-adamw-32bit": _paged_adamw_32bit,
}
