"""Tests of layerscope.estimate.sharding: the settings and their validation."""

from __future__ import annotations

import pytest

from layerscope.errors import EstimateError, LayerscopeError
from layerscope.estimate.sharding import (
    DdpSettings,
    FsdpSettings,
    Sharding,
    ZeroSettings,
    make_sharding,
)


def test_defaults_are_the_libraries():
    s = make_sharding("zero3")
    assert (s.distributed, s.num_gpus, s.gpus_per_node, s.offload) == ("zero3", 8, 8, None)
    assert s.zero.reduce_bucket_size == 500_000_000  # DeepSpeed's 5e8
    assert s.zero.prefetch_bucket_size == 50_000_000
    assert s.zero.param_persistence_threshold == 100_000
    assert s.zero.overlap(3) and not s.zero.overlap(2)  # overlap_comm: on for stage 3 only
    assert s.ddp == DdpSettings(25.0, False)
    assert make_sharding().describe() == "1 GPU"


def test_derived_sizes():
    assert make_sharding("fsdp", 16).shard_size == 16
    hsdp = make_sharding("hsdp", 16, gpus_per_node=4)
    assert (hsdp.shard_size, hsdp.num_nodes, hsdp.ranks_per_node) == (4, 4, 4)
    assert make_sharding("ddp", 4).shard_size == 1
    assert make_sharding("zero2", 2).stage == 2
    assert make_sharding("zero3", 1).shard_size == 1  # ZeRO-3 on one GPU is a real setup
    assert make_sharding("FULL_SHARD", 2).distributed == "fsdp"  # FSDP1's names are accepted


@pytest.mark.parametrize("kwargs, message", [
    (dict(distributed="tp", num_gpus=8), "unknown distributed strategy 'tp'"),
    (dict(distributed="zero3", num_gpus=0), "num_gpus must be an int >= 1, got 0"),
    (dict(distributed="fsdp", num_gpus=2.0), "num_gpus must be an int >= 1"),
    (dict(distributed="hsdp", num_gpus=12, gpus_per_node=8), "must be a multiple of gpus_per_node=8"),
    (dict(distributed="hsdp", num_gpus=4, gpus_per_node=8), "must be a multiple"),
    (dict(distributed="ddp", num_gpus=2, offload="optimizer"), "not possible with distributed='ddp'"),
    (dict(distributed="zero2", num_gpus=2, offload="params"), "not possible with distributed='zero2'"),
    (dict(distributed="fsdp", num_gpus=2, offload="optimizer"), "not possible"),
    (dict(distributed="zero3", num_gpus=2, offload="disk"), "unknown offload 'disk'"),
    (dict(distributed="zero3", num_gpus=2, gpus_per_node=0), "gpus_per_node must be an int >= 1"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(EstimateError, match=message) as info:
        make_sharding(**kwargs)
    assert isinstance(info.value, LayerscopeError) and isinstance(info.value, ValueError)


def test_gpus_without_a_strategy_are_plain_data_parallel():
    assert make_sharding(num_gpus=4).distributed == "ddp"
    with pytest.raises(EstimateError, match="num_gpus=4 needs a distributed strategy"):
        Sharding(None, 4)


def test_bad_knobs():
    with pytest.raises(EstimateError, match="reduce_bucket_size must be an int >= 0"):
        ZeroSettings(reduce_bucket_size=-1)
    with pytest.raises(EstimateError, match="fsdp version must be 1 or 2"):
        FsdpSettings(version=3)
    with pytest.raises(EstimateError, match="bucket_cap_mb must be a number > 0"):
        DdpSettings(bucket_cap_mb=0)
    with pytest.raises(EstimateError, match="unknown sharding setting"):
        make_sharding("ddp", 2, bucket=1)
    with pytest.raises(EstimateError, match="zero must be a ZeroSettings"):
        Sharding("zero2", 2, zero={"stage": 2})  # type: ignore[arg-type]
