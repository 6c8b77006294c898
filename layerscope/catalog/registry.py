"""The built-in presets: published model configs shipped as data, looked up by forgiving names.

Each preset is one JSON file in ``layerscope/catalog/presets/``. It records the published
``config.json`` of one model, the repository it comes from, and the model's published parameter
count. This module uses only the standard library: listing or reading presets imports neither
torch nor transformers.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from layerscope.errors import ConfigError

_PRESET_DIR = "presets"


@dataclass(frozen=True)
class Preset:
    """One built-in model: its published config and where that config comes from.

    Attributes:
        name: The preset name, e.g. ``"llama-3.1-8b"``.
        repo: The Hugging Face repository the config was published in.
        file: The file in that repository the config was copied from (``config.json``).
        note: What was kept or left out of the published file, and why.
        published_params: The model's published parameter total (shared tensors counted once),
            or ``None`` where the publisher gives only a rounded figure.
        params_note: Where ``published_params`` comes from.
        aliases: Other spellings that name this preset (repository ids, older repo names).
        config_json: The config as JSON text; use :meth:`config` for a fresh dict.
    """

    name: str
    repo: str
    file: str
    note: str
    published_params: int | None
    params_note: str
    aliases: tuple[str, ...]
    config_json: str

    def config(self) -> dict[str, Any]:
        """A fresh copy of the published config, safe to modify."""
        result: dict[str, Any] = json.loads(self.config_json)
        return result


def normalize_name(name: str) -> str:
    """The key used for matching names: case, ``_`` and spaces do not matter.

    ``"Llama_3.1 8B"`` and ``"llama-3.1-8b"`` have the same key.
    """
    return re.sub(r"[\s_]+", "-", name.strip()).lower()


def presets() -> list[str]:
    """The names of all built-in presets, sorted."""
    return sorted(_index()[0])


def find_preset(name: str) -> Preset | None:
    """The preset ``name`` refers to, or ``None``.

    A name matches a preset's own name or one of its aliases (e.g. the repository id
    ``"meta-llama/Llama-3.1-8B"`` or its last part ``"Llama-3.1-8B"``), ignoring case, ``_``
    and spaces. Failing that, a name that equals exactly one preset or alias once every
    character but letters and digits is dropped also matches (``"qwen2_5_7b"``).
    """
    key = normalize_name(name)
    names, aliases = _index()
    if key in names:
        return _load(key)
    if key in aliases:
        return _load(aliases[key])
    found = {
        target for spelling, target in _spellings().items() if _compact(spelling) == _compact(key)
    }
    if len(found) == 1:
        return _load(found.pop())
    return None


def get_preset(name: str) -> Preset:
    """The preset ``name`` refers to (see :func:`find_preset`).

    Raises:
        ConfigError: no preset has that name; the message suggests close names.
    """
    preset = find_preset(name)
    if preset is None:
        raise ConfigError(unknown_preset_message(name))
    return preset


def close_presets(name: str, n: int = 3) -> list[str]:
    """Up to ``n`` preset names that look like ``name``, best first.

    difflib's close matches on names and aliases (with and without an organisation prefix),
    then presets whose name contains ``name`` once punctuation is dropped (``"phi3"``).
    """
    key = normalize_name(name)
    spellings = _spellings()
    found: list[str] = []
    for k in (key, key.rsplit("/", 1)[-1]):
        for match in difflib.get_close_matches(k, spellings, n=n, cutoff=0.6):
            found.append(spellings[match])
    compact = _compact(key.rsplit("/", 1)[-1])
    if compact:
        found += sorted(p for p in _index()[0] if compact in _compact(p))
    return list(dict.fromkeys(found))[:n]


def unknown_preset_message(name: str) -> str:
    """The message for a name that is no preset, with suggestions."""
    close = close_presets(name)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"{name!r} is not a built-in preset.{hint} "
        f"See layerscope.presets() for all {len(_index()[0])} names, "
        "or pass a path to a config.json, a dict or a transformers config."
    )


def _compact(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _spellings() -> dict[str, str]:
    """Every normalized name and alias -> its preset name."""
    names, aliases = _index()
    return {**{name: name for name in names}, **aliases}


@functools.cache
def _index() -> tuple[frozenset[str], dict[str, str]]:
    """Preset names, and normalized alias -> preset name (read once per process)."""
    names: set[str] = set()
    aliases: dict[str, str] = {}
    for entry in resources.files(__package__).joinpath(_PRESET_DIR).iterdir():
        if not entry.name.endswith(".json"):
            continue
        name = entry.name[: -len(".json")]
        names.add(name)
        data = json.loads(entry.read_text(encoding="utf-8"))
        spellings = [data["source"]["repo"], *data.get("aliases", [])]
        for spelling in spellings:
            for variant in (spelling, spelling.rsplit("/", 1)[-1]):
                aliases.setdefault(normalize_name(variant), name)
    return frozenset(names), aliases


@functools.cache
def _load(name: str) -> Preset:
    """Read one preset file (cached: presets are immutable data)."""
    path = resources.files(__package__).joinpath(_PRESET_DIR).joinpath(f"{name}.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    source = data["source"]
    return Preset(
        name=data["name"],
        repo=source["repo"],
        file=source["file"],
        note=source.get("note", ""),
        published_params=data.get("published_params"),
        params_note=data.get("params_note", ""),
        aliases=tuple(data.get("aliases", ())),
        config_json=json.dumps(data["config"]),
    )
