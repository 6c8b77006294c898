"""Per-GPU states of a sharded run, from the libraries' source: what each strategy keeps
(weights, fp32 master copies, gradients, optimizer states, collective buffers) on the busiest
GPU and in CPU memory, and what it holds besides the traced step while it runs.

The traced step (:mod:`layerscope.estimate.trace`) measures activations, logits and the
gradients autograd makes; this module adds what a data-parallel strategy changes around it,
one mechanism at a time, each from the code that allocates it:

- DDP (``torch/nn/parallel/distributed.py``, ``reducer.cpp``): a full replica, plus the
  reducer's flat gradient buckets, allocated once at construction (``initialize_buckets``)
  and kept: a second copy of every gradient unless ``gradient_as_bucket_view``.
- DeepSpeed ZeRO (``deepspeed/runtime/zero/stage_1_and_2.py``, ``stage3.py``,
  ``partition_parameters.py``): the module cast to 16-bit, an fp32 master partition, the
  optimizer on the master partition, gradients reduced through the contiguous IPG bucket
  (``reduce_bucket_size`` elements, two with ``overlap_comm``) into a partition buffer
  (stage 2: ``grads_in_partition``; stage 3: ``grad_partitions_flat_buffer`` and the bucket,
  both allocated at initialisation); stage 1 keeps the full gradients until the step. The step
  flattens each (sub-)group's gradient partition and casts it to fp32 (``.to(fp32)``) before
  the optimizer runs on it. Stage 3 gathers parameters module by module plus
  ``stage3_prefetch_bucket_size`` elements ahead (at most ``stage3_max_live_parameters``),
  keeps parameters under ``stage3_param_persistence_threshold`` elements gathered, and keeps
  the last blocks gathered from forward into backward while their reuse distance is under
  ``stage3_max_reuse_distance``.
- FSDP1 (``torch/distributed/fsdp/_flat_param.py``, ``_runtime_utils.py``): one flat
  parameter per wrapped block (and one for the root), sharded with padding; a block is
  unsharded into ``_full_param_padded`` (compute dtype) for its forward and again for its
  backward, with the previous block prefetched (``BACKWARD_PRE``); its gradient is the whole
  flat parameter's (``split`` views: autograd concatenates the per-tensor gradients), frozen
  tensors included when ``use_orig_params=True`` mixes them with trainable ones; the
  reduce-scatter leaves a sharded gradient kept until the step. The root is not resharded
  after forward.
- FSDP2 is traced (:mod:`layerscope.estimate.fsdp`); here only its persistent states.

Sizes are bytes as the CUDA caching allocator counts them (:func:`~.trace.rounded`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerscope.errors import EstimateError
from layerscope.estimate.optimizers import OPTIMIZERS
from layerscope.estimate.sharding import DDP_FIRST_BUCKET_BYTES, Sharding
from layerscope.estimate.trace import rounded

if TYPE_CHECKING:
    from layerscope.scan import ModelScan
    from layerscope.setup import Lora

ZERO_ALIGNMENT = 2
"""DeepSpeed ZeRO-1/2 pads a flat group to a multiple of ``2 * world_size`` elements
(``nccl_start_alignment_factor = 2``: 4-byte alignment of 16-bit partitions)."""

ZERO_MAX_REUSE_DISTANCE = 1_000_000_000
"""DeepSpeed's ``stage3_max_reuse_distance`` default (elements): a gathered parameter used
again within this many gathered elements is not released."""


@dataclass(frozen=True)
class TensorInfo:
    """One parameter tensor as a sharding strategy sees it.

    Attributes:
        numel: elements.
        shape: its shape (FSDP2 shards dim 0).
        itemsize: bytes per element of the stored copy (the parameter dtype; LoRA adapters
            are fp32 as peft makes them, except under DeepSpeed, which casts the module).
        trainable: whether the optimizer updates it.
        block: the index of the block (FSDP unit) that holds it; None outside the block stack
            (embeddings, final norm, head: the FSDP root).
        quantized: a bitsandbytes weight, ``numel`` elements of its packed storage (frozen).
    """

    numel: int
    shape: tuple[int, ...]
    itemsize: int
    trainable: bool
    block: int | None
    quantized: bool = False


@dataclass(frozen=True)
class RankStates:
    """What a strategy keeps on the busiest GPU and in CPU memory around a traced step.

    Attributes:
        weights: parameter bytes on the GPU between steps (shards, 16-bit copies, persisted
            ZeRO-3 parameters; buffers excluded).
        master_weights: fp32 master partition on the GPU (ZeRO).
        gradients: gradient bytes on the GPU when the optimizer steps (the full ``.grad``
            tensors, or a shard or partition of them).
        optimizer_state: optimizer state on the GPU.
        optimizer_temporary: what ``optimizer.step()`` allocates at its highest point on the GPU.
        buffers: collective buffers allocated once and kept (DDP buckets, ZeRO-3 IPG bucket and
            gradient partition buffer, ZeRO-Offload staging buffers).
        optimizer_extra: bytes above ``weights + master_weights + optimizer_state + buffers``
            and the traced step's end state at the optimizer's highest point (gradient
            flattening and fp32 casts, optimizer temporaries).
        host: CPU memory of one rank (offloaded states, pinned buffers).
        trace_keeps_grads: whether the traced step keeps the gradients autograd makes (DDP,
            ZeRO-1, one GPU) or they leave at once (into a bucket, a partition, a shard).
        forward_extra, backward_extra: per block, bytes held besides the traced step during
            that block's forward / backward (gathered parameters, buckets, sharded gradients
            so far); ``embed_extra`` and ``head_extra`` for the parts outside the blocks as
            ``(forward, backward)``.
        state_blocks: ``optimizer_state`` allocation by allocation, as the optimizer makes it
            (one state tensor per parameter tensor it steps); empty: one allocation.
        step_blocks: what ``optimizer.step()`` allocates, all alive together, beyond what
            backward left (sharded gradients made in backward are in the extras, not here);
            empty: ``optimizer_extra`` as one allocation.
    """

    weights: int
    master_weights: int
    gradients: int
    optimizer_state: int
    optimizer_temporary: int
    buffers: int
    optimizer_extra: int
    host: int
    trace_keeps_grads: bool
    forward_extra: tuple[int, ...] = ()
    backward_extra: tuple[int, ...] = ()
    embed_extra: tuple[int, int] = (0, 0)
    head_extra: tuple[int, int] = (0, 0)
    state_blocks: tuple[int, ...] = ()
    step_blocks: tuple[int, ...] = ()

    @property
    def persistent(self) -> int:
        """GPU bytes held for the whole step (the optimizer state included)."""
        return self.weights + self.master_weights + self.optimizer_state + self.buffers

    def extra(self, part: str, phase: str, index: int | None) -> int:
        """:data:`~layerscope.estimate.trace.Extra` for the replay."""
        if phase not in ("fwd", "bwd"):
            return 0
        if part == "block" and index is not None:
            held = self.forward_extra if phase == "fwd" else self.backward_extra
            return held[index] if index < len(held) else 0
        pair = self.embed_extra if part == "embed" else self.head_extra
        return pair[0] if phase == "fwd" else pair[1]


def scan_tensors(scan: ModelScan, trainable: Collection[str], lora: Lora | None = None, *,
                 itemsize: int = 4, adapter_itemsize: int = 4,
                 packed: Mapping[str, tuple[int, int]] | None = None,
                 frozen_itemsize: int | None = None) -> list[TensorInfo]:
    """Every parameter tensor of a scanned model once (a tied tensor under its first name),
    with the tensors peft adds: each targeted module's adapters ``A`` (``r x in``) and ``B``
    (``out x r``), and a trainable copy of each of ``modules_to_save``'s parameters. A block's
    added tensors come after its own. Read from the scan, without a trace: the description
    the communication model (:mod:`layerscope.estimate.comm`) shares with the states above.

    Args:
        scan: the model's scan.
        trainable: names of the trainable base parameters.
        lora: the adapters, or None.
        itemsize: bytes per element of a floating-point base tensor (integer tensors keep
            their own).
        adapter_itemsize: bytes per element of an adapter (peft makes them fp32).
        packed: a quantized base's weights by name -> ``(elements, bytes per element)`` of
            their packed storage (:func:`layerscope.estimate.distributed.stored_sizes`).
        frozen_itemsize: bytes per element of a frozen floating base tensor (a 16-bit base
            under fp32 trainable parameters); None: ``itemsize``.

    Raises:
        EstimateError: a trainable name or LoRA target that is not in the model.
    """
    unknown = set(trainable) - set(scan.by_name)
    if unknown:
        raise EstimateError(f"trainable names not in the model: {sorted(unknown)[:5]}")
    wanted = set(trainable)

    def block(name: str) -> int | None:
        where = scan.block_of(name)
        return where[1] if where is not None and where[0] == scan.primary else None

    base: list[TensorInfo] = []
    packed = packed or {}
    for group in scan.tensors:
        p = group[0]
        quantized = next((packed[a.name] for a in group if a.name in packed), None)
        if quantized is not None:
            elements, size = quantized
            base.append(TensorInfo(elements, (elements, 1), size, False, block(p.name), True))
            continue
        trains = any(a.name in wanted for a in group)
        floating = itemsize if trains or frozen_itemsize is None else frozen_itemsize
        size = floating if p.dtype.is_floating_point else p.dtype.itemsize
        base.append(TensorInfo(p.numel, p.shape, size, trains, block(p.name)))
    added: dict[int | None, list[TensorInfo]] = {}
    if lora is not None:
        for target in sorted(lora.targets):
            weight = scan.by_name.get(f"{target}.weight")
            if weight is None or len(weight.shape) < 2:
                raise EstimateError(f"LoRA target {target!r} has no matrix weight in the model")
            out, inner = weight.shape[0], weight.numel // weight.shape[0]
            added.setdefault(block(weight.name), []).extend([
                TensorInfo(lora.rank * inner, (lora.rank, inner), adapter_itemsize, True,
                           block(weight.name)),
                TensorInfo(out * lora.rank, (out, lora.rank), adapter_itemsize, True,
                           block(weight.name))])
        for module in sorted(lora.modules_to_save):
            for p in scan.params:
                if p.module == module or p.module.startswith(module + "."):
                    added.setdefault(block(p.name), []).append(
                        TensorInfo(p.numel, p.shape, itemsize, True, block(p.name)))
    out_list: list[TensorInfo] = []
    for i, t in enumerate(base):
        out_list.append(t)
        following = base[i + 1].block if i + 1 < len(base) else object()
        if t.block != following:
            out_list += added.pop(t.block, [])
    for rest in added.values():
        out_list += rest
    return out_list


def _check(params: Sequence[TensorInfo], num_blocks: int) -> None:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
        raise EstimateError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
    for p in params:
        if not isinstance(p, TensorInfo):
            raise EstimateError(f"params must be TensorInfo values, got {type(p).__name__}")
        if p.block is not None and not 0 <= p.block < num_blocks:
            raise EstimateError(f"a parameter's block {p.block} is outside 0..{num_blocks - 1}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _optimizer(name: str, tensors: Sequence[tuple[int, int, tuple[int, ...]]]) -> tuple[int, int]:
    state, temp = _optimizer_blocks(name, tensors)
    return sum(state), sum(temp)


def _optimizer_blocks(
    name: str, tensors: Sequence[tuple[int, int, tuple[int, ...]]]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The optimizer's state and step temporaries over ``tensors``, allocation by allocation."""
    if name not in OPTIMIZERS:
        raise EstimateError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
    if not tensors:
        return (), ()
    mem = OPTIMIZERS[name](tensors)
    return mem.state_blocks, mem.temporary_blocks


def rank_states(
    params: Sequence[TensorInfo],
    *,
    num_blocks: int,
    sharding: Sharding,
    optimizer: str,
    compute_itemsize: int,
    inference: bool = False,
    gradient_checkpointing: bool = False,
) -> RankStates:
    """The states of ``sharding``'s busiest GPU for a model made of ``params``.

    Args:
        params: every parameter tensor once (a tied tensor once).
        num_blocks: blocks in the stack (FSDP units besides the root).
        sharding: the strategy; ``distributed=None`` gives the one-GPU states.
        optimizer: an optimizer name of :mod:`layerscope.estimate.optimizers`.
        compute_itemsize: bytes per element the forward computes in (the autocast dtype under
            ``*-mixed``, else the parameter dtype): FSDP gathers in it.
        inference: a forward only (no gradients, no optimizer).
        gradient_checkpointing: blocks are recomputed in backward (ZeRO-3 then keeps a block's
            parameters gathered from its recomputation to its backward).

    Raises:
        EstimateError: invalid inputs, or a strategy this module does not model (FSDP2 is
            traced: its states come from :func:`fsdp2_states`).
    """
    _check(params, num_blocks)
    d = sharding.distributed
    if d is None or d == "ddp":
        return _replicated(params, num_blocks, sharding, optimizer, inference)
    if sharding.stage:
        return _zero(params, num_blocks, sharding, optimizer, inference, gradient_checkpointing)
    if sharding.fsdp.version == 1:
        return _fsdp1(params, num_blocks, sharding, optimizer, compute_itemsize, inference)
    return fsdp2_states(params, num_blocks=num_blocks, sharding=sharding, optimizer=optimizer,
                        inference=inference)


def resident_tensors(params: Sequence[TensorInfo], *, num_blocks: int, sharding: Sharding) -> list[int]:
    """Bytes of each parameter allocation a rank keeps on the GPU between steps, in order (the
    pieces of :attr:`RankStates.weights`, for the caching-allocator simulation): whole tensors
    (one GPU, DDP, ZeRO-1/2's 16-bit module), FSDP2's padded shards, ZeRO-3's partitions and
    persisted tensors, FSDP1's flat shards; none offloaded."""
    _check(params, num_blocks)
    n = sharding.shard_size
    offloaded = sharding.offload == "params"
    if sharding.is_fsdp and sharding.fsdp.version == 1:
        units: dict[int | None, int] = {}
        for p in params:
            units[p.block] = units.get(p.block, 0) + p.numel * p.itemsize
        return [] if offloaded else [rounded(ceil_div(b, n)) for b in units.values()]
    if sharding.is_fsdp:
        return [] if offloaded else [rounded(fsdp2_shard_numel(p.shape, n) * p.itemsize) for p in params]
    if sharding.stage == 3:
        out = [] if offloaded else [rounded(ceil_div(p.numel, n) * p.itemsize) for p in params]
        if n == 1 and not offloaded:  # a persisted tensor is its partition (no gather on one GPU)
            return out
        return out + [rounded(p.numel * p.itemsize) for p in params
                      if p.numel <= sharding.zero.param_persistence_threshold]
    return [rounded(p.numel * p.itemsize) for p in params]


# -- one GPU and DDP ------------------------------------------------------------------------------
def ddp_buckets(params: Sequence[TensorInfo], bucket_cap_mb: float) -> list[int]:
    """Bytes of each DDP reducer bucket: trainable tensors in reverse registration order, by
    dtype, the first bucket capped at 1 MiB and the others at ``bucket_cap_mb`` MiB (a bucket
    closes once it reaches its cap; ``_compute_bucket_assignment_by_size``)."""
    caps = [DDP_FIRST_BUCKET_BYTES, int(bucket_cap_mb * 2**20)]
    sizes: list[int] = []
    open_by_dtype: dict[int, int] = {}
    count_by_dtype: dict[int, int] = {}
    for p in reversed(params):
        if not p.trainable:
            continue
        size = p.numel * p.itemsize
        current = open_by_dtype.get(p.itemsize, 0) + size
        cap = caps[min(count_by_dtype.get(p.itemsize, 0), 1)]
        if current >= cap:
            sizes.append(current)
            open_by_dtype[p.itemsize] = 0
            count_by_dtype[p.itemsize] = count_by_dtype.get(p.itemsize, 0) + 1
        else:
            open_by_dtype[p.itemsize] = current
    sizes += [v for v in open_by_dtype.values() if v]
    return sizes


def _replicated(
    params: Sequence[TensorInfo], num_blocks: int, sharding: Sharding, optimizer: str,
    inference: bool,
) -> RankStates:
    weights = sum(rounded(p.numel * p.itemsize) for p in params)
    train = [(p.numel, p.itemsize, p.shape) for p in params if p.trainable]
    grads = sum(rounded(n * b) for n, b, _ in train)
    state_blocks, temp_blocks = ((), ()) if inference else _optimizer_blocks(optimizer, train)
    state, temp = sum(state_blocks), sum(temp_blocks)
    buckets = 0
    view = False
    if sharding.distributed == "ddp" and not inference:
        buckets = sum(rounded(b) for b in ddp_buckets(params, sharding.ddp.bucket_cap_mb))
        view = sharding.ddp.gradient_as_bucket_view
    return RankStates(
        weights=weights, master_weights=0, gradients=0 if inference else (buckets if view else grads),
        optimizer_state=state, optimizer_temporary=temp, buffers=buckets, optimizer_extra=temp,
        host=0, trace_keeps_grads=not view, state_blocks=state_blocks, step_blocks=temp_blocks,
    )


# -- FSDP2 (persistent part; the step is traced) ------------------------------------------------
def fsdp2_shard_numel(shape: tuple[int, ...], shard_size: int) -> int:
    """Elements of one rank's FSDP2 shard: dim 0 split in ``ceil(dim0 / N)`` rows, every rank
    padded to that (``FSDPParam._init_sharded_param``: ``padded_sharded_param_size``)."""
    if not shape:
        return 1
    rest = 1
    for s in shape[1:]:
        rest *= s
    return ceil_div(shape[0], shard_size) * rest


def fsdp2_states(
    params: Sequence[TensorInfo], *, num_blocks: int, sharding: Sharding, optimizer: str,
    inference: bool = False,
) -> RankStates:
    """FSDP2's persistent states: each parameter's padded shard (kept as its own storage), the
    optimizer on the shards (DTensors: the foreach kernels run on the local shards), and the
    sharded gradients, which the traced step itself allocates (the reduce-scatter output),
    one storage per block. With ``offload="params"`` shards, gradients and optimizer state are
    host memory (``CPUOffloadPolicy``)."""
    _check(params, num_blocks)
    n = sharding.shard_size
    shards = [(fsdp2_shard_numel(p.shape, n), p.itemsize, p) for p in params]
    weights = sum(rounded(k * b) for k, b, _ in shards)
    train = [(k, b, (k,)) for k, b, p in shards if p.trainable]
    units: dict[int | None, int] = {}
    for k, b, p in shards:
        if p.trainable:
            units[p.block] = units.get(p.block, 0) + k * b
    grads = 0 if inference else sum(rounded(v) for v in units.values())
    state_blocks, temp_blocks = ((), ()) if inference else _optimizer_blocks(optimizer, train)
    state, temp = sum(state_blocks), sum(temp_blocks)
    if sharding.offload == "params":
        return RankStates(
            weights=0, master_weights=0, gradients=0, optimizer_state=0, optimizer_temporary=0,
            buffers=0, optimizer_extra=0, host=weights + grads + state + temp,
            trace_keeps_grads=False,
        )
    return RankStates(
        weights=weights, master_weights=0, gradients=grads, optimizer_state=state,
        optimizer_temporary=temp, buffers=0, optimizer_extra=temp, host=0,
        trace_keeps_grads=True, state_blocks=state_blocks, step_blocks=temp_blocks,
    )


# -- FSDP1 ---------------------------------------------------------------------------------------
def fsdp1_units(params: Sequence[TensorInfo], num_blocks: int) -> list[list[TensorInfo]]:
    """FSDP1's units: one flat parameter per block, then the root's (the last: every tensor
    outside ``0..num_blocks - 1``)."""
    units: list[list[TensorInfo]] = [[] for _ in range(num_blocks + 1)]
    for p in params:
        units[num_blocks if p.block is None or p.block >= num_blocks else p.block].append(p)
    return units


def fsdp1_grad_numel(params: Sequence[TensorInfo], num_blocks: int,
                     use_orig_params: bool) -> list[int]:
    """Elements of each FSDP1 unit's flat gradient (the blocks, then the root): what backward
    makes unsharded, the reduce-scatter reduces and ``no_sync`` keeps.

    With ``use_orig_params=True`` (accelerate's default) a unit with any trainable tensor gets
    a gradient of its whole flat parameter (``FlatParamHandle`` gives the flat parameter one
    ``.grad``; frozen tensors' parts are zeros). With ``False`` adapters are units of their own
    (peft's ``fsdp_auto_wrap_policy``), so a unit's gradient is its trainable tensors'.
    """
    out = []
    for u in fsdp1_units(params, num_blocks):
        if use_orig_params:
            out.append(sum(p.numel for p in u) if any(p.trainable for p in u) else 0)
        else:
            out.append(sum(p.numel for p in u if p.trainable))
    return out


def _fsdp1(
    params: Sequence[TensorInfo], num_blocks: int, sharding: Sharding, optimizer: str,
    compute_itemsize: int, inference: bool,
) -> RankStates:
    cfg = sharding.fsdp
    n = sharding.shard_size
    units = fsdp1_units(params, num_blocks)
    flat = [sum(p.numel for p in u) for u in units]
    flat_bytes = [sum(p.numel * p.itemsize for p in u) for u in units]
    shard = [ceil_div(f, n) for f in flat]
    shard_bytes = [ceil_div(f, n) for f in flat_bytes]
    grad_numel = fsdp1_grad_numel(params, num_blocks, cfg.use_orig_params)
    weights = sum(rounded(b) for b in shard_bytes)
    unsharded = [rounded(f * compute_itemsize) for f in flat]
    sharded_grad = [
        rounded(ceil_div(g * b, f * n)) if g else 0  # the flat gradient in the unit's dtype
        for g, b, f in zip(grad_numel, flat_bytes, flat)
    ]
    # optimizer: use_orig_params gives it each trainable tensor's local slice, else each flat
    # shard: a unit's, or an adapter's (peft's wrap policy makes each adapter a unit)
    pieces = [[p] for p in params if p.trainable]
    if not cfg.use_orig_params:
        pieces = []
        for u in units:
            trained = [p for p in u if p.trainable]
            pieces += [trained] if trained and len(trained) == len(u) else [[p] for p in trained]
    shards = [(ceil_div(sum(p.numel for p in piece), n), piece[0].itemsize) for piece in pieces]
    train = [(k, b, (k,)) for k, b in shards]
    state_blocks, temp_blocks = ((), ()) if inference else _optimizer_blocks(optimizer, train)
    state, temp = sum(state_blocks), sum(temp_blocks)
    host = 0
    if sharding.offload == "params":  # CPUOffload: shards, their gradients and the optimizer
        host = weights + sum(sharded_grad) + state + temp
        weights, state, temp = 0, 0, 0
        state_blocks, temp_blocks = (), ()

    if sharding.offload == "params":  # sharded gradients go to the CPU as they are reduced
        sharded_grad = [0] * len(sharded_grad)
    root = num_blocks
    keep_root = unsharded[root] if not cfg.reshard_root else 0
    grad_op = sharding.distributed == "fsdp-grad-op"
    fwd: list[int] = []
    bwd: list[int] = []
    for i in range(num_blocks):
        cast = rounded(shard[i] * compute_itemsize) if compute_itemsize * flat[i] != flat_bytes[i] else 0
        ahead = unsharded[i + 1] if cfg.forward_prefetch and i + 1 < num_blocks else 0
        kept = sum(unsharded[:i]) if grad_op else 0
        fwd.append(keep_root + kept + unsharded[i] + ahead + cast)
    for i in range(num_blocks):
        behind = unsharded[i - 1] if cfg.backward_prefetch and i > 0 else 0
        kept = sum(unsharded[:i]) if grad_op else 0
        # autograd's per-tensor gradients, then their concatenation into the flat gradient
        g = rounded(grad_numel[i] * compute_itemsize)
        grads_so_far = sum(sharded_grad[i + 1:num_blocks])
        bwd.append(keep_root + kept + unsharded[i] + behind + 2 * g + sharded_grad[i]
                   + grads_so_far)
    all_blocks = sum(unsharded[:num_blocks]) if grad_op else 0
    # The root's gradient is assembled when its last view's gradient arrives (the embedding,
    # at the end of backward): the head's gradients wait, whole, from the head's backward on.
    first_block = next((k for k, p in enumerate(params) if p.block is not None), len(params))
    root_trains = grad_numel[root] > 0
    head_grads = rounded(sum(p.numel for p in params[first_block:] if p.block is None)
                         * compute_itemsize) if root_trains else 0
    root_g = rounded(grad_numel[root] * compute_itemsize)
    bwd = [b + head_grads for b in bwd]
    sharded_total = sum(sharded_grad)
    return RankStates(
        weights=weights, master_weights=0, gradients=sharded_total, optimizer_state=state,
        optimizer_temporary=temp, buffers=0, optimizer_extra=sharded_total + temp, host=host,
        trace_keeps_grads=False, forward_extra=tuple(fwd), backward_extra=tuple(bwd),
        state_blocks=state_blocks, step_blocks=temp_blocks,
        embed_extra=(unsharded[root],
                     unsharded[root] + sum(sharded_grad[:num_blocks]) + head_grads + root_g),
        head_extra=(unsharded[root] + all_blocks, unsharded[root] + all_blocks + head_grads),
    )


# -- DeepSpeed ZeRO ------------------------------------------------------------------------------
def zero_partition(numel: int, ranks: int) -> int:
    """Elements of one rank's ZeRO-1/2 partition of ``numel`` flattened trainable elements over
    ``ranks``: the flat buffer padded to a multiple of ``ZERO_ALIGNMENT x ranks``, then split
    evenly."""
    return ceil_div(numel, ZERO_ALIGNMENT * ranks) * ZERO_ALIGNMENT


def zero3_sub_groups(partitions: Sequence[int], sub_group_size: int) -> list[int]:
    """Elements of each ZeRO-3 optimizer sub-group, from the trainable tensors' partition sizes
    (elements, in the optimizer's parameter order).

    DeepSpeed's ``_create_fp16_sub_groups`` (``stage3.py``, v0.12) keeps the group whole when
    ``sub_group_size`` covers it; otherwise it walks the parameters in order and closes a
    sub-group as soon as it holds at least ``sub_group_size`` elements, the last one taking the
    rest. A sub-group therefore overshoots ``sub_group_size`` by less than its last tensor, and
    with ``sub_group_size=0`` every tensor is a sub-group of its own.
    """
    if sub_group_size >= sum(partitions):
        return [sum(partitions)] if partitions else []
    groups, current = [], 0
    for numel in partitions:
        current += numel
        if current >= sub_group_size:
            groups.append(current)
            current = 0
    return [*groups, current] if current else groups


def zero3_allocations(
    params: Sequence[TensorInfo], *, sharding: Sharding, optimizer: str,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """DeepSpeed ZeRO-3's own GPU allocations in order, without offloading, as
    :mod:`~layerscope.estimate.allocator` ops ``(handle, bytes)`` (``bytes == 0``: free): the
    engine's initialisation, then one ``optimizer.step()``.

    Initialisation (``stage3.py``, v0.12; the order measured by ``benchmarks/zero3_cpu_probe.py``
    ``--events``): the frozen tensors' partitions (and, on several GPUs, the persisted tensors)
    from ``zero.Init``; ``defragment`` then moves the trainable partitions to the host, empties
    the cache and makes one flat 16-bit buffer; per sub-group a 16-bit clone cast to the fp32
    master (``_create_fp32_partitions``); a zero fp32 gradient of the largest sub-group while
    the optimizer makes each sub-group's states (``initialize_optimizer_states``); the gradient
    partition buffer and the IPG bucket (``_setup_for_real_optimizer``).

    A step: ``_get_norm_groups`` copies each gradient partition to fp64 for its norm, one at a
    time; then per sub-group the flattened 16-bit gradients cast to fp32, the optimizer's
    temporaries, and the fp32 gradient freed (``_release_sub_group``).
    """
    z = sharding.zero
    n = sharding.shard_size
    md = max((p.itemsize for p in params), default=2)
    parts = [ceil_div(p.numel, n) for p in params if p.trainable and p.numel]
    subs = zero3_sub_groups(parts, z.sub_group_size)
    init: list[tuple[int, int]] = []

    def make(ops: list[tuple[int, int]], nbytes: int) -> int:
        ops.append((len(ops), rounded(nbytes)))
        return len(ops) - 1

    for p in params:
        if not p.trainable and p.numel:
            make(init, ceil_div(p.numel, n) * p.itemsize)
    if n > 1:
        for p in params:
            if 0 < p.numel <= z.param_persistence_threshold:
                make(init, p.numel * md)
    if parts:
        make(init, sum(parts) * md)
        for sub in subs:
            clone = make(init, sub * md)
            make(init, sub * 4)
            init.append((clone, 0))
        zeros = make(init, max(subs) * 4)
        for sub in subs:
            state, _ = _optimizer(optimizer, [(sub, 4, (sub,))])
            if state:
                make(init, state)
        init.append((zeros, 0))
        make(init, sum(parts) * md)
    if z.contiguous_gradients and z.reduce_bucket_size:
        make(init, z.reduce_bucket_size * md)
    step: list[tuple[int, int]] = []
    for numel in parts:
        step.append((make(step, numel * 8), 0))
    for sub in subs:
        flat = make(step, sub * md)
        fp32 = make(step, sub * 4)
        step.append((flat, 0))
        _, temp = _optimizer(optimizer, [(sub, 4, (sub,))])
        if temp:
            step.append((make(step, temp), 0))
        step.append((fp32, 0))
    return init, step


def _ops_peak(ops: Sequence[tuple[int, int]]) -> int:
    """The most bytes alive at once over allocator ops ``(handle, bytes)`` (0 bytes: free)."""
    alive: dict[int, int] = {}
    peak = 0
    for h, size in ops:
        if size:
            alive[h] = size
            peak = max(peak, sum(alive.values()))
        else:
            alive.pop(h)
    return peak


def _zero(
    params: Sequence[TensorInfo], num_blocks: int, sharding: Sharding, optimizer: str,
    inference: bool, recompute: bool = False,
) -> RankStates:
    z = sharding.zero
    stage, n = sharding.stage, sharding.shard_size
    md = max((p.itemsize for p in params), default=2)  # the module's dtype (DeepSpeed casts it)
    offload_opt = sharding.offload in ("optimizer", "params")
    offload_params = sharding.offload == "params"
    trainable = [p for p in params if p.trainable]
    total_t = sum(p.numel for p in trainable)
    if stage < 3:
        part = zero_partition(total_t, n)
        weights = rounded(total_t * md) + sum(rounded(p.numel * md) for p in params if not p.trainable)
    else:
        part = sum(ceil_div(p.numel, n) for p in trainable)
        persisted = [p for p in params if p.numel <= z.param_persistence_threshold]
        weights = sum(rounded(ceil_div(p.numel, n) * md) for p in params)
        weights_gathered = sum(rounded(p.numel * md) for p in persisted)
        if n == 1 and not offload_params:  # the partition is the tensor: nothing is gathered
            weights_gathered = 0
        if offload_params:
            weights = 0
        weights += weights_gathered
    if inference:
        return RankStates(weights=weights, master_weights=0, gradients=0, optimizer_state=0,
                          optimizer_temporary=0, buffers=0, optimizer_extra=0, host=0,
                          trace_keeps_grads=False)
    master = rounded(part * 4)
    if stage == 3:  # the optimizer steps one sub-group at a time
        sub = max(zero3_sub_groups([ceil_div(p.numel, n) for p in trainable], z.sub_group_size),
                  default=0)
    else:
        sub = part
    state, _ = _optimizer(optimizer, [(part, 4, (part,))])
    _, temp = _optimizer(optimizer, [(sub, 4, (sub,))])
    bucket = rounded(z.reduce_bucket_size * md) if z.contiguous_gradients else 0
    buckets = bucket * (2 if z.overlap(stage) and stage < 3 else 1)
    largest_param = max((p.numel for p in trainable), default=0)
    host = 0

    if stage == 3:
        grad_buffer = rounded(part * md)  # grad_partitions_flat_buffer, allocated at init
        buffers = bucket
        if offload_opt:  # the gradient partitions and fp32 states live in (pinned) CPU memory
            host = grad_buffer + master + state + rounded(part * 4)
            if offload_params:
                host += sum(rounded(ceil_div(p.numel, n) * md) for p in params)
            grads_gpu, master, state, temp = 0, 0, 0, 0
            step = 0
        else:
            buffers += grad_buffer
            grads_gpu = grad_buffer
            # the step's highest point: its fp64 norm copies, then per sub-group the flat
            # 16-bit gradients, their fp32 cast and the optimizer's temporaries
            step = _ops_peak(zero3_allocations(params, sharding=sharding, optimizer=optimizer)[1])
        fwd, bwd, embed, head = _zero3_gathered(params, num_blocks, sharding, md, recompute,
                                                offloaded=offload_params)
        # reduce_scatter_coalesced concatenates the bucket's partitions; one tensor that splits
        # evenly (always, on one GPU) is reduced in place. One GPU with offloaded parameters
        # keeps the copy: not measured (see _zero3_gathered)
        reduce_copy = 0 if n == 1 and not offload_params else bucket
        return RankStates(
            weights=weights, master_weights=master, gradients=grads_gpu, optimizer_state=state,
            optimizer_temporary=temp, buffers=buffers, optimizer_extra=step, host=host,
            trace_keeps_grads=False, forward_extra=fwd,
            backward_extra=tuple(g + reduce_copy for g in bwd),
            embed_extra=(embed[0], embed[1] + reduce_copy), head_extra=(head[0], head[1] + reduce_copy),
        )

    full_grads = sum(rounded(p.numel * p.itemsize) for p in trainable)
    if offload_opt:
        # fp32 master, states and gradient partition in pinned CPU memory; a 16-bit staging
        # copy of the partition; GPU/CPU staging buffers of the largest parameter
        host = master + state + rounded(part * 4) + rounded(part * md) + rounded(largest_param * md)
        staging = rounded(largest_param * md)
        if stage == 1:  # gradients stay whole until the boundary, then go to the CPU
            return RankStates(
                weights=weights, master_weights=0, gradients=full_grads, optimizer_state=0,
                optimizer_temporary=0, buffers=staging, optimizer_extra=buckets, host=host,
                trace_keeps_grads=True,
            )
        return RankStates(
            weights=weights, master_weights=0, gradients=0, optimizer_state=0,
            optimizer_temporary=0, buffers=staging, optimizer_extra=0, host=host,
            trace_keeps_grads=False, backward_extra=(buckets,) * num_blocks,
            embed_extra=(0, buckets), head_extra=(0, buckets),
        )
    g_part = rounded(part * md)
    prepare = g_part + rounded(part * md) + rounded(part * 4)  # grads, flat copy, fp32 cast
    if stage == 1:
        # the full gradients stay until the step; after backward they are reduced through the
        # bucket into the partition buffer, then the step frees those outside the partition
        reduce = buckets + g_part
        step = max(reduce, prepare - full_grads, rounded(part * 4) + temp - full_grads)
        return RankStates(
            weights=weights, master_weights=master, gradients=full_grads, optimizer_state=state,
            optimizer_temporary=temp, buffers=0, optimizer_extra=step, host=0,
            trace_keeps_grads=True,
        )
    during = buckets + g_part  # IPG buckets and grads_in_partition through backward
    # the step beyond grads_in_partition (held since backward): the flat copy and its fp32
    # cast, or the cast and the optimizer's temporary, whichever is more
    cast = (rounded(part * md), rounded(part * 4))
    update = (rounded(part * 4), temp)
    return RankStates(
        weights=weights, master_weights=master, gradients=g_part, optimizer_state=state,
        optimizer_temporary=temp, buffers=0,
        optimizer_extra=max(g_part + sum(cast), sum(update)), host=0,
        trace_keeps_grads=False, backward_extra=(during,) * num_blocks,
        embed_extra=(0, during), head_extra=(0, during),
        step_blocks=tuple(b for b in max(cast, update, key=sum) if b),
    )


def _zero3_gathered(
    params: Sequence[TensorInfo], num_blocks: int, sharding: Sharding, md: int,
    recompute: bool = False, offloaded: bool = False,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, int], tuple[int, int]]:
    """ZeRO-3's gathered parameters (16-bit, beyond the persisted ones) during each part.

    Inside a block: its largest leaf tensor gathered plus the prefetch bucket, at most the
    whole block and at most ``max_live_parameters``. A parameter is released only when it is
    not used again within ``stage3_max_reuse_distance`` gathered elements
    (``PartitionedParameterCoordinator.__params_to_release``): with gradient checkpointing a
    block's recomputation and its backward use the same parameters, so the whole block stays
    gathered through its backward. Outside: the embedding, then the head. From its forward to
    its next use a block (or the embedding) stays gathered when the elements fetched in between
    (the rest of it, the head in forward and backward, each later block's backward and
    recomputation) stay under the reuse distance: the last blocks of a model whose head is
    small, everything in a small model; those are held through the parts in between.

    With ``offloaded`` parameters (``offload_param``), a gather first copies the rank's
    partition to the GPU and all-gathers from that copy (``all_gather_coalesced``:
    ``param.ds_tensor.to(device)`` into ``_dist_allgather_fn``), so the partition of the
    largest tensor a part gathers is alive next to the gathered buffer.

    On one GPU without ``offload_param`` nothing is gathered: ``all_gather_coalesced``
    returns ``_no_gather_coalesced``, whose ``NoGatherHandle`` sets ``param.data`` to
    ``param.ds_tensor.data.to(device)`` (``partition_parameters.py``, v0.12), the partition
    itself (measured on a CPU engine: ``benchmarks/zero3_cpu_probe.py``). With
    ``offload_param`` that ``.to`` is the tensor's one GPU copy in v0.12; the staged copy is
    still counted there, as the estimate did before the measurement (not measured on CPU,
    and older DeepSpeed releases may gather through the staged copy).
    """
    z = sharding.zero
    n = sharding.shard_size
    if n == 1 and not offloaded:
        return (0,) * num_blocks, (0,) * num_blocks, (0, 0), (0, 0)

    def staged(tensors: Sequence[TensorInfo]) -> int:
        return ceil_div(max(p.numel for p in tensors), n) * md if offloaded and tensors else 0

    big = [p for p in params if p.numel > z.param_persistence_threshold]
    per_block = [[p for p in big if p.block == i] for i in range(num_blocks)]
    root = [p for p in big if p.block is None]
    cap = z.max_live_parameters

    def gathered(tensors: Sequence[TensorInfo]) -> int:
        if not tensors:
            return 0
        total = sum(p.numel for p in tensors)
        live = min(total, max(p.numel for p in tensors) + z.prefetch_bucket_size, cap)
        return live * md

    blocks = [gathered(b) + staged(b) for b in per_block]
    backward = blocks
    if recompute:
        backward = [min(sum(p.numel for p in b) + z.prefetch_bucket_size, cap) * md + staged(b)
                    if b and sum(p.numel for p in b) < ZERO_MAX_REUSE_DISTANCE else g
                    for b, g in zip(per_block, blocks)]
    root_sorted = sorted(root, key=lambda p: p.numel)
    embed = root_sorted[-1].numel * md if root_sorted else 0  # the embedding (or tied head)
    head = embed
    head_n = head // md if md else 0
    # Kept from forward into backward: a tensor is released after its module unless it is used
    # again within ZERO_MAX_REUSE_DISTANCE elements fetched from the next module on
    # (PartitionedParameterCoordinator.__params_to_release walks the trace). Between block i's
    # forward and its next use come the rest of the block, the head in forward and again in
    # backward, and each later block's backward: 3 passes with recomputation, else 2 (and
    # twice the rest of block i).
    passes = 3 if recompute else 2
    sizes = [sum(p.numel for p in b) for b in per_block]
    kept_blocks = [0] * num_blocks
    kept = after = 0
    for i in reversed(range(num_blocks)):
        between = (passes - 1) * sizes[i] + 2 * head_n + passes * after
        if between >= ZERO_MAX_REUSE_DISTANCE or kept + sizes[i] > cap:
            break
        kept_blocks[i] = sizes[i]
        kept += sizes[i]
        after += sizes[i]
    # the embedding (root tensors before the blocks, a tied head aside) is used again by its
    # backward, which a trained embedding runs and which recomputation makes fetch (the
    # trainer makes the embedding's output require grad for reentrant checkpointing): kept
    # when everything between is under the distance. Measured: benchmarks/zero3_cpu_probe.py
    first = next((k for k, p in enumerate(params) if p.block is not None), len(params))
    before = {id(p) for p in params[:first]}
    head_tensor = root_sorted[-1] if root_sorted else None
    pre = sum(p.numel for p in root if id(p) in before and p is not head_tensor)
    reused = recompute or any(p.trainable for p in root if id(p) in before)
    kept_embed = pre if (pre and reused and kept + pre <= cap
                         and passes * sum(sizes) + 2 * head_n < ZERO_MAX_REUSE_DISTANCE) else 0
    held_before = [(sum(kept_blocks[:i]) + kept_embed) * md for i in range(num_blocks)]
    blocks = [g + h for g, h in zip(blocks, held_before)]
    backward = [g + h for g, h in zip(backward, held_before)]
    # max_live_parameters limits what is gathered ahead, never the tensor a module needs
    head_live = max(head_n, min(head_n + kept + kept_embed, cap)) * md if md else 0
    copy = staged(root_sorted[-1:])  # the embedding's (or tied head's) partition, gathered
    return (tuple(blocks), tuple(backward), (embed + copy, embed + copy),
            (head_live + copy, head_live + copy))
