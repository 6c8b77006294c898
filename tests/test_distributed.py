"""Per-GPU estimates of DDP and DeepSpeed ZeRO steps (layerscope.estimate.distributed) on the
tiny Llama of conftest, checked against arithmetic written here.

The tiny Llama has 160832 parameters: embedding and head 100 x 64 each, 4 blocks of 36992
(q, o 64 x 64; k, v 32 x 64; gate, up 128 x 64; down 64 x 128; two norms of 64), a final norm.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build

from layerscope import estimate_memory
from layerscope.errors import EstimateError
from layerscope.estimate.sharding import FsdpSettings, ZeroSettings, make_sharding

PARAMS = 2 * 100 * 64 + 4 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64 + 2 * 64) + 64


def _round(nbytes: int) -> int:
    return -(-nbytes // 512) * 512


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return build("llama", device="meta")


def _buffers(model) -> int:
    return sum(_round(b.numel() * b.element_size()) for b in model.buffers())


def test_parameter_count(llama):
    assert PARAMS == 160832 == sum(p.numel() for p in llama.parameters())


def test_ddp_adds_its_buckets_to_the_one_gpu_step(llama):
    one = estimate_memory(llama, batch_size=2, seq_len=32)
    ddp = estimate_memory(llama, batch_size=2, seq_len=32, distributed="ddp", num_gpus=4)
    # bf16-mixed: fp32 gradients, 643328 bytes < the first bucket's 1 MiB cap: one bucket
    assert ddp.buffer_bytes == _round(4 * PARAMS) == 643584
    assert ddp.peak_bytes == one.peak_bytes + 643584  # allocated at construction, kept
    assert ddp.weights_bytes == one.weights_bytes and ddp.gradient_bytes == one.gradient_bytes


def test_zero2_by_hand(llama):
    zero = ZeroSettings(reduce_bucket_size=10_000)
    est = estimate_memory(llama, batch_size=2, seq_len=32, sharding=make_sharding(
        "zero2", 4, zero=zero))
    part = -(-PARAMS // 8) * 2  # padded to 2 * 4 ranks: 40208
    assert est.weights_bytes == _round(2 * PARAMS) + _buffers(llama)  # the module in bf16
    assert est.master_weights_bytes == _round(4 * part) == 161280
    assert est.optimizer_state_bytes == 2 * 161280
    assert est.gradient_bytes == _round(2 * part)  # grads_in_partition
    # DeepSpeed runs the bf16 module without autocast: the one-GPU bf16 trace's activations
    one = estimate_memory(llama, batch_size=2, seq_len=32, precision="bf16-true")
    assert est.activation_bytes == one.activation_bytes
    # in backward the IPG bucket (10000 * 2 -> 20480) and the partition buffer are held
    if est.peak_phase == "backward":
        assert est.held_bytes == 20480 + _round(2 * part)


def test_zero3_by_hand(llama):
    zero = ZeroSettings(reduce_bucket_size=10_000, param_persistence_threshold=64)
    est = estimate_memory(llama, batch_size=2, seq_len=32, sharding=make_sharding(
        "zero3", 4, zero=zero))
    shapes = [(100, 64)] * 2 + [(64,)] + 4 * [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64),
                                             (128, 64), (64, 128), (64,), (64,)]
    numels = [s[0] * (s[1] if len(s) > 1 else 1) for s in shapes]
    partitions = [-(-n // 4) for n in numels]
    persisted = sum(_round(2 * n) for n in numels if n <= 64)  # the norms stay whole
    assert est.weights_bytes == sum(_round(2 * k) for k in partitions) + persisted + _buffers(llama)
    assert est.master_weights_bytes == _round(4 * sum(partitions))
    # the IPG bucket and the gradient partition buffer, both allocated at initialisation
    assert est.buffer_bytes == 20480 + _round(2 * sum(partitions))
    assert est.gradient_bytes == _round(2 * sum(partitions))
    # the allocator reserves at least what is allocated at the peak
    assert est.reserved_bytes >= est.peak_bytes


def test_offload_moves_states_to_the_host(llama):
    zero = ZeroSettings(reduce_bucket_size=10_000)
    on_gpu = estimate_memory(llama, batch_size=2, seq_len=32,
                             sharding=make_sharding("zero2", 8, zero=zero))
    off = estimate_memory(llama, batch_size=2, seq_len=32,
                          sharding=make_sharding("zero2", 8, offload="optimizer", zero=zero))
    assert off.optimizer_state_bytes == off.master_weights_bytes == 0
    assert off.peak_bytes < on_gpu.peak_bytes
    part = -(-PARAMS // 16) * 2
    per_rank = (_round(4 * part) + 2 * _round(4 * part) + _round(4 * part) + _round(2 * part)
                + _round(2 * 128 * 64))  # master, Adam, fp32 grads, bf16 copy, staging buffer
    assert off.host_bytes == 8 * per_rank  # the node's 8 ranks


def test_lora_under_zero3_and_fsdp1(llama):
    for sharding in (make_sharding("zero3", 4), make_sharding("fsdp", 4, fsdp=FsdpSettings(version=1))):
        est = estimate_memory(llama, batch_size=1, seq_len=16, lora=4, sharding=sharding)
        # rank 4 on the 7 linears (in + out): q, o 128; k, v 96; gate, up, down 192; 4 blocks
        adapters = 4 * 4 * (2 * 128 + 2 * 96 + 3 * 192)
        assert est.trainable_params == adapters == 16384
        if sharding.stage:  # fp32 master partition of the adapters (every numel divides by 4)
            assert est.master_weights_bytes == _round(4 * adapters // 4)
        else:  # FSDP1, use_orig_params: each block's flat gradient spans its frozen base too
            block = 36992 + 4096  # base and adapter elements, fp32
            assert est.gradient_bytes == 4 * _round(4 * block // 4)


def test_bad_input_changes_nothing(llama):
    flags = {n: p.requires_grad for n, p in llama.named_parameters()}
    with pytest.raises(EstimateError, match="unknown distributed strategy 'tp'"):
        estimate_memory(llama, distributed="tp", num_gpus=8)
    with pytest.raises(EstimateError, match="num_gpus must be an int >= 1, got 0"):
        estimate_memory(llama, distributed="fsdp", num_gpus=0)
    with pytest.raises(EstimateError, match="sharding must be a Sharding"):
        estimate_memory(llama, sharding="zero3")
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == flags


def test_flat_settings_replace_the_sharding_s(llama):
    from layerscope.setup import TrainingSetup

    setup = TrainingSetup(llama, distributed="fsdp", fsdp_version=1,
                          sharding=make_sharding("zero3", 2, zero=ZeroSettings(reduce_bucket_size=7)))
    assert (setup.distributed, setup.num_gpus, setup.fsdp_version) == ("fsdp", 2, 1)
    assert setup.sharding.zero.reduce_bucket_size == 7  # the knobs are kept
    assert setup.replace(distributed=None).sharding == make_sharding()
    assert setup.replace(num_gpus=4).sharding.num_gpus == 4


def test_reserved_simulation_gets_the_optimizer_allocation_by_allocation(llama, monkeypatch):
    import layerscope.estimate.allocator as allocator

    seen = {}
    simulate = allocator.simulate_loop

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return simulate(*args, **kwargs)

    monkeypatch.setattr(allocator, "simulate_loop", spy)
    est = estimate_memory(llama, batch_size=1, seq_len=16, precision="bf16-true",
                          sharding=make_sharding("fsdp", 4, fsdp=FsdpSettings(version=1)))
    # a state pair and a foreach temporary per trainable tensor's local slice, not one block
    trainable = sum(1 for p in llama.parameters() if p.requires_grad)
    assert len(seen["optimizer_state"]) == 2 * trainable
    assert sum(seen["optimizer_state"]) == est.optimizer_state_bytes
    # the sharded gradients come from backward; the step adds only its temporaries
    assert len(seen["optimizer_temporaries"]) == trainable
    assert sum(seen["optimizer_temporaries"]) == est.optimizer_temporary_bytes


def test_zero3_on_one_gpu_is_allowed(llama):
    est = estimate_memory(llama, batch_size=1, seq_len=16, distributed="zero3", num_gpus=1)
    assert est.num_gpus == 1 and est.master_weights_bytes == _round(4 * PARAMS)
