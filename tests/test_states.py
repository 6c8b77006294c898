"""Tests of layerscope.estimate.states: each strategy's bytes, worked out by hand.

The model: an embedding (100 x 10), three blocks of a (20 x 10) weight and a (10,) bias, and a
head (100 x 10); bf16 (2 bytes), everything trainable, on 4 GPUs. Every figure is rounded up to
the CUDA caching allocator's 512-byte blocks.
"""

from __future__ import annotations

import pytest

from layerscope.errors import EstimateError
from layerscope.estimate.sharding import DdpSettings, FsdpSettings, ZeroSettings, make_sharding
from layerscope.estimate.states import (
    TensorInfo,
    ddp_buckets,
    fsdp2_shard_numel,
    rank_states,
    zero3_allocations,
    zero3_sub_groups,
)


def _model(trainable: bool = True) -> list[TensorInfo]:
    params = [TensorInfo(1000, (100, 10), 2, trainable, None)]
    for i in range(3):
        params += [TensorInfo(200, (20, 10), 2, trainable, i), TensorInfo(10, (10,), 2, trainable, i)]
    return [*params, TensorInfo(1000, (100, 10), 2, trainable, None)]


def _states(strategy: str, **kwargs):
    sharding = make_sharding(strategy, kwargs.pop("num_gpus", 4), **kwargs)
    return rank_states(_model(), num_blocks=3, sharding=sharding, optimizer="adamw",
                       compute_itemsize=2)


def test_one_gpu():
    s = _states(None, num_gpus=1)
    # 2000 B -> 2048 (embedding, head); 400 -> 512 and 20 -> 512 per block
    weights = 2 * 2048 + 3 * (512 + 512)
    assert s.weights == weights == 7168
    assert s.optimizer_state == 2 * weights  # exp_avg, exp_avg_sq
    assert s.optimizer_temporary == weights  # foreach sqrt of exp_avg_sq
    assert s.trace_keeps_grads and s.buffers == 0


def test_ddp_buckets_are_a_second_copy_of_the_gradients():
    s = _states("ddp")
    # 5260 bytes of gradients fit the first 1 MiB bucket: one bucket, 5260 -> 5632
    assert ddp_buckets(_model(), 25) == [2 * (2000 + 3 * 210)]
    assert s.buffers == 5632
    assert s.gradients == 7168 and s.trace_keeps_grads
    view = _states("ddp", ddp=DdpSettings(gradient_as_bucket_view=True))
    assert view.gradients == 5632 and not view.trace_keeps_grads  # gradients live in the buckets


def test_ddp_bucket_caps():
    big = [TensorInfo(2**19, (2**19,), 4, True, None) for _ in range(4)]  # 2 MiB each
    # reverse order; the first bucket closes at >= 1 MiB (one tensor), the next at >= 25 MiB
    assert ddp_buckets(big, 25) == [2**21, 3 * 2**21]
    assert ddp_buckets(big, 2) == [2**21, 2**21, 2**21, 2**21]


def test_zero2_by_hand():
    s = _states("zero2", zero=ZeroSettings(reduce_bucket_size=1000))
    # 2630 trainable elements, partitioned in multiples of 2 * 4: ceil(2630 / 8) * 2 = 658
    part = 658
    assert s.weights == 5632  # the whole module in 16-bit, one flat buffer: 5260 -> 5632
    assert s.master_weights == 3072  # fp32 partition: 2632 -> 3072
    assert s.optimizer_state == 2 * 3072
    assert s.gradients == 1536  # grads_in_partition: 658 * 2 = 1316 -> 1536
    bucket = 2048  # 1000 elements * 2 -> 2048, one (overlap_comm is off below stage 3)
    assert s.backward_extra == (bucket + 1536,) * 3
    assert s.extra("head", "bwd", None) == bucket + 1536 and s.extra("head", "fwd", None) == 0
    # step: partition grads + flat copy + fp32 cast = 1536 + 1536 + 3072, or fp32 + foreach sqrt
    assert s.optimizer_extra == max(1536 + 1536 + 3072, 3072 + 3072) == 6144
    # what the step allocates beyond the partition grads backward left: the cast and the sqrt
    assert s.step_blocks == (3072, 3072)
    assert not s.trace_keeps_grads
    assert part * 4 <= s.master_weights


def test_zero1_keeps_the_full_gradients():
    s = _states("zero1", zero=ZeroSettings(reduce_bucket_size=1000))
    assert s.trace_keeps_grads
    assert s.gradients == 7168  # every .grad until the step
    # after backward: the bucket and the partition buffer on top of the full gradients
    assert s.optimizer_extra == max(2048 + 1536, 1536 + 1536 + 3072 - 7168, 3072 + 3072 - 7168)


def test_zero3_by_hand():
    zero = ZeroSettings(reduce_bucket_size=1000, param_persistence_threshold=100)
    s = _states("zero3", zero=zero)
    # partitions: 250 (embedding, head), 50 (weights), ceil(10 / 4) = 3 (biases)
    part = 250 + 3 * 50 + 3 * 3 + 250
    assert part == 659
    # each partition -> 512 (8 tensors), and the biases (<= 100 elements) stay whole: 3 * 512
    assert s.weights == 8 * 512 + 3 * 512
    assert s.master_weights == 3072  # 659 * 4 = 2636 -> 3072
    assert s.buffers == 2048 + 1536  # IPG bucket + gradient partition buffer (1318 -> 1536)
    assert s.gradients == 1536
    # a block gathers its (20 x 10) weight: 400 bytes, besides what stays gathered from earlier
    # in forward until backward: every tensor here (far under the reuse distance), so the
    # embedding (2000 B) and the blocks before (400 B each); backward adds the bucket's copy
    assert s.forward_extra == (400 + 2000, 400 + 2000 + 400, 400 + 2000 + 800)
    assert s.backward_extra == tuple(f + 2048 for f in s.forward_extra)
    # the head: its 1000 elements plus the three blocks (3 * 200) and the embedding (1000)
    assert s.head_extra == (5200, 5200 + 2048)
    assert s.optimizer_extra == max(1536 + 3072, 3072 + 3072)


def test_zero3_sub_groups_close_once_full():
    partitions = [250, 50, 3, 50, 3, 50, 3, 250]  # the model's partitions on 4 GPUs, in order
    assert zero3_sub_groups(partitions, 10**9) == [659]  # sub_group_size covers the group
    # 250 + 50 reaches 300 and closes; the rest, 3 + 50 + 3 + 50 + 3 + 250 = 359, closes last
    assert zero3_sub_groups(partitions, 300) == [300, 359]
    assert zero3_sub_groups(partitions, 0) == partitions  # every tensor a sub-group
    assert zero3_sub_groups([], 300) == []


def test_zero3_step_by_sub_group_and_fp64_norms():
    def step(sub_group_size: int, optimizer: str) -> int:
        sharding = make_sharding("zero3", 4, zero=ZeroSettings(reduce_bucket_size=1000,
                                                               sub_group_size=sub_group_size))
        return rank_states(_model(), num_blocks=3, sharding=sharding, optimizer=optimizer,
                           compute_itemsize=2).optimizer_extra

    # sub-groups [300, 359]: the larger flattened in bf16 (718 -> 1024) and cast to fp32
    # (1436 -> 1536); adamw's foreach sqrt needs another fp32 copy (1536 + 1536)
    assert step(300, "adamw-fused") == 1024 + 1536
    assert step(300, "adamw") == 1536 + 1536
    # one tensor per sub-group: the largest (250 elements) flattened and cast, 512 + 1024, is
    # below the fp64 copy _get_norm_groups makes of it for the gradient norm: 2000 -> 2048
    assert step(0, "adamw-fused") == 2048


def test_zero3_keeps_what_is_reused_within_the_distance():
    # an embedding and a head of 1e8 elements, three blocks of 1.5e8, on 2 GPUs, recomputed
    params = [TensorInfo(10**8, (10**8,), 2, True, None)]
    params += [TensorInfo(150 * 10**6, (150 * 10**6,), 2, True, i) for i in range(3)]
    params.append(TensorInfo(10**8, (10**8,), 2, True, None))
    sharding = make_sharding("zero3", 2, zero=ZeroSettings(prefetch_bucket_size=0))
    s = rank_states(params, num_blocks=3, sharding=sharding, optimizer="adamw-fused",
                    compute_itemsize=2, gradient_checkpointing=True)
    # elements fetched between a block's forward and its recomputation: the rest of it, the
    # head twice, the later blocks three times (forward, recomputation, backward), in 1e6:
    # block 2: 150 + 200 = 350 -> kept; block 1: 150 + 200 + 450 = 800 -> kept;
    # block 0: 150 + 200 + 900 = 1250 >= 1000 -> released, and so the embedding (3 * 450 + 200)
    assert s.head_extra[0] == (100 + 150 + 150) * 10**6 * 2
    # block 2's forward holds block 1 besides itself; blocks 0 and 1 hold nothing kept
    assert s.forward_extra == (150 * 10**6 * 2, 150 * 10**6 * 2, 2 * 150 * 10**6 * 2)


def test_zero3_allocations_in_order():
    sharding = make_sharding("zero3", 4, zero=ZeroSettings(
        reduce_bucket_size=1000, param_persistence_threshold=100, sub_group_size=300))
    init, step = zero3_allocations(_model(), sharding=sharding, optimizer="adamw-fused")
    fused_state = 512 + 1536 + 1536  # step, exp_avg, exp_avg_sq of a 300- or 359-element tensor
    assert init == [
        (0, 512), (1, 512), (2, 512),  # the persisted biases, whole (20 B each)
        (3, 1536),  # the flat bf16 partition: 659 * 2 = 1318
        (4, 1024), (5, 1536), (4, 0),  # sub-group 300: a bf16 clone (600) cast to fp32 (1200)
        (7, 1024), (8, 1536), (7, 0),  # sub-group 359: 718, then 1436
        (10, 1536),  # a zero fp32 gradient of the largest sub-group (1436) ...
        (11, fused_state), (12, fused_state),  # ... while each sub-group's states are made
        (10, 0),
        (14, 1536), (15, 2048),  # the gradient partition buffer (1318), the bucket (2000)
    ]
    # fp64 copies of each gradient partition for the norm: 250 * 8 = 2000, 50 * 8, 3 * 8
    norms = [2048, 512, 512, 512, 512, 512, 512, 2048]
    assert step[:16] == [op for i, b in enumerate(norms) for op in ((2 * i, b), (2 * i, 0))]
    # per sub-group: flattened bf16 (600 or 718), its fp32 cast (1200 or 1436), freed in turn
    assert step[16:] == [(16, 1024), (17, 1536), (16, 0), (17, 0),
                         (20, 1024), (21, 1536), (20, 0), (21, 0)]


def test_zero3_on_one_gpu_gathers_nothing():
    zero = ZeroSettings(reduce_bucket_size=1000, param_persistence_threshold=100)
    s = _states("zero3", num_gpus=1, zero=zero)
    # every partition is the whole tensor, and is what a module computes with: no persisted
    # copy, no gathered blocks, head or embedding, no reduce-scatter copy of the bucket
    assert s.weights == 2 * 2048 + 3 * (512 + 512)
    assert s.forward_extra == s.backward_extra == (0, 0, 0)
    assert s.embed_extra == s.head_extra == (0, 0)


def test_zero_offload():
    s = _states("zero3", offload="params", zero=ZeroSettings(reduce_bucket_size=1000,
                                                            param_persistence_threshold=100))
    assert s.master_weights == s.optimizer_state == s.gradients == 0
    assert s.weights == 3 * 512  # only the persisted biases stay on the GPU
    # host: gradient partitions (1536) + master (3072) + Adam (6144) + fp32 grads (3072)
    #       + the 16-bit parameter partitions (8 * 512)
    assert s.host == 1536 + 3072 + 6144 + 3072 + 8 * 512
    # a gather copies the rank's partition to the GPU first: a block's (20 x 10) weight gathers
    # 400 bytes from a 50-element (100-byte) copy; the head's 1000 elements from 250 (500 B)
    # (with the embedding and earlier blocks kept gathered, as in test_zero3_by_hand)
    assert s.forward_extra == (400 + 100 + 2000, 400 + 100 + 2400, 400 + 100 + 2800)
    assert s.backward_extra == tuple(f + 2048 for f in s.forward_extra)
    assert s.head_extra == (5200 + 500, 5200 + 500 + 2048)
    assert s.embed_extra == (2000 + 500, 2000 + 500 + 2048)
    z2 = _states("zero2", offload="optimizer", zero=ZeroSettings(reduce_bucket_size=1000))
    # GPU staging buffer of the largest parameter: 1000 * 2 = 2000 -> 2048
    assert z2.buffers == 2048 and z2.optimizer_state == 0
    assert z2.host == 3072 + 6144 + 3072 + 1536 + 2048


def test_fsdp2_shards_by_hand():
    assert fsdp2_shard_numel((100, 10), 4) == 250
    assert fsdp2_shard_numel((10,), 4) == 3  # ceil(10 / 4): padded
    assert fsdp2_shard_numel((10,), 3) == 4
    s = _states("fsdp")
    assert s.weights == 8 * 512  # every shard is its own storage, each <= 512 bytes
    # sharded gradients: one reduce-scatter output per block ((50 + 3) * 2 -> 512), root 1000 -> 1024
    assert s.gradients == 3 * 512 + 1024
    assert s.optimizer_state == 2 * 8 * 512
    off = _states("fsdp", offload="params")
    assert off.weights == off.gradients == off.optimizer_state == 0
    assert off.host == 8 * 512 + 3 * 512 + 1024 + 2 * 8 * 512 + 8 * 512


def test_fsdp1_by_hand():
    s = _states("fsdp", fsdp=FsdpSettings(version=1))
    # flat parameters: blocks of 210 elements (420 B -> 105 B a shard -> 512), root 2000 (1000 B)
    assert s.weights == 3 * 512 + 1024
    assert s.gradients == 3 * 512 + 1024
    # forward of a block: the root kept gathered (4000 -> 4096) and the block (420 -> 512)
    assert s.forward_extra == (4096 + 512,) * 3
    # backward of block 2: root + block + prefetched block 1 + the per-tensor gradients and
    # their concatenation (2 * 512) + its sharded gradient + the head's gradient kept whole
    # until the root's is assembled (2000 -> 2048)
    assert s.backward_extra[2] == 4096 + 512 + 512 + 1024 + 512 + 2048
    # block 0: no block before it to prefetch; blocks 1 and 2 already hold sharded gradients
    assert s.backward_extra[0] == 4096 + 512 + 1024 + 512 + 2 * 512 + 2048


def test_fsdp1_mixed_flat_parameters():
    # one block of a trainable and a frozen (1000 x 100) tensor, and a frozen root
    params = [TensorInfo(100_000, (1000, 100), 2, True, 0), TensorInfo(100_000, (1000, 100), 2, False, 0),
              TensorInfo(1000, (100, 10), 2, False, None)]

    def states(use_orig_params: bool):
        sharding = make_sharding("fsdp", 4, fsdp=FsdpSettings(version=1, use_orig_params=use_orig_params))
        return rank_states(params, num_blocks=1, sharding=sharding, optimizer="adamw",
                           compute_itemsize=2)

    mixed, apart = states(True), states(False)
    # use_orig_params=True: the gradient spans the whole flat parameter, 400000 B / 4 = 100000
    assert mixed.gradients == 100_352
    # False: the adapters-apart wrapping; only the trainable tensor: 200000 B / 4 = 50000
    assert apart.gradients == 50_176
    # the optimizer sees the trainable tensor's local slice either way: 25000 * 2 = 50000
    assert mixed.optimizer_state == apart.optimizer_state == 2 * 50_176
    # backward of the block: autograd's gradients and their concatenation span the whole
    # flat parameter (400000 -> 400384) with use_orig_params, the trainable tensor without
    root = 2048  # the root, kept gathered: 2000 -> 2048
    assert mixed.backward_extra[0] == root + 400_384 + 2 * 400_384 + 100_352
    assert apart.backward_extra[0] == root + 400_384 + 2 * 200_192 + 50_176


def test_optimizer_blocks_as_the_optimizer_allocates_them():
    # DDP: AdamW keeps a state pair per tensor and its foreach sqrt makes one temporary each
    ddp = _states("ddp")
    sizes = (2048, *(512,) * 6, 2048)  # embedding, three (weight, bias) blocks, head
    assert ddp.state_blocks == tuple(b for size in sizes for b in (size, size))
    assert ddp.step_blocks == sizes and sum(ddp.step_blocks) == ddp.optimizer_extra
    # FSDP1 without use_orig_params steps each unit's flat shard: blocks 210 elements / 4 ->
    # 53 * 2 B -> 512, the root 2000 / 4 -> 1000 B -> 1024
    sharding = make_sharding("fsdp", 4, fsdp=FsdpSettings(version=1, use_orig_params=False))
    flat = rank_states(_model(), num_blocks=3, sharding=sharding, optimizer="adamw",
                       compute_itemsize=2)
    assert flat.state_blocks == (512, 512, 512, 512, 512, 512, 1024, 1024)
    # the sharded gradients are made in backward (they are in the extras), not by the step
    assert flat.step_blocks == (512, 512, 512, 1024)
    assert flat.optimizer_extra == flat.gradients + sum(flat.step_blocks)


def test_inputs_are_checked():
    with pytest.raises(EstimateError, match=r"block 5 is outside 0\.\.2"):
        rank_states([TensorInfo(1, (1,), 2, True, 5)], num_blocks=3,
                    sharding=make_sharding("ddp", 2), optimizer="adamw", compute_itemsize=2)
    with pytest.raises(EstimateError, match="unknown optimizer"):
        rank_states(_model(), num_blocks=3, sharding=make_sharding("ddp", 2), optimizer="lion",
                    compute_itemsize=2)
