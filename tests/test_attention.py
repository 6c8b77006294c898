"""Each attention implementation's kernels, checked against hand arithmetic."""

import pytest
from conftest import build

from layerscope.errors import EstimateError
from layerscope.estimate import attention as attn
from layerscope.estimate.hardware import get_gpu
from layerscope.estimate.roofline import Work
from layerscope.estimate.time import estimate_step_time
from layerscope.setup import resolve_precision

BF16, FP32 = resolve_precision("bf16-true"), resolve_precision("32-true")
H = attn.Heads(heads=4, kv_heads=2, head_dim=16)  # q width 64, kv width 32
B, S = 2, 16


def flops(impl, prec=BF16, window=None, backward=False, padded=False, heads=H):
    w = Work(get_gpu("h100"), prec, 0.0)
    attn.attention(w, impl, prec, heads, B, S, window, backward, training=True, padded=padded)
    return sum(k.flops for k in w.items), w


def test_keys_per_query():
    assert attn.keys_per_query(4, None) == (1 + 2 + 3 + 4) / 4
    assert attn.keys_per_query(4, 2) == (1 + 2 + 2 + 2) / 4  # within a window of 2
    assert attn.keys_per_query(4, 8) == 2.5  # a window longer than the sequence
    assert attn.keys_per_query(4, None, causal=False) == 4


def test_sdpa_picks_the_kernel_cuda_would():
    assert attn.sdpa_kernel(BF16, H, masked=False) == "flash"
    assert attn.sdpa_kernel(BF16, H, masked=True) == "efficient"
    mha = attn.Heads(4, 4, 16)
    assert attn.sdpa_kernel(FP32, mha, masked=False) == "efficient"  # no fp32 flash kernel
    # grouped-query heads without a mask go in as such (enable_gqa): the efficient kernel
    # refuses them, the math fallback runs; with a mask transformers repeats K/V first
    assert attn.sdpa_kernel(FP32, H, masked=False) == "math"
    assert attn.sdpa_kernel(FP32, H, masked=True) == "efficient"
    odd = attn.Heads(4, 4, 20)  # head dim 20: not a multiple of 8
    assert attn.sdpa_kernel(BF16, odd, masked=True) == "math"
    # transformers masks (no is_causal) for padding, or a window no longer than the sequence
    assert attn.needs_mask("sdpa", S, 4, False) and attn.needs_mask("sdpa", S, None, True)
    assert not attn.needs_mask("sdpa", S, 32, False)
    assert not attn.needs_mask("flash_attention_2", S, 4, True)


def test_flops_of_each_implementation():
    causal = 4 * B * S * ((S + 1) / 2) * 64  # QK^T and PV over (S + 1) / 2 keys per query
    assert flops("sdpa")[0] == causal
    assert flops("flash_attention_2")[0] == causal
    assert flops("flex_attention")[0] == causal
    assert flops("sdpa", backward=True)[0] == 2.5 * causal  # five matmuls against two
    # eager: two batched GEMMs over every (batch, head), all S x S scores
    assert flops("eager")[0] == 2 * (2 * S * S * 16) * B * 4
    assert flops("eager", backward=True)[0] == 4 * (2 * S * S * 16) * B * 4
    # a window of 4: flash attention skips the blocks outside it; SDPA gets a mask and
    # computes every score with the memory-efficient kernel
    windowed = 4 * B * S * ((4 * 5 / 2 + (S - 4) * 4) / S) * 64
    assert flops("flash_attention_2", window=4)[0] == windowed
    assert flops("sdpa", window=4)[0] == 4 * B * S * S * 64
    # padding: SDPA's memory-efficient kernel over every score; grouped-query K/V repeated
    padded, w = flops("sdpa", padded=True)
    assert padded == 4 * B * S * S * 64
    repeat = [k for k in w.items if k.bytes == B * S * 2 * (64 + 32) * 2]
    assert len(repeat) == 1  # repeat_kv copies, as transformers does when it passes a mask


def test_slower_kernels_take_longer():
    def seconds(impl, prec=BF16, padded=False):
        w = Work(get_gpu("h100"), prec, 0.0)
        heads = attn.Heads(32, 8, 128)
        attn.attention(w, impl, prec, heads, 1, 4096, None, False, True, padded)
        return sum(k.device for k in w.items)

    flash = seconds("sdpa")
    assert seconds("flash_attention_2") < flash  # no transposed copy of the output
    assert flash < seconds("flex_attention") < seconds("sdpa", padded=True) < seconds("eager")


def test_flash_attention_needs_half_precision():
    with pytest.raises(EstimateError, match=r"flash_attention_2.*fp16/bf16"):
        attn.check_implementation("flash_attention_2", FP32)
    with pytest.raises(EstimateError, match="unknown attn_implementation 'paged'; allowed: sdpa"):
        attn.check_implementation("paged", BF16)


def test_the_attention_setting_is_timed():
    model = build("llama", "meta")
    kw = dict(batch_size=1, seq_len=64, inference=True)
    base = estimate_step_time(model, **kw)  # what transformers picks: sdpa
    fa2 = estimate_step_time(model, attn_implementation="flash_attention_2", **kw)
    eager = estimate_step_time(model, attn_implementation="eager", **kw)
    assert fa2.forward.flops == base.forward.flops < eager.forward.flops
    assert any("FlashAttention-2" in n for n in fa2.assumptions.notes)
    with pytest.raises(EstimateError, match="unknown attn_implementation 'paged'"):
        estimate_step_time(model, attn_implementation="paged", **kw)
    with pytest.raises(EstimateError, match=r"flash_attention_2.*fp16/bf16"):
        estimate_step_time(model, attn_implementation="flash_attention_2", precision="32-true",
                           **kw)
