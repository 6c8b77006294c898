"""The quantized-base setting: bitsandbytes 4-bit NF4/FP4 or 8-bit LLM.int8, as a frozen value,
and which modules of a model transformers quantizes, without bitsandbytes.

* :class:`Quantization`: ``"nf4"``, ``"fp4"``, ``"int8"`` or a transformers
  ``BitsAndBytesConfig``, validated and frozen (a ``BitsAndBytesConfig`` is mutable and hashes
  by identity; a training setup needs a value);
* :func:`quantized_modules`: every ``nn.Linear`` (exactly that type) and GPT-2's ``Conv1D``,
  except what transformers keeps in full precision (:func:`default_skip_modules`: the output
  head, tied weights, the last parameter's module; ``llm_int8_skip_modules`` replaces those
  defaults; the class's ``_keep_in_fp32_modules`` always), matched as transformers matches.

Checked against transformers 5.24 (``integrations/bitsandbytes.py``, ``quantizers/base.py``,
``quantizers/quantizers_utils.py``) and bitsandbytes 0.50.1. What a quantized layer stores and
costs is :mod:`layerscope.estimate.quant`'s; the step is traced with
:mod:`layerscope.estimate.bnb`.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerscope.errors import EstimateError

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

LIBRARIES = ("bitsandbytes", "torchao")
"""Who quantizes the base: ``bitsandbytes`` (transformers' ``from_pretrained`` with a
``BitsAndBytesConfig``, the default) or ``torchao`` (its ``NF4Tensor``, as torchtune's QLoRA
recipes build the model on the GPU: :mod:`layerscope.estimate.torchao`)."""

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
        quant_storage: ``bnb_4bit_quant_storage``; ``None`` (the shorthands): what the run
            needs, ``torch.uint8`` (bitsandbytes' and transformers' default) on one GPU, DDP and
            ZeRO-1/2, the base's dtype under FSDP and ZeRO-3, which shard float storage only
            (resolved by :class:`~layerscope.setup.TrainingSetup`; :attr:`storage` reads it).
        skip_modules: ``llm_int8_skip_modules`` (names or regexes of modules kept in full
            precision; replaces the defaults), or ``None`` for transformers' defaults.
        int8_threshold: ``llm_int8_threshold``.
        library: :data:`LIBRARIES`: ``"bitsandbytes"`` (the default) or ``"torchao"``
            (``NF4Tensor``, ``nf4`` only, always with its scalers quantized: ``double_quant``
            is set; loaded as torchtune's single-device recipe loads it).
        torchao_version: with ``library="torchao"``, the torchao release (``"0.1"``,
            ``"0.2.0"``...): before 0.2 a weight is quantized in one piece, from 0.2 in chunks
            of a million elements; before 0.3 each layer keeps its scale factors' full
            intermediate (:mod:`layerscope.estimate.torchao`). ``None``: 0.3 or later.
    """

    method: str
    double_quant: bool = False
    compute_dtype: torch.dtype | None = None
    quant_storage: torch.dtype | None = None
    skip_modules: tuple[str, ...] | None = None
    int8_threshold: float = INT8_THRESHOLD
    library: str = "bitsandbytes"
    torchao_version: str | None = None

    def __post_init__(self) -> None:
        if self.method not in QUANT_TYPES:
            raise EstimateError(
                f"unknown quantization {self.method!r}; allowed: {', '.join(QUANT_TYPES)} or a "
                "transformers BitsAndBytesConfig"
            )
        self._check_library()
        if not isinstance(self.double_quant, bool):
            raise EstimateError(f"double_quant must be a bool, got {self.double_quant!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise EstimateError(
                f"bnb_4bit_compute_dtype must be one of {_names(COMPUTE_DTYPES)}, got "
                f"{self.compute_dtype!r}"
            )
        if self.quant_storage is not None and self.quant_storage not in QUANT_STORAGE_DTYPES:
            raise EstimateError(
                f"bnb_4bit_quant_storage must be one of {_names(QUANT_STORAGE_DTYPES)}, got "
                f"{self.quant_storage!r}"
            )
        skip = self.skip_modules
        if skip is not None and (not isinstance(skip, (list, tuple)) or not all(
                isinstance(s, str) and s for s in skip)):
            raise EstimateError(
                f"llm_int8_skip_modules must be a list of module names, got {skip!r}"
            )
        if isinstance(skip, list):  # hashable, as a setting must be
            object.__setattr__(self, "skip_modules", tuple(skip))
        threshold = self.int8_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
            raise EstimateError(f"llm_int8_threshold must be a number >= 0, got {threshold!r}")

    def _check_library(self) -> None:
        if self.library not in LIBRARIES:
            raise EstimateError(
                f"quantization library must be one of {', '.join(LIBRARIES)}, got {self.library!r}"
            )
        version = self.torchao_version
        if self.library != "torchao":
            if version is not None:
                raise EstimateError(
                    f"torchao_version={version!r} needs library='torchao', got "
                    f"library={self.library!r}"
                )
            return
        if self.method != "nf4":
            raise EstimateError(
                f"library='torchao' quantizes to NF4 only (NF4Tensor), got method={self.method!r}"
            )
        if self.quant_storage not in (None, torch.uint8):
            raise EstimateError(
                "library='torchao' stores NF4 weights as uint8, got "
                f"quant_storage={self.quant_storage!r}"
            )
        if version is not None and torchao_release(version) < (0, 1):
            raise EstimateError(f"torchao_version must be 0.1 or later, got {version!r}")
        object.__setattr__(self, "double_quant", True)  # NF4Tensor always quantizes its scalers

    @property
    def four_bit(self) -> bool:
        return self.method != "int8"

    @property
    def torchao_release(self) -> tuple[int, int]:
        """``(major, minor)`` of ``torchao_version`` (``(0, 3)`` when not given: 0.3 and later
        behave alike here)."""
        return (0, 3) if self.torchao_version is None else torchao_release(self.torchao_version)

    @property
    def storage(self) -> torch.dtype:
        """The dtype the packed 4-bit weights are viewed as (``uint8`` when not given)."""
        return self.quant_storage or torch.uint8

    def with_storage(self, storage: torch.dtype) -> Quantization:
        """The same with ``quant_storage`` set (a strategy that shards the packed weights)."""
        return dataclasses.replace(self, quant_storage=storage)

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
        return dataclasses.replace(self, double_quant=double_quant)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: dtypes by their short torch names (the library only when not
        bitsandbytes)."""
        out: dict[str, Any] = {
            "method": self.method, "double_quant": self.double_quant,
            "compute_dtype": None if self.compute_dtype is None else _name(self.compute_dtype),
            "quant_storage": _name(self.storage),
            "skip_modules": None if self.skip_modules is None else list(self.skip_modules),
        }
        if self.library != "bitsandbytes":
            out.update(library=self.library, torchao_version=self.torchao_version)
        return out

    def describe(self) -> str:
        """``"nf4"``, ``"nf4 + double quant"``, ``"int8"``, ``"nf4 (torchao 0.1)"``."""
        if self.library == "torchao":
            return f"nf4 (torchao{'' if self.torchao_version is None else ' ' + self.torchao_version})"
        return self.method + (" + double quant" if self.double_quant else "")


def torchao_release(version: object) -> tuple[int, int]:
    """``(major, minor)`` of a torchao version string such as ``"0.1"`` or ``"0.2.0"``.

    Raises:
        EstimateError: not a string of the form ``MAJOR.MINOR[.PATCH]``.
    """
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?", version) if isinstance(version, str) else None
    if match is None:
        raise EstimateError(
            f"torchao_version must be a release such as '0.1' or '0.2.0', got {version!r}"
        )
    return int(match.group(1)), int(match.group(2))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(_name(d) for d in dtypes)


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
