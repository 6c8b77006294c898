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
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from layerscope.errors import EstimateError
from layerscope.estimate.hardware import GPU, Fabric, get_fabric, get_gpu
from layerscope.scan import ModelScan

STRATEGIES = ("ddp", "fsdp", "fsdp-grad-op", "hsdp", "zero1", "zero2", "zero3")
"""Data-parallel strategies: DDP, FSDP full shard / SHARD_GRAD_OP / hybrid (shard within a node,
replicate across nodes), DeepSpeed ZeRO stages 1-3."""

OFFLOADS = (None, "optimizer", "params")
"""``"optimizer"``: ZeRO-Offload of optimizer state and step (ZeRO 1-3); ``"params"``: FSDP
``CPUOffload(offload_params=True)`` / ZeRO-3 ``offload_param``, which also moves gradients and
the optimizer step to the CPU."""

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

DDP_BUCKET_BYTES = 25 * 2**20
"""``DistributedDataParallel(bucket_cap_mb=25)``, the default."""

ZERO_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed ``reduce_bucket_size`` and ``allgather_bucket_size`` defaults (5e8 elements)."""


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
        raise EstimateError(f"{device.name}: the catalogue has no NVLink or PCIe bandwidth")
    name = fabric if fabric is not None else device.fabric
    if name is None:
        raise EstimateError(f"{device.name}: no default fabric; pass fabric=")
    return Topology(num_gpus, gpus_per_node, intra,
                    "nvlink" if device.nvlink_bandwidth else "pcie", get_fabric(name),
                    device.pcie_bandwidth)


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


# -- what one rank computes and holds ---------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One group of parameters gathered and reduced together (an FSDP unit, a block), with the
    compute of one rank that needs them.

    Attributes:
        name: e.g. ``"block 3"`` or ``"root"``.
        params: parameter elements (frozen ones included: they are gathered too).
        trainable: elements that receive gradients (reduced after backward).
        forward_seconds, backward_seconds: compute of one rank (backward includes the
            recomputation under gradient checkpointing).
    """

    name: str
    params: int
    trainable: int
    forward_seconds: float
    backward_seconds: float

    def __post_init__(self) -> None:
        for label, value in (("params", self.params), ("trainable", self.trainable)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise EstimateError(f"{self.name}: {label} must be an int >= 0, got {value!r}")
        if self.trainable > self.params:
            raise EstimateError(f"{self.name}: trainable={self.trainable} exceeds "
                                f"params={self.params}")
        for label, secs in (("forward_seconds", self.forward_seconds),
                            ("backward_seconds", self.backward_seconds)):
            if not (isinstance(secs, (int, float)) and math.isfinite(secs) and secs >= 0):
                raise EstimateError(f"{self.name}: {label} must be a finite number >= 0, "
                                    f"got {secs!r}")


@dataclass(frozen=True)
class RankWork:
    """A step of one rank before communication: the model's units and the optimizer.

    Attributes:
        root: what sits outside the blocks (embeddings, final norm, an untied head): gathered
            first, its gradients reduced last.
        blocks: the blocks in forward order.
        optimizer_device_seconds: GPU time of the optimizer over *every* trainable parameter
            (a sharded strategy runs ``1/n`` of it).
        optimizer_host_seconds: CPU time to launch the optimizer (per tensor; not sharded, as
            every rank still steps a shard of every tensor).
    """

    root: Unit
    blocks: tuple[Unit, ...]
    optimizer_device_seconds: float = 0.0
    optimizer_host_seconds: float = 0.0

    @property
    def units(self) -> tuple[Unit, ...]:
        return (self.root, *self.blocks)

    @property
    def compute_seconds(self) -> float:
        return sum(u.forward_seconds + u.backward_seconds for u in self.units)


def rank_work(forward_seconds: float, backward_seconds: float, optimizer_device_seconds: float,
              optimizer_host_seconds: float, block_params: Collection[int],
              block_trainable: Collection[int], root_params: int,
              root_trainable: int) -> RankWork:
    """A :class:`RankWork` from a step's phase times (e.g. a ``StepTime``'s ``forward``,
    ``backward + recompute`` and ``optimizer``) and the parameter counts of the blocks and
    the root.

    The blocks are taken as equal in compute (the phase times split evenly over them; the
    head's and embeddings' share goes with the blocks, so the root computes nothing of its
    own): what matters for overlap is how long each block's compute is against its transfers.
    """
    params, trainable = list(block_params), list(block_trainable)
    if not params or len(params) != len(trainable):
        raise EstimateError(f"block_params and block_trainable must be non-empty and of one "
                            f"length, got {len(params)} and {len(trainable)}")
    for label, secs in (("forward_seconds", forward_seconds),
                        ("backward_seconds", backward_seconds),
                        ("optimizer_device_seconds", optimizer_device_seconds),
                        ("optimizer_host_seconds", optimizer_host_seconds)):
        if not (isinstance(secs, (int, float)) and math.isfinite(secs) and secs >= 0):
            raise EstimateError(f"{label} must be a finite number >= 0, got {secs!r}")
    layers = len(params)
    blocks = tuple(Unit(f"block {i}", p, t, forward_seconds / layers, backward_seconds / layers)
                   for i, (p, t) in enumerate(zip(params, trainable)))
    return RankWork(Unit("root", root_params, root_trainable, 0.0, 0.0), blocks,
                    optimizer_device_seconds, optimizer_host_seconds)


def parameter_units(scan: ModelScan, trainable: Collection[str],
                    adapters_per_block: int = 0) -> tuple[list[int], list[int], int, int]:
    """Parameter counts of the blocks of the main stack and of the rest (the FSDP root):
    ``(block_params, block_trainable, root_params, root_trainable)``, each tensor once.

    Args:
        scan: the model's scan.
        trainable: names of the trainable parameters.
        adapters_per_block: LoRA adapter elements added to each block (trainable).

    Raises:
        EstimateError: a name that is not a parameter of the model.
    """
    unknown = set(trainable) - set(scan.by_name)
    if unknown:
        raise EstimateError(f"trainable names not in the model: {sorted(unknown)[:5]}")
    if isinstance(adapters_per_block, bool) or not isinstance(adapters_per_block, int) or (
            adapters_per_block < 0):
        raise EstimateError(f"adapters_per_block must be an int >= 0, got {adapters_per_block!r}")
    wanted = set(trainable)
    params, grads = [], []
    inside: set[str] = set()
    for i in range(scan.num_layers):
        names = set(scan.block_names(i))
        inside |= names
        params.append(scan.numel(names) + adapters_per_block)
        grads.append(scan.numel(names & wanted) + adapters_per_block)
    outside = {p.name for p in scan.params} - inside
    return params, grads, scan.numel(outside), scan.numel(outside & wanted)


# -- settings and results ---------------------------------------------------------------------
@dataclass(frozen=True)
class CommSettings:
    """How a strategy communicates.

    Attributes:
        strategy: one of :data:`STRATEGIES`.
        num_gpus: GPUs in the job.
        gpus_per_node: GPUs per node (``hsdp`` shards within a node).
        offload: one of :data:`OFFLOADS`.
        param_bytes: bytes per parameter element as gathered (the compute dtype: 2 under bf16
            mixed precision, 4 in fp32).
        grad_bytes: bytes per gradient element as reduced (FSDP ``reduce_dtype``, DeepSpeed's
            communication dtype).
        offload_param_bytes: bytes per element of a parameter's CPU copy, copied to the GPU
            before each gather under ``offload="params"`` (4 for FSDP's fp32 sharded
            parameters, 2 for ZeRO-3's 16-bit parameters).
        bucket_bytes: DDP ``bucket_cap_mb`` in bytes.
        reduce_bucket_elements, allgather_bucket_elements: DeepSpeed bucket sizes.
        prefetch: FSDP forward/backward prefetch; ZeRO-3 ``stage3_prefetch_bucket_size > 0``.
        overlap_comm: ZeRO's ``overlap_comm``; None takes DeepSpeed's default (True for stage
            3 only). DDP and FSDP always overlap.
        cpu_optimizer: a key of :data:`CPU_OPTIMIZERS` for offload; None takes DeepSpeed's CPU
            Adam for ZeRO and torch's (unfused) AdamW for FSDP.
    """

    strategy: str
    num_gpus: int
    gpus_per_node: int = 8
    offload: str | None = None
    param_bytes: int = 2
    grad_bytes: int = 2
    offload_param_bytes: int = 4
    bucket_bytes: int = DDP_BUCKET_BYTES
    reduce_bucket_elements: int = ZERO_BUCKET_ELEMENTS
    allgather_bucket_elements: int = ZERO_BUCKET_ELEMENTS
    prefetch: bool = True
    overlap_comm: bool | None = None
    cpu_optimizer: str | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise EstimateError(f"unknown strategy {self.strategy!r}; known: "
                                f"{', '.join(STRATEGIES)}")
        _positive_int(self.num_gpus, "num_gpus")
        _positive_int(self.gpus_per_node, "gpus_per_node")
        for name in ("param_bytes", "grad_bytes", "offload_param_bytes", "bucket_bytes",
                     "reduce_bucket_elements", "allgather_bucket_elements"):
            _positive_int(getattr(self, name), name)
        if self.strategy == "hsdp" and self.num_gpus % self.gpus_per_node:
            raise EstimateError(f"hsdp shards within a node and replicates across nodes: "
                                f"num_gpus={self.num_gpus} must be a multiple of "
                                f"gpus_per_node={self.gpus_per_node}")
        if self.offload not in OFFLOADS:
            raise EstimateError(f"unknown offload {self.offload!r}; known: None, 'optimizer', "
                                "'params'")
        if self.offload == "optimizer" and not self.strategy.startswith("zero"):
            raise EstimateError(f"offload='optimizer' is DeepSpeed's ZeRO-Offload (zero1-3); "
                                f"{self.strategy} offloads parameters, gradients and optimizer "
                                "together (offload='params') or nothing")
        if self.offload == "params" and self.strategy in ("ddp", "zero1", "zero2"):
            raise EstimateError(f"offload='params' needs sharded parameters (fsdp, "
                                f"fsdp-grad-op, hsdp, zero3), not {self.strategy}")
        for name in ("prefetch",):
            if not isinstance(getattr(self, name), bool):
                raise EstimateError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.overlap_comm is not None and not isinstance(self.overlap_comm, bool):
            raise EstimateError(f"overlap_comm must be a bool or None, got {self.overlap_comm!r}")
        if self.cpu_optimizer is not None and self.cpu_optimizer not in CPU_OPTIMIZERS:
            raise EstimateError(f"unknown cpu_optimizer {self.cpu_optimizer!r}; known: "
                                f"{', '.join(CPU_OPTIMIZERS)}")

    @property
    def shard_ranks(self) -> int:
        """GPUs one parameter is sharded over (1 for DDP: nothing is sharded)."""
        if self.strategy == "ddp":
            return 1
        if self.strategy == "hsdp":
            return min(self.num_gpus, self.gpus_per_node)
        return self.num_gpus


@dataclass(frozen=True)
class Transfer:
    """One collective or PCIe copy of a step.

    Attributes:
        op: ``"all-gather"``, ``"reduce-scatter"``, ``"all-reduce"``, ``"host-to-device"`` or
            ``"device-to-host"``.
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
        seconds: the step: compute, exposed communication and the optimizer.
        compute_seconds: forward and backward (with recomputation) on the GPU.
        optimizer_seconds: the optimizer step (this rank's shard on the GPU, or on the CPU with
            offload), not counting transfers.
        exposed_seconds: transfers the GPU waited for (``seconds - compute - optimizer``).
        transfers: every collective and copy, in issue order.
        strategy, num_gpus, nodes, offload: the setting.
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

    def bytes_of(self, op: str) -> int:
        """Total bytes of one kind of transfer (full tensor sizes)."""
        return sum(t.nbytes for t in self.transfers if t.op == op)

    def seconds_of(self, op: str) -> float:
        """Total duration of one kind of transfer, overlapped or not."""
        return sum(t.seconds for t in self.transfers if t.op == op)


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
    reduced when its last gradient is ready, the remainder when backward ends."""
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


def communication_time(work: RankWork, settings: CommSettings, topo: Topology) -> CommTime:
    """Step time of one rank: compute, the strategy's transfers (overlapped where the strategy
    overlaps them), and the optimizer (sharded, or on the CPU with offload).

    Args:
        work: the rank's units and optimizer (:func:`rank_work`), computed on its own batch.
        settings: strategy, GPU count, dtypes, buckets, prefetch, offload.
        topo: the links (:func:`topology`); its ``num_gpus`` and ``gpus_per_node`` must match
            the settings'.

    Raises:
        EstimateError: settings and topology disagree.
    """
    if (topo.num_gpus, topo.gpus_per_node) != (settings.num_gpus, settings.gpus_per_node):
        raise EstimateError(f"topology has {topo.num_gpus} GPUs, {topo.gpus_per_node} per node; "
                            f"settings say {settings.num_gpus} and {settings.gpus_per_node}")
    s, n = settings, settings.shard_ranks
    strategy = s.strategy
    sharded_params = strategy in ("fsdp", "fsdp-grad-op", "hsdp", "zero3")
    reshards = strategy in ("fsdp", "hsdp", "zero3")  # gather again for backward
    per_node = min(s.num_gpus, s.gpus_per_node)
    replicas = s.num_gpus // n if strategy == "hsdp" else 1
    overlap = s.overlap_comm if s.overlap_comm is not None else strategy == "zero3"
    if strategy in ("ddp", "fsdp", "fsdp-grad-op", "hsdp"):
        overlap = True
    sched = _Schedule()

    def cost(kind: str, nbytes: int, ranks: int, ranks_per_node: int | None = None) -> float:
        return collective(kind, nbytes, topo, ranks, ranks_per_node).seconds

    def gather(unit: Unit, phase: str, ready: float) -> int | None:
        """(Copy the shard to the GPU, then) all-gather the unit's parameters."""
        if not sharded_params or unit.params == 0:
            return None
        if s.offload == "params":
            shard = math.ceil(unit.params / n) * s.offload_param_bytes
            copy = sched.issue("h2d", "host-to-device", unit.name, phase, shard,
                               host_copy_seconds(shard, topo), ready)
            ready = sched.end(copy)
        nbytes = unit.params * s.param_bytes
        return sched.issue("net", "all-gather", unit.name, phase, nbytes,
                           cost("all-gather", nbytes, n), ready)

    def reduce(unit: Unit, ready: float) -> list[int]:
        """Reduce-scatter the unit's gradients (+ HSDP's replica all-reduce, + offload copy)."""
        if unit.trainable == 0:
            return []
        nbytes = unit.trainable * s.grad_bytes
        done = [sched.issue("net", "reduce-scatter", unit.name, "backward", nbytes,
                            cost("reduce-scatter", nbytes, n), ready)]
        shard = math.ceil(unit.trainable / n) * s.grad_bytes
        if replicas > 1:
            done.append(sched.issue("replica", "all-reduce", unit.name, "backward", shard,
                                    cost("all-reduce", shard, replicas, 1), sched.end(done[-1])))
        if s.offload is not None:
            done.append(sched.issue("d2h", "device-to-host", unit.name, "backward", shard,
                                    host_copy_seconds(shard, topo), sched.end(done[-1])))
        return done

    units = work.units
    # -- forward: the root first, each block after its gather; prefetch one unit ahead ----------
    gathers: dict[str, int | None] = {}
    blocks = work.blocks
    gathers["root"] = gather(work.root, "forward", 0.0)
    if blocks:  # needed at once: issued with the root's
        gathers[blocks[0].name] = gather(blocks[0], "forward", 0.0)
    sched.wait(gathers["root"])
    for i, block in enumerate(blocks):
        sched.wait(gathers[block.name])
        if s.prefetch and i + 1 < len(blocks):
            gathers[blocks[i + 1].name] = gather(blocks[i + 1], "forward", sched.now)
        sched.compute(block.forward_seconds)
        if not s.prefetch and i + 1 < len(blocks):
            gathers[blocks[i + 1].name] = gather(blocks[i + 1], "forward", sched.now)
    sched.compute(work.root.forward_seconds)

    # -- backward: blocks in reverse; gather before (resharding strategies), reduce after ------
    sched.compute(work.root.backward_seconds)
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
            if s.prefetch and i > 0:
                back[blocks[i - 1].name] = gather(blocks[i - 1], "backward", sched.now)
        sched.compute(block.backward_seconds)
        if reshards and not s.prefetch and i > 0:
            back[blocks[i - 1].name] = gather(blocks[i - 1], "backward", sched.now)
        if bucketed:
            ready.append((block.trainable * s.grad_bytes, sched.now))
            if not overlap:  # reduced on the compute stream as each bucket fills
                for index in _reduce_buckets(sched, s, topo, ready, n, final=False):
                    sched.wait(index)
        else:
            reductions += reduce(block, sched.now)
    if bucketed:
        ready.append((work.root.trainable * s.grad_bytes, sched.now))
        indices = _reduce_buckets(sched, s, topo, ready, n, final=True)
        if not overlap:
            for index in indices:
                sched.wait(index)
        reductions += indices
    else:
        reductions += reduce(work.root, sched.now)
    last = max(reductions, key=sched.end, default=None)
    sched.wait(last)

    # -- optimizer ------------------------------------------------------------------------------
    trainable = sum(u.trainable for u in units)
    shard = math.ceil(trainable / n)
    if s.offload is None:
        optimizer = work.optimizer_device_seconds / n + work.optimizer_host_seconds
        sched.compute(optimizer)
    else:
        cpu = s.cpu_optimizer or ("deepspeed-cpu-adam" if strategy.startswith("zero")
                                  else "torch-adamw")
        optimizer = cpu_optimizer_seconds(shard, per_node, cpu)
        sched.compute(optimizer)
        if s.offload == "optimizer":  # updated 16-bit parameters back to the GPU
            nbytes = shard * s.param_bytes
            sched.wait(sched.issue("h2d", "host-to-device", "parameters", "step", nbytes,
                                   host_copy_seconds(nbytes, topo), sched.now))
    if strategy in ("zero1", "zero2") and trainable:  # every rank gets the updated parameters
        elements = s.allgather_bucket_elements
        for b, (_, size) in enumerate(_chunks(trainable, elements)):
            nbytes = size * s.param_bytes
            sched.wait(sched.issue("net", "all-gather", f"bucket {b}", "step", nbytes,
                                   cost("all-gather", nbytes, n), sched.now))
    compute = sum(u.forward_seconds + u.backward_seconds for u in units)
    seconds = sched.now
    return CommTime(seconds, compute, optimizer, seconds - compute - optimizer, sched.result(),
                    strategy, s.num_gpus, topo.nodes, s.offload)


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(size, total - start)) for start in range(0, total, size)]


def _reduce_buckets(sched: _Schedule, s: CommSettings, topo: Topology,
                    ready: list[tuple[int, float]], n: int, final: bool) -> list[int]:
    """Issue the reductions of every full bucket (and, at the end, the remainder); the issued
    gradient bytes are taken off ``ready``."""
    if s.strategy == "ddp":
        cap, kind, ranks = s.bucket_bytes, "all-reduce", s.num_gpus
    else:
        cap, kind, ranks = s.reduce_bucket_elements * s.grad_bytes, "reduce-scatter", n
    pending = sum(b for b, _ in ready)
    if not final and pending < cap:
        return []
    buckets = _buckets(ready, cap)
    if not final and buckets and buckets[-1][0] < cap:
        keep = buckets.pop()
        ready[:] = [(keep[0], keep[1])]
    else:
        ready.clear()
    issued = []
    count = sum(1 for e in sched.log if e.unit.startswith("bucket") and e.phase == "backward"
                and e.op == kind)
    for b, (nbytes, when) in enumerate(buckets):
        seconds = collective(kind, nbytes, topo, ranks).seconds
        issued.append(sched.issue("net", kind, f"bucket {count + b}", "backward", nbytes,
                                  seconds, when))
        if s.offload is not None:
            shard = math.ceil(nbytes / n)
            issued.append(sched.issue("d2h", "device-to-host", f"bucket {count + b}",
                                      "backward", shard, host_copy_seconds(shard, topo),
                                      sched.end(issued[-1])))
    return issued
