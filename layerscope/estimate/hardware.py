"""The GPU catalogue: memory, dense peak FLOP/s per dtype, memory bandwidth, interconnect and an
optional hourly price, read from ``gpus.json`` next to this file (data, not code).

The interconnect of a GPU is its NVLink bandwidth (None where the GPUs of a node are not all
joined by NVLink), its PCIe host link and the name of a default inter-node network; the
networks themselves (:class:`Fabric`) are the file's ``_fabrics`` table.

Names are matched case-insensitively, ignoring spaces, dashes and underscores, against each
GPU's key and its aliases (``"H100"``, ``"h100 sxm"`` and ``"NVIDIA H100 80GB HBM3"`` all give
``h100-sxm``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Any

from layerscope.checks import finite
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
        nvlink_bandwidth: NVLink bytes/s of one GPU in one direction (half the datasheet's
            bidirectional total), or None where the node's GPUs are not all joined by NVLink.
        pcie_generation: PCIe generation of the host link (4, 5), or None when unknown.
        pcie_bandwidth: bytes/s of the x16 host link in one direction, or None when unknown.
        fabric: the default inter-node network: a catalogue name (:func:`get_fabric`), a
            :class:`Fabric` of your own, or None.
        compute_capability: CUDA compute capability (major, minor), e.g. (9, 0) for Hopper.
    """

    name: str
    full_name: str
    memory_bytes: int
    peak_flops: Mapping[str, float] = dataclasses.field(hash=False)
    memory_bandwidth: float
    sm_count: int
    price_per_hour: float | None = None
    aliases: tuple[str, ...] = ()
    nvlink_bandwidth: float | None = None
    pcie_generation: int | None = None
    pcie_bandwidth: float | None = None
    fabric: str | Fabric | None = None
    compute_capability: tuple[int, int] = (8, 0)

    @property
    def intra_node_bandwidth(self) -> float | None:
        """Bytes/s per direction between two GPUs of one node: NVLink where the node has it,
        else the PCIe link (None when neither is known)."""
        return self.nvlink_bandwidth or self.pcie_bandwidth

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

    def with_fabric(self, fabric: str | Fabric | None) -> GPU:
        """The same GPU in nodes joined by another network (a name from :func:`fabrics`);
        None keeps the catalogue's default.

        Raises:
            EstimateError: an unknown fabric.
        """
        if fabric is None:
            return self
        net = get_fabric(fabric)  # a Fabric of your own is kept whole, not looked up by name
        return dataclasses.replace(self, fabric=net if isinstance(fabric, Fabric) else net.name)


@dataclass(frozen=True)
class Fabric:
    """An inter-node network.

    Attributes:
        name: catalogue key, e.g. ``"infiniband-ndr"``.
        nic_bandwidth: bytes/s of one network adapter in one direction.
        nics_per_node: adapters per node, or None for one per GPU (rail-optimised clusters).
        source: where the figures come from.
    """

    name: str
    nic_bandwidth: float
    nics_per_node: int | None = None
    source: str = ""

    def node_bandwidth(self, gpus_per_node: int) -> float:
        """Bytes/s one node sends in one direction over all its adapters."""
        if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or gpus_per_node < 1:
            raise EstimateError(f"gpus_per_node must be an int >= 1, got {gpus_per_node!r}")
        return self.nic_bandwidth * (self.nics_per_node or gpus_per_node)


def check_price(price: object) -> float | None:
    """Validate an hourly price: None or a finite number >= 0."""
    if price is None:
        return None
    return finite(price, "price_per_hour (USD)", EstimateError)


def _capability(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.lower())


@lru_cache(maxsize=1)
def _raw() -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(
        resources.files("layerscope.estimate").joinpath("gpus.json").read_text()
    )
    return raw


@lru_cache(maxsize=1)
def _catalogue() -> tuple[dict[str, GPU], dict[str, str]]:
    raw = _raw()
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
            nvlink_bandwidth=entry.get("nvlink_bandwidth"),
            pcie_generation=entry.get("pcie_generation"),
            pcie_bandwidth=entry.get("pcie_bandwidth"),
            fabric=entry.get("fabric"),
            compute_capability=_capability(entry.get("compute_capability", "8.0")),
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


@lru_cache(maxsize=1)
def _fabrics() -> dict[str, Fabric]:
    return {
        name: Fabric(name=name, nic_bandwidth=float(entry["nic_bandwidth"]),
                     nics_per_node=entry["nics_per_node"], source=entry["source"])
        for name, entry in _raw()["_fabrics"].items()
    }


def fabrics() -> list[str]:
    """Inter-node network keys, sorted."""
    return sorted(_fabrics())


def get_fabric(name: str | Fabric) -> Fabric:
    """Look an inter-node network up by key (case-insensitive); a :class:`Fabric` is returned
    as is.

    Raises:
        EstimateError: an unknown name; the message lists all keys.
    """
    if isinstance(name, Fabric):
        return name
    if not isinstance(name, str):
        raise EstimateError(f"fabric must be a name (str) or a Fabric, got {type(name).__name__}")
    table = _fabrics()
    key = name.strip().lower()
    if key not in table:
        raise EstimateError(f"unknown fabric {name!r}; known: {', '.join(fabrics())}")
    return table[key]
