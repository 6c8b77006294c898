"""The model catalog: built-in presets (published configs as data) and source resolution.

Importing this package imports neither torch nor transformers.
"""

from layerscope.catalog.registry import Preset, find_preset, get_preset, presets

__all__ = ["Preset", "find_preset", "get_preset", "presets"]
