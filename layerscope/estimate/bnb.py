"""bitsandbytes' quantized layers emulated on fake tensors, for the traced step.

bitsandbytes is not needed (nor importable on a machine without a GPU): the reduced copy of the
model gets stand-ins for ``Linear4bit`` and ``Linear8bitLt`` that allocate, keep and free what
the real layers allocate, keep and free on a CUDA GPU, read from bitsandbytes 0.50.1:

* ``Linear4bit.forward`` casts the input to the compute dtype and calls ``matmul_4bit``; for a
  training-size input (more than :data:`FUSED_4BIT_MAX_TOKENS` rows) the CUDA ``gemm_4bit`` op
  takes ``_dequant_linear_fallback``: the absmax dequantised to fp32 (two fp32 copies under
  double quantisation), the whole weight dequantised to the input's dtype, ``F.linear`` (under
  autocast, as the real one runs), the weight freed. ``MatMul4Bit`` saves no activation: only
  the packed weight (already resident) and its state. Its backward dequantises the weight again,
  to the dtype it was loaded in (``quant_state.dtype``), casts it to the gradient's dtype when
  they differ, and multiplies; no weight gradient (the weights are frozen).
* ``Linear8bitLt`` (``MatMul8bitLt``, CUDA path): the input cast to fp16, its absolute value
  and outlier mask (threshold > 0), the int8 row-quantised input and its fp32 row scales, the
  int32 product, the fp16 dequantised output (cast to the input's dtype); it keeps the input
  (and the outlier columns, assumed none) as attributes of its autograd context, so until the
  graph is freed (saved-tensor hooks, hence non-reentrant checkpointing, do not see them); its
  backward dequantises the int8 weight to the input's dtype and multiplies.
* peft's LoRA layers on them (``peft/tuners/lora/bnb.py``): the base output is cloned (4-bit
  only, "defensively"), and the adapter input is cast to the adapter dtype only when autocast
  is off.

The stand-ins carry the packed weight as a buffer of the real dtype and shape (so
``module.weight.dtype`` is what it is on a GPU); the quantisation state is not materialised
(it is counted once, from :mod:`layerscope.estimate.quant`, with the full model's weights).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerscope.compat import no_function_modes
from layerscope.quantization import BLOCKSIZE_4BIT, Quantization

FUSED_4BIT_MAX_TOKENS = 4
"""Rows (tokens) up to which ``gemm_4bit`` always runs bitsandbytes' fused kernel, which
dequantises inside the GEMM and allocates only its output (``_GEMM_4BIT_CUSTOM_FLOOR_M``). Above
it the choice depends on the GPU and shape (``_gemm_4bit_use_custom_cuda``; always the
dequantise-and-``F.linear`` fallback past 1536 rows, and on H100/H200 past 64 rows for large
weights); a step of a fine-tuning run is far past it, and the fallback is assumed there."""


@dataclass(frozen=True)
class _Spec:
    """What the emulated matmul needs of one quantized layer."""

    n_out: int
    n_in: int
    blocks: int  # absmax values (4-bit)
    nested: bool  # double quantisation
    loaded_dtype: torch.dtype  # quant_state.dtype: the dtype the weight was loaded in
    threshold: float  # LLM.int8 outlier threshold


class _MatMul4Bit(torch.autograd.Function):
    """``MatMul4Bit`` with the CUDA ``gemm_4bit`` fallback, allocating as it does."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, bias: torch.Tensor | None, spec: _Spec) -> torch.Tensor:
        ctx.spec = spec
        rows = a.numel() // max(a.shape[-1], 1)
        if rows <= FUSED_4BIT_MAX_TOKENS:  # the fused kernel: only the output
            return a.new_empty((*a.shape[:-1], spec.n_out))
        # _dequant_linear_fallback: under double quantisation the uint8 absmax dequantised to
        # fp32, then "+ offset" into a second fp32 tensor; both live until it returns
        absmax = [torch.empty((spec.blocks,), dtype=torch.float32)] if spec.nested else []
        absmax += [absmax[0] + 1.0] if spec.nested else []
        weight = torch.empty((spec.n_out, spec.n_in), dtype=a.dtype)
        out = torch.nn.functional.linear(a, weight, bias)
        del weight, absmax
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        with no_function_modes():  # a custom function's backward runs outside autocast
            return _MatMul4Bit._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        spec: _Spec = ctx.spec
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # dequantize_4bit: the absmax dequantised to fp32 (offset added in place), the weight in
        # the dtype it was loaded in; the absmax dies when it returns
        absmax = torch.empty((spec.blocks,), dtype=torch.float32).add_(1.0) if spec.nested else None
        weight = torch.empty((spec.n_out, spec.n_in), dtype=spec.loaded_dtype)
        del absmax
        if weight.dtype != grad.dtype:
            weight = weight.to(grad.dtype)
        return torch.matmul(grad, weight), None, None


class Linear4bit(nn.Module):
    """Stand-in for bitsandbytes ``Linear4bit`` (forward as in 0.50.1)."""

    def __init__(self, n_in: int, n_out: int, bias: nn.Parameter | None, q: Quantization,
                 compute_dtype: torch.dtype, loaded_dtype: torch.dtype,
                 as_parameter: bool = False) -> None:
        super().__init__()
        item = q.storage.itemsize
        n = n_out * n_in
        packed = torch.empty(((n + 1) // (2 * item), 1), dtype=q.storage, device="meta")
        if as_parameter:  # Params4bit is a frozen parameter: FSDP shards and gathers it
            self.weight = nn.Parameter(packed, requires_grad=False)
        else:
            self.register_buffer("weight", packed)
        self.bias = bias
        self.compute_dtype = compute_dtype
        self.spec = _Spec(n_out, n_in, -(-n // BLOCKSIZE_4BIT), q.double_quant, loaded_dtype, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        x = x.to(self.compute_dtype)
        out: torch.Tensor = _MatMul4Bit.apply(x, self.bias, self.spec)  # type: ignore[no-untyped-call]
        return out.to(inp_dtype)


class _MatMul8bitLt(torch.autograd.Function):
    """``MatMul8bitLt`` (CUDA, frozen int8 weight ``CB`` with row scales ``SCB``)."""

    @staticmethod
    def forward(ctx: Any, a_in: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor,
                bias: torch.Tensor | None, spec: _Spec) -> torch.Tensor:
        shape = a_in.shape
        a = a_in.reshape(-1, shape[-1]) if a_in.dim() == 3 else a_in
        rows = a.shape[0]
        # int8_vectorwise_quant(A.to(float16)): row scales and int8 rows first, then the
        # outlier search (|A| >= threshold, which columns); the fp16 copy dies on return
        half = a.to(torch.float16)
        row_stats = torch.empty((rows,), dtype=torch.float32)
        quantized = torch.empty((rows, shape[-1]), dtype=torch.int8)
        if spec.threshold > 0.0:
            mask = half.abs() >= spec.threshold
            mask.any(dim=0)
            del mask
        del half
        outlier_inputs = a.new_empty((0,))  # int8_mixed_scaled_mm's subA: no outliers assumed
        # int8_scaled_mm: the int32 product, dequantised to fp16 (bias added in place), then
        # cast to the input's dtype while the product still exists
        product = torch.empty((rows, spec.n_out), dtype=torch.int32)
        out = torch.empty((rows, spec.n_out), dtype=torch.float16)
        if out.dtype != a.dtype:
            out = out.to(a.dtype)
        del product, quantized, row_stats
        # bitsandbytes keeps the input (and outlier columns) as ctx attributes, not saved
        # tensors: alive until the graph is freed, also under non-reentrant checkpointing
        ctx.kept = (outlier_inputs, a, weight, scb)
        ctx.spec, ctx.shape, ctx.dtype_a = spec, shape, a.dtype
        return out.reshape(*shape[:-1], spec.n_out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        with no_function_modes():  # a custom function's backward runs outside autocast
            return _MatMul8bitLt._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        _, _, cb, scb = ctx.kept
        if grad.dim() == 3:
            grad = grad.reshape(-1, grad.shape[-1]).contiguous()
        # CB.to(dtype_A, copy=True).mul_(SCB.unsqueeze(1).mul(1 / 127))
        weight = cb.to(ctx.dtype_a, copy=True)
        weight.mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
        grad_a = torch.matmul(grad.to(ctx.dtype_a), weight).view(ctx.shape)
        return grad_a, None, None, None, None


class Linear8bitLt(nn.Module):
    """Stand-in for bitsandbytes ``Linear8bitLt`` (``has_fp16_weights=False``, as transformers
    loads it): the int8 weight and its fp32 row scales as buffers."""

    def __init__(self, n_in: int, n_out: int, bias: nn.Parameter | None, q: Quantization,
                 loaded_dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty((n_out, n_in), dtype=torch.int8, device="meta"))
        self.register_buffer("SCB", torch.empty((n_out,), dtype=torch.float32, device="meta"))
        self.bias = bias
        self.spec = _Spec(n_out, n_in, 0, False, loaded_dtype, float(q.int8_threshold))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the bias (cast to the input's dtype once, on the first forward) is added in place
        out: torch.Tensor = _MatMul8bitLt.apply(  # type: ignore[no-untyped-call]
            x, self.weight, self.SCB, self.bias, self.spec)
        return out


def _lora_forward(autocast: bool, clone: bool) -> Callable[..., torch.Tensor]:
    """peft's ``lora.bnb.Linear4bit``/``Linear8bitLt`` forward (vanilla LoRA, one adapter set).

    ``torch.is_autocast_enabled()`` there is the CUDA autocast state, which the trace emulates
    without entering it: ``autocast`` says whether the step runs under it.
    """

    def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        if clone:
            result = result.clone()
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            dropout, scaling = self.lora_dropout[name], self.scaling[name]
            if not autocast:
                expected = result.dtype
                x = self._cast_input_dtype(x, lora_a.weight.dtype)
            output = lora_b(lora_a(dropout(x))) * scaling
            if not autocast:
                output = output.to(expected)
            result = result + output
        return result

    return forward


def quantize_copy(
    model: nn.Module, names: Iterable[str], q: Quantization, *, compute_dtype: torch.dtype,
    loaded_dtype: torch.dtype, autocast: bool, packed_parameters: bool = False,
) -> set[int]:
    """Replace the modules ``names`` of ``model`` (a reduced copy: ``nn.Linear``/``Conv1D``, or
    peft's LoRA layer wrapping one) by the stand-ins (a torchao base: ``LinearNF4`` of
    :mod:`layerscope.estimate.torchao`). Returns the ids of their bias parameters
    (bitsandbytes casts a bias to the input's dtype on the first forward and keeps it so).
    ``packed_parameters``: a 4-bit stand-in's packed weight is a frozen parameter, as
    ``Params4bit`` is, for a trace where FSDP shards and gathers it (else a buffer: the one-GPU
    trace never reads it)."""
    biases: set[int] = set()
    for name in names:
        module = model.get_submodule(name)
        wrapper: Any = module if hasattr(module, "base_layer") else None
        base: Any = wrapper.get_base_layer() if wrapper is not None else module
        shape = tuple(base.weight.shape)
        n_out, n_in = shape if type(base) is nn.Linear else shape[::-1]
        bias: nn.Parameter | None = base.bias
        if bias is not None:
            biases.add(id(bias))
        stand_in: nn.Module
        if q.library == "torchao":
            from layerscope.estimate.torchao import LinearNF4

            stand_in = LinearNF4(n_in, n_out, bias)  # one GPU only (setup refuses sharding)
        elif q.four_bit:
            stand_in = Linear4bit(n_in, n_out, bias, q, compute_dtype, loaded_dtype,
                                  packed_parameters)
        else:
            stand_in = Linear8bitLt(n_in, n_out, bias, q, loaded_dtype)
        if wrapper is not None:
            wrapper.base_layer = stand_in
            clone = q.four_bit and q.library == "bitsandbytes"  # torchtune's LoRALinear: none
            wrapper.forward = types.MethodType(_lora_forward(autocast, clone), wrapper)
        else:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, stand_in)
    return biases
