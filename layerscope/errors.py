"""Exceptions and warnings raised by layerscope.

Every error subclasses both :class:`LayerscopeError` and the built-in exception a user would
naturally catch, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class LayerscopeError(Exception):
    """Base class of every error raised by layerscope."""


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


class ConfigFileError(LayerscopeError, ValueError):
    """A DeepSpeed or accelerate config file is missing, unreadable, or asks for a setup
    layerscope cannot express."""


class LayerscopeWarning(UserWarning):
    """Something worth knowing that does not stop the operation (e.g. a tied weight)."""
