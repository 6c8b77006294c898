"""Step time of one training (or inference) step, from the model's structure and a GPU.

The model is never run. From the scan (and the model's config, when it has one) each block is
described as kernels: GEMMs (every Linear / Conv1D / expert weight), attention as its
implementation runs it (:mod:`layerscope.estimate.attention`), the routed experts as their
implementation runs them (:mod:`layerscope.estimate.experts`), memory-bound elementwise work
(norms, activations, residual adds, rotary, dropout, autocast casts, the loss on the full
vocabulary) and the optimizer's passes over its tensors. Then:

* :mod:`layerscope.estimate.walk` lists the kernels of forward, recomputation and backward in
  the order the host issues them (with a quantized base, each quantized weight dequantised
  before its matmuls: :class:`~layerscope.estimate.quant.WeightTraffic`), and
  :func:`layerscope.estimate.roofline.run` plays the host (Python, autograd, launches, syncs)
  against the GPU (each kernel compute- or bandwidth-bound, plus its latency): a phase is
  host-bound where its kernels are shorter than issuing them;
* the optimizer is timed on its own (``opt.step()`` follows a sync): Python per trainable
  tensor, then memory-bound multi-tensor kernels;
* :mod:`layerscope.estimate.band` names what bounds the step and the range the estimate has
  erred in for steps of that regime.

Backward reaches the earliest block a gradient must flow through (see
:mod:`layerscope.estimate.walk`): input gradients there and above, weight gradients only for
trainable weights.

A data-parallel setup (``distributed``: DDP, FSDP, HSDP, ZeRO) is timed per GPU: this GPU's
batch (``batch_size`` is per GPU) computed as above, in the dtype the strategy hands the
matmuls (FSDP's mixed-precision policy and DeepSpeed's 16-bit module gather weights already in
the autocast dtype: no autocast casts), the optimizer on this GPU's shard, and the strategy's
collectives and copies scheduled against that compute by :mod:`layerscope.estimate.comm` over
the GPU's links (NVLink or PCIe within a node, the GPU's fabric between nodes). What compute
waits for is the step's exposed communication; with offload, the PCIe copies and the CPU
optimizer step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from typing_extensions import Unpack

from layerscope.errors import EstimateError, StructureError
from layerscope.estimate import attention as attn
from layerscope.estimate import experts
from layerscope.estimate.band import Regime, band, regime_of
from layerscope.estimate.cache import model_cache
from layerscope.estimate.comm import (
    CommTime,
    Topology,
    Wire,
    communication_time,
    cpu_optimizer_of,
    rank_work,
    topology,
)
from layerscope.estimate.hardware import GPU, get_gpu
from layerscope.estimate.quant import WeightTraffic
from layerscope.estimate.roofline import (
    ATTENTION_EFFICIENCY,
    BANDWIDTH_EFFICIENCY,
    FOREACH_BANDWIDTH_EFFICIENCY,
    GEMM_EFFICIENCY,
    HOST_ATEN_S_PER_KERNEL,
    HOST_BACKWARD_S_PER_KERNEL,
    HOST_FORWARD_S_PER_KERNEL,
    HOST_OPTIMIZER_S_PER_TENSOR,
    KERNEL_LATENCY_S,
    OPTIMIZER_PASSES,
    PER_TENSOR_OPTIMIZERS,
    Phase,
    Work,
    foreach_launches,
    run,
    spans,
)
from layerscope.estimate.sharding import Sharding
from layerscope.estimate.states import TensorInfo, fsdp1_grad_numel, scan_tensors
from layerscope.estimate.structure import ModelShape, analyse
from layerscope.estimate.walk import Walk
from layerscope.plan import FreezePlan
from layerscope.scan import ModelScan
from layerscope.setup import PRECISIONS, Lora, Precision, Settings, TrainingSetup, make_setup


# -- results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimeAssumptions:
    """Every number the estimate used besides the model's shape."""

    gpu: str
    precision: str
    matmul_dtype: str
    peak_flops: float
    achievable_gemm_flops: float
    achievable_attention_flops: float
    peak_bandwidth: float
    achievable_bandwidth: float
    kernel_latency_s: float
    host_forward_s_per_kernel: float
    host_backward_s_per_kernel: float
    host_optimizer_s_per_tensor: float
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepTime:
    """One optimizer step: forward + backward (+ recomputation) + optimizer.

    ``seconds`` is their sum. For ``inference=True`` only ``forward`` is non-zero.

    Attributes:
        regime: what bounds the step's compute: ``"compute-bound"``, ``"memory-bound"`` or
            ``"host-bound"`` (see :mod:`layerscope.estimate.band`).
        low_seconds, high_seconds: the range the measured step time fell in for 80% of the
            calibration steps of the same regime, scaled to this estimate.
        parts: forward and backward (with recomputation) seconds per block and outside them.
        communication: under a data-parallel strategy, every collective and copy of the step
            and what compute waited for (``seconds`` then includes the exposed transfers, and
            ``optimizer`` is this GPU's shard, or the CPU step under offload); None on one GPU.
    """

    seconds: float
    forward: Phase
    backward: Phase
    recompute: Phase
    optimizer: Phase
    tokens: int
    trainable_params: int
    earliest_trainable_block: int | None
    assumptions: TimeAssumptions
    regime: Regime
    low_seconds: float
    high_seconds: float
    parts: PartTimes | None = None
    communication: CommTime | None = None

    @property
    def exposed_communication_seconds(self) -> float:
        """Seconds compute waited for transfers (0 on one GPU)."""
        return 0.0 if self.communication is None else self.communication.exposed_seconds

    @property
    def flops(self) -> float:
        return self.forward.flops + self.backward.flops + self.recompute.flops

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else math.inf

    @property
    def fwd_bwd_seconds(self) -> float:
        return self.forward.seconds + self.backward.seconds + self.recompute.seconds


@dataclass(frozen=True)
class PartTimes:
    """Wall seconds of a step's parts, as the step plays them.

    Attributes:
        forward: each block's forward, in order.
        backward: each block's backward, its recomputation included (0 for a block backward
            does not reach).
        outside_forward: embeddings, final norm, head and loss in forward.
        outside_backward: loss, head and embeddings in backward.
    """

    forward: tuple[float, ...]
    backward: tuple[float, ...]
    outside_forward: float
    outside_backward: float

    @classmethod
    def of(cls, seconds: dict[tuple[str, int | None], float], blocks: int) -> PartTimes:
        return cls(tuple(seconds.get(("forward", b), 0.0) for b in range(blocks)),
                   tuple(seconds.get(("backward", b), 0.0) for b in range(blocks)),
                   seconds.get(("forward", None), 0.0), seconds.get(("backward", None), 0.0))


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EstimateError(f"{name} must be an int >= 1, got {value!r}")
    return value


def estimate_step_time(
    model: Any,
    plan: FreezePlan | None = None,
    *,
    gpu: str | GPU = "h100-sxm",
    **settings: Unpack[Settings],
) -> StepTime:
    """Time of one optimizer step: forward, backward and recomputation of each of the
    ``gradient_accumulation_steps`` micro-batches, then the optimizer; under a data-parallel
    strategy, on one GPU of the run with the communication its compute waits for.

    Args:
        model: an ``nn.Module`` (a meta skeleton is enough; never modified), a model source
            (a preset name, config path, dict or config) or a
            :class:`~layerscope.setup.TrainingSetup`.
        plan, **settings: the step, as for :func:`~layerscope.estimate.memory.estimate_memory`
            (the keyword arguments of :class:`~layerscope.setup.TrainingSetup`). fp32 matmuls
            run on CUDA cores (PyTorch's default leaves TF32 off); LoRA adapters are timed on
            the modules they target; attention and MoE experts as their implementation runs.
        gpu: a catalogue name (see :func:`layerscope.estimate.hardware.gpus`) or a ``GPU``.

    Raises:
        EstimateError: invalid settings, or nothing to train (all frozen, no LoRA) outside
            inference.
    """
    setup = make_setup(model, plan, **settings)
    return step_time_of(setup, get_gpu(gpu))


def step_time_of(setup: TrainingSetup, gpu: GPU) -> StepTime:
    """The :class:`StepTime` of ``setup`` on ``gpu`` (cached per model, setup and GPU): one
    optimizer step, of ``gradient_accumulation_steps`` micro-batches
    (:func:`~layerscope.estimate.accumulation.accumulated_step`)."""
    from layerscope.estimate.accumulation import accumulated_step

    cache = model_cache(setup.model, "time")
    key = (setup, gpu)
    if key not in cache:
        timer = step_timer(setup, gpu)
        one = timer.at(setup.batch_size, setup.seq_len)
        step = accumulated_step(one, setup.gradient_accumulation_steps, setup.sharding)
        run = timer.sharded
        if run is not None and step is not one and one.communication is not None \
                and step.communication is not None:  # the strategy's note: the whole step's
            micro, whole = run.note(one.communication), run.note(step.communication)
            notes = tuple(whole if n == micro else n for n in step.assumptions.notes)
            step = dataclasses.replace(step, assumptions=dataclasses.replace(
                step.assumptions, notes=notes))
        cache[key] = step
    return cache[key]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class StepTimer:
    """Everything a step's time depends on except its shape: time many shapes of one run
    (real data lengths, batch searches) from one analysis of the model.

    Build it with :func:`step_timer`; :meth:`at` gives the :class:`StepTime` of a shape.
    """

    shape: ModelShape
    trainable: frozenset[str]
    gpu: GPU
    precision: Precision
    optimizer: str
    gradient_checkpointing: bool
    adapters: Lora | None
    inference: bool
    weights: WeightTraffic | None = None
    lora_bytes: int = 4
    input_grads: bool = False
    sharded: ShardedRun | None = None

    def at(self, batch_size: int, seq_len: int, padded: bool = False) -> StepTime:
        """The step of ``batch_size`` sequences of ``seq_len`` tokens.

        Args:
            batch_size: sequences per step on this GPU.
            seq_len: tokens per sequence (a padded batch: the longest one's).
            padded: the batch carries padding, so transformers passes an attention mask
                (SDPA then runs its memory-efficient kernel over every score).

        Raises:
            EstimateError: a size that is not an int >= 1.
        """
        batch_size = _check_positive_int(batch_size, "batch_size")
        seq_len = _check_positive_int(seq_len, "seq_len")
        prec = self.precision if self.sharded is None else self.sharded.compute
        lora_bytes = self.lora_bytes if self.sharded is None else self.sharded.lora_bytes
        step = _estimate(self.shape, set(self.trainable), self.gpu, prec,
                         self.optimizer, batch_size, seq_len, self.gradient_checkpointing,
                         self.adapters, self.inference, padded, self.weights, lora_bytes,
                         self.input_grads)
        return step if self.sharded is None else self.sharded.step(step, self.gpu,
                                                                     self.optimizer)


@dataclass(frozen=True)
class ShardedRun:
    """What a data-parallel step adds to one GPU's compute (see the module's docstring).

    Attributes:
        sharding: the strategy and its knobs.
        topology: the links between the run's GPUs.
        wire: bytes per element gathered, reduced and copied.
        params: the model's tensors, adapters included, with their blocks.
        num_blocks: blocks in the stack (FSDP units besides the root).
        precision: the setup's precision (the optimizer's states).
        compute: the precision forward and backward compute in.
        inference: a forward only.
        lora_bytes: bytes per adapter element in the compute (a strategy that casts the
            parameters casts the adapters with them).
        reduced: FSDP1's gradient elements per unit, the blocks then the root
            (:func:`~layerscope.estimate.states.fsdp1_grad_numel`); empty: each unit's
            trainable elements.
    """

    sharding: Sharding
    topology: Topology
    wire: Wire
    params: tuple[TensorInfo, ...] = dataclasses.field(repr=False)
    num_blocks: int
    precision: Precision
    compute: Precision
    inference: bool
    lora_bytes: int = 4
    reduced: tuple[int, ...] = ()

    def step(self, one: StepTime, gpu: GPU, optimizer: str) -> StepTime:
        """``one`` (this GPU's compute, timed in :attr:`compute`) with the strategy's
        transfers, and the optimizer on this GPU's shard (or the CPU)."""
        parts = one.parts
        blocks = self.num_blocks
        if parts is None or len(parts.forward) != blocks:  # blocks the time model sees apart
            fwd = one.forward.seconds
            bwd = one.backward.seconds + one.recompute.seconds
            parts = PartTimes((fwd / blocks,) * blocks, (bwd / blocks,) * blocks, 0.0, 0.0) \
                if blocks else PartTimes((), (), fwd, bwd)
        opt_s, optim = (0.0, Phase()) if self.inference else self.shard_optimizer(gpu, optimizer)
        work = rank_work(self.params, blocks, forward=parts.forward, backward=parts.backward,
                         root_forward=parts.outside_forward,
                         root_backward=parts.outside_backward, optimizer_seconds=opt_s,
                         reduced=self.reduced or None)
        comm = communication_time(work, self.sharding, self.topology, self.wire,
                                  cpu_optimizer=cpu_optimizer_of(self.sharding, optimizer),
                                  inference=self.inference)
        if comm.cpu_optimizer is not None:  # the step runs on the host
            optim = Phase(seconds=comm.optimizer_seconds, host_seconds=comm.optimizer_seconds)
        phases = (one.forward, one.backward, one.recompute, optim)
        regime = regime_of(comm.seconds - comm.exposed_seconds,
                           sum(p.compute_seconds for p in phases),
                           sum(p.memory_seconds for p in phases))
        low, high = band(comm.seconds, regime)
        notes = (*one.assumptions.notes, self.note(comm))
        return dataclasses.replace(
            one, seconds=comm.seconds, optimizer=optim, regime=regime, low_seconds=low,
            high_seconds=high, communication=comm,
            assumptions=dataclasses.replace(one.assumptions, precision=self.precision.name,
                                            notes=notes))

    def shard_optimizer(self, gpu: GPU, optimizer: str) -> tuple[float, Phase]:
        """``optimizer.step()`` on this GPU's share of the trainable parameters: ZeRO's flat
        fp32 master partition (stage 3: one tensor per ``sub_group_size`` elements), FSDP's
        per-parameter shards, DDP's whole replica."""
        s, n = self.sharding, self.sharding.shard_size
        trainable = [p for p in self.params if p.trainable]
        if s.stage:
            part = -(-sum(p.numel for p in trainable) // n)
            groups = -(-part // s.zero.sub_group_size) if s.stage == 3 and s.zero.sub_group_size \
                else 1
            return _optimizer(gpu, PRECISIONS["32-true"], optimizer, part, min(groups, part))
        numel = sum(-(-p.numel // n) for p in trainable)
        return _optimizer(gpu, self.precision, optimizer, numel, len(trainable))

    def note(self, comm: CommTime) -> str:
        """One line for the assumptions: the strategy, its links, what it moved."""
        s = self.sharding
        links = f"{comm.intra_node} within a node"
        if comm.nodes > 1:
            links += f", {comm.fabric} between {comm.nodes} nodes"
        moved = ", ".join(f"{kind} {comm.bytes_of(kind) / 2**30:.2f} GiB"
                          for kind in comm.kinds)
        return (f"{s.describe()}: per GPU, its batch computed in {self.compute.name}; "
                f"{moved or 'nothing'} per step over {links}; "
                f"{comm.exposed_seconds * 1000:.1f} ms of it exposed (NCCL's ring/tree cost "
                "model, overlapped as the strategy schedules it)")


def compute_precision(prec: Precision, sharding: Sharding | None) -> Precision:
    """The precision a rank's forward and backward run in: FSDP's mixed-precision policy and
    DeepSpeed's 16-bit module hand the matmuls weights already in the autocast dtype, and the
    residual stream follows them (``bf16-true``'s step, without autocast's casts); one GPU and
    DDP run the precision as set."""
    if sharding is None or sharding.distributed in (None, "ddp") or prec.autocast_dtype is None:
        return prec
    return PRECISIONS["bf16-true" if prec.autocast_dtype == PRECISIONS["bf16-true"].param_dtype
                      else "16-true"]


def sharded_run(setup: TrainingSetup, gpu: GPU) -> ShardedRun | None:
    """The :class:`ShardedRun` of ``setup`` on ``gpu`` (None on one GPU).

    Raises:
        EstimateError: a GPU without interconnect figures, or an unknown fabric.
    """
    sharding = setup.sharding
    if sharding is None or sharding.distributed is None:
        return None
    s = setup.scan
    try:
        blocks = s.num_layers
    except StructureError:
        blocks = 0
    prec = setup.precision_info
    from layerscope.estimate.distributed import (
        packed_weights,
        stored_sizes,
        trace_dtypes,
        wrapped_sharding,
    )

    # a quantized weight is gathered as its packed storage: elements of the wire's dtype
    wire = Wire.of(sharding, prec)
    packed = {name: (-(-elements * item // wire.param_bytes), wire.param_bytes)
              for name, (elements, item) in packed_weights(setup).items()}
    # the tensors as stored (persistent_bytes' sizes): a frozen base and adapters in theirs
    sizes = stored_sizes(setup, sharding.stage > 0, trace_dtypes(prec, sharding)[0])
    params = scan_tensors(s, setup.trainable, setup.lora, itemsize=sizes.trainable,
                          adapter_itemsize=sizes.adapter, packed=packed,
                          frozen_itemsize=sizes.frozen)
    if blocks == 0:  # no stack: the whole model is the root unit
        params = [dataclasses.replace(p, block=None) for p in params]
    compute = compute_precision(prec, sharding)
    wrapped = wrapped_sharding(setup)
    reduced = (tuple(fsdp1_grad_numel(params, blocks, wrapped.fsdp.use_orig_params))
               if wrapped.is_fsdp and wrapped.fsdp.version == 1 else ())
    return ShardedRun(sharding, topology(gpu, sharding.num_gpus, sharding.gpus_per_node),
                      wire, tuple(params), blocks, prec, compute,
                      setup.inference,
                      compute.weight_bytes if compute != prec else setup.adapter_dtype.itemsize,
                      reduced)


def step_timer(setup: TrainingSetup, gpu: GPU) -> StepTimer:
    """The :class:`StepTimer` of ``setup``'s run on ``gpu`` (its batch size and sequence length
    are :meth:`StepTimer.at`'s arguments; the model's analysis is cached per model).

    Raises:
        EstimateError: a precision the GPU has no rate for, or an implementation (attention,
            experts) this estimate does not know.
    """
    prec = setup.precision_info
    try:
        gpu.peak(prec.matmul)
    except EstimateError as exc:
        raise EstimateError(f"precision {prec.name!r} on {gpu.name}: {exc}") from None
    shape = _shape(setup)
    _check_implementations(shape, prec)
    return StepTimer(shape, setup.trainable, gpu, prec, setup.optimizer,
                     setup.gradient_checkpointing, setup.lora, setup.inference,
                     WeightTraffic.of(setup), setup.adapter_dtype.itemsize,
                     setup.kbit_prepared and setup.gradient_checkpointing, sharded_run(setup, gpu))


def _shape(setup: TrainingSetup) -> ModelShape:
    """The model's analysis for the setup's attention and experts (cached per model)."""
    cache = model_cache(setup.model, "time-shape")
    key = (not setup.inference, setup.attention, setup.experts)
    if key not in cache:
        cache[key] = analyse(setup.model, training=not setup.inference,
                             attn_implementation=setup.attention,
                             experts_implementation=setup.experts)
    return cache[key]  # type: ignore[no-any-return]


def _check_implementations(m: ModelShape, prec: Precision) -> None:
    """The attention and experts implementations the model runs are ones this estimate knows."""
    if m.heads:
        attn.check_implementation(m.attn_implementation, prec)
    if m.experts_implementation is not None:
        experts.check_implementation(m.experts_implementation)


def _estimate(m: ModelShape, trainable: set[str], gpu: GPU, prec: Precision, opt: str, batch: int,
              seq: int, ckpt: bool, adapters: Lora | None, inference: bool,
              padded: bool = False, weights: WeightTraffic | None = None, lora_bytes: int = 4,
              input_grads: bool = False) -> StepTime:
    """The step on ``gpu``: forward (+ loss), backward and recomputation played as one stream
    of kernels, then the optimizer (its own, as ``opt.step()`` is timed after a sync)."""
    s = m.scan
    w = Work(gpu, prec, HOST_FORWARD_S_PER_KERNEL)
    walk = Walk(w, m, prec, batch, seq, trainable, adapters, ckpt and not inference,
                training=not inference, padded=padded, weights=weights, lora_bytes=lora_bytes,
                input_grads=input_grads)
    walk.forward()
    notes = _notes(prec, opt, m, walk)
    assumptions = _assumptions(gpu, prec, notes)
    tokens = batch * seq
    if inference:
        seconds, phases = run(w.items)
        zero = Phase()
        parts = PartTimes.of(spans(w.items, walk.marks), len(m.prefixes))
        return dataclasses.replace(_step(seconds, phases["forward"], zero, zero, zero, tokens, 0,
                                         None, assumptions), parts=parts)
    earliest = walk.backward()
    fwd_bwd, phases = run(w.items)
    forward, backward = phases["forward"], phases.get("backward", Phase())
    recompute = phases.get("recompute", Phase())
    parts = PartTimes.of(spans(w.items, walk.marks), len(m.prefixes))

    # -- optimizer: memory-bound passes over the trainable tensors ---------------------------
    numel, tensors = _trainable_tensors(s, trainable, walk)
    opt_s, optim = _optimizer(gpu, prec, opt, numel, tensors)
    trainable_params = numel
    return dataclasses.replace(
        _step(fwd_bwd + opt_s, forward, backward, recompute, optim, tokens, trainable_params,
              earliest, assumptions), parts=parts)


def _optimizer(gpu: GPU, prec: Precision, opt: str, numel: int,
               tensors: int) -> tuple[float, Phase]:
    """``opt.step()`` + ``zero_grad()``: Python per tensor (grouping, state lookups, step
    counters), then memory-bound multi-tensor kernels over the states."""
    passes, ops = OPTIMIZER_PASSES[opt]
    wb = prec.weight_bytes
    w = Work(gpu, prec, HOST_ATEN_S_PER_KERNEL, label="optimizer")
    w.host(tensors * HOST_OPTIMIZER_S_PER_TENSOR)
    launches = tensors if opt in PER_TENSOR_OPTIMIZERS else foreach_launches(numel, tensors)
    w.stream(passes * numel * wb, ops * launches,
             efficiency=FOREACH_BANDWIDTH_EFFICIENCY.get(wb, BANDWIDTH_EFFICIENCY))
    seconds, phases = run(w.items)
    return seconds, phases["optimizer"]


def _step(seconds: float, forward: Phase, backward: Phase, recompute: Phase, optim: Phase,
          tokens: int, trainable: int, earliest: int | None,
          assumptions: TimeAssumptions) -> StepTime:
    """The step with its regime and band."""
    phases = (forward, backward, recompute, optim)
    regime = regime_of(seconds, sum(p.compute_seconds for p in phases),
                       sum(p.memory_seconds for p in phases))
    low, high = band(seconds, regime)
    return StepTime(seconds, forward, backward, recompute, optim, tokens, trainable, earliest,
                    assumptions, regime, low, high)


def _trainable_tensors(s: ModelScan, trainable: set[str], walk: Walk) -> tuple[int, int]:
    """Elements and tensors the optimizer updates (a shared tensor once; LoRA: A and B of every
    adapted weight of the blocks)."""
    seen = {s.by_name[n].tensor: s.by_name[n].numel for n in trainable}
    numel, tensors = sum(seen.values()), len(seen)
    for b, part in enumerate(walk.m.blocks):
        for g in part.gemms:
            if walk.adapted(b, g):
                numel += walk.rank * (g.n_in + g.n_out)
                tensors += 2
    return numel, tensors


def _notes(prec: Precision, opt: str, m: ModelShape, walk: Walk) -> tuple[str, ...]:
    notes = []
    if prec.name == "32-true":
        notes.append("fp32 matmuls on CUDA cores (torch.backends.cuda.matmul.allow_tf32 off, "
                     "PyTorch's default)")
    if prec.autocast:
        notes.append("bf16 autocast: every weight cast to bf16 each forward, weight gradients "
                     "cast back to fp32; residual stream and norms in fp32")
    if m.heads:
        kernels = sorted({attn.kernel_name(m.attn_implementation, prec, walk.heads, walk.seq,
                                           window, walk.padded) for window in set(m.sliding) or {None}})
        notes.append(f"attention {m.attn_implementation}: " + ", ".join(
            _ATTENTION_NOTES[k] for k in kernels))
    if m.experts_implementation:
        notes.append(f"MoE experts {m.experts_implementation}: each token runs its top-k "
                     "experts, spread over them as unevenly as random routing spreads them "
                     "(each expert's GEMM tiled on its own rows); "
                     + _EXPERTS_NOTES[m.experts_implementation])
    q = walk.traffic.quantization
    if q is not None:
        into = str(walk.traffic.compute).removeprefix("torch.")
        notes.append(f"{q.describe()} base: " + (
            f"each quantized weight dequantised to {into} (packed weight and absmax read, full "
            "weight written) before its forward, recomputed and input-gradient matmuls"
            if q.four_bit else "int8 matmuls, each input quantised by rows and each output "
            "dequantised; the weight dequantised for the input gradient"))
    notes.append(f"optimizer {opt}: {OPTIMIZER_PASSES[opt][0]} element passes per trainable "
                 "element per step")
    return tuple(notes)


_ATTENTION_NOTES = {
    "flash": "flash kernel, causal blocks skipped",
    "efficient": "memory-efficient kernel" ,
    "math": "math fallback, S x S scores materialised",
    "eager": "S x S scores materialised, no causal skipping",
    "flash_attention_2": "FlashAttention-2, causal and window blocks skipped",
    "flex_attention": "FlexAttention, causal and window blocks skipped",
}
_EXPERTS_NOTES = {
    "grouped_mm": "tokens sorted by expert, one grouped GEMM per projection (a per-expert "
                  "loop with a sync where no CUTLASS kernel applies: not bf16, or not sm90/100)",
    "batched_mm": "every (token, expert) pair gathers its expert's weights: memory-bound",
    "eager": "a Python loop over experts with two syncs each; each expert's weight gradient "
             "is a zero-filled full-size tensor",
}


def _assumptions(gpu: GPU, prec: Precision, notes: tuple[str, ...]) -> TimeAssumptions:
    peak = gpu.peak(prec.matmul)
    return TimeAssumptions(
        gpu=gpu.name, precision=prec.name, matmul_dtype=prec.matmul, peak_flops=peak,
        achievable_gemm_flops=peak * GEMM_EFFICIENCY[prec.matmul],
        achievable_attention_flops=peak * ATTENTION_EFFICIENCY,
        peak_bandwidth=gpu.memory_bandwidth,
        achievable_bandwidth=gpu.memory_bandwidth * BANDWIDTH_EFFICIENCY,
        kernel_latency_s=KERNEL_LATENCY_S,
        host_forward_s_per_kernel=HOST_FORWARD_S_PER_KERNEL,
        host_backward_s_per_kernel=HOST_BACKWARD_S_PER_KERNEL,
        host_optimizer_s_per_tensor=HOST_OPTIMIZER_S_PER_TENSOR,
        notes=notes,
    )


# -- gradual unfreezing ------------------------------------------------------------------------


