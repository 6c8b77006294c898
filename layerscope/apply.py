"""The only code that sets ``requires_grad`` on a model. It never touches weight values.

Everything is validated before the first flag changes, so a failing call leaves the model as
it was.

Wrapped models are written by their original parameter names (see :mod:`layerscope.scan`):

* FSDP2 (``fully_shard``) and FSDP1 with ``use_orig_params=True``: the flags of the original
  parameters are set; both libraries read them at every step (FSDP2 when it unshards,
  FSDP1 in the root's pre-forward), so a plan may change between steps.
* FSDP1 with ``use_orig_params=False``: one flag per flat parameter (FSDP1's own rule), so a
  plan must freeze or train each flat parameter's tensors alike; otherwise it is refused.
* DDP builds its reducer (gradient buckets, what ``find_unused_parameters`` expects) from the
  flags when it is constructed: a plan that changes which parameters train is refused (freeze
  before wrapping); one that does not is applied, with a warning that says how to change it.
* ``DataParallel`` and a DeepSpeed engine: the flags of ``.module``'s parameters.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

from torch import nn

from layerscope.compat import ddp_reducer_size
from layerscope.errors import LayerscopeWarning, PlanError
from layerscope.plan import FreezePlan, Resolution
from layerscope.scan import FlagHolder, ModelScan, check_module, flag_holders, scan


def set_requires_grad(model: nn.Module, names: Iterable[str], flag: bool) -> None:
    """Set ``requires_grad = flag`` on the named parameters (aliases of a tied tensor alike).

    Non-floating parameters cannot require gradients and are left frozen.

    Raises:
        PlanError: a name is not a parameter of ``model``; nothing was changed.
    """
    set_flags(model, dict.fromkeys(names, flag))


def set_flags(model: nn.Module, flags: Mapping[str, bool]) -> None:
    """Set ``requires_grad`` of each named parameter, every name checked before any flag changes.

    Names are the original model's, also on a wrapped model (see the module docstring).

    Raises:
        PlanError: a name is not a parameter of ``model``; FSDP1 flattened tensors that would
            get different flags into one parameter (``use_orig_params=False``); or the flags
            would change which parameters train under DDP. Nothing was changed.
    """
    holders = flag_holders(model)
    missing = flags.keys() - holders.keys()
    if missing:
        raise PlanError(f"not parameters of {type(model).__name__}: {sorted(missing)[:5]}")
    wanted = _wanted(holders, flags)
    _check_ddp(model, holders, wanted)
    for p, flag in wanted.values():
        p.requires_grad_(flag and _trainable_dtype(p))


def _trainable_dtype(p: nn.Parameter) -> bool:
    """Only floating-point and complex tensors can require gradients."""
    return p.is_floating_point() or p.is_complex()


def _wanted(
    holders: Mapping[str, FlagHolder], flags: Mapping[str, bool]
) -> dict[int, tuple[nn.Parameter, bool]]:
    """The flag each parameter object gets: the last one named for it (aliases of a tied tensor
    share one object); an FSDP1 flat parameter only when all its tensors get one flag.

    Raises:
        PlanError: a flat parameter would hold frozen and trainable tensors.
    """
    wanted: dict[int, tuple[nn.Parameter, bool]] = {}
    for name, flag in flags.items():
        p = holders[name].param
        wanted[id(p)] = (p, flag)
    members: dict[int, dict[str, bool]] = {}
    for name, h in holders.items():
        if h.flat and id(h.param) in wanted:
            members.setdefault(id(h.param), {})[name] = flags.get(name, h.param.requires_grad)
    for names in members.values():
        if len(set(names.values())) > 1:
            frozen = [n for n, f in names.items() if not f]
            trained = [n for n, f in names.items() if f]
            raise PlanError(
                "FSDP1 with use_orig_params=False keeps one requires_grad per flat parameter, "
                f"and this would freeze {_some(frozen)} but train {_some(trained)}, which "
                "FullyShardedDataParallel flattened into one parameter. Wrap with "
                "use_orig_params=True, or with an auto_wrap_policy whose units the plan "
                "freezes or trains whole (for example one unit per block); nothing was changed"
            )
    return wanted


def _some(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _check_ddp(
    model: nn.Module, holders: Mapping[str, FlagHolder], wanted: Mapping[int, tuple[nn.Parameter, bool]]
) -> None:
    """Refuse flags that change which parameters train under DDP; warn when they do not.

    DDP records, when it is built, the parameters that require a gradient (its reducer's
    buckets, and what ``find_unused_parameters`` waits for). It keeps their count and bytes
    (:func:`~layerscope.compat.ddp_reducer_size`), not their identities: when the flags still
    match that record, they are taken as the flags DDP was built with and compared tensor by
    tensor; when they do not (changed behind DDP's back), only the count and bytes are compared.

    Raises:
        PlanError: the flags would make another set of parameters train than DDP was built with.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return
    ignored = set(getattr(model, "parameters_to_ignore", ()) or ())
    tensors: dict[int, nn.Parameter] = {}
    names: dict[int, str] = {}
    for name, h in holders.items():
        if name not in ignored:
            tensors.setdefault(id(h.param), h.param)
            names.setdefault(id(h.param), name)
    now = {i for i, p in tensors.items() if p.requires_grad}
    after = {i for i, p in tensors.items()
             if (wanted[i][1] if i in wanted else p.requires_grad) and _trainable_dtype(p)}

    def size(ids: set[int]) -> tuple[int, int]:
        return len(ids), sum(tensors[i].numel() * tensors[i].element_size() for i in ids)

    record = ddp_reducer_size(model) or size(now)
    if size(after) != record or (size(now) == record and after != now):
        frozen = sorted(names[i] for i in now - after)
        thawed = sorted(names[i] for i in after - now)
        change = [f"freeze {len(frozen)} tensor(s) ({_some(frozen)})" if frozen else "",
                  f"unfreeze {len(thawed)} tensor(s) ({_some(thawed)})" if thawed else ""]
        raise PlanError(
            "DistributedDataParallel built its gradient buckets (and what "
            "find_unused_parameters waits for) from the requires_grad flags when it wrapped the "
            f"model: {record[0]} trainable tensor(s), {record[1]:,} bytes; this would "
            f"{' and '.join(c for c in change if c) or 'change them'}, leaving {len(after)}, "
            f"{size(after)[1]:,} bytes. Changed after wrapping, gradients are not averaged "
            "across ranks and nothing says so (the next step fails with 'Expected to have "
            "finished reduction' or the replicas drift). Freeze before wrapping: "
            "apply_plan(model, plan), then DistributedDataParallel(model, ...); to change the "
            "plan during training, apply it to ddp.module and wrap that module again. Nothing "
            "was changed"
        )
    warnings.warn(
        "the model is wrapped by DistributedDataParallel: the plan leaves the same parameters "
        "trainable as when DDP was built, so it was applied; to change which parameters train, "
        "apply the plan before wrapping (apply_plan(model, plan), then "
        "DistributedDataParallel(model, ...)), or to ddp.module followed by a new "
        "DistributedDataParallel(ddp.module, ...)",
        LayerscopeWarning,
        stacklevel=4,
    )


def emit(notes: Iterable[str]) -> None:
    """Show a resolution's notes (tied tensors, unmatched patterns) as LayerscopeWarnings."""
    for note in notes:
        warnings.warn(note, LayerscopeWarning, stacklevel=3)


def apply_plan(
    model: nn.Module, plan: FreezePlan, s: ModelScan | None = None, *, strict: bool = True
) -> Resolution:
    """Make ``model``'s flags exactly what ``plan`` says: its names frozen, the rest trainable.

    Args:
        model: a real or meta model (plain or wrapped).
        plan: the plan; it is resolved (and so validated) before any flag changes.
        s: a scan of ``model`` when the caller has one.
        strict: refuse a model other than the one the plan records (see
            :meth:`FreezePlan.resolve`).

    Returns:
        The resolution that was applied; ``res.plan`` records the model's fingerprint.

    Raises:
        PlanError: the plan does not fit ``model``, or ``s`` is the scan of another model;
            nothing was changed.
    """
    check_module(model, "apply_plan")
    if not isinstance(plan, FreezePlan):
        raise PlanError(f"apply_plan: expected a FreezePlan, got {type(plan).__name__}")
    own = scan(model)
    if s is not None and (not isinstance(s, ModelScan) or _names(s) != _names(own)):
        raise PlanError(
            f"apply_plan: s must be a scan of this {type(model).__name__} (scan(model)), got "
            + (f"a scan of a {s.model_type}" if isinstance(s, ModelScan) else type(s).__name__)
        )
    res = plan.resolve(own, strict=strict)
    set_flags(model, {**dict.fromkeys(res.frozen, False), **dict.fromkeys(res.trainable, True)})
    emit(res.warnings)
    return res


def _names(s: ModelScan) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes, sorted: FSDP1 re-registers a module's parameters in another order."""
    return sorted((p.name, p.shape) for p in s.params)
