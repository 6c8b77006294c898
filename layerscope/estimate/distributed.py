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

import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from layerscope.errors import EstimateError, ModelTypeError
from layerscope.estimate.sharding import Sharding
from layerscope.estimate.states import ParamInfo, RankStates, rank_states
from layerscope.estimate.trace import Segment, fake_parameters, reduced_copy, replay, rounded, run_step
from layerscope.units import dtype_bytes


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


def sharded_memory_for(
    model: nn.Module,
    trainable: Iterable[str],
    *,
    sharding: Sharding,
    batch_size: int = 1,
    seq_len: int = 2048,
    precision: str = "bf16-mixed",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    lora: Any = None,
    inference: bool = False,
) -> Any:
    """Per-GPU :class:`~layerscope.estimate.memory.MemoryEstimate` of the busiest GPU of
    ``sharding`` (``batch_size`` is per GPU), for an explicit set of trainable names.

    Raises:
        EstimateError: invalid settings, or a forward that fails when traced.
    """
    from layerscope.estimate import memory as mem
    from layerscope.estimate.settings import lora_config, resolve_optimizer, resolve_precision

    prec = resolve_precision(precision)
    optimizer = resolve_optimizer(optimizer)
    mem._check_settings(batch_size, seq_len)
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(sharding, Sharding):
        raise EstimateError(f"sharding must be a Sharding, got {type(sharding).__name__}")
    if sharding.is_fsdp and sharding.fsdp.version == 2:
        from layerscope.estimate.fsdp import in_fresh_process, process_group_in_use

        if process_group_in_use():  # never touch the caller's group: trace in a new process
            return in_fresh_process(
                sharded_memory_for, _skeleton(model), frozenset(trainable), sharding=sharding,
                batch_size=batch_size, seq_len=seq_len, precision=prec.name, optimizer=optimizer,
                gradient_checkpointing=gradient_checkpointing, lora=lora, inference=inference,
            )
    lora = lora_config(model, lora)
    trainable = frozenset(trainable)
    named = list(model.named_parameters(remove_duplicate=False))
    unknown = trainable - {n for n, _ in named}
    if unknown:
        raise EstimateError(f"trainable names not in the model: {sorted(unknown)[:5]}")
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        raise EstimateError("the model has no config.vocab_size; a Hugging Face causal LM is needed")

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
    blocks_name, blocks = mem._block_stack(model)
    lora_targets = mem._lora_targets(model, lora) if lora is not None else frozenset()
    kinds, reps = mem._block_kinds(model, blocks_name, blocks, is_trainable, lora_targets, config)
    param_dtype, autocast_dtype = trace_dtypes(prec, sharding)
    fsdp2 = sharding.is_fsdp and sharding.fsdp.version == 2

    # the full model's tensors as the strategy sees them (adapters after their block's tensors)
    block_of = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
    adapter_shapes = _adapter_shapes(model, lora, lora_targets) if lora is not None else {}
    deepspeed = sharding.stage > 0
    pbytes = int(dtype_bytes(param_dtype if deepspeed else prec.param_dtype))
    params: list[ParamInfo] = []
    done_blocks: set[int] = set()

    def add_adapters(block: int | None) -> None:
        for shape in adapter_shapes.get(block, []):
            n = 1
            for s in shape:
                n *= s
            params.append(ParamInfo(n, shape, pbytes if deepspeed else 4, not inference, block))

    last_block: int | None = None
    for p in tensors.values():
        b = block_of.get(id(p))
        if last_block is not None and b != last_block and last_block not in done_blocks:
            add_adapters(last_block)
            done_blocks.add(last_block)
        size = pbytes if p.is_floating_point() else p.element_size()
        params.append(ParamInfo(p.numel(), tuple(p.shape), size,
                                bool(is_trainable[id(p)]) and not inference, b))
        last_block = b
    if last_block is not None and last_block not in done_blocks:
        add_adapters(last_block)
    add_adapters(None)
    compute = int(dtype_bytes(autocast_dtype or param_dtype))
    states = rank_states(params, num_blocks=len(blocks), sharding=sharding, optimizer=optimizer,
                         compute_itemsize=compute, inference=inference)

    # what the trace computes gradients for
    trace_trainable = {i for i, t in is_trainable.items() if t}
    mixed_units = sharding.is_fsdp and sharding.fsdp.version == 1 and sharding.fsdp.use_orig_params
    if mixed_units and not inference:
        for block in blocks:
            ids = [id(p) for p in block.parameters()]
            prefix = f"{blocks_name}.{list(blocks).index(block)}."
            if any(i in trace_trainable for i in ids) or any(t.startswith(prefix) for t in lora_targets):
                trace_trainable.update(i for i in ids if tensors[i].is_floating_point())
    if fsdp2:
        kinds, reps = neighbour_kinds(blocks, kinds, lora_targets, blocks_name, trace_trainable)

    reduced, kept, memo = reduced_copy(model, blocks, reps)
    trainable_copy = {id(memo[i]) for i in trace_trainable if i in memo}
    lora_ids: set[int] = set()
    if lora is not None:
        lora_ids = mem._inject_lora(reduced, lora, memo, lora_targets, blocks_name, reps)
    if gradient_checkpointing and not inference:
        enable = getattr(reduced, "gradient_checkpointing_enable", None)
        if enable is None or not getattr(reduced, "supports_gradient_checkpointing", False):
            raise EstimateError(f"{type(model).__name__} does not support gradient checkpointing")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reduced.train(not inference)

    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()

    def dtype_of(name: str, p: torch.Tensor) -> torch.dtype:
        if not p.is_floating_point():
            return p.dtype
        if id(p) in lora_ids and not deepspeed and autocast_dtype != param_dtype:
            return torch.float32  # peft upcasts adapters; DeepSpeed casts them back
        return param_dtype

    def trainable_of(p: torch.Tensor) -> bool:
        return id(p) in trainable_copy or id(p) in lora_ids

    block_kinds = [kinds[i] for i in range(len(blocks))]
    kind_of_position = [kinds[r] for r in reps]
    fake_parameters(reduced, mode, dtype_of, trainable_of)
    if not states.trace_keeps_grads and not fsdp2 and not inference:
        for p in reduced.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(_drop_grad)  # type: ignore[no-untyped-call]
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        if fsdp2:
            from layerscope.estimate.fsdp import trace_fsdp2

            trace = trace_fsdp2(
                reduced, kept, kinds=kind_of_position, sharding=sharding, param_dtype=param_dtype,
                batch_size=batch_size, seq_len=seq_len, vocab_size=vocab,
                autocast_dtype=autocast_dtype, inference=inference, mode=mode,
            )
        else:
            trace = run_step(
                reduced, kept, kinds=kind_of_position, batch_size=batch_size, seq_len=seq_len,
                vocab_size=vocab, autocast_dtype=autocast_dtype, inference=inference, mode=mode,
            )
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EstimateError(
            f"{type(model).__name__}: its forward failed when traced under "
            f"{sharding.describe()} with batch_size={batch_size}, seq_len={seq_len} ({first})"
        ) from exc
    finally:
        fake_log.setLevel(level)
    rep = replay(trace, block_kinds, inference, extra=states.extra)
    return _assemble(
        model, trace, rep, states, block_kinds, params, sharding, prec, optimizer, batch_size,
        seq_len, gradient_checkpointing, inference, lora,
    )


def _skeleton(model: nn.Module) -> nn.Module:
    """``model`` as a meta skeleton (itself when it is one), to send to another process."""
    if all(p.is_meta for p in model.parameters()):
        return model
    from layerscope.estimate.memory import _block_stack

    _, blocks = _block_stack(model)
    copy, _, _ = reduced_copy(model, blocks, list(range(len(blocks))))
    return copy


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def _adapter_shapes(
    model: nn.Module, lora: Any, targets: frozenset[str]
) -> dict[int | None, list[tuple[int, ...]]]:
    """Shapes of the LoRA tensors peft adds to each target of the full model, by block."""
    from layerscope.scan import scan

    s = scan(model)
    prefix = s.layers.path + "." if s.primary is not None else None
    out: dict[int | None, list[tuple[int, ...]]] = {}
    for name in sorted(targets):
        module = model.get_submodule(name)
        r = lora.rank_pattern.get(name, lora.r) if getattr(lora, "rank_pattern", None) else lora.r
        if isinstance(module, nn.Embedding):
            shapes = [(r, module.num_embeddings), (module.embedding_dim, r)]
        else:
            fan_in = getattr(module, "in_features", None)
            fan_out = getattr(module, "out_features", None)
            if fan_in is None:  # transformers' Conv1D: weight (in, out)
                weight: Any = module.weight
                fan_in, fan_out = weight.shape
            shapes = [(r, fan_in), (fan_out, r)]
        block: int | None = None
        if prefix and name.startswith(prefix):
            block = int(name[len(prefix):].split(".", 1)[0])
        out.setdefault(block, []).extend(shapes)
    return out


def _assemble(
    model: nn.Module, trace: Any, rep: Any, states: RankStates, block_kinds: list[int],
    params: list[ParamInfo], sharding: Sharding, prec: Any, optimizer: str, batch_size: int,
    seq_len: int, gradient_checkpointing: bool, inference: bool, lora: Any,
) -> Any:
    from layerscope.estimate.memory import MemoryEstimate

    buffers = sum(rounded(b.numel() * b.element_size()) for b in model.buffers())
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
    return MemoryEstimate(
        peak_bytes=peak,
        peak_phase=phase,
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
        total_params=sum(p.numel for p in params),
        batch_size=batch_size,
        seq_len=seq_len,
        precision=prec.name,
        optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing,
        inference=inference,
        lora_rank=getattr(lora, "r", None) if lora is not None else None,
        forward_flops=sum(seg.get((p, "fwd"), Segment()).flops for p in parts),
        backward_flops=0 if inference else sum(seg.get((p, "bwd"), Segment()).flops for p in parts),
        distributed=sharding.distributed,
        num_gpus=sharding.num_gpus,
        offload=sharding.offload,
        master_weights_bytes=states.master_weights,
        buffer_bytes=states.buffers,
        held_bytes=held,
        host_bytes=states.host * sharding.ranks_per_node,
    )


def _gathered_sizes(
    params: list[ParamInfo], num_blocks: int, prec: Any
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
    per_block: tuple[int, ...], embed: int, params: list[ParamInfo], sharding: Sharding, prec: Any,
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
    params: list[ParamInfo], num_blocks: int, sharding: Sharding, prec: Any, phase: str,
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

