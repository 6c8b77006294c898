"""Tests of layerscope.distributed_config: DeepSpeed and accelerate configs read with their
projects' semantics, and every bad file a clear error."""

from __future__ import annotations

import json

import pytest

from layerscope.distributed_config import read_accelerate_config, read_deepspeed_config
from layerscope.errors import ConfigFileError, LayerscopeError

# the Hugging Face zero3 template (transformers' DeepSpeed docs), with DeepSpeed's AdamW
ZERO3 = {
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
    "zero_optimization": {
        "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
        "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
    },
    "train_micro_batch_size_per_gpu": "auto",
}


def test_deepspeed_zero3_template(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ZERO3))
    run = read_deepspeed_config(path, hidden_size=4096, num_gpus=16, gpus_per_node=8)
    s = run.sharding
    assert (s.distributed, s.num_gpus, s.gpus_per_node, s.offload) == ("zero3", 16, 8, "optimizer")
    # "auto" filled as the HF Trainer fills it from hidden_size = 4096
    assert s.zero.reduce_bucket_size == 4096 * 4096
    assert s.zero.prefetch_bucket_size == int(0.9 * 4096 * 4096)
    assert s.zero.param_persistence_threshold == 10 * 4096
    assert s.zero.max_live_parameters == 1_000_000_000 and s.zero.overlap_comm is True
    assert run.precision is None  # bf16 "auto": the trainer's --bf16 decides
    assert run.optimizer == "adamw-fused"  # DeepSpeed builds FusedAdam
    assert run.batch_size is None


def test_deepspeed_defaults_and_spellings():
    run = read_deepspeed_config({"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 4,
                                 "zero_optimization": {"stage": 2, "cpu_offload": True,
                                                       "reduce_bucket_size": "2e8"}})
    s = run.sharding
    assert (s.distributed, s.offload, s.num_gpus) == ("zero2", "optimizer", 8)
    assert s.zero.reduce_bucket_size == 200_000_000
    assert s.zero.allgather_bucket_size == 500_000_000  # DeepSpeed's default
    assert (run.precision, run.batch_size) == ("bf16-mixed", 4)
    assert read_deepspeed_config({"zero_optimization": True}).sharding.stage == 1  # old boolean
    assert read_deepspeed_config({"fp16": {"enabled": True}, "zero_optimization": {
        "stage": 3, "offload_param": {"device": "cpu"}}}).sharding.offload == "params"


@pytest.mark.parametrize("config, message", [
    ({"zero_optimization": {"stage": 4}}, "stage=4; layerscope models ZeRO stages 1, 2 and 3"),
    ({"zero_optimization": {"stage": 0}}, "stage 0"),
    ({}, "stage=0"),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}, "pass hidden_size"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "needs ZeRO stage 3"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}}, "must be a number"),
    ({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 2.5},
     r"gradient_accumulation_steps must be a whole number >= 0, got 2\.5"),
    ({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": True},
     "train_micro_batch_size_per_gpu must be a whole number"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": float("inf")}}, "whole number"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, "none, cpu or nvme"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}, "zero_optimization": {"stage": 2}},
     "both enabled"),
    ([1, 2], "must be a path or a dict, got list"),
])
def test_deepspeed_errors(config, message):
    with pytest.raises(ConfigFileError, match=message) as info:
        read_deepspeed_config(config)
    assert isinstance(info.value, LayerscopeError) and isinstance(info.value, ValueError)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigFileError, match=r"DeepSpeed config file not found: .*nope\.json"):
        read_deepspeed_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigFileError, match="cannot be read"):
        read_deepspeed_config(bad)
    with pytest.raises(ConfigFileError, match="accelerate config file not found"):
        read_accelerate_config(tmp_path / "nope.yaml")
    yaml_bad = tmp_path / "bad.yaml"
    yaml_bad.write_text("distributed_type: [FSDP\n")
    with pytest.raises(ConfigFileError, match="not valid YAML"):
        read_accelerate_config(yaml_bad)


ACCELERATE_FSDP = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_backward_prefetch: BACKWARD_PRE
  fsdp_cpu_ram_efficient_loading: true
  fsdp_forward_prefetch: false
  fsdp_offload_params: true
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_use_orig_params: false
mixed_precision: bf16
num_machines: 2
num_processes: 16
"""


def test_accelerate_fsdp(tmp_path):
    path = tmp_path / "fsdp.yaml"
    path.write_text(ACCELERATE_FSDP)
    run = read_accelerate_config(path)
    s = run.sharding
    assert (s.distributed, s.num_gpus, s.gpus_per_node, s.offload) == ("fsdp", 16, 8, "params")
    assert (s.fsdp.version, s.fsdp.use_orig_params, s.fsdp.backward_prefetch) == (1, False, True)
    assert run.precision == "bf16-mixed"
    v2 = read_accelerate_config({"distributed_type": "FSDP", "num_processes": 4, "fsdp_config": {
        "fsdp_version": 2, "fsdp_reshard_after_forward": False, "fsdp_activation_checkpointing": True}})
    assert (v2.sharding.distributed, v2.sharding.fsdp.version, v2.gradient_checkpointing) == (
        "fsdp-grad-op", 2, True)
    hybrid = read_accelerate_config({"distributed_type": "FSDP", "num_processes": 16, "num_machines": 2,
                                     "fsdp_config": {"fsdp_sharding_strategy": 4}})
    assert hybrid.sharding.distributed == "hsdp"


def test_accelerate_deepspeed_and_ddp(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(ZERO3))
    yaml_path = tmp_path / "acc.yaml"
    yaml_path.write_text(f"distributed_type: DEEPSPEED\nnum_processes: 4\nmixed_precision: bf16\n"
                         f"deepspeed_config:\n  deepspeed_config_file: {ds.name}\n")
    run = read_accelerate_config(yaml_path, hidden_size=1024)  # the file next to the YAML
    assert (run.sharding.distributed, run.sharding.num_gpus, run.precision) == ("zero3", 4, "bf16-mixed")
    assert run.sharding.zero.reduce_bucket_size == 1024 * 1024
    inline = read_accelerate_config({"distributed_type": "DEEPSPEED", "num_processes": 8,
                                     "deepspeed_config": {"zero_stage": 3, "offload_param_device": "cpu",
                                                          "offload_optimizer_device": "cpu"}})
    assert (inline.sharding.distributed, inline.sharding.offload) == ("zero3", "params")
    assert inline.gradient_accumulation_steps is None
    accumulated = read_accelerate_config({"distributed_type": "DEEPSPEED", "num_processes": 2,
                                          "deepspeed_config": {"zero_stage": 2,
                                                               "gradient_accumulation_steps": 8}})
    assert accumulated.gradient_accumulation_steps == 8
    ddp = read_accelerate_config({"distributed_type": "MULTI_GPU", "num_processes": 2,
                                  "mixed_precision": "fp16"})
    assert (ddp.sharding.distributed, ddp.precision) == ("ddp", "16-mixed")
    assert read_accelerate_config({"distributed_type": "NO"}).sharding.distributed is None


@pytest.mark.parametrize("config, message", [
    ({"distributed_type": "TPU"}, "distributed_type='TPU' is not modelled"),
    ({"distributed_type": "FSDP", "num_processes": 4, "fsdp_config": {"fsdp_sharding_strategy": 5}},
     "not modelled"),
    ({"distributed_type": "MULTI_GPU", "num_processes": 0}, "num_processes must be an int >= 1"),
    ({"distributed_type": "MULTI_GPU", "num_processes": 3, "num_machines": 2}, "not a multiple"),
    ({"distributed_type": "DEEPSPEED", "num_processes": 2, "deepspeed_config": {"zero_stage": 0}},
     "zero_stage=0"),
    ({"distributed_type": "DEEPSPEED", "num_processes": 2,
      "deepspeed_config": {"zero_stage": 2, "gradient_accumulation_steps": 0}}, "must be >= 1"),
    ({"distributed_type": "MULTI_GPU", "num_processes": 2, "mixed_precision": "fp8"}, "fp8"),
])
def test_accelerate_errors(config, message):
    with pytest.raises(ConfigFileError, match=message):
        read_accelerate_config(config)
