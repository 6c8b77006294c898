"""The GPU catalogue: memory, dense peak FLOP/s per dtype, memory bandwidth and an optional
hourly price, read from ``gpus.json`` next to this file (data, not code).

Names are matched case-insensitively, ignoring spaces, dashes and underscores, against each
GPU's key and its aliases (``"H100"``, ``"h100 sxm"`` and ``"NVIDIA H100 80GB HBM3"`` all give
``h100-sxm``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Any

from layerscope.errors import EstimateError


@dataclass(frozen=True)
class GPU:
    """One accelerator model.

    Attributes:
        name: catalogue key, e.g. ``"h100-sxm"``.
        full_name: the vendor's name.
        memory_bytes: total memory as ``nvidia-smi`` reports it (81559 MiB for an H100 80GB).
        peak_flops: dense peak FLOP/s per dtype key (``"fp32"`` is the non-tensor-core rate;
            ``"tf32"``, ``"bf16"``, ``"fp16"``, ``"fp8"`` are tensor-core rates, no sparsity).
        memory_bandwidth: peak DRAM bandwidth in bytes/s.
        sm_count: streaming multiprocessors (a GEMM's tiles are spread over them).
        price_per_hour: indicative USD per GPU-hour, or None when unknown.
        aliases: other accepted names.
    """

    name: str
    full_name: str
    memory_bytes: int
    peak_flops: Mapping[str, float] = dataclasses.field(hash=False)
    memory_bandwidth: float
    sm_count: int
    price_per_hour: float | None = None
    aliases: tuple[str, ...] = ()

    def peak(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype`` (``"fp32"``, ``"tf32"``, ``"bf16"``, ...).

        Raises:
            EstimateError: the catalogue has no rate for ``dtype`` on this GPU.
        """
        if dtype not in self.peak_flops:
            raise EstimateError(
                f"{self.name}: no peak FLOP/s known for dtype {dtype!r}; "
                f"known: {', '.join(sorted(self.peak_flops))}"
            )
        return self.peak_flops[dtype]

    def with_price(self, price_per_hour: float | None) -> GPU:
        """The same GPU with another hourly price (None clears it).

        Raises:
            EstimateError: a negative, infinite or non-numeric price.
        """
        return dataclasses.replace(self, price_per_hour=check_price(price_per_hour))


def check_price(price: object) -> float | None:
    """Validate an hourly price: None or a finite number >= 0."""
    if price is None:
        return None
    if isinstance(price, bool) or not isinstance(price, (int, float)) or not (
        math.isfinite(price) and price >= 0
    ):
        raise EstimateError(f"price_per_hour must be a finite number >= 0 (USD), got {price!r}")
    return float(price)


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.lower())


@lru_cache(maxsize=1)
def _catalogue() -> tuple[dict[str, GPU], dict[str, str]]:
    raw: dict[str, Any] = json.loads(
        resources.files("layerscope.estimate").joinpath("gpus.json").read_text()
    )
    table: dict[str, GPU] = {}
    lookup: dict[str, str] = {}
    for name, entry in raw.items():
        if name.startswith("_"):
            continue
        gpu = GPU(
            name=name,
            full_name=entry["full_name"],
            memory_bytes=int(entry["memory_mib"]) * 2**20,
            peak_flops=MappingProxyType({k: float(v) for k, v in entry["peak_flops"].items()}),
            memory_bandwidth=float(entry["memory_bandwidth"]),
            sm_count=int(entry["sm_count"]),
            price_per_hour=entry.get("price_per_hour"),
            aliases=tuple(entry.get("aliases", ())),
        )
        table[name] = gpu
        for alias in (name, gpu.full_name, *gpu.aliases):
            lookup[_key(alias)] = name
    return table, lookup


def gpus() -> list[str]:
    """Catalogue keys, sorted."""
    return sorted(_catalogue()[0])


def get_gpu(name: str | GPU) -> GPU:
    """Look a GPU up by key or alias (case-insensitive); a :class:`GPU` is returned as is.

    Raises:
        EstimateError: an unknown name; the message suggests close names and lists all keys.
    """
    if isinstance(name, GPU):
        return name
    if not isinstance(name, str):
        raise EstimateError(f"gpu must be a name (str) or a GPU, got {type(name).__name__}")
    table, lookup = _catalogue()
    key = _key(name)
    if key in lookup:
        return table[lookup[key]]
    close = difflib.get_close_matches(key, list(lookup), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(dict.fromkeys(lookup[c] for c in close))}? " if close else ""
    raise EstimateError(f"unknown GPU {name!r}; {hint}known: {', '.join(gpus())}")
