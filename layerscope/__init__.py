"""layerscope: will this fine-tuning run fit, what will it cost, which layers should be frozen?"""

from layerscope.errors import (
    ConfigError,
    EstimateError,
    LayerscopeError,
    LayerscopeWarning,
    ModelTypeError,
    PlanError,
    StructureError,
)

__version__ = "0.1.0"

__all__ = sorted(
    [
        "ConfigError",
        "EstimateError",
        "LayerscopeError",
        "LayerscopeWarning",
        "ModelTypeError",
        "PlanError",
        "StructureError",
        "__version__",
    ]
)
