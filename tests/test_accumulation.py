"""Gradient accumulation (``gradient_accumulation_steps``): the gradients kept between
micro-steps, per strategy, the accumulated step's time, validation and the command line.

Hand arithmetic for the tiny Llama of ``conftest.LLAMA`` (hidden 64, MLP 128, 4 blocks, 4 heads
of 16 with 2 KV heads, vocabulary 100, untied head), allocator blocks of 512 bytes:

- a block: q, o 64 x 64 = 4096; k, v 64 x 32 = 2048; gate, up, down 64 x 128 = 8192; two
  norms of 64. In fp32: 16384 + 8192 + 8192 + 16384 + 3 x 32768 + 2 x 512 (256 rounded)
  = 148480 bytes; in bf16: 8192 + 4096 + 4096 + 8192 + 3 x 16384 + 2 x 512 = 74752 bytes.
- outside the blocks: embedding and head 100 x 64 = 6400 each, final norm 64. In fp32:
  25600 + 25600 + 512 = 51712; in bf16: 12800 + 12800 + 512 = 26112.
- every gradient: fp32 4 x 148480 + 51712 = 645632; bf16 4 x 74752 + 26112 = 325120;
  elements 4 x 36992 + 12864 = 160832.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from layerscope import cli, estimate_memory, estimate_step_time
from layerscope.distributed_config import read_deepspeed_config
from layerscope.errors import EstimateError
from layerscope.estimate.accumulation import KeptGradients, accumulated_step
from layerscope.estimate.sharding import DdpSettings, make_sharding
from layerscope.setup import TrainingSetup
from tests.conftest import LLAMA, build

FP32_GRADS = 4 * 148480 + 51712
BF16_GRADS = 4 * 74752 + 26112
STEP = dict(batch_size=2, seq_len=32)


@pytest.fixture(scope="module")
def llama():
    return build("llama", "meta")


def test_hand_arithmetic_of_the_gradients(llama):
    assert FP32_GRADS == 645632 and BF16_GRADS == 325120
    assert sum(p.numel() for p in llama.parameters()) == 4 * 36992 + 12864 == 160832
    assert estimate_memory(llama, **STEP).gradient_bytes == FP32_GRADS


def test_one_gpu_keeps_every_gradient_through_the_next_forward(llama):
    one = estimate_memory(llama, **STEP)
    two = estimate_memory(llama, **STEP, gradient_accumulation_steps=2)
    # the second micro-step's forward runs with all fp32 gradients of the first alive
    assert two.forward_peak_bytes == one.forward_peak_bytes + FP32_GRADS
    # in backward, AccumulateGrad adds into them in place: at most all of them more
    assert one.backward_peak_bytes <= two.backward_peak_bytes <= one.backward_peak_bytes + FP32_GRADS
    # the optimizer steps once, after the last backward, as without accumulation
    assert two.optimizer_peak_bytes == one.optimizer_peak_bytes
    assert two.gradient_bytes == one.gradient_bytes
    assert two.reserved_bytes >= two.peak_bytes
    # more micro-steps keep the same gradients: the same peak
    assert estimate_memory(llama, **STEP, gradient_accumulation_steps=8).peak_bytes == two.peak_bytes


def test_held_gradients_shrink_as_the_trace_makes_them_again():
    kept = KeptGradients(100, head=10, blocks=(20, 30, 40), embed=0)
    assert kept.held("embed", "fwd", None) == kept.held("block", "fwd", 2) == 100
    assert kept.held("head", "release", None) == 100
    assert kept.held("head", "bwd", None) == 100  # the head's own are counted by the trace
    assert kept.held("block", "bwd", 2) == 100 - 10
    assert kept.held("block", "bwd", 1) == 100 - 10 - 40
    assert kept.held("block", "bwd", 0) == 100 - 10 - 40 - 30
    assert kept.held("embed", "bwd", None) == 0
    assert kept.held("head", "end", None) == 0
    partition = KeptGradients(64, in_backward=False)  # ZeRO-2's: backward holds it already
    assert partition.held("block", "fwd", 0) == 64 and partition.held("block", "bwd", 0) == 0


@pytest.mark.parametrize(
    ("strategy", "knobs", "kept"),
    [
        ("ddp", {}, FP32_GRADS),  # autograd's .grad under no_sync
        ("ddp", {"ddp": DdpSettings(gradient_as_bucket_view=True)}, 0),  # views of the buckets
        ("zero1", {}, BF16_GRADS),  # the module's bf16 .grad until the boundary
        ("zero2", {}, 161280),  # this rank's half: 160832 / 2 x 2 bytes, rounded up to 512
        ("zero3", {}, 0),  # reduce-scattered into the partition buffer every micro-step
        ("fsdp", {}, FP32_GRADS),  # FSDP2's unsharded gradients, upcast to the fp32 reduce dtype
    ],
)
def test_each_strategy_keeps_what_its_source_keeps(llama, strategy, knobs, kept):
    sharding = make_sharding(strategy, 2, **knobs)
    one = estimate_memory(llama, **STEP, sharding=sharding)
    two = estimate_memory(llama, **STEP, sharding=sharding, gradient_accumulation_steps=2)
    assert two.forward_peak_bytes - one.forward_peak_bytes == kept
    assert two.optimizer_peak_bytes == one.optimizer_peak_bytes


def test_an_accumulated_step_runs_the_optimizer_once(llama):
    one = estimate_step_time(llama, **STEP)
    four = estimate_step_time(llama, **STEP, gradient_accumulation_steps=4)
    opt = one.optimizer.seconds
    assert four.tokens == 4 * one.tokens == 4 * 2 * 32
    assert four.seconds == pytest.approx(4 * (one.seconds - opt) + opt)
    assert four.optimizer == one.optimizer
    assert four.forward.seconds == pytest.approx(4 * one.forward.seconds)
    assert four.tokens_per_second > one.tokens_per_second
    assert accumulated_step(one, 1, None) is one


def test_ddp_reduces_once_per_accumulated_step(llama):
    one = estimate_step_time(llama, **STEP, distributed="ddp", num_gpus=2, gpu="h100")
    four = estimate_step_time(llama, **STEP, distributed="ddp", num_gpus=2, gpu="h100",
                              gradient_accumulation_steps=4)
    c = one.communication
    assert c is not None
    reduce = c.exposed_of("all-reduce") + c.exposed_of("reduce-scatter")
    micro = one.seconds - one.optimizer.seconds - reduce
    assert four.seconds == pytest.approx(3 * micro + one.seconds)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_bad_steps_are_refused_by_name(llama, bad):
    with pytest.raises(EstimateError, match=r"gradient_accumulation_steps must be an int >= 1"):
        TrainingSetup(llama, gradient_accumulation_steps=bad)


def test_inference_has_nothing_to_accumulate(llama):
    with pytest.raises(EstimateError, match="gradient_accumulation_steps=2 with inference=True"):
        estimate_memory(llama, inference=True, gradient_accumulation_steps=2)
    setup = TrainingSetup(llama, **STEP, gradient_accumulation_steps=3)
    assert setup.to_dict()["gradient_accumulation_steps"] == 3
    assert "3 accumulated micro-batches" in setup.describe()
    assert setup.replace(gradient_accumulation_steps=1) == TrainingSetup(llama, **STEP)


def test_deepspeed_config_gives_the_steps(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2},
                                "gradient_accumulation_steps": 4}))
    assert read_deepspeed_config(path, num_gpus=2).gradient_accumulation_steps == 4
    path.write_text(json.dumps({"zero_optimization": {"stage": 2},
                                "gradient_accumulation_steps": "auto"}))
    assert read_deepspeed_config(path, num_gpus=2).gradient_accumulation_steps is None


def test_the_flag_on_the_command_line(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                  **LLAMA}))
    args = ["estimate", str(config), "--batch-size", "2", "--seq-len", "32", "--json"]
    assert cli.main(args) == 0
    one = json.loads(capsys.readouterr().out)
    assert cli.main([*args, "--gradient-accumulation-steps", "2"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["settings"]["gradient_accumulation_steps"] == 2
    assert (two["estimate"]["forward_peak_bytes"]
            == one["estimate"]["forward_peak_bytes"] + FP32_GRADS)
    with pytest.raises(SystemExit) as exc:
        cli.main([*args, "--gradient-accumulation-steps", "0"])
    assert exc.value.code == 2
    assert "--gradient-accumulation-steps" in capsys.readouterr().err


def test_a_run_over_real_lengths_steps_the_optimizer_once_per_accumulated_step(llama):
    from layerscope import estimate_training_time

    kw = dict(num_samples=8, batch_size=2, num_epochs=1, gpu="h100", seq_lens=[32] * 8, seq_len=32)
    one = estimate_training_time(llama, **kw)
    four = estimate_training_time(llama, **kw, gradient_accumulation_steps=4)
    opt = estimate_step_time(llama, **STEP, gpu="h100").optimizer.seconds
    # 4 micro-batches of 2: one optimizer step instead of 4, and the step is 4 micro-batches
    assert (one["total_steps"], four["total_steps"]) == (4, 1)
    assert four["total_seconds"] == pytest.approx(one["total_seconds"] - 3 * opt)
    assert four["ms_per_step"] == pytest.approx(1000 * four["total_seconds"])


@pytest.mark.parametrize(("strategy", "offload"), [("zero2", None), ("zero2", "optimizer"),
                                                   ("zero1", "optimizer")])
def test_the_optimizer_steps_transfers_run_once_per_accumulated_step(llama, strategy, offload):
    kw = dict(**STEP, distributed=strategy, num_gpus=2, gpu="h100", offload=offload)
    one = estimate_step_time(llama, **kw)
    four = estimate_step_time(llama, **kw, gradient_accumulation_steps=4)
    c = one.communication
    assert c is not None
    # after the optimizer: the all-gather of the updated parameters (and their H2D copy)
    step = sum(t.exposed for t in c.transfers if t.phase == "step")
    assert step > 0
    assert {t.op for t in c.transfers if t.phase == "step"} == (
        {"all-gather"} if offload is None else {"all-gather", "host-to-device"})
    # ZeRO-1 reduces at the boundary only (with its gradients' copy to the CPU); ZeRO-2 on
    # every micro-step
    boundary = step
    if strategy == "zero1":
        boundary += sum(t.exposed for t in c.transfers
                        if t.op in ("reduce-scatter", "device-to-host"))
    micro = one.seconds - one.optimizer.seconds - boundary
    assert four.seconds == pytest.approx(3 * micro + one.seconds)


def test_an_accumulated_steps_transfers_add_up_to_its_exposed_seconds(llama):
    kw = dict(**STEP, distributed="fsdp", num_gpus=2, gpu="h100", fsdp_version=1)
    one = estimate_step_time(llama, **kw).communication
    four = estimate_step_time(llama, **kw, gradient_accumulation_steps=4).communication
    assert one is not None and four is not None
    # FSDP1 under no_sync: the all-gathers repeat on each of the 4 micro-steps, the
    # reduce-scatters run on the last only
    assert one.kinds == ("all-gather", "reduce-scatter")
    gathers = sum(t.op == "all-gather" for t in one.transfers)
    assert sum(t.op == "all-gather" for t in four.transfers) == 4 * gathers
    assert four.bytes_of("all-gather") == 4 * one.bytes_of("all-gather")
    assert four.bytes_of("reduce-scatter") == one.bytes_of("reduce-scatter")
    rs = one.exposed_of("reduce-scatter")
    assert four.exposed_seconds == pytest.approx(4 * (one.exposed_seconds - rs) + rs)
    assert sum(four.exposed_of(k) for k in four.kinds) == pytest.approx(four.exposed_seconds)
    # the issue order holds: every transfer starts after the one before it on its stream
    starts = [t.start for t in four.transfers if t.op == "all-gather"]
    assert starts == sorted(starts)
    # the run's note names what the whole step moved and waited for
    notes = " ".join(estimate_step_time(llama, **kw, gradient_accumulation_steps=4)
                     .assumptions.notes)
    assert f"{four.exposed_seconds * 1000:.1f} ms of it exposed" in notes
    assert f"{one.exposed_seconds * 1000:.1f} ms of it exposed" not in notes


@pytest.mark.parametrize("base", [{"quantization": "nf4"}, {"base_dtype": "bf16"}])
def test_fsdp2_keeps_lora_gradients_in_its_fp32_reduce_dtype(llama, base):
    # LoRA r=8 on the 7 Linears of each of the 4 layers, A (8 x in) and B (out x 8):
    # q 8x64+64x8 = 1024, k and v 8x64+32x8 = 768, o 1024, gate/up 8x64+128x8 = 1536,
    # down 8x128+64x8 = 1536: 8192 a layer, 32,768 in all. The adapters are bf16, but FSDP2's
    # mixed-precision policy reduces in fp32 and accumulates the unsharded gradients upcast to
    # it (to_accumulated_grad_if_needed): 4 bytes each, held through forward and backward.
    lora = 4 * (1024 + 768 + 768 + 1024 + 3 * 1536)
    assert lora == 32768
    kw = dict(**base, lora=8, lora_dtype="bf16", seq_len=32, batch_size=2,
              gradient_checkpointing=True, distributed="fsdp", num_gpus=2,
              precision="bf16-mixed")
    one = estimate_memory(llama, **kw)
    two = estimate_memory(llama, **kw, gradient_accumulation_steps=2)
    assert two.forward_peak_bytes - one.forward_peak_bytes == lora * 4
    assert two.backward_peak_bytes - one.backward_peak_bytes == lora * 4


def test_zero2_keeps_the_aligned_partition_its_states_hold():
    from layerscope.estimate.accumulation import sharded_kept
    from layerscope.estimate.states import TensorInfo, rank_states, zero_partition

    # DeepSpeed pads the flat group to a multiple of 2 x ranks: 1001 elements over 4 ranks
    # pad to 1008, 252 a rank (not ceil(1001 / 4) = 251)
    assert zero_partition(1001, 4) == 252 and zero_partition(1008, 4) == 252
    # 12,289 bf16 elements over 4 ranks: 3,074 a rank = 6,148 bytes, rounded up to 6,656
    params = [TensorInfo(12289, (12289,), 2, True, 0)]
    sharding = make_sharding("zero2", 4)
    states = rank_states(params, num_blocks=1, sharding=sharding, optimizer="adamw",
                         compute_itemsize=2)
    kept = sharded_kept(sharding, states, params, 1, 0, 2, 4)
    assert kept.kept == states.gradients == 6656
    assert not kept.in_backward


def test_fsdp1_shard_grad_op_keeps_its_blocks_gathered_under_no_sync(llama):
    from layerscope.estimate.accumulation import sharded_kept
    from layerscope.estimate.sharding import FsdpSettings, Sharding
    from layerscope.estimate.states import TensorInfo, rank_states

    # _should_free_in_backward is False for SHARD_GRAD_OP when not syncing: every block's
    # unsharded flat parameter stays from the first micro-step's backward on
    grad_op = Sharding("fsdp-grad-op", 2, fsdp=FsdpSettings(version=1))
    params = [TensorInfo(1000, (1000,), 4, True, 0), TensorInfo(300, (300,), 4, True, 1),
              TensorInfo(50, (50,), 4, False, None)]
    states = rank_states(params, num_blocks=2, sharding=grad_op, optimizer="adamw",
                         compute_itemsize=2)
    kept = sharded_kept(grad_op, states, params, 2, 0, 2, 4)
    # flat gradients in bf16: 2000 -> 2048, 600 -> 1024, the frozen root none; parameters
    # gathered in bf16: 2048 and 1024
    assert kept.kept == 2048 + 1024 and kept.gathered == (2048, 1024)
    # what the one-micro-step figures do not hold: the blocks after this one (less the one
    # prefetched in forward), all of them in the embedding's segments, none in the head's
    held = dataclasses.replace(kept, prefetch=True)
    assert held.held("block", "fwd", 0) == 3072 + 0  # block 1 is prefetched
    assert held.held("block", "bwd", 0) == 3072 + 1024
    assert kept.held("block", "fwd", 0) == 3072 + 1024
    assert kept.held("block", "fwd", 1) == kept.held("block", "bwd", 1) == 3072
    assert kept.held("embed", "fwd", None) == kept.held("embed", "bwd", None) == 3072 + 3072
    assert kept.held("head", "fwd", None) == 3072
    # FULL_SHARD frees them after each backward, sync or not
    full = Sharding("fsdp", 2, fsdp=FsdpSettings(version=1))
    assert sharded_kept(full, rank_states(params, num_blocks=2, sharding=full,
                                          optimizer="adamw", compute_itemsize=2),
                        params, 2, 0, 2, 4).gathered == ()


def test_fsdp1_shard_grad_op_gathers_on_the_first_micro_step_only(llama):
    kw = dict(**STEP, distributed="fsdp-grad-op", fsdp_version=1, num_gpus=2, gpu="h100")
    one = estimate_step_time(llama, **kw)
    four = estimate_step_time(llama, **kw, gradient_accumulation_steps=4)
    c, c4 = one.communication, four.communication
    assert c is not None and c4 is not None
    # the root and 4 blocks gathered once; reduce-scattered on the last micro-step
    assert sum(t.op == "all-gather" for t in c4.transfers) == 5
    assert c4.bytes_of("all-gather") == c.bytes_of("all-gather")
    once = c.exposed_of("all-gather") + c.exposed_of("reduce-scatter")
    micro = one.seconds - one.optimizer.seconds - once
    assert four.seconds == pytest.approx(3 * micro + one.seconds)
