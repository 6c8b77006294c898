"""How a run is spread over GPUs: the data-parallel strategy, the GPU count, offload, and the
knobs of DDP, FSDP and DeepSpeed ZeRO that change memory. Defined once, validated once.

Strategies (``distributed``):

- ``None``: one GPU, no process group.
- ``"ddp"``: ``torch.nn.parallel.DistributedDataParallel``: a full replica per GPU plus the
  reducer's gradient buckets.
- ``"fsdp"``: FSDP2 ``fully_shard`` on every block and the root (``reshard_after_forward=True``
  on the blocks), or FSDP1 ``FULL_SHARD`` with ``fsdp_version=1``.
- ``"fsdp-grad-op"``: the same with ``reshard_after_forward=False`` (FSDP1 ``SHARD_GRAD_OP``):
  a block's parameters stay gathered from its forward to its backward.
- ``"hsdp"``: FSDP sharded within a node, replicated across nodes (2-D mesh; FSDP1
  ``HYBRID_SHARD``).
- ``"zero1"``, ``"zero2"``, ``"zero3"``: DeepSpeed ZeRO stages 1-3 (optimizer states; plus
  gradients; plus parameters partitioned).

``offload``: ``"optimizer"`` is ZeRO-Offload of the fp32 master weights, gradients and
optimizer states to CPU memory (ZeRO-1/2/3), ``"params"`` also offloads the parameters
(ZeRO-3 ``offload_param``; FSDP ``CPUOffload(offload_params=True)``/``CPUOffloadPolicy``, which
keeps sharded parameters and gradients in CPU memory and steps the optimizer there).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from layerscope.checks import whole
from layerscope.errors import EstimateError

STRATEGIES = ("ddp", "fsdp", "fsdp-grad-op", "hsdp", "zero1", "zero2", "zero3")
"""The accepted values of ``distributed`` besides ``None`` (one GPU)."""

OFFLOADS = ("optimizer", "params")
"""The accepted values of ``offload`` besides ``None``."""

FSDP_STRATEGIES = ("fsdp", "fsdp-grad-op", "hsdp")
ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}

DDP_FIRST_BUCKET_BYTES = 2**20
"""``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``: the reducer's first bucket is capped at
1 MiB so the first all-reduce starts early (``torch/nn/parallel/distributed.py``)."""

DEFAULT_GPUS_PER_NODE = 8
"""GPUs per node when not given: an HGX/DGX node (H100, A100, H200, B200) has 8."""


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed ``zero_optimization`` entries that change memory, with DeepSpeed's own
    defaults (``deepspeed/runtime/zero/config.py``); sizes are in elements, not bytes.

    Attributes:
        reduce_bucket_size: elements of the contiguous gradient (IPG) bucket (default 5e8).
        allgather_bucket_size: elements per all-gather of updated partitions (ZeRO-1/2).
        overlap_comm: a second IPG bucket so reduction overlaps backward; ``None`` is
            DeepSpeed's default (on for stage 3, off for stages 1-2).
        contiguous_gradients: copy gradients into the IPG bucket and a contiguous partition
            buffer as they are produced (default on).
        prefetch_bucket_size: ZeRO-3 ``stage3_prefetch_bucket_size`` (default 5e7): elements of
            parameters all-gathered ahead of the module that needs them.
        param_persistence_threshold: ZeRO-3 ``stage3_param_persistence_threshold`` (1e5):
            parameters with fewer elements stay gathered on every GPU.
        max_live_parameters: ZeRO-3 ``stage3_max_live_parameters`` (1e9): the most elements
            gathered at once.
        sub_group_size: elements per optimizer sub-group (1e9): ZeRO-3 steps the optimizer one
            sub-group at a time.
        pin_memory: offloaded states live in page-locked host memory (the offload configs'
            ``pin_memory``, default on).
    """

    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool | None = None
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    sub_group_size: int = 1_000_000_000
    pin_memory: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "overlap_comm":
                if value is not None and not isinstance(value, bool):
                    raise EstimateError(f"zero overlap_comm must be a bool or None, got {value!r}")
            elif f.name in ("contiguous_gradients", "pin_memory"):
                if not isinstance(value, bool):
                    raise EstimateError(f"zero {f.name} must be a bool, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise EstimateError(f"zero {f.name} must be an int >= 0 (elements), got {value!r}")

    def overlap(self, stage: int) -> bool:
        """``overlap_comm`` as DeepSpeed resolves ``None``: on for stage 3 only."""
        return self.overlap_comm if self.overlap_comm is not None else stage == 3


@dataclass(frozen=True)
class FsdpSettings:
    """FSDP knobs that change memory.

    Attributes:
        version: 2 for ``fully_shard`` (traced under a fake process group), 1 for
            ``FullyShardedDataParallel`` with flat parameters (modelled from its source).
        use_orig_params: FSDP1 only. ``True`` (accelerate's and the HF Trainer's default)
            lets a flat parameter mix frozen and trainable tensors, but its gradient then spans
            the whole flat parameter and autograd computes gradients for the frozen tensors too;
            ``False`` needs uniform flags, so adapters are wrapped on their own (peft's
            ``fsdp_auto_wrap_policy``).
        forward_prefetch: FSDP1 ``forward_prefetch`` (default off): the next block is gathered
            while the current one computes.
        backward_prefetch: FSDP1 ``BACKWARD_PRE`` (default on): the previous block is gathered
            before the current block's gradients are computed.
        reshard_root: whether the root (embeddings, final norm, head) is resharded after
            forward. ``None`` is PyTorch's default: FSDP2 and FSDP1 keep the root gathered from
            forward to backward. torchtune and torchtitan pass ``reshard_after_forward=True``
            to every ``fully_shard`` call, the root included (``True``).
    """

    version: int = 2
    use_orig_params: bool = True
    forward_prefetch: bool = False
    backward_prefetch: bool = True
    reshard_root: bool | None = None

    def __post_init__(self) -> None:
        if self.version not in (1, 2) or isinstance(self.version, bool):
            raise EstimateError(f"fsdp version must be 1 or 2, got {self.version!r}")
        for name in ("use_orig_params", "forward_prefetch", "backward_prefetch"):
            if not isinstance(getattr(self, name), bool):
                raise EstimateError(f"fsdp {name} must be a bool, got {getattr(self, name)!r}")
        if self.reshard_root is not None and not isinstance(self.reshard_root, bool):
            raise EstimateError(f"fsdp reshard_root must be a bool or None, got {self.reshard_root!r}")


@dataclass(frozen=True)
class DdpSettings:
    """``DistributedDataParallel`` knobs that change memory.

    Attributes:
        bucket_cap_mb: the reducer's bucket size in MiB (default 25).
        gradient_as_bucket_view: gradients are views into the buckets (default off: the
            buckets are a second copy of every gradient).
    """

    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bucket_cap_mb, bool) or not isinstance(self.bucket_cap_mb, (int, float)) \
                or not self.bucket_cap_mb > 0:
            raise EstimateError(f"ddp bucket_cap_mb must be a number > 0, got {self.bucket_cap_mb!r}")
        if not isinstance(self.gradient_as_bucket_view, bool):
            raise EstimateError(
                f"ddp gradient_as_bucket_view must be a bool, got {self.gradient_as_bucket_view!r}"
            )


@dataclass(frozen=True)
class Sharding:
    """How one training run is spread over GPUs. Immutable, validated on construction.

    Attributes:
        distributed: ``None`` (one GPU) or one of :data:`STRATEGIES`.
        num_gpus: GPUs in the run (>= 1); ``batch_size`` is per GPU.
        gpus_per_node: GPUs per node (>= 1, default 8): HSDP shards within a node, and host
            memory is per node.
        offload: ``None`` or one of :data:`OFFLOADS`.
        zero, fsdp, ddp: the strategy's knobs (defaults as the libraries ship them).
    """

    distributed: str | None = None
    num_gpus: int = 1
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE
    offload: str | None = None
    zero: ZeroSettings = field(default_factory=ZeroSettings)
    fsdp: FsdpSettings = field(default_factory=FsdpSettings)
    ddp: DdpSettings = field(default_factory=DdpSettings)

    def __post_init__(self) -> None:
        d = self.distributed
        if d is not None:
            if not isinstance(d, str):
                raise EstimateError(f"distributed must be a str or None, got {d!r}")
            key = d.lower().replace("_", "-")
            key = {"fsdp-full-shard": "fsdp", "full-shard": "fsdp", "shard-grad-op": "fsdp-grad-op",
                   "hybrid-shard": "hsdp", "zero-1": "zero1", "zero-2": "zero2",
                   "zero-3": "zero3"}.get(key, key)
            if key not in STRATEGIES:
                raise EstimateError(
                    f"unknown distributed strategy {d!r}; allowed: None (one GPU), "
                    f"{', '.join(STRATEGIES)}"
                )
            object.__setattr__(self, "distributed", key)
        for name in ("num_gpus", "gpus_per_node"):
            whole(getattr(self, name), name, EstimateError, minimum=1)
        if self.distributed is None and self.num_gpus > 1:
            raise EstimateError(
                f"num_gpus={self.num_gpus} needs a distributed strategy (distributed=None is one "
                f"GPU); allowed: {', '.join(STRATEGIES)}"
            )
        if self.distributed == "hsdp" and self.num_gpus % self.gpus_per_node:
            raise EstimateError(
                f"hsdp shards within a node and replicates across nodes: num_gpus="
                f"{self.num_gpus} must be a multiple of gpus_per_node={self.gpus_per_node}"
            )
        if self.offload is not None:
            if self.offload not in OFFLOADS:
                raise EstimateError(
                    f"unknown offload {self.offload!r}; allowed: None, {', '.join(OFFLOADS)}"
                )
            allowed = {
                "optimizer": ("zero1", "zero2", "zero3"),
                "params": ("zero3", *FSDP_STRATEGIES),
            }[self.offload]
            if self.distributed not in allowed:
                raise EstimateError(
                    f"offload={self.offload!r} is not possible with distributed="
                    f"{self.distributed!r}; it works with {', '.join(allowed)}"
                )
        for name, kind in (("zero", ZeroSettings), ("fsdp", FsdpSettings), ("ddp", DdpSettings)):
            if not isinstance(getattr(self, name), kind):
                raise EstimateError(
                    f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}"
                )

    # -- derived ---------------------------------------------------------------------------
    @property
    def stage(self) -> int:
        """The ZeRO stage (0 when the strategy is not ZeRO)."""
        return ZERO_STAGES.get(self.distributed or "", 0)

    @property
    def is_fsdp(self) -> bool:
        return self.distributed in FSDP_STRATEGIES

    @property
    def shard_size(self) -> int:
        """GPUs a sharded state is split over: ``num_gpus``, or ``gpus_per_node`` for HSDP, or
        1 when nothing is sharded (one GPU, DDP)."""
        if self.distributed is None or self.distributed == "ddp":
            return 1
        if self.distributed == "hsdp":
            return self.gpus_per_node
        return self.num_gpus

    @property
    def ranks_per_node(self) -> int:
        """Processes (one per GPU) sharing a node's CPU memory."""
        return min(self.num_gpus, self.gpus_per_node)

    @property
    def num_nodes(self) -> int:
        return -(-self.num_gpus // self.gpus_per_node)

    def replace(self, **changes: Any) -> Sharding:
        """A copy with ``changes``, validated."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """A short label, e.g. ``"zero3 x 8 GPUs, offload optimizer"``."""
        if self.distributed is None:
            return "1 GPU"
        text = f"{self.distributed} x {self.num_gpus} GPU{'s' if self.num_gpus > 1 else ''}"
        if self.is_fsdp and self.fsdp.version == 1:
            text += " (FSDP1)"
        if self.offload:
            text += f", offload {self.offload}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return {
            "distributed": self.distributed, "num_gpus": self.num_gpus,
            "gpus_per_node": self.gpus_per_node, "offload": self.offload,
            "zero": dataclasses.asdict(self.zero), "fsdp": dataclasses.asdict(self.fsdp),
            "ddp": dataclasses.asdict(self.ddp),
        }


def make_sharding(
    distributed: Any = None,
    num_gpus: Any = None,
    gpus_per_node: Any = None,
    offload: Any = None,
    **knobs: Any,
) -> Sharding:
    """A :class:`Sharding` from the public keyword arguments; ``None`` means not given.

    ``knobs`` are :class:`ZeroSettings`, :class:`FsdpSettings` or :class:`DdpSettings` values
    under the keys ``zero``, ``fsdp``, ``ddp``. ``num_gpus`` defaults to 1, or to
    ``gpus_per_node`` (8) when a strategy is given without a count; more than one GPU without
    a strategy is plain data parallelism (``"ddp"``), as a run's GPU count has always meant.

    Raises:
        EstimateError: an invalid value or combination.
    """
    unknown = set(knobs) - {"zero", "fsdp", "ddp"}
    if unknown:
        raise EstimateError(f"unknown sharding setting(s) {sorted(unknown)}; allowed: zero, fsdp, ddp")
    per_node = DEFAULT_GPUS_PER_NODE if gpus_per_node is None else gpus_per_node
    if num_gpus is None:
        num_gpus = 1 if distributed is None else per_node
    elif distributed is None and isinstance(num_gpus, int) and not isinstance(num_gpus, bool) \
            and num_gpus > 1:
        distributed = "ddp"
    given = {k: v for k, v in knobs.items() if v is not None}
    return Sharding(distributed, num_gpus, per_node, offload, **given)


SINGLE_GPU = Sharding()
"""One GPU, nothing sharded."""
