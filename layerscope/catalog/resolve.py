"""Turning a model source (preset, path, dict, config object, hub id) into a transformers config.

Nothing here touches the network: hub ids are looked up in the local Hugging Face cache only.
transformers is imported inside the functions, when a config is actually resolved.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerscope.catalog.registry import close_presets, find_preset, unknown_preset_message
from layerscope.errors import ConfigError, ModelTypeError
from layerscope.process import import_once

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ResolvedConfig:
    """A config ready to build, and what it came from.

    Attributes:
        config: The transformers config (a private copy: building may modify it).
        label: How error messages name the source, e.g. ``"preset 'gpt2'"``.
        code_dir: The folder holding the config's remote code, when it came from one.
    """

    config: PretrainedConfig
    label: str
    code_dir: Path | None = None


def resolve_config(source: object, *, trust_remote_code: bool = False) -> ResolvedConfig:
    """Resolve ``source`` to a transformers config, offline.

    Args:
        source: A preset name, a path to a ``config.json`` or a folder holding one, a parsed
            config (``dict``), a ``transformers.PretrainedConfig``, or a hub id present in the
            local Hugging Face cache.
        trust_remote_code: Allow configs whose class is defined by Python files next to the
            config (``auto_map``); those files are executed.

    Raises:
        ConfigError: the source cannot be found, read or understood.
        ModelTypeError: ``source`` is of an unsupported type.
    """
    import_once("transformers")  # the first import, safe against other threads
    from transformers import PretrainedConfig

    if isinstance(source, PretrainedConfig):
        # A deep copy: building sets config.dtype, and the caller's object must not change.
        return ResolvedConfig(copy.deepcopy(source), f"config {type(source).__name__}")
    if isinstance(source, Mapping):
        return ResolvedConfig(config_from_dict(source, "config dict"), "config dict")
    if isinstance(source, (str, os.PathLike)):
        return _resolve_name_or_path(source, trust_remote_code)
    raise ModelTypeError(
        f"empty_model: cannot build a model from {type(source).__name__} {source!r}; expected a "
        "preset name, a path to a config.json, a dict, a transformers PretrainedConfig, or a hub id"
    )


def _resolve_name_or_path(
    source: str | os.PathLike[str], trust_remote_code: bool
) -> ResolvedConfig:
    text = os.fspath(source)
    if not text.strip():
        raise ConfigError("empty model source: expected a preset name, a path or a hub id")
    path = Path(text).expanduser()
    # A file, or a folder with a config.json, wins over a preset of the same name (as in
    # transformers, where a local folder wins over a hub id).
    if _is_file(path) or _is_file(path / "config.json"):
        return _from_path(path, trust_remote_code)
    preset = find_preset(text) if isinstance(source, str) else None
    if preset is not None:
        label = f"preset {preset.name!r}"
        config = config_from_dict(preset.config(), label)
        config.name_or_path = preset.repo  # as from_pretrained(repo) would record it
        return ResolvedConfig(config, label)
    if _is_dir(path):
        raise ConfigError(f"{text}: folder has no config.json")
    if not isinstance(source, str) or _looks_like_path(text):
        raise ConfigError(f"{text}: no such file or directory")
    if _HUB_ID.match(text) is None:
        raise ConfigError(unknown_preset_message(text))
    cached = cached_config_path(text)
    if cached is not None:
        resolved = _from_path(
            cached, trust_remote_code, label=f"hub id {text!r} (cached at {cached})"
        )
        resolved.config.name_or_path = text
        return resolved
    if "/" not in text:
        raise ConfigError(unknown_preset_message(text))
    raise ConfigError(_not_cached_message(text))


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _looks_like_path(text: str) -> bool:
    return (
        text.endswith(".json")
        or text.startswith((".", "~", os.sep))
        or text.count("/") > 1
        or (os.altsep is not None and os.altsep in text)
        or "\\" in text
    )


def _from_path(path: Path, trust_remote_code: bool, label: str | None = None) -> ResolvedConfig:
    file = path / "config.json" if path.is_dir() else path
    label = label or str(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: cannot read the file: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{label}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a JSON object, found {type(data).__name__}")
    if trust_remote_code and "auto_map" in data:
        return ResolvedConfig(_remote_config(file.parent, label), label, file.parent)
    config = config_from_dict(data, label)
    config.name_or_path = str(file.parent)
    return ResolvedConfig(config, label)


SIZES = ("num_hidden_layers", "n_layer", "num_layers", "hidden_size", "n_embd",
         "num_attention_heads", "n_head", "intermediate_size", "vocab_size")
"""Config fields that count layers or size tensors: whole numbers from 1 to 2**31 - 1 where
present (transformers builds a model of no layers from ``num_hidden_layers=0`` or ``-1``)."""
PER_LAYER_SIZES = ("num_attention_heads", "n_head", "intermediate_size")
"""The fields of :data:`SIZES` that a config may also give as a list, one size per layer or
stage: Gemma-3n's ``intermediate_size``, PVT's, SegFormer's and LeViT's ``num_attention_heads``
per stage."""
FLAGS = ("tie_word_embeddings",)
"""Config fields that must be booleans (``"no"`` would read as true)."""


def check_config(config: PretrainedConfig, label: str) -> None:
    """Refuse sizes and flags no model can have, in ``config`` and its sub-configs.

    Raises:
        ConfigError: a size below 1 or above 2**31 - 1, or a flag that is not a bool.
    """
    from layerscope.checks import MAX_SIZE

    architectures = getattr(config, "architectures", None)
    if architectures is not None and (
        not isinstance(architectures, (list, tuple)) or not all(isinstance(a, str) for a in architectures)
    ):
        raise ConfigError(
            f"{label}: architectures must be a list of class names, got {architectures!r}"[:300]
        )
    configs = [("", config)]
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            configs.append((f"{key}.", sub))
    for prefix, c in configs:
        for name in SIZES:
            value = c.__dict__.get(name)
            if value is None:
                continue
            per_layer = name in PER_LAYER_SIZES and isinstance(value, (list, tuple)) and value
            if not all(not isinstance(v, bool) and isinstance(v, int) and 1 <= v <= MAX_SIZE
                       for v in (value if per_layer else [value])):
                allowed = " (or a list of them, per layer)" if name in PER_LAYER_SIZES else ""
                raise ConfigError(
                    f"{label}: {prefix}{name}={str(value)[:40]} is not a size; allowed: a whole "
                    f"number from 1 to 2**31 - 1{allowed}"
                )
        for name in FLAGS:
            value = c.__dict__.get(name)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{label}: {prefix}{name} must be true or false, got {value!r}")


def config_from_dict(data: Mapping[str, Any], label: str) -> PretrainedConfig:
    """Build the transformers config a parsed ``config.json`` describes (``model_type`` selects it).

    Raises:
        ConfigError: no or unknown ``model_type``, a config that needs remote code, or values
            transformers rejects.
    """
    from transformers import CONFIG_MAPPING, __version__

    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(
            f"{label}: no 'model_type' (it names the architecture, e.g. \"llama\"); found keys "
            f"{sorted(data)[:8]}{'...' if len(data) > 8 else ''}"
        )
    if model_type not in CONFIG_MAPPING:
        if "auto_map" in data:
            raise ConfigError(
                f"{label}: model_type {model_type!r} is defined by remote code (auto_map), not by "
                f"transformers {__version__}. To run that code (read it first), pass the folder "
                "holding config.json and its .py files with trust_remote_code=True"
            )
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(
            f"{label}: unknown model_type {model_type!r} for transformers {__version__}{hint} "
            "(a newer transformers may know it)"
        )
    fields = {k: decode_special_floats(v) for k, v in data.items() if k != "auto_map"}
    try:
        config = CONFIG_MAPPING[model_type].from_dict(fields)
    except Exception as exc:
        raise ConfigError(
            f"{label}: transformers rejected this {model_type} config: {exc}"
        ) from exc
    return config


SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
"""How transformers (5.x) writes floats JSON has no literal for: ``{"__float__": "Infinity"}``
(``PreTrainedConfig._encode_special_floats``; Falcon-H1's and Bamba's ``time_step_limit``)."""


def decode_special_floats(value: Any) -> Any:
    """``value`` with every ``{"__float__": "Infinity" | "-Infinity" | "NaN"}`` object replaced
    by the float, as ``AutoConfig.from_pretrained`` reads it; anything else unchanged."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in SPECIAL_FLOATS:
            return SPECIAL_FLOATS[value["__float__"]]
        return {k: decode_special_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_special_floats(v) for v in value]
    return value


def _remote_config(folder: Path, label: str) -> PretrainedConfig:
    """Load a config whose class lives in Python files in ``folder`` (trust_remote_code=True)."""
    from transformers import AutoConfig

    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(
            str(folder), trust_remote_code=True, local_files_only=True
        )
    except Exception as exc:
        raise ConfigError(f"{label}: could not load its remote-code config: {exc}") from exc
    return config


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, from the environment as it is now.

    Same precedence as huggingface_hub: ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``,
    ``HF_HOME``/hub, ``XDG_CACHE_HOME``/huggingface/hub, ``~/.cache/huggingface/hub``.
    (huggingface_hub reads these once at import; reading them here keeps a changed
    environment, e.g. in tests, effective.)
    """
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def cached_config_path(repo_id: str) -> Path | None:
    """The cached ``config.json`` of ``repo_id`` at ``refs/main``, or ``None``. Never downloads."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache_dir())
    except ValueError:  # an id huggingface_hub rejects (HFValidationError) is simply not cached
        return None
    return Path(found) if isinstance(found, str) else None


def _not_cached_message(repo_id: str) -> str:
    close = close_presets(repo_id)
    hint = f" Built-in presets with a similar name: {', '.join(close)}." if close else ""
    return (
        f"{repo_id!r} is not a built-in preset, a local path, or a model in the local Hugging Face "
        f"cache ({hub_cache_dir()}); layerscope never downloads.{hint} Alternatives: a preset name "
        "(layerscope.presets()), a path to the model's config.json, or fetch just that file "
        f"where there is network: `hf download {repo_id} config.json`."
    )
