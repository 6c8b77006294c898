"""FSDP2 traced: the real ``fully_shard`` on the reduced skeleton, under fake tensors and
PyTorch's fake process group, so per-GPU memory is what FSDP itself allocates.

How. A fake process group of ``num_gpus`` ranks (``torch.testing._internal.distributed.
fake_pg``: collectives are accepted and do nothing) is made the default group for the length
of the trace; the device mesh is created outside ``FakeTensorMode``, as its ranks are real
integers. Every block of the reduced model is wrapped with ``fully_shard``, then the root, as
torchtitan and torchtune do; parameters become DTensors holding this rank's padded shard. One
step runs untraced (FSDP's lazy initialisation, the all-gather outputs it keeps and reuses),
then one traced step counts, per segment of :mod:`layerscope.estimate.trace`:

- the all-gather input (the mixed-precision cast of the local shards) and the all-gather
  output buffer (the whole block), which FSDP allocates itself for NCCL and for the fake group
  alike: ``all_gather_into_tensor``/``reduce_scatter_tensor`` write into tensors the caller
  allocated, and NCCL's own buffers live outside PyTorch's caching allocator;
- the unsharded parameters, which FSDP allocates and frees by resizing storages
  (``alloc_storage``/``free_storage``) rather than by creating tensors, so they are watched by
  their storages' size instead of by the dispatcher;
- what FSDP holds across blocks: the previous all-gather output until the next copy-out
  (implicit forward prefetch), the previous block gathered ahead in backward (explicit
  prefetch), the reduce-scatter input until the next block's reduction, the root's parameters
  kept from forward to backward (PyTorch's default for the root);
- the unsharded gradients, the reduce-scatter input (reduce dtype) and output (the sharded
  gradient, kept until the optimizer step).

Everything the caching allocator sees is allocated in Python program order, which is the
order of the trace: CUDA streams reorder execution, not allocation (FSDP2 holds buffers
explicitly instead of ``record_stream``).

Checked against PyTorch 2.13 (``torch/distributed/fsdp/_fully_shard``). The private names
used are read in one place (:func:`_groups`, :func:`_held`, :func:`_gathered_storages`) and a
missing one is a clear :class:`~layerscope.errors.EstimateError`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from layerscope.errors import EstimateError, LayerscopeError
from layerscope.estimate.input_types import StepInputs
from layerscope.estimate.sharding import Sharding
from layerscope.estimate.trace import StepTrace, _Tracker, rounded, run_step

_WORLD_LOCK = threading.Lock()
"""The default process group is process-wide: one FSDP trace at a time."""


def process_group_in_use() -> bool:
    """Whether this process already has a default ``torch.distributed`` process group."""
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                      "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
"""torchrun's environment, kept from the helper process so nothing in it joins the job."""


def in_fresh_process(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` in a new Python process (``python -m
    layerscope.estimate.fsdp``), arguments and result pickled over its stdin and stdout.

    Used when this process has its own process group: the FSDP2 trace needs a default group of
    its own, and a running job's is never touched. The model travels as a meta skeleton
    (no weights). A fresh interpreter, not ``multiprocessing``: spawning would re-import the
    caller's script.

    Raises:
        EstimateError: the helper process failed (its error is re-raised when it is a
            layerscope error).
    """
    payload = pickle.dumps((function.__module__, function.__qualname__, args, kwargs))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    done = subprocess.run(
        [sys.executable, "-m", "layerscope.estimate.fsdp"], input=payload, capture_output=True,
        env=env, check=False,
    )
    if done.returncode != 0 or not done.stdout:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise EstimateError(f"the isolated FSDP2 trace failed: {tail[0]}")
    ok, value = pickle.loads(done.stdout)
    if not ok:
        raise value
    return value


def _serve() -> None:
    """The helper process of :func:`in_fresh_process`."""
    import importlib

    module, name, args, kwargs = pickle.loads(sys.stdin.buffer.read())
    function: Any = importlib.import_module(module)
    for part in name.split("."):
        function = getattr(function, part)
    try:
        result: tuple[bool, Any] = (True, function(*args, **kwargs))
    except LayerscopeError as exc:  # raised again in the caller; anything else ends this process
        result = (False, exc)
    sys.stdout.buffer.write(pickle.dumps(result))


@contextlib.contextmanager
def fake_world(sharding: Sharding) -> Iterator[Any]:
    """A fake default process group of ``sharding.num_gpus`` ranks and its device mesh (this
    process is rank 0), destroyed on exit.

    Raises:
        EstimateError: this process already has a default process group (a real job): it is
            never replaced or destroyed; estimate FSDP2 from a process without one, or with
            ``fsdp_version=1`` (modelled without a process group).
    """
    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover - builds without distributed
        raise EstimateError("this PyTorch build has no torch.distributed; FSDP cannot be traced")
    with _WORLD_LOCK:
        if dist.is_initialized():
            raise EstimateError(
                "a torch.distributed process group is already initialised in this process; the "
                "FSDP2 estimate traces fully_shard under its own fake process group and never "
                "replaces yours: estimate from a process without one (before "
                "init_process_group), or with fsdp version 1, which is modelled without one"
            )
        try:
            from torch.testing._internal.distributed.fake_pg import FakeStore
        except ImportError as exc:  # pragma: no cover - torch without its testing package
            raise EstimateError(
                "torch.testing._internal.distributed.fake_pg is missing from this PyTorch; "
                "the FSDP2 trace needs it (checked with PyTorch 2.13)"
            ) from exc
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=sharding.num_gpus)
        try:
            if sharding.distributed == "hsdp":
                shape = (sharding.num_gpus // sharding.gpus_per_node, sharding.gpus_per_node)
                mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
            else:
                mesh = init_device_mesh("cpu", (sharding.num_gpus,), mesh_dim_names=("shard",))
            yield mesh
        finally:
            dist.destroy_process_group()


def mixed_precision_policy(param_dtype: torch.dtype, autocast_dtype: torch.dtype | None) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for a precision setting: under autocast (``*-mixed``)
    the fp32 shards are gathered in the autocast dtype and gradients reduced in fp32
    (torchtitan's default and PyTorch's FSDP2 tutorial); ``*-true`` gathers and reduces in
    the parameters' own dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if autocast_dtype is None or autocast_dtype == param_dtype:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32)


def shard(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    mesh: Any,
    sharding: Sharding,
    mp_policy: Any,
    mode: Any,
) -> None:
    """``fully_shard`` every block, then the root, with fake parameters already in place."""
    from torch.distributed.fsdp import fully_shard

    block_reshard = sharding.distributed != "fsdp-grad-op"
    root_reshard = sharding.fsdp.reshard_root  # None: PyTorch's default, the root keeps params
    with mode:
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=block_reshard, mp_policy=mp_policy)
        fully_shard(model, mesh=mesh, reshard_after_forward=root_reshard, mp_policy=mp_policy)


def _groups(model: nn.Module) -> list[Any]:
    """FSDP's parameter groups of ``model``, root last."""
    from torch.distributed.fsdp import FSDPModule

    groups: list[Any] = []
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        found = getattr(state, "_fsdp_param_groups", None)
        if found is None:
            single = getattr(state, "_fsdp_param_group", None)
            if single is None and not hasattr(state, "_fsdp_param_group"):
                raise EstimateError(
                    "FSDP2 internals changed (no _fsdp_param_groups on the FSDP state); "
                    "layerscope's FSDP trace was checked with PyTorch 2.13"
                )
            found = [single] if single is not None else []
        groups.extend(g for g in found if g not in groups)
    return groups


def _gathered_storages(groups: Sequence[Any]) -> list[torch.Tensor]:
    """The tensors whose storages FSDP resizes to gather and free a block's parameters."""
    out: list[torch.Tensor] = []
    for group in groups:
        for fsdp_param in group.fsdp_params:
            out.extend(getattr(fsdp_param, "all_gather_outputs", None) or [])
    return out


def _held(groups: Sequence[Any]) -> list[torch.Tensor]:
    """Collective buffers FSDP holds beyond the block that allocated them."""
    out: list[torch.Tensor] = []
    if not groups:
        return out
    ctx = groups[0].comm_ctx
    state = getattr(ctx, "all_gather_state", None)
    if state is not None:
        out.append(state.all_gather_result.all_gather_output)
    out.extend(rs.reduce_scatter_input for rs in getattr(ctx, "reduce_scatter_states", []) or [])
    for group in groups:
        result = getattr(group, "_all_gather_result", None)
        if result is not None:
            out.append(result.all_gather_output)
        reduce_state = getattr(group, "_all_reduce_state", None)
        if reduce_state is not None:
            out.append(reduce_state.all_reduce_input)
        partial = getattr(group, "_partial_reduce_output", None)
        if partial is not None:
            out.append(partial)
    return [t for t in out if isinstance(t, torch.Tensor)]


class _FsdpTracker(_Tracker):  # type: ignore[no-untyped-call]
    """The trace's tracker, plus FSDP's resized parameter storages and held buffers.

    A buffer FSDP holds past its own segment (the last all-gather output freed when the root's
    forward ends, the last reduce-scatter input freed by the final backward callback) is
    marked as passed on: the replay frees it once, not once per block of its kind.
    """

    def __init__(self, groups: Sequence[Any]) -> None:
        self._groups = list(groups)
        self._gathered = [t.untyped_storage() for t in _gathered_storages(groups)]
        super().__init__()
        self.ignore(_gathered_storages(groups))

    def total(self) -> int:
        return self.live + sum(rounded(s.nbytes()) for s in self._gathered)

    def switch(self, segment: tuple[Any, str]) -> None:
        for t in _held(getattr(self, "_groups", ())):
            self.mark_passed_on(t)
        super().switch(segment)


def trace_fsdp2(
    model: nn.Module,
    blocks: nn.ModuleList,
    *,
    kinds: Sequence[Any],
    sharding: Sharding,
    param_dtype: torch.dtype,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    autocast_dtype: torch.dtype | None,
    inference: bool,
    mode: Any,
    inputs: StepInputs | None = None,
) -> StepTrace:
    """Shard the fake reduced ``model`` with FSDP2 and trace one steady-state step of rank 0.

    Args:
        model, blocks, kinds, batch_size, seq_len, vocab_size, autocast_dtype, inference, mode,
            inputs: as for :func:`layerscope.estimate.trace.run_step` (``model`` already holds
            fake parameters of ``mode``; it is sharded in place and must be a private copy).
        sharding: an FSDP strategy (``fsdp``, ``fsdp-grad-op`` or ``hsdp``) with version 2.
        param_dtype: the dtype of the parameters (the sharded copies).

    With ``offload="params"`` the sharded gradients leave the GPU as soon as they are reduced
    (``CPUOffloadPolicy`` copies them to pinned host memory), which the trace mirrors by
    dropping them.
    """
    if not sharding.is_fsdp or sharding.fsdp.version != 2:
        raise EstimateError(f"trace_fsdp2 needs an FSDP2 strategy, got {sharding.describe()}")
    def step(tracker: _Tracker | None) -> StepTrace:
        return run_step(model, blocks, kinds=kinds, batch_size=batch_size, seq_len=seq_len,
                        vocab_size=vocab_size, autocast_dtype=autocast_dtype, inference=inference,
                        mode=mode, tracker=tracker, inputs=inputs)

    with fake_world(sharding) as mesh:
        shard(model, blocks, mesh, sharding, mixed_precision_policy(param_dtype, autocast_dtype), mode)
        if sharding.offload == "params":
            for p in model.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(_drop_grad)  # type: ignore[no-untyped-call]
        step(None)  # FSDP's lazy init and the buffers it keeps
        for p in model.parameters():
            p.grad = None  # zero_grad(set_to_none=True) after the step
        return step(_FsdpTracker(_groups(model)))


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


if __name__ == "__main__":
    _serve()
