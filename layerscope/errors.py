"""Exceptions and warnings raised by layerscope.

Every error subclasses both :class:`LayerscopeError` and the built-in exception a user would
naturally catch, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

MAX_MESSAGE = 1200
"""Characters of an error message; a longer one (a 5000-character value echoed back) keeps its
start, which names the value, and its end, which says what is allowed."""


class LayerscopeError(Exception):
    """Base class of every error raised by layerscope."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and len(args[0]) > MAX_MESSAGE:
            text = args[0]
            args = (f"{text[:MAX_MESSAGE * 2 // 3]} [...] {text[-MAX_MESSAGE // 4:]}",)
        super().__init__(*args)


class ModelTypeError(LayerscopeError, TypeError):
    """A function that needs an ``nn.Module`` received something else."""


class StructureError(LayerscopeError, ValueError):
    """The model lacks the structure an operation needs (e.g. no block stack)."""


class PlanError(LayerscopeError, ValueError):
    """A freeze plan is invalid, or does not fit the model it is applied to."""


class ConfigError(LayerscopeError, ValueError):
    """A model source (preset name, config file, dict, config object) cannot be built."""


class EstimateError(LayerscopeError, ValueError):
    """An estimate was asked for with invalid settings."""


class ArgumentError(LayerscopeError, ValueError):
    """An argument outside what a function allows that is not a model, plan, config or estimate
    setting (a negative summary depth, a flag that is not a bool)."""


class ConfigFileError(LayerscopeError, ValueError):
    """A DeepSpeed or accelerate config file is missing, unreadable, or asks for a setup
    layerscope cannot express."""


class UnsupportedModelError(EstimateError):
    """The model cannot be estimated: it needs something layerscope does not know how to
    provide (the message names it). An :class:`EstimateError`, so ``except EstimateError``
    catches it too."""


class LayerscopeWarning(UserWarning):
    """Something worth knowing that does not stop the operation (e.g. a tied weight)."""
