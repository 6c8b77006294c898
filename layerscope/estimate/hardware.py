"""GPU catalogue, minimal: total memory in bytes (the time estimator extends it).

Sizes are the total memory ``nvidia-smi`` reports for each board, in MiB (so an "80GB" H100 is
81559 MiB = 79.6 GiB); usable memory is lower by the CUDA context (see
``layerscope.estimate.memory.CUDA_CONTEXT_BYTES``).
"""

from __future__ import annotations

_MIB = 2**20

GPU_MEMORY_BYTES: dict[str, int] = {
    "H100 80GB": 81559 * _MIB,
    "H200": 143771 * _MIB,
    "A100 80GB": 81920 * _MIB,
    "A100 40GB": 40960 * _MIB,
    "L40S": 46068 * _MIB,
    "A10G": 23028 * _MIB,
    "L4": 23034 * _MIB,
    "RTX 4090": 24564 * _MIB,
    "T4": 15360 * _MIB,
}
