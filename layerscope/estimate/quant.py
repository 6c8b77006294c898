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
from typing import Any

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
    """:func:`linear4bit_storage` or :func:`linear8bit_storage` for ``q`` (a torchao base:
    :func:`~layerscope.estimate.torchao.nf4_storage`)."""
    if q.library == "torchao":
        from layerscope.estimate.torchao import nf4_storage

        return nf4_storage(q, n_out, n_in)
    if q.four_bit:
        return linear4bit_storage(n_out, n_in, double_quant=q.double_quant,
                                  quant_storage=q.storage)
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




# -- time: readying weights for the matmuls --------------------------------------------------
@dataclass(frozen=True)
class WeightTraffic:
    """Memory-bound work that readies each weight for its matmul, for the step-time model
    (:class:`~layerscope.estimate.walk.Walk` issues it next to each GEMM).

    A quantized layer dequantises its whole weight before every matmul (forward, its
    recomputation, and the input gradient): bitsandbytes' kernels read the packed weight and
    its absmax and write the full weight (:func:`dequant_bytes`). An unquantized weight is cast
    by autocast when its dtype is not the autocast dtype (fp32 master weights, fp32 norms and
    head after ``prepare_model_for_kbit_training``), and not at all when it already is (a bf16
    base). Every figure is DRAM bytes read plus written; the time is bytes over bandwidth.

    Attributes:
        quantization: the quantized base, or None.
        quantized: names of the quantized modules.
        autocast: the autocast dtype, or None.
        compute, loaded, frozen, trainable: the dtypes a quantized layer computes in, its
            weight was loaded in, frozen and trainable unquantized weights are kept in.
    """

    quantization: Quantization | None
    quantized: frozenset[str]
    autocast: torch.dtype | None
    compute: torch.dtype
    loaded: torch.dtype
    frozen: torch.dtype
    trainable: torch.dtype

    @classmethod
    def of(cls, setup: Any) -> WeightTraffic:
        """From a :class:`~layerscope.setup.TrainingSetup`."""
        prec = setup.precision_info
        return cls(setup.quantization, frozenset(m.name for m in setup.quantized_layers),
                   prec.autocast_dtype, setup.compute_dtype, setup.loaded_dtype,
                   setup.frozen_dtype, prec.param_dtype)

    @classmethod
    def plain(cls, param_dtype: torch.dtype, autocast: torch.dtype | None) -> WeightTraffic:
        """Every weight in ``param_dtype``, nothing quantized."""
        return cls(None, frozenset(), autocast, param_dtype, param_dtype, param_dtype,
                   param_dtype)

    def is_quantized(self, module: str) -> bool:
        """``module`` (its full name) is a bitsandbytes layer."""
        return self.quantization is not None and module in self.quantized

    def cast_bytes(self, module: str, elements: int, trainable: bool) -> int:
        """Bytes autocast's cast of an unquantized weight of ``elements`` moves before its
        forward matmul (read in its dtype, written in the autocast dtype); 0 when it needs
        none: no autocast, a weight already in the autocast dtype, or a quantized layer (its
        dequantisation, :meth:`forward`, gives the compute dtype)."""
        if self.autocast is None or self.is_quantized(module):
            return 0
        dtype = self.trainable if trainable else self.frozen
        return 0 if dtype == self.autocast else elements * (dtype.itemsize + self.autocast.itemsize)

    def forward(self, module: str, n_out: int, n_in: int, tokens: float,
                act_bytes: int) -> tuple[float, float]:
        """(bytes, kernels) before a forward matmul of ``module`` when it is quantized (0, 0
        otherwise) over ``tokens`` rows of ``act_bytes`` activations."""
        q = self.quantization
        if q is None or not self.is_quantized(module):
            return 0.0, 0.0
        if not q.four_bit:
            # int8 multiplies int8, no weight dequantised; the input is: A.to(fp16), |A|,
            # >= threshold, any(), row quantisation; then the int32 product dequantised to
            # fp16 and cast to the input's dtype
            a = act_bytes
            nbytes = tokens * n_in * (a + 2 + 4 + 3 + 1 + 3) + tokens * 4
            return nbytes + tokens * n_out * (4 + 2 + 2 + a), 8.0
        nbytes, kernels = dequant_bytes(q, n_out, n_in, self.compute)
        if self.autocast is not None and self.compute != self.autocast:  # F.linear's casts
            nbytes += n_out * n_in * (self.compute.itemsize + self.autocast.itemsize)
            kernels += 1
        return nbytes, kernels

    def backward(self, module: str, n_out: int, n_in: int) -> tuple[float, float]:
        """(bytes, kernels) before the input-gradient matmul of ``module``: a quantized weight
        is dequantised again, to the dtype it was loaded in (int8: to the input's dtype, then
        scaled), and cast to the gradient's dtype when they differ; autocast's casts of an
        unquantized weight were saved in forward."""
        q = self.quantization
        if q is None or not self.is_quantized(module):
            return 0.0, 0.0
        grad = self.autocast or self.compute
        nbytes, kernels = dequant_bytes(q, n_out, n_in, self.loaded if q.four_bit else grad)
        if q.four_bit and self.loaded != grad:
            nbytes += n_out * n_in * (self.loaded.itemsize + grad.itemsize)
            kernels += 1
        return nbytes, kernels


def dequant_bytes(q: Quantization, n_out: int, n_in: int, dtype: torch.dtype) -> tuple[float, float]:
    """(DRAM bytes read and written, kernels) of dequantising one ``n_out x n_in`` weight to
    ``dtype``, as bitsandbytes' CUDA kernels do it.

    4-bit: ``dequantize_4bit`` reads the packed weight and the absmax and writes every element;
    under double quantisation ``dequantize_blockwise`` first reads the uint8 absmax and writes it
    in fp32, and the offset is added (read and written again). int8 (backward only):
    ``CB.to(dtype, copy=True)`` then ``mul_`` by the row scales (read and write again).
    torchao: :func:`~layerscope.estimate.torchao.dequantize_bytes` (bf16), then a cast to
    ``dtype`` when it is not bf16.
    """
    n = n_out * n_in
    s = dict(layer_storage(q, n_out, n_in).tensors)
    if q.library == "torchao":
        from layerscope.estimate.torchao import dequantize_bytes

        nbytes, kernels = dequantize_bytes(n)
        return nbytes + (n * (2 + dtype.itemsize) if dtype != torch.bfloat16 else 0), kernels
    if not q.four_bit:
        return float(n + n * dtype.itemsize + 2 * n * dtype.itemsize + 3 * s["SCB"]), 4.0
    nbytes = s["weight"] + s["absmax"] + n * dtype.itemsize
    kernels = 1.0
    if q.double_quant:
        blocks = s["absmax"]
        nbytes += blocks + 4 * blocks + 2 * 4 * blocks
        kernels += 2
    return float(nbytes), kernels
