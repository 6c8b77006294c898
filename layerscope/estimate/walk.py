"""The kernels of one forward and backward, in the order the host issues them.

:class:`Walk` goes through a step as eager PyTorch runs it (embeddings, blocks, final norm,
head, loss; then the loss, head and blocks in reverse, each checkpointed block first running
its forward again) and adds each kernel's FLOPs and bytes to a :class:`~layerscope.estimate.
roofline.Work`, labelled with its phase and with what it costs the host to issue it.

Backward reaches down to the earliest block a gradient must flow through: the earliest
trainable parameter, or the embedding output when gradient checkpointing makes it require a
gradient (transformers' ``gradient_checkpointing_enable()`` calls
``enable_input_require_grads()`` for models fed ``input_ids``, so a frozen prefix is still
walked: input gradients and recomputation, no weight gradients). peft's
``prepare_model_for_kbit_training`` does the same for any model (``input_grads``).

A quantized base (bitsandbytes) adds memory-bound work next to each of its layers' matmuls:
the weight dequantised before the forward matmul, its recomputation and the input gradient
(:class:`~layerscope.estimate.quant.WeightTraffic`); autocast casts only the weights not
already in its dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from layerscope.estimate import attention as attn
from layerscope.estimate import experts
from layerscope.estimate.quant import WeightTraffic
from layerscope.estimate.roofline import (
    BACKWARD_ELEMENTWISE_RATIO,
    HOST_ATEN_S_PER_KERNEL,
    HOST_AUTOCAST_CAST_S,
    HOST_BACKWARD_S_PER_KERNEL,
    HOST_CHECKPOINT_S_PER_BLOCK,
    HOST_CHECKPOINT_S_PER_SAVED,
    HOST_FORWARD_S_PER_KERNEL,
    LOSS_BACKWARD_KERNELS,
    LOSS_FORWARD_KERNELS,
    ROTARY_KERNELS,
    ROTARY_PASSES,
    Work,
    rmsnorm,
)
from layerscope.estimate.structure import Gemm, ModelShape, Part, reads_stream
from layerscope.setup import Lora, Precision


@dataclass
class Walk:
    """One step's kernels, added to ``w`` in issue order.

    Attributes:
        m: the model's shape.
        prec: the precision.
        batch, seq: sequences per step and tokens per sequence.
        trainable: names of the trainable base parameters (absolute).
        adapters: the LoRA adapters (on the modules they target), or None.
        ckpt: gradient checkpointing of every block.
        training: a training step (dropout on, loss computed).
        padded: the batch carries padding (an attention mask).
        weights: the dtype and quantization of each weight (None: every weight in the
            precision's parameter dtype, nothing quantized).
        lora_bytes: bytes per adapter element (fp32 unless the setup keeps them in bf16).
        input_grads: the embedding output requires a gradient under checkpointing whatever
            the model (``prepare_model_for_kbit_training``'s ``enable_input_require_grads``).
    """

    w: Work
    m: ModelShape
    prec: Precision
    batch: int
    seq: int
    trainable: set[str]
    adapters: Lora | None = None
    ckpt: bool = False
    training: bool = True
    padded: bool = False
    weights: WeightTraffic | None = None
    lora_bytes: int = 4
    input_grads: bool = False
    heads: attn.Heads = field(init=False)
    traffic: WeightTraffic = field(init=False)
    marks: list[tuple[int, str, int | None]] = field(init=False, default_factory=list)
    """Where each part of the step starts in ``w.items``: ``(index, phase, block)``, block
    None for what lies outside the blocks (embeddings, head, loss); a recomputation is marked
    as its block's backward. Read by :func:`~layerscope.estimate.roofline.spans`."""

    def __post_init__(self) -> None:
        m = self.m
        self.traffic = self.weights or WeightTraffic.plain(self.prec.param_dtype,
                                                           self.prec.autocast_dtype)
        self.heads = attn.Heads(m.heads, m.kv_heads, m.head_dim, m.attn_softcap,
                                m.attn_dropout if self.training else 0.0, m.causal)

    # -- shapes -------------------------------------------------------------------------------
    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def hidden(self) -> int:
        block = self.m.block
        return max((w for w, _ in block.norms), default=0) or max(
            (g.n_in for g in block.gemms), default=0)

    @property
    def adapter_bytes(self) -> int:
        """PEFT upcasts bf16/fp16 adapters to fp32 (``autocast_adapter_dtype=True``) unless the
        setup keeps them in bf16 (``lora_bytes``); under autocast their matmuls run in bf16."""
        return self.prec.act_bytes if self.prec.autocast else self.lora_bytes

    def module_of(self, b: int | None, g: Gemm) -> str:
        """The full name of the module owning ``g`` (``b``: its block; None: outside them)."""
        module = g.param.rpartition(".")[0]
        return module if b is None else f"{self.m.prefixes[b]}.{module}"

    def block_trainable(self, b: int, g: Gemm) -> bool:
        return f"{self.m.prefixes[b]}.{g.param}" in self.trainable

    def adapted(self, b: int, g: Gemm) -> bool:
        """Block ``b``'s weight ``g`` carries a LoRA adapter (an expert stack never does)."""
        module = g.param.rpartition(".")[0]
        return (self.adapters is not None and g.count == 1
                and f"{self.m.prefixes[b]}.{module}" in self.adapters.targets)

    @property
    def rank(self) -> int:
        return self.adapters.rank if self.adapters is not None else 0

    def mark(self, phase: str, block: int | None) -> None:
        """What follows belongs to ``block`` (None: outside the blocks) in ``phase``."""
        self.marks.append((len(self.w.items), phase, block))

    def _phase(self, label: str) -> None:
        self.w.label = label
        self.w.host_s_per_kernel = (HOST_BACKWARD_S_PER_KERNEL if label == "backward"
                                    else HOST_FORWARD_S_PER_KERNEL)

    # -- which blocks backward walks ----------------------------------------------------------
    def earliest(self) -> int | None:
        """The earliest block whose weights train (0 if an embedding trains), or None."""
        s, m = self.m.scan, self.m
        if any(name in self.trainable for name, _, _ in m.embeddings) or any(
                n in self.trainable for n in s.embedding_names):
            return 0
        blocks = {sb[1] for sb in map(s.block_of, self.trainable)
                  if sb is not None and sb[0] == s.primary}
        if self.adapters is not None:
            blocks |= {b for b, part in enumerate(m.blocks)
                       if any(self.adapted(b, g) for g in part.gemms)}
        return min(blocks, default=None)

    def gradient_floor(self) -> int | None:
        """The earliest block gradients flow through (``earliest``, or 0 when checkpointing
        makes the embedding output require a gradient); None: no block."""
        first = self.earliest()
        if self.ckpt and (self.m.input_grads or self.input_grads) and self.m.prefixes:
            return 0
        return first

    # -- forward ------------------------------------------------------------------------------
    def forward(self) -> None:
        """The whole forward (and the loss, in training)."""
        self._phase("forward")
        self.mark("forward", None)
        self.embeddings_forward()
        windows = set(self.m.sliding) or {None}
        if self.m.heads:
            attn.mask_creation(self.w, self.m.attn_implementation, self.batch, self.seq,
                               windows, self.padded)
        for b in range(len(self.m.prefixes)):
            self.mark("forward", b)
            if self.ckpt and self.training:
                self.w.host(HOST_CHECKPOINT_S_PER_BLOCK / 2)
            before = len(self.w.items)
            self.block_forward(b)
            if self.ckpt and self.training:  # the saved-tensor pack hooks, in Python
                kernels = sum(k.count for k in self.w.items[before:])
                self.w.host(kernels * HOST_CHECKPOINT_S_PER_SAVED / 3)
        self.mark("forward", None)
        self.outside_forward()
        if self.training and self.m.has_loss:
            self.w.stream(self.tokens * self.m.vocab * (self.prec.act_bytes + 12),
                          LOSS_FORWARD_KERNELS)

    def embeddings_forward(self) -> None:
        sb, wb = self.prec.stream_bytes, self.prec.weight_bytes
        for _, _, width in self.m.embeddings:
            self.w.stream(self.tokens * width * (wb + sb), 1)
        self.w.stream(self.tokens * self.hidden * 3 * sb, max(len(self.m.embeddings) - 1, 0))

    def autocast_casts(self, part: Part, backward: bool, trainable: Callable[[Gemm], bool],
                       skip: Gemm | None = None, b: int | None = None) -> None:
        """CUDA autocast's casts around the dense matmuls of ``part`` (block ``b``, None: outside
        the blocks): the weight (and bias) to bf16 every forward unless already bf16 or
        quantized (cached for the forward, recomputed by checkpointing), the
        fp32 residual-stream input of the projections reading it (not cached: q, k and v
        each cast it); backward casts those inputs' gradients and the trainable weights'
        gradients back to fp32. Issued from C++ inside the matmul's op (forward: a cast of a
        tensor that requires grad also records its autograd node,
        :data:`~layerscope.estimate.roofline.HOST_AUTOCAST_CAST_S`) or as autograd nodes
        (backward)."""
        w, prec, tokens = self.w, self.prec, self.tokens
        if not prec.autocast:
            return
        ab, wb, sb = prec.act_bytes, prec.weight_bytes, prec.stream_bytes
        stream = reads_stream(part, self.hidden)

        def rate(requires_grad: bool) -> float:
            if backward:
                return w.host_s_per_kernel
            return HOST_AUTOCAST_CAST_S if requires_grad and self.training else \
                HOST_ATEN_S_PER_KERNEL

        for g, from_stream in zip(part.gemms, stream):
            if g.share < 1 or g is skip:
                continue  # grouped_mm / batched_mm are not autocast ops
            if from_stream:
                with w.host_rate(rate(self.stream_requires_grad(b))):
                    w.stream(tokens * g.n_in * (sb + ab), 1)
            with w.host_rate(rate(trainable(g))):
                if backward and trainable(g):  # the weight gradient back to fp32
                    w.stream(g.count * g.n_in * g.n_out * (wb + ab), g.count + bool(g.bias))
                elif not backward:
                    nbytes = self.traffic.cast_bytes(self.module_of(b, g),
                                                     g.count * g.n_in * g.n_out, trainable(g))
                    w.stream(nbytes, (g.count + bool(g.bias)) * bool(nbytes))

    def stream_requires_grad(self, b: int | None) -> bool:
        """The residual stream entering block ``b`` (None: the head) requires a gradient:
        something at or below it trains, or checkpointing makes the embedding output require
        one (see :meth:`gradient_floor`)."""
        floor = self.gradient_floor()
        if b is None:
            return floor is not None or bool(self.trainable)
        return floor is not None and b >= floor

    def stops_early(self, b: int) -> Gemm | None:
        """The GEMM a recomputation of block ``b`` skips, if any.

        Non-reentrant checkpointing stops recomputing once every tensor the block saved for
        backward is back (``torch.utils.checkpoint``'s early stop, on by default). A matmul
        whose weight needs no gradient saves no activation, so in a frozen dense block without
        dropout the last projection (and the residual add after it) saves nothing: the
        recomputation stops before it."""
        part = self.m.blocks[b]
        dense = [g for g in part.gemms if g.share == 1]
        if part.experts or part.dropouts or not dense:
            return None
        last = dense[-1]
        if self.block_trainable(b, last) or self.adapted(b, last):
            return None
        return last

    def block_forward(self, b: int, recompute: bool = False) -> None:
        m, w, prec, block = self.m, self.w, self.prec, self.m.blocks[b]
        tokens = self.tokens
        skip = self.stops_early(b) if recompute else None
        self.autocast_casts(block, False, lambda g: self.block_trainable(b, g), skip, b)
        for g in block.gemms:
            if g.share < 1 or g is skip:
                continue
            self.dequantise(b, g)
            w.gemm(tokens, g.n_out, g.n_in, g.count)
            if self.adapted(b, g):
                self.lora_forward(g, self.traffic.is_quantized(self.module_of(b, g)))
        _elementwise(w, block, tokens, self.hidden, prec)
        if block.experts:
            for g in block.gemms:  # per-expert bitsandbytes layers, each run on its tokens
                if g.share < 1:
                    self.dequantise(b, g)
            experts.forward(w, block, tokens, self.hidden, prec, w.gpu,
                            m.experts_implementation or "eager",
                            lambda g: self.block_trainable(b, g))
        if m.heads:
            window = m.sliding[b] if m.sliding else None
            attn.attention(w, m.attn_implementation, prec, self.heads, self.batch, self.seq,
                           window, backward=False, training=self.training, padded=self.padded)
            if m.rotary:
                w.stream(tokens * (self.heads.q + self.heads.kv) * ROTARY_PASSES
                         * prec.act_bytes, ROTARY_KERNELS)

    def dequantise(self, b: int | None, g: Gemm, backward: bool = False) -> None:
        """What readies a quantized weight for its matmul (nothing for another weight):
        :meth:`~layerscope.estimate.quant.WeightTraffic.forward` or ``.backward``."""
        module = self.module_of(b, g)
        if not self.traffic.is_quantized(module):
            return
        if backward:
            nbytes, kernels = self.traffic.backward(module, g.n_out, g.n_in)
        else:
            nbytes, kernels = self.traffic.forward(module, g.n_out, g.n_in, self.tokens * g.share,
                                                   self.prec.act_bytes)
        self.w.stream(g.count * nbytes, g.count * kernels)

    def lora_forward(self, g: Gemm, quantized: bool = False) -> None:
        """x.to(adapter dtype), A, B, * scaling, + base output, .to(output dtype); over a
        4-bit layer peft first clones the base output (``result = result.clone()``, the
        "defensive clone" of its bitsandbytes ``Linear4bit``; torchtune's ``LoRALinear`` over
        a torchao base does not)."""
        w, ab, lb, r = self.w, self.prec.act_bytes, self.adapter_bytes, self.rank
        t = self.tokens * g.share
        q = self.traffic.quantization
        if quantized and q is not None and q.four_bit and q.library == "bitsandbytes":
            w.stream(t * g.n_out * 2 * ab, 1)
        w.gemm(t, r, g.n_in, dtype_bytes=lb, matmul=self._adapter_matmul())
        w.gemm(t, g.n_out, r, dtype_bytes=lb, matmul=self._adapter_matmul())
        cast = lb != ab
        w.stream(t * g.n_in * (ab + lb) * cast + t * g.n_out * (2 * lb + ab + 2 * lb)
                 + t * g.n_out * (lb + ab) * cast, 2 + 2 * cast)

    def outside_forward(self) -> None:
        m, w, prec = self.m, self.w, self.prec
        self.autocast_casts(m.outside, False, lambda g: g.param in self.trainable)
        for g in m.outside.gemms:
            self.dequantise(None, g)
            w.gemm(self.tokens, g.n_out, g.n_in)
        _elementwise(w, m.outside, self.tokens, self.hidden, prec, residual=False)
        if m.logit_softcap:
            w.stream(self.tokens * m.vocab * 3 * 2 * prec.act_bytes, 3)

    # -- backward -----------------------------------------------------------------------------
    def backward(self) -> int | None:
        """Loss, head, blocks (recomputed first under checkpointing) and embeddings.

        Returns:
            The earliest block whose weights train (None: only parameters outside them).
        """
        m, w, prec = self.m, self.w, self.prec
        tokens, ab, wb = self.tokens, prec.act_bytes, prec.weight_bytes
        floor = self.gradient_floor()
        upstream = floor is not None  # gradients flow below the head
        self._phase("backward")
        self.mark("backward", None)
        if m.has_loss:
            w.stream(tokens * m.vocab * (20 + ab), LOSS_BACKWARD_KERNELS)
            if m.logit_softcap:
                w.stream(tokens * m.vocab * 3 * 2 * ab * BACKWARD_ELEMENTWISE_RATIO,
                         3 * BACKWARD_ELEMENTWISE_RATIO)
        for g in m.outside.gemms:
            if upstream:
                self.dequantise(None, g, backward=True)
                w.gemm(tokens, g.n_in, g.n_out)
            if g.param in self.trainable:
                w.gemm(g.n_out, g.n_in, tokens)
        self.autocast_casts(m.outside, True, lambda g: g.param in self.trainable)
        if upstream:
            _elementwise(w, m.outside, tokens, self.hidden, prec, residual=False,
                         factor=BACKWARD_ELEMENTWISE_RATIO)
        for b in reversed(range(len(m.prefixes))):
            if floor is None or b < floor:
                continue
            self.mark("backward", b)
            if self.ckpt:
                self._phase("recompute")
                w.host(HOST_CHECKPOINT_S_PER_BLOCK / 2)
                before = len(w.items)
                self.block_forward(b, recompute=True)
                kernels = sum(k.count for k in w.items[before:])
                self._phase("backward")
                w.host(kernels * HOST_CHECKPOINT_S_PER_SAVED * 2 / 3)  # recompute pack, unpack
            self.block_backward(b)
        self.mark("backward", None)
        for name, rows, width in m.embeddings:
            if name in self.trainable:  # embedding_dense_backward: zero-fill, sort, scatter-add
                w.stream(rows * width * wb + tokens * width * (prec.stream_bytes + 8), 5)
        return self.earliest()

    def block_backward(self, b: int) -> None:
        m, w, prec, block = self.m, self.w, self.prec, self.m.blocks[b]
        tokens, ab = self.tokens, prec.act_bytes
        for g in block.gemms:
            if g.share < 1:
                continue
            self.dequantise(b, g, backward=True)
            w.gemm(tokens, g.n_in, g.n_out, g.count)  # input gradient
            if self.block_trainable(b, g):
                w.gemm(g.n_out, g.n_in, tokens, g.count)  # weight gradient
            if g.bias and f"{m.prefixes[b]}.{g.bias}" in self.trainable:
                w.stream(tokens * g.n_out * ab, 1)
            if self.adapted(b, g):
                self.lora_backward(g)
        self.autocast_casts(block, True, lambda g: self.block_trainable(b, g), b=b)
        _elementwise(w, block, tokens, self.hidden, prec, factor=BACKWARD_ELEMENTWISE_RATIO)
        if block.experts:
            for g in block.gemms:
                if g.share < 1:
                    self.dequantise(b, g, backward=True)
            experts.backward(w, block, tokens, self.hidden, prec, w.gpu,
                             m.experts_implementation or "eager",
                             lambda g: self.block_trainable(b, g))
        if m.heads:
            window = m.sliding[b] if m.sliding else None
            attn.attention(w, m.attn_implementation, prec, self.heads, self.batch, self.seq,
                           window, backward=True, training=self.training, padded=self.padded)
            if m.rotary:
                w.stream(tokens * (self.heads.q + self.heads.kv) * ROTARY_PASSES * ab,
                         ROTARY_KERNELS)

    def lora_backward(self, g: Gemm) -> None:
        """The backward of :meth:`lora_forward`'s ops, each counted once: the output cast's
        (grad back to the adapter dtype), the add's (the base output's share cast to its
        dtype; the adapter's share is the same tensor), the scaling's multiply, the GEMMs
        through B and A, the input cast's, and the sum of the adapter's input gradient with
        the base layer's."""
        w, r, ab, lb = self.w, self.rank, self.prec.act_bytes, self.adapter_bytes
        t = self.tokens * g.share
        mm = self._adapter_matmul()
        w.gemm(t, r, g.n_out, dtype_bytes=lb, matmul=mm)  # dX through B
        w.gemm(t, g.n_in, r, dtype_bytes=lb, matmul=mm)  # dX through A
        w.gemm(r, g.n_out, int(t), dtype_bytes=lb, matmul=mm)  # dB
        w.gemm(g.n_in, r, int(t), dtype_bytes=lb, matmul=mm)  # dA
        cast = lb != ab
        nbytes = (t * g.n_out * (2 * lb + 2 * (lb + ab) * cast)
                  + t * g.n_in * ((lb + ab) * cast + 3 * ab))
        w.stream(nbytes, 2 + 3 * cast)

    def _adapter_matmul(self) -> str | None:
        """The catalogue dtype of the adapters' matmuls: fp32 adapters outside autocast run on
        CUDA cores (None: the precision's own)."""
        return "fp32" if self.adapter_bytes == 4 and self.prec.matmul != "fp32" else None


def _elementwise(w: Work, part: Part, tokens: int, hidden: int, prec: Precision,
                 residual: bool = True, factor: float = 1.0) -> None:
    """Norms, activations, GLU multiply, dropout and (in blocks) the two residual adds.

    The routed experts' activations are :mod:`layerscope.estimate.experts`'s."""
    ab, sb = prec.act_bytes, prec.stream_bytes
    nbytes, kernels = 0.0, 0.0
    for width, fused in part.norms:
        if fused:
            nbytes += tokens * width * 2 * sb
            kernels += 1
        else:
            norm_kernels, per_element = rmsnorm(sb)
            nbytes += tokens * width * per_element
            kernels += norm_kernels
    if not part.experts:
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
