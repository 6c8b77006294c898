"""Tests of the FSDP2 trace (layerscope.estimate.fsdp) on a tiny Llama under a fake process
group of 2 and 4 ranks, with byte figures worked out by hand.

The tiny Llama: hidden 64, intermediate 128, 4 heads of 16 (2 key/value heads), 4 blocks,
vocabulary 100, untied head. Per block: q, o (64 x 64), k, v (32 x 64), gate, up (128 x 64),
down (64 x 128) and two (64,) norms.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import build
from torch._subclasses.fake_tensor import FakeTensorMode

from layerscope import estimate_memory
from layerscope.errors import EstimateError
from layerscope.estimate.distributed import neighbour_kinds
from layerscope.estimate.fsdp import fake_world, trace_fsdp2
from layerscope.estimate.memory import _block_kinds, _block_stack
from layerscope.estimate.sharding import make_sharding
from layerscope.estimate.trace import fake_parameters, reduced_copy, replay
from layerscope.scan import scan

BLOCK_SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128), (64,), (64,)]


def _round(nbytes: int) -> int:
    return -(-nbytes // 512) * 512


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return build("llama", device="meta")


def _names(model) -> list[str]:
    return [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("ranks", [2, 4])
def test_shards_gradients_and_states_by_hand(llama, ranks):
    est = estimate_memory(llama, sharding=make_sharding("fsdp", ranks), batch_size=2, seq_len=32,
                          precision="bf16-true")
    # each tensor keeps its padded shard (ceil(dim0 / ranks) rows) as its own bf16 storage
    def shard(shape):
        rows = -(-shape[0] // ranks)
        return _round(2 * rows * _numel(shape[1:]))

    block = sum(shard(s) for s in BLOCK_SHAPES)
    root = 2 * shard((100, 64)) + shard((64,))
    buffers = sum(_round(b.numel() * b.element_size()) for b in llama.buffers())  # rotary, whole
    assert est.weights_bytes == 4 * block + root + buffers
    # sharded gradients: one reduce-scatter output per block, holding its shards
    grad_block = _round(sum(2 * -(-s[0] // ranks) * _numel(s[1:]) for s in BLOCK_SHAPES))
    grad_root = _round(2 * (2 * -(-100 // ranks) * 64 + -(-64 // ranks)))
    assert est.gradient_bytes == 4 * grad_block + grad_root
    assert est.optimizer_state_bytes == 2 * (4 * block + root)  # AdamW on the shards
    # the trace's own end state is exactly those sharded gradients (nothing else left behind)
    end = (est.optimizer_peak_bytes - est.weights_bytes - est.optimizer_state_bytes
           - est.optimizer_temporary_bytes)
    assert end == est.gradient_bytes
    assert (est.distributed, est.num_gpus) == ("fsdp", ranks)
    assert not dist.is_initialized()  # the fake process group is gone


@pytest.mark.parametrize("precision", ["bf16-true", "32-true"])
def test_activations_are_the_one_gpu_trace(llama, precision):
    """Less what FSDP holds across blocks, the sharded step saves what one GPU saves."""
    one = estimate_memory(llama, batch_size=2, seq_len=32, precision=precision)
    for strategy in ("fsdp", "fsdp-grad-op"):
        est = estimate_memory(llama, sharding=make_sharding(strategy, 4), batch_size=2, seq_len=32,
                              precision=precision)
        assert est.activation_bytes_per_block == one.activation_bytes_per_block
        assert est.activation_bytes == one.activation_bytes


def _trace(model, strategy, ranks, blocks_to_trace=None):
    """(replay, block kinds) of a trace of the full tiny Llama (every block its own kind) or of
    the reduced copy with neighbour-aware kinds."""
    name, blocks = _block_stack(scan(model), model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    base, _ = _block_kinds(model, name, blocks, {id(p): id(p) in trainable for p in model.parameters()},
                           frozenset(), model.config)
    if blocks_to_trace == "all":
        kinds, reps = list(range(len(blocks))), list(range(len(blocks)))
    else:
        kinds, reps = neighbour_kinds(blocks, base, frozenset(), name, trainable)
    reduced, kept, memo = reduced_copy(model, blocks, reps)
    mode = FakeTensorMode()
    copies = {id(memo[i]) for i in trainable}
    fake_parameters(reduced, mode, lambda n, p: torch.bfloat16, lambda p: id(p) in copies)
    trace = trace_fsdp2(reduced, kept, kinds=[kinds[r] for r in reps],
                        sharding=make_sharding(strategy, ranks), param_dtype=torch.bfloat16,
                        batch_size=2, seq_len=32, vocab_size=100, autocast_dtype=None,
                        inference=False, mode=mode)
    return replay(trace, kinds, False), reps


@pytest.mark.parametrize("frozen", [0, 2])
def test_reduced_trace_replays_the_full_one(frozen):
    model = build("llama", device="meta")
    for i in range(frozen):
        model.model.layers[i].requires_grad_(False)
    full, _ = _trace(model, "fsdp", 4, "all")
    reduced, reps = _trace(model, "fsdp", 4)
    assert len(reps) < 4 or frozen  # fewer blocks traced than the model has
    assert reduced == full


def test_grad_op_keeps_every_block_gathered(llama):
    fsdp, _ = _trace(llama, "fsdp", 2)
    grad_op, _ = _trace(llama, "fsdp-grad-op", 2)
    # after forward SHARD_GRAD_OP still holds every block's unsharded bf16 tensors
    per_block = sum(_round(2 * _numel(s)) for s in BLOCK_SHAPES)
    assert grad_op.after_forward - fsdp.after_forward == 4 * per_block
    assert grad_op.end == fsdp.end  # resharded after their backward either way


def test_existing_process_group_is_never_touched(llama):
    """In a process with its own group the trace runs in a fresh process, same result."""
    alone = estimate_memory(llama, sharding=make_sharding("fsdp", 2), batch_size=1, seq_len=16,
                            precision="bf16-true")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=3)
    try:
        with pytest.raises(EstimateError, match="already initialised"), \
                fake_world(make_sharding("fsdp", 2)):
            pass
        isolated = estimate_memory(build("llama", device="meta"), sharding=make_sharding("fsdp", 2),
                                   batch_size=1, seq_len=16, precision="bf16-true")
        assert dist.is_initialized() and dist.get_world_size() == 3  # still the user's group
    finally:
        dist.destroy_process_group()
    assert isolated == alone


def test_a_model_wrapped_with_fully_shard_is_estimated_untouched():
    """estimate_memory on an FSDP2 model used to fail with 'FSDP does not support deepcopy'."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from layerscope import estimate_memory

    plain = build("llama", device="meta")
    plain.model.layers[0].requires_grad_(False)
    expected = estimate_memory(plain, batch_size=1, seq_len=16, distributed="fsdp", num_gpus=2)
    model = build("llama", device="cpu")
    model.model.layers[0].requires_grad_(False)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        before = {n: (type(p).__name__, p.requires_grad) for n, p in model.named_parameters()}
        est = estimate_memory(model, batch_size=1, seq_len=16)  # fsdp x 2 read from the mesh
        after = {n: (type(p).__name__, p.requires_grad) for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()
    assert before == after and before["lm_head.weight"][0] == "DTensor"
    assert (est.distributed, est.num_gpus) == ("fsdp", 2)
    assert est == expected
