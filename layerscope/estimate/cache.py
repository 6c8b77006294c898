"""Results remembered per model object, so every estimate of one model shares its traces.

Entries live as long as the model does (a weak reference keys them), so estimating a real
model never keeps it alive; each model's entries are bounded.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any

from torch import nn

MAX_ENTRIES = 256
"""Results kept per model and kind (least recently used dropped first); a command needs a
few dozen."""

_LOCK = threading.Lock()
_CACHES: weakref.WeakKeyDictionary[nn.Module, dict[str, _Lru]] = weakref.WeakKeyDictionary()


class _Lru:
    """A small thread-safe least-recently-used mapping."""

    def __init__(self) -> None:
        self._data: OrderedDict[Any, Any] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        with _LOCK:
            return key in self._data

    def __getitem__(self, key: Any) -> Any:
        with _LOCK:
            self._data.move_to_end(key)
            return self._data[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        with _LOCK:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > MAX_ENTRIES:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def model_cache(model: nn.Module, kind: str) -> _Lru:
    """The cache of ``kind`` results (``"step"``, ``"memory"``, ...) of ``model``."""
    with _LOCK:
        per_model = _CACHES.setdefault(model, {})
        return per_model.setdefault(kind, _Lru())
