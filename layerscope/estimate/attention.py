"""The kernels of one attention layer, as each ``attn_implementation`` runs them on a CUDA GPU.

* ``"sdpa"``: ``F.scaled_dot_product_attention`` picks a kernel (``sdp_utils.cpp``): the
  flash kernel for fp16/bf16 without a mask; the memory-efficient kernel otherwise (fp32, or
  a mask), but not for grouped-query heads passed as such (fp32 without a mask): then the math
  fallback, which materialises the scores like eager attention. transformers passes no mask
  (``is_causal=True``) unless the batch has padding or a sliding window is no longer than the
  sequence (``masking_utils._ignore_causal_mask_sdpa``);
  with a mask, grouped-query heads are first repeated (``repeat_kv``), the boolean mask is
  converted to an additive one in every layer, and the kernel computes every score (no causal
  block skipping).
* ``"eager"``: the scores are materialised: ``Q @ K^T`` and ``P @ V`` as batched GEMMs over
  every (batch, head) on the full S x S (no causal skipping), the scaling, the mask add,
  optional soft-capping (divide, tanh, multiply), softmax in fp32 and the cast back, dropout.
* ``"flash_attention_2"``: the FlashAttention-2 library: causal and sliding-window blocks are
  skipped, soft-capping is fused, grouped-query heads are read in place, and the output is
  already in (batch, seq, heads, dim) order (no transpose copy).
* ``"flex_attention"``: PyTorch's FlexAttention (compiled Triton kernels) with a block mask that
  skips causal and sliding-window blocks, soft-capping as a fused score modifier.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerscope.errors import EstimateError
from layerscope.estimate.roofline import (
    ATTENTION_BACKWARD_RATIO,
    ATTENTION_EFFICIENCY,
    Work,
)
from layerscope.setup import Precision

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")

EFFICIENT_ATTENTION_SPEED = 2 / 3
"""Speed of PyTorch's memory-efficient SDPA kernel (xformers' CUTLASS kernel, fp16/bf16)
relative to its flash kernel: an assumption (the flash kernel is FlashAttention-2, which its
paper reports well ahead of xformers' kernels); no calibration row runs it in bf16. In fp32,
where only this kernel runs, it keeps :data:`ATTENTION_EFFICIENCY` of the CUDA-core peak, as
the fp32 calibration rows show."""

FLEX_FORWARD_SPEED, FLEX_BACKWARD_SPEED = 0.90, 0.85
"""FlexAttention relative to FlashAttention-2, forward and backward (PyTorch blog,
"FlexAttention: The Flexibility of PyTorch with the Performance of FlashAttention", 2024)."""

FLASH_BACKWARD_KERNELS = 3
"""FlashAttention-2 backward: the ``dO * O`` row sums, the main kernel, the ``dQ`` conversion
from its fp32 accumulator."""

MASK_KERNELS = 4
"""Kernels transformers' ``sdpa_mask``/``eager_mask`` take to build a (batch, 1, S, S) mask
from index comparisons, once per mask type per forward."""


@dataclass(frozen=True)
class Heads:
    """The attention shape of a block.

    Attributes:
        heads: query heads.
        kv_heads: key/value heads (fewer: grouped-query attention).
        head_dim: size of each head.
        softcap: scores are soft-capped (``attn_logit_softcapping``, Gemma-2).
        dropout: attention dropout probability in training.
        causal: decoder self-attention (an encoder's attends to every key).
    """

    heads: int
    kv_heads: int
    head_dim: int
    softcap: bool = False
    dropout: float = 0.0
    causal: bool = True

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim


def check_implementation(name: str, prec: Precision) -> str:
    """Validate an ``attn_implementation`` for a precision.

    Raises:
        EstimateError: an unknown name, or flash attention in fp32.
    """
    if name not in ATTN_IMPLEMENTATIONS:
        raise EstimateError(f"unknown attn_implementation {name!r}; allowed: "
                            f"{', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2" and prec.matmul == "fp32":
        raise EstimateError(f"attn_implementation 'flash_attention_2' needs fp16/bf16 "
                            f"attention; precision {prec.name!r} runs it in fp32")
    return name


def keys_per_query(seq: int, window: int | None, causal: bool = True) -> float:
    """Keys a query attends to on average under a causal mask, within ``window`` if given:
    ``sum(min(i + 1, W) for i in range(S)) / S``; every key without a causal mask."""
    if not causal:
        return float(seq)
    if not window or window >= seq:
        return (seq + 1) / 2
    return (window * (window + 1) / 2 + (seq - window) * window) / seq


def needs_mask(impl: str, seq: int, window: int | None, padded: bool) -> bool:
    """transformers gives SDPA a mask (no ``is_causal``) for padding or a window < S."""
    return impl == "sdpa" and (padded or bool(window and seq >= window))


def sdpa_kernel(prec: Precision, h: Heads, masked: bool) -> str:
    """The SDPA kernel a CUDA GPU (sm80+) runs: ``"flash"``, ``"efficient"`` or ``"math"``.

    Without a mask transformers passes grouped-query heads as they are (``enable_gqa=True``),
    which the memory-efficient kernel does not take (``sdp_utils.cpp``, PyTorch 2.11): an fp32
    grouped-query model runs the math fallback. With a mask it repeats K and V first. The same
    choice as the memory trace's (:func:`layerscope.estimate.kernels.sdpa_backend`)."""
    half = prec.matmul in ("bf16", "fp16")
    if half and not masked and h.head_dim <= 256:
        return "flash"
    gqa = h.kv_heads != h.heads and not masked
    if not gqa and h.head_dim % (8 if half else 4) == 0:
        return "efficient"
    return "math"


def kernel_name(impl: str, prec: Precision, h: Heads, seq: int, window: int | None,
                padded: bool = False) -> str:
    """What actually runs: ``"flash"``, ``"efficient"``, ``"math"`` (SDPA's choices),
    ``"eager"``, ``"flash_attention_2"`` or ``"flex_attention"``."""
    if impl == "sdpa":
        return sdpa_kernel(prec, h, needs_mask(impl, seq, window, padded))
    return impl


def attention(w: Work, impl: str, prec: Precision, h: Heads, batch: int, seq: int,
              window: int | None, backward: bool, training: bool, padded: bool = False) -> None:
    """One layer's attention (from projected Q, K, V to the output in (batch, seq, hidden)),
    forward or backward, added to ``w``."""
    ab = prec.act_bytes
    tokens = batch * seq
    masked = needs_mask(impl, seq, window, padded)
    kernel = kernel_name(impl, prec, h, seq, window, padded)
    ratio = ATTENTION_BACKWARD_RATIO if backward else 1.0
    if kernel in ("eager", "math"):
        _materialised(w, prec, h, batch, seq, backward, training and h.dropout > 0)
    else:
        keys = seq if masked else keys_per_query(seq, window, h.causal)
        if kernel == "flash_attention_2" and window:
            keys = keys_per_query(seq, window, h.causal)
        flops = 4 * batch * seq * keys * h.q * ratio
        io = tokens * (2 * h.q + 2 * h.kv) * ab * (2 if backward else 1)
        eff = ATTENTION_EFFICIENCY
        if kernel == "efficient" and prec.matmul != "fp32":
            eff *= EFFICIENT_ATTENTION_SPEED
        if kernel == "flex_attention":
            eff *= FLEX_BACKWARD_SPEED if backward else FLEX_FORWARD_SPEED
        if masked:  # the additive mask, (batch, 1, S, S), read by every head's tiles
            io += batch * h.heads * seq * seq * ab
        kernels = FLASH_BACKWARD_KERNELS if backward else 1
        w.attention(flops, io, kernels, efficiency=eff)
    if masked:
        scores = batch * seq * seq
        # bool -> additive mask in the query dtype, every layer (sdp::convert_boolean_attn_mask)
        if not backward:
            w.stream(scores * (1 + ab), 2)
        if h.kv != h.q:  # repeat_kv copies K and V to every query head (backward: the sums)
            w.stream(tokens * 2 * (h.q + h.kv) * ab, 2)
    if kernel != "flash_attention_2":  # output (batch, heads, seq, dim) -> (batch, seq, hidden)
        w.stream(tokens * h.q * 2 * ab, 1)


def _materialised(w: Work, prec: Precision, h: Heads, batch: int, seq: int, backward: bool,
                  dropout: bool) -> None:
    """Eager attention (and SDPA's math fallback): every score materialised."""
    ab = prec.act_bytes
    tokens = batch * seq
    bh = batch * h.heads
    scores = bh * seq * seq
    if not backward:
        w.batched_gemm(seq, seq, h.head_dim, bh)  # Q @ K^T
        w.batched_gemm(seq, h.head_dim, seq, bh)  # P @ V
        # scale (r+w), mask add (r+w, the mask broadcast over heads), soft-cap (3 x r+w),
        # softmax in fp32 (r ab, w 4), cast back (r 4, w ab), dropout (r+w, 1-byte mask)
        per = 2 * ab + 2 * ab + 6 * ab * h.softcap + (ab + 4) + (4 + ab) + (2 * ab + 1) * dropout
        kernels = 4 + 3 * h.softcap + dropout
    else:
        w.batched_gemm(seq, seq, h.head_dim, bh)  # dP = dO @ V^T
        w.batched_gemm(seq, h.head_dim, seq, bh)  # dV = P^T @ dO
        w.batched_gemm(seq, h.head_dim, seq, bh)  # dQ = dS @ K
        w.batched_gemm(seq, h.head_dim, seq, bh)  # dK = dS^T @ Q
        # dropout (r grad + mask, w), cast (r ab, w 4), softmax (r grad, r out, w: 4 each),
        # soft-cap (3 x r 2, w 1), scale (r+w)
        per = (2 * ab + 1) * dropout + (ab + 4) + 12 + 9 * ab * h.softcap + 2 * ab
        kernels = 3 + 3 * h.softcap + dropout
    w.stream(scores * per, kernels)
    if h.kv != h.q:  # repeat_kv: K and V copied to every query head (backward: summed back)
        w.stream(tokens * 2 * (h.q + h.kv) * ab, 2)


def mask_creation(w: Work, impl: str, batch: int, seq: int, windows: set[int | None],
                  padded: bool) -> None:
    """The masks transformers builds once per forward: (batch, 1, S, S) for eager always, for
    SDPA when :func:`needs_mask`; flash attention and flex attention need none this large."""
    for window in windows:
        if impl == "eager" or needs_mask(impl, seq, window, padded):
            w.stream(batch * seq * seq * (1 if impl == "sdpa" else 2), MASK_KERNELS)
