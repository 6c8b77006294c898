"""Peak GPU memory of one training (or inference) step, before any GPU is rented.

How: the step is *traced*, not guessed. A copy of the skeleton reduced to one block per kind
runs forward and backward on fake tensors (:mod:`layerscope.estimate.trace`), with autocast and
attention emulating the CUDA kernels (:mod:`layerscope.estimate.kernels`); every storage is
counted while alive, rounded as the CUDA caching allocator rounds, so what autograd saves, what
the loss materialises and when gradients appear are measured, not modelled. The full model's
step is rebuilt from the traced segments in execution order, and the optimizer step is added
from the optimizers' source (:mod:`layerscope.estimate.optimizers`).

The number predicted is the steady-state peak of ``torch.cuda.max_memory_allocated()`` for the
loop ``out = model(input_ids=x, labels=x); loss = out.loss; del out; loss.backward();
opt.step(); opt.zero_grad(set_to_none=True)`` (gradients exist only between backward and step,
optimizer state always), with the model in training mode.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerscope.build import as_model
from layerscope.errors import EstimateError, LayerscopeWarning, ModelTypeError
from layerscope.estimate.optimizers import OPTIMIZERS
from layerscope.estimate.settings import lora_config, resolve_optimizer, resolve_precision
from layerscope.estimate.trace import (
    Segment,
    reduced_copy,
    replay,
    rounded,
    run_step,
    fake_parameters,
)
from layerscope.units import dtype_bytes, format_bytes

CUDA_CONTEXT_BYTES = 512 * 2**20
"""Bytes the CUDA context takes outside PyTorch's allocator: typically 300-600 MiB on an
H100 with PyTorch 2.x and lazy module loading (``CUDA_MODULE_LOADING=LAZY``, the default since
CUDA 11.7); 512 MiB is assumed, not measured by layerscope."""

ALLOCATOR_HEADROOM = 0.10
"""Fraction of the peak the caching allocator may reserve beyond what is allocated
(fragmentation). In the H100 calibration set ``reserved_peak / peak_steady`` is 1.00-1.20,
most rows under 1.06 (the outlier is gradient checkpointing); 10% is the default margin."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted GPU memory of one step, in bytes (allocator-rounded, CUDA context excluded).

    Attributes:
        peak_bytes: the highest ``torch.cuda.max_memory_allocated()`` of a steady-state step.
        peak_phase: ``"forward"``, ``"backward"`` or ``"optimizer"``: when the peak happens.
        weights_bytes: parameters and buffers (LoRA adapters included).
        gradient_bytes: gradients of the trainable tensors (alive from backward to the step).
        optimizer_state_bytes: what the optimizer keeps between steps.
        optimizer_temporary_bytes: what ``optimizer.step()`` allocates at its highest point.
        activation_bytes: what the forward leaves alive for backward after the last block
            (embedding part and every block; the loss part excluded).
        activation_bytes_per_block: the share of each block, in order.
        logits_bytes: the highest memory of the head and loss above the activations (logits,
            their fp32 copy, log-softmax, and in backward their gradients).
        forward_peak_bytes, backward_peak_bytes, optimizer_peak_bytes: the peak of each phase.
        trainable_params, total_params: parameter counts, each shared tensor counted once.
        batch_size, seq_len, precision, optimizer, gradient_checkpointing, inference, lora_rank:
            the settings estimated.
        forward_flops, backward_flops: FLOPs of one step (``torch.utils.flop_counter``'s
            formulas, on the traced operators), for time estimates.
    """

    peak_bytes: int
    peak_phase: str
    weights_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    optimizer_temporary_bytes: int
    activation_bytes: int
    activation_bytes_per_block: tuple[int, ...]
    logits_bytes: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    optimizer_peak_bytes: int
    trainable_params: int
    total_params: int
    batch_size: int
    seq_len: int
    precision: str
    optimizer: str
    gradient_checkpointing: bool
    inference: bool
    lora_rank: int | None
    forward_flops: int
    backward_flops: int

    def required_bytes(
        self, *, context_bytes: int = CUDA_CONTEXT_BYTES, headroom: float = ALLOCATOR_HEADROOM
    ) -> int:
        """GPU memory needed: ``peak * (1 + headroom) + context_bytes``."""
        if headroom < 0 or context_bytes < 0:
            raise EstimateError(
                f"headroom={headroom} and context_bytes={context_bytes} must be >= 0"
            )
        return int(self.peak_bytes * (1 + headroom)) + context_bytes

    def fits(
        self,
        gpu: int | str,
        *,
        context_bytes: int = CUDA_CONTEXT_BYTES,
        headroom: float = ALLOCATOR_HEADROOM,
    ) -> bool:
        """Whether the step fits on ``gpu`` (bytes, or a name from ``estimate.hardware``).

        Assumes ``context_bytes`` for the CUDA context (:data:`CUDA_CONTEXT_BYTES`) and
        ``headroom`` of the peak for allocator fragmentation (:data:`ALLOCATOR_HEADROOM`).
        """
        return self.required_bytes(context_bytes=context_bytes, headroom=headroom) <= gpu_bytes(gpu)

    def summary(self) -> str:
        """A few lines, GiB labelled as such."""
        rows = [
            ("peak", self.peak_bytes), ("weights", self.weights_bytes),
            ("gradients", self.gradient_bytes), ("optimizer state", self.optimizer_state_bytes),
            ("optimizer temporaries", self.optimizer_temporary_bytes),
            ("activations", self.activation_bytes), ("logits and loss", self.logits_bytes),
        ]
        lines = [f"{name:>22}: {format_bytes(v)}" for name, v in rows]
        lines[0] += f" (during {self.peak_phase})"
        return "\n".join(lines)


def gpu_bytes(gpu: Any) -> int:
    """Memory of ``gpu``: a positive number of bytes, a GPU name or a ``GPU`` from the catalogue."""
    if isinstance(gpu, int) and not isinstance(gpu, bool):
        if gpu <= 0:
            raise EstimateError(f"gpu memory must be > 0 bytes, got {gpu}")
        return gpu
    from layerscope.estimate.hardware import get_gpu

    return get_gpu(gpu).memory_bytes


def _check_settings(batch_size: Any, seq_len: Any) -> None:
    for label, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise EstimateError(f"{label} must be a positive integer, got {value!r}")


def estimate_memory(
    model: Any,
    plan: Any = None,
    *,
    batch_size: int = 1,
    seq_len: int = 2048,
    precision: str = "bf16-mixed",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    lora: Any = None,
    inference: bool = False,
) -> MemoryEstimate:
    """Predict the peak GPU memory of one training step (or an inference forward).

    Args:
        model: an ``nn.Module`` (meta or real; a Hugging Face causal LM taking
            ``input_ids``/``labels``), or anything ``layerscope.build.empty_model`` accepts.
        plan: a freeze plan (anything with ``resolve(model).frozen_names``); ``None`` uses the
            model's current ``requires_grad`` flags.
        batch_size: sequences per step (> 0).
        seq_len: tokens per sequence (> 0); beyond ``max_position_embeddings`` warns.
        precision: ``"32-true"``, ``"bf16-true"``, ``"16-true"``, ``"bf16-mixed"``,
            ``"16-mixed"`` (aliases ``"fp32"``, ``"bf16"``, ``"fp16"``; see
            :mod:`~layerscope.estimate.settings`).
        optimizer: one of :data:`~layerscope.estimate.settings.OPTIMIZERS`.
        gradient_checkpointing: transformers' ``gradient_checkpointing_enable()``
            (non-reentrant).
        lora: a peft ``LoraConfig``, or a rank (adapters on every Linear of the blocks, see
            :func:`~layerscope.estimate.settings.lora_config`): adapters added (fp32, as peft
            upcasts them), base frozen; with a ``plan``, the plan's trainable base parameters
            stay trainable too.
        inference: forward only under ``no_grad`` in eval mode, logits dropped.

    Returns:
        A :class:`MemoryEstimate`. The caller's model is not modified.
    """
    precision = resolve_precision(precision).name
    optimizer = resolve_optimizer(optimizer)
    _check_settings(batch_size, seq_len)
    model = as_model(model)
    names = _param_names(model)
    if plan is None:
        trainable = frozenset(n for n, p in names if p.requires_grad)
    else:
        resolve = getattr(plan, "resolve", None)
        if resolve is None:
            raise EstimateError(f"plan must be a FreezePlan (with .resolve(model)), got {type(plan).__name__}")
        frozen = frozenset(resolve(model).frozen_names)
        trainable = frozenset(n for n, _ in names if n not in frozen)
    if lora is not None and plan is None:
        trainable = frozenset()  # peft freezes the base model
    if not isinstance(gradient_checkpointing, bool) or not isinstance(inference, bool):
        raise EstimateError(
            f"gradient_checkpointing and inference must be bools, got "
            f"{gradient_checkpointing!r} and {inference!r}"
        )
    return estimate_memory_for(
        model, trainable, batch_size=batch_size, seq_len=seq_len, precision=precision,
        optimizer=optimizer, gradient_checkpointing=gradient_checkpointing, lora=lora,
        inference=inference,
    )


def _param_names(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(model.named_parameters(remove_duplicate=False))


def estimate_memory_for(
    model: nn.Module,
    trainable: Iterable[str],
    *,
    batch_size: int = 1,
    seq_len: int = 2048,
    precision: str = "bf16-mixed",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    lora: Any = None,
    inference: bool = False,
) -> MemoryEstimate:
    """:func:`estimate_memory` for an explicit set of trainable parameter names.

    A tensor shared under several names (a tied head) is trainable if any of its names is.
    """
    prec = resolve_precision(precision)
    optimizer = resolve_optimizer(optimizer)
    _check_settings(batch_size, seq_len)
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    lora = lora_config(model, lora)
    trainable = frozenset(trainable)
    named = _param_names(model)
    unknown = trainable - {n for n, _ in named}
    if unknown:
        raise EstimateError(f"trainable names not in the model: {sorted(unknown)[:5]}")
    param_dtype, autocast_dtype = prec.param_dtype, prec.autocast_dtype
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        raise EstimateError("the model has no config.vocab_size; a Hugging Face causal LM is needed")
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(max_pos, int) and seq_len > max_pos:
        warnings.warn(
            f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}",
            LayerscopeWarning, stacklevel=2,
        )

    # Tensors by identity; a shared tensor is trainable if any of its names is.
    tensors: dict[int, nn.Parameter] = {}
    is_trainable: dict[int, bool] = {}
    for name, p in named:
        tensors[id(p)] = p
        is_trainable[id(p)] = is_trainable.get(id(p), False) or name in trainable
    if not inference and lora is None and not any(
        t and tensors[i].is_floating_point() for i, t in is_trainable.items()
    ):
        raise EstimateError(
            "nothing is trainable (every parameter is frozen and lora is None): a training "
            "step has no backward; use inference=True for a forward-only estimate"
        )

    blocks_name, blocks = _block_stack(model)
    lora_targets = _lora_targets(model, lora) if lora is not None else frozenset()
    kinds, reps = _block_kinds(model, blocks_name, blocks, is_trainable, lora_targets, config)

    reduced, kept, memo = reduced_copy(model, blocks, reps)
    trainable_copy = {id(memo[i]) for i, t in is_trainable.items() if t and i in memo}
    lora_ids: set[int] = set()
    if lora is not None:
        lora_ids = _inject_lora(reduced, lora, memo, lora_targets, blocks_name, reps)
    if gradient_checkpointing and not inference:
        enable = getattr(reduced, "gradient_checkpointing_enable", None)
        if enable is None or not getattr(reduced, "supports_gradient_checkpointing", False):
            raise EstimateError(f"{type(model).__name__} does not support gradient checkpointing")
        with warnings.catch_warnings():  # transformers 5 renames it; same behaviour
            warnings.simplefilter("ignore", FutureWarning)
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reduced.train(not inference)

    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()

    def dtype_of(name: str, p: torch.Tensor) -> torch.dtype:
        if not p.is_floating_point():
            return p.dtype
        # peft upcasts adapters of a bf16/fp16 model to fp32 (autocast_adapter_dtype=True)
        return torch.float32 if id(p) in lora_ids else param_dtype

    def trainable_of(p: torch.Tensor) -> bool:
        return id(p) in trainable_copy or id(p) in lora_ids

    block_kinds = [kinds[i] for i in range(len(blocks))]
    kind_of_position = [kinds[r] for r in reps]
    lora_tensors = _lora_tensors(reduced, kept, kind_of_position, block_kinds, lora_ids)
    fake_parameters(reduced, mode, dtype_of, trainable_of)
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # a failing op is reported below, once, not logged
    try:
        trace = run_step(
            reduced, kept, kinds=kind_of_position, batch_size=batch_size, seq_len=seq_len,
            vocab_size=vocab, autocast_dtype=autocast_dtype, inference=inference, mode=mode,
        )
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # the model's own forward
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EstimateError(
            f"{type(model).__name__}: its forward failed when traced with batch_size="
            f"{batch_size}, seq_len={seq_len} ({first})"
        ) from exc
    finally:
        fake_log.setLevel(level)
    rep = replay(trace, block_kinds, inference)

    # static memory of the full model
    pbytes = int(dtype_bytes(param_dtype))
    weights = sum(
        rounded(p.numel() * (pbytes if p.is_floating_point() else p.element_size()))
        for p in tensors.values()
    )
    weights += sum(rounded(b.numel() * b.element_size()) for b in model.buffers())
    train_list = [
        (p.numel(), pbytes, tuple(p.shape)) for i, p in tensors.items() if is_trainable[i]
    ]
    lora_numel = sum(n for n, _, _ in lora_tensors)
    weights += sum(rounded(n * b) for n, b, _ in lora_tensors)
    train_list += lora_tensors
    gradients = sum(rounded(n * b) for n, b, _ in train_list)
    total_params = sum(p.numel() for p in tensors.values()) + lora_numel
    trainable_params = sum(n for n, _, _ in train_list)

    if inference:
        opt_state, opt_temp = 0, 0
        gradients = 0
    else:
        opt = OPTIMIZERS[optimizer](train_list)
        opt_state, opt_temp = opt.state, opt.temporary
    persistent = weights + opt_state
    optimizer_peak = 0 if inference else persistent + rep.end + opt_temp
    peak, phase = max(
        (persistent + rep.forward_peak, "forward"),
        (0 if inference else persistent + rep.backward_peak, "backward"),
        (optimizer_peak, "optimizer"),
    )
    seg = trace.segments
    per_block = tuple(seg.get((k, "fwd"), Segment()).net for k in block_kinds)
    embed = seg.get(("embed", "fwd"), Segment()).net
    head_fwd = seg.get(("head", "fwd"), Segment())
    head_bwd = seg.get(("head", "bwd"), Segment())
    logits = max(head_fwd.high, head_fwd.net + head_bwd.high)
    flops_f = sum(seg.get((p, "fwd"), Segment()).flops for p in ["embed", "head", *block_kinds])
    flops_b = sum(seg.get((p, "bwd"), Segment()).flops for p in ["embed", "head", *block_kinds])
    return MemoryEstimate(
        peak_bytes=peak,
        peak_phase=phase,
        weights_bytes=weights,
        gradient_bytes=gradients,
        optimizer_state_bytes=opt_state,
        optimizer_temporary_bytes=opt_temp,
        activation_bytes=embed + sum(per_block),
        activation_bytes_per_block=per_block,
        logits_bytes=logits,
        forward_peak_bytes=persistent + rep.forward_peak,
        backward_peak_bytes=0 if inference else persistent + rep.backward_peak,
        optimizer_peak_bytes=optimizer_peak,
        trainable_params=0 if inference else trainable_params,
        total_params=total_params,
        batch_size=batch_size,
        seq_len=seq_len,
        precision=prec.name,
        optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing,
        inference=inference,
        lora_rank=getattr(lora, "r", None) if lora is not None else None,
        forward_flops=flops_f,
        backward_flops=0 if inference else flops_b,
    )


def _block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The main block stack as found by :func:`layerscope.scan.scan` (empty when none)."""
    from layerscope.scan import scan

    s = scan(model)
    if s.primary is None:
        return "", nn.ModuleList()
    stack = model.get_submodule(s.layers.path)
    if not isinstance(stack, nn.ModuleList):
        raise EstimateError(f"{s.layers.path} is a {type(stack).__name__}; a ModuleList of blocks is needed")
    return s.layers.path, stack


def _block_kinds(
    model: nn.Module,
    blocks_name: str,
    blocks: nn.ModuleList,
    is_trainable: dict[int, bool],
    lora_targets: frozenset[str],
    config: Any,
) -> tuple[list[int], list[int]]:
    """Kind index of every block, and the first block of each kind.

    Two blocks are of one kind when they have the same trainable flags, the same LoRA targets,
    the same layer type, and both do or both do not receive an input that needs a gradient
    (true once anything before them is trainable). Block 0 is a kind of its own.
    """
    in_blocks = {id(p) for p in blocks.parameters()}
    grad_in = False
    for _, p in model.named_parameters():  # registration order: what precedes the blocks
        if id(p) in in_blocks:
            break
        grad_in = grad_in or is_trainable[id(p)]
    prefix_all = f"{blocks_name}." if blocks_name else ""
    for name, _ in model.named_modules():
        if name.startswith(prefix_all) and prefix_all:
            break
        grad_in = grad_in or name in lora_targets
    layer_types = getattr(config, "layer_types", None)
    if not isinstance(layer_types, (list, tuple)) or len(layer_types) != len(blocks):
        layer_types = [None] * len(blocks)
    index: dict[tuple, int] = {}
    kinds: list[int] = []
    reps: list[int] = []
    for i, block in enumerate(blocks):
        flags = tuple(
            (n, is_trainable[id(p)]) for n, p in block.named_parameters(remove_duplicate=False)
        )
        prefix = f"{prefix_all}{i}."
        targets = tuple(sorted(t[len(prefix):] for t in lora_targets if t.startswith(prefix)))
        # The first block is always its own kind: its input (the embedding output) is still
        # referenced by the model's forward, so it is not freed when the block is done with it.
        key = ("first",) if i == 0 else (flags, targets, grad_in, layer_types[i])
        if key not in index:
            index[key] = len(index)
            reps.append(i)
        kinds.append(index[key])
        grad_in = grad_in or any(f for _, f in flags) or bool(targets)
    return kinds, reps


def _lora_targets(model: nn.Module, lora: Any) -> frozenset[str]:
    """Names of the modules a peft ``LoraConfig`` would adapt in ``model``."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    if not isinstance(lora, LoraConfig):
        raise EstimateError(f"lora must be a peft LoraConfig, got {type(lora).__name__}")
    supported = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)
    names = set()
    for name, module in model.named_modules():
        is_conv1d = type(module).__name__ == "Conv1D"  # transformers' GPT-2 projection
        if name and (isinstance(module, supported) or is_conv1d):
            if check_target_module_exists(lora, name):
                names.add(name)
    if not names:
        raise EstimateError(
            f"LoRA target_modules={lora.target_modules!r} match no Linear/Embedding/Conv module of "
            f"{type(model).__name__}"
        )
    return frozenset(names)


def _inject_lora(
    reduced: nn.Module, lora: Any, memo: dict[int, Any], targets: frozenset[str],
    blocks_name: str, reps: list[int],
) -> set[int]:
    """Add the adapters to the reduced copy; returns the ids of the adapter parameters."""
    from peft import inject_adapter_in_model

    prefix = f"{blocks_name}." if blocks_name else None
    position = {i: p for p, i in enumerate(reps)}
    mapped = []
    for name in targets:
        if prefix and name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            if int(index) in position:
                mapped.append(f"{prefix}{position[int(index)]}.{rest}")
        else:
            mapped.append(name)
    config = dataclasses.replace(
        lora, target_modules=sorted(mapped), layers_to_transform=None, layers_pattern=None,
        exclude_modules=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_adapter_in_model(config, reduced)
    return {id(p) for n, p in reduced.named_parameters() if "lora_" in n}


def _lora_tensors(
    reduced: nn.Module, kept: nn.ModuleList, kind_of_position: list[int],
    block_kinds: list[int], lora_ids: set[int],
) -> list[tuple[int, int, tuple[int, ...]]]:
    """(numel, bytes per element, shape) of every adapter tensor of the full model (fp32)."""
    if not lora_ids:
        return []
    in_kept = {id(p) for b in kept for p in b.parameters()}
    per_kind: dict[int, list] = {}
    for position, block in enumerate(kept):
        per_kind[kind_of_position[position]] = [
            (p.numel(), 4, tuple(p.shape)) for p in block.parameters() if id(p) in lora_ids
        ]
    out = [t for k in block_kinds for t in per_kind.get(k, [])]
    out += [(p.numel(), 4, tuple(p.shape)) for p in reduced.parameters()
            if id(p) in lora_ids and id(p) not in in_kept]
    return out


@dataclass(frozen=True)
class MemorySavings:
    """Memory of a freeze plan next to full fine-tuning, same settings.

    Attributes:
        baseline: every parameter trainable.
        planned: the plan (or the model's flags).
        saved_bytes: ``baseline.peak_bytes - planned.peak_bytes``.
        saved_fraction: ``saved_bytes / baseline.peak_bytes``.
    """

    baseline: MemoryEstimate
    planned: MemoryEstimate
    saved_bytes: int
    saved_fraction: float


def estimate_memory_savings(model: Any, plan: Any = None, **settings: Any) -> MemorySavings:
    """Peak memory saved by ``plan`` (``None``: the model's flags) against full fine-tuning.

    ``settings`` are :func:`estimate_memory`'s keyword arguments.
    """
    model = as_model(model)
    everything = frozenset(n for n, _ in _param_names(model))
    baseline = estimate_memory_for(model, everything, **settings)
    planned = estimate_memory(model, plan, **settings)
    saved = baseline.peak_bytes - planned.peak_bytes
    return MemorySavings(baseline, planned, saved, saved / baseline.peak_bytes)


def max_batch_size(
    model: Any,
    gpu: int | str,
    plan: Any = None,
    *,
    limit: int = 65536,
    context_bytes: int = CUDA_CONTEXT_BYTES,
    headroom: float = ALLOCATOR_HEADROOM,
    **settings: Any,
) -> int:
    """The largest batch size whose step fits on ``gpu`` (0 if none does), up to ``limit``.

    Memory grows with the batch by a near-constant step (activations are linear in it); the
    search starts from that linear guess and confirms it with full estimates.
    ``settings`` are :func:`estimate_memory`'s keyword arguments other than ``batch_size``.
    """
    if "batch_size" in settings:
        raise EstimateError("max_batch_size searches batch_size; do not pass it")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise EstimateError(f"limit must be a positive integer, got {limit!r}")
    budget = gpu_bytes(gpu)
    model = as_model(model)

    def fits(b: int) -> bool:
        est = estimate_memory(model, plan, batch_size=b, **settings)
        return est.fits(budget, context_bytes=context_bytes, headroom=headroom)

    if not fits(1):
        return 0
    one = estimate_memory(model, plan, batch_size=1, **settings).required_bytes(
        context_bytes=context_bytes, headroom=headroom)
    two = estimate_memory(model, plan, batch_size=2, **settings).required_bytes(
        context_bytes=context_bytes, headroom=headroom)
    step = max(two - one, 1)
    guess = max(1, min(limit, 1 + (budget - one) // step))
    good, bad = 1, limit + 1
    if fits(guess):
        good = guess
        probe = guess + 1
        while probe <= limit and fits(probe):
            good, probe = probe, min(limit + 1, probe + max(1, probe - guess) * 2)
        bad = min(probe, limit + 1)
    else:
        bad = guess
    while bad - good > 1:  # fits(good), not fits(bad)
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good
