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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from layerscope.errors import EstimateError
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
"""Fraction of the peak DRAM bandwidth elementwise kernels sustain (~2.5 TB/s of 3.35 TB/s on
H100 SXM); the optimizer's long multi-tensor loops reach more
(:data:`FOREACH_BANDWIDTH_EFFICIENCY`)."""

KERNEL_LATENCY_S = 4e-6
"""GPU time of an empty kernel: launch, ramp-up and tail (a few microseconds)."""

HOST_FORWARD_S_PER_KERNEL = 40e-6
"""Host time per kernel of an eager Python forward: the module call, the aten op, its
views/reshapes and autograd bookkeeping (transformers 5 blocks issue several Python-level
ops per kernel). With :data:`HOST_BACKWARD_S_PER_KERNEL`, the pair that best fits the
calibration rows whose steps are host-bound (gpt2 and mixtral-tiny at 4 x 512 in bf16 and
bf16-mixed, llama3.2-1b's forward at 4 x 512); ``benchmarks/time_accuracy.py`` shows the fit
per regime. Held for every model: a CPU/GPU pairing other than the calibration's (an H100
host) shifts them."""

HOST_BACKWARD_S_PER_KERNEL = 27e-6
"""Host time per backward kernel, issued by the C++ autograd engine (no Python, but a node,
its saved tensors and a launch per kernel); see :data:`HOST_FORWARD_S_PER_KERNEL`."""

HOST_LOOP_S_PER_KERNEL = 8e-6
"""Host time per kernel of a bare Python loop of tensor ops (no module call, few views), as in
transformers' eager MoE expert loop."""

HOST_ATEN_S_PER_KERNEL = 5e-6
"""Host time per kernel issued by a C++ loop inside one aten op (no Python, no autograd node):
the dispatcher and the launch, e.g. the per-group ``mm_out`` calls of PyTorch's
``_grouped_mm`` fallback (``aten/src/ATen/native/GroupedMMUtils.h``). An estimate: a CUDA
launch costs a few microseconds of host time."""

HOST_AUTOCAST_CAST_S = 15e-6
"""Host time of a cast CUDA autocast issues inside a matmul's op for a tensor that requires
grad (a trainable weight, or an activation gradients flow through): besides the dispatch and
launch of :data:`HOST_ATEN_S_PER_KERNEL`, the cast passes the Autograd dispatch key, which
allocates and wires a ``ToCopyBackward0`` node (``torch/csrc/autograd/generated/
VariableType``); a frozen weight's cast records none and costs :data:`HOST_ATEN_S_PER_KERNEL`.
An estimate of the code path (about twice a bare launch, half a backward node's
:data:`HOST_BACKWARD_S_PER_KERNEL`), checked on the bf16-mixed calibration rows:
``benchmarks/time_accuracy.py`` gives a median |error| of 7.9% with every cast at 5 us and
7.6-7.7% anywhere from 10 to 25 us (not sensitive to the value within that range)."""

HOST_CHECKPOINT_S_PER_BLOCK = 60e-6
"""Host time per block of non-reentrant gradient checkpointing besides its kernels: capturing
the CPU and CUDA RNG states and the autocast state in forward, restoring them
(``torch.random.fork_rng``) around the recomputation (``torch/utils/checkpoint.py``). An
estimate from the code path (tens of Python calls), not a measurement."""

HOST_CHECKPOINT_S_PER_SAVED = 12e-6
"""Host time per tensor a checkpointed block saves for backward (about one per forward
kernel): three Python saved-tensor hooks (the pack hook in forward, the recomputation's pack
hook, the unpack hook in backward) and the default determinism check, which records and
compares each saved tensor's shape, dtype and device (``torch/utils/checkpoint.py``). The
host-bound checkpointed calibration row (mixtral-tiny, 8 x 1024) implies ~11 us."""

HOST_OPTIMIZER_S_PER_TENSOR = 10e-6
"""Python time per trainable tensor in ``optimizer.step()`` + ``zero_grad()`` (state lookup,
grouping tensors by device and dtype)."""

UNALIGNED_GEMM_SPEED = 0.5
"""Speed of a GEMM with a dimension that is not a multiple of 16 bytes (GPT-2's vocabulary of
50257) against an aligned one: cuBLAS falls back to kernels without vectorised/TMA loads.
Karpathy measured a ~25% faster nanoGPT step after padding the vocabulary to 50304, the output
head being ~30% of its FLOPs: about twice as fast GEMMs."""

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
    # transformers' AdamW, per tensor (the Trainer's weight_decay defaults to 0, so no decay
    # add_): mul_(m) 2, add_(m, g) 3, mul_(v) 2, addcmul_(v, g, g) 4, sqrt(v) 2, add_(eps) 2,
    # addcdiv_(p, m, d) 4: 7 kernels for each tensor (PER_TENSOR_OPTIMIZERS).
    "adamw-hf": (19, 7),
    # _fused_adamw: one kernel reads p, g, m, v and writes p, m, v.
    "adamw-fused": (7, 1),
    # _multi_tensor_sgd, momentum: mul_(buf) 2, add_(buf, g) 3, add_(p, buf) 3.
    "sgd-momentum": (8, 3),
    # _multi_tensor_sgd without momentum: add_(p, g) 3.
    "sgd": (3, 1),
    # bitsandbytes AdamW8bit: one kernel per tensor reads p, g and the two 1-byte moments and
    # writes p and the moments: about 5 weight-sized passes (not checked against a GPU).
    "adamw-8bit": (5, 1),
    # PagedAdamW8bit: the same kernel; its paged moments are on the GPU once paged in (the
    # first step after an eviction pays PCIe transfers, not modelled).
    "paged-adamw-8bit": (5, 1),
    # PagedAdamW32bit: bitsandbytes' 32-bit Adam kernel reads p, g, m, v and writes p, m, v.
    "paged-adamw-32bit": (7, 1),
    # torch.optim.Adafactor (foreach): row/column means of g*g, the factored estimate, the
    # update and its RMS clip, about as many passes as foreach AdamW (not checked on a GPU).
    "adafactor": (21, 10),
}
"""Per optimizer: (element passes over a trainable tensor per step, foreach kernels per step).
A pass reads or writes every element once."""

PER_TENSOR_OPTIMIZERS = frozenset({"adamw-hf"})
"""Optimizers whose step loops over the tensors in Python: their kernels per step are their
:data:`OPTIMIZER_PASSES` count times the tensors, not multi-tensor launches."""

FOREACH_CHUNK, FOREACH_CHUNKS_PER_LAUNCH, FOREACH_TENSORS_PER_LAUNCH = 65536, 320, 48
"""multi_tensor_apply splits tensors into chunks of 65536 elements and launches a kernel when
it holds 320 chunks or, for three tensor lists, 48 tensors
(aten/src/ATen/native/cuda/MultiTensorApply.cuh: depth_to_max_blocks, depth_to_max_tensors)."""

FOREACH_ELEMENTS_PER_LAUNCH = FOREACH_CHUNK * FOREACH_CHUNKS_PER_LAUNCH

FOREACH_BANDWIDTH_EFFICIENCY = {4: 0.85, 2: 0.80}
"""Fraction of the peak DRAM bandwidth the optimizer's multi-tensor kernels reach, by bytes per
element of the states: from the calibration rows' ``optimizer_seconds`` with the largest
states (llama3.2-1b and mixtral-tiny, AdamW foreach: 21 passes over 1.24 B fp32 elements in
39.7 ms, of which ~1.5 ms of Python per tensor: ~2.8 TB/s; bf16 states ~2.7 TB/s). Long
streaming loops, so higher than :data:`BANDWIDTH_EFFICIENCY`; in bf16 the fp32 arithmetic per
byte doubles."""


def foreach_launches(numel: int, tensors: int) -> int:
    """Kernel launches of one multi-tensor op over ``tensors`` tensors of ``numel`` elements
    in all (each tensor's last chunk is partial: about half a chunk more per tensor)."""
    chunks = numel / FOREACH_CHUNK + tensors / 2
    return max(1, math.ceil(chunks / FOREACH_CHUNKS_PER_LAUNCH),
               math.ceil(tensors / FOREACH_TENSORS_PER_LAUNCH))


@dataclass(frozen=True)
class Phase:
    """One part of a step.

    Attributes:
        seconds: wall time this phase adds to the step: how far it moves the moment the GPU
            finishes (see :func:`run`), so the phases of a step add up to the step.
        flops: matmul and attention FLOPs.
        bytes: DRAM bytes read and written.
        kernels: GPU kernels launched.
        device_seconds: GPU busy time (FLOP-, bandwidth- and latency-bound kernels).
        host_seconds: CPU time to issue the kernels (and the syncs it waits in).
        compute_seconds: the part of ``device_seconds`` spent in kernels bound by FLOP/s.
        memory_seconds: the part of ``device_seconds`` spent in kernels bound by bandwidth.
    """

    seconds: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    kernels: int = 0
    device_seconds: float = 0.0
    host_seconds: float = 0.0
    compute_seconds: float = 0.0
    memory_seconds: float = 0.0


@dataclass(frozen=True)
class Kernels:
    """``count`` alike kernels issued one after another, as one entry of a :class:`Work`.

    ``host`` is the CPU time to issue all of them, ``device`` their GPU time (launch
    latency included), of which ``compute`` is FLOP-bound and ``memory`` bandwidth-bound.
    ``sync``: the host first waits for the GPU to drain (``nonzero``, ``.item()``, ``.cpu()``).
    """

    label: str
    count: int
    host: float
    device: float
    flops: float = 0.0
    bytes: float = 0.0
    compute: float = 0.0
    memory: float = 0.0
    sync: bool = False


# -- the workload: kernels with FLOPs and bytes -----------------------------------------------
@dataclass
class Work:
    """The kernels of a step in the order the host issues them.

    ``label`` (the phase the next kernels belong to) and ``host_s_per_kernel`` (what it costs
    the host to issue one of them) are set by the caller as it walks the step.
    """

    gpu: GPU
    precision: Precision
    host_s_per_kernel: float
    label: str = "forward"
    items: list[Kernels] = field(default_factory=list)

    def gemm(self, m: float, n: int, k: float, count: float = 1.0, dtype_bytes: int = 0,
             matmul: str | None = None, ragged: str = "") -> None:
        """``count`` GEMMs (m x k) @ (k x n): 2mnk FLOPs each (the multiply-add counted as 2).

        ``dtype_bytes`` and ``matmul`` (a catalogue dtype key) override the precision's, for
        matmuls that run in another dtype (fp32 adapters, fp32 expert weights under autocast).
        ``ragged`` (``"m"`` or ``"k"``): that dimension counts the rows of a slice of a larger
        matrix (one expert's share of the routed tokens), so it sets no leading dimension and
        does not decide alignment, and any number of rows is possible: ``"m"`` rows are cut
        into whole output tiles, the last one partly empty (see :func:`gemm_seconds`).
        """
        if m <= 0 or n <= 0 or k <= 0 or count <= 0:  # an empty matrix: no kernel's work
            return
        a = dtype_bytes or self.precision.act_bytes
        dtype = matmul or self.precision.matmul
        flops = 2.0 * m * n * k
        nbytes = a * (m * k + k * n + m * n)
        peak = self.gpu.peak(dtype) * GEMM_EFFICIENCY[dtype]
        t_compute = gemm_seconds(flops, peak, m, n, k, self.gpu.sm_count, element_bytes=a,
                                 tensor_cores=dtype != "fp32", ragged=ragged)
        t_memory = nbytes / (self.gpu.memory_bandwidth * BANDWIDTH_EFFICIENCY)
        self._add(count, flops * count, nbytes * count, count * t_compute, count * t_memory)

    def batched_gemm(self, m: float, n: int, k: float, batch: float, dtype_bytes: int = 0,
                     matmul: str | None = None) -> None:
        """One kernel running ``batch`` GEMMs (m x k) @ (k x n): ``torch.bmm`` over (batch,
        head) pairs, or CUTLASS's grouped GEMM over experts (``torch._grouped_mm``), whose
        output tiles all share the GPU's SMs in one launch."""
        if m <= 0 or n <= 0 or batch <= 0 or k <= 0:
            return
        a = dtype_bytes or self.precision.act_bytes
        dtype = matmul or self.precision.matmul
        flops = 2.0 * m * n * k * batch
        nbytes = a * (m * k + k * n + m * n) * batch
        peak = self.gpu.peak(dtype) * GEMM_EFFICIENCY[dtype]
        t_compute = gemm_seconds(flops, peak, m, n, k, self.gpu.sm_count, batch, element_bytes=a,
                                 tensor_cores=dtype != "fp32")
        t_memory = nbytes / (self.gpu.memory_bandwidth * BANDWIDTH_EFFICIENCY)
        self._add(1, flops, nbytes, t_compute, t_memory)

    def grouped_gemm(self, shapes: list[tuple[float, int, float]], dtype_bytes: int = 0,
                     matmul: str | None = None, ragged: str = "m") -> None:
        """One launch running GEMMs of different shapes ``(m, n, k)``: CUTLASS's grouped GEMM
        over experts (``torch._grouped_mm``), each group a slice of the sorted tokens.

        Each group is cut into output tiles of its own, and with ``ragged="m"`` (the groups'
        rows are the routed tokens) each tile row computes :data:`GEMM_TILE` rows (a group of
        130 rows runs two tile rows, as one of 256 does); the tiles of every group share the
        GPU's SMs in waves, as one launch. ``ragged`` as for :meth:`gemm`.
        """
        shapes = [(m, n, k) for m, n, k in shapes if m > 0 and n > 0 and k > 0]
        if not shapes:
            return
        a = dtype_bytes or self.precision.act_bytes
        dtype = matmul or self.precision.matmul
        flops = sum(2.0 * m * n * k for m, n, k in shapes)
        nbytes = sum(a * (m * k + k * n + m * n) for m, n, k in shapes)
        peak = self.gpu.peak(dtype) * GEMM_EFFICIENCY[dtype]
        tiles = sum(math.ceil(m / GEMM_TILE) * math.ceil(n / GEMM_TILE) for m, n, _ in shapes)
        padded = sum(2.0 * tile_rows(m, ragged) * n * k for m, n, k in shapes)
        sms = self.gpu.sm_count
        if tiles < sms:  # split-K, as for one GEMM (see waves)
            tiles *= max(1, min(sms // tiles, int(min(k for _, _, k in shapes)) // SPLIT_K_MIN))
        ok = dtype == "fp32" or all(_aligned_dims(m, n, k, a, ragged) for m, n, k in shapes)
        speed = 1.0 if ok else UNALIGNED_GEMM_SPEED
        t_compute = padded / (peak * speed * tiles / (math.ceil(tiles / sms) * sms))
        t_memory = nbytes / (self.gpu.memory_bandwidth * BANDWIDTH_EFFICIENCY)
        self._add(1, flops, nbytes, t_compute, t_memory)

    def attention(self, flops: float, nbytes: float, kernels: float = 1.0,
                  efficiency: float = ATTENTION_EFFICIENCY, matmul: str | None = None) -> None:
        """Fused attention kernels doing ``flops`` at ``efficiency`` of the dense peak."""
        peak = self.gpu.peak(matmul or self.precision.matmul)
        self._add(kernels, flops, nbytes, flops / (peak * efficiency),
                  nbytes / (self.gpu.memory_bandwidth * BANDWIDTH_EFFICIENCY))

    def stream(self, nbytes: float, kernels: float,
               efficiency: float = BANDWIDTH_EFFICIENCY) -> None:
        """Memory-bound kernels moving ``nbytes`` in total at ``efficiency`` of the peak."""
        if kernels <= 0:
            return
        self._add(kernels, 0.0, nbytes, 0.0, nbytes / (self.gpu.memory_bandwidth * efficiency))

    @contextmanager
    def host_rate(self, seconds: float) -> Iterator[None]:
        """Kernels added inside cost ``seconds`` of host time each (e.g. casts autocast issues
        from C++ within one Python op)."""
        old, self.host_s_per_kernel = self.host_s_per_kernel, seconds
        try:
            yield
        finally:
            self.host_s_per_kernel = old

    def host(self, seconds: float) -> None:
        """Host work that issues no kernel (Python bookkeeping)."""
        if seconds > 0:
            self.items.append(Kernels(self.label, 0, seconds, 0.0))

    def sync(self) -> None:
        """The host waits until the GPU has finished everything issued so far."""
        self.items.append(Kernels(self.label, 0, SYNC_S, 0.0, sync=True))

    def _add(self, count: float, flops: float, nbytes: float, t_compute: float,
             t_memory: float) -> None:
        n = max(1, round(count))
        bound = max(t_compute, t_memory)
        self.items.append(Kernels(
            self.label, n, count * self.host_s_per_kernel, bound + count * KERNEL_LATENCY_S,
            flops, nbytes, bound if t_compute >= t_memory and t_compute > 0 else 0.0,
            bound if t_memory > t_compute else 0.0,
        ))


def _play(items: list[Kernels]) -> Iterator[float]:
    """Each item's share of the wall time, in issue order (see :func:`run`)."""
    host_t = gpu_t = 0.0
    for k in items:
        before = max(host_t, gpu_t)
        if k.sync:
            host_t = max(host_t, gpu_t)
        if k.count:
            gpu_t = max(gpu_t + k.device, host_t + k.host / k.count + k.device,
                        host_t + k.host + k.device / k.count)
        host_t += k.host
        yield max(host_t, gpu_t) - before


def run(items: list[Kernels]) -> tuple[float, dict[str, Phase]]:
    """Play the host and the GPU against each other, in issue order.

    Eager PyTorch issues kernels asynchronously: the host runs ahead of the GPU while its
    kernels are short, and the GPU waits for the host when they are shorter than the time it
    takes to issue them. For ``n`` alike kernels (host time ``h``, GPU time ``d``) issued from
    host time ``H`` onto a GPU busy until ``G``, the last one ends at
    ``max(G + d, H + h/n + d, H + h + d/n)`` (GPU-bound, first-launch-bound, host-bound).
    So the order matters: a host-bound stretch followed by a GPU-heavy one costs their sum,
    the reverse costs about their maximum. The CUDA launch queue's depth limit is ignored.

    Returns:
        The wall time until both the host and the GPU are done (the sync that ends a
        measured step), and one :class:`Phase` per label, whose ``seconds`` add up to it.
    """
    acc: dict[str, dict[str, float]] = {}
    total = 0.0
    for k, seconds in zip(items, _play(items)):
        a = acc.setdefault(k.label, dict.fromkeys(
            ("seconds", "flops", "bytes", "kernels", "device", "host", "compute", "memory"), 0.0))
        total += seconds
        a["seconds"] += seconds
        a["flops"] += k.flops
        a["bytes"] += k.bytes
        a["kernels"] += k.count
        a["device"] += k.device
        a["host"] += k.host
        a["compute"] += k.compute
        a["memory"] += k.memory
    phases = {label: Phase(a["seconds"], a["flops"], a["bytes"], int(a["kernels"]), a["device"],
                           a["host"], a["compute"], a["memory"]) for label, a in acc.items()}
    return total, phases


def spans(items: list[Kernels],
          marks: list[tuple[int, str, int | None]]) -> dict[tuple[str, int | None], float]:
    """Wall time of each marked part of ``items`` (as :func:`run` plays them): ``marks`` are
    ``(first item, phase, block)``, each part running to the next mark; parts marked alike
    add up. Items before the first mark are not counted."""
    out: dict[tuple[str, int | None], float] = {}
    bounds = sorted(marks, key=lambda m: m[0])
    pos = -1
    for i, seconds in enumerate(_play(items)):
        while pos + 1 < len(bounds) and bounds[pos + 1][0] <= i:
            pos += 1
        if pos >= 0:
            key = (bounds[pos][1], bounds[pos][2])
            out[key] = out.get(key, 0.0) + seconds
    return out


def waves(m: float, n: int, k: float, sms: int, batch: float = 1) -> tuple[int, int]:
    """(tiles, waves) of a GEMM: output tiles of GEMM_TILE x GEMM_TILE (of every GEMM of a
    batched launch), times the reduction split (split-K) while tiles are fewer than SMs; a wave
    is one tile per SM."""
    tiles = math.ceil(batch) * math.ceil(m / GEMM_TILE) * math.ceil(n / GEMM_TILE)
    if tiles < sms:
        tiles *= max(1, min(sms // tiles, int(k) // SPLIT_K_MIN))
    return tiles, math.ceil(tiles / sms)


def busy_share(m: float, n: int, k: float, sms: int, batch: float = 1) -> float:
    """Share of the SMs a GEMM keeps busy, the last wave's idle SMs counted."""
    tiles, n_waves = waves(m, n, k, sms, batch)
    return tiles / (n_waves * sms)


def gemm_seconds(flops: float, peak: float, m: float, n: int, k: float, sms: int,
                 batch: float = 1, element_bytes: int = 2, tensor_cores: bool = True,
                 ragged: str = "") -> float:
    """FLOP-bound time of a GEMM: its FLOPs over the busy SMs' share of ``peak``; on tensor
    cores, slower by :data:`UNALIGNED_GEMM_SPEED` when a dimension breaks 16-byte alignment
    (``ragged``: the dimension, ``"m"`` or ``"k"``, that only counts rows of a slice)."""
    if m <= 0:
        raise EstimateError(f"m={m!r}: a GEMM needs at least one row (empty ones have no kernel)")
    tiles, n_waves = waves(m, n, k, sms, batch)
    ok = not tensor_cores or _aligned_dims(m, n, k, element_bytes, ragged)
    flops *= tile_rows(m, ragged) / m
    speed = 1.0 if ok else UNALIGNED_GEMM_SPEED
    return flops / (peak * speed * tiles / (n_waves * sms))


MIN_TILE_ROWS = 16
"""The smallest output tile height of tensor-core GEMM kernels (the M of one MMA instruction,
16 on Ampere and Hopper); cuBLAS and CUTLASS tile heights are powers of two from there up to
:data:`GEMM_TILE` and beyond."""


def tile_rows(m: float, ragged: str) -> float:
    """Rows a GEMM's output tiles compute when ``m`` is a routed slice's row count
    (``ragged="m"``: any number, so the last tile row is partly empty): ``m`` rounded up to
    whole tiles of :data:`GEMM_TILE` rows, or, for a slice shorter than one such tile, to the
    power-of-two tile height (at least :data:`MIN_TILE_ROWS`) a kernel for so few rows uses.
    ``m`` itself otherwise: a model's dimensions are multiples of the tile, and cuBLAS picks
    narrower tiles for the skinny ones."""
    if ragged != "m" or m <= 0:
        return m
    height = GEMM_TILE if m >= GEMM_TILE else max(MIN_TILE_ROWS, 2 ** math.ceil(math.log2(m)))
    return math.ceil(m / height) * height


def _aligned_dims(m: float, n: float, k: float, element_bytes: int, ragged: str = "") -> bool:
    """Every dimension but the ``ragged`` one (a slice's row count) is :func:`aligned`."""
    dims = {"m": m, "n": n, "k": k}
    dims.pop(ragged, None)
    return all(aligned(d, element_bytes) for d in dims.values())


def aligned(dim: float, element_bytes: int) -> bool:
    """A matrix dimension whose rows start on 16-byte boundaries (cuBLAS's fast kernels need
    leading dimensions that are multiples of 16 bytes)."""
    return float(dim).is_integer() and (int(dim) * element_bytes) % 16 == 0


# -- per-kernel byte counts (documented once) -------------------------------------------------
RMSNORM_KERNELS = 6
"""transformers' RMSNorm in Python: ``to(fp32)``, pow, mean, add eps, rsqrt, mul,
``to(input dtype)``, mul by the weight: 6 kernels on an fp32 stream (both casts are no-ops),
8 on a bf16/fp16 one."""


def rmsnorm(stream_bytes: int) -> tuple[int, int]:
    """(kernels, bytes moved per element) of transformers' RMSNorm on a stream of
    ``stream_bytes`` per element: pow, mean and mul in fp32 (8 + 4 + 8 bytes), the weight
    multiply in the stream's dtype, and the casts to fp32 and back when it is not fp32."""
    cast = stream_bytes != 4
    return (RMSNORM_KERNELS + 2 * cast,
            20 + 2 * stream_bytes + 2 * (stream_bytes + 4) * cast)

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
