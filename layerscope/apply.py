"""The only code that sets ``requires_grad`` on a model. It never touches weight values.

Everything is validated before the first flag changes, so a failing call leaves the model as
it was.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

from torch import nn

from layerscope.errors import LayerscopeWarning, PlanError
from layerscope.plan import FreezePlan, Resolution
from layerscope.scan import ModelScan, check_module, scan


def set_requires_grad(model: nn.Module, names: Iterable[str], flag: bool) -> None:
    """Set ``requires_grad = flag`` on the named parameters (aliases of a tied tensor alike).

    Non-floating parameters cannot require gradients and are left frozen.

    Raises:
        PlanError: a name is not a parameter of ``model``; nothing was changed.
    """
    set_flags(model, dict.fromkeys(names, flag))


def set_flags(model: nn.Module, flags: Mapping[str, bool]) -> None:
    """Set ``requires_grad`` of each named parameter, every name checked before any flag changes.

    Raises:
        PlanError: a name is not a parameter of ``model``; nothing was changed.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = flags.keys() - params.keys()
    if missing:
        raise PlanError(f"not parameters of {type(model).__name__}: {sorted(missing)[:5]}")
    for name, flag in flags.items():
        p = params[name]
        p.requires_grad_(flag and (p.is_floating_point() or p.is_complex()))


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
    return [(p.name, p.shape) for p in s.params]
