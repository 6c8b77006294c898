"""Per-GPU memory of a data-parallel step (DDP, FSDP, DeepSpeed ZeRO), for the busiest GPU.

The step is traced as for one GPU (:mod:`layerscope.estimate.trace`), with what the strategy
changes in the trace itself:

- FSDP2: the real ``fully_shard`` runs in the trace under a fake process group
  (:mod:`layerscope.estimate.fsdp`); gathered blocks, prefetches, reduce-scatter buffers and
  sharded gradients are traced. Blocks are grouped into kinds by their own flags and by their
  neighbours' shapes, because FSDP's buffers cross block boundaries.
- DeepSpeed runs the module in its 16-bit dtype without autocast (``bf16``/``fp16`` casts the
  module; the fp32 copy is the optimizer's master partition), so the trace does too.
- FSDP1 computes in its ``MixedPrecision`` dtype, and with ``use_orig_params=True`` a block
  that mixes frozen and trainable tensors computes gradients for all of them.
- Where gradients leave autograd's ``.grad`` at once (ZeRO-2/3 buckets and partitions, FSDP1
  shards, DDP bucket views), the trace drops each gradient as it is accumulated.

Then :mod:`layerscope.estimate.states` adds what the strategy keeps and holds around the trace.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from layerscope.errors import EstimateError
from layerscope.estimate.cache import model_cache
from layerscope.estimate.sharding import Sharding
from layerscope.estimate.states import (
    RankStates,
    TensorInfo,
    rank_states,
    resident_tensors,
    zero3_allocations,
)
from layerscope.estimate.trace import Replay, Segment, StepTrace, reduced_copy, replay, rounded, run_step
from layerscope.units import dtype_bytes

if TYPE_CHECKING:
    from layerscope.estimate.memory import MemoryEstimate, Prepared
    from layerscope.setup import TrainingSetup


def trace_dtypes(precision: Any, sharding: Sharding) -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, autocast dtype) the traced step runs with under ``sharding``.

    DeepSpeed with ``bf16``/``fp16`` enabled casts the module to that dtype and does not
    autocast; FSDP1's ``MixedPrecision`` gathers parameters in the autocast dtype. Otherwise
    the precision's own dtypes (FSDP2 casts inside the trace).
    """
    if sharding.stage:
        return (precision.autocast_dtype or precision.param_dtype), None
    if sharding.is_fsdp and sharding.fsdp.version == 1 and precision.autocast_dtype is not None:
        return precision.autocast_dtype, precision.autocast_dtype
    return precision.param_dtype, precision.autocast_dtype


def neighbour_kinds(
    blocks: nn.ModuleList, kinds: list[int], lora_targets: frozenset[str], blocks_name: str,
    trainable_ids: set[int],
) -> tuple[list[int], list[int]]:
    """Refine block kinds for a trace where a block's segment depends on its neighbours.

    FSDP frees the previous block's all-gather buffer inside a block and prefetches the
    previous block in backward (its size), and frees the next block's reduce-scatter input
    (the next block's trainable size). Two blocks share a kind when their own kinds match and
    their neighbours have the same parameter shapes and flags. Returns (kinds, the first block
    of each kind), and checks that in the reduced model every representative's neighbours look
    like its real ones; if not, every block is its own kind.
    """
    prefix = f"{blocks_name}." if blocks_name else ""

    def signature(i: int) -> Any:
        if not 0 <= i < len(blocks):
            return None
        own = tuple((tuple(p.shape), p.dtype, id(p) in trainable_ids) for p in blocks[i].parameters())
        start = f"{prefix}{i}."
        return own, tuple(sorted(t[len(start):] for t in lora_targets if t.startswith(start)))

    sigs = [signature(i) for i in range(len(blocks))]
    keys = [(kinds[i], sigs[i - 1] if i else None, sigs[i + 1] if i + 1 < len(blocks) else None)
            for i in range(len(blocks))]
    index: dict[Any, int] = {}
    refined: list[int] = []
    reps: list[int] = []
    for i, key in enumerate(keys):
        if key not in index:
            index[key] = len(index)
            reps.append(i)
        refined.append(index[key])
    for pos, r in enumerate(reps):
        before = sigs[reps[pos - 1]] if pos else None
        after = sigs[reps[pos + 1]] if pos + 1 < len(reps) else None
        if before != keys[r][1] or after != keys[r][2]:
            every = list(range(len(blocks)))
            return every, every
    return refined, reps


def wrapped_sharding(setup: TrainingSetup) -> Sharding:
    """``setup``'s data-parallel sharding as the trainer wraps the model: on a quantized base
    with LoRA, FSDP1 as if ``use_orig_params=False`` (the HF Trainer wraps peft's adapters in
    FSDP units of their own, whatever use_orig_params: transformers'
    ``_fsdp_qlora_plugin_updates`` applies peft's ``fsdp_auto_wrap_policy``, so no flat
    parameter mixes the packed weights with adapters); otherwise ``setup.sharding``.

    Raises:
        EstimateError: a setup without a data-parallel strategy.
    """
    sharding = setup.sharding
    if sharding is None or sharding.distributed is None:
        raise EstimateError(f"wrapped_sharding needs a data-parallel strategy, got {sharding!r}")
    if (sharding.is_fsdp and sharding.fsdp.version == 1 and setup.quantization is not None
            and setup.lora is not None):
        sharding = sharding.replace(fsdp=dataclasses.replace(sharding.fsdp, use_orig_params=False))
    return sharding


def sharded_memory_of(setup: TrainingSetup) -> MemoryEstimate:
    """The :class:`~layerscope.estimate.memory.MemoryEstimate` of the busiest GPU of
    ``setup.sharding`` (``batch_size`` per GPU). Use :func:`~layerscope.estimate.memory.
    memory_of`, which caches it.

    Raises:
        EstimateError: a forward that fails when traced.
    """
    sharding = wrapped_sharding(setup)
    fsdp2 = sharding.is_fsdp and sharding.fsdp.version == 2
    if fsdp2:
        from layerscope.estimate.fsdp import in_fresh_process, process_group_in_use

        if process_group_in_use():  # never touch the caller's group: trace in a new process
            alone = setup.replace(model=_skeleton(setup.model))
            return in_fresh_process(sharded_memory_of, alone)  # type: ignore[no-any-return]
    from layerscope.estimate.memory import prepare

    prec = setup.precision_info
    param_dtype, autocast_dtype = trace_dtypes(prec, sharding)
    deepspeed = sharding.stage > 0
    fsdp1_mp = sharding.is_fsdp and sharding.fsdp.version == 1 and autocast_dtype is not None
    mixed_units = (sharding.is_fsdp and sharding.fsdp.version == 1 and sharding.fsdp.use_orig_params
                   and not setup.inference)

    def trace_trainable(pre: Prepared) -> set[int]:
        grads = {i for i, t in pre.is_trainable.items() if t}
        if not mixed_units:
            return grads
        # FSDP1 with use_orig_params: a flat parameter mixing frozen and trainable tensors
        # gives every tensor's view requires_grad, so autograd computes all their gradients
        for i, block in enumerate(pre.blocks):
            ids = [id(p) for p in block.parameters()]
            start = f"{pre.blocks_name}.{i}."
            if any(j in grads for j in ids) or any(t.startswith(start) for t in pre.lora_targets):
                grads.update(j for j in ids if pre.tensors[j].is_floating_point())
        return grads

    # DeepSpeed casts the module to its dtype, FSDP1 computes in its MixedPrecision dtype; else
    # each tensor is traced in its own dtype (trainable, frozen base, adapters)
    cast = deepspeed or fsdp1_mp
    pre = prepare(
        setup, param_dtype=param_dtype if cast else None,
        lora_dtype=param_dtype if cast else None,
        trace_trainable=trace_trainable, refine_kinds=neighbour_kinds if fsdp2 else None,
        packed_parameters=fsdp2,
    )
    params = _param_infos(pre, stored_sizes(setup, deepspeed, param_dtype), setup.inference)
    compute = int(dtype_bytes(autocast_dtype or param_dtype))
    states = rank_states(params, num_blocks=len(pre.blocks), sharding=sharding,
                         optimizer=setup.optimizer, compute_itemsize=compute,
                         inference=setup.inference,
                         gradient_checkpointing=setup.gradient_checkpointing)
    if fsdp2:  # FSDP's buffers depend on the GPU count: its own trace
        trace = _trace(setup, pre, sharding, param_dtype, autocast_dtype, fsdp2, states)
    else:  # the same step for any GPU count: traced once per family of strategies
        key = (setup.scan, setup.trainable, setup.lora, setup.batch_size, setup.seq_len,
               setup.precision, setup.gradient_checkpointing, setup.attention, setup.experts,
               setup.inference, param_dtype, autocast_dtype, states.trace_keeps_grads,
               mixed_units, fsdp1_mp, setup.quantization, setup.frozen_dtype,
               setup.loaded_dtype, setup.adapter_dtype, setup.kbit_prepared, setup.target_len,
               setup.images, setup.image_size, setup.audio_seconds)
        cache = model_cache(setup.model, "sharded-step")
        if key not in cache:
            cache[key] = _trace(setup, pre, sharding, param_dtype, autocast_dtype, fsdp2, states)
        trace = cache[key]
    rep = replay(trace, pre.block_kinds, setup.inference, extra=states.extra)
    result = _assemble(setup, trace, rep, states, pre.block_kinds, params)
    if setup.gradient_accumulation_steps > 1 and not setup.inference:
        result = _accumulated(setup, sharding, pre, trace, states, params, result, compute)
    # what the step fed the model, with the rules the trace took for activation-dependent shapes
    inputs = pre.inputs and dataclasses.replace(pre.inputs, assumptions=trace.assumptions)
    return dataclasses.replace(result, inputs=inputs)


def _accumulated(
    setup: TrainingSetup, sharding: Sharding, pre: Prepared, trace: StepTrace,
    states: RankStates, params: list[TensorInfo], one: MemoryEstimate, compute_itemsize: int,
) -> MemoryEstimate:
    """``one`` (the one-micro-batch step) with the gradients the strategy keeps between
    micro-steps held through the next micro-step's forward and backward
    (:mod:`layerscope.estimate.accumulation`)."""
    from layerscope.estimate.accumulation import (
        accumulated_reserved,
        embedding_grad_numel,
        sharded_kept,
    )

    grad_itemsize = max((p.itemsize for p in params if p.trainable), default=4)
    embedding = embedding_grad_numel(setup.model, lambda p: pre.is_trainable.get(id(p), False))
    reduce_itemsize = 4 if setup.precision_info.autocast else compute_itemsize  # FSDP2 policy
    kept = sharded_kept(sharding, states, params, len(pre.block_kinds),
                        rounded(embedding * grad_itemsize), compute_itemsize, reduce_itemsize)

    def extra(part: str, phase: str, index: int | None) -> int:
        return states.extra(part, phase, index) + kept.held(part, phase, index)

    rep = replay(trace, pre.block_kinds, False, extra=extra)
    acc = _assemble(setup, trace, rep, states, pre.block_kinds, params)
    reserved = accumulated_reserved(one.reserved_bytes, one.peak_bytes, acc.peak_bytes)
    return dataclasses.replace(acc, reserved_bytes=max(reserved, acc.peak_bytes))


def _trace(
    setup: TrainingSetup, pre: Prepared, sharding: Sharding, param_dtype: torch.dtype,
    autocast_dtype: torch.dtype | None, fsdp2: bool, states: RankStates,
) -> StepTrace:
    from layerscope.estimate.memory import traced_step_error

    if not states.trace_keeps_grads and not fsdp2 and not setup.inference:
        for p in pre.reduced.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(_drop_grad)  # type: ignore[no-untyped-call]
    try:
        if fsdp2:
            from layerscope.estimate.fsdp import trace_fsdp2

            return trace_fsdp2(
                pre.reduced, pre.kept, kinds=pre.kind_of_position, sharding=sharding,
                param_dtype=param_dtype, batch_size=setup.batch_size, seq_len=setup.seq_len,
                vocab_size=pre.vocab, autocast_dtype=autocast_dtype, inference=setup.inference,
                mode=pre.mode, inputs=pre.inputs,
            )
        return run_step(
            pre.reduced, pre.kept, kinds=pre.kind_of_position, batch_size=setup.batch_size,
            seq_len=setup.seq_len, vocab_size=pre.vocab, autocast_dtype=autocast_dtype,
            inference=setup.inference, mode=pre.mode, inputs=pre.inputs,
        )
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        raise traced_step_error(setup, exc, f" under {sharding.describe()}") from exc


@dataclass(frozen=True)
class StoredSizes:
    """How a strategy stores each kind of tensor of a (possibly quantized) base.

    Attributes:
        trainable, frozen, adapter: bytes per element of trainable base parameters, frozen
            floating ones and LoRA adapters.
        cast: DeepSpeed cast every floating tensor to ``adapter``'s size, peft's
            ``modules_to_save`` copies too; otherwise each copy keeps the dtype of the module it
            copies (peft upcasts tuner layers only), as on one GPU.
        packed: the id of each quantized weight of the full model -> its packed storage as
            ``(elements, bytes per element)``.
    """

    trainable: int
    frozen: int
    adapter: int
    cast: bool = False
    packed: dict[int, tuple[int, int]] = field(default_factory=dict)


def stored_sizes(setup: TrainingSetup, deepspeed: bool, param_dtype: torch.dtype) -> StoredSizes:
    """What the sharded copies of ``setup``'s tensors are stored in: DeepSpeed casts every
    floating tensor to its 16-bit dtype; otherwise trainable parameters are in the precision's
    dtype, frozen ones in the base's (:attr:`~layerscope.setup.TrainingSetup.frozen_dtype`),
    adapters in theirs. A quantized weight is its packed storage, elements of
    ``bnb_4bit_quant_storage`` (or int8), as bitsandbytes' ``Params4bit``/``Int8Params``
    hold it: what FSDP flattens and ZeRO-3 partitions."""
    by_name = packed_weights(setup)
    packed = {id(p): by_name[name] for name, p in setup.model.named_parameters(
        remove_duplicate=False) if name in by_name}
    if deepspeed:
        size = int(dtype_bytes(param_dtype))
        return StoredSizes(size, size, size, True, packed)
    return StoredSizes(int(dtype_bytes(setup.precision_info.param_dtype)),
                       int(dtype_bytes(setup.frozen_dtype)), int(dtype_bytes(setup.adapter_dtype)),
                       False, packed)


def packed_weights(setup: TrainingSetup) -> dict[str, tuple[int, int]]:
    """Each quantized weight by name -> ``(elements, bytes per element)`` of its packed
    storage: ``bnb_4bit_quant_storage`` elements for 4-bit, int8 for ``Linear8bitLt``."""
    from layerscope.estimate.quant import layer_storage

    q = setup.quantization
    if q is None:
        return {}
    item = q.storage.itemsize if q.four_bit else 1
    return {f"{m.name}.weight": (layer_storage(q, m.n_out, m.n_in).weight_bytes // item, item)
            for m in setup.quantized_layers}


def quant_state_sizes(setup: TrainingSetup) -> list[int]:
    """The quantisation state of every quantized layer (absmax, code tables, offsets, int8 row
    scales), allocator-rounded: on every rank whole, whatever the strategy. It is not a
    parameter (``Linear4bit`` keeps it as ``weight.quant_state`` and on the module), so FSDP and
    ZeRO-3 neither shard nor gather it; ``Linear4bit.forward`` rebuilds ``Params4bit`` around
    each gathered weight from the module's copy (bitsandbytes'
    ``fix_4bit_weight_quant_state_from_module``, its FSDP-QLoRA support of PR #970)."""
    from layerscope.estimate.quant import layer_storage

    q = setup.quantization
    if q is None:
        return []
    return [rounded(b) for m in setup.quantized_layers
            for _, b in layer_storage(q, m.n_out, m.n_in).tensors[1:]]


def packed_resident(params: list[TensorInfo], num_blocks: int, sharding: Sharding) -> int:
    """The packed quantized weights' share of what the rank keeps between steps: the whole
    packed base where it is replicated (DDP, ZeRO-1/2), its shards under FSDP and ZeRO-3 (the
    rank's flat shards prorated by bytes under FSDP1), none when offloaded."""
    packed = [p for p in params if p.quantized]
    if not packed:
        return 0
    n = sharding.shard_size
    if sharding.offload == "params" and (sharding.is_fsdp or sharding.stage == 3):
        return 0
    if sharding.is_fsdp or sharding.stage == 3:
        return sum(rounded(-(-p.numel // n) * p.itemsize) for p in packed)
    return sum(rounded(p.numel * p.itemsize) for p in packed)


def _adapter_size(p: torch.Tensor, pre: Prepared, sizes: StoredSizes) -> int:
    """Bytes per element of a tensor peft adds: a ``modules_to_save`` copy in the dtype of the
    module it copies (unless DeepSpeed cast everything), an adapter in the adapters' dtype."""
    if id(p) in pre.saved_ids and not sizes.cast:
        return p.element_size()
    return sizes.adapter


def _param_infos(pre: Prepared, sizes: StoredSizes, inference: bool) -> list[TensorInfo]:
    """Every tensor of the full model once, in registration order, each block's adapters after
    its own tensors (read from the reduced copy: a block has its kind's adapters); a quantized
    weight as its packed storage (``(elements, 1)``, frozen, as ``Params4bit`` is shaped)."""
    block_of = {id(p): i for i, b in enumerate(pre.blocks) for p in b.parameters()}
    position_of_kind = {pre.kinds[r]: pos for pos, r in enumerate(pre.reps)}
    in_kept = {id(p) for b in pre.kept for p in b.parameters()}

    def adapters(block: int | None) -> list[TensorInfo]:
        if block is None:
            found = [p for p in pre.reduced.parameters()
                     if id(p) in pre.lora_ids and id(p) not in in_kept]
        else:
            kept = pre.kept[position_of_kind[pre.kinds[block]]]
            found = [p for p in kept.parameters() if id(p) in pre.lora_ids]
        return [TensorInfo(p.numel(), tuple(p.shape), _adapter_size(p, pre, sizes),
                           not inference, block) for p in found]

    out: list[TensorInfo] = []
    last: int | None = None
    for i, p in pre.tensors.items():
        b = block_of.get(i)
        if last is not None and b != last:
            out += adapters(last)
        if i in sizes.packed:
            elements, item = sizes.packed[i]
            out.append(TensorInfo(elements, (elements, 1), item, False, b, quantized=True))
        else:
            size = ((sizes.trainable if pre.is_trainable[i] else sizes.frozen)
                    if p.is_floating_point() else p.element_size())
            out.append(TensorInfo(p.numel(), tuple(p.shape), size,
                                  pre.is_trainable[i] and not inference, b))
        last = b
    if last is not None:
        out += adapters(last)
    return out + adapters(None)


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def _skeleton(model: nn.Module) -> nn.Module:
    """``model`` as a meta skeleton (itself when it is one), to send to another process."""
    if all(p.is_meta for p in model.parameters()):
        return model
    from layerscope.estimate.memory import _block_stack
    from layerscope.scan import scan

    _, blocks = _block_stack(scan(model), model)
    copy, _, _ = reduced_copy(model, blocks, list(range(len(blocks))))
    return copy


def _assemble(
    setup: TrainingSetup, trace: StepTrace, rep: Replay, states: RankStates,
    block_kinds: list[int], params: list[TensorInfo],
) -> MemoryEstimate:
    from layerscope.estimate.memory import MemoryEstimate, setup_fields

    sharding, prec, inference = setup.sharding, setup.precision_info, setup.inference
    assert sharding is not None
    # the model's buffers and a quantized base's state: whole on every rank
    quant_state = sum(quant_state_sizes(setup))
    buffers = sum(rounded(b.numel() * b.element_size()) for b in setup.model.buffers())
    buffers += quant_state
    persistent = states.persistent + buffers
    optimizer_peak = 0 if inference else persistent + rep.end + states.optimizer_extra
    backward_peak = 0 if inference else persistent + rep.backward_peak
    peak, phase = max(
        (persistent + rep.forward_peak, "forward"), (backward_peak, "backward"),
        (optimizer_peak, "optimizer"),
    )
    held = {"forward": rep.forward_extra, "backward": rep.backward_extra,
            "optimizer": 0 if inference else states.optimizer_extra}[phase]
    if sharding.is_fsdp and sharding.fsdp.version == 2:
        held = fsdp2_gathered(params, len(block_kinds), sharding, prec, phase)
    seg = trace.segments
    per_block = tuple(seg.get((k, "fwd"), Segment()).net for k in block_kinds)
    embed = seg.get(("embed", "fwd"), Segment()).net
    if sharding.is_fsdp and sharding.fsdp.version == 2 and block_kinds:
        per_block, embed = _fsdp2_activations(per_block, embed, params, sharding, prec)
    head_fwd = seg.get(("head", "fwd"), Segment())
    head_bwd = seg.get(("head", "bwd"), Segment())
    parts = ["embed", "head", *block_kinds]
    if sharding.is_fsdp and sharding.fsdp.version == 2:  # its gathered storages are resized
        during = fsdp2_gathered(params, len(block_kinds), sharding, prec, "backward")
    else:  # the most held at any moment: a segment, once reserved, stays reserved
        during = max(rep.forward_extra, rep.backward_extra, *states.forward_extra,
                     *states.backward_extra, *states.embed_extra, *states.head_extra)
    reserved = _reserved(setup, trace, states, params, block_kinds, peak, during)
    return MemoryEstimate(
        peak_bytes=peak,
        peak_phase=phase,
        reserved_bytes=reserved,
        weights_bytes=states.weights + buffers,
        gradient_bytes=0 if inference else states.gradients,
        optimizer_state_bytes=states.optimizer_state,
        optimizer_temporary_bytes=states.optimizer_temporary,
        activation_bytes=embed + sum(per_block),
        activation_bytes_per_block=per_block,
        logits_bytes=max(head_fwd.high, head_fwd.net + head_bwd.high),
        forward_peak_bytes=persistent + rep.forward_peak,
        backward_peak_bytes=backward_peak,
        optimizer_peak_bytes=optimizer_peak,
        trainable_params=0 if inference else sum(p.numel for p in params if p.trainable),
        total_params=(sum(p.numel for p in params if not p.quantized)  # packed: the weights
                      + sum(m.n_out * m.n_in for m in setup.quantized_layers)),
        **setup_fields(setup),
        forward_flops=sum(seg.get((p, "fwd"), Segment()).flops for p in parts),
        backward_flops=0 if inference else sum(seg.get((p, "bwd"), Segment()).flops for p in parts),
        distributed=sharding.distributed,
        num_gpus=sharding.num_gpus,
        offload=sharding.offload,
        master_weights_bytes=states.master_weights,
        buffer_bytes=states.buffers,
        held_bytes=held,
        host_bytes=states.host * sharding.ranks_per_node,
        quantized_base_bytes=quant_state + packed_resident(params, len(block_kinds), sharding),
    )


def _reserved(
    setup: TrainingSetup, trace: StepTrace, states: RankStates, params: list[TensorInfo],
    block_kinds: list[int], peak: int, held: int,
) -> int:
    """``torch.cuda.max_memory_reserved()`` of the busiest rank: the caching allocator
    simulated (:mod:`layerscope.estimate.allocator`) over the rank's resident parameters, the
    traced step's allocations (FSDP2's buffers included) and the optimizer's states and
    temporaries (the strategy's step buffers among them). ``held``, what the modelled
    strategies hold besides the trace during forward and backward (gathered parameters,
    buckets: large blocks, each in a segment of its own), is added in whole segments, which
    the optimizer's temporaries are assumed not to reuse; for FSDP2, whose gathered parameters
    are resized storages the traced events do not list, ``held`` is what it keeps gathered."""
    from layerscope.estimate.allocator import (
        build_ops,
        round_size,
        segment_size,
        simulate_loop,
        step_events,
    )

    sharding = setup.sharding
    assert sharding is not None
    tensors = resident_tensors(params, num_blocks=len(block_kinds), sharding=sharding)
    buffers = [rounded(b.numel() * b.element_size()) for b in setup.model.buffers()]
    buffers += quant_state_sizes(setup)
    build = build_ops([(size, False) for size in [*tensors, *buffers] if size])
    state = states.state_blocks or (states.optimizer_state,)
    kept = [b for b in (states.master_weights, *state, states.buffers) if b]
    step = states.step_blocks or (states.optimizer_extra,)
    temporaries = [b for b in step if b] if not setup.inference else []
    step_ops: list[tuple[int, int]] = []
    if sharding.stage == 3 and sharding.offload is None and not setup.inference:
        # DeepSpeed's own allocations in their order: the engine's initialisation, then each
        # optimizer step's (zero3_allocations)
        init, step_ops = zero3_allocations(params, sharding=sharding, optimizer=setup.optimizer)
        build = build_ops([(size, False) for size in buffers if size])
        build += tuple((h + len(build), size) for h, size in init)
        kept, temporaries = [], []
    loop = simulate_loop(build, step_events(trace, block_kinds, setup.inference),
                         optimizer_state=kept, optimizer_temporaries=temporaries,
                         optimizer_ops=step_ops, inference=setup.inference)
    extra = segment_size(round_size(held)) if held else 0
    return max(peak, loop.reserved_peak + extra)


def _gathered_sizes(
    params: list[TensorInfo], num_blocks: int, prec: Any
) -> tuple[list[int], list[int], int, int]:
    """FSDP2's gathered bytes: per block (all-gather buffer, unsharded per-tensor storages),
    and the root's two. Under a mixed-precision policy everything is gathered in the autocast
    dtype, else in each tensor's own."""
    mp = prec.autocast_dtype is not None and prec.autocast_dtype != prec.param_dtype
    itemsize = int(dtype_bytes(prec.autocast_dtype)) if mp else 0
    buffers = [0] * num_blocks
    tensors = [0] * num_blocks
    root_buffer = root_tensors = 0
    for p in params:
        size = p.numel * (itemsize or p.itemsize)
        if p.block is None:
            root_buffer += size
            root_tensors += rounded(size)
        else:
            buffers[p.block] += size
            tensors[p.block] += rounded(size)
    return [rounded(b) for b in buffers], tensors, rounded(root_buffer), root_tensors


def _fsdp2_activations(
    per_block: tuple[int, ...], embed: int, params: list[TensorInfo], sharding: Sharding, prec: Any,
) -> tuple[tuple[int, ...], int]:
    """The traced segments' nets less what FSDP2 holds across them: the embedding segment
    holds the root's gathered parameters and its all-gather buffer (freed in block 0, which
    holds its own until block 1, ...); the last buffer is freed after the blocks. With
    ``fsdp-grad-op`` every block's gathered parameters stay."""
    buffers, tensors, root_buffer, root_tensors = _gathered_sizes(params, len(per_block), prec)
    blocks = list(per_block)
    blocks[0] += root_buffer - buffers[0]
    if sharding.distributed == "fsdp-grad-op":
        blocks = [b - t for b, t in zip(blocks, tensors)]
    for i in range(1, len(blocks)):
        blocks[i] += buffers[i - 1] - buffers[i]
    return tuple(blocks), embed - root_tensors - root_buffer


def fsdp2_gathered(
    params: list[TensorInfo], num_blocks: int, sharding: Sharding, prec: Any, phase: str,
) -> int:
    """What FSDP2 holds gathered at the peak of ``phase`` (for the breakdown; the trace counts
    it): the root kept from forward to backward (unless resharded), the current block
    unsharded plus its all-gather buffer (the next block's in forward, the prefetched previous
    block in backward). The largest block is taken."""
    if phase == "optimizer":
        return 0
    buffers, tensors, _, root_tensors = _gathered_sizes(params, num_blocks, prec)
    kept_root = root_tensors if not sharding.fsdp.reshard_root else 0
    biggest = max((b + t for b, t in zip(buffers, tensors)), default=0)
    if sharding.distributed == "fsdp-grad-op":
        return kept_root + sum(tensors) + max(buffers, default=0)
    return kept_root + biggest

