"""Gradient accumulation: what one micro-step leaves alive for the next, and the step it makes.

With ``gradient_accumulation_steps = k`` a training step runs ``k`` forward/backward passes of
``batch_size`` sequences and one ``optimizer.step()``. Between micro-steps the gradients are
kept where the strategy accumulates them, so from the second micro-step on they are alive
during the forward and the backward, on top of the activations (the one-micro-batch step has
them only from its backward to the optimizer step). Where each strategy keeps them, read from
its source (PyTorch 2.13, DeepSpeed 0.16):

- one GPU, DDP without ``gradient_as_bucket_view``, ZeRO-1 (with or without offload):
  autograd's ``.grad`` tensors, whole. ``AccumulateGrad`` adds each new gradient into the
  existing one in place (``variable.grad += new_grad``) and frees the new one, so in backward
  the traced step's own gradients are allocated again only as temporaries: at a backward
  segment the gradients not yet re-made by the trace are the ones held besides it. DDP under
  ``no_sync`` (what the HF Trainer and accelerate do on every micro-step but the last) and
  ZeRO-1 (``reduce_gradients`` at the accumulation boundary only) keep them so.
- DDP with ``gradient_as_bucket_view=True``: the gradients are views of the buckets, which
  are kept for the whole run anyway: nothing more.
- ZeRO-2: each micro-step reduces through the IPG bucket into ``grads_in_partition`` (this
  rank's partition, kept until the step): during the next forward the partition is held
  (backward already holds it, :mod:`layerscope.estimate.states`). With offload the partition
  is accumulated in CPU memory (``async_accumulate_grad_in_cpu_via_gpu``): nothing more.
- ZeRO-3: every micro-step reduce-scatters into ``grad_partitions_flat_buffer``, allocated at
  initialisation and already counted: nothing more.
- FSDP1 under ``no_sync()``: ``_post_backward_hook`` returns before the reduce-scatter, so each
  unit's unsharded flat gradient (``flat_param.grad``, the compute dtype) stays until the
  micro-step that synchronises. FSDP2 under ``set_requires_gradient_sync(False)``
  (accelerate's ``no_sync`` for ``fully_shard``): each parameter's unsharded gradient stays,
  upcast to the ``reduce_dtype`` when one is set (``to_accumulated_grad_if_needed``: fp32
  under a ``*-mixed`` precision). They are held through the next micro-steps' forward and
  backward. With ``CPUOffload`` (``offload="params"``) as well.

FSDP1 ``SHARD_GRAD_OP`` (``fsdp-grad-op``) under ``no_sync`` also keeps every unit's unsharded
flat parameter from one micro-step's backward on (``_should_free_in_backward`` is False when
not syncing a strategy that keeps parameters after forward): the next micro-steps' forward and
backward run with every block gathered (:func:`keeps_gathered`).

Time: every micro-step runs forward and backward; the optimizer runs once per step; the
gradient reduction of DDP, ZeRO-1 and FSDP under ``no_sync`` only on the last micro-step
(ZeRO-2 and ZeRO-3 reduce on every one), while FSDP's and ZeRO-3's all-gathers repeat
(but FSDP1 ``SHARD_GRAD_OP``'s, which run on the first micro-step only);
ZeRO-1/2's all-gather of the updated parameters and, under optimizer offload, their copy to
the GPU run once, after the optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from layerscope.estimate.states import (
    RankStates,
    TensorInfo,
    fsdp1_grad_numel,
    fsdp1_units,
    zero_partition,
)
from layerscope.estimate.trace import rounded

if TYPE_CHECKING:
    from layerscope.estimate.comm import CommTime, Transfer
    from layerscope.estimate.sharding import Sharding
    from layerscope.estimate.time import StepTime
    from layerscope.setup import TrainingSetup

BOUNDARY_ONLY_REDUCTION = ("ddp", "zero1", "fsdp", "fsdp-grad-op", "hsdp")
"""Strategies whose gradient reduction runs only on the last micro-step of an accumulated
step: DDP and FSDP under ``no_sync`` (the HF Trainer and accelerate use it on the other
micro-steps), ZeRO-1 (DeepSpeed reduces at ``is_gradient_accumulation_boundary``)."""

REDUCTIONS = ("reduce-scatter", "all-reduce")
"""The transfer kinds that reduce gradients (:data:`layerscope.estimate.comm.TRANSFER_KINDS`)."""


@dataclass(frozen=True)
class KeptGradients:
    """Gradients a micro-step leaves alive for the next one, in bytes.

    Attributes:
        kept: bytes alive from one micro-step's backward through the next one's forward.
        head, blocks, embed: the part of ``kept`` the traced backward makes again itself in
            the head's, each block's and the embedding's backward segment (autograd's
            ``.grad``: the traced step allocates them as if they were new); all zero when the
            trace makes none of them (a partition, FSDP's unsharded gradients).
        in_backward: whether ``kept`` is held besides the trace in backward as well (False
            where the strategy's own backward figures already hold it: ZeRO-2's partition).
        gathered: each block's unsharded parameters, kept gathered through the next
            micro-steps (:func:`keeps_gathered`; empty otherwise): held besides what the
            strategy's one-micro-step figures hold, which gather them block by block in
            forward (the next one ahead with ``forward_prefetch``) and free them in backward.
        prefetch: whether those figures count the next block's parameters ahead in forward.
    """

    kept: int
    head: int = 0
    blocks: tuple[int, ...] = ()
    embed: int = 0
    in_backward: bool = True
    gathered: tuple[int, ...] = ()
    prefetch: bool = False

    def held(self, part: str, phase: str, index: int | None) -> int:
        """:data:`~layerscope.estimate.trace.Extra`: bytes held besides the traced step.

        Forward: all of ``kept``. Backward: ``kept`` less what the trace has made again by
        then (the head's, then the blocks' from the last, then the embedding's). Inside a
        segment the trace counts its own gradients as they are made, so its high point is
        over by at most that segment's gradients less one tensor's (``AccumulateGrad``'s
        temporary): an upper bound, exact at the segment's ends.
        """
        return self._grads(part, phase, index) + self._gathered(part, phase, index)

    def _gathered(self, part: str, phase: str, index: int | None) -> int:
        """The kept parameters the one-micro-step figures do not hold: in forward and
        backward, the blocks after ``index`` (less the one prefetched in forward); in the
        embedding's segments, all of them (the head's figures hold them all already)."""
        if not self.gathered or phase not in ("fwd", "bwd"):
            return 0
        if part == "embed":
            return sum(self.gathered)
        if part != "block" or index is None:
            return 0
        after = index + 1 + (1 if phase == "fwd" and self.prefetch else 0)
        return sum(self.gathered[after:])

    def _grads(self, part: str, phase: str, index: int | None) -> int:
        if phase in ("fwd", "release"):
            return self.kept
        if phase != "bwd" or not self.in_backward:
            return 0
        if part == "head":
            made = 0
        elif part == "block" and index is not None:
            made = self.head + sum(self.blocks[index + 1:])
        else:
            made = self.head + sum(self.blocks)
        return max(0, self.kept - made)


NONE = KeptGradients(0)


def accumulated_reserved(reserved: int, one: int, accumulated: int) -> int:
    """``torch.cuda.max_memory_reserved()`` with accumulation: the one-micro-batch loop's
    ``reserved``, raised by what the kept gradients add to the step's highest point (``one``
    without them, ``accumulated`` with them, in bytes from the same origin). The kept
    gradients stay allocated through the micro-steps, so the allocator cannot hand their
    blocks to the activations: the segments grow by what they add to the peak (an
    approximation of the allocator's simulation, which replays one micro-step)."""
    return reserved + max(0, accumulated - one)


def traced_grads(params: Sequence[TensorInfo], num_blocks: int, embedding: int) -> KeptGradients:
    """The whole ``.grad`` tensors of ``params``' trainable tensors, kept between micro-steps
    and made again by the traced backward segment that owns each (``embedding``: the bytes of
    the trainable, untied input embedding's gradient, made last; the other tensors outside the
    blocks are made in the head's backward)."""
    blocks = [0] * num_blocks
    outside = 0
    for p in params:
        if not p.trainable:
            continue
        size = rounded(p.numel * p.itemsize)
        if p.block is None or p.block >= num_blocks:
            outside += size
        else:
            blocks[p.block] += size
    embed = min(embedding, outside)
    return KeptGradients(outside + sum(blocks), head=outside - embed, blocks=tuple(blocks),
                         embed=embed)


def _embeddings(model: nn.Module, getter: str) -> Any:
    """``model.<getter>()``, or None where the model has none (transformers raises
    NotImplementedError for speech and vision models without token embeddings: Wav2Vec2)."""
    get = getattr(model, getter, None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None


def embedding_grad_numel(model: nn.Module, trainable: Any) -> int:
    """Elements of the input embedding's gradient when it trains and is not tied to the output
    head (a tied one's gradient is first made in the head's backward); else 0.

    ``trainable(p)``: whether tensor ``p`` trains."""
    emb = _embeddings(model, "get_input_embeddings")
    head = _embeddings(model, "get_output_embeddings")
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, nn.Parameter) or not trainable(weight):
        return 0
    if weight is getattr(head, "weight", None):
        return 0
    return weight.numel()


def sharded_kept(
    sharding: Sharding, states: RankStates, params: Sequence[TensorInfo], num_blocks: int,
    embedding: int, compute_itemsize: int, reduce_itemsize: int,
) -> KeptGradients:
    """What ``sharding`` keeps between micro-steps on the busiest GPU (see the module's notes).

    Args:
        states: the strategy's states (:func:`~layerscope.estimate.states.rank_states`).
        params: the model's tensors as the strategy sees them.
        embedding: bytes of the trainable, untied input embedding's gradient (or 0).
        compute_itemsize: bytes per element of autograd's gradients (FSDP1's flat gradient).
        reduce_itemsize: bytes per element FSDP2 accumulates unsharded gradients in.
    """
    strategy, stage = sharding.distributed, sharding.stage
    if sharding.is_fsdp and sharding.fsdp.version == 2:
        # each parameter's unsharded gradient, in the reduce dtype: not autograd's .grad
        # (the trace keeps those, but in the parameter's dtype and made again in backward)
        return KeptGradients(sum(rounded(p.numel * reduce_itemsize)
                                 for p in params if p.trainable))
    if strategy is None or states.trace_keeps_grads:  # one GPU, DDP (no bucket views), ZeRO-1
        return traced_grads(params, num_blocks, embedding)
    if strategy == "ddp" or stage == 3:
        return NONE
    if stage == 2:
        if sharding.offload is not None:
            return NONE
        part = sum(p.numel for p in params if p.trainable)
        itemsize = max((p.itemsize for p in params), default=2)  # the module's dtype
        # grads_in_partition: the (aligned) partition the states hold in backward
        return KeptGradients(rounded(zero_partition(part, sharding.shard_size) * itemsize),
                             in_backward=False)
    grads = sum(rounded(n * compute_itemsize)
                for n in fsdp1_grad_numel(params, num_blocks, sharding.fsdp.use_orig_params))
    if not keeps_gathered(sharding):
        return KeptGradients(grads)
    units = fsdp1_units(params, num_blocks)[:num_blocks]
    return KeptGradients(grads, gathered=tuple(rounded(sum(p.numel for p in u) * compute_itemsize)
                                               for u in units),
                         prefetch=sharding.fsdp.forward_prefetch)


def once_per_step(transfer: Transfer, sharding: Sharding | None) -> bool:
    """Whether ``transfer`` runs once per optimizer step rather than on every micro-step: any
    transfer of the optimizer step's phase (ZeRO-1/2's all-gather of the updated parameters,
    the host-to-device copy of them under optimizer offload); for a
    :data:`BOUNDARY_ONLY_REDUCTION` strategy, the gradient reductions and the device-to-host
    copies of the reduced gradients that follow them; under :func:`keeps_gathered` the
    all-gathers (and the host-to-device copies before them), on the first micro-step only."""
    if transfer.phase == "step":
        return True
    strategy = sharding.distributed if sharding is not None else None
    if strategy in BOUNDARY_ONLY_REDUCTION and transfer.op in (*REDUCTIONS, "device-to-host"):
        return True
    return (sharding is not None and keeps_gathered(sharding)
            and transfer.op in ("all-gather", "host-to-device"))


def keeps_gathered(sharding: Sharding) -> bool:
    """Whether ``sharding`` keeps every unit's unsharded parameters between micro-steps: FSDP1
    ``SHARD_GRAD_OP`` under ``no_sync``. Its post-backward frees the unsharded flat parameter
    only when ``_should_free_in_backward`` (PyTorch ``fsdp/_runtime_utils.py``:
    ``state._sync_gradients or`` a strategy that reshards after forward), so after a no-sync
    backward they stay, and the next forward's ``_unshard`` finds nothing to gather: the
    all-gathers run on the first micro-step only. FSDP2 reshards after backward
    (``reshard_after_backward``) whether it syncs or not."""
    return (sharding.distributed == "fsdp-grad-op" and sharding.is_fsdp
            and sharding.fsdp.version == 1)


def accumulated_step(step: StepTime, steps: int, sharding: Sharding | None) -> StepTime:
    """``step`` (one micro-batch and the optimizer) as an optimizer step of ``steps``
    micro-batches: ``steps`` forwards and backwards, one optimizer step, the transfers of
    :func:`once_per_step` once; tokens ``steps`` times one's."""
    if steps == 1:
        return step
    optimizer = step.optimizer.seconds
    comm = step.communication
    boundary = 0.0
    if comm is not None and sharding is not None:
        boundary = sum(t.exposed for t in comm.transfers if once_per_step(t, sharding))
    micro = step.seconds - optimizer - boundary  # a micro-step that neither reduces nor steps
    seconds = (steps - 1) * micro + step.seconds
    scale = seconds / step.seconds if step.seconds else 1.0
    changes: dict[str, Any] = dict(
        seconds=seconds, tokens=step.tokens * steps,
        forward=_times(step.forward, steps), backward=_times(step.backward, steps),
        recompute=_times(step.recompute, steps),
        low_seconds=step.low_seconds * scale, high_seconds=step.high_seconds * scale,
    )
    if comm is not None:
        changes["communication"] = _accumulated_comm(comm, steps, seconds, sharding)
    return dataclasses.replace(step, **changes)


def micro_batch_seconds(step: StepTime, setup: TrainingSetup) -> tuple[float, float, float]:
    """(seconds, low, high) per micro-batch of ``step`` (one micro-batch and the optimizer)
    in a run of ``setup.gradient_accumulation_steps`` micro-batches per optimizer step: the
    accumulated step's share, the optimizer and boundary reductions spread over its
    micro-batches (what a run timed batch by batch adds up)."""
    steps = setup.gradient_accumulation_steps
    t = accumulated_step(step, steps, setup.sharding)
    return t.seconds / steps, t.low_seconds / steps, t.high_seconds / steps


def _times(phase: Any, steps: int) -> Any:
    """A phase repeated on each of ``steps`` micro-steps (seconds and FLOPs ``steps`` times)."""
    scaled = {f.name: getattr(phase, f.name) * steps for f in dataclasses.fields(phase)
              if isinstance(getattr(phase, f.name), (int, float))
              and not isinstance(getattr(phase, f.name), bool)}
    return dataclasses.replace(phase, **scaled)


def _accumulated_comm(comm: CommTime, steps: int, seconds: float,
                      sharding: Sharding | None) -> CommTime:
    """``comm`` (one micro-step and the optimizer step) as ``steps`` micro-steps: the first
    ``steps - 1`` run the transfers that repeat (not :func:`once_per_step`), each micro-step
    after the last one's end less its optimizer and once-per-step waits; the last runs all of
    ``comm``'s. So the transfers' bytes, counts and exposed seconds add up to the totals."""
    repeated = [t for t in comm.transfers if not once_per_step(t, sharding)]
    boundary = sum(t.exposed for t in comm.transfers if once_per_step(t, sharding))
    micro = comm.seconds - comm.optimizer_seconds - boundary
    transfers = [dataclasses.replace(t, start=t.start + j * micro, end=t.end + j * micro)
                 for j in range(steps - 1) for t in repeated]
    last = (steps - 1) * micro
    transfers += [dataclasses.replace(t, start=t.start + last, end=t.end + last)
                  for t in comm.transfers]
    exposed = comm.exposed_seconds - boundary
    return dataclasses.replace(
        comm, seconds=seconds, compute_seconds=comm.compute_seconds * steps,
        exposed_seconds=exposed * steps + boundary, transfers=tuple(transfers),
    )
