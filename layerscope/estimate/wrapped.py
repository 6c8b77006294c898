"""Estimate a model that is already wrapped for data parallelism, without touching it.

FSDP2 (``fully_shard``) and FSDP1 models cannot be copied (``FSDP does not support
deepcopy``) and hold sharded or flattened parameters, so the estimate runs on a fresh meta
skeleton built from the model's config, with the wrapped model's ``requires_grad`` flags copied
by original parameter name (as :func:`layerscope.scan.scan` reads them, through FSDP1's flat
parameters too). DDP and a DeepSpeed engine hold the model as ``.module``. The wrapper also
says how the run is sharded (strategy, GPU count), which the estimate uses unless told
otherwise.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from layerscope.errors import EstimateError
from layerscope.estimate.sharding import Sharding
from layerscope.scan import scan


def _world(group: Any) -> int | None:
    size = getattr(group, "size", None)
    try:
        return int(size()) if callable(size) else None
    except (RuntimeError, ValueError):
        return None


def unwrap(model: nn.Module) -> tuple[nn.Module, Sharding | None]:
    """``(model to estimate, the sharding its wrapper implies)``.

    The model is never modified: a DDP or DeepSpeed wrapper gives its ``.module``; an FSDP2 or
    FSDP1 model gives a new meta skeleton from its config with the same trainable names. A
    plain model gives itself and None.

    Raises:
        EstimateError: a sharded model without a ``config`` to rebuild it from, or one whose
            parameter names are not those of a model built from that config.
    """
    kind = type(model).__name__
    wrapped = getattr(model, "module", None)
    if kind == "DeepSpeedEngine" and isinstance(wrapped, nn.Module):
        inner, sharding = unwrap(wrapped)
        stage = getattr(model, "zero_optimization_stage", None)
        ranks = getattr(model, "dp_world_size", None)
        stage_value = stage() if callable(stage) else None
        if sharding is None and stage_value in (1, 2, 3) and isinstance(ranks, int) and ranks >= 1:
            sharding = Sharding(f"zero{stage_value}", ranks, max(1, min(ranks, 8)))
        return inner, sharding
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - builds without distributed
        return model, None
    if isinstance(model, DistributedDataParallel) and isinstance(wrapped, nn.Module):
        inner, sharding = unwrap(wrapped)
        replicas = _world(getattr(model, "process_group", None))
        if sharding is None and replicas:
            sharding = Sharding("ddp", replicas, min(replicas, 8))
        return inner, sharding
    fsdp2, fsdp1 = _fsdp_kinds(model)
    if not (fsdp2 or fsdp1):
        return model, None
    config = getattr(model, "config", None)
    if config is None:
        raise EstimateError(
            f"{kind} is sharded with FSDP and has no .config to rebuild it from; estimate the "
            "model before wrapping it (or pass its config)"
        )
    from layerscope.build import empty_model

    skeleton = empty_model(config)
    names = dict(skeleton.named_parameters(remove_duplicate=False))
    flags = {p.name: p.requires_grad for p in scan(model).params}  # original names
    unknown = sorted(flags.keys() - names.keys())
    if unknown:
        raise EstimateError(
            f"{kind}: parameter {unknown[0]!r} is not a tensor of a model built from its config; "
            "estimate the model before wrapping it"
        )
    for name, p in names.items():
        p.requires_grad_(flags.get(name, False))
    world: int | None = None
    for p in model.parameters():
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None:
            world = int(mesh.size())
            break
    if fsdp2 and world:
        return skeleton, Sharding("fsdp", world, min(world, 8))
    return skeleton, None


def _fsdp_kinds(model: nn.Module) -> tuple[bool, bool]:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - builds without distributed
        return False, False
    fsdp2 = any(isinstance(m, FSDPModule) for m in model.modules())
    fsdp1 = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
    return fsdp2, fsdp1
