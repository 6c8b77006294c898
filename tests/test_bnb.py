"""The emulated bitsandbytes layers (estimate/bnb.py) on hand-checkable steps, and a quantized
base in whole estimates: every byte worked out here."""

from __future__ import annotations

import pytest
import torch
from conftest import build, layer_step

from layerscope import estimate_memory
from layerscope.errors import EstimateError
from layerscope.estimate.bnb import Linear4bit, Linear8bitLt
from layerscope.plan import FreezePlan
from layerscope.quantization import Quantization
from layerscope.setup import TrainingSetup

TOKENS, N_IN, N_OUT = 64, 128, 256


def _step(layer, x_dtype=torch.bfloat16, autocast=None):
    """:func:`conftest.layer_step` on a 64 x 128 input into 256 outputs."""
    return layer_step(layer, TOKENS, N_IN, N_OUT, x_dtype, autocast)


def _linear4bit(q, compute=torch.bfloat16, loaded=torch.bfloat16):
    return Linear4bit(N_IN, N_OUT, None, q, compute, loaded)


def test_4bit_forward_dequantises_one_weight_and_saves_nothing():
    fwd, bwd, x = _step(_linear4bit(Quantization("nf4")))
    weight, out, grad_in = N_OUT * N_IN * 2, TOKENS * N_OUT * 2, TOKENS * N_IN * 2
    # forward: the bf16 weight (65,536 bytes) lives only during F.linear; the output stays
    assert (fwd.net, fwd.high) == (out, weight + out)
    # backward: the weight dequantised again, then the input gradient (kept as x.grad)
    assert (bwd.net, bwd.high) == (grad_in, weight + grad_in)
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert fwd.flops == bwd.flops == 2 * TOKENS * N_OUT * N_IN


def test_4bit_double_quant_adds_two_fp32_absmax_copies_in_forward_one_in_backward():
    fwd, bwd, _ = _step(_linear4bit(Quantization("nf4", double_quant=True)))
    absmax = N_OUT * N_IN // 64 * 4  # 512 blocks, fp32: 2,048 bytes
    weight, out, grad_in = 65_536, 32_768, 16_384
    assert fwd.high == 2 * absmax + weight + out and fwd.net == out
    # backward: absmax (with the offset added in place) and weight, then absmax is freed
    # before the matmul writes the input gradient
    assert bwd.high == max(absmax + weight, weight + grad_in) and bwd.net == grad_in


def test_4bit_fp32_compute_under_bf16_autocast_casts_inside_the_matmul():
    # bnb_4bit_compute_dtype=fp32 (a BitsAndBytesConfig without one): the input is cast to fp32,
    # the weight dequantised in fp32, and F.linear under autocast casts both to bf16 again
    layer = _linear4bit(Quantization("nf4", compute_dtype=torch.float32), compute=torch.float32)
    fwd, bwd, _ = _step(layer, autocast=torch.bfloat16)
    x32, w32, x16, w16, out16 = 64 * 128 * 4, 256 * 128 * 4, 64 * 128 * 2, 256 * 128 * 2, 64 * 256 * 2
    assert fwd.high == x32 + w32 + x16 + w16 + out16
    # the output is bf16 (autocast), cast back to the input's bf16 (no copy)
    assert fwd.net == out16
    # backward outside autocast: the weight dequantised in its loaded bf16 matches the bf16
    # gradient; then autograd casts the bf16 input gradient to the fp32 of the matmul's input,
    # and the cast's backward back to bf16 for x: the weight is gone by then
    assert bwd.high == w16 + x16
    assert bwd.allocated == w16 + x16 + x32 + x16


def test_int8_keeps_the_input_and_dequantises_in_backward():
    fwd, bwd, _ = _step(Linear8bitLt(N_IN, N_OUT, None, Quantization("int8"), torch.bfloat16))
    x16, rows, q8 = TOKENS * N_IN * 2, 512, TOKENS * N_IN  # fp16 input, fp32 row scales, int8 input
    abs16, mask = TOKENS * N_IN * 2, TOKENS * N_IN  # |x| and the outlier mask (threshold 6.0)
    i32, out16, out = TOKENS * N_OUT * 4, TOKENS * N_OUT * 2, TOKENS * N_OUT * 2
    quantising = x16 + rows + q8 + abs16 + mask  # 49,664
    multiplying = rows + q8 + i32 + out16 + out  # 139,776: the fp16 copy is gone by then
    assert fwd.high == max(quantising, multiplying) == 139_776
    # kept: the output (cast to bf16); the outlier columns are empty (no allocation), and the
    # input, kept for backward, existed before
    assert fwd.net == out
    # backward: the int8 weight dequantised to the input's bf16, its scales (256 fp32, one
    # 1,024-byte block) divided by 127 meanwhile, then the input gradient
    weight = N_OUT * N_IN * 2
    assert bwd.high == max(weight + 1024, weight + TOKENS * N_IN * 2) == 81_920
    assert bwd.net == TOKENS * N_IN * 2


def test_a_quantized_base_in_a_whole_estimate():
    """Tiny Llama (4 layers, hidden 64, MLP 128, 2 of 4 heads for k/v), QLoRA rank 8."""
    model = build("llama", "meta")
    qlora = estimate_memory(model, lora=8, quantization="nf4", batch_size=2, seq_len=32)
    # per layer: q, o 64x64; k, v 32x64; gate, up 128x64; down 64x128, each packed to n / 2
    # bytes, fp32 absmax n / 16 bytes and a 64-byte table, each tensor rounded to 512 bytes
    per_layer = 2 * (2048 + 512 + 512) + 2 * (1024 + 512 + 512) + 3 * (4096 + 512 + 512)
    assert qlora.quantized_base_bytes == 4 * per_layer == 102_400
    # the rest, upcast to fp32 by prepare_model_for_kbit_training: embedding and head 100 x 64,
    # 9 norms of 64 (512 bytes each), two rotary buffers of 8 fp32; fp32 adapters of rank 8
    # (A: rank x in, B: out x rank, fp32): q, o 2048 + 2048; k, v 2048 + 1024; gate, up
    # 2048 + 4096; down 4096 + 2048 bytes, per layer
    adapters = 4 * (2 * (2048 + 2048) + 2 * (2048 + 1024) + 2 * (2048 + 4096) + 4096 + 2048)
    assert adapters == 131_072
    assert qlora.weights_bytes == 102_400 + 2 * 25_600 + 9 * 512 + 2 * 512 + adapters
    assert qlora.quantization == "nf4" and qlora.trainable_params == 131_072 // 4
    plain = estimate_memory(model, lora=8, batch_size=2, seq_len=32)
    assert plain.quantized_base_bytes == 0 and plain.weights_bytes > qlora.weights_bytes
    # no prepare: the base stays in the config's dtype (fp32 for this config)
    raw = estimate_memory(model, lora=8, quantization="nf4", prepare_kbit=False, batch_size=2,
                          seq_len=32)
    assert raw.weights_bytes == qlora.weights_bytes


def test_bf16_base_and_adapters():
    model = build("llama", "meta")
    lora32 = estimate_memory(model, lora=8, base_dtype="bf16", batch_size=2, seq_len=32)
    lora16 = estimate_memory(model, lora=8, base_dtype="bf16", lora_dtype="bf16", batch_size=2,
                             seq_len=32)
    # every frozen matrix and norm in bf16; adapters (131,072 bytes in fp32) halve in bf16
    assert lora32.weights_bytes - lora16.weights_bytes == 131_072 // 2
    # adapter gradients and AdamW moments follow the adapters' dtype
    assert lora32.gradient_bytes == 2 * lora16.gradient_bytes
    fp32_base = estimate_memory(model, lora=8, batch_size=2, seq_len=32)
    frozen32 = 4 * 36_864 * 4 + 2 * 25_600 + 9 * 512
    frozen16 = 4 * 36_864 * 2 + 2 * 12_800 + 9 * 512
    assert fp32_base.weights_bytes - lora32.weights_bytes == frozen32 - frozen16


def test_bad_quantized_setups_change_nothing():
    model = build("llama", "meta")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(EstimateError, match="unknown quantization 'nf3'"):
        estimate_memory(model, lora=8, quantization="nf3")
    with pytest.raises(EstimateError, match=r"trains quantized weights .* cannot receive gradients"):
        estimate_memory(model, FreezePlan.parse("last:2"), quantization="nf4")
    with pytest.raises(EstimateError, match=r"lora_dtype must be a floating dtype .* got 'int8'"):
        estimate_memory(model, lora=8, lora_dtype="int8")
    with pytest.raises(EstimateError, match="lora_dtype must be a floating dtype"):
        estimate_memory(model, lora=8, lora_dtype=torch.int8)
    from transformers import BitsAndBytesConfig

    with pytest.raises(EstimateError, match="bnb_4bit_quant_type must be 'nf4' or 'fp4'"):
        estimate_memory(model, lora=8, quantization=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="int4"))
    # what FSDP and ZeRO-3 cannot shard is refused, saying why
    with pytest.raises(EstimateError, match=r"quantization='int8' with distributed='fsdp'.*float"):
        estimate_memory(model, lora=8, quantization="int8", distributed="fsdp", num_gpus=2)
    with pytest.raises(EstimateError, match=r"bnb_4bit_quant_storage=uint8 with distributed="
                       r"'zero3' and a float32 base.*set bnb_4bit_quant_storage=float32"):
        estimate_memory(model, lora=8, distributed="zero3", num_gpus=2, quantization=
                        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    with pytest.raises(EstimateError, match=r"prepare_kbit=True with distributed='fsdp'"):
        estimate_memory(model, lora=8, quantization="nf4", prepare_kbit=True, distributed="fsdp",
                        num_gpus=2)
    with pytest.raises(EstimateError, match="llm_int8_skip_modules must be a list"):
        Quantization("int8", skip_modules="lm_head")
    assert Quantization("int8", skip_modules=["lm_head"]).skip_modules == ("lm_head",)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    # inference on a quantized base, with that same plan, is fine
    e = estimate_memory(model, FreezePlan.parse("last:2"), quantization="nf4", inference=True,
                        seq_len=32)
    assert e.backward_peak_bytes == 0 and e.quantized_base_bytes == 102_400


def test_setup_defaults_for_a_quantized_base():
    model = build("llama", "meta")
    s = TrainingSetup(model, lora=8, quantization="nf4", seq_len=32)
    assert s.kbit_prepared and s.frozen_dtype == torch.float32
    assert s.compute_dtype == torch.bfloat16  # bf16-mixed: the autocast dtype
    assert s.adapter_dtype == torch.float32
    assert TrainingSetup(model, lora=8, quantization="nf4", precision="32-true",
                         seq_len=32).compute_dtype == torch.float32
    # the model's flags with a quantized base: everything but the quantized weights trains
    q = TrainingSetup(model, quantization="nf4", seq_len=32)
    assert not any(n.endswith("proj.weight") for n in q.trainable)
    assert "lm_head.weight" in q.trainable


def test_bitsandbytes_optimizer_states_written_out():
    from layerscope.estimate.optimizers import OPTIMIZERS

    # three tensors: 1,000 elements (under min_8bit_size 4096: fp32 moments), 65,536 (LoRA A of
    # rank 16 x 4096: 8-bit, under the 1e5 paging threshold), 262,144 (rank 64: paged)
    tensors = [(1_000, 4, (1_000,)), (65_536, 4, (16, 4096)), (262_144, 4, (64, 4096))]
    small = 2 * 4096  # two fp32 moments of 4,000 bytes, one 4,096-byte block each
    absmax = [2 * 1024, 2 * 4096]  # one fp32 per 256 elements: 256 and 1,024 values
    qmaps = 2 * 1024  # the optimizer's two 256-entry fp32 maps, once

    eight = OPTIMIZERS["adamw-8bit"](tensors)
    assert eight.state == small + 2 * 65_536 + 2 * 262_144 + sum(absmax) + qmaps
    assert eight.paged == 0 and eight.temporary == 0
    paged8 = OPTIMIZERS["paged-adamw-8bit"](tensors)
    # the 262,144-element tensor's two uint8 moments live in managed memory, outside the
    # CUDA allocator; its absmax does not
    assert paged8.paged == 2 * 262_144
    assert paged8.state == eight.state - 2 * 262_144
    paged32 = OPTIMIZERS["paged-adamw-32bit"](tensors)
    assert paged32.paged == 2 * 4 * 262_144
    assert paged32.state == small + 2 * 4 * 65_536  # fp32 moments, no absmax, no maps


def test_paged_state_is_reported_but_not_in_the_peak():
    model = build("llama", "meta")
    kw = dict(lora=8, quantization="nf4", batch_size=2, seq_len=32)
    plain = estimate_memory(model, optimizer="adamw-8bit", **kw)
    paged = estimate_memory(model, optimizer="paged-adamw-8bit", **kw)
    # tiny adapters (at most 1,024 elements) are all under the paging threshold: identical
    assert paged.paged_optimizer_bytes == 0 and paged.peak_bytes == plain.peak_bytes
    # a vocabulary of 2,000: embedding and head of 2,000 x 64 = 128,000 elements each, paged
    from conftest import LLAMA
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        big = AutoModelForCausalLM.from_config(LlamaConfig(**{**LLAMA, "vocab_size": 2000}))
    full = dict(batch_size=2, seq_len=32)
    e = estimate_memory(big, optimizer="paged-adamw-32bit", **full)
    fused = estimate_memory(big, optimizer="adamw-fused", **full)  # fp32 moments, no temporaries
    assert e.paged_optimizer_bytes == 2 * (2 * 4 * 128_000)
    # the same fp32 moments, less the paged ones (fused AdamW also keeps a 512-byte step each)
    tensors = len(list(big.parameters()))
    assert e.optimizer_state_bytes == fused.optimizer_state_bytes - 4 * 512_000 - 512 * tensors
    assert e.peak_bytes < fused.peak_bytes


def test_dequantisation_in_the_step_time():
    """Tiny Llama, LoRA rank 8 on every block Linear, bf16 base, no prepare: the nf4 step
    differs from the bf16-base step by the dequantisation traffic and peft's clone alone."""
    from layerscope import estimate_step_time
    from layerscope.estimate.quant import dequant_bytes

    model = build("llama", "meta")
    kw = dict(lora=8, base_dtype="bf16", batch_size=2, seq_len=32, prepare_kbit=False)
    bf16 = estimate_step_time(model, **kw)
    nf4 = estimate_step_time(model, quantization="nf4", **kw)
    # each layer: q, o 64 x 64; k, v 32 x 64; gate, up 128 x 64; down 64 x 128. Dequantising
    # reads n / 2 packed bytes and n / 16 bytes of fp32 absmax, writes 2n bytes of bf16
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    per_layer = sum(o * i // 2 + o * i // 16 + 2 * o * i for o, i in shapes)
    assert per_layer == sum(dequant_bytes(Quantization("nf4"), o, i, torch.bfloat16)[0]
                            for o, i in shapes)
    clone = sum(64 * o * 2 * 2 for o, _ in shapes)  # 64 tokens x out, bf16, read and written
    assert nf4.forward.bytes - bf16.forward.bytes == pytest.approx(4 * (per_layer + clone))
    assert nf4.forward.kernels - bf16.forward.kernels == 4 * 2 * 7
    # backward: each input gradient dequantises again (to the loaded bf16, the gradient's dtype)
    assert nf4.backward.bytes - bf16.backward.bytes == pytest.approx(4 * per_layer)
    assert nf4.seconds > bf16.seconds


def test_dequantisation_is_recomputed_under_checkpointing():
    """With checkpointing each block's forward runs again in backward: every quantized weight
    is dequantised a third time (all seven carry adapters, so no recomputation stops early)."""
    from layerscope import estimate_step_time
    from layerscope.estimate.quant import dequant_bytes

    model = build("llama", "meta")
    kw = dict(lora=8, base_dtype="bf16", batch_size=2, seq_len=32, prepare_kbit=False,
              gradient_checkpointing=True)
    bf16 = estimate_step_time(model, **kw)
    nf4 = estimate_step_time(model, quantization="nf4", **kw)
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    per_layer = sum(dequant_bytes(Quantization("nf4"), o, i, torch.bfloat16)[0] for o, i in shapes)
    clone = sum(64 * o * 2 * 2 for o, _ in shapes)
    assert nf4.recompute.bytes - bf16.recompute.bytes == pytest.approx(4 * (per_layer + clone))
    assert nf4.forward.bytes - bf16.forward.bytes == pytest.approx(4 * (per_layer + clone))
    assert nf4.backward.bytes - bf16.backward.bytes == pytest.approx(4 * per_layer)


def _normalised(ops):
    """Allocation ops with handles renumbered in order of first use (a build's shape)."""
    names: dict[int, int] = {}
    return [(names.setdefault(h, len(names)), size) for h, size in ops]


def test_the_allocator_build_loads_the_base_as_the_setup_does():
    """The caching-allocator simulation's build follows the setup's dtypes and quantization."""
    from layerscope.estimate.allocator import model_build_ops
    from layerscope.estimate.memory import _step_of, memory_of

    model = build("llama", "meta")

    def adapters(setup, made):
        return [(-(-n * made // 512) * 512, -(-n * b // 512) * 512)
                for n, b, _ in _step_of(setup).trainable_tensors]

    # an unquantized base builds as main's model_build_ops: every parameter in the
    # precision's dtype, adapters made in it and re-made in fp32
    plain = TrainingSetup(model, lora=8, batch_size=2, seq_len=32)
    assert _normalised(_step_of(plain).build) == _normalised(
        model_build_ops(model, 4, adapters(plain, 4)))
    # a bf16 base: the same with 2 bytes per base element (adapters made in bf16)
    bf16 = plain.replace(base_dtype="bf16")
    assert _normalised(_step_of(bf16).build) == _normalised(
        model_build_ops(model, 2, adapters(bf16, 2)))

    # QLoRA over a base loaded in bf16: 28 quantized weights, each loaded in bf16 then
    # dropped; prepare_model_for_kbit_training re-makes the embedding, 9 norms and the head
    # in fp32 (11 frees); fp32 adapters made in fp32 (peft keeps a non-floating base's dtype)
    qlora = plain.replace(quantization="nf4", base_dtype="bf16")
    ops = _step_of(qlora).build
    assert sum(1 for _, size in ops if size == 0) == 28 + 11
    assert sum(1 for _, size in ops if size == 2 * 64 * 128) == 3 * 4  # gate, up, down in bf16
    live: dict[int, int] = {}
    for h, size in ops:
        if size:
            live[h] = size
        else:
            del live[h]
    assert sum(live.values()) == memory_of(qlora).weights_bytes
