"""layerscope: will this fine-tuning run fit, what will it cost, which layers should be frozen?"""

from layerscope.apply import apply_plan
from layerscope.build import empty_model
from layerscope.catalog import presets
from layerscope.distributed_config import RunConfig, read_accelerate_config, read_deepspeed_config
from layerscope.errors import (
    ArgumentError,
    ConfigError,
    ConfigFileError,
    EstimateError,
    LayerscopeError,
    LayerscopeWarning,
    ModelTypeError,
    PlanError,
    StructureError,
    UnsupportedModelError,
)
from layerscope.estimate.choose import choose_gpus
from layerscope.estimate.hardware import GPU, get_gpu, gpus
from layerscope.estimate.memory import (
    MemoryEstimate,
    MemorySavings,
    estimate_memory,
    estimate_memory_savings,
    max_batch_size,
)
from layerscope.estimate.schedule import ScheduleEstimate, estimate_unfreezing_schedule
from layerscope.estimate.sharding import Sharding
from layerscope.estimate.time import StepTime, estimate_step_time
from layerscope.layer_utils import (
    GradualUnfreezer,
    estimate_training_time,
    freeze_by_name,
    freeze_embeddings,
    freeze_except_last_n,
    freeze_first_n_layers,
    freeze_last_n_layers,
    freeze_model,
    get_frozen_percentage,
    get_layer_names,
    get_memory_savings_estimate,
    get_num_layers,
    get_trainable_params,
    layer_status,
    model_summary,
    print_layer_status,
    print_model_summary,
    setup_lp_lora_style,
    unfreeze_model,
)
from layerscope.plan import FreezePlan, GradualSchedule, Resolution
from layerscope.quantization import Quantization
from layerscope.scan import BlockStack, ModelScan, ParamInfo, scan
from layerscope.setup import TrainingSetup

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "BlockStack",
    "ConfigError",
    "ConfigFileError",
    "EstimateError",
    "FreezePlan",
    "GPU",
    "GradualSchedule",
    "GradualUnfreezer",
    "LayerscopeError",
    "LayerscopeWarning",
    "MemoryEstimate",
    "MemorySavings",
    "ModelScan",
    "ModelTypeError",
    "ParamInfo",
    "PlanError",
    "Quantization",
    "Resolution",
    "RunConfig",
    "ScheduleEstimate",
    "Sharding",
    "StepTime",
    "StructureError",
    "TrainingSetup",
    "UnsupportedModelError",
    "__version__",
    "apply_plan",
    "choose_gpus",
    "empty_model",
    "estimate_memory",
    "estimate_memory_savings",
    "estimate_step_time",
    "estimate_training_time",
    "estimate_unfreezing_schedule",
    "freeze_by_name",
    "freeze_embeddings",
    "freeze_except_last_n",
    "freeze_first_n_layers",
    "freeze_last_n_layers",
    "freeze_model",
    "get_frozen_percentage",
    "get_gpu",
    "get_layer_names",
    "get_memory_savings_estimate",
    "get_num_layers",
    "get_trainable_params",
    "gpus",
    "layer_status",
    "max_batch_size",
    "model_summary",
    "presets",
    "print_layer_status",
    "print_model_summary",
    "read_accelerate_config",
    "read_deepspeed_config",
    "scan",
    "setup_lp_lora_style",
    "unfreeze_model",
]
