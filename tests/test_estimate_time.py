"""Step-time estimates on tiny models: FLOP counts checked against hand arithmetic."""


import pytest
import torch
from conftest import build, flags
from torch import nn

from layerscope import FreezePlan, GradualUnfreezer, estimate_training_time
from layerscope.errors import EstimateError
from layerscope.estimate.roofline import OPTIMIZER_PASSES
from layerscope.estimate.schedule import estimate_unfreezing_schedule
from layerscope.estimate.time import estimate_step_time

B, S = 2, 16
T = B * S  # tokens per step
# conftest LLAMA: hidden 64, intermediate 128, 4 heads (head_dim 16), 2 kv heads, vocab 100.
# Matmul weights per block: q 64*64 + k 64*32 + v 64*32 + o 64*64 + gate/up/down 3 * 64*128.
LLAMA_BLOCK = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # 36864
LLAMA_HEAD = 64 * 100
# QK^T and PV, causal: query i meets i + 1 keys, (S + 1) / 2 on average
LLAMA_ATTN = 4 * B * S * ((S + 1) / 2) * 64


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def step(model, plan=None, **kw):
    kw = {"batch_size": B, "seq_len": S, **kw}
    return estimate_step_time(model, plan, **kw)


def test_one_linear_layer():
    t = step(OneLinear(), precision="bf16-true")
    assert t.forward.flops == 2 * T * 64 * 32
    assert t.backward.flops == 2 * T * 64 * 32  # weight gradient only: the input needs none
    assert t.optimizer.bytes == OPTIMIZER_PASSES["adamw"][0] * 64 * 32 * 2  # bf16 states
    assert t.seconds == pytest.approx(t.forward.seconds + t.backward.seconds + t.optimizer.seconds)
    assert t.seconds > 0 and t.trainable_params == 64 * 32


def test_tiny_llama_forward_and_full_backward_flops():
    t = step(build("llama", "meta"))
    assert t.forward.flops == 2 * T * (4 * LLAMA_BLOCK + LLAMA_HEAD) + 4 * LLAMA_ATTN
    # input and weight gradients of every matmul, attention backward 2.5x its forward
    assert t.backward.flops == 2 * 2 * T * (4 * LLAMA_BLOCK + LLAMA_HEAD) + 4 * 2.5 * LLAMA_ATTN
    assert t.recompute.flops == 0 and t.earliest_trainable_block == 0


def test_backward_stops_at_the_earliest_trainable_block():
    model = build("llama", "meta")
    first = step(model, FreezePlan.first(2) | FreezePlan.embeddings())
    # blocks 2, 3 and the head: input + weight gradients; blocks 0, 1: nothing
    assert first.backward.flops == 2 * 2 * T * (2 * LLAMA_BLOCK + LLAMA_HEAD) + 2 * 2.5 * LLAMA_ATTN
    assert first.earliest_trainable_block == 2
    last = step(model, FreezePlan.last(2))
    # backward still runs through every block (the embeddings train); blocks 2, 3 lack dW
    assert last.backward.flops == (2 * 2 * T * (4 * LLAMA_BLOCK + LLAMA_HEAD)
                                   - 2 * T * 2 * LLAMA_BLOCK + 4 * 2.5 * LLAMA_ATTN)
    full = step(model)
    assert first.backward.flops < last.backward.flops < full.backward.flops
    assert first.seconds < full.seconds


def test_plan_does_not_touch_the_model():
    model = build("llama", "meta")
    before = flags(model)
    step(model, FreezePlan.first(3))
    assert flags(model) == before


def test_requires_grad_flags_are_used_without_a_plan():
    model = build("llama", "meta")
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    assert step(model).earliest_trainable_block == 1


def test_gradient_checkpointing_recomputes_the_forward_of_the_blocks():
    model = build("llama", "meta")
    plain, ckpt = step(model), step(model, gradient_checkpointing=True)
    assert ckpt.recompute.flops == 2 * T * 4 * LLAMA_BLOCK + 4 * LLAMA_ATTN
    assert ckpt.backward.flops == plain.backward.flops
    assert ckpt.seconds > plain.seconds
    frozen_plan = FreezePlan.first(2) | FreezePlan.embeddings()
    frozen = step(model, frozen_plan, gradient_checkpointing=True)
    # gradient_checkpointing_enable() makes the embedding output require a gradient
    # (enable_input_require_grads): the frozen blocks 0, 1 are recomputed and give input
    # gradients too; only blocks 2, 3 and the head have weight gradients. Their frozen down
    # projection saves nothing for backward, so recomputing them stops before it (early stop)
    down = 2 * T * 128 * 64
    assert frozen.recompute.flops == 2 * T * 4 * LLAMA_BLOCK - 2 * down + 4 * LLAMA_ATTN
    dx = 2 * T * (4 * LLAMA_BLOCK + LLAMA_HEAD) + 4 * 2.5 * LLAMA_ATTN
    assert frozen.backward.flops == dx + 2 * T * (2 * LLAMA_BLOCK + LLAMA_HEAD)
    assert frozen.earliest_trainable_block == 2
    # without checkpointing backward stops at block 2
    assert step(model, frozen_plan).backward.flops == (
        2 * 2 * T * (2 * LLAMA_BLOCK + LLAMA_HEAD) + 2 * 2.5 * LLAMA_ATTN)


def test_checkpointing_a_plain_module_recomputes_only_where_gradients_flow():
    from conftest import PlainNet  # no input_ids: nothing makes the embedding output need grad

    model = PlainNet(width=8, vocab=10)
    frozen = FreezePlan.first(2) | FreezePlan.embeddings()
    t = step(model, frozen, gradient_checkpointing=True, seq_len=4)
    # blocks: Linear(8, 8) each; only block 2 (the last) trains, so only it is recomputed
    assert t.recompute.flops == 2 * B * 4 * 8 * 8
    assert t.earliest_trainable_block == 2


def test_inference_is_forward_only():
    model = build("llama", "meta")
    t = step(model, inference=True)
    assert t.forward.flops == step(model).forward.flops
    assert t.backward.flops == 0 and t.optimizer.seconds == 0 and t.seconds == t.forward.seconds
    # every parameter frozen: training is an error, inference is fine
    with pytest.raises(EstimateError, match="nothing is trainable"):
        step(model, FreezePlan.all())
    assert step(model, FreezePlan.all(), inference=True).seconds == t.seconds


def test_lora_trains_adapters_through_every_block():
    model = build("llama", "meta")
    r = 8
    t = step(model, lora=r)
    # adapters on q, k, v, o, gate, up, down: r * (in + out) each
    per_block = r * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert t.trainable_params == 4 * per_block
    lora_fwd = 2 * T * per_block * 4  # two skinny matmuls per adapted layer
    assert t.forward.flops == step(model).forward.flops + lora_fwd
    # base weights frozen: input gradients everywhere, no base weight gradients
    base_dx = 2 * T * (4 * LLAMA_BLOCK + LLAMA_HEAD)
    assert t.backward.flops == base_dx + 4 * 2.5 * LLAMA_ATTN + 2 * lora_fwd
    # with a plan, what the plan leaves trainable trains too: blocks 1-3 (two norms each),
    # the embedding, the final norm and the head
    both = step(model, FreezePlan.first(1), lora=r)
    base = 3 * (LLAMA_BLOCK + 2 * 64) + 100 * 64 + 64 + 100 * 64
    assert both.trainable_params == t.trainable_params + base


def test_moe_runs_only_top_k_experts():
    model = build("mixtral", "meta")  # hidden 32, intermediate 48, 4 experts, top-2, 2 blocks
    t = step(model, inference=True)
    attn_proj = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32
    router = 32 * 4
    experts = 2 * (2 * 48 * 32 + 48 * 32)  # top-2 of gate_up (96 x 32) and down (32 x 48)
    head = 32 * 50
    attn = 4 * B * S * ((S + 1) / 2) * 32
    assert t.forward.flops == 2 * T * (2 * (attn_proj + router + experts) + head) + 2 * attn


def test_optimizer_bytes_follow_the_optimizer_and_precision():
    model = build("llama", "meta")
    n = sum(p.numel() for p in model.parameters())
    assert step(model, precision="bf16-mixed").optimizer.bytes == 21 * n * 4
    assert step(model, precision="bf16-true").optimizer.bytes == 21 * n * 2
    assert step(model, optimizer="adamw-fused").optimizer.bytes == 7 * n * 4
    assert step(model, optimizer="sgd_momentum").optimizer.bytes == 8 * n * 4
    fused, foreach = step(model, optimizer="fused_adamw"), step(model)
    assert fused.optimizer.seconds < foreach.optimizer.seconds


def test_precision_and_gpu_change_the_time_in_the_expected_direction():
    model = build("llama", "meta")
    big = dict(batch_size=8, seq_len=1024)
    h100 = estimate_step_time(model, precision="bf16-true", **big)
    assert estimate_step_time(model, precision="32-true", **big).seconds > h100.seconds
    assert estimate_step_time(model, precision="bf16-true", gpu="l4", **big).seconds > h100.seconds
    assert h100.assumptions.matmul_dtype == "bf16" and h100.assumptions.gpu == "h100-sxm"
    fp32 = estimate_step_time(model, precision="fp32", **big).assumptions
    assert fp32.peak_flops == 66.9e12 and any("TF32" in n or "tf32" in n for n in fp32.notes)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ({"seq_len": -3}, "seq_len"),
    ({"precision": "fp8-magic"}, "unknown precision 'fp8-magic'; allowed: 32-true"),
    ({"optimizer": "lion"}, "unknown optimizer 'lion'; allowed: adam"),
    ({"gpu": "h1000"}, "unknown GPU 'h1000'.*known:"),
    ({"lora": 0}, "lora"),
    ({"inference": "yes"}, "inference must be a bool"),
])
def test_bad_settings_name_the_value_and_what_is_allowed(kwargs, match):
    with pytest.raises(EstimateError, match=match):
        step(OneLinear(), **kwargs)


def test_model_must_be_a_module_or_a_buildable_source():
    with pytest.raises(TypeError, match="cannot build a model from object"):
        estimate_step_time(object())
    assert estimate_step_time("gpt2", seq_len=S).seconds > 0  # a preset name is built
    with pytest.raises(EstimateError, match="FreezePlan"):
        estimate_step_time(OneLinear(), "first:2")  # type: ignore[arg-type]


# -- estimate_training_time -----------------------------------------------------------------
def test_training_time_reference_example_is_unchanged():
    out = estimate_training_time(OneLinear(), num_samples=50000, batch_size=16, num_epochs=3)
    assert out["total_steps"] == 9375 and out["formatted"] == "1h 18m 7s"
    assert out["gpu_hours"] == 9375 * 0.5 / 3600 and out["cost"] is None


def test_training_time_with_gpu_price_and_data_parallel_gpus():
    model = build("llama", "meta")
    out = estimate_training_time(model, 1000, 4, 2, seq_len=S, gpu="h100", num_gpus=4,
                                 price_per_hour=2.0, precision="bf16-true")
    step_s = estimate_step_time(model, batch_size=4, seq_len=S, precision="bf16-true",
                                num_gpus=4).seconds
    one = estimate_step_time(model, batch_size=4, seq_len=S, precision="bf16-true").seconds
    assert step_s > one  # four GPUs (DDP) all-reduce the gradients; the last bucket waits
    steps = 2 * 63  # ceil(1000 / (4 samples x 4 GPUs)) per epoch
    assert out["total_steps"] == steps and out["ms_per_step"] == pytest.approx(step_s * 1e3)
    assert out["cost"] == pytest.approx(steps * step_s / 3600 * 4 * 2.0)
    assert out["gpu"] == "h100-sxm" and out["step_time"].seconds == pytest.approx(step_s)
    catalogue = estimate_training_time(model, 1000, 4, 2, seq_len=S, gpu="h100-sxm")
    assert catalogue["price_per_hour"] == 2.99  # the catalogue's price when none is given
    for bad, match in (({"num_gpus": 0}, "num_gpus"), ({"price_per_hour": -1.0}, "price")):
        with pytest.raises(EstimateError, match=match):
            estimate_training_time(model, 10, 2, 1, **bad)


def test_unfreezing_schedule_time():
    model = build("llama", "meta")
    before = flags(model)
    unfreezer = GradualUnfreezer(model, total_epochs=3, verbose=False)
    sched = estimate_unfreezing_schedule(unfreezer, 100, 4, seq_len=S, gpu="a100",
                                         precision="bf16-true")
    assert [e.epoch for e in sched.epochs] == [0, 1, 2]
    assert all(e.steps == 25 for e in sched.epochs)
    # more blocks train each epoch: more trainable parameters and longer steps
    params = [e.trainable_params for e in sched.epochs]
    assert params == sorted(params) and params[0] < params[-1]
    assert sched.epochs[0].step.seconds < sched.epochs[-1].step.seconds
    assert sched.seconds == pytest.approx(sum(e.seconds for e in sched.epochs))
    assert sched.cost == pytest.approx(sched.gpu_hours * 1.79)
    # memory: each epoch trains more blocks, so the last epoch has the highest peak
    peaks = [e.memory.peak_bytes for e in sched.epochs]
    assert peaks == sorted(peaks) and sched.peak_bytes == peaks[-1] and sched.peak_epoch == 2
    assert [e.memory.trainable_params for e in sched.epochs] == params
    assert flags(model) == before  # plans resolved, never applied
    with pytest.raises(EstimateError, match="GradualUnfreezer"):
        estimate_unfreezing_schedule(model, 100, 4)


def test_eager_attention_computes_every_score():
    model = build("llama", "meta")
    model.config._attn_implementation = "eager"  # as for models without SDPA (Gemma-2)
    t = step(model, inference=True)
    # QK^T and PV as batched GEMMs over every (batch, head) on the full S x S scores
    full = 2 * (2 * S * S * 16) * B * 4  # two GEMMs of 2 S S d FLOPs, 4 heads of 16
    assert t.forward.flops == 2 * T * (4 * LLAMA_BLOCK + LLAMA_HEAD) + 4 * full
    assert any("eager" in n for n in t.assumptions.notes)


def test_training_time_passes_every_step_setting_through():
    model = build("llama", "meta")
    base = dict(seq_len=S, gpu="h100", precision="bf16-true")
    plain = estimate_training_time(model, 100, 4, 1, **base)
    ckpt = estimate_training_time(model, 100, 4, 1, gradient_checkpointing=True, **base)
    fused = estimate_training_time(model, 100, 4, 1, optimizer="adamw-fused", **base)
    lora = estimate_training_time(model, 100, 4, 1, lora=8, **base)
    assert ckpt["ms_per_step"] > plain["ms_per_step"]  # the forward runs again in backward
    assert fused["step_time"].optimizer.seconds < plain["step_time"].optimizer.seconds
    assert lora["step_time"].trainable_params < plain["step_time"].trainable_params
    with pytest.raises(EstimateError, match="estimated only when gpu is given"):
        estimate_training_time(model, 100, 4, 1, optimizer="sgd")


# -- data-parallel steps -------------------------------------------------------------------------
# conftest LLAMA, every tensor: a block has its matmuls and two norms; the root the embedding,
# the untied head and the final norm
LLAMA_BLOCK_PARAMS = LLAMA_BLOCK + 2 * 64
LLAMA_ROOT_PARAMS = 2 * 100 * 64 + 64
LLAMA_PARAMS = 4 * LLAMA_BLOCK_PARAMS + LLAMA_ROOT_PARAMS


def test_fsdp_step_is_the_ranks_compute_plus_exposed_transfers_plus_its_shard_optimizer():
    from layerscope.estimate.time import _optimizer
    from layerscope.setup import PRECISIONS

    model = build("llama", "meta")
    t = step(model, distributed="fsdp", num_gpus=4)
    c = t.communication
    assert c is not None and (c.strategy, c.num_gpus, c.nodes) == ("fsdp", 4, 1)
    # FSDP2's mixed precision: bf16 gathers (forward, then every block again for backward),
    # fp32 reduce-scatters of every trainable parameter
    assert c.bytes_of("all-gather") == 2 * LLAMA_PARAMS + 2 * 4 * LLAMA_BLOCK_PARAMS
    assert c.bytes_of("reduce-scatter") == 4 * LLAMA_PARAMS
    # the matmuls get bf16 weights from the gather: the step computes as bf16-true does
    pure = step(model, precision="bf16-true")
    assert t.fwd_bwd_seconds == pytest.approx(pure.fwd_bwd_seconds)
    assert t.forward.bytes < step(model).forward.bytes  # no autocast casts
    # the optimizer steps each fp32 tensor's quarter (dim 0 split in 4)
    tensors = 4 * 9 + 3
    shard, _ = _optimizer(t_gpu(), PRECISIONS["bf16-mixed"], "adamw", LLAMA_PARAMS // 4, tensors)
    assert t.optimizer.seconds == pytest.approx(shard)
    assert t.seconds == pytest.approx(c.compute_seconds + c.exposed_seconds + t.optimizer.seconds)
    assert c.compute_seconds == pytest.approx(t.fwd_bwd_seconds)
    assert t.exposed_communication_seconds == c.exposed_seconds > 0
    assert t.low_seconds < t.seconds < t.high_seconds
    assert any(n.startswith("fsdp x 4 GPUs") for n in t.assumptions.notes)


def t_gpu():
    from layerscope.estimate.hardware import get_gpu

    return get_gpu("h100-sxm")


def test_ddp_and_zero_move_what_their_source_says():
    model = build("llama", "meta")
    ddp = step(model, distributed="ddp", num_gpus=2).communication
    assert ddp.kinds == ("all-reduce",) and ddp.bytes_of("all-reduce") == 4 * LLAMA_PARAMS
    zero2 = step(model, distributed="zero2", num_gpus=2).communication
    # bf16 module: bf16 reduce-scatter during backward, bf16 all-gather of the update after
    assert zero2.bytes_of("reduce-scatter") == 2 * LLAMA_PARAMS
    assert [t.phase for t in zero2.transfers if t.op == "all-gather"] == ["step"]
    zero3 = step(model, distributed="zero3", num_gpus=2)
    assert zero3.communication.bytes_of("reduce-scatter") == 2 * LLAMA_PARAMS
    # ZeRO-3 steps a flat fp32 partition: one tensor of half the elements
    from layerscope.estimate.time import _optimizer
    from layerscope.setup import PRECISIONS

    part, _ = _optimizer(t_gpu(), PRECISIONS["32-true"], "adamw", LLAMA_PARAMS // 2, 1)
    assert zero3.optimizer.seconds == pytest.approx(part)


def test_lora_under_fsdp_gathers_the_base_and_reduces_the_adapters():
    model = build("llama", "meta")
    t = step(model, lora=2, distributed="fsdp", num_gpus=2)
    adapters = 4 * 2 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)  # r (in + out) x 7
    c = t.communication
    assert c.bytes_of("reduce-scatter") == 4 * adapters  # fp32 adapters, fp32 reduce
    assert c.bytes_of("all-gather") == 2 * (LLAMA_PARAMS + adapters) + 2 * (
        4 * LLAMA_BLOCK_PARAMS + adapters)


def test_offload_steps_on_the_cpu_and_copies_over_pcie():
    from layerscope.estimate.comm import TORCH_CPU_ADAMW_PARAMS_PER_S

    model = build("llama", "meta")
    t = step(model, distributed="fsdp", num_gpus=2, offload="params")
    c = t.communication
    assert c.cpu_optimizer == "torch-adamw" and t.optimizer.host_seconds > 0
    shard = sum(-(-n // 2) for n in [LLAMA_PARAMS])  # elements of this rank
    assert t.optimizer.seconds == pytest.approx(shard * 2 / TORCH_CPU_ADAMW_PARAMS_PER_S,
                                                rel=1e-3)
    assert c.bytes_of("host-to-device") > 0 and c.bytes_of("device-to-host") == 4 * (
        -(-LLAMA_PARAMS // 2))  # fp32 gradient shards


def test_a_slower_fabric_between_nodes_exposes_more():
    from layerscope.estimate.hardware import get_gpu

    model = build("llama", "meta")
    h100 = get_gpu("h100")
    fast = step(model, distributed="fsdp", num_gpus=16, gpu=h100)
    slow = step(model, distributed="fsdp", num_gpus=16, gpu=h100.with_fabric("ethernet-25g"))
    assert fast.communication.nodes == 2 and fast.communication.fabric == "infiniband-ndr"
    assert slow.communication.fabric == "ethernet-25g"
    assert slow.communication.exposed_seconds > fast.communication.exposed_seconds
    one_node = step(model, distributed="fsdp", num_gpus=8, gpu=h100.with_fabric("ethernet-25g"))
    assert one_node.communication.exposed_seconds == pytest.approx(
        step(model, distributed="fsdp", num_gpus=8).communication.exposed_seconds)
    with pytest.raises(EstimateError, match="unknown fabric"):
        h100.with_fabric("token-ring")
    # a Fabric of your own is used as given, even under a catalogue name
    import dataclasses

    from layerscope.estimate.hardware import get_fabric

    mine = dataclasses.replace(get_fabric("ethernet-25g"), name="my-net")
    custom = step(model, distributed="fsdp", num_gpus=16, gpu=h100.with_fabric(mine))
    assert custom.communication.fabric == "my-net"
    assert custom.communication.exposed_seconds == pytest.approx(slow.communication.exposed_seconds)
    renamed = dataclasses.replace(get_fabric("ethernet-25g"), name="infiniband-ndr")
    assert step(model, distributed="fsdp", num_gpus=16, gpu=h100.with_fabric(renamed)
                ).communication.exposed_seconds == pytest.approx(slow.communication.exposed_seconds)


def test_sharded_inference_gathers_in_forward_only():
    model = build("llama", "meta")
    t = step(model, inference=True, distributed="zero3", num_gpus=2)
    c = t.communication
    assert c.kinds == ("all-gather",) and c.bytes_of("all-gather") == 2 * LLAMA_PARAMS
    assert t.optimizer.seconds == 0.0


def _walk(model, precision, lora=None):
    """A Walk over the tiny model's step (nothing issued yet) and its Work."""
    from layerscope.estimate.hardware import get_gpu
    from layerscope.estimate.roofline import HOST_FORWARD_S_PER_KERNEL, Work
    from layerscope.estimate.structure import analyse
    from layerscope.estimate.walk import Walk
    from layerscope.setup import make_setup

    setup = make_setup(model, batch_size=B, seq_len=S, precision=precision, lora=lora)
    prec = setup.precision_info
    w = Work(get_gpu("h100-sxm"), prec, HOST_FORWARD_S_PER_KERNEL)
    shape = analyse(setup.model, training=True)
    walk = Walk(w, shape, prec, B, S, set(setup.trainable), setup.lora)
    return walk, w


def test_lora_backward_counts_each_op_once():
    # bf16 base, fp32 adapters: the output cast's backward (2 + 4 bytes per output element),
    # the add's cast of the base output's share (4 + 2), the scaling multiply (4 + 4), the
    # input cast's backward (4 + 2 per input element) and the sum with the base layer's input
    # gradient (3 x 2); the four skinny GEMMs are not stream kernels
    walk, w = _walk(build("llama", "meta"), "bf16-true", lora=8)
    q = walk.m.blocks[0].gemms[0]  # q_proj: 64 -> 64
    walk.lora_backward(q)
    streams = [k for k in w.items if k.flops == 0]
    assert sum(k.bytes for k in streams) == T * 64 * (6 + 6 + 8) + T * 64 * (6 + 6)
    assert sum(k.count for k in streams) == 5


def test_autocast_casts_of_tensors_that_require_grad_record_an_autograd_node():
    from layerscope.estimate.roofline import HOST_ATEN_S_PER_KERNEL, HOST_AUTOCAST_CAST_S

    model = build("llama", "meta")
    walk, w = _walk(model, "bf16-mixed")
    walk.autocast_casts(walk.m.blocks[0], False, lambda g: True, b=0)
    # every weight trains and the stream requires grad: every cast records a node
    assert all(k.host == pytest.approx(k.count * HOST_AUTOCAST_CAST_S) for k in w.items)
    frozen, w2 = _walk(model, "bf16-mixed")
    frozen.autocast_casts(frozen.m.blocks[0], False, lambda g: False, b=0)
    # frozen weights: their 7 casts (q, k, v, o, gate, up, down) are bare launches; the 5
    # casts of the stream input (q, k, v, gate, up read it) still record a node
    hosts = sorted(k.host for k in w2.items)
    assert hosts == pytest.approx([HOST_ATEN_S_PER_KERNEL] * 7 + [HOST_AUTOCAST_CAST_S] * 5)
