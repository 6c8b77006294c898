"""Quantized bases (bitsandbytes 4-bit NF4/FP4 and 8-bit LLM.int8), stored as bitsandbytes stores
them, on a machine without bitsandbytes or a GPU.

Three things are defined here, each from the libraries' source (bitsandbytes 0.50.1,
transformers 5.24, peft 0.21; the arithmetic is unchanged since bitsandbytes 0.43):

* the setting, :class:`Quantization`: ``"nf4"``, ``"fp4"``, ``"int8"`` or a transformers
  ``BitsAndBytesConfig``, validated and frozen (a ``BitsAndBytesConfig`` is mutable and
  hashes by identity; the setup needs a value);
* **which modules transformers quantizes** (:func:`quantized_modules`): every ``nn.Linear``
  (exactly that type) and GPT-2's ``Conv1D``, except the modules it keeps in full precision
  (:func:`default_skip_modules`: the output head, tied weights, the last parameter's module and
  the class's ``_keep_in_fp32_modules``; ``llm_int8_skip_modules`` replaces the defaults);
* **what one quantized layer stores on the GPU** (:func:`linear4bit_storage`,
  :func:`linear8bit_storage`), tensor by tensor, and the whole base (:func:`quantized_base`).

The step itself (dequantisation temporaries, what the 4-bit matmul saves) is traced with the
emulated layers of :mod:`layerscope.estimate.bnb`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerscope.errors import EstimateError
from layerscope.estimate.trace import rounded

QUANT_TYPES = ("nf4", "fp4", "int8")
"""``nf4``/``fp4``: bitsandbytes ``Linear4bit`` (``load_in_4bit``, ``bnb_4bit_quant_type``);
``int8``: ``Linear8bitLt`` (``load_in_8bit``, LLM.int8 with outlier threshold 6.0)."""

BLOCKSIZE_4BIT = 64
"""Elements per 4-bit quantisation block, one absmax each: ``Params4bit``'s default on CUDA
(``bitsandbytes/nn/modules.py``; 128 on ROCm), which transformers does not change."""

NESTED_BLOCKSIZE = 256
"""Absmax values per second-level block under double quantisation: ``quantize_4bit`` calls
``quantize_blockwise(absmax - offset, blocksize=256)`` (``bitsandbytes/functional.py``)."""

CODE_4BIT_ENTRIES = 16
"""fp32 entries of the 4-bit code table (``get_4bit_type``), one table per layer on the GPU."""

CODE_8BIT_ENTRIES = 256
"""fp32 entries of the dynamic 8-bit map that double quantisation keeps per layer
(``quantize_blockwise`` stores ``code.to(device, copy=True)`` in the nested state)."""

QUANT_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32,
                        torch.float64)
"""``bnb_4bit_quant_storage`` values transformers accepts; the packed nibbles are viewed as this
dtype (``bfloat16`` is what FSDP needs to shard a 4-bit model with the other parameters)."""

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""``bnb_4bit_compute_dtype`` values bitsandbytes can dequantise to."""

INT8_THRESHOLD = 6.0
"""``llm_int8_threshold``, transformers' default: input columns with a value above it are
multiplied in 16-bit (the outliers), the rest in int8."""


@dataclass(frozen=True)
class Quantization:
    """A bitsandbytes quantized base, as ``BitsAndBytesConfig`` describes it.

    Attributes:
        method: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        double_quant: ``bnb_4bit_use_double_quant``: absmax stored in 8 bits with a
            second-level fp32 absmax per 256 blocks.
        compute_dtype: ``bnb_4bit_compute_dtype``: the dtype weights are dequantised to and the
            matmul runs in. ``None`` (the ``"nf4"``/``"fp4"`` shorthand): the training
            precision's compute dtype, as QLoRA scripts set it (``torch.bfloat16`` under
            ``bf16-mixed``); a ``BitsAndBytesConfig`` without one means fp32, as in transformers.
        quant_storage: ``bnb_4bit_quant_storage``.
        skip_modules: ``llm_int8_skip_modules`` (names or regexes of modules kept in full
            precision; replaces the defaults), or ``None`` for transformers' defaults.
        int8_threshold: ``llm_int8_threshold``.
    """

    method: str
    double_quant: bool = False
    compute_dtype: torch.dtype | None = None
    quant_storage: torch.dtype = torch.uint8
    skip_modules: tuple[str, ...] | None = None
    int8_threshold: float = INT8_THRESHOLD

    def __post_init__(self) -> None:
        if self.method not in QUANT_TYPES:
            raise EstimateError(
                f"unknown quantization {self.method!r}; allowed: {', '.join(QUANT_TYPES)} or a "
                "transformers BitsAndBytesConfig"
            )
        if not isinstance(self.double_quant, bool):
            raise EstimateError(f"double_quant must be a bool, got {self.double_quant!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise EstimateError(
                f"bnb_4bit_compute_dtype must be one of {_names(COMPUTE_DTYPES)}, got "
                f"{self.compute_dtype!r}"
            )
        if self.quant_storage not in QUANT_STORAGE_DTYPES:
            raise EstimateError(
                f"bnb_4bit_quant_storage must be one of {_names(QUANT_STORAGE_DTYPES)}, got "
                f"{self.quant_storage!r}"
            )
        if self.skip_modules is not None and not all(
                isinstance(s, str) and s for s in self.skip_modules):
            raise EstimateError(
                f"llm_int8_skip_modules must be a list of module names, got {self.skip_modules!r}"
            )
        threshold = self.int8_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
            raise EstimateError(f"llm_int8_threshold must be a number >= 0, got {threshold!r}")

    @property
    def four_bit(self) -> bool:
        return self.method != "int8"

    @classmethod
    def of(cls, value: object) -> Quantization | None:
        """``None``, ``"nf4"``/``"fp4"``/``"int8"`` (any case), a :class:`Quantization` or a
        transformers ``BitsAndBytesConfig`` -> a :class:`Quantization` (or None).

        Raises:
            EstimateError: an unknown name, or a config with a bad field (a quant type other
                than nf4/fp4, neither 4- nor 8-bit loading, a compute or storage dtype
                bitsandbytes does not take, skip modules that are not a list of names).
        """
        if value is None or isinstance(value, Quantization):
            return value
        if isinstance(value, str):
            return cls(value.lower())
        if type(value).__name__ == "BitsAndBytesConfig" or hasattr(value, "bnb_4bit_quant_type"):
            return cls._of_config(value)
        raise EstimateError(
            f"quantization must be one of {', '.join(QUANT_TYPES)}, a transformers "
            f"BitsAndBytesConfig or None, got {type(value).__name__} {value!r}"
        )

    @classmethod
    def _of_config(cls, config: Any) -> Quantization:
        load_4bit = getattr(config, "load_in_4bit", False)
        load_8bit = getattr(config, "load_in_8bit", False)
        if load_4bit is load_8bit:
            raise EstimateError(
                "BitsAndBytesConfig must set exactly one of load_in_4bit and load_in_8bit, got "
                f"load_in_4bit={load_4bit!r}, load_in_8bit={load_8bit!r}"
            )
        skip = getattr(config, "llm_int8_skip_modules", None)
        if skip is not None and not isinstance(skip, (list, tuple)):
            raise EstimateError(
                f"BitsAndBytesConfig.llm_int8_skip_modules must be a list of module names, got {skip!r}"
            )
        threshold = getattr(config, "llm_int8_threshold", INT8_THRESHOLD)
        if load_8bit:
            if getattr(config, "llm_int8_has_fp16_weight", False):
                raise EstimateError(
                    "BitsAndBytesConfig.llm_int8_has_fp16_weight=True keeps 16-bit weights and "
                    "re-quantizes them every step (mixed int8 training); not modelled"
                )
            return cls("int8", skip_modules=None if skip is None else tuple(skip),
                       int8_threshold=threshold)
        quant_type = getattr(config, "bnb_4bit_quant_type", None)
        if quant_type not in ("nf4", "fp4"):
            raise EstimateError(
                f"BitsAndBytesConfig.bnb_4bit_quant_type must be 'nf4' or 'fp4', got {quant_type!r}"
            )
        compute = getattr(config, "bnb_4bit_compute_dtype", None) or torch.float32
        storage = getattr(config, "bnb_4bit_quant_storage", None) or torch.uint8
        for field, dtype in (("bnb_4bit_compute_dtype", compute), ("bnb_4bit_quant_storage", storage)):
            if not isinstance(dtype, torch.dtype):
                raise EstimateError(f"BitsAndBytesConfig.{field} must be a torch.dtype, got {dtype!r}")
        return cls(quant_type, double_quant=getattr(config, "bnb_4bit_use_double_quant", False),
                   compute_dtype=compute, quant_storage=storage,
                   skip_modules=None if skip is None else tuple(skip), int8_threshold=threshold)

    def replace_double_quant(self, double_quant: bool) -> Quantization:
        """The same with ``double_quant`` set (the command line's ``--double-quant``)."""
        return Quantization(self.method, double_quant, self.compute_dtype, self.quant_storage,
                            self.skip_modules, self.int8_threshold)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: dtypes by their short torch names."""
        return {
            "method": self.method, "double_quant": self.double_quant,
            "compute_dtype": None if self.compute_dtype is None else _name(self.compute_dtype),
            "quant_storage": _name(self.quant_storage),
            "skip_modules": None if self.skip_modules is None else list(self.skip_modules),
        }

    def describe(self) -> str:
        """``"nf4"``, ``"nf4 + double quant"``, ``"int8"``."""
        return self.method + (" + double quant" if self.double_quant else "")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(_name(d) for d in dtypes)


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


# -- which modules ---------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizedLinear:
    """A module transformers replaces by a bitsandbytes layer."""

    name: str
    n_out: int
    n_in: int
    bias: bool


def _is_quantizable(module: nn.Module) -> bool:
    """``replace_with_bnb_linear``'s test: exactly ``nn.Linear`` (not a subclass), or ``Conv1D``."""
    return type(module) is nn.Linear or type(module).__name__ == "Conv1D"


def default_skip_modules(model: nn.Module) -> list[str]:
    """Modules transformers keeps in full precision when ``llm_int8_skip_modules`` is None
    (``get_keys_to_not_convert`` in ``transformers/quantizers/base.py``): the modules of tied
    parameters, of the last parameter, and the output embeddings. Ties are found by identity
    (transformers reads its declared tied keys; the same tensors on a built model)."""
    skip: set[str] = set()
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    for names in by_id.values():
        if len(names) > 1:
            skip.update(n.removesuffix(".weight") for n in names)
    named = list(model.named_parameters())
    if named:
        skip.add(named[-1][0].removesuffix(".weight"))
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        skip.update(name for name, m in model.named_modules() if m is out)
    return sorted(skip)


def skip_modules(model: nn.Module, q: Quantization) -> list[str]:
    """What the bitsandbytes quantizer does not convert (``get_modules_to_not_convert``): the
    user's ``llm_int8_skip_modules`` if given, else :func:`default_skip_modules`; plus the
    class's ``_keep_in_fp32_modules`` in both cases."""
    skip = default_skip_modules(model) if q.skip_modules is None else list(q.skip_modules)
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    return sorted(set(skip) | set(keep))


def _skipped(name: str, patterns: list[str]) -> bool:
    """transformers' ``should_convert_module`` rule, inverted: a pattern matches ``name`` as a
    regex from the start up to a module boundary, or as a suffix."""
    for key in patterns:
        try:
            if re.match(rf"(?:{key})(?:(?<=\.)|(?=\.|$))", name):
                return True
        except re.error:
            pass  # not a regex: the suffix test still applies
        if name.endswith(key):
            return True
    return False


def quantized_modules(model: nn.Module, q: Quantization) -> tuple[QuantizedLinear, ...]:
    """The modules of ``model`` that ``from_pretrained(quantization_config=...)`` replaces by
    ``Linear4bit``/``Linear8bitLt``, in registration order."""
    patterns = skip_modules(model, q)
    out = []
    for name, module in model.named_modules():
        if not name or not _is_quantizable(module) or _skipped(name, patterns):
            continue
        weight = module.weight
        n_out, n_in = weight.shape if type(module) is nn.Linear else weight.shape[::-1]
        out.append(QuantizedLinear(name, int(n_out), int(n_in), module.bias is not None))
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


def config_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``from_pretrained(torch_dtype="auto")`` loads ``model`` in: its config's
    ``dtype`` (``torch_dtype`` before transformers 5), else fp32 (transformers' default when a
    config names none)."""
    config = getattr(model, "config", None)
    with warnings.catch_warnings():  # transformers 5 warns on torch_dtype
        warnings.simplefilter("ignore")
        value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    return torch.float32
