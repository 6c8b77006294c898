"""Communication time of one data-parallel training step: DDP, FSDP, HSDP and DeepSpeed ZeRO.

A step under data parallelism is the per-GPU compute of :mod:`layerscope.estimate.time` (on the
per-rank batch) plus what the strategy sends between GPUs and, with CPU offload, the PCIe copies
and the optimizer step on the CPU. Per step and per GPU (``S`` = the full tensor a collective
works on, ``P`` = every parameter of a unit, ``T`` = its trainable parameters):

================  =========================================  ======================================
strategy          during forward and backward                after backward
================  =========================================  ======================================
``ddp``           all-reduce of T's gradients, in buckets    (nothing)
                  as backward produces them
``zero1/zero2``   reduce-scatter of T's gradients in         all-gather of the updated T
                  ``reduce_bucket_size`` buckets (overlapped  (exposed)
                  only with ``overlap_comm``)
``fsdp``          all-gather of P before each unit's         (nothing)
                  forward and again before its backward;
                  reduce-scatter of T after its backward
                  (FSDP1 with ``use_orig_params``: of P
                  when any of T is in the unit)
``fsdp-grad-op``  as ``fsdp`` without the backward gather    (nothing)
                  (parameters stay gathered from forward)
``hsdp``          ``fsdp`` within a node, then an all-reduce (nothing)
                  of each gradient shard across nodes
``zero3``         as ``fsdp``; gathers are prefetched only   (nothing)
                  when ``stage3_prefetch_bucket_size > 0``
================  =========================================  ======================================

Sources: ZeRO (Rajbhandari et al., SC 2020, section 7: stages 1-2 move ``2 Psi`` like DDP,
stage 3 ``3 Psi``); PyTorch FSDP (Zhao et al., VLDB 2023: per-unit all-gather and
reduce-scatter, backward prefetch); DeepSpeed ``runtime/zero/config.py`` for the defaults.

How the time is computed: every collective costs NCCL's own cost model (:func:`collective`),
and runs on one communication stream in the order the CPU issues it, in parallel with compute
(a ``Schedule``). A unit's compute waits for the gather of its parameters; the optimizer waits
for the last gradient reduction. What the GPU waits for is *exposed*: the first all-gather,
the last reduce-scatter, the all-gather after a ZeRO-1/2 step, gathers without prefetch, and
with offload the PCIe copies and the CPU optimizer step. Everything else hides behind compute
unless the network is slower than the compute it overlaps.

The strategy and its knobs are the setup's :class:`~layerscope.estimate.sharding.Sharding`,
the one place they are defined and validated: DDP's ``bucket_cap_mb``; ZeRO's
``reduce_bucket_size``, ``allgather_bucket_size``, ``overlap_comm`` and
``stage3_prefetch_bucket_size``; FSDP's version, backward prefetch and root resharding; the
offload. What a unit holds comes from the same per-tensor description as the memory states
(:class:`~layerscope.estimate.states.TensorInfo`), and the bytes per element each collective
moves from the precision (:class:`Wire`).

Not modelled: the SMs and memory bandwidth NCCL's kernels take from the compute they overlap;
ZeRO-3's persisted small parameters (``stage3_param_persistence_threshold``: norms and biases)
are counted as gathered like the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from layerscope.errors import EstimateError
from layerscope.estimate.hardware import GPU, Fabric, fabrics, get_fabric, get_gpu
from layerscope.estimate.sharding import Sharding
from layerscope.estimate.states import TensorInfo
from layerscope.setup import Precision

# -- constants, each with its source ----------------------------------------------------------
BUS_EFFICIENCY = 235.0 / 300.0
"""Share of a link's bandwidth a large NCCL collective reaches as bus bandwidth: NCCL's tuning
model caps the bus bandwidth of sm80 GPUs at 235 GB/s (``src/graph/tuning.cc``,
``if (compCap80) busBw = std::min(busBw, 235.0f)``) on NVLink3's 300 GB/s per direction. Used for
every link (NVLink, PCIe, network): an assumption outside A100 NVLink."""

RING_BASE_LATENCY_S = 8.4e-6
"""NCCL ring, Simple protocol: base latency per collective (``baseLat``, tuning.cc)."""

RING_STEP_LATENCY_S = {"nvlink": 3.4e-6, "pcie": 5.7e-6, "net": 9.6e-6}
"""NCCL ring, Simple protocol: latency per ring step over each kind of hop (``hwLat``)."""

TREE_STEP_LATENCY_S = {"nvlink": 28e-6, "pcie": 28e-6, "net": 50e-6}
"""NCCL tree, Simple protocol: latency per tree hop (``hwLat``; the latency of a 256 kB chunk)."""

TREE_ALGBW_RATIO = 0.9 * 0.5
"""NCCL tree all-reduce: algorithm bandwidth = 0.5 x (0.9 x bus bandwidth) (tuning.cc)."""

HOST_COPY_EFFICIENCY = 0.8
"""Share of the PCIe link a pinned host<->device copy reaches (assumed: CUDA's bandwidthTest
reports about 25 GB/s pinned on a 32 GB/s Gen4 x16 link)."""

CPU_ADAM_PARAMS_PER_S = 1e9 / 0.22
"""DeepSpeed ``DeepSpeedCPUAdam`` throughput of one node: ZeRO-Offload (Ren et al., USENIX ATC
2021), Table 3: 0.22 s per optimizer step of 1B parameters on a DGX-2 host (2 x 24-core Xeon
Platinum 8168). The node's cores are shared by its ranks."""

TORCH_CPU_ADAMW_PARAMS_PER_S = CPU_ADAM_PARAMS_PER_S / 6.0
"""``torch.optim.AdamW`` on the CPU with its default (per-tensor) implementation, what FSDP's
CPU offload runs unless ``fused=True``: DeepSpeed's documentation says ``DeepSpeedCPUAdam`` is
5x-7x faster than torch's Adam(W) on the CPU; 6x is taken."""

TORCH_CPU_FUSED_ADAMW_PARAMS_PER_S = CPU_ADAM_PARAMS_PER_S
"""``torch.optim.AdamW(fused=True)`` on the CPU (PyTorch >= 2.4 has a vectorised fused CPU
kernel): assumed as fast as DeepSpeed's CPU Adam, which it resembles; no measurement here."""

CPU_OPTIMIZERS = {"deepspeed-cpu-adam": CPU_ADAM_PARAMS_PER_S,
                  "torch-adamw": TORCH_CPU_ADAMW_PARAMS_PER_S,
                  "torch-adamw-fused": TORCH_CPU_FUSED_ADAMW_PARAMS_PER_S}
"""CPU optimizers for offload, with the parameters one node steps per second."""

# -- the network ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Topology:
    """The GPUs of a job and the links between them.

    Attributes:
        num_gpus: GPUs in the job.
        gpus_per_node: GPUs per node (the last node may hold fewer).
        intra_bandwidth: bytes/s per direction between two GPUs of a node.
        intra_kind: ``"nvlink"`` or ``"pcie"``.
        fabric: the inter-node network.
        host_bandwidth: bytes/s per direction of a GPU's PCIe link to the CPU.
    """

    num_gpus: int
    gpus_per_node: int
    intra_bandwidth: float
    intra_kind: str
    fabric: Fabric
    host_bandwidth: float

    @property
    def nodes(self) -> int:
        """Nodes the job spans."""
        return math.ceil(self.num_gpus / self.gpus_per_node)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EstimateError(f"{name} must be an int >= 1, got {value!r}")
    return value


def topology(gpu: str | GPU, num_gpus: int, gpus_per_node: int = 8,
             fabric: str | Fabric | None = None) -> Topology:
    """The links of ``num_gpus`` GPUs of one catalogue type.

    Args:
        gpu: a catalogue name or a ``GPU`` (its NVLink or PCIe bandwidth, its PCIe host link,
            its default fabric).
        num_gpus: GPUs in the job (>= 1).
        gpus_per_node: GPUs per node (>= 1).
        fabric: the inter-node network (a name from
            :func:`~layerscope.estimate.hardware.fabrics` or a ``Fabric``); None takes the GPU's
            default.

    Raises:
        EstimateError: bad counts, an unknown fabric, or a GPU without interconnect figures.
    """
    device = get_gpu(gpu)
    num_gpus = _positive_int(num_gpus, "num_gpus")
    gpus_per_node = _positive_int(gpus_per_node, "gpus_per_node")
    intra = device.intra_node_bandwidth
    if intra is None or device.pcie_bandwidth is None:
        raise EstimateError(f"{device.name}: no NVLink or PCIe bandwidth known (GPU fields "
                            "nvlink_bandwidth, pcie_bandwidth); communication cannot be timed")
    name = fabric if fabric is not None else device.fabric
    if name is None and num_gpus > gpus_per_node:
        raise EstimateError(f"{device.name}: no network between nodes known for {num_gpus} GPUs "
                            f"of {gpus_per_node} per node; name a fabric (known: "
                            f"{', '.join(fabrics())})")
    net = get_fabric(name) if name is not None else Fabric("none", 0.0, 1, "one node")
    return Topology(num_gpus, gpus_per_node, intra,
                    "nvlink" if device.nvlink_bandwidth else "pcie", net, device.pcie_bandwidth)


@dataclass(frozen=True)
class Collective:
    """The cost of one NCCL collective.

    Attributes:
        kind: ``"all-gather"``, ``"reduce-scatter"`` or ``"all-reduce"``.
        nbytes: size of the full tensor (the gathered output, the scattered input, the reduced
            buffer).
        ranks: GPUs in the group; nodes: nodes they span.
        algorithm: ``"ring"`` or ``"tree"`` (NCCL offers tree for all-reduce only).
        bus_bandwidth: bytes/s per direction the collective's slowest link gives.
        seconds: latency plus ``bus factor x nbytes / bus_bandwidth``.
    """

    kind: str
    nbytes: int
    ranks: int
    nodes: int
    algorithm: str
    bus_bandwidth: float
    seconds: float


def bus_bandwidth(topo: Topology, ranks_per_node: int, nodes: int) -> float:
    """Bus bandwidth (bytes/s) of a group with ``ranks_per_node`` GPUs on each of ``nodes``.

    Within a node it is the GPU-to-GPU link. Across nodes a ring leaves each node once per
    channel, one channel per network adapter, so the group gets its share of the node's
    adapters: ``node bandwidth x ranks_per_node / gpus_per_node`` when every GPU of the node is
    in some group at once (as in data parallelism), capped by the intra-node link.
    """
    bandwidth = topo.intra_bandwidth
    if nodes > 1:
        node = topo.fabric.node_bandwidth(topo.gpus_per_node)
        bandwidth = min(bandwidth, node * ranks_per_node / topo.gpus_per_node)
    return bandwidth * BUS_EFFICIENCY


def collective(kind: str, nbytes: int, topo: Topology, ranks: int,
               ranks_per_node: int | None = None) -> Collective:
    """NCCL's cost of one collective (its ``tuning.cc`` model, Simple protocol).

    Ring: ``base + steps x hop latency + f x nbytes / busbw`` with ``f = 2(n-1)/n`` and
    ``2(n-1)`` steps for all-reduce, ``f = (n-1)/n`` and ``n-1`` steps for all-gather and
    reduce-scatter (nccl-tests' bus-bandwidth definitions); steps that cross nodes pay the
    network hop latency. Tree (all-reduce only): ``2 x (intra hops + log2(nodes) x net hop)
    + nbytes / (0.45 x busbw)``. NCCL picks the faster; so does this.

    Args:
        kind: ``"all-gather"``, ``"reduce-scatter"`` or ``"all-reduce"``.
        nbytes: bytes of the full tensor (>= 0).
        topo: the links.
        ranks: GPUs in the group (>= 1).
        ranks_per_node: GPUs of the group on each node; None fills nodes of
            ``topo.gpus_per_node`` (the last node's count is what bounds the ring).
    """
    if kind not in ("all-gather", "reduce-scatter", "all-reduce"):
        raise EstimateError(f"unknown collective {kind!r}; known: all-gather, reduce-scatter, "
                            "all-reduce")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise EstimateError(f"nbytes must be an int >= 0, got {nbytes!r}")
    ranks = _positive_int(ranks, "ranks")
    if ranks_per_node is None:
        per_node = min(ranks, topo.gpus_per_node)
        last = ranks - (math.ceil(ranks / per_node) - 1) * per_node
        ranks_per_node = min(per_node, last)
        nodes = math.ceil(ranks / per_node)
    else:
        ranks_per_node = _positive_int(ranks_per_node, "ranks_per_node")
        nodes = math.ceil(ranks / ranks_per_node)
    if ranks == 1 or nbytes == 0:
        return Collective(kind, nbytes, ranks, nodes, "none", 0.0, 0.0)
    busbw = bus_bandwidth(topo, ranks_per_node, nodes)
    hop = RING_STEP_LATENCY_S[topo.intra_kind]
    net = RING_STEP_LATENCY_S["net"]
    if kind == "all-reduce":
        factor, steps, inter = 2 * (ranks - 1) / ranks, 2 * (ranks - 1), 2 * (nodes - 1)
    else:
        factor, steps, inter = (ranks - 1) / ranks, ranks - 1, nodes - 1
    ring = RING_BASE_LATENCY_S + (steps - inter) * hop + inter * net + factor * nbytes / busbw
    best, algorithm = ring, "ring"
    if kind == "all-reduce":
        local = min(ranks, ranks_per_node)
        latency = 2 * ((local - 1) * TREE_STEP_LATENCY_S[topo.intra_kind]
                       + math.ceil(math.log2(nodes)) * TREE_STEP_LATENCY_S["net"])
        tree = latency + nbytes / (TREE_ALGBW_RATIO * busbw)
        if tree < ring:
            best, algorithm = tree, "tree"
    return Collective(kind, nbytes, ranks, nodes, algorithm, busbw, best)


def host_copy_seconds(nbytes: float, topo: Topology) -> float:
    """A pinned copy of ``nbytes`` over one GPU's PCIe link, in one direction."""
    return nbytes / (topo.host_bandwidth * HOST_COPY_EFFICIENCY)


def cpu_optimizer_seconds(elements_per_rank: float, ranks_per_node: int, optimizer: str) -> float:
    """One Adam(W) step on the CPU over this rank's ``elements_per_rank`` parameters.

    The node's cores serve all its ranks at once, so the node steps ``ranks_per_node`` times as
    many elements at its throughput (:data:`CPU_OPTIMIZERS`).
    """
    if optimizer not in CPU_OPTIMIZERS:
        raise EstimateError(f"unknown CPU optimizer {optimizer!r}; known: "
                            f"{', '.join(CPU_OPTIMIZERS)}")
    return elements_per_rank * ranks_per_node / CPU_OPTIMIZERS[optimizer]


# -- what the strategy sends, from the setup ---------------------------------------------------
@dataclass(frozen=True)
class Wire:
    """Bytes per element a strategy moves.

    Attributes:
        param_bytes: a parameter as all-gathered: FSDP's ``param_dtype`` (the autocast dtype
            under ``*-mixed``: FSDP2's ``MixedPrecisionPolicy``, FSDP1's ``MixedPrecision``),
            DeepSpeed's 16-bit module, else the parameter dtype.
        grad_bytes: a gradient as reduced: DDP reduces the ``.grad`` tensors (the parameter
            dtype, fp32 under autocast); FSDP2 under ``*-mixed`` reduces in fp32 (the policy
            the trace uses, :func:`~layerscope.estimate.fsdp.mixed_precision_policy`); FSDP1
            in its ``reduce_dtype`` (accelerate sets the autocast dtype); DeepSpeed in its
            ``communication_data_type`` (default: the module's 16-bit dtype).
        offload_param_bytes: a parameter's CPU copy, copied to the GPU before each gather
            under ``offload="params"``: FSDP keeps its sharded parameters in their own dtype
            (fp32 under ``*-mixed``), ZeRO-3 its 16-bit partitions.
        grads_stored: the gradients are reduced in each tensor's own dtype (DDP's ``.grad``
            tensors; FSDP2 without a mixed-precision policy): a unit's
            :attr:`Unit.trainable_bytes` rather than ``grad_bytes`` per element (bf16 adapters
            on an fp32 run are reduced in bf16).
        offload_stored: the CPU copy is each tensor's stored dtype (FSDP): a unit's
            :attr:`Unit.stored_bytes` rather than ``offload_param_bytes`` per element (a bf16
            frozen base is copied at 2 bytes an element).
    """

    param_bytes: int
    grad_bytes: int
    offload_param_bytes: int
    grads_stored: bool = False
    offload_stored: bool = False

    @classmethod
    def of(cls, sharding: Sharding, precision: Precision) -> Wire:
        """What ``sharding`` moves under ``precision``."""
        stored = precision.weight_bytes
        compute = (precision.autocast_dtype.itemsize if precision.autocast_dtype is not None
                   else stored)
        if sharding.stage:
            return cls(compute, compute, compute)
        if sharding.is_fsdp:
            reduce = compute if sharding.fsdp.version == 1 else stored
            own = sharding.fsdp.version == 2 and precision.autocast_dtype is None
            return cls(compute, reduce, stored, grads_stored=own, offload_stored=True)
        return cls(stored, stored, stored, grads_stored=True)


def cpu_optimizer_of(sharding: Sharding, optimizer: str) -> str:
    """The CPU optimizer an offloading run steps with: DeepSpeed replaces the optimizer with
    its ``DeepSpeedCPUAdam`` (``zero_force_ds_cpu_optimizer``, on by default); FSDP runs the
    run's own torch optimizer on the CPU shards (fused when ``adamw-fused`` is asked)."""
    if sharding.stage:
        return "deepspeed-cpu-adam"
    return "torch-adamw-fused" if optimizer == "adamw-fused" else "torch-adamw"


# -- what one rank computes and holds ---------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One group of parameters gathered and reduced together (an FSDP unit, a block), with the
    compute of one rank that needs them.

    Attributes:
        name: e.g. ``"block 3"`` or ``"root"``.
        params: parameter elements (frozen ones included: they are gathered too).
        trainable: elements that receive gradients (the optimizer's).
        forward_seconds, backward_seconds: compute of one rank (backward includes the
            recomputation under gradient checkpointing).
        reduced: gradient elements FSDP and ZeRO-3 reduce-scatter after the unit's backward
            when they differ from ``trainable``: FSDP1 reduces a unit's whole flat gradient
            when any tensor in it trains (``use_orig_params=True``,
            :func:`~layerscope.estimate.states.fsdp1_grad_numel`); None: ``trainable``.
        stored_bytes, trainable_bytes: bytes of the unit's parameters (its trainable ones),
            each tensor in its stored dtype (:attr:`Wire.offload_stored`,
            :attr:`Wire.grads_stored`); None: elements x the wire's bytes.
    """

    name: str
    params: int
    trainable: int
    forward_seconds: float
    backward_seconds: float
    reduced: int | None = None
    stored_bytes: int | None = None
    trainable_bytes: int | None = None

    def __post_init__(self) -> None:
        for label, value in (("params", self.params), ("trainable", self.trainable),
                             ("reduced", 0 if self.reduced is None else self.reduced),
                             ("stored_bytes", self.stored_bytes or 0),
                             ("trainable_bytes", self.trainable_bytes or 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise EstimateError(f"{self.name}: {label} must be an int >= 0, got {value!r}")
        for label, value in (("trainable", self.trainable), ("reduced", self.reduced_elements)):
            if value > self.params:
                raise EstimateError(f"{self.name}: {label}={value} exceeds "
                                    f"params={self.params}")
        for label, secs in (("forward_seconds", self.forward_seconds),
                            ("backward_seconds", self.backward_seconds)):
            _seconds(secs, f"{self.name}: {label}")

    @property
    def reduced_elements(self) -> int:
        """Gradient elements reduced after the unit's backward."""
        return self.trainable if self.reduced is None else self.reduced


def _seconds(value: object, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise EstimateError(f"{label} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RankWork:
    """A step of one rank before communication: the model's units and the optimizer.

    Attributes:
        root: what sits outside the blocks (embeddings, final norm, an untied head): gathered
            first, its gradients reduced last; its forward (head and loss) runs after the
            blocks, its backward before them.
        blocks: the blocks in forward order.
        optimizer_seconds: this rank's optimizer step on the GPU (its shard under a sharded
            strategy); replaced by the CPU step under offload.
    """

    root: Unit
    blocks: tuple[Unit, ...]
    optimizer_seconds: float = 0.0

    @property
    def units(self) -> tuple[Unit, ...]:
        return (self.root, *self.blocks)

    @property
    def compute_seconds(self) -> float:
        return sum(u.forward_seconds + u.backward_seconds for u in self.units)


def rank_work(params: Sequence[TensorInfo], num_blocks: int, *,
              forward: Sequence[float], backward: Sequence[float], root_forward: float = 0.0,
              root_backward: float = 0.0, optimizer_seconds: float = 0.0,
              reduced: Sequence[int] | None = None) -> RankWork:
    """A :class:`RankWork` from the model's tensors (:func:`~layerscope.estimate.states.
    scan_tensors`; elements summed per block, the rest the root) and one rank's compute per
    block (``forward[i]``, ``backward[i]`` with its recomputation) and outside the blocks.
    ``reduced``: the gradient elements each unit reduces (the blocks, then the root:
    :attr:`Unit.reduced`), None for its trainable elements.

    Raises:
        EstimateError: per-block times that do not match ``num_blocks``, a tensor outside
            ``0..num_blocks - 1``, ``reduced`` not of ``num_blocks + 1`` counts within each
            unit's elements, or a negative or infinite time.
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
        raise EstimateError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
    if len(forward) != num_blocks or len(backward) != num_blocks:
        raise EstimateError(f"forward and backward need one time per block ({num_blocks}), got "
                            f"{len(forward)} and {len(backward)}")
    sizes = [0] * (num_blocks + 1)  # the last: the root
    grads = [0] * (num_blocks + 1)
    stored = [0] * (num_blocks + 1)
    stored_grads = [0] * (num_blocks + 1)
    for p in params:
        if not isinstance(p, TensorInfo):
            raise EstimateError(f"params must be TensorInfo values, got {type(p).__name__}")
        i = num_blocks if p.block is None else p.block
        if not 0 <= i <= num_blocks:
            raise EstimateError(f"a tensor's block {p.block} is outside 0..{num_blocks - 1}")
        sizes[i] += p.numel
        grads[i] += p.numel if p.trainable else 0
        stored[i] += p.numel * p.itemsize
        stored_grads[i] += p.numel * p.itemsize if p.trainable else 0
    if reduced is not None and len(reduced) != num_blocks + 1:
        raise EstimateError(f"reduced needs one count per block and the root "
                            f"({num_blocks + 1}), got {len(reduced)}")
    red = list(reduced) if reduced is not None else [None] * (num_blocks + 1)
    blocks = tuple(Unit(f"block {i}", sizes[i], grads[i], forward[i], backward[i], red[i],
                        stored[i], stored_grads[i]) for i in range(num_blocks))
    root = Unit("root", sizes[-1], grads[-1], root_forward, root_backward, red[-1], stored[-1],
                stored_grads[-1])
    return RankWork(root, blocks, _seconds(optimizer_seconds, "optimizer_seconds"))


# -- results ----------------------------------------------------------------------------------
TRANSFER_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "host-to-device",
                  "device-to-host")
"""The kinds of :class:`Transfer`, in the order they are reported."""


@dataclass(frozen=True)
class Transfer:
    """One collective or PCIe copy of a step.

    Attributes:
        op: one of :data:`TRANSFER_KINDS`.
        unit: what it moves (``"block 3"``, ``"root"``, ``"bucket 2"``, ``"parameters"``).
        phase: ``"forward"``, ``"backward"`` or ``"step"`` (after backward).
        nbytes: bytes of the full tensor (a copy: bytes copied).
        seconds: its duration; start, end: when it ran (seconds from the step's start).
        exposed: seconds the GPU's compute or optimizer waited for it.
    """

    op: str
    unit: str
    phase: str
    nbytes: int
    seconds: float
    start: float
    end: float
    exposed: float = 0.0


@dataclass(frozen=True)
class CommTime:
    """One training step of one rank under a data-parallel strategy.

    Attributes:
        seconds: the step: compute, exposed transfers and the optimizer.
        compute_seconds: forward and backward (with recomputation) on the GPU.
        optimizer_seconds: the optimizer step (this rank's shard on the GPU, or on the CPU with
            offload), not counting transfers.
        exposed_seconds: transfers the GPU waited for (``seconds - compute - optimizer``).
        transfers: every collective and copy, in issue order.
        strategy, num_gpus, nodes, offload: the setting.
        intra_node: ``"nvlink"`` or ``"pcie"``; fabric: the network between nodes (used only
            when ``nodes > 1``).
        cpu_optimizer: the CPU optimizer under offload (a key of :data:`CPU_OPTIMIZERS`).
    """

    seconds: float
    compute_seconds: float
    optimizer_seconds: float
    exposed_seconds: float
    transfers: tuple[Transfer, ...]
    strategy: str
    num_gpus: int
    nodes: int
    offload: str | None
    intra_node: str = "nvlink"
    fabric: str = ""
    cpu_optimizer: str | None = None

    def bytes_of(self, op: str) -> int:
        """Total bytes of one kind of transfer (full tensor sizes)."""
        return sum(t.nbytes for t in self.transfers if t.op == op)

    def seconds_of(self, op: str) -> float:
        """Total duration of one kind of transfer, overlapped or not."""
        return sum(t.seconds for t in self.transfers if t.op == op)

    def exposed_of(self, op: str) -> float:
        """Seconds the GPU waited for one kind of transfer."""
        return sum(t.exposed for t in self.transfers if t.op == op)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of transfer this step has, in :data:`TRANSFER_KINDS` order."""
        present = {t.op for t in self.transfers}
        return tuple(k for k in TRANSFER_KINDS if k in present)


# -- the schedule -----------------------------------------------------------------------------
@dataclass
class _Entry:
    op: str
    unit: str
    phase: str
    nbytes: int
    seconds: float
    start: float
    waited: float = 0.0

    @property
    def end(self) -> float:
        return self.start + self.seconds


class _Schedule:
    """Compute on one clock, transfers on FIFO streams, each started in issue order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.free: dict[str, float] = {}
        self.log: list[_Entry] = []

    def issue(self, stream: str, op: str, unit: str, phase: str, nbytes: int, seconds: float,
              ready: float) -> int:
        start = max(ready, self.free.get(stream, 0.0))
        self.free[stream] = start + seconds
        self.log.append(_Entry(op, unit, phase, nbytes, seconds, start))
        return len(self.log) - 1

    def end(self, index: int) -> float:
        return self.log[index].end

    def wait(self, index: int | None) -> None:
        """Compute cannot go on before transfer ``index`` ends."""
        if index is None:
            return
        entry = self.log[index]
        if entry.end > self.now:
            entry.waited += entry.end - self.now
            self.now = entry.end

    def compute(self, seconds: float) -> None:
        self.now += seconds

    def result(self) -> tuple[Transfer, ...]:
        return tuple(Transfer(e.op, e.unit, e.phase, e.nbytes, e.seconds, e.start, e.end,
                              e.waited) for e in self.log)


def _buckets(sizes: list[tuple[int, float]], cap: int) -> list[tuple[int, float]]:
    """Gradients become ready in ``(bytes, time)`` order; each bucket of ``cap`` bytes is
    reduced when its last gradient is ready, the remainder when backward ends (``cap`` 0: a
    bucket per ready gradient)."""
    if cap <= 0:
        return [(b, t) for b, t in sizes if b]
    out: list[tuple[int, float]] = []
    pending = 0
    for nbytes, ready in sizes:
        pending += nbytes
        while pending >= cap:
            out.append((cap, ready))
            pending -= cap
    if pending:
        out.append((pending, sizes[-1][1] if sizes else 0.0))
    return out


@dataclass(frozen=True)
class _Knobs:
    """What the schedule needs of a :class:`Sharding`, resolved once."""

    strategy: str
    shard: int  # GPUs a parameter is sharded over (1 for DDP)
    replicas: int  # HSDP's replica groups
    forward_prefetch: bool
    backward_prefetch: bool
    overlap: bool
    reshard_root: bool
    ddp_bucket_bytes: int
    reduce_bucket_elements: int
    allgather_bucket_elements: int

    @classmethod
    def of(cls, s: Sharding) -> _Knobs:
        d = s.distributed
        assert d is not None
        zero_prefetch = s.zero.prefetch_bucket_size > 0
        if s.is_fsdp:
            # FSDP issues the next unit's all-gather as the CPU reaches it, ahead of the GPU
            # (implicit forward prefetch); backward prefetch is explicit (FSDP2 always, FSDP1
            # with BACKWARD_PRE)
            forward, backward = True, s.fsdp.version == 2 or s.fsdp.backward_prefetch
        else:
            forward = backward = zero_prefetch
        return cls(
            strategy=d, shard=s.shard_size,
            replicas=s.num_gpus // s.shard_size if d == "hsdp" else 1,
            forward_prefetch=forward, backward_prefetch=backward,
            overlap=s.zero.overlap(s.stage) if s.stage else True,
            reshard_root=bool(s.is_fsdp and s.fsdp.reshard_root),
            ddp_bucket_bytes=int(s.ddp.bucket_cap_mb * 2**20),
            reduce_bucket_elements=s.zero.reduce_bucket_size,
            allgather_bucket_elements=s.zero.allgather_bucket_size,
        )


def communication_time(work: RankWork, sharding: Sharding, topo: Topology, wire: Wire, *,
                       cpu_optimizer: str = "torch-adamw",
                       inference: bool = False) -> CommTime:
    """Step time of one rank: compute, the strategy's transfers (overlapped where the strategy
    overlaps them), and the optimizer (sharded, or on the CPU with offload).

    Args:
        work: the rank's units and optimizer (:func:`rank_work`), computed on its own batch.
        sharding: the strategy, GPU count, buckets, prefetch and offload (a ``distributed``
            strategy, not None).
        topo: the links (:func:`topology`); its ``num_gpus`` and ``gpus_per_node`` must match
            the sharding's.
        wire: bytes per element gathered, reduced and copied (:meth:`Wire.of`).
        cpu_optimizer: the CPU optimizer under offload (:func:`cpu_optimizer_of`).
        inference: a forward only: gathers, no reduction, no optimizer.

    Raises:
        EstimateError: one GPU without a strategy, settings and topology that disagree, an
            unknown CPU optimizer.
    """
    if not isinstance(sharding, Sharding) or sharding.distributed is None:
        raise EstimateError(f"communication_time needs a data-parallel Sharding, got {sharding!r}")
    if (topo.num_gpus, topo.gpus_per_node) != (sharding.num_gpus, sharding.gpus_per_node):
        raise EstimateError(f"topology has {topo.num_gpus} GPUs, {topo.gpus_per_node} per node; "
                            f"the sharding says {sharding.num_gpus} and {sharding.gpus_per_node}")
    if cpu_optimizer not in CPU_OPTIMIZERS:
        raise EstimateError(f"unknown CPU optimizer {cpu_optimizer!r}; known: "
                            f"{', '.join(CPU_OPTIMIZERS)}")
    k = _Knobs.of(sharding)
    n, strategy, offload = k.shard, k.strategy, sharding.offload
    sharded_params = strategy in ("fsdp", "fsdp-grad-op", "hsdp", "zero3")
    reshards = strategy in ("fsdp", "hsdp", "zero3")  # gather again for backward
    sched = _Schedule()

    def cost(kind: str, nbytes: int, ranks: int, ranks_per_node: int | None = None) -> float:
        return collective(kind, nbytes, topo, ranks, ranks_per_node).seconds

    def gather(unit: Unit, phase: str, ready: float) -> int | None:
        """(Copy the shard to the GPU, then) all-gather the unit's parameters."""
        if not sharded_params or unit.params == 0:
            return None
        if offload == "params":
            shard = (math.ceil(unit.stored_bytes / n)
                     if wire.offload_stored and unit.stored_bytes is not None
                     else math.ceil(unit.params / n) * wire.offload_param_bytes)
            copy = sched.issue("h2d", "host-to-device", unit.name, phase, shard,
                               host_copy_seconds(shard, topo), ready)
            ready = sched.end(copy)
        nbytes = unit.params * wire.param_bytes
        return sched.issue("net", "all-gather", unit.name, phase, nbytes,
                           cost("all-gather", nbytes, n), ready)

    def grad_bytes(unit: Unit) -> int:
        """The unit's gradient bytes as reduced (in each tensor's dtype where the wire says)."""
        if wire.grads_stored and unit.trainable_bytes is not None and unit.reduced is None:
            return unit.trainable_bytes
        return unit.reduced_elements * wire.grad_bytes

    def reduce(unit: Unit, ready: float) -> list[int]:
        """Reduce-scatter the unit's gradients (+ HSDP's replica all-reduce, + offload copy)."""
        nbytes = grad_bytes(unit)
        if nbytes == 0:
            return []
        done = [sched.issue("net", "reduce-scatter", unit.name, "backward", nbytes,
                            cost("reduce-scatter", nbytes, n), ready)]
        shard = math.ceil(nbytes / n)
        if k.replicas > 1:
            done.append(sched.issue("replica", "all-reduce", unit.name, "backward", shard,
                                    cost("all-reduce", shard, k.replicas, 1),
                                    sched.end(done[-1])))
        if offload is not None:
            done.append(sched.issue("d2h", "device-to-host", unit.name, "backward", shard,
                                    host_copy_seconds(shard, topo), sched.end(done[-1])))
        return done

    def buckets(ready: list[tuple[int, float]], final: bool) -> list[int]:
        """Reduce every full bucket (and, at the end, the remainder); the issued gradient bytes
        are taken off ``ready``."""
        if strategy == "ddp":
            cap, kind, ranks = k.ddp_bucket_bytes, "all-reduce", sharding.num_gpus
        else:
            cap, kind, ranks = k.reduce_bucket_elements * wire.grad_bytes, "reduce-scatter", n
        pending = sum(b for b, _ in ready)
        if not pending or (not final and cap > 0 and pending < cap):
            return []
        full = _buckets(ready, cap)
        if not final and cap > 0 and full and full[-1][0] < cap:
            ready[:] = [full.pop()]
        else:
            ready.clear()
        issued = []
        count = sum(1 for e in sched.log if e.unit.startswith("bucket") and e.phase == "backward"
                    and e.op == kind)
        for b, (nbytes, when) in enumerate(full):
            issued.append(sched.issue("net", kind, f"bucket {count + b}", "backward", nbytes,
                                      cost(kind, nbytes, ranks), when))
            if offload is not None:
                shard = math.ceil(nbytes / n)
                issued.append(sched.issue("d2h", "device-to-host", f"bucket {count + b}",
                                          "backward", shard, host_copy_seconds(shard, topo),
                                          sched.end(issued[-1])))
        return issued

    blocks, root = work.blocks, work.root
    # -- forward: the root first, each block after its gather; prefetch one unit ahead ----------
    gathers: dict[str, int | None] = {"root": gather(root, "forward", 0.0)}
    if blocks:  # needed at once: issued with the root's
        gathers[blocks[0].name] = gather(blocks[0], "forward", 0.0)
    sched.wait(gathers["root"])
    for i, block in enumerate(blocks):
        sched.wait(gathers[block.name])
        if k.forward_prefetch and i + 1 < len(blocks):
            gathers[blocks[i + 1].name] = gather(blocks[i + 1], "forward", sched.now)
        sched.compute(block.forward_seconds)
        if not k.forward_prefetch and i + 1 < len(blocks):
            gathers[blocks[i + 1].name] = gather(blocks[i + 1], "forward", sched.now)
    sched.compute(root.forward_seconds)
    if inference:
        compute = sum(u.forward_seconds for u in work.units)
        return CommTime(sched.now, compute, 0.0, sched.now - compute, sched.result(), strategy,
                        sharding.num_gpus, topo.nodes, offload, topo.intra_kind,
                        topo.fabric.name)

    # -- backward: blocks in reverse; gather before (resharding strategies), reduce after ------
    if k.reshard_root:
        sched.wait(gather(root, "backward", sched.now))
    sched.compute(root.backward_seconds)
    reductions: list[int] = []
    ready: list[tuple[int, float]] = []  # (gradient bytes, ready time) for bucketed reductions
    bucketed = strategy in ("ddp", "zero1", "zero2")
    back: dict[str, int | None] = {}
    if reshards and blocks:
        back[blocks[-1].name] = gather(blocks[-1], "backward", sched.now)
    for i in range(len(blocks) - 1, -1, -1):
        block = blocks[i]
        if reshards:
            sched.wait(back[block.name])
            if k.backward_prefetch and i > 0:
                back[blocks[i - 1].name] = gather(blocks[i - 1], "backward", sched.now)
        sched.compute(block.backward_seconds)
        if reshards and not k.backward_prefetch and i > 0:
            back[blocks[i - 1].name] = gather(blocks[i - 1], "backward", sched.now)
        if bucketed:
            ready.append((grad_bytes(block), sched.now))
            if not k.overlap:  # reduced on the compute stream as each bucket fills
                for index in buckets(ready, final=False):
                    sched.wait(index)
        else:
            reductions += reduce(block, sched.now)
    if bucketed:
        ready.append((grad_bytes(root), sched.now))
        indices = buckets(ready, final=True)
        if not k.overlap:
            for index in indices:
                sched.wait(index)
        reductions += indices
    else:
        reductions += reduce(root, sched.now)
    sched.wait(max(reductions, key=sched.end, default=None))

    # -- optimizer ------------------------------------------------------------------------------
    trainable = sum(u.trainable for u in work.units)
    shard = math.ceil(trainable / n)
    used: str | None = None
    if offload is None:
        optimizer = work.optimizer_seconds
        sched.compute(optimizer)
    else:
        used = cpu_optimizer
        optimizer = cpu_optimizer_seconds(shard, sharding.ranks_per_node, cpu_optimizer)
        sched.compute(optimizer)
        if offload == "optimizer":  # updated 16-bit parameters back to the GPU
            nbytes = shard * wire.param_bytes
            sched.wait(sched.issue("h2d", "host-to-device", "parameters", "step", nbytes,
                                   host_copy_seconds(nbytes, topo), sched.now))
    if strategy in ("zero1", "zero2") and trainable:  # every rank gets the updated parameters
        size = k.allgather_bucket_elements or trainable
        for b, start in enumerate(range(0, trainable, size)):
            nbytes = min(size, trainable - start) * wire.param_bytes
            sched.wait(sched.issue("net", "all-gather", f"bucket {b}", "step", nbytes,
                                   cost("all-gather", nbytes, n), sched.now))
    compute = work.compute_seconds
    seconds = sched.now
    return CommTime(seconds, compute, optimizer, seconds - compute - optimizer, sched.result(),
                    strategy, sharding.num_gpus, topo.nodes, offload, topo.intra_kind,
                    topo.fabric.name, used)
