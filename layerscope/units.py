"""Units, defined once: bytes per dtype, binary byte formatting and parameter counts.

Bytes are integers everywhere inside layerscope; GiB (2**30 bytes) is used only when shown.
"""

from __future__ import annotations

import math

import torch

GIB = 2**30
MIB = 2**20

_DTYPE_BYTES: dict[torch.dtype, float] = {
    torch.float64: 8,
    torch.float32: 4,
    torch.float16: 2,
    torch.bfloat16: 2,
    torch.int64: 8,
    torch.int32: 4,
    torch.int16: 2,
    torch.int8: 1,
    torch.uint8: 1,
    torch.bool: 1,
    torch.float8_e4m3fn: 1,
    torch.float8_e5m2: 1,
    torch.complex64: 8,
}


def dtype_bytes(dtype: torch.dtype) -> float:
    """Bytes per element of ``dtype`` (fractional for packed 4-bit types).

    Raises:
        ValueError: for a dtype layerscope has no size for.
    """
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    try:
        return torch.empty((), dtype=dtype, device="meta").element_size()
    except Exception as exc:  # pragma: no cover - exotic dtypes only
        raise ValueError(f"no byte size known for dtype {dtype}") from exc


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"`` or a dtype -> ``torch.dtype``."""
    if isinstance(value, torch.dtype):
        return value
    aliases = {
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp64": torch.float64, "float64": torch.float64,
    }
    key = str(value).lower().removeprefix("torch.")
    if key not in aliases:
        raise ValueError(f"unknown dtype {value!r}; expected one of {sorted(aliases)}")
    return aliases[key]


def format_bytes(n: float, digits: int = 2) -> str:
    """Binary units, labelled as such: ``format_bytes(3 * 2**30) == "3.00 GiB"``."""
    n = float(n)
    for unit, size in (("TiB", 2**40), ("GiB", GIB), ("MiB", MIB), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.{digits}f} {unit}"
    return f"{int(n)} B"


def format_count(n: int) -> str:
    """Human parameter counts: 1_234_567_890 -> "1.2B", 124_439_808 -> "124.4M", 950 -> "950"."""
    for suffix, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{suffix}"
    return str(int(n))


def format_duration(seconds: float) -> str:
    """``4687.5`` -> ``"1h 18m 7s"`` (whole seconds, truncated; days shown past 24 h)."""
    if seconds < 0 or math.isnan(seconds):
        raise ValueError(f"duration must be >= 0 seconds, got {seconds}")
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if days:
        parts.append(f"{days}d")
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{secs}s")
    return " ".join(parts)
