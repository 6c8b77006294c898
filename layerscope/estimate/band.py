"""What bounds a step (its regime) and how far off the estimate has been there (its band).

A step is **compute-bound** when most of its wall time is spent in kernels limited by the
GPU's FLOP/s (large GEMMs, attention), **memory-bound** when most of it is in kernels limited
by DRAM bandwidth (elementwise work, the loss on a large vocabulary, the optimizer), and
**host-bound** when most of it is neither: the GPU waits for the CPU to issue kernels (Python,
autograd, the optimizer's per-tensor work), for host-device syncs, or pays each kernel's fixed
launch latency. Small steps are host-bound, and they are also the noisiest to measure: the
same configuration measured 72, 89 and 108 ms in three runs.

The band is the range of measured/estimated ratios the estimate has shown on the calibration
rows of the same regime (``benchmarks/time_accuracy.py --derive-band`` prints them): each
regime's central :data:`BAND_COVERAGE` of those ratios. It says how far off this estimator has
been for steps like this one, not a confidence interval over hardware or software versions.
"""

from __future__ import annotations

from typing import Literal

Regime = Literal["compute-bound", "memory-bound", "host-bound"]
REGIMES: tuple[Regime, ...] = ("compute-bound", "memory-bound", "host-bound")

BAND_COVERAGE = 0.85
"""Share of a regime's calibration rows whose measured step time lies inside the band."""

BAND: dict[Regime, tuple[float, float]] = {
    "compute-bound": (0.94, 1.12),
    "memory-bound": (0.86, 1.29),
    "host-bound": (0.86, 1.23),
}
"""Per regime: (low, high) ratios of measured to estimated step time, the 7.5% and 92.5%
quantiles of the 72 H100 calibration rows of that regime (33 compute-, 19 memory-, 20
host-bound), rounded outwards: ``PYTHONPATH=. python benchmarks/time_accuracy.py
--derive-band``. Re-derive them whenever the estimate changes."""


def regime_of(seconds: float, compute_seconds: float, memory_seconds: float) -> Regime:
    """The regime of a step of ``seconds`` wall time, ``compute_seconds`` of it in FLOP-bound
    kernels and ``memory_seconds`` in bandwidth-bound ones; the rest is host and latency."""
    overhead = max(0.0, seconds - compute_seconds - memory_seconds)
    shares = {"compute-bound": compute_seconds, "memory-bound": memory_seconds,
              "host-bound": overhead}
    return max(REGIMES, key=lambda r: shares[r])


def band(seconds: float, regime: Regime) -> tuple[float, float]:
    """(low, high) seconds around an estimate of ``seconds`` in ``regime``."""
    low, high = BAND[regime]
    return seconds * low, seconds * high
