"""Tests of layerscope.estimate.memory on tiny models built from configs on the meta device."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from layerscope.errors import EstimateError, LayerscopeWarning, ModelTypeError
from layerscope.estimate.memory import (
    MemoryEstimate,
    estimate_memory,
    estimate_memory_savings,
    gpu_bytes,
    max_batch_size,
)

H, FF, L, V, HEADS, KV = 64, 128, 4, 256, 4, 2


def _round(nbytes: int) -> int:  # the CUDA caching allocator's 512-byte blocks
    return -(-nbytes // 512) * 512


def _build(model_type: str, **extra) -> torch.nn.Module:
    cfg = AutoConfig.for_model(model_type, **extra)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return _build("llama", hidden_size=H, intermediate_size=FF, num_hidden_layers=L,
                  num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=V,
                  max_position_embeddings=1024, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def gpt2() -> torch.nn.Module:
    return _build("gpt2", n_embd=H, n_layer=L, n_head=HEADS, vocab_size=V, n_positions=512)


@pytest.fixture(scope="module")
def mixtral() -> torch.nn.Module:
    return _build("mixtral", hidden_size=H, intermediate_size=FF, num_hidden_layers=L,
                  num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=V,
                  num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def qwen2() -> torch.nn.Module:  # q/k/v biases
    return _build("qwen2", hidden_size=H, intermediate_size=FF, num_hidden_layers=L,
                  num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=V)


def _llama_tensors() -> list[int]:
    """Element counts of every tensor of the tiny untied llama, by hand."""
    head_dim = H // HEADS
    block = [H * H, H * KV * head_dim, H * KV * head_dim, H * H, FF * H, FF * H, H * FF, H, H]
    return [V * H] + block * L + [H, V * H]


def _names(model, pred=lambda n: True) -> frozenset[str]:
    return frozenset(n for n, _ in model.named_parameters(remove_duplicate=False) if pred(n))


def estimate_memory_for(model, trainable, **settings):
    """``estimate_memory`` with exactly ``trainable`` training (a names plan freezes the rest)."""
    from layerscope import FreezePlan

    frozen = _names(model) - trainable
    return estimate_memory(model, FreezePlan.names(frozen) if frozen else FreezePlan.none(),
                           **settings)


def test_static_bytes_by_hand(llama):
    tensors = _llama_tensors()
    est = estimate_memory_for(llama, _names(llama), batch_size=2, seq_len=64,
                              precision="32-true", optimizer="adamw")
    assert est.total_params == sum(tensors)
    assert est.trainable_params == sum(tensors)
    buffers = sum(_round(b.numel() * b.element_size()) for b in llama.buffers())  # rotary inv_freq
    assert est.weights_bytes == sum(_round(4 * n) for n in tensors) + buffers
    assert est.gradient_bytes == sum(_round(4 * n) for n in tensors)
    assert est.optimizer_state_bytes == sum(2 * _round(4 * n) for n in tensors)  # exp_avg, exp_avg_sq
    # foreach AdamW: one sqrt(exp_avg_sq) copy of every tensor
    assert est.optimizer_temporary_bytes == sum(_round(4 * n) for n in tensors)
    bf16 = estimate_memory_for(llama, _names(llama), batch_size=2, seq_len=64, precision="bf16")
    assert bf16.weights_bytes == sum(_round(2 * n) for n in tensors) + buffers
    sgd = estimate_memory_for(llama, _names(llama), batch_size=2, seq_len=64, optimizer="sgd-momentum")
    assert sgd.optimizer_state_bytes == sum(_round(4 * n) for n in tensors)  # bf16-mixed: fp32 params
    assert sgd.optimizer_temporary_bytes == 0


def test_weights_include_buffers(llama):
    est = estimate_memory_for(llama, _names(llama), batch_size=1, seq_len=16, precision="32-true")
    buffers = sum(_round(b.numel() * b.element_size()) for b in llama.buffers())
    assert est.weights_bytes == sum(_round(4 * n) for n in _llama_tensors()) + buffers


def test_frozen_parameters_have_no_gradients_or_state(llama):
    only_norms = _names(llama, lambda n: "norm" in n)
    est = estimate_memory_for(llama, only_norms, batch_size=1, seq_len=32, precision="32-true")
    assert est.trainable_params == (2 * L + 1) * H
    assert est.gradient_bytes == (2 * L + 1) * _round(4 * H)
    assert est.optimizer_state_bytes == 2 * (2 * L + 1) * _round(4 * H)


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral", "qwen2"])
def test_activations_grow_with_batch_and_sequence(name, request):
    model = request.getfixturevalue(name)
    a, b, c = (estimate_memory(model, batch_size=bs, seq_len=s) for bs, s in ((1, 64), (2, 64), (2, 128)))
    assert 0 < a.activation_bytes < b.activation_bytes < c.activation_bytes
    assert a.peak_bytes <= b.peak_bytes <= c.peak_bytes
    assert len(a.activation_bytes_per_block) == L


def test_freezing_first_blocks_saves_activations_last_blocks_barely(llama):
    def blocks(lo, hi):
        return lambda n: not any(f"layers.{i}." in n for i in range(lo, hi)) and "embed" not in n

    settings = dict(batch_size=4, seq_len=128, precision="bf16-mixed")
    full = estimate_memory_for(llama, _names(llama), **settings)
    first = estimate_memory_for(llama, _names(llama, blocks(0, L // 2)), **settings)
    last = estimate_memory_for(llama, _names(llama, lambda n: not any(
        f"layers.{i}." in n for i in range(L // 2, L)) and "embed" not in n), **settings)
    saved_first = full.activation_bytes - first.activation_bytes
    saved_last = full.activation_bytes - last.activation_bytes
    # frozen first blocks save nothing at all; frozen last blocks still save what input
    # gradients need (norms, attention, activations), only their Linear inputs go
    assert saved_first > 0.4 * full.activation_bytes
    assert 0 < saved_last < 0.5 * saved_first
    # blocks before the first trainable one save nothing
    assert first.activation_bytes_per_block[0] < 0.2 * full.activation_bytes_per_block[0]


def test_inference_below_training(gpt2):
    train = estimate_memory(gpt2, batch_size=2, seq_len=128)
    infer = estimate_memory(gpt2, batch_size=2, seq_len=128, inference=True)
    assert infer.peak_bytes < train.peak_bytes
    assert infer.gradient_bytes == infer.optimizer_state_bytes == 0
    assert infer.peak_phase == "forward"


def test_checkpointing_saves_activations(llama):
    plain = estimate_memory(llama, batch_size=8, seq_len=256, precision="bf16")
    ckpt = estimate_memory(llama, batch_size=8, seq_len=256, precision="bf16", gradient_checkpointing=True)
    assert ckpt.activation_bytes < 0.5 * plain.activation_bytes
    assert ckpt.peak_bytes < plain.peak_bytes


def test_fused_adamw_has_fewer_temporaries(mixtral):
    foreach = estimate_memory(mixtral, batch_size=1, seq_len=16, optimizer="adamw")
    fused = estimate_memory(mixtral, batch_size=1, seq_len=16, optimizer="adamw-fused")
    assert fused.optimizer_temporary_bytes < foreach.optimizer_temporary_bytes
    assert fused.peak_bytes <= foreach.peak_bytes


def test_transformers_adamw_keeps_two_moments_and_two_consecutive_denominators():
    from layerscope.estimate.optimizers import OPTIMIZERS

    # fp32 tensors of 1,000, 300,000, 200,000 and 50,000 elements: exp_avg and exp_avg_sq
    # each (4 bytes an element, rounded to 512-byte blocks); the denominators alive together
    # are the largest consecutive pair, 300,000 + 200,000 elements
    tensors = [(1000, 4, (1000,)), (300_000, 4, (300, 1000)), (200_000, 4, (200, 1000)),
               (50_000, 4, (50, 1000))]
    hf = OPTIMIZERS["adamw-hf"](tensors)
    sizes = [_round(4000), _round(1_200_000), _round(800_000), _round(200_000)]
    assert sizes[1] == 1_200_128  # 2,344 blocks of 512 bytes, the last one part-filled
    assert hf.state == 2 * sum(sizes)
    assert hf.temporary_blocks == (sizes[1], sizes[2])
    # torch's foreach AdamW keeps the same state but one sqrt of every second moment at once
    assert OPTIMIZERS["adamw"](tensors).state == hf.state
    assert OPTIMIZERS["adamw"](tensors).temporary == sum(sizes)
    assert OPTIMIZERS["adamw-hf"](tensors[:1]).temporary_blocks == (_round(4000),)


def test_every_optimizer_runs(gpt2):
    states = {opt: estimate_memory(gpt2, batch_size=1, seq_len=16, optimizer=opt).optimizer_state_bytes
              for opt in ["adamw", "adamw-fused", "adam", "sgd", "sgd-momentum", "adamw-8bit", "adafactor",
                          "adamw-hf"]}
    assert states["sgd"] == 0
    assert states["adamw-8bit"] < states["adamw"] / 3
    assert states["adafactor"] < states["sgd-momentum"] < states["adamw"] == states["adamw-hf"]


def test_lora_adds_fp32_adapters_and_freezes_base(llama):
    from peft import LoraConfig

    r = 4
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    est = estimate_memory(llama, batch_size=2, seq_len=32, precision="bf16", lora=lora)
    kv = KV * (H // HEADS)
    per_block = r * (H + H) + r * (H + kv)  # q: A r x H, B H x r; v: A r x H, B kv x r
    assert est.trainable_params == L * per_block
    assert est.gradient_bytes == sum(_round(4 * n) for n in [r * H, H * r, r * H, kv * r] * L)
    assert est.total_params == sum(_llama_tensors()) + L * per_block


def test_modules_to_save_train_a_copy_in_the_bases_dtype(llama):
    from peft import LoraConfig

    # peft wraps lm_head in a ModulesToSaveWrapper: a deep copy (V x H) trains, the original
    # stays frozen; peft's cast_adapter_dtype upcasts tuner layers only, so the copy keeps the
    # base's bf16: 2 bytes a weight, a gradient, and each of AdamW's two states
    kw = dict(batch_size=1, seq_len=16, precision="bf16-mixed", base_dtype="bf16")
    plain = estimate_memory(llama, lora=LoraConfig(r=4, target_modules=["q_proj"]), **kw)
    saved = estimate_memory(llama, lora=LoraConfig(r=4, target_modules=["q_proj"],
                                                   modules_to_save=["lm_head"]), **kw)
    copy = _round(2 * V * H)
    assert saved.trainable_params - plain.trainable_params == V * H
    assert saved.total_params - plain.total_params == V * H
    assert saved.weights_bytes - plain.weights_bytes == copy
    assert saved.gradient_bytes - plain.gradient_bytes == copy
    assert saved.optimizer_state_bytes - plain.optimizer_state_bytes == 2 * copy
    # an fp32 base: the copy is fp32
    fp32 = {**kw, "base_dtype": None}
    plain32 = estimate_memory(llama, lora=LoraConfig(r=4, target_modules=["q_proj"]), **fp32)
    saved32 = estimate_memory(llama, lora=LoraConfig(r=4, target_modules=["q_proj"],
                                                     modules_to_save=["lm_head"]), **fp32)
    assert saved32.gradient_bytes - plain32.gradient_bytes == _round(4 * V * H)
    # DDP keeps a full replica: the same bf16 copy on each rank, not the adapters' fp32
    ddp = {**kw, "distributed": "ddp", "num_gpus": 2}
    plain_ddp = estimate_memory(llama, lora=LoraConfig(r=4, target_modules=["q_proj"]), **ddp)
    saved_ddp = estimate_memory(llama, lora=LoraConfig(r=4, target_modules=["q_proj"],
                                                       modules_to_save=["lm_head"]), **ddp)
    assert saved_ddp.weights_bytes - plain_ddp.weights_bytes == copy
    assert saved_ddp.gradient_bytes - plain_ddp.gradient_bytes == copy
    assert saved_ddp.optimizer_state_bytes - plain_ddp.optimizer_state_bytes == 2 * copy


def test_a_names_plan(llama):
    from layerscope import FreezePlan

    names = [n for n, _ in llama.named_parameters() if "layers.0." in n]
    est = estimate_memory(llama, FreezePlan.names(names), batch_size=1, seq_len=16)
    frozen = sum(_llama_tensors()[1:10])
    assert est.trainable_params == sum(_llama_tensors()) - frozen


def test_caller_model_untouched(llama):
    for i, (_, p) in enumerate(llama.named_parameters()):
        p.requires_grad_(i % 3 != 0)
    named = llama.named_parameters
    before = [(n, id(p), p.requires_grad, p.dtype, p.device) for n, p in named(remove_duplicate=False)]
    modules = [(n, id(m), m.training) for n, m in llama.named_modules()]
    estimate_memory(llama, batch_size=2, seq_len=32, gradient_checkpointing=True, precision="bf16")
    after = [(n, id(p), p.requires_grad, p.dtype, p.device) for n, p in named(remove_duplicate=False)]
    assert after == before
    assert [(n, id(m), m.training) for n, m in llama.named_modules()] == modules
    assert not getattr(llama.model, "gradient_checkpointing", False)
    for _, p in llama.named_parameters():
        p.requires_grad_(True)


def test_savings_and_fits(llama):
    frozen_half = _names(llama, lambda n: not any(f"layers.{i}." in n for i in range(L // 2)))
    assert frozen_half  # sanity
    savings = estimate_memory_savings(llama, None, batch_size=2, seq_len=32)
    assert savings.saved_bytes == 0 and savings.saved_fraction == 0
    est = savings.planned
    assert est.fits(10 * 2**30)
    assert not est.fits(est.peak_bytes)  # the allocator's cache and the CUDA context on top
    assert est.fits(est.required_bytes())
    assert est.required_bytes(context_bytes=0) == est.reserved_bytes >= est.peak_bytes
    assert gpu_bytes("H100 80GB") == 81559 * 2**20
    assert gpu_bytes("h100 80gb") == gpu_bytes("H100 80GB")


def test_max_batch_size(gpt2):
    gpu = 200 * 2**20
    settings = dict(seq_len=128, precision="bf16", context_bytes=0)
    best = max_batch_size(gpt2, gpu, **settings)
    assert best >= 1
    at = estimate_memory(gpt2, batch_size=best, seq_len=128, precision="bf16")
    above = estimate_memory(gpt2, batch_size=best + 1, seq_len=128, precision="bf16")
    assert at.reserved_bytes <= gpu < above.reserved_bytes
    assert max_batch_size(gpt2, 2**20, seq_len=128) == 0


def test_flops_recorded_for_time_estimates(llama):
    b, s = 2, 64
    est = estimate_memory(llama, batch_size=b, seq_len=s, precision="32-true")
    matmul_params = sum(_llama_tensors()[1:8]) * L + V * H  # every Linear weight incl. the head
    assert est.forward_flops >= 2 * b * s * matmul_params
    assert est.backward_flops >= 2 * est.forward_flops * 0.9


def test_result_is_immutable(gpt2):
    est = estimate_memory(gpt2, batch_size=1, seq_len=16)
    assert isinstance(est, MemoryEstimate)
    with pytest.raises(AttributeError):
        est.peak_bytes = 0  # type: ignore[misc]
    assert est.peak_bytes == max(est.forward_peak_bytes, est.backward_peak_bytes, est.optimizer_peak_bytes)


def test_precision_aliases(gpt2):
    a = estimate_memory(gpt2, batch_size=1, seq_len=16, precision="bf16")
    b = estimate_memory(gpt2, batch_size=1, seq_len=16, precision="bf16-true")
    assert a.peak_bytes == b.peak_bytes and a.precision == "bf16-true"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"precision": "bf32"}, r"bf32.*bf16-mixed"),
        ({"optimizer": "lion"}, r"lion.*adamw"),
        ({"batch_size": 0}, r"batch_size.*0"),
        ({"batch_size": -2}, r"batch_size.*-2"),
        ({"batch_size": True}, r"batch_size"),
        ({"batch_size": 1.5}, r"batch_size"),
        ({"seq_len": 0}, r"seq_len.*0"),
        ({"gradient_checkpointing": "yes"}, r"bool"),
    ],
)
def test_bad_settings(gpt2, kwargs, match):
    with pytest.raises(EstimateError, match=match):
        estimate_memory(gpt2, **kwargs)


def test_bad_inputs(gpt2):
    from peft import LoraConfig

    from layerscope import FreezePlan, PlanError

    with pytest.raises(EstimateError, match="nothing_here"):
        estimate_memory(gpt2, seq_len=16, lora=LoraConfig(r=4, target_modules=["nothing_here"]))
    with pytest.raises(EstimateError, match="FreezePlan"):
        estimate_memory(gpt2, plan=object(), seq_len=16)
    with pytest.raises(ModelTypeError):
        estimate_memory(42)
    with pytest.raises(PlanError, match="not in this model"):
        estimate_memory(gpt2, FreezePlan.names(["no.such.weight"]), seq_len=16)
    with pytest.raises(EstimateError, match="unknown GPU"):
        gpu_bytes("Voodoo 2")
    with pytest.raises(EstimateError, match="> 0"):
        gpu_bytes(0)
    with pytest.raises(EstimateError):
        estimate_memory(gpt2, batch_size=1, seq_len=16).fits(2**30, context_bytes=-1)


def test_long_sequence_warns(gpt2):
    with pytest.warns(LayerscopeWarning, match="max_position_embeddings=512"):
        estimate_memory(gpt2, batch_size=1, seq_len=600)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayerscopeWarning)
        estimate_memory(gpt2, batch_size=1, seq_len=512)


def test_nothing_trainable_is_an_error_not_a_crash(llama):
    from layerscope import FreezePlan

    model = llama
    with pytest.raises(EstimateError, match="nothing is trainable.*inference=True"):
        estimate_memory(model, FreezePlan.all(), batch_size=1, seq_len=16)
    assert estimate_memory(model, FreezePlan.all(), batch_size=1, seq_len=16, inference=True).peak_bytes > 0
