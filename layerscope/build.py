"""``empty_model(source)``: the exact module structure of a Hugging Face model, with no weights.

Every parameter lives on the meta device (shape and dtype, no storage), so even Llama-3.1-405B
builds in well under a second of work after the imports. Tied weights are one ``nn.Parameter``
object, as in a loaded model.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Union, cast

import torch
from torch import nn

from layerscope.catalog.resolve import ResolvedConfig, check_config, resolve_config
from layerscope.checks import flag
from layerscope.errors import ConfigError, LayerscopeWarning, StructureError
from layerscope.units import parse_dtype

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

ModelSource = Union[str, "os.PathLike[str]", Mapping[str, Any], "PretrainedConfig"]


def empty_model(
    source: ModelSource,
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The model skeleton of ``source`` on the meta device: every module, no weights.

    Args:
        source: What to build, resolved in this order:

            * a path to a ``config.json``, or to a folder holding one;
            * a built-in preset name (``layerscope.presets()``), matched ignoring case, ``_``
              and spaces; the preset's repository id also works
              (``"meta-llama/Llama-3.1-8B"`` -> ``"llama-3.1-8b"``);
            * a hub id (``"org/name"``) whose ``config.json`` is in the local Hugging Face cache
              (``HF_HUB_CACHE`` / ``HF_HOME``); never downloaded;
            * a ``dict`` (a parsed ``config.json``; ``model_type`` selects the config class);
            * a ``transformers.PretrainedConfig`` (copied, never modified).
        dtype: The parameters' dtype (``torch.dtype`` or a name such as ``"bf16"``). ``None``
            means the dtype the config records (``torch_dtype``/``dtype``: bfloat16 for most
            published LLMs, float16 for Llama-2, float32 for GPT-2 and the Gemma-2 base
            checkpoints), and float32 when it records none: the dtype
            ``from_pretrained(..., dtype="auto")`` would load.
        trust_remote_code: Allow configs whose classes are defined by Python files next to the
            ``config.json`` (``auto_map``). Those files are executed; nothing is downloaded.

    Returns:
        The model class the config's ``architectures`` names (``LlamaForCausalLM`` with its
        ``lm_head``, ``LlavaForConditionalGeneration``...); without ``architectures``, the
        causal-LM class where transformers has one, else the base model.

    Raises:
        ConfigError: the source cannot be found, read or built (unknown preset, malformed
            config, unknown ``model_type``, remote code without ``trust_remote_code``...).
        ModelTypeError: ``source`` is not one of the types above.
        StructureError: transformers built the model but left a declared weight tie broken.
    """
    flag(trust_remote_code, "empty_model: trust_remote_code", ConfigError)
    resolved = resolve_config(source, trust_remote_code=trust_remote_code)
    check_config(resolved.config, resolved.label)
    target = _target_dtype(dtype, resolved)
    cls = model_class(resolved, trust_remote_code=trust_remote_code)
    model = _instantiate(cls, resolved, target)
    check_ties(model, resolved.label)
    return model


def as_model(model: object) -> nn.Module:
    """``model`` itself when it is an ``nn.Module``, else its skeleton (:func:`empty_model`).

    What every estimate accepts as ``model``: a real or meta module, or a model source.
    """
    if isinstance(model, nn.Module):
        return model
    return empty_model(model)  # type: ignore[arg-type]  # empty_model validates the source


def model_class(
    resolved: ResolvedConfig, *, trust_remote_code: bool = False
) -> type[PreTrainedModel]:
    """The class :func:`empty_model` builds for ``resolved`` (see its Returns section)."""
    import transformers

    config = resolved.config
    architectures = list(getattr(config, "architectures", None) or [])
    if trust_remote_code and resolved.code_dir is not None and getattr(config, "auto_map", None):
        return _remote_class(resolved, architectures)
    for name in architectures[:1]:
        named = getattr(transformers, name, None)
        if (
            isinstance(named, type)
            and issubclass(named, transformers.PreTrainedModel)
            and named.config_class is not None
            and isinstance(config, named.config_class)
        ):
            return named
    cls = _auto_class(config, resolved.label)
    if architectures:
        warnings.warn(
            f"{resolved.label}: architectures names {architectures[0]!r}, which transformers "
            f"{transformers.__version__} does not have for {type(config).__name__}; built "
            f"{cls.__name__} instead",
            LayerscopeWarning,
            stacklevel=3,
        )
    return cls


def _auto_class(config: PretrainedConfig, label: str) -> type[PreTrainedModel]:
    """The head-bearing class for ``config``: causal LM, seq2seq LM, image-text LM, else base."""
    from transformers.models.auto import modeling_auto as auto

    for mapping in (
        auto.MODEL_FOR_CAUSAL_LM_MAPPING,
        auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
        auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
        auto.MODEL_MAPPING,
    ):
        if type(config) in mapping:
            return cast("type[PreTrainedModel]", mapping[type(config)])
    raise ConfigError(f"{label}: transformers has no model class for {type(config).__name__}")


def _remote_class(resolved: ResolvedConfig, architectures: list[str]) -> type[PreTrainedModel]:
    """The model class from the ``auto_map`` code next to the config (trust_remote_code=True)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    auto_map: dict[str, str] = dict(resolved.config.auto_map)
    wanted = architectures[0] if architectures else None
    refs = [ref for key, ref in auto_map.items() if key != "AutoConfig"]
    ref = next((r for r in refs if r.rsplit(".", 1)[-1] == wanted), None)
    ref = ref or auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoModel")
    if ref is None:
        raise ConfigError(f"{resolved.label}: auto_map names no model class: {auto_map}")
    if "--" in ref:
        raise ConfigError(
            f"{resolved.label}: auto_map points to code in another repository ({ref}); "
            "layerscope never downloads. Copy those files next to config.json"
        )
    try:
        cls: type[PreTrainedModel] = get_class_from_dynamic_module(
            ref, str(resolved.code_dir), local_files_only=True
        )
    except Exception as exc:
        raise ConfigError(f"{resolved.label}: could not load remote class {ref}: {exc}") from exc
    return cls


def _target_dtype(dtype: str | torch.dtype | None, resolved: ResolvedConfig) -> torch.dtype:
    """The explicit ``dtype``, else the config's, else float32 (see :func:`empty_model`)."""
    chosen: object = dtype
    where = f"dtype={dtype!r}"
    if chosen is None:
        chosen = getattr(resolved.config, "dtype", None)
        where = f"{resolved.label}: dtype recorded in the config"
    if chosen is None or chosen == "auto":
        return torch.float32
    try:
        result = parse_dtype(chosen if isinstance(chosen, torch.dtype) else str(chosen))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if not result.is_floating_point:
        raise ConfigError(f"{where}: {result} is not a floating-point dtype")
    return result


def _instantiate(
    cls: type[PreTrainedModel], resolved: ResolvedConfig, dtype: torch.dtype
) -> PreTrainedModel:
    """``cls`` built from the config on the meta device.

    Weight initialisation runs as usual: on meta tensors it costs next to nothing (Llama-3.1-405B
    builds in about 0.05 s either way), and transformers' switch that skips it
    (``no_init_weights``) patches ``torch.nn.init`` for every thread of the process.
    """
    from layerscope.compat import from_config

    try:
        with torch.device("meta"):
            model = cast("PreTrainedModel", from_config(cls, resolved.config, dtype))
    except Exception as exc:
        raise ConfigError(
            f"{resolved.label}: transformers could not build {cls.__name__} from this config: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    model.tie_weights()  # idempotent; some remote-code models tie only here
    return model


def check_ties(model: nn.Module, label: str = "model") -> None:
    """Check that every weight tie the model declares is one shared ``nn.Parameter``.

    Raises:
        StructureError: a declared tie is two different tensors (totals would double-count).
    """
    expected = _declared_ties(model)
    broken = [
        f"{target} -> {source}"
        for target, source in expected.items()
        if model.get_parameter(target) is not model.get_parameter(source)
    ]
    if broken:
        raise StructureError(f"{label}: weight ties declared but not shared: {', '.join(broken)}")


def _declared_ties(model: nn.Module) -> dict[str, str]:
    """Tied parameter names, target -> source, as the model and its config declare them."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if expand is not None:  # transformers 5
        ties: dict[str, str] = expand(all_submodels=True)
        names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        return {t: s for t, s in ties.items() if t in names and s in names}
    # transformers 4.x: the input/output embedding tie, where the config asks for it.
    config = getattr(model, "config", None)
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if config is None or get_in is None or get_out is None or get_out() is None:
        return {}
    if not getattr(config.get_text_config(), "tie_word_embeddings", False):
        return {}
    module_names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    return {f"{module_names[id(get_out())]}.weight": f"{module_names[id(get_in())]}.weight"}
