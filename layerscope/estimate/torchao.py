"""torchao's NF4 base (``NF4Tensor``) as torchtune's single-device QLoRA recipe builds and
loads it on the GPU, without torchao: what each layer keeps, and every allocation and free of
the build, for the caching-allocator simulation.

Read from torchao's ``torchao/dtypes/nf4tensor.py`` at the tags v0.1 (2024-04-04), v0.2.0
(2024-05-20) and v0.3.0 (2024-06-12); later releases quantize as 0.3 does (the file moved to
``torchao/quantization/quantize_/workflows/nf4/nf4_tensor.py`` unchanged in what is modelled).
Two changes matter for memory:

* pytorch/ao #196 ("perform in chunks", 2024-05-01, first in 0.2.0): ``quantize_tensor_nearest``
  compares every element with the 16 NF4 values, ``(value.unsqueeze(-1) - nf4).abs()``: two
  ``numel x 16`` bf16 temporaries (32 bytes per element each), which 0.1 makes for the whole
  weight at once (1.44 GB each for an 11008 x 4096 MLP weight) and 0.2 for
  :data:`CHUNK_ELEMENTS` at a time;
* pytorch/ao #298 (2024-05-31, first in 0.3.0): ``quantization_factor`` is made contiguous;
  before, the stored tensor was a strided view ``[:, 0]`` of a tensor with one bf16 value per
  64-element block, which it kept alive.

torchtune's recipe (``recipes/lora_finetune_single_device.py`` with
``torchtune/models/llama2/_component_builders.py``, ``torchtune/modules/peft/lora.py``,
``torchtune/modules/transformer.py`` and ``torchtune/utils/_register_nf4_dispatch_ops.py`` at
commit 0914d5cfb, the QLoRA tutorial's) builds the model under the GPU device context, so:

1. one template block: each ``LoRALinear`` makes an ``nn.Linear`` weight in the recipe's dtype
   and quantizes it with ``to_nf4`` on the GPU (the bf16 weight is dropped with the local
   ``nn.Linear``); the block's other parameters as made;
2. the embedding, final norm and output projection (arguments of ``TransformerDecoder``);
3. ``_get_clones``: ``copy.deepcopy`` of the template per block; a parameter's deepcopy
   clones it, and torchtune's ``clone`` for an ``NF4Tensor`` is
   ``to_nf4(weight.get_original_weight())``: dequantized (:func:`dequantize_ops`) and
   quantized again; the template is freed when the builder returns;
4. ``load_state_dict``: torchtune's ``copy_`` for an ``NF4Tensor`` moves the checkpoint tensor
   to the GPU in the checkpoint's dtype, ``to_nf4`` converts it to bf16 and quantizes it, and
   the layer's five tensors are replaced (the old ones freed, in attribute order); other
   parameters are copied in place (a CPU-to-GPU copy converts on the host: nothing on the GPU).

The step: ``linear_nf4`` (``LinearNF4``) dequantizes the whole weight with
``get_original_weight`` before the forward matmul and again before the input-gradient matmul,
and saves no activation (:class:`LinearNF4`, a stand-in for the traced step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from layerscope.compat import no_function_modes
from layerscope.errors import EstimateError
from layerscope.estimate.allocator import Op
from layerscope.estimate.quant import LayerStorage
from layerscope.estimate.trace import rounded
from layerscope.quantization import Quantization

BLOCK_SIZE = 64
"""Elements per NF4 block, one scaler each (``to_nf4``'s ``block_size`` default, torchtune's)."""

SCALER_BLOCK_SIZE = 256
"""Scalers per second-level block (``to_nf4``'s ``scaler_block_size`` default)."""

NF4_VALUES = 16
"""Entries of the NF4 table, bf16 (``from_tensor`` makes one per layer on its device)."""

CHUNK_ELEMENTS = 1024**2
"""Elements quantized at a time from torchao 0.2 (``CHUNK_SIZE``, pytorch/ao #196)."""

COMPARE_BYTES = 2 * NF4_VALUES
"""Bytes per element of each ``numel x 16`` bf16 temporary of ``quantize_tensor_nearest``."""


def _sizes(n: int) -> tuple[int, int]:
    """(blocks, scaler blocks) of an ``n``-element weight; torchao asserts both divide."""
    if n <= 0 or n % (BLOCK_SIZE * SCALER_BLOCK_SIZE):
        raise EstimateError(
            f"library='torchao': a weight of {n} elements cannot be quantized; NF4Tensor needs "
            f"a multiple of {BLOCK_SIZE} x {SCALER_BLOCK_SIZE} = {BLOCK_SIZE * SCALER_BLOCK_SIZE} "
            "elements (whole blocks of whole scaler blocks)"
        )
    blocks = n // BLOCK_SIZE
    return blocks, blocks // SCALER_BLOCK_SIZE


def nf4_storage(q: Quantization, n_out: int, n_in: int) -> LayerStorage:
    """What an ``NF4Tensor`` keeps for an ``n_out x n_in`` weight, in ``__init__``'s order
    less the table: ``quantized_data`` (two 4-bit indices per byte; the layer's "weight"),
    ``quantized_scalers`` (int8, one per block), ``quantization_factor`` (bf16, one per scaler
    block; before 0.3 the whole per-block tensor it is a view of), ``scaler_mean`` (a 0-dim
    bf16), ``nf4`` (the 16-entry bf16 table).

    Raises:
        EstimateError: a weight whose elements are not whole blocks of whole scaler blocks.
    """
    n = n_out * n_in
    blocks, scaler_blocks = _sizes(n)
    factor = scaler_blocks if q.torchao_release >= (0, 3) else blocks
    return LayerStorage((
        ("weight", n // 2), ("quantized_scalers", blocks), ("quantization_factor", 2 * factor),
        ("scaler_mean", 2), ("nf4", 2 * NF4_VALUES),
    ))


class OpRecorder:
    """Allocations and frees in order, as :data:`~layerscope.estimate.allocator.Op` s; a
    handle is the position of its allocation (unique)."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def new(self, nbytes: int) -> int:
        """Allocate ``nbytes`` (allocator-rounded here) and return its handle."""
        self.ops.append((len(self.ops), rounded(nbytes)))
        return self.ops[-1][0]

    def free(self, *handles: int) -> None:
        """Free ``handles``, in the order given."""
        self.ops.extend((h, 0) for h in handles)


def quantize_ops(rec: OpRecorder, q: Quantization, n: int) -> tuple[int, ...]:
    """``NF4Tensor.from_tensor`` of a resident bf16 weight of ``n`` elements: its allocations
    and frees, recorded in ``rec``. Returns the handles kept, in :func:`nf4_storage`'s order
    (``quantized_data`` first).

    The statements, in order: the NF4 table; ``double_quantize_scalers``: ``get_block_absmax``
    (``abs()`` of the weight, then ``max(dim=1)``: values and int64 indices), the mean, the
    scalers less it, their own absmax per scaler block, ``256 / (2 * absmax)`` over the
    broadcast shape (one value per block), the scaled, rounded and clamped scalers, cast to
    int8; ``convert_to_norm_float_weight``: the absmax again, the scaled blocks (bf16, one per
    element), ``quantize_tensor_nearest`` (``value - nf4``, ``.abs()``: ``numel x 16`` bf16
    each; ``min(dim=-1)``: bf16 values and int64 indices) over the whole weight (before 0.2)
    or per :data:`CHUNK_ELEMENTS` into a uint8 buffer (0.2 on), then the two-per-byte packing
    (``<< 4`` and ``|`` over half the indices, int64 before 0.2, then cast to uint8).
    """
    blocks, scaler_blocks = _sizes(n)
    release = q.torchao_release
    table = rec.new(2 * NF4_VALUES)
    # double_quantize_scalers
    absolute = rec.new(2 * n)
    values, indices = rec.new(2 * blocks), rec.new(8 * blocks)
    rec.free(absolute, indices)
    mean = rec.new(2)
    centred = rec.new(2 * blocks)
    rec.free(values)
    absolute = rec.new(2 * blocks)
    scaler_absmax, indices = rec.new(2 * scaler_blocks), rec.new(8 * scaler_blocks)
    rec.free(absolute, indices)
    doubled = rec.new(2 * blocks)
    factor_full = rec.new(2 * blocks)
    rec.free(doubled)
    scaled = rec.new(2 * blocks)
    rounded_ = rec.new(2 * blocks)
    rec.free(scaled)
    clamped = rec.new(2 * blocks)
    rec.free(rounded_)
    scalers = rec.new(blocks)  # .to(torch.int8)
    factor = factor_full
    if release >= (0, 3):  # quantization_factor.view(n_scaler_blocks).contiguous()
        factor = rec.new(2 * scaler_blocks)
    rec.free(clamped, centred, scaler_absmax)  # the function's locals
    if factor is not factor_full:
        rec.free(factor_full)
    # convert_to_norm_float_weight
    absolute = rec.new(2 * n)
    block_absmax, indices = rec.new(2 * blocks), rec.new(8 * blocks)
    rec.free(absolute, indices)
    scaled_blocks = rec.new(2 * n)
    if release < (0, 2):
        nearest = _nearest(rec, n)
        high = rec.new(4 * n)  # quantized_blocks[::2] << 4, int64
        packed_long = rec.new(4 * n)  # ... | quantized_blocks[1::2]
        rec.free(high)
        data = rec.new(n // 2)  # combined_blocks.to(torch.uint8)
        rec.free(packed_long, nearest)
    else:
        buffer = rec.new(n)  # torch.empty(numel, dtype=torch.uint8)
        for start in range(0, n, CHUNK_ELEMENTS):
            chunk = min(CHUNK_ELEMENTS, n - start)
            nearest = _nearest(rec, chunk)
            as_uint8 = rec.new(chunk)
            rec.free(nearest, as_uint8)
        high = rec.new(n // 2)
        data = rec.new(n // 2)  # the uint8 packing; .to(torch.uint8) returns it
        rec.free(high, buffer)
    rec.free(scaled_blocks, block_absmax)
    return data, scalers, factor, mean, table


def _nearest(rec: OpRecorder, n: int) -> int:
    """``quantize_tensor_nearest`` over ``n`` elements; returns the int64 indices' handle."""
    difference = rec.new(COMPARE_BYTES * n)
    absolute = rec.new(COMPARE_BYTES * n)
    rec.free(difference)
    values, indices = rec.new(2 * n), rec.new(8 * n)
    rec.free(values, absolute)
    return indices


def dequantize_ops(rec: OpRecorder, n: int) -> int:
    """``NF4Tensor.get_original_weight`` of an ``n``-element weight (the same in 0.1 to 0.3):
    the high and low 4-bit indices (``>> 4``, ``& 0b1111``: uint8, then int64), each looked up
    in the table (bf16), the scalers dequantized (int8 over bf16 factors, plus the mean), each
    half scaled by the scalers repeated per element (a materialised ``flatten()`` of an
    expanded view, then the product), and the halves stacked. Returns the bf16 weight's
    handle; the function's locals are freed when it returns."""
    blocks, _ = _sizes(n)
    shifted = rec.new(n // 2)
    high = rec.new(4 * n)
    rec.free(shifted)
    masked = rec.new(n // 2)
    low = rec.new(4 * n)
    rec.free(masked)
    first, second = rec.new(n), rec.new(n)
    divided = rec.new(2 * blocks)
    scalers = rec.new(2 * blocks)
    rec.free(divided)
    halves = []
    for _ in range(2):
        repeated = rec.new(n)
        halves.append(rec.new(n))
        rec.free(repeated)
    weight = rec.new(2 * n)
    rec.free(high, low, first, second, scalers, *halves)
    return weight


def dequantize_bytes(n: int) -> tuple[float, float]:
    """(DRAM bytes read and written, kernels) of :func:`dequantize_ops`' kernels for an
    ``n``-element weight: the shift and the mask (read n/2, write n/2, each) and their int64
    casts (read n/2, write 4n), the two table lookups (read 4n of indices, write n), the
    scalers (int8 over bf16, plus the mean: small), the two repeated scalers (write n each;
    their reads are per block) and products (read 2n, write n), the stack (read and write
    2n)."""
    blocks, _ = _sizes(n)
    halves = 2 * (n // 2 + n // 2) + 2 * (n // 2 + 4 * n) + 2 * (4 * n + n)
    halves += 2 * (2 * blocks + n) + 2 * (2 * n + n)
    scalers = blocks + 2 * 2 * blocks + 2 * 2 * blocks
    return float(halves + scalers + 2 * n + 2 * n), 13.0


def torchtune_build_ops(
    rec: OpRecorder,
    q: Quantization,
    blocks: Sequence[Sequence[tuple[int, int]]],
    others: Sequence[int],
    buffers: Sequence[int],
    checkpoint: torch.dtype,
) -> None:
    """Record torchtune's build and load of a model with a torchao NF4 base (the module
    docstring's steps 1 to 4) in ``rec``.

    Args:
        q: the quantization (``library="torchao"``).
        blocks: per block, its parameters in order: ``(elements, 0)`` for a quantized weight,
            ``(0, bytes)`` for any other parameter (as kept). The first block is the template.
        others: bytes of the parameters outside the blocks (embedding, final norm, head).
        buffers: bytes of the buffers, made after the model (small).
        checkpoint: the dtype of the checkpoint's tensors (what ``.to(device)`` copies to the
            GPU before ``to_nf4`` casts it to bf16, a copy unless it is bf16).
    """

    def build(params: Sequence[tuple[int, int]], source: Sequence[tuple[int, ...]] | None
              ) -> list[tuple[int, ...]]:
        made: list[tuple[int, ...]] = []
        for n, nbytes in params:
            if not n:
                made.append((rec.new(nbytes),))
                continue
            if source is None:  # nn.Linear's weight, then to_nf4 of it
                weight = rec.new(2 * n)
            else:  # deepcopy: to_nf4(template.get_original_weight())
                weight = dequantize_ops(rec, n)
            made.append(quantize_ops(rec, q, n))
            rec.free(weight)
        return made

    if not blocks:
        raise EstimateError("internal: torchtune's build needs at least one block")
    template = build(blocks[0], None)
    for nbytes in others:
        rec.new(nbytes)
    layers = [build(params, template) for params in blocks]
    rec.free(*(h for tensors in template for h in tensors))
    for nbytes in buffers:
        rec.new(nbytes)
    for params, made in zip(blocks, layers):
        for i, (n, _) in enumerate(params):
            if not n:
                continue
            copied = rec.new(checkpoint.itemsize * n)
            converted = rec.new(2 * n) if checkpoint != torch.bfloat16 else None
            fresh = quantize_ops(rec, q, n)
            if converted is not None:
                rec.free(converted)
            rec.free(copied)
            data, scalers, factor, mean, table = made[i]
            rec.free(scalers, factor, mean, data, table)  # torchtune's attribute order
            made[i] = fresh


# -- the step ---------------------------------------------------------------------------------
def _original_weight(n_out: int, n_in: int) -> torch.Tensor:
    """``get_original_weight`` on fake tensors: :func:`dequantize_ops`' allocations and frees;
    returns the bf16 weight."""
    n = n_out * n_in
    blocks = n // BLOCK_SIZE
    shifted = torch.empty((n // 2,), dtype=torch.uint8)
    high = torch.empty((n // 2,), dtype=torch.int64)
    del shifted
    masked = torch.empty((n // 2,), dtype=torch.uint8)
    low = torch.empty((n // 2,), dtype=torch.int64)
    del masked
    first, second = torch.empty((n // 2,), dtype=torch.bfloat16), torch.empty((n // 2,), dtype=torch.bfloat16)
    divided = torch.empty((blocks,), dtype=torch.bfloat16)
    scalers = torch.empty((blocks,), dtype=torch.bfloat16)
    del divided
    halves = []
    for _ in range(2):
        repeated = torch.empty((n // 2,), dtype=torch.bfloat16)
        halves.append(torch.empty((n // 2,), dtype=torch.bfloat16))
        del repeated
    weight = torch.empty((n_out, n_in), dtype=torch.bfloat16)
    del high, low, first, second, scalers, halves
    return weight


class _LinearNF4Function(torch.autograd.Function):
    """torchao's ``LinearNF4``: ``F.linear(input, weight.to(input.dtype))``; backward
    ``grad_output @ weight.to(grad_output.dtype)``; only the NF4 weight is kept (a ctx
    attribute, already resident)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, shape: tuple[int, int]
                ) -> torch.Tensor:
        ctx.shape = shape
        weight = _original_weight(*shape)
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        with no_function_modes():  # a custom function's backward runs outside autocast
            if not ctx.needs_input_grad[0]:
                return None, None, None
            weight = _original_weight(*ctx.shape)
            if weight.dtype != grad.dtype:
                weight = weight.to(grad.dtype)
            return torch.matmul(grad, weight), None, None


class LinearNF4(nn.Module):
    """Stand-in for a frozen linear whose weight is a torchao ``NF4Tensor`` (torchtune's
    ``LoRALinear(quantize_base=True)`` base): the packed weight as a uint8 buffer (counted
    with the model's weights, not by the trace), the step as :class:`_LinearNF4Function`."""

    def __init__(self, n_in: int, n_out: int, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.register_buffer(
            "weight", torch.empty((n_out * n_in // 2, 1), dtype=torch.uint8, device="meta"))
        self.bias = bias
        self.shape = (n_out, n_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _LinearNF4Function.apply(x, self.bias, self.shape)  # type: ignore[no-untyped-call]
        return out
