"""One rank of the multi-process checks of plans on wrapped models (tests/test_apply_wrapped.py).

Run by that test as ``python wrapped_worker.py OUTDIR SCENARIO...`` in two processes with
``RANK``, ``WORLD_SIZE`` and ``MASTER_PORT`` set: a real gloo process group on 127.0.0.1, CPU
tensors. Each scenario wraps a tiny model (``conftest.PlainNet`` with its head tied to the
embedding) the way a training script would, applies the *same plan object* that was bound to a
meta skeleton, runs SGD steps on rank-specific data, and records facts (flags, which local
weights changed, digests, errors, warnings) in ``OUTDIR/rank<R>.json``. The test asserts on
them; nothing is decided here.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from conftest import Block, PlainNet
from torch import nn

from layerscope import (
    FreezePlan,
    GradualUnfreezer,
    LayerscopeError,
    LayerscopeWarning,
    apply_plan,
    freeze_first_n_layers,
    get_trainable_params,
    scan,
)
from layerscope.fingerprint import ModelFingerprint

RANK = int(os.environ["RANK"])


def net(device: str = "cpu") -> nn.Module:
    """PlainNet (embedding, 3 blocks, norm, head) with the head tied to the embedding."""
    torch.manual_seed(0)
    with torch.device(device):
        model = PlainNet()
    model.head.weight = model.embed.weight
    return model


SKELETON = net("meta")


def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's data of a parameter (a DTensor's local shard)."""
    to_local = getattr(p, "to_local", None)
    return (to_local() if callable(to_local) else p).detach().clone()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: local(p) for n, p in model.named_parameters(remove_duplicate=False)}


def step(model: nn.Module, seed: int) -> None:
    """One SGD step on this rank's own batch (different on each rank)."""
    torch.manual_seed(seed * 10 + RANK)
    ids = torch.randint(0, 10, (2, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(ids).float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def changes(before: dict[str, torch.Tensor], model: nn.Module,
            clean: Callable[[str], str]) -> dict[str, Any]:
    """Per original name: whether this rank's bytes changed, and a digest of them."""
    out = {}
    for name, tensor in weights(model).items():
        old, new = before[name].contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)
        out[clean(name)] = {"changed": not torch.equal(old, new), "numel": tensor.numel(),
                            "digest": hashlib.sha256(new.numpy().tobytes()).hexdigest()[:16]}
    return out


def flags(model: nn.Module) -> dict[str, bool]:
    """requires_grad per original name, as layerscope reads it."""
    return {p.name: p.requires_grad for p in scan(model).params}


def unprefix(name: str) -> str:
    for segment in ("_fsdp_wrapped_module.",):
        name = name.replace(segment, "")
    return name.removeprefix("module.")


def attempt(func: Callable[[], Any]) -> dict[str, Any]:
    """Run ``func``; record its LayerscopeWarnings and, if it raises, the error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = func()
            error = None
        except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
            value, error = None, {"type": type(exc).__name__, "message": str(exc),
                                  "layerscope": isinstance(exc, LayerscopeError)}
    return {"value": value, "error": error,
            "warnings": [str(w.message) for w in caught if w.category is LayerscopeWarning]}


def plan_first_block() -> FreezePlan:
    return FreezePlan.first(1).bind(SKELETON)


# -- scenarios ------------------------------------------------------------------------------------
def ddp_plan_then_wrap() -> dict[str, Any]:
    model = net()
    plan = plan_first_block()
    applied = attempt(lambda: sorted(apply_plan(model, plan).frozen))
    ddp = nn.parallel.DistributedDataParallel(model)
    before = weights(ddp)
    step(ddp, 1)
    first = changes(before, ddp, unprefix)
    reapplied = attempt(lambda: sorted(apply_plan(ddp, plan).frozen))  # the same flags again
    before = weights(ddp)
    step(ddp, 2)  # DDP's reducer still intact: no "Expected to have finished reduction"
    second = changes(before, ddp, unprefix)
    return {"applied": applied, "step1": first, "reapplied": reapplied, "step2": second,
            "flags": flags(ddp), "fingerprint": ModelFingerprint.of(scan(ddp)).to_dict(),
            "skeleton": ModelFingerprint.of(scan(SKELETON)).to_dict()}


def ddp_wrap_then_plan() -> dict[str, Any]:
    model = net()
    ddp = nn.parallel.DistributedDataParallel(model)
    before = flags(ddp)
    freeze = attempt(lambda: sorted(apply_plan(ddp, plan_first_block()).frozen))
    utils = attempt(lambda: freeze_first_n_layers(ddp, 2))
    after = flags(ddp)
    model2 = net()
    apply_plan(model2, plan_first_block())
    ddp2 = nn.parallel.DistributedDataParallel(model2)
    # the same count and bytes as DDP recorded (blocks are alike), another set of tensors
    swap = attempt(lambda: sorted(apply_plan(ddp2, FreezePlan.last(1)).frozen))
    thaw = attempt(lambda: sorted(apply_plan(ddp2, FreezePlan.none()).frozen))
    before2 = weights(ddp2)
    step(ddp2, 3)  # the refused plans left DDP working
    return {"before": before, "after": after, "freeze": freeze, "utils": utils, "swap": swap,
            "thaw": thaw, "flags2": flags(ddp2), "step": changes(before2, ddp2, unprefix)}


def _gradual(model: nn.Module, clean: Callable[[str], str]) -> dict[str, Any]:
    """The same plan as the skeleton's, a step, then GradualUnfreezer epochs with steps between."""
    plan = plan_first_block()
    out: dict[str, Any] = {
        "names": [p.name for p in scan(model).params],
        "fingerprint": ModelFingerprint.of(scan(model)).to_dict(),
        "skeleton": ModelFingerprint.of(scan(SKELETON)).to_dict(),
        "applied": attempt(lambda: sorted(apply_plan(model, plan).frozen)),
        "trainable": get_trainable_params(model),
    }
    before = weights(model)
    step(model, 1)
    out["step1"] = changes(before, model, clean)
    out["flags1"] = flags(model)
    unfreezer = GradualUnfreezer(model, total_epochs=3, verbose=False)
    for epoch in (0, 2):
        unfreezer.step(epoch)
        before = weights(model)
        step(model, 2 + epoch)
        out[f"epoch{epoch}"] = {"flags": flags(model), "step": changes(before, model, clean)}
    return out


def fsdp2() -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    model = net()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    out = _gradual(model, unprefix)
    out["dtensor"] = type(next(model.parameters())).__name__
    return out


def _fsdp1(use_orig_params: bool) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(net(), use_orig_params=use_orig_params,
                                    auto_wrap_policy=ModuleWrapPolicy({Block}),
                                    device_id=torch.device("cpu"))


def fsdp1_orig_params() -> dict[str, Any]:
    model = _fsdp1(True)
    out = _gradual(model, unprefix)
    out["raw_names"] = [n for n, _ in model.named_parameters()]
    return out


def fsdp1_flat_params() -> dict[str, Any]:
    model = _fsdp1(False)
    out: dict[str, Any] = {
        "raw_names": [n for n, _ in model.named_parameters()],
        "names": [p.name for p in scan(model).params],
        "fingerprint": ModelFingerprint.of(scan(model)).to_dict(),
        "skeleton": ModelFingerprint.of(scan(SKELETON)).to_dict(),
    }
    initial = flags(model)
    # fc.weight and norm.* of a block share one flat parameter; embed, norm and head the root's
    out["mixed"] = attempt(lambda: sorted(apply_plan(model, FreezePlan.regex(r"fc\.weight")).frozen))
    out["embeddings"] = attempt(lambda: sorted(apply_plan(model, FreezePlan.embeddings()).frozen))
    out["unchanged"] = flags(model) == initial
    out["applied"] = attempt(lambda: sorted(apply_plan(model, plan_first_block()).frozen))
    out["flags"] = flags(model)
    before = weights(model)
    step(model, 1)
    out["step"] = changes(before, model, unprefix)
    return out


SCENARIOS = {f.__name__: f for f in (ddp_plan_then_wrap, ddp_wrap_then_plan, fsdp2,
                                     fsdp1_orig_params, fsdp1_flat_params)}


def main() -> int:
    outdir, names = sys.argv[1], sys.argv[2:]
    path = os.path.join(outdir, f"rank{RANK}.json")
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=RANK,
            world_size=int(os.environ["WORLD_SIZE"]), timeout=datetime.timedelta(seconds=30))
    except Exception as exc:  # noqa: BLE001 - gloo cannot run here: the test skips, saying why
        with open(path, "w") as f:
            json.dump({"init_error": f"{type(exc).__name__}: {exc}"}, f)
        return 0
    results: dict[str, Any] = {}
    for name in names:
        try:
            results[name] = SCENARIOS[name]()
        except Exception:  # noqa: BLE001 - the test fails with this traceback
            results[name] = {"crashed": traceback.format_exc()}
        dist.barrier()
    dist.destroy_process_group()
    with open(path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
