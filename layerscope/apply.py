"""The only code that sets ``requires_grad`` on a model. It never touches weight values.

Everything is validated before the first flag changes, so a failing call leaves the model as
it was.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

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
    params = dict(model.named_parameters(remove_duplicate=False))
    wanted = set(names)
    missing = wanted - params.keys()
    if missing:
        raise PlanError(f"not parameters of {type(model).__name__}: {sorted(missing)[:5]}")
    for name in wanted:
        p = params[name]
        p.requires_grad_(flag and (p.is_floating_point() or p.is_complex()))


def emit(notes: Iterable[str]) -> None:
    """Show a resolution's notes (tied tensors, unmatched patterns) as LayerscopeWarnings."""
    for note in notes:
        warnings.warn(note, LayerscopeWarning, stacklevel=3)


def apply_plan(model: nn.Module, plan: FreezePlan, s: ModelScan | None = None) -> Resolution:
    """Make ``model``'s flags exactly what ``plan`` says: its names frozen, the rest trainable.

    Args:
        model: a real or meta model.
        plan: the plan; it is resolved (and so validated) before any flag changes.
        s: a scan of ``model`` when the caller has one.

    Returns:
        The resolution that was applied.
    """
    check_module(model, "apply_plan")
    if not isinstance(plan, FreezePlan):
        raise PlanError(f"apply_plan: expected a FreezePlan, got {type(plan).__name__}")
    res = plan.resolve(s if s is not None else scan(model))
    set_requires_grad(model, res.frozen, False)
    set_requires_grad(model, res.trainable, True)
    emit(res.warnings)
    return res
