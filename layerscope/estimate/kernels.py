"""What a CUDA GPU runs, emulated on CPU fake tensors.

A CPU build of PyTorch cannot trace with CUDA fake tensors (autograd aborts on a CUDA device it
was not built with), so the trace runs on CPU fake tensors and this module makes the two
things that differ between CPU and CUDA behave as on CUDA:

* **Autocast.** CUDA autocast casts at the operator level, before autograd records the op, so
  the cast copies are what autograd saves. :class:`CudaKernels` applies the CUDA policy at the
  ``__torch_function__`` level, which is also above autograd. The op lists are those of
  ``aten/src/ATen/autocast_mode.cpp`` (CUDA: ``lower_precision_fp``, ``fp32`` and
  ``fp32_set_opt_dtype``), and leaf tensors that require grad are cast once per forward, as the
  autocast weight cache does.
* **Scaled dot-product attention.** The CPU dispatcher picks a CPU kernel; a GPU picks flash
  attention (fp16/bf16, no mask, head dim <= 256, grouped-query heads supported), else the
  memory-efficient kernel (masks, fp32; no grouped-query heads in the PyTorch 2.11 checks), else
  the math fallback that materialises the score matrix. The selection follows
  ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``; the chosen aten kernel then runs on
  fake tensors, so autograd saves exactly what that kernel saves (flash: output + fp32
  logsumexp; efficient: output + logsumexp + RNG state; math: the softmax matrix).
* **FFTs.** CUDA autocast leaves ``torch.fft`` alone (not in its lists, unlike the CPU's and
  XPU's) and cuFFT has no bfloat16 kernel (``promote_type_fft`` in ``SpectralOps.cpp``): a
  bfloat16 FFT (FNet's token mixing after its bf16 projection) is refused with an
  :class:`~layerscope.errors.UnsupportedModelError`, where the CPU would compute it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from layerscope.errors import UnsupportedModelError

# CUDA autocast policy, aten/src/ATen/autocast_mode.cpp (names as __torch_function__ sees them).
_LOWER_PRECISION = frozenset({
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm",
    "addmv", "addr", "mv", "einsum", "chain_matmul", "multi_dot", "prelu",
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "conv_tbc", "scaled_dot_product_attention",
})
_FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus",
    "layer_norm", "group_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss",
    "nll_loss", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss",
    "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss",
    "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp",
    # composite of log_softmax and nll_loss, both fp32 on CUDA
    "cross_entropy",
})
_FP32_SET_OPT_DTYPE = frozenset({
    "prod", "softmax", "log_softmax", "cumprod", "cumsum", "sum", "vector_norm", "matrix_norm",
})
_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


class CudaKernels(TorchFunctionMode):
    """Run a model on CPU fake tensors as CUDA would: its autocast policy and its SDPA kernels.

    Args:
        autocast_dtype: the CUDA autocast dtype (``torch.bfloat16``/``torch.float16``), or
            ``None`` when autocast is off.
    """

    def __init__(self, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.autocast_dtype = autocast_dtype
        self._weight_cache: dict[int, torch.Tensor] | None = {}

    def leave_autocast(self) -> None:
        """Drop the cast weights and stop caching, as leaving the outermost autocast region does.

        A recomputation under gradient checkpointing re-enters autocast for one block and leaves
        it again, so its casts live only as long as autograd holds them.
        """
        self._weight_cache = None

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.autocast_dtype is not None:
            if name in _LOWER_PRECISION:
                args, kwargs = self._cast_all(args, kwargs, self.autocast_dtype)
            elif name in _FP32 or (name in _FP32_SET_OPT_DTYPE and kwargs.get("dtype") is None):
                args, kwargs = self._cast_all(args, kwargs, torch.float32, low_only=True)
        if name == "scaled_dot_product_attention":
            return cuda_sdpa(*args, **kwargs)
        if name.startswith("fft_") and args and isinstance(args[0], torch.Tensor) \
                and args[0].dtype == torch.bfloat16:
            raise UnsupportedModelError(
                f"torch.fft.{name.removeprefix('fft_')} of a bfloat16 tensor: a CUDA GPU has no "
                "bfloat16 FFT (cuFFT takes fp32, fp64 and fp16 at power-of-two sizes) and CUDA "
                "autocast does not cast FFTs, so this model cannot train in bf16; estimate it "
                "with precision='fp32'"
            )
        if name == "dropout":
            return _fused_dropout(func, args, kwargs)
        if name in ("grouped_mm", "_grouped_mm") and _needs_grouped_fallback(args, kwargs):
            return _GroupedMatmul.apply(args[0], args[1])  # type: ignore[no-untyped-call]
        return func(*args, **kwargs)

    def _cast(self, value: Any, dtype: torch.dtype, low_only: bool) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype, low_only) for v in value)
        if not isinstance(value, torch.Tensor) or value.dtype not in _ELIGIBLE or value.dtype == dtype:
            return value
        if low_only and value.dtype == torch.float32:
            return value
        if value.is_leaf and value.requires_grad and self._weight_cache is not None:  # weight cache
            key = id(value)
            if key not in self._weight_cache:
                self._weight_cache[key] = value.to(dtype)
            return self._weight_cache[key]
        return value.to(dtype)

    def _cast_all(self, args: tuple[Any, ...], kwargs: dict[str, Any], dtype: torch.dtype,
                  low_only: bool = False) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (
            tuple(self._cast(a, dtype, low_only) for a in args),
            {k: self._cast(v, dtype, low_only) for k, v in kwargs.items()},
        )


def _fused_dropout(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``F.dropout`` as CUDA runs it: the fused ``native_dropout``, which saves a bool mask.

    On CPU, ``at::dropout`` takes the composite path (a mask of the input's dtype, multiplied
    in), which saves 2-4 times more; CUDA takes ``native_dropout`` (``Dropout.cpp``,
    ``is_fused_kernel_acceptable``).
    """
    names = ("input", "p", "training", "inplace")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    x, p = bound.get("input"), bound.get("p", 0.5)
    fused = bound.get("training", True) and not bound.get("inplace", False)
    if isinstance(x, torch.Tensor) and fused and 0 < p < 1:
        return torch.native_dropout(x, p, True)[0]
    return func(*args, **kwargs)


def _needs_grouped_fallback(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """A non-bf16 grouped matmul, which the fake kernel of ``torch._grouped_mm`` rejects."""
    if len(args) < 2 or kwargs.get("bias") is not None or kwargs.get("out_dtype") is not None:
        return False
    a, b = args[0], args[1]
    return bool(a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16)


class _GroupedMatmul(torch.autograd.Function):
    """Memory stand-in for ``torch._grouped_mm(a, b, offs)`` in fp32/fp16 (2-D ``a``, 3-D ``b``).

    A GPU runs these dtypes through a per-group loop of matmuls (PyTorch's grouped-mm fallback)
    whose output is ``[a.shape[0], b.shape[-1]]`` and whose autograd formula, like every native
    one, saves ``b`` only when ``a`` needs a gradient and ``a`` only when ``b`` does. The values
    are irrelevant on fake tensors, so this allocates what that op allocates and nothing else.
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(b if ctx.needs_input_grad[0] else None, a if ctx.needs_input_grad[1] else None)
        ctx.shapes = (a.shape, b.shape)
        return a.new_empty((a.shape[0], b.shape[-1]))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a_shape, b_shape = ctx.shapes
        grad_a = grad.new_empty(a_shape) if ctx.needs_input_grad[0] else None
        grad_b = grad.new_empty(b_shape) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def sdpa_backend(
    query: torch.Tensor, key: torch.Tensor, has_mask: bool, enable_gqa: bool,
    value: torch.Tensor | None = None,
) -> str:
    """The kernel a CUDA GPU (sm80+) picks for ``scaled_dot_product_attention``.

    Flash attention needs one head size for query, key and value
    (``check_head_dim_size_flash``); the memory-efficient kernel allows a value head size of
    its own (DeepSeek's multi-head latent attention: 192 for query/key, 128 for value).

    Both fused kernels need query, key and value of one batch size
    (``check_batch_size_and_num_heads_dense``); a query broadcast over a batch of keys (Granite
    Speech's Q-Former: one set of learned queries for every window) takes the math kernel.

    Returns:
        ``"flash"``, ``"efficient"`` or ``"math"`` (PyTorch's ``sdp_utils.cpp`` order).
    """
    batches = {query.shape[0], key.shape[0]} | ({value.shape[0]} if value is not None else set())
    if query.dim() == 4 and len(batches) > 1:
        return "math"
    head_dim = query.shape[-1]
    same_dims = head_dim == key.shape[-1] and (value is None or value.shape[-1] == head_dim)
    gqa = enable_gqa and key.shape[-3] != query.shape[-3]
    flash_dtype = query.dtype in (torch.float16, torch.bfloat16)
    if flash_dtype and not has_mask and head_dim <= 256 and same_dims:
        return "flash"
    if not gqa and head_dim % (8 if query.dtype != torch.float32 else 4) == 0:
        return "efficient"
    return "math"


def cuda_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` through the kernel a CUDA GPU would run."""
    backend = sdpa_backend(query, key, attn_mask is not None, enable_gqa, value)
    if backend == "flash":
        out: torch.Tensor = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale
        )[0]
        return out
    if backend == "efficient":
        bias = attn_mask
        if bias is not None:
            if bias.dtype == torch.bool:  # sdp::convert_boolean_attn_mask
                bias = torch.where(bias.logical_not(), float("-inf"), 0.0).to(query.dtype)
            shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
            bias = bias.expand(shape)
        needs_grad = any(t.requires_grad for t in (query, key, value))
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, needs_grad, dropout_p, is_causal, scale=scale
        )[0]
        return out
    out = torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa
    )[0]
    return out


def flash_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface for ``flash_attention_2`` and ``flex_attention``, as
    the GPU kernels allocate: no score matrix and no mask; key and value heads stay grouped
    (flash-attn takes grouped-query heads natively, no ``repeat_kv``); the kernel saves query,
    key, value, output and the fp32 log-sum-exp, as the flash kernel of SDPA does, whose memory
    the fake kernel reproduces (output in the query's layout). Sliding windows and soft-capping
    are done inside the kernel and allocate nothing. Returns ``(output, None)`` with the output
    as ``(batch, seq, heads, head_dim)``, as transformers' flash and flex functions return it.
    """
    causal = bool(getattr(module, "is_causal", True)) and query.shape[2] > 1
    out = torch.ops.aten._scaled_dot_product_flash_attention(
        query, key, value, dropout, causal, False, scale=scaling
    )[0]
    return out.transpose(1, 2), None
