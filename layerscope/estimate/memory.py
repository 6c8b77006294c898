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
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from typing_extensions import Unpack

from layerscope.checks import MAX_SIZE, whole
from layerscope.compat import use_attention, use_experts
from layerscope.errors import EstimateError, UnsupportedModelError
from layerscope.estimate.accumulation import (
    NONE,
    KeptGradients,
    accumulated_reserved,
    embedding_grad_numel,
    traced_grads,
)
from layerscope.estimate.allocator import Op, StepEvents, build_ops, simulate_loop, step_events
from layerscope.estimate.cache import model_cache
from layerscope.estimate.hardware import GPU
from layerscope.estimate.input_types import Sizes, StepInputs, text_config
from layerscope.estimate.inputs import prepare_copy, step_inputs
from layerscope.estimate.optimizers import OPTIMIZERS, OptimizerMemory
from layerscope.estimate.trace import (
    Replay,
    ReshapingBlocks,
    Segment,
    StepTrace,
    fake_parameters,
    reduced_copy,
    replay,
    rounded,
    run_step,
    token_counter,
)
from layerscope.plan import FreezePlan
from layerscope.process import deferred_interrupts, quiet_warnings
from layerscope.scan import ModelScan
from layerscope.setup import Lora, Settings, TrainingSetup, make_setup
from layerscope.units import dtype_bytes, format_bytes

CUDA_CONTEXT_BYTES = 512 * 2**20
"""Bytes the CUDA context takes outside PyTorch's allocator: typically 300-600 MiB on an
H100 with PyTorch 2.x and lazy module loading (``CUDA_MODULE_LOADING=LAZY``, the default since
CUDA 11.7); 512 MiB is assumed, not measured by layerscope. ``nvidia-smi`` shows it on top of
what the caching allocator reserves (:attr:`MemoryEstimate.reserved_bytes`)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted GPU memory of one step, in bytes (allocator-rounded, CUDA context excluded).

    Attributes:
        peak_bytes: the highest ``torch.cuda.max_memory_allocated()`` of a steady-state step.
        peak_phase: ``"forward"``, ``"backward"`` or ``"optimizer"``: when the peak happens.
        reserved_bytes: the predicted ``torch.cuda.max_memory_reserved()`` of the loop (what
            ``nvidia-smi`` shows, less the CUDA context): the segments the caching allocator
            holds at its highest, from a simulation of the allocator over the model's build
            and the steps' allocations (:mod:`layerscope.estimate.allocator`); at least
            ``peak_bytes``.
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
        batch_size, seq_len, precision, optimizer, gradient_checkpointing, inference, lora_rank,
            attn_implementation: the settings estimated.
        forward_flops, backward_flops: FLOPs of one step (``torch.utils.flop_counter``'s
            formulas, on the traced operators), for time estimates.
        distributed, num_gpus, offload: the sharding estimated (one GPU: None, 1, None); every
            byte figure is then of the busiest GPU, ``batch_size`` per GPU.
        master_weights_bytes: fp32 master weights on the GPU (DeepSpeed ZeRO's partition).
        buffer_bytes: collective buffers kept for the whole run (DDP's gradient buckets,
            ZeRO's bucket and gradient partition buffer, offload staging buffers).
        held_bytes: what the strategy held besides activations at the peak (gathered
            parameters, all-gather and reduce-scatter buffers, buckets, sharded gradients).
        host_bytes: CPU memory the run needs per node for offloaded states and pinned buffers
            (all the node's GPUs together).
        quantization: the quantized base's method (``"nf4"``, ``"fp4"``, ``"int8"``) or None.
        quantized_base_bytes: the part of ``weights_bytes`` that is the quantized layers
            (packed weights and their quantisation state, allocator-rounded).
        paged_optimizer_bytes: optimizer state that bitsandbytes' paged optimizers keep in CUDA
            unified memory (``cudaMallocManaged``), outside PyTorch's allocator: not in
            ``peak_bytes`` (nor in ``torch.cuda.max_memory_allocated()``); paged onto the GPU
            during ``optimizer.step()`` when there is room and evicted to host RAM under
            pressure, so it does not decide whether the step fits.
        inputs: what the step fed the model (:mod:`layerscope.estimate.inputs`): its task,
            tensors and the image tokens counted in each sequence.
    """

    peak_bytes: int
    peak_phase: str
    reserved_bytes: int
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
    attn_implementation: str
    forward_flops: int
    backward_flops: int
    distributed: str | None = None
    num_gpus: int = 1
    offload: str | None = None
    master_weights_bytes: int = 0
    buffer_bytes: int = 0
    held_bytes: int = 0
    host_bytes: int = 0
    quantization: str | None = None
    quantized_base_bytes: int = 0
    paged_optimizer_bytes: int = 0
    inputs: StepInputs | None = None

    def required_bytes(self, *, context_bytes: int = CUDA_CONTEXT_BYTES) -> int:
        """GPU memory needed: what the caching allocator reserves (``reserved_bytes``) plus the
        CUDA context (``context_bytes``, :data:`CUDA_CONTEXT_BYTES` by default)."""
        whole(context_bytes, "context_bytes", EstimateError)
        return self.reserved_bytes + context_bytes

    def fits(self, gpu: int | str, *, context_bytes: int = CUDA_CONTEXT_BYTES) -> bool:
        """Whether the step fits on ``gpu`` (bytes, or a name from ``estimate.hardware``):
        :meth:`required_bytes` at most its memory.

        The reserved memory is what the allocator takes when memory is plentiful; on a GPU
        too small for it, PyTorch frees its unused cached segments and retries before it
        fails, so a step a little over the line may still run (slower, after ``cudaMalloc``
        retries); none runs in less than ``peak_bytes`` plus the context.
        """
        return self.required_bytes(context_bytes=context_bytes) <= gpu_bytes(gpu)

    def summary(self) -> str:
        """A few lines, GiB labelled as such."""
        rows = [
            ("peak", self.peak_bytes), ("reserved (allocator)", self.reserved_bytes),
            ("weights", self.weights_bytes),
            *([("of which quantized base", self.quantized_base_bytes)] if self.quantization else []),
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
        return whole(gpu, "gpu memory (bytes)", EstimateError, minimum=1)
    from layerscope.estimate.hardware import get_gpu

    return get_gpu(gpu).memory_bytes


def estimate_memory(
    model: Any,
    plan: FreezePlan | None = None,
    **settings: Unpack[Settings],
) -> MemoryEstimate:
    """Predict the peak GPU memory of one training step (or an inference forward).

    Args:
        model: an ``nn.Module`` (meta or real; never modified), a model source
            (``empty_model`` accepts it), or a :class:`~layerscope.setup.TrainingSetup`.
        plan: a :class:`~layerscope.plan.FreezePlan`; ``None`` uses the model's current
            ``requires_grad`` flags (or, given a setup, the setup's plan).
        **settings: the step (``batch_size``, ``seq_len``, ``precision``, ``optimizer``,
            ``gradient_checkpointing``, ``lora``, ``attn_implementation``, ``inference``,
            ``quantization``, ``base_dtype``, ``lora_dtype``, ``prepare_kbit``):
            the keyword arguments of :class:`~layerscope.setup.TrainingSetup`, which documents
            them and their defaults. ``None`` means not given: with a setup, the setup's value.

    Returns:
        A :class:`MemoryEstimate`. One trace is shared by every estimate of the same model and
        step (only the optimizer may differ).
    """
    return memory_of(make_setup(model, plan, **settings))


@dataclass(frozen=True)
class _Step:
    """What a setup's memory is made of besides the optimizer (shared across optimizers)."""

    replay: Replay
    weights: int
    quantized_base: int
    trainable_tensors: tuple[tuple[int, int, tuple[int, ...]], ...]
    total_params: int
    per_block: tuple[int, ...]
    embed: int
    logits: int
    forward_flops: int
    backward_flops: int
    events: StepEvents
    build: tuple[Op, ...]
    trace: StepTrace
    block_kinds: tuple[int, ...]
    kept: KeptGradients
    inputs: StepInputs


def memory_of(setup: TrainingSetup) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of ``setup`` (cached per model and setup); under a
    data-parallel strategy, of its busiest GPU (:mod:`layerscope.estimate.distributed`)."""
    cache = model_cache(setup.model, "memory")
    if setup in cache:
        return cache[setup]  # type: ignore[no-any-return]
    if setup.distributed is not None:
        from layerscope.estimate.distributed import sharded_memory_of

        cache[setup] = sharded_memory_of(setup)
        return cache[setup]  # type: ignore[no-any-return]
    step = _step_of(setup)
    train = step.trainable_tensors
    opt = OptimizerMemory(()) if setup.inference else OPTIMIZERS[setup.optimizer](train)
    opt_state, opt_temp = opt.state, opt.temporary
    gradients = 0 if setup.inference else sum(rounded(n * b) for n, b, _ in train)
    rep = step.replay
    persistent = step.weights + opt_state
    reserved = simulate_loop(
        step.build, step.events, inference=setup.inference,
        optimizer_state=opt.state_blocks, optimizer_temporaries=opt.temporary_blocks,
    ).reserved_peak
    if setup.gradient_accumulation_steps > 1:  # the gradients kept from the micro-step before
        one = max(rep.forward_peak, rep.backward_peak, rep.end + opt_temp)
        rep = replay(step.trace, step.block_kinds, False, extra=step.kept.held)
        reserved = accumulated_reserved(
            reserved, one, max(rep.forward_peak, rep.backward_peak, rep.end + opt_temp))
    optimizer_peak = 0 if setup.inference else persistent + rep.end + opt_temp
    backward_peak = 0 if setup.inference else persistent + rep.backward_peak
    peak, phase = max(
        (persistent + rep.forward_peak, "forward"),
        (backward_peak, "backward"),
        (optimizer_peak, "optimizer"),
    )
    result = MemoryEstimate(
        peak_bytes=peak,
        peak_phase=phase,
        reserved_bytes=max(reserved, peak),
        weights_bytes=step.weights,
        gradient_bytes=gradients,
        optimizer_state_bytes=opt_state,
        optimizer_temporary_bytes=opt_temp,
        activation_bytes=step.embed + sum(step.per_block),
        activation_bytes_per_block=step.per_block,
        logits_bytes=step.logits,
        forward_peak_bytes=persistent + rep.forward_peak,
        backward_peak_bytes=backward_peak,
        optimizer_peak_bytes=optimizer_peak,
        trainable_params=0 if setup.inference else sum(n for n, _, _ in train),
        total_params=step.total_params,
        **setup_fields(setup),
        forward_flops=step.forward_flops,
        backward_flops=0 if setup.inference else step.backward_flops,
        quantized_base_bytes=step.quantized_base,
        paged_optimizer_bytes=opt.paged,
        inputs=step.inputs,
    )
    cache[setup] = result
    return result


def setup_fields(setup: TrainingSetup) -> dict[str, Any]:
    """The :class:`MemoryEstimate` fields that restate ``setup`` (one GPU or sharded)."""
    return {
        "batch_size": setup.batch_size, "seq_len": setup.seq_len, "precision": setup.precision,
        "optimizer": setup.optimizer, "gradient_checkpointing": setup.gradient_checkpointing,
        "inference": setup.inference, "lora_rank": setup.lora_rank,
        "attn_implementation": setup.attention,
        "quantization": None if setup.quantization is None else setup.quantization.method,
    }


def _step_of(setup: TrainingSetup) -> _Step:
    """Trace ``setup``'s step (cached: every optimizer shares it)."""
    key = (setup.scan, setup.trainable, setup.lora, setup.batch_size, setup.seq_len,
           setup.precision, setup.gradient_checkpointing, setup.attn_implementation,
           setup.experts, setup.inference, setup.quantization, setup.frozen_dtype,
           setup.loaded_dtype, setup.adapter_dtype, setup.kbit_prepared, setup.target_len,
           setup.images, setup.image_size, setup.audio_seconds)
    cache = model_cache(setup.model, "step")
    if key not in cache:
        with deferred_interrupts():  # Ctrl-C waits for the trace to hand control back
            cache[key] = _trace_step(setup)
    return cache[key]  # type: ignore[no-any-return]


@dataclass
class Prepared:
    """A setup's reduced fake model, ready to trace (see :func:`prepare`).

    Attributes:
        reduced, kept: the reduced copy and its block list; ``memo`` maps original ids to copies.
        mode: the ``FakeTensorMode`` its tensors belong to.
        tensors, is_trainable: the full model's parameters by identity, and their flags.
        blocks_name, blocks: the full model's block stack.
        kinds, reps: the kind of every block, and the block representing each kind.
        lora_targets, lora_ids: the adapted modules; the ids of the copy's (fake) tensors peft
            adds and trains: the adapters and the copies of ``modules_to_save``.
        saved_ids: the ids among ``lora_ids`` of the ``modules_to_save`` copies (peft's
            ``ModulesToSaveWrapper``: a deep copy of the module, in the dtype it had).
        vocab: the vocabulary size of the text model (0 for a model without text).
        inputs: what the step feeds the model (:func:`~layerscope.estimate.inputs.step_inputs`).
    """

    reduced: nn.Module
    kept: nn.ModuleList
    memo: dict[int, Any]
    mode: Any
    tensors: dict[int, nn.Parameter]
    is_trainable: dict[int, bool]
    blocks_name: str
    blocks: nn.ModuleList
    kinds: list[int]
    reps: list[int]
    lora_targets: frozenset[str]
    lora_ids: set[int]
    vocab: int
    inputs: StepInputs | None = None
    saved_ids: set[int] = field(default_factory=set)

    @property
    def block_kinds(self) -> list[int]:
        return [self.kinds[i] for i in range(len(self.blocks))]

    @property
    def kind_of_position(self) -> list[int]:
        return [self.kinds[r] for r in self.reps]


KindRefiner = Callable[[nn.ModuleList, list[int], frozenset[str], str, set[int]],
                       tuple[list[int], list[int]]]


def prepare(
    setup: TrainingSetup,
    *,
    param_dtype: torch.dtype | None = None,
    lora_dtype: torch.dtype | None = None,
    trace_trainable: Callable[[Prepared], set[int]] | None = None,
    refine_kinds: KindRefiner | None = None,
    packed_parameters: bool = False,
    whole: bool = False,
) -> Prepared:
    """The reduced fake copy of ``setup``'s model: blocks grouped into kinds, LoRA injected,
    checkpointing and attention set, parameters replaced by fake tensors.

    Args:
        param_dtype: the parameters' dtype (default: the precision's).
        lora_dtype: the adapters' dtype (default fp32, as peft upcasts them).
        trace_trainable: ids of the full model's tensors that get gradients in the trace
            (default: the trainable ones); a sharding strategy may compute more.
        refine_kinds: regroups the blocks (FSDP's segments depend on their neighbours).
        packed_parameters: a quantized layer's packed 4-bit weight is a parameter of the copy,
            in its storage dtype (FSDP2's trace shards and gathers it).
        whole: keep every block (each its own kind), where a reduced stack cannot stand for
            the full one (:func:`_trace_step`).

    Raises:
        UnsupportedModelError: a model without a config, or whose inputs cannot be built.
    """
    model, lora, prec = setup.model, setup.lora, setup.precision_info
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no config: the step's inputs are built from a Hugging "
            "Face model's config (its vocab_size, image and audio sizes)"
        )
    vocab = getattr(text_config(config), "vocab_size", None) or getattr(config, "vocab_size", 0)
    named = list(model.named_parameters(remove_duplicate=False))
    # Tensors by identity; a shared tensor is trainable if any of its names is.
    tensors: dict[int, nn.Parameter] = {}
    is_trainable: dict[int, bool] = {}
    for name, p in named:
        tensors[id(p)] = p
        is_trainable[id(p)] = is_trainable.get(id(p), False) or name in setup.trainable

    blocks_name, blocks = _block_stack(setup.scan, model)
    lora_targets = lora.targets if lora is not None else frozenset()
    quantized = frozenset(m.name for m in setup.quantized_layers)
    input_grads = setup.kbit_prepared and setup.gradient_checkpointing and not setup.inference
    kinds, reps = _block_kinds(model, blocks_name, blocks, is_trainable, lora_targets, config,
                               quantized=quantized, input_grads=input_grads)
    if whole:
        kinds, reps = list(range(len(blocks))), list(range(len(blocks)))
    prepared = Prepared(
        reduced=model, kept=blocks, memo={}, mode=None, tensors=tensors, is_trainable=is_trainable,
        blocks_name=blocks_name, blocks=blocks, kinds=kinds, reps=reps, lora_targets=lora_targets,
        lora_ids=set(), vocab=vocab if isinstance(vocab, int) else 0,
    )
    grads = trace_trainable(prepared) if trace_trainable else {i for i, t in is_trainable.items() if t}
    if refine_kinds is not None and not whole:
        prepared.kinds, prepared.reps = refine_kinds(blocks, kinds, lora_targets, blocks_name, grads)
    reps = prepared.reps

    reduced, kept, memo = reduced_copy(model, blocks, reps)
    trainable_copy = {id(memo[i]) for i in grads if i in memo}
    lora_ids: set[int] = set()
    if lora is not None:
        lora_ids = _inject_lora(reduced, lora, lora_targets, blocks_name, reps)
    compute_biases: set[int] = set()
    packed: set[int] = set()  # packed 4-bit weights kept in their storage dtype
    if setup.quantization is not None:
        from layerscope.estimate.bnb import Linear4bit, quantize_copy

        compute_biases = quantize_copy(
            reduced, _to_reduced(quantized, blocks_name, reps), setup.quantization,
            compute_dtype=setup.compute_dtype, loaded_dtype=setup.loaded_dtype,
            autocast=prec.autocast, packed_parameters=packed_parameters,
        )
        packed = {id(m.weight) for m in reduced.modules()
                  if isinstance(m, Linear4bit) and isinstance(m.weight, nn.Parameter)}
    if input_grads:  # prepare_model_for_kbit_training's enable_input_require_grads()
        embeddings: nn.Module = reduced.get_input_embeddings()  # type: ignore[operator]
        embeddings.register_forward_hook(
            lambda _module, _args, output: output.requires_grad_(True))
    if setup.gradient_checkpointing and not setup.inference:
        enable = getattr(reduced, "gradient_checkpointing_enable", None)
        if enable is None or not getattr(reduced, "supports_gradient_checkpointing", False):
            raise EstimateError(f"{type(model).__name__} does not support gradient checkpointing")
        with quiet_warnings():  # transformers 5 renames it (a FutureWarning); same behaviour
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    use_attention(reduced, setup.attention)
    use_experts(reduced, setup.experts)
    reduced.train(not setup.inference)

    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    # peft upcasts adapters of a bf16/fp16 model to fp32 (autocast_adapter_dtype=True),
    # unless the setup keeps them in another dtype
    adapters_dtype = lora_dtype or setup.adapter_dtype

    # peft's ModulesToSaveWrapper deep-copies each of modules_to_save as it is when peft wraps
    # the model, and its cast_adapter_dtype upcasts only tuner layers (BaseTunerLayer), so a
    # copy keeps the frozen base's dtype (peft/tuners/tuners_utils.py, cast_adapter_dtype)
    saved = {id(p) for n, p in reduced.named_parameters() if id(p) in lora_ids
             and ".modules_to_save." in f".{n}"}

    def dtype_of(name: str, p: torch.Tensor) -> torch.dtype:
        if not p.is_floating_point() or id(p) in packed:
            return p.dtype
        if id(p) in saved:
            return param_dtype if param_dtype is not None else setup.frozen_dtype
        if id(p) in lora_ids:
            return adapters_dtype
        if param_dtype is not None:  # one dtype for every parameter (a sharded step)
            return param_dtype
        if trainable_of(p):
            return prec.param_dtype
        return setup.compute_dtype if id(p) in compute_biases else setup.frozen_dtype

    def trainable_of(p: torch.Tensor) -> bool:
        return id(p) in trainable_copy or id(p) in lora_ids

    adapter_names = {n for n, p in reduced.named_parameters() if id(p) in lora_ids}
    saved_names = {n for n, p in reduced.named_parameters() if id(p) in saved}
    fake_parameters(reduced, mode, dtype_of, trainable_of)
    prepared.reduced, prepared.kept, prepared.memo, prepared.mode = reduced, kept, memo, mode
    # the fake adapters (new tensors: the ids above belonged to the meta ones)
    prepared.lora_ids = {id(p) for n, p in reduced.named_parameters() if n in adapter_names}
    prepared.saved_ids = {id(p) for n, p in reduced.named_parameters() if n in saved_names}
    sizes = input_sizes(setup)
    prepare_copy(reduced, sizes)
    try:
        prepared.inputs = step_inputs(reduced, sizes,
                                      token_counter(reduced, mode, prec.autocast_dtype))
    except EstimateError:
        raise
    except _FORWARD_ERRORS as exc:  # the model's own image or audio features
        raise traced_step_error(setup, exc, " (counting its image or audio tokens)") from exc
    return prepared


_FORWARD_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AttributeError,
                   AssertionError, KeyError, ZeroDivisionError)
"""What a model's own forward raises on inputs or a config it cannot take."""


def input_sizes(setup: TrainingSetup) -> Sizes:
    """The input settings of ``setup``, pixel and audio values in its weights' dtype."""
    return Sizes(
        batch_size=setup.batch_size, seq_len=setup.seq_len, target_len=setup.target_len,
        images=setup.images, image_size=setup.image_size, audio_seconds=setup.audio_seconds,
        dtype=setup.precision_info.param_dtype, training=not setup.inference,
    )


def step_inputs_of(setup: TrainingSetup) -> StepInputs:
    """What a training step of ``setup`` feeds its model (shapes, and the values of token ids,
    labels and grids), as the memory estimate traces it; image and audio tokens are counted
    by running the model's own feature functions on a fake copy.

    Raises:
        UnsupportedModelError: the inputs of this model cannot be built.
        EstimateError: settings the model cannot take (a sequence too short for its images).
    """
    inputs = prepare(setup).inputs
    assert inputs is not None  # prepare sets them
    return inputs


def traced_step_error(setup: TrainingSetup, exc: BaseException, where: str = "") -> EstimateError:
    """The error for a model whose forward fails when traced."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return EstimateError(
        f"{type(setup.model).__name__}: its forward failed when traced{where} with batch_size="
        f"{setup.batch_size}, seq_len={setup.seq_len} ({first})"
    )


def _trace_step(setup: TrainingSetup) -> _Step:
    model, prec = setup.model, setup.precision_info
    param_dtype = prec.param_dtype
    pre = prepare(setup)
    try:
        trace = run_step(
            pre.reduced, pre.kept, kinds=pre.kind_of_position, batch_size=setup.batch_size,
            seq_len=setup.seq_len, vocab_size=pre.vocab, autocast_dtype=prec.autocast_dtype,
            inference=setup.inference, mode=pre.mode, inputs=pre.inputs,
            reduced=len(pre.reps) < len(pre.blocks),
        )
    except EstimateError:  # layerscope's own refusal (an UnsupportedModelError)
        raise
    except (ReshapingBlocks, *_FORWARD_ERRORS) as exc:
        if len(pre.reps) == len(pre.blocks):
            raise traced_step_error(setup, exc) from exc
        # The reduced stack cannot stand for the full one: a block changed the activations'
        # shape (a strided convolution, a downsampling stage), or the model failed on fewer
        # blocks (XLM loops over its configured depth). Every block is traced.
        pre = prepare(setup, whole=True)
        try:
            trace = run_step(
                pre.reduced, pre.kept, kinds=pre.kind_of_position, batch_size=setup.batch_size,
                seq_len=setup.seq_len, vocab_size=pre.vocab, autocast_dtype=prec.autocast_dtype,
                inference=setup.inference, mode=pre.mode, inputs=pre.inputs,
            )
        except EstimateError:
            raise
        except _FORWARD_ERRORS as exc2:  # the model's own forward
            raise traced_step_error(setup, exc2) from exc2
    block_kinds, kind_of_position = pre.block_kinds, pre.kind_of_position
    reduced, kept, tensors, is_trainable = pre.reduced, pre.kept, pre.tensors, pre.is_trainable
    assert pre.inputs is not None  # prepare sets them
    lora_tensors = _lora_tensors(reduced, kept, kind_of_position, block_kinds, pre.lora_ids,
                                 pre.saved_ids,
                                 int(dtype_bytes(setup.adapter_dtype)))
    rep = replay(trace, block_kinds, setup.inference)
    events = step_events(trace, block_kinds, setup.inference)

    # static memory of the full model
    pbytes = int(dtype_bytes(param_dtype))
    named = list(model.named_parameters(remove_duplicate=False))
    weights, quantized_base, build = _base_weights(setup, named, is_trainable)
    weights += sum(rounded(n * b) for n, b, _ in lora_tensors)
    # peft makes each adapter in its base weight's dtype (a quantized weight is not floating:
    # the adapter keeps the fp32 it was made in), then re-makes it in its own
    made = 4 if setup.quantization is not None else setup.frozen_dtype.itemsize
    if setup.quantization is not None and setup.quantization.library == "torchao":
        made = setup.adapter_dtype.itemsize  # torchtune makes them in the recipe's dtype
    build += [(h + len(build), size) for h, size in build_ops(
        (), [(rounded(n * made), rounded(n * b)) for n, b, _ in lora_tensors])]
    train_list = [
        (p.numel(), pbytes, tuple(p.shape)) for i, p in tensors.items() if is_trainable[i]
    ] + lora_tensors
    seg = trace.segments
    head_fwd = seg.get(("head", "fwd"), Segment())
    head_bwd = seg.get(("head", "bwd"), Segment())
    parts = ["embed", "head", *block_kinds]
    from layerscope.estimate.distributed import _param_infos, stored_sizes

    embedding = embedding_grad_numel(model, lambda p: pre.is_trainable.get(id(p), False))
    kept_grads = NONE if setup.inference else traced_grads(
        _param_infos(pre, stored_sizes(setup, False, param_dtype), False),
        len(block_kinds), rounded(embedding * pbytes))
    return _Step(
        replay=rep,
        weights=weights,
        quantized_base=quantized_base,
        trainable_tensors=tuple(train_list),
        total_params=sum(p.numel() for p in tensors.values()) + sum(n for n, _, _ in lora_tensors),
        per_block=tuple(seg.get((k, "fwd"), Segment()).net for k in block_kinds),
        embed=seg.get(("embed", "fwd"), Segment()).net,
        logits=max(head_fwd.high, head_fwd.net + head_bwd.high),
        forward_flops=sum(seg.get((p, "fwd"), Segment()).flops for p in parts),
        backward_flops=sum(seg.get((p, "bwd"), Segment()).flops for p in parts),
        events=events,
        build=tuple(build),
        trace=trace,
        block_kinds=tuple(block_kinds),
        kept=kept_grads,
        inputs=dataclasses.replace(pre.inputs, assumptions=trace.assumptions),
    )


def _block_stack(s: ModelScan, model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The main block stack as found by the scan (empty when none)."""
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
    quantized: frozenset[str] = frozenset(),
    input_grads: bool = False,
) -> tuple[list[int], list[int]]:
    """Kind index of every block, and the first block of each kind.

    Two blocks are of one kind when they have the same class (hybrid stacks mix several), the
    same trainable flags, the same LoRA targets, the same quantized modules, the same layer
    type (the text config's ``layer_types``), and both do or both do not receive an input that
    needs a gradient (true once anything before them is trainable, or from the start with
    ``input_grads``). Block 0 is a kind of its own.
    """
    in_blocks = {id(p) for p in blocks.parameters()}
    grad_in = input_grads
    for _, p in model.named_parameters():  # registration order: what precedes the blocks
        if id(p) in in_blocks:
            break
        grad_in = grad_in or is_trainable[id(p)]
    prefix_all = f"{blocks_name}." if blocks_name else ""
    for name, _ in model.named_modules():
        if name.startswith(prefix_all) and prefix_all:
            break
        grad_in = grad_in or name in lora_targets
    try:
        layer_types = getattr(text_config(config), "layer_types", None)
    except RuntimeError:  # a heterogeneous config refuses a global read
        layer_types = None
    if not isinstance(layer_types, (list, tuple)) or len(layer_types) != len(blocks):
        layer_types = [None] * len(blocks)
    index: dict[tuple[Any, ...], int] = {}
    kinds: list[int] = []
    reps: list[int] = []
    for i, block in enumerate(blocks):
        flags = tuple(
            (n, is_trainable[id(p)]) for n, p in block.named_parameters(remove_duplicate=False)
        )
        prefix = f"{prefix_all}{i}."
        targets = tuple(sorted(t[len(prefix):] for t in lora_targets if t.startswith(prefix)))
        quant = tuple(sorted(t[len(prefix):] for t in quantized if t.startswith(prefix)))
        # The first block is always its own kind: its input (the embedding output) is still
        # referenced by the model's forward, so it is not freed when the block is done with it.
        key = ("first",) if i == 0 else (type(block), flags, targets, quant, grad_in,
                                         layer_types[i])
        if key not in index:
            index[key] = len(index)
            reps.append(i)
        kinds.append(index[key])
        grad_in = grad_in or any(f for _, f in flags) or bool(targets)
    return kinds, reps


def _inject_lora(
    reduced: nn.Module, lora: Lora, targets: frozenset[str], blocks_name: str, reps: list[int],
) -> set[int]:
    """Add the adapters to the reduced copy; returns the ids of the tensors peft trains: the
    adapters, and the copies it makes of ``modules_to_save`` (``ModulesToSaveWrapper``'s
    ``modules_to_save.<adapter>``; its ``original_module`` is the base's own, frozen)."""
    from peft import inject_adapter_in_model

    mapped = _to_reduced(targets, blocks_name, reps)
    config = dataclasses.replace(
        lora.peft_config(), target_modules=mapped, layers_to_transform=None,
        layers_pattern=None, exclude_modules=None,
    )
    with quiet_warnings():  # peft's notes on the config (e.g. fan_in_fan_out for Conv1D)
        inject_adapter_in_model(config, reduced)
    return {id(p) for n, p in reduced.named_parameters()
            if "lora_" in n or ".modules_to_save." in f".{n}"}


def _to_reduced(names: frozenset[str], blocks_name: str, reps: list[int]) -> list[str]:
    """Full-model module names as the reduced copy names them (blocks by position among the
    representatives ``reps``); names in blocks that are not represented are dropped."""
    prefix = f"{blocks_name}." if blocks_name else None
    position = {i: p for p, i in enumerate(reps)}
    mapped = []
    for name in names:
        if prefix and name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            if int(index) in position:
                mapped.append(f"{prefix}{position[int(index)]}.{rest}")
        else:
            mapped.append(name)
    return sorted(mapped)


def _base_weights(setup: TrainingSetup, named: list[tuple[str, nn.Parameter]],
                  is_trainable: dict[int, bool]) -> tuple[int, int, list[Op]]:
    """The full model's parameters and buffers (adapters aside): their bytes, allocator-rounded,
    the part that is quantized layers, and what loading them allocates on the GPU, in order.

    Trainable tensors are in the precision's dtype, frozen ones in the setup's frozen dtype; a
    quantized layer's weight is its bitsandbytes storage (:mod:`layerscope.estimate.quant`)
    and its bias the compute dtype (``Linear4bit.forward`` converts it).

    The allocations are :func:`~layerscope.estimate.allocator.model_build_ops`' with each
    tensor as the setup loads it: each parameter as its module makes it, in the base's loaded
    dtype (a tied head's own copy freed once the model is built), a quantized weight quantized
    as it lands (:func:`~layerscope.estimate.quant.load_allocations`), then the buffers; then,
    one by one, the parameters kept in another dtype re-made in it and the old copy freed
    (``prepare_model_for_kbit_training``'s upcast to fp32, fp32 trainable parameters of a bf16
    base). Without quantization or a base dtype of its own, exactly ``model_build_ops``.
    """
    from layerscope.estimate.quant import layer_storage, load_allocations

    q, model = setup.quantization, setup.model
    if q is not None and q.library == "torchao":
        return _torchao_base_weights(setup, named, is_trainable)
    layers = {f"{m.name}.weight": m for m in setup.quantized_layers}
    biases = {f"{m.name}.bias" for m in setup.quantized_layers if m.bias}
    trainable_bytes = setup.precision_info.param_dtype.itemsize
    loaded_bytes = setup.loaded_dtype.itemsize
    total = quantized = 0
    ops: list[Op] = []
    tied: list[int | None] = []
    remade: list[tuple[int | None, int]] = []  # (handle, bytes kept)
    owners: dict[int, nn.Module] = {}

    def alloc(size: int) -> int | None:
        if not size:
            return None
        ops.append((len(ops), size))  # one handle per allocation: handles need only be unique
        return ops[-1][0]

    for name, p in named:
        owner = model.get_submodule(name.rpartition(".")[0])
        if id(p) in owners:  # made again by a second module: the tied copy, dropped once built
            if owners[id(p)] is not owner:
                made = loaded_bytes if p.is_floating_point() else p.element_size()
                tied.append(alloc(rounded(p.numel() * made)))
            continue
        owners[id(p)] = owner
        if q is not None and name in layers:
            m = layers[name]
            size = layer_storage(q, m.n_out, m.n_in).allocated_bytes
            quantized += size
            total += size
            steps = [(alloc(b), keep) for b, keep in load_allocations(q, m.n_out, m.n_in,
                                                                     setup.loaded_dtype)]
            ops.extend((h, 0) for h, keep in reversed(steps) if not keep and h is not None)
            continue
        made = kept = p.element_size()
        if p.is_floating_point():
            made = loaded_bytes
            if is_trainable[id(p)]:
                kept = trainable_bytes
            elif name in biases:
                kept = setup.compute_dtype.itemsize
            else:
                kept = setup.frozen_dtype.itemsize
        total += rounded(p.numel() * kept)
        h = alloc(rounded(p.numel() * made))
        if kept != made:
            remade.append((h, rounded(p.numel() * kept)))
    buffers = [rounded(b.numel() * b.element_size()) for b in model.buffers()]
    total += sum(buffers)
    for size in buffers:
        alloc(size)
    ops.extend((h, 0) for h in tied if h is not None)
    for h, size in remade:
        alloc(size)
        if h is not None:
            ops.append((h, 0))
    return total, quantized, ops


def _torchao_base_weights(setup: TrainingSetup, named: list[tuple[str, nn.Parameter]],
                          is_trainable: dict[int, bool]) -> tuple[int, int, list[Op]]:
    """:func:`_base_weights` for a torchao NF4 base: each parameter kept as the setup keeps it,
    a quantized weight as ``NF4Tensor`` stores it, built and loaded as torchtune's recipe does
    (:func:`~layerscope.estimate.torchao.torchtune_build_ops`: a template block, the embedding,
    norm and head, the blocks as its copies, then the checkpoint, in the model config's dtype,
    quantized again into every layer). A tied parameter counts once."""
    from layerscope.estimate.quant import layer_storage
    from layerscope.estimate.torchao import OpRecorder, torchtune_build_ops
    from layerscope.quantization import config_dtype

    q, model = setup.quantization, setup.model
    assert q is not None
    layers = {f"{m.name}.weight": m for m in setup.quantized_layers}
    blocks_name, stack = _block_stack(setup.scan, model)
    prefix = f"{blocks_name}." if blocks_name else None
    blocks: list[list[tuple[int, int]]] = [[] for _ in stack]
    others: list[int] = []
    total = quantized = 0
    seen: set[int] = set()
    for name, p in named:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name in layers:
            m = layers[name]
            size = layer_storage(q, m.n_out, m.n_in).allocated_bytes
            quantized += size
            entry = (m.n_out * m.n_in, 0)
        else:
            kept = p.element_size()
            if p.is_floating_point():
                kept = (setup.precision_info.param_dtype if is_trainable[id(p)]
                        else setup.frozen_dtype).itemsize
            size = rounded(p.numel() * kept)
            entry = (0, size)
        total += size
        index = name[len(prefix):].partition(".")[0] if prefix and name.startswith(prefix) else ""
        if index.isdigit() and int(index) < len(blocks):
            blocks[int(index)].append(entry)
        elif entry[0]:
            raise EstimateError(
                f"library='torchao': {name} is quantized outside the block stack; torchtune's "
                "build (a template block and its copies) is what is modelled"
            )
        else:
            others.append(size)
    buffers = [rounded(b.numel() * b.element_size()) for b in model.buffers()]
    total += sum(buffers)
    rec = OpRecorder()
    torchtune_build_ops(rec, q, blocks, others, buffers, config_dtype(model))
    return total, quantized, rec.ops


def _lora_tensors(
    reduced: nn.Module, kept: nn.ModuleList, kind_of_position: list[int],
    block_kinds: list[int], lora_ids: set[int], saved_ids: set[int], element_bytes: int,
) -> list[tuple[int, int, tuple[int, ...]]]:
    """(numel, bytes per element, shape) of every tensor peft adds to the full model: each
    adapter in ``element_bytes``, each ``modules_to_save`` copy (``saved_ids``) in its own
    dtype."""
    if not lora_ids:
        return []
    in_kept = {id(p) for b in kept for p in b.parameters()}

    def info(p: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
        size = p.element_size() if id(p) in saved_ids else element_bytes
        return p.numel(), size, tuple(p.shape)

    per_kind: dict[int, list[tuple[int, int, tuple[int, ...]]]] = {}
    for position, block in enumerate(kept):
        per_kind[kind_of_position[position]] = [
            info(p) for p in block.parameters() if id(p) in lora_ids
        ]
    out = [t for k in block_kinds for t in per_kind.get(k, [])]
    out += [info(p) for p in reduced.parameters() if id(p) in lora_ids and id(p) not in in_kept]
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


def estimate_memory_savings(
    model: Any,
    plan: FreezePlan | None = None,
    **settings: Unpack[Settings],
) -> MemorySavings:
    """Peak memory saved by ``plan`` (``None``: the model's flags) against full fine-tuning of
    the same step (every parameter trainable, no LoRA). Arguments as :func:`estimate_memory`."""
    planned = make_setup(model, plan, **settings)
    baseline = memory_of(planned.replace(plan=FreezePlan.none(), lora=None, quantization=None,
                                         prepare_kbit=None))
    estimate = memory_of(planned)
    saved = baseline.peak_bytes - estimate.peak_bytes
    return MemorySavings(baseline, estimate, saved, saved / baseline.peak_bytes)


def max_batch_size(
    model: Any,
    gpu: int | str | GPU,
    plan: FreezePlan | None = None,
    *,
    limit: int = 65536,
    context_bytes: int = CUDA_CONTEXT_BYTES,
    **settings: Unpack[Settings],
) -> int:
    """The largest batch size whose step fits on ``gpu`` (0 if none does), up to ``limit``.

    Arguments as :func:`estimate_memory`; the batch size of the setup (or ``batch_size``) is
    the first one tried. The peak of each phase (forward, backward, optimizer step) grows
    linearly with the batch, so the answer is predicted from two estimated batches and
    confirmed with full estimates of it and the batch above (stepping on where the prediction
    was off): about three estimates, not a bisection from the limit.
    """
    whole(limit, "limit", EstimateError, minimum=1, maximum=MAX_SIZE)
    whole(context_bytes, "context_bytes", EstimateError)
    budget = gpu_bytes(gpu)
    base = make_setup(model, plan, **settings)

    def estimate(b: int) -> MemoryEstimate:
        return memory_of(base.replace(batch_size=b))

    def fits(b: int) -> bool:
        return estimate(b).fits(budget, context_bytes=context_bytes)

    first = min(base.batch_size, limit)
    second = first + 1 if first < limit else first - 1
    if second < 1:  # limit == 1
        return 1 if fits(1) else 0
    a = estimate(first)
    # the allocated peaks grow linearly with the batch; the reserved memory keeps about the
    # same ratio to them
    allowed = (budget - context_bytes) * a.peak_bytes / a.reserved_bytes
    guess = _linear_max_batch(a, estimate(second), first, second, allowed)
    good, bad = 0, limit + 1
    probe = max(1, min(limit, guess))
    step = 1
    if fits(probe):  # walk up from a prediction that fits, doubling the step
        good = probe
        while good < limit:
            probe = min(limit, good + step)
            if not fits(probe):
                bad = probe
                break
            good, step = probe, step * 2
    else:  # walk down from one that does not
        bad = probe
        while bad > 1:
            probe = max(1, bad - step)
            if fits(probe):
                good = probe
                break
            bad, step = probe, step * 2
        else:
            return 0
    while bad - good > 1:  # fits(good), not fits(bad)
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def _linear_max_batch(a: MemoryEstimate, b: MemoryEstimate, batch_a: int, batch_b: int,
                      allowed: float) -> int:
    """The largest batch whose every phase peak, extrapolated linearly from the estimates at
    ``batch_a`` and ``batch_b``, stays within ``allowed`` bytes (0 when none would)."""
    best = 2**62
    for pa, pb in ((a.forward_peak_bytes, b.forward_peak_bytes),
                   (a.backward_peak_bytes, b.backward_peak_bytes),
                   (a.optimizer_peak_bytes, b.optimizer_peak_bytes)):
        slope = (pb - pa) / (batch_b - batch_a)
        if slope <= 0:
            best = best if pa <= allowed else 0
            continue
        best = min(best, batch_a + math.floor((allowed - pa) / slope))
    return max(0, best)
