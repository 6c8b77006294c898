"""How long a kernel takes on a GPU: a roofline with launch and host costs, as named constants.

* a GEMM takes ``max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth)``, where the
  achievable FLOP/s is :data:`GEMM_EFFICIENCY` of the dense peak times the share of the GPU's
  SMs its output tiles keep busy (small matmuls cannot fill the GPU);
* a memory-bound kernel takes ``bytes / (BANDWIDTH_EFFICIENCY * peak bandwidth)``;
* every kernel also costs :data:`KERNEL_LATENCY_S` on the GPU, and the host must issue it
  (:data:`HOST_FORWARD_S_PER_KERNEL`, :data:`HOST_BACKWARD_S_PER_KERNEL`); eager PyTorch runs
  the host ahead of the GPU, so a phase takes ``max(host, device)``.

Every constant is physical, global and documented where it is defined; none is set per model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from layerscope.estimate.hardware import GPU
from layerscope.setup import Precision

# -- named assumptions ------------------------------------------------------------------------
GEMM_EFFICIENCY = {"fp32": 0.80, "tf32": 0.70, "bf16": 0.70, "fp16": 0.70, "fp8": 0.70}
"""Fraction of the dense peak a large cuBLAS GEMM sustains, per matmul dtype: tensor-core
GEMMs run at power-limited clocks (H100 SXM bf16: ~650-750 of 989 TFLOP/s); CUDA-core SGEMM
keeps closer to its lower peak (~50-55 of 67 TFLOP/s)."""

ATTENTION_EFFICIENCY = 0.35
"""Fraction of the dense peak reached by PyTorch's SDPA kernels (FlashAttention-2 forward on
H100 reaches ~330-350 TFLOP/s; Dao, "FlashAttention-2", 2023, fig. 6)."""

ATTENTION_BACKWARD_RATIO = 2.5
"""Attention backward FLOPs over forward: five matmuls (QK^T recomputed, dV, dP, dQ, dK)
against two (Dao et al., FlashAttention-2, section 3.1)."""

BANDWIDTH_EFFICIENCY = 0.75
"""Fraction of the peak DRAM bandwidth streaming and foreach kernels sustain (~2.5 TB/s of
3.35 TB/s on H100 SXM)."""

KERNEL_LATENCY_S = 4e-6
"""GPU time of an empty kernel: launch, ramp-up and tail (a few microseconds)."""

HOST_FORWARD_S_PER_KERNEL = 32e-6
"""Host time per kernel of an eager Python forward: the module call, the aten op, its
views/reshapes and autograd bookkeeping (HF blocks issue ~4 view ops per kernel)."""

HOST_BACKWARD_S_PER_KERNEL = 17e-6
"""Host time per backward kernel, issued by the C++ autograd engine (no Python)."""

HOST_LOOP_S_PER_KERNEL = 8e-6
"""Host time per kernel of a bare Python loop of tensor ops (no module call, few views), as in
transformers' eager MoE expert loop."""

HOST_OPTIMIZER_S_PER_TENSOR = 10e-6
"""Python time per trainable tensor in ``optimizer.step()`` + ``zero_grad()`` (state lookup,
grouping tensors by device and dtype)."""

GEMM_TILE = 128
"""Output tile edge of the GEMM kernels (cuBLAS/CUTLASS on Hopper and Ampere: 128x128 and
up), used to count how many SMs a GEMM can keep busy."""

SPLIT_K_MIN = 512
"""cuBLAS splits the reduction of a GEMM with too few output tiles to fill the GPU into
chunks of at least this many (split-K / stream-K), so skinny GEMMs still use most SMs."""

SYNC_S = 15e-6
"""A host-device synchronisation (``nonzero``, ``tensor.item()``): the host waits for the
queue to drain and the GPU for the next launch."""



# -- optimizer passes -------------------------------------------------------------------------
OPTIMIZER_PASSES = {
    # torch.optim._multi_tensor_adam with decoupled weight decay: mul_(p) 2, lerp_(m, g) 3,
    # mul_(v) 2, addcmul_(v, g, g) 4, sqrt(v) 2, div_ 2, add_(eps) 2, addcdiv_(p, m, d) 4.
    "adamw": (21, 8),
    # torch.optim Adam without weight decay: the same without the mul_(p).
    "adam": (19, 7),
    # _fused_adamw: one kernel reads p, g, m, v and writes p, m, v.
    "adamw-fused": (7, 1),
    # _multi_tensor_sgd, momentum: mul_(buf) 2, add_(buf, g) 3, add_(p, buf) 3.
    "sgd-momentum": (8, 3),
    # _multi_tensor_sgd without momentum: add_(p, g) 3.
    "sgd": (3, 1),
    # bitsandbytes AdamW8bit: one kernel per tensor reads p, g and the two 1-byte moments and
    # writes p and the moments: about 5 weight-sized passes (not checked against a GPU).
    "adamw-8bit": (5, 1),
    # torch.optim.Adafactor (foreach): row/column means of g*g, the factored estimate, the
    # update and its RMS clip, about as many passes as foreach AdamW (not checked on a GPU).
    "adafactor": (21, 10),
}
"""Per optimizer: (element passes over a trainable tensor per step, foreach kernels per step).
A pass reads or writes every element once."""

FOREACH_ELEMENTS_PER_LAUNCH = 320 * 65536
"""multi_tensor_apply processes at most 320 chunks of 65536 elements per launch
(aten/src/ATen/native/cuda/MultiTensorApply.cuh)."""


@dataclass(frozen=True)
class Phase:
    """One part of a step.

    Attributes:
        seconds: estimated wall time.
        flops: matmul and attention FLOPs.
        bytes: DRAM bytes read and written.
        kernels: GPU kernels launched.
        device_seconds: GPU busy time (FLOP-, bandwidth- and latency-bound kernels).
        host_seconds: CPU time to issue the kernels.
    """

    seconds: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    kernels: int = 0
    device_seconds: float = 0.0
    host_seconds: float = 0.0



# -- the workload: kernels with FLOPs and bytes -----------------------------------------------
@dataclass
class Work:
    """Accumulates kernels of one phase on one GPU."""

    gpu: GPU
    precision: Precision
    host_s_per_kernel: float
    flops: float = 0.0
    bytes: float = 0.0
    kernels: int = 0
    device: float = 0.0
    serial_s: float = 0.0
    serial_host: float = 0.0
    serial_device: float = 0.0
    serial_kernels: int = 0

    def gemm(self, m: float, n: int, k: int, count: float = 1.0, dtype_bytes: int = 0) -> None:
        """``count`` GEMMs (m x k) @ (k x n): 2mnk FLOPs each (the multiply-add counted as 2)."""
        if m <= 0 or count <= 0:
            return
        a = dtype_bytes or self.precision.act_bytes
        flops = 2.0 * m * n * k
        nbytes = a * (m * k + k * n + m * n)
        peak = self.gpu.peak(self.precision.matmul) * GEMM_EFFICIENCY[self.precision.matmul]
        t_compute = flops / (peak * busy_share(m, n, k, self.gpu.sm_count))
        t_memory = nbytes / (self.gpu.memory_bandwidth * BANDWIDTH_EFFICIENCY)
        self._add(count, flops, nbytes, max(t_compute, t_memory))

    def attention(self, flops: float, nbytes: float, kernels: float = 1.0) -> None:
        peak = self.gpu.peak(self.precision.matmul)
        t = max(flops / (peak * ATTENTION_EFFICIENCY),
                nbytes / (self.gpu.memory_bandwidth * BANDWIDTH_EFFICIENCY))
        self.flops += flops
        self.bytes += nbytes
        self.kernels += round(kernels)
        self.device += t + kernels * KERNEL_LATENCY_S

    def stream(self, nbytes: float, kernels: float) -> None:
        """Memory-bound kernels moving ``nbytes`` in total."""
        if kernels <= 0:
            return
        self.bytes += nbytes
        self.kernels += round(kernels)
        self.device += nbytes / (self.gpu.memory_bandwidth * BANDWIDTH_EFFICIENCY)
        self.device += kernels * KERNEL_LATENCY_S

    def _add(self, count: float, flops: float, nbytes: float, t: float) -> None:
        self.flops += count * flops
        self.bytes += count * nbytes
        self.kernels += round(count)
        self.device += count * (t + KERNEL_LATENCY_S)

    def serial(self, syncs: int, work: Work) -> None:
        """Add ``work`` that a host-device sync serialises: its host and GPU time add up."""
        host = work.kernels * work.host_s_per_kernel + syncs * SYNC_S
        self.flops += work.flops
        self.bytes += work.bytes
        self.kernels += work.kernels
        self.serial_s += host + work.device
        self.serial_host += host
        self.serial_device += work.device
        self.serial_kernels += work.kernels

    def phase(self, extra_host: float = 0.0, overlap: bool = True) -> Phase:
        host = (self.kernels - self.serial_kernels) * self.host_s_per_kernel + extra_host
        overlapped = self.device - self.serial_device
        seconds = (max(host, overlapped) if overlap else host + overlapped) + self.serial_s
        return Phase(seconds, self.flops, self.bytes, self.kernels, self.device,
                     host + self.serial_host)


def busy_share(m: float, n: int, k: int, sms: int) -> float:
    """Share of the SMs a GEMM keeps busy: output tiles of GEMM_TILE x GEMM_TILE, the
    reduction split (split-K) while tiles are fewer than SMs, then the last wave's idle SMs."""
    tiles = math.ceil(m / GEMM_TILE) * math.ceil(n / GEMM_TILE)
    if tiles < sms:
        tiles *= max(1, min(sms // tiles, k // SPLIT_K_MIN))
    waves = math.ceil(tiles / sms)
    return tiles / (waves * sms)


# -- per-kernel byte counts (documented once) -------------------------------------------------
RMSNORM_KERNELS = 7
"""transformers' RMSNorm in Python: to(fp32), pow, mean, add eps + rsqrt, mul, to(dtype), mul
by the weight."""

ROTARY_KERNELS, ROTARY_PASSES = 10, 9
"""apply_rotary_pos_emb on q and k: mul cos, neg + cat (rotate_half), mul sin, add, for each."""

EXPERT_LOOP_KERNELS = 10
"""Non-GEMM kernels per expert of transformers' eager MoE loop: the hit test, ``where``, the
token gather, two expert-weight gathers, activation, gate multiply, routing-weight gather and
multiply, ``index_add_``."""

LOSS_FORWARD_KERNELS, LOSS_BACKWARD_KERNELS = 4, 4
"""ForCausalLMLoss: logits.float(), log_softmax, nll_loss (+ the shifted labels); backward:
nll_loss_backward (zero-filled), log_softmax_backward, the cast back, the label shift."""

BACKWARD_ELEMENTWISE_RATIO = 2.0
"""Backward kernels and bytes of elementwise work per forward kernel: each op's backward
reads its saved inputs and the incoming gradient and writes the outgoing one (a dispatch trace
of a Llama block on transformers 5 gives 59 non-GEMM backward kernels for 33 forward)."""
