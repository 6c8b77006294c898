"""What a bitsandbytes-quantized base stores on the GPU, tensor by tensor, without bitsandbytes.

From bitsandbytes 0.50.1's source (the arithmetic is unchanged since 0.43): the CUDA
``quantize_4bit`` op and ``functional.quantize_4bit`` for ``Params4bit``
(:func:`linear4bit_storage`), ``Int8Params`` for ``Linear8bitLt`` (:func:`linear8bit_storage`),
summed over the modules transformers quantizes (:func:`quantized_base`, with
:func:`layerscope.quantization.quantized_modules`), and transformers' ``get_memory_footprint()``
of such a model (:func:`memory_footprint`). The step itself (dequantisation temporaries, what
the 4-bit matmul saves) is traced with the emulated layers of :mod:`layerscope.estimate.bnb`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layerscope.estimate.trace import rounded
from layerscope.quantization import (
    BLOCKSIZE_4BIT,
    CODE_4BIT_ENTRIES,
    CODE_8BIT_ENTRIES,
    NESTED_BLOCKSIZE,
    Quantization,
    quantized_modules,
)


# -- storage of one layer -------------------------------------------------------------------
@dataclass(frozen=True)
class LayerStorage:
    """The GPU tensors of one quantized layer, in bytes as allocated (before allocator rounding).

    Attributes:
        tensors: ``(name, bytes)``: ``weight`` (the packed or int8 weight, the module's
            parameter) first, then the quantisation state (``absmax``, ``code``, ``offset``,
            ``state2.absmax``, ``state2.code``; ``SCB`` for int8).
    """

    tensors: tuple[tuple[str, int], ...]

    @property
    def weight_bytes(self) -> int:
        """The parameter's bytes: what ``get_memory_footprint()`` counts for the layer."""
        return self.tensors[0][1]

    @property
    def state_bytes(self) -> int:
        """The quantisation state's bytes (not a parameter or buffer of the module)."""
        return sum(b for _, b in self.tensors[1:])

    @property
    def allocated_bytes(self) -> int:
        """Every tensor rounded as the CUDA caching allocator rounds it (512 bytes at least)."""
        return sum(rounded(b) for _, b in self.tensors)


def linear4bit_storage(
    n_out: int, n_in: int, *, double_quant: bool, quant_storage: torch.dtype = torch.uint8,
    blocksize: int = BLOCKSIZE_4BIT,
) -> LayerStorage:
    """What ``Params4bit`` keeps on the GPU for an ``n_out x n_in`` weight.

    From the CUDA ``quantize_4bit`` op and ``functional.quantize_4bit``: the packed weight is
    ``(n + 1) // (2 * itemsize)`` elements of ``quant_storage`` (two 4-bit values per byte);
    ``absmax`` is one fp32 per block of ``blocksize`` (``ceil(n / blocksize)``); ``code`` the
    16-entry fp32 table. With double quantisation ``absmax`` is uint8, plus ``offset`` (a
    0-dim fp32, the mean of the absmax), ``state2.absmax`` (one fp32 per 256 absmax) and
    ``state2.code`` (the 256-entry fp32 dynamic map).
    """
    n = n_out * n_in
    item = quant_storage.itemsize
    packed = (n + 1) // (2 * item) * item
    blocks = -(-n // blocksize)
    code = 4 * CODE_4BIT_ENTRIES
    if not double_quant:
        return LayerStorage((("weight", packed), ("absmax", 4 * blocks), ("code", code)))
    blocks2 = -(-blocks // NESTED_BLOCKSIZE)
    return LayerStorage((
        ("weight", packed), ("absmax", blocks), ("code", code), ("offset", 4),
        ("state2.absmax", 4 * blocks2), ("state2.code", 4 * CODE_8BIT_ENTRIES),
    ))


def linear8bit_storage(n_out: int, n_in: int) -> LayerStorage:
    """What ``Int8Params`` keeps for an ``n_out x n_in`` weight: the int8 weight (``CB``) and
    one fp32 scale per output row (``SCB``, ``int8_vectorwise_quant``'s row statistics); the
    layer's ``MatmulLtState`` points at the same two tensors."""
    return LayerStorage((("weight", n_out * n_in), ("SCB", 4 * n_out)))


def layer_storage(q: Quantization, n_out: int, n_in: int) -> LayerStorage:
    """:func:`linear4bit_storage` or :func:`linear8bit_storage` for ``q``."""
    if q.four_bit:
        return linear4bit_storage(n_out, n_in, double_quant=q.double_quant,
                                  quant_storage=q.quant_storage)
    return linear8bit_storage(n_out, n_in)


def load_allocations(
    q: Quantization, n_out: int, n_in: int, loaded: torch.dtype
) -> tuple[tuple[int, bool], ...]:
    """The GPU allocations of quantizing one ``n_out x n_in`` weight as it is loaded, in order:
    ``(bytes, kept)``, allocator-rounded; the ones not kept are freed, last made first freed,
    once the layer is quantized. For the caching-allocator simulation of a model's build.

    From bitsandbytes 0.50.1: ``Params4bit._quantize`` moves the weight to the GPU in
    ``loaded`` dtype and calls ``functional.quantize_4bit``, whose CUDA op makes the fp32
    ``absmax`` then the packed weight; ``get_4bit_type`` makes the 16-entry ``code``. Under
    double quantisation ``offset = absmax.mean()``, the shifted absmax (a temporary) goes
    through ``quantize_blockwise`` (its op makes ``state2.absmax`` then the uint8 absmax; the
    dynamic map is copied, ``code.to(copy=True)``), and the fp32 absmax is dropped.
    ``Int8Params._quantize`` moves the weight in fp16 and ``int8_vectorwise_quant`` makes the
    row statistics (``SCB``) then the int8 weight. (The module-wide dynamic map, 1 KiB made
    once, is left out.)
    """
    n = n_out * n_in
    s = dict(layer_storage(q, n_out, n_in).tensors)
    if not q.four_bit:
        return ((rounded(2 * n), False), (rounded(s["SCB"]), True), (rounded(s["weight"]), True))
    blocks = -(-n // BLOCKSIZE_4BIT)
    out = [(rounded(n * loaded.itemsize), False), (rounded(4 * blocks), not q.double_quant),
           (rounded(s["weight"]), True), (rounded(s["code"]), True)]
    if q.double_quant:
        out += [(rounded(s["offset"]), True), (rounded(4 * blocks), False),
                (rounded(s["state2.absmax"]), True), (rounded(s["absmax"]), True),
                (rounded(s["state2.code"]), True)]
    return tuple(out)


# -- the whole base --------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizedBase:
    """The quantized layers of a model, in bytes.

    Attributes:
        modules: how many layers are quantized.
        params: their weight elements.
        allocated_bytes: every tensor of every layer, allocator-rounded: what they add to
            ``torch.cuda.memory_allocated()``.
        weight_bytes: the packed (or int8) weights alone, unrounded: what transformers'
            ``get_memory_footprint()`` counts for them.
        state_bytes: the quantisation state alone, unrounded (absmax, tables, offsets, SCB).
    """

    modules: int
    params: int
    allocated_bytes: int
    weight_bytes: int
    state_bytes: int


def quantized_base(model: nn.Module, q: Quantization) -> QuantizedBase:
    """Sum :func:`layer_storage` over :func:`quantized_modules` (a shared module once)."""
    layers = quantized_modules(model, q)
    storages = [layer_storage(q, m.n_out, m.n_in) for m in layers]
    return QuantizedBase(
        modules=len(layers),
        params=sum(m.n_out * m.n_in for m in layers),
        allocated_bytes=sum(s.allocated_bytes for s in storages),
        weight_bytes=sum(s.weight_bytes for s in storages),
        state_bytes=sum(s.state_bytes for s in storages),
    )


def memory_footprint(model: nn.Module, q: Quantization, base_dtype: torch.dtype) -> int:
    """transformers' ``get_memory_footprint()`` of the quantized model loaded in
    ``base_dtype``: every parameter's and buffer's ``nelement() * element_size()``, where a
    quantized weight is its packed (or int8) tensor and its quantisation state is not counted
    (it is neither a parameter nor a buffer). Before ``prepare_model_for_kbit_training``."""
    quantized = {f"{m.name}.weight": m for m in quantized_modules(model, q)}
    total = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name in quantized:
            m = quantized[name]
            total += layer_storage(q, m.n_out, m.n_in).weight_bytes
        elif p.is_floating_point():
            total += p.numel() * base_dtype.itemsize
        else:
            total += p.numel() * p.element_size()
    for b in model.buffers():
        total += b.numel() * b.element_size()
    return total


