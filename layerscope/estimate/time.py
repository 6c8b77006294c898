"""Step time of one training (or inference) step, from the model's structure and a GPU.

The model is never run. From the scan (and the model's config, when it has one) each block
type is described once as kernels: GEMMs (every Linear / Conv1D / expert weight), attention,
memory-bound elementwise work (norms, activations, residual adds, rotary, dropout, the loss on
the full vocabulary, autocast weight casts) and the optimizer's passes over its tensors. Then:

* each kernel is timed by :mod:`layerscope.estimate.roofline` (compute or bandwidth bound,
  plus launch and host costs);
* the optimizer is memory-bound: its passes over weights, grads and states, plus
  :data:`HOST_OPTIMIZER_S_PER_TENSOR` of Python per trainable tensor.

Backward runs only as deep as the earliest trainable parameter: blocks from there up compute
input gradients, and weight gradients only for their trainable weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from typing_extensions import Unpack

from layerscope.errors import EstimateError
from layerscope.estimate.cache import model_cache
from layerscope.estimate.hardware import GPU, get_gpu
from layerscope.estimate.roofline import (
    ATTENTION_BACKWARD_RATIO,
    ATTENTION_EFFICIENCY,
    BACKWARD_ELEMENTWISE_RATIO,
    BANDWIDTH_EFFICIENCY,
    EXPERT_LOOP_KERNELS,
    FOREACH_ELEMENTS_PER_LAUNCH,
    GEMM_EFFICIENCY,
    HOST_BACKWARD_S_PER_KERNEL,
    HOST_FORWARD_S_PER_KERNEL,
    HOST_LOOP_S_PER_KERNEL,
    HOST_OPTIMIZER_S_PER_TENSOR,
    KERNEL_LATENCY_S,
    LOSS_BACKWARD_KERNELS,
    LOSS_FORWARD_KERNELS,
    OPTIMIZER_PASSES,
    RMSNORM_KERNELS,
    ROTARY_KERNELS,
    ROTARY_PASSES,
    Phase,
    Work,
)
from layerscope.estimate.structure import Gemm, ModelShape, Part, analyse
from layerscope.plan import FreezePlan
from layerscope.scan import ModelScan
from layerscope.setup import Lora, Precision, Settings, TrainingSetup, make_setup


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

    @property
    def flops(self) -> float:
        return self.forward.flops + self.backward.flops + self.recompute.flops

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else math.inf

    @property
    def fwd_bwd_seconds(self) -> float:
        return self.forward.seconds + self.backward.seconds + self.recompute.seconds


def estimate_step_time(
    model: Any,
    plan: FreezePlan | None = None,
    *,
    gpu: str | GPU = "h100-sxm",
    **settings: Unpack[Settings],
) -> StepTime:
    """Time of one step on one GPU: forward, backward, recomputation and optimizer.

    Args:
        model: an ``nn.Module`` (a meta skeleton is enough; never modified), a model source
            (a preset name, config path, dict or config) or a
            :class:`~layerscope.setup.TrainingSetup`.
        plan, **settings: the step, as for :func:`~layerscope.estimate.memory.estimate_memory`
            (the keyword arguments of :class:`~layerscope.setup.TrainingSetup`). fp32 matmuls
            run on CUDA cores (PyTorch's default leaves TF32 off); LoRA adapters are timed on
            the modules they target.
        gpu: a catalogue name (see :func:`layerscope.estimate.hardware.gpus`) or a ``GPU``.

    Raises:
        EstimateError: invalid settings, or nothing to train (all frozen, no LoRA) outside
            inference.
    """
    setup = make_setup(model, plan, **settings)
    return step_time_of(setup, get_gpu(gpu))


def step_time_of(setup: TrainingSetup, gpu: GPU) -> StepTime:
    """The :class:`StepTime` of ``setup`` on ``gpu`` (cached per model, setup and GPU)."""
    prec = setup.precision_info
    try:
        gpu.peak(prec.matmul)
    except EstimateError as exc:
        raise EstimateError(f"precision {prec.name!r} on {gpu.name}: {exc}") from None
    cache = model_cache(setup.model, "time")
    key = (setup, gpu)
    if key not in cache:
        shape = analyse(setup.model, training=not setup.inference)
        cache[key] = _estimate(
            shape, set(setup.trainable), gpu, prec, setup.optimizer, setup.batch_size,
            setup.seq_len, setup.gradient_checkpointing, setup.lora,
            setup.attn_implementation == "eager", setup.inference,
        )
    return cache[key]  # type: ignore[no-any-return]


def _estimate(m: ModelShape, trainable: set[str], gpu: GPU, prec: Precision, opt: str, batch: int,
              seq: int, ckpt: bool, adapters: Lora | None, eager: bool,
              inference: bool) -> StepTime:
    s = m.scan
    tokens = batch * seq
    ab, sb, wb = prec.act_bytes, prec.stream_bytes, prec.weight_bytes
    block, rest = m.block, m.outside
    hidden = max((w for w, _ in block.norms), default=0) or max(
        (g.n_in for g in block.gemms), default=0)
    layers = len(m.prefixes)
    lora = adapters.rank if adapters is not None else 0

    def adapted(b: int, g: Gemm) -> bool:
        """Whether block ``b``'s weight ``g`` carries a LoRA adapter (an expert stack never)."""
        module = g.param.rpartition(".")[0]
        return adapters is not None and g.count == 1 and f"{m.prefixes[b]}.{module}" in adapters.targets

    # PEFT upcasts bf16/fp16 adapters to fp32 (get_peft_model(autocast_adapter_dtype=True));
    # under autocast their matmuls still run in bf16.
    lb = ab if prec.autocast else 4

    def lora_forward(w: Work, g: Gemm) -> None:
        """x.to(adapter dtype), A, B, * scaling, + base output, .to(output dtype)."""
        t = tokens * g.share
        w.gemm(t, lora, g.n_in, dtype_bytes=lb)
        w.gemm(t, g.n_out, lora, dtype_bytes=lb)
        cast = lb != ab
        w.stream(t * g.n_in * (ab + lb) * cast + t * g.n_out * (2 * lb + ab + 2 * lb)
                 + t * g.n_out * (lb + ab) * cast, 2 + 2 * cast)

    def eager_attention(w: Work, backward: bool) -> None:
        """transformers' eager attention: repeat_kv copies, QK^T and PV as batched GEMMs over
        every (batch, head) on the full S x S scores (no causal skipping), then on the scores
        the mask add, optional soft-capping (div, tanh, mul), softmax upcast to fp32 and back,
        dropout. Backward: dX and dW of both GEMMs, twice the elementwise work."""
        q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
        heads = batch * m.heads
        grads = 2 if backward else 1
        for _ in range(grads):
            w.gemm(seq, seq, m.head_dim, heads)  # scores = Q K^T (or its gradients)
            w.gemm(seq, m.head_dim, seq, heads)  # out = P V
        scores = heads * seq * seq
        nbytes = scores * (3 * ab + (ab + 4) + 8 + (4 + ab)) + 6 * scores * ab * m.attn_softcap
        kernels = 4 + 3 * m.attn_softcap
        if q != kv:
            nbytes += tokens * 2 * (q + kv) * ab
            kernels += 2
        factor = BACKWARD_ELEMENTWISE_RATIO if backward else 1.0
        w.stream(nbytes * factor, kernels * factor)

    def block_forward(w: Work, b: int) -> None:
        routed = Work(gpu, prec, HOST_LOOP_S_PER_KERNEL)
        for g in block.gemms:
            target = routed if g.share < 1 else w
            target.gemm(tokens * g.share, g.n_out, g.n_in, g.count)
            if adapted(b, g):
                lora_forward(target, g)
            if prec.autocast:  # cast of the fp32 weight to bf16, every forward
                target.stream(g.count * g.n_in * g.n_out * (4 + 2), g.count)
        _elementwise(w, block, tokens, hidden, ab, sb)
        if block.experts:
            routed.stream(tokens * hidden * 4 * ab, block.experts * EXPERT_LOOP_KERNELS)
            # transformers' eager loop syncs twice per expert (nonzero, where)
            w.serial(2 * block.experts, routed)
        if m.heads and eager:
            eager_attention(w, backward=False)
        elif m.heads:
            keys = [min(seq / 2, win) if win else seq / 2 for win in m.sliding] or [seq / 2]
            keys_avg = sum(keys) / len(keys)
            q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
            w.attention(4 * batch * seq * keys_avg * q, tokens * (2 * q + 2 * kv) * ab)
        if m.heads:
            q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
            w.stream(tokens * q * 2 * ab, 1)  # output transpose(1, 2).contiguous()
            if m.rotary:
                w.stream(tokens * (q + kv) * ROTARY_PASSES * ab, ROTARY_KERNELS)

    def outside_forward(w: Work) -> None:
        for _, _, width in m.embeddings:
            w.stream(tokens * width * (wb + sb), 1)
        w.stream(tokens * hidden * 3 * sb, max(len(m.embeddings) - 1, 0))
        for g in rest.gemms:
            w.gemm(tokens, g.n_out, g.n_in)
            if prec.autocast:
                w.stream(g.n_in * g.n_out * 6, 1)
        _elementwise(w, rest, tokens, hidden, ab, sb, residual=False)
        if m.logit_softcap:
            w.stream(tokens * m.vocab * 3 * 2 * ab, 3)

    def loss_forward(w: Work) -> None:
        w.stream(tokens * m.vocab * (ab + 12), LOSS_FORWARD_KERNELS)

    fwd = Work(gpu, prec, HOST_FORWARD_S_PER_KERNEL)
    for b in range(layers):
        block_forward(fwd, b)
    outside_forward(fwd)
    if not inference and m.has_loss:
        loss_forward(fwd)
    forward = fwd.phase()
    notes = _notes(prec, opt, m, eager)
    assumptions = _assumptions(gpu, prec, notes)
    numel, tensors = _trainable_tensors(s, trainable, block, m.prefixes, adapted, lora)
    if inference:
        zero = Phase()
        return StepTime(forward.seconds, forward, zero, zero, zero, tokens, 0, None, assumptions)
    trainable_params = numel

    # -- backward: as deep as the earliest trainable parameter ------------------------------
    emb_trainable = any(name in trainable for name, _, _ in m.embeddings) or any(
        n in trainable for n in s.embedding_names)
    primary_blocks = {sb_[1] for sb_ in map(s.block_of, trainable)
                      if sb_ is not None and sb_[0] == s.primary}
    block_train = [b in primary_blocks for b in range(layers)]
    if adapters is not None:
        block_train = [t or any(adapted(b, g) for g in block.gemms)
                       for b, t in enumerate(block_train)]
    earliest: int | None
    if emb_trainable:
        earliest = 0
    else:
        earliest = next((b for b, t in enumerate(block_train) if t), None)
    bwd = Work(gpu, prec, HOST_BACKWARD_S_PER_KERNEL)
    rec = Work(gpu, prec, HOST_FORWARD_S_PER_KERNEL)
    upstream = earliest is not None  # something before the head trains
    # loss, head and final norm
    if m.has_loss:
        bwd.stream(tokens * m.vocab * (20 + ab), LOSS_BACKWARD_KERNELS)
        if m.logit_softcap:
            bwd.stream(tokens * m.vocab * 3 * 2 * ab * BACKWARD_ELEMENTWISE_RATIO,
                       3 * BACKWARD_ELEMENTWISE_RATIO)
    for g in rest.gemms:
        if upstream:
            bwd.gemm(tokens, g.n_in, g.n_out)
        if g.param in trainable:
            bwd.gemm(g.n_out, g.n_in, tokens)
            if prec.autocast:
                bwd.stream(g.n_in * g.n_out * 6, 1)
    if upstream:
        _elementwise(bwd, rest, tokens, hidden, ab, sb, residual=False,
                     factor=BACKWARD_ELEMENTWISE_RATIO)
    for b in range(layers):
        if earliest is None or b < earliest:
            continue
        prefix = m.prefixes[b]
        if ckpt:
            block_forward(rec, b)
        for g in block.gemms:
            t = tokens * g.share
            bwd.gemm(t, g.n_in, g.n_out, g.count)  # input gradient
            if f"{prefix}.{g.param}" in trainable:
                bwd.gemm(g.n_out, g.n_in, t, g.count)  # weight gradient
                if prec.autocast:
                    bwd.stream(g.count * g.n_in * g.n_out * 6, g.count)
                if g.count > 1:
                    # each expert's weight is an index of the stacked tensor: its gradient is a
                    # zero-filled full-size tensor (index backward), summed in place into the
                    # others: E fills + (E - 1) read-read-write adds
                    full = g.count * g.n_in * g.n_out * wb
                    bwd.stream(full * (g.count + 3 * (g.count - 1)), 2 * g.count)
            if g.bias and f"{prefix}.{g.bias}" in trainable:
                bwd.stream(t * g.n_out * ab, 1)
            if adapted(b, g):
                bwd.gemm(t, lora, g.n_out, dtype_bytes=lb)  # dX through B
                bwd.gemm(t, g.n_in, lora, dtype_bytes=lb)  # dX through A
                bwd.gemm(lora, g.n_out, t, dtype_bytes=lb)  # dB
                bwd.gemm(g.n_in, lora, t, dtype_bytes=lb)  # dA
                cast = lb != ab
                nbytes = t * g.n_out * (4 * lb + ab) + t * (g.n_in + g.n_out) * (lb + ab) * cast
                bwd.stream(nbytes * BACKWARD_ELEMENTWISE_RATIO, 3 + 2 * cast)
        _elementwise(bwd, block, tokens, hidden, ab, sb, factor=BACKWARD_ELEMENTWISE_RATIO)
        if block.experts:
            # the loop's gathers and scatters each have a single-kernel backward
            bwd.stream(tokens * hidden * 8 * ab, block.experts * EXPERT_LOOP_KERNELS)
        if m.heads and eager:
            eager_attention(bwd, backward=True)
        elif m.heads:
            keys = min(seq / 2, m.sliding[b]) if m.sliding and m.sliding[b] else seq / 2
            q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
            bwd.attention(ATTENTION_BACKWARD_RATIO * 4 * batch * seq * keys * q,
                          tokens * (4 * q + 4 * kv) * ab, kernels=2)
        if m.heads:
            q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
            bwd.stream(tokens * q * 2 * ab, 1)
            if m.rotary:
                bwd.stream(tokens * (q + kv) * ROTARY_PASSES * ab, ROTARY_KERNELS)
    for name, rows, width in m.embeddings:
        if name in trainable:  # embedding_dense_backward: zero-fill, sort, scatter-add
            bwd.stream(rows * width * wb + tokens * width * (sb + 8), 5)
    backward = bwd.phase()
    recompute = rec.phase() if ckpt else Phase()

    # -- optimizer: memory-bound passes over the trainable tensors ---------------------------
    passes, kernels_per_launch = OPTIMIZER_PASSES[opt]
    launches = kernels_per_launch * max(1, math.ceil(numel / FOREACH_ELEMENTS_PER_LAUNCH))
    ow = Work(gpu, prec, 0.0)
    ow.stream(passes * numel * wb, launches)
    optim = ow.phase(extra_host=tensors * HOST_OPTIMIZER_S_PER_TENSOR, overlap=False)
    seconds = forward.seconds + backward.seconds + recompute.seconds + optim.seconds
    return StepTime(seconds, forward, backward, recompute, optim, tokens, trainable_params,
                    earliest, assumptions)


def _elementwise(w: Work, part: Part, tokens: int, hidden: int, ab: int, sb: int,
                 residual: bool = True, factor: float = 1.0) -> None:
    """Norms, activations, GLU multiply, dropout and (in blocks) the two residual adds."""
    nbytes, kernels = 0.0, 0.0
    for width, fused in part.norms:
        if fused:
            nbytes += tokens * width * 2 * sb
            kernels += 1
        else:
            nbytes += tokens * width * (28 + sb + 3 * ab)
            kernels += RMSNORM_KERNELS
    mlp = tokens * part.mlp_share * part.mlp_width
    for k in part.act_kernels:
        nbytes += mlp * 2 * ab * k
        kernels += k
    if part.gated:
        nbytes += mlp * 3 * ab
        kernels += 1
    nbytes += part.dropouts * tokens * hidden * (2 * ab + 1)
    kernels += part.dropouts
    if residual:
        nbytes += 2 * tokens * hidden * 3 * sb
        kernels += 2
    w.stream(nbytes * factor, kernels * factor)


def _trainable_tensors(s: ModelScan, trainable: set[str], block: Part,
                       prefixes: tuple[str, ...], adapted: Any, rank: int) -> tuple[int, int]:
    """Elements and tensors the optimizer updates (a shared tensor once; LoRA: A and B of every
    adapted weight of the blocks)."""
    seen = {s.by_name[n].tensor: s.by_name[n].numel for n in trainable}
    numel, tensors = sum(seen.values()), len(seen)
    for b in range(len(prefixes)):
        for g in block.gemms:
            if adapted(b, g):
                numel += rank * (g.n_in + g.n_out)
                tensors += 2
    return numel, tensors


def _notes(prec: Precision, opt: str, m: ModelShape, eager: bool) -> tuple[str, ...]:
    notes = []
    if prec.name == "32-true":
        notes.append("fp32 matmuls on CUDA cores (torch.backends.cuda.matmul.allow_tf32 off, "
                     "PyTorch's default)")
    if prec.autocast:
        notes.append("bf16 autocast: every weight cast to bf16 each forward, weight gradients "
                     "cast back to fp32; residual stream and norms in fp32")
    if m.heads and eager:
        notes.append("eager attention: S x S scores materialised, no causal skipping")
    elif m.heads:
        notes.append("causal SDPA kernel (flash / memory-efficient): half the S x S scores")
    if m.block.experts:
        notes.append("MoE: each token runs top-k experts; experts run in a Python loop")
    notes.append(f"optimizer {opt}: {OPTIMIZER_PASSES[opt][0]} element passes per trainable "
                 "element per step")
    return tuple(notes)


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
