"""layerscope.estimate.kernels: the CUDA kernel choices and what each allocates, by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerscope.compat import fake_tensor_mode
from layerscope.errors import UnsupportedModelError
from layerscope.estimate.kernels import CudaKernels, flash_attention_forward, sdpa_backend
from layerscope.estimate.trace import _Tracker

B, H, S, D = 2, 4, 128, 64


def _qkv(mode, dtype, kv_heads=H, grad=True):
    with mode:
        q = torch.empty(B, H, S, D, dtype=dtype, requires_grad=grad)
        k = torch.empty(B, kv_heads, S, D, dtype=dtype, requires_grad=grad)
        v = torch.empty(B, kv_heads, S, D, dtype=dtype, requires_grad=grad)
    return q, k, v


@pytest.mark.parametrize(
    "dtype, mask, gqa, head_dim, expected",
    [
        (torch.bfloat16, False, False, 64, "flash"),
        (torch.bfloat16, False, True, 128, "flash"),  # flash takes grouped heads
        (torch.bfloat16, True, False, 64, "efficient"),  # a mask: not flash
        (torch.float32, False, False, 64, "efficient"),  # fp32: not flash
        (torch.bfloat16, False, False, 512, "efficient"),  # head dim above 256
        (torch.bfloat16, True, True, 64, "math"),  # mask + grouped heads
        (torch.float32, False, False, 66, "math"),  # fp32 head dim not a multiple of 4
    ],
)
def test_sdpa_kernel_choice_follows_sdp_utils(dtype, mask, gqa, head_dim, expected):
    mode = fake_tensor_mode()
    with mode:
        q = torch.empty(B, 8, S, head_dim, dtype=dtype)
        kv = torch.empty(B, 2 if gqa else 8, S, head_dim, dtype=dtype)
    assert sdpa_backend(q, kv, has_mask=mask, enable_gqa=gqa, value=kv) == expected


def test_flash_keeps_output_and_logsumexp_only():
    mode = fake_tensor_mode()
    q, k, v = _qkv(mode, torch.bfloat16)
    tracker = _Tracker()
    tracker.ignore([q, k, v])
    with mode, CudaKernels(None), tracker:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    seg = tracker.segments()[("embed", "fwd")]
    output = B * H * S * D * 2  # bf16
    logsumexp = B * H * S * 4  # fp32 per row
    rng_state = 2 * 512  # uint64 [2] and [] CUDA tensors, one 512-byte block each
    assert seg.net == output + logsumexp + rng_state
    assert tuple(out.shape) == (B, H, S, D)


def test_efficient_kernel_keeps_its_rng_seed_on_the_host():
    mode = fake_tensor_mode()
    q, k, v = _qkv(mode, torch.float32)
    tracker = _Tracker()
    tracker.ignore([q, k, v])
    with mode, CudaKernels(None), tracker:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    seg = tracker.segments()[("embed", "fwd")]
    # fp32 output and logsumexp (rows padded to 32: B x H x 128); seed and offset on the host
    assert seg.net == B * H * S * D * 4 + B * H * 128 * 4
    assert out.dtype == torch.float32


def test_math_fallback_materialises_the_scores():
    """fp32, a mask and grouped heads: the math path keeps the S x S attention weights."""
    mode = fake_tensor_mode()
    q, k, v = _qkv(mode, torch.float32, kv_heads=2)
    with mode:
        mask = torch.ones(S, S, dtype=torch.bool).tril()
    tracker = _Tracker()
    tracker.ignore([q, k, v, mask])
    with mode, CudaKernels(None), tracker:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    seg = tracker.segments()[("embed", "fwd")]
    scores = B * H * S * S * 4
    # kept for backward: the softmax of every (batch, head) S x S score matrix, the scaled
    # query and the keys and values repeated to 4 heads (B x 4 x S x D fp32 each); and the
    # output
    assert seg.net == scores + 3 * B * H * S * D * 4 + B * H * S * D * 4
    assert tuple(out.shape) == (B, H, S, D)


def test_flash_attention_2_emulation_keeps_grouped_heads_and_no_extra_copy():
    mode = fake_tensor_mode()
    q, k, v = _qkv(mode, torch.bfloat16, kv_heads=2)
    tracker = _Tracker()
    tracker.ignore([q, k, v])
    module = nn.Module()
    module.is_causal = True
    with mode, CudaKernels(None), tracker:
        out, weights = flash_attention_forward(module, q, k, v, None)
    seg = tracker.segments()[("embed", "fwd")]
    assert weights is None and tuple(out.shape) == (B, S, H, D)
    # output, logsumexp and the kernel's RNG state; no repeated keys and values, no copy
    assert seg.net == B * H * S * D * 2 + B * H * S * 4 + 2 * 512


def test_autocast_casts_a_weight_once_per_forward():
    """Two matmuls with one fp32 weight under bf16 autocast: one bf16 copy of the weight (the
    autocast weight cache), one bf16 copy of the input per call, and the two outputs."""
    mode = fake_tensor_mode()
    with mode:
        w = nn.Parameter(torch.empty(256, 128))
        x = torch.empty(64, 128)
    tracker = _Tracker()
    tracker.ignore([w, x])
    with mode, CudaKernels(torch.bfloat16), tracker:
        a = F.linear(x, w)
        b = F.linear(x, w)
    seg = tracker.segments()[("embed", "fwd")]
    weight_cast = 256 * 128 * 2
    input_casts = 2 * 64 * 128 * 2
    outputs = 2 * 64 * 256 * 2
    assert a.dtype == b.dtype == torch.bfloat16
    assert seg.allocated == weight_cast + input_casts + outputs
    assert seg.flops == 2 * (2 * 64 * 256 * 128)


def test_dropout_is_the_fused_kernel_with_a_bool_mask():
    mode = fake_tensor_mode()
    with mode:
        x = torch.empty(64, 1024, dtype=torch.bfloat16, requires_grad=True)
    tracker = _Tracker()
    tracker.ignore([x])
    with mode, CudaKernels(None), tracker:
        y = F.dropout(x, p=0.1, training=True)
    seg = tracker.segments()[("embed", "fwd")]
    assert seg.net == 64 * 1024 * 2 + 64 * 1024 * 1  # bf16 output + bool mask
    assert y.dtype == torch.bfloat16


def test_query_broadcast_over_a_batch_of_keys_takes_the_math_kernel():
    """The fused kernels need one batch size for query, key and value
    (``check_batch_size_and_num_heads_dense``); Granite Speech's Q-Former attends one set of
    learned queries (batch 1) to every window of the audio (batch 100): the math kernel
    broadcasts, so the output has the keys' batch."""
    with fake_tensor_mode():
        q = torch.empty(1, 4, 3, 16, dtype=torch.bfloat16)
        kv = torch.empty(100, 4, 15, 16, dtype=torch.bfloat16)
        assert sdpa_backend(q, kv, has_mask=False, enable_gqa=False, value=kv) == "math"
        assert sdpa_backend(kv, kv, has_mask=False, enable_gqa=False, value=kv) == "flash"
        with CudaKernels(torch.bfloat16):
            out = F.scaled_dot_product_attention(q, kv, kv)
        assert out.shape == (100, 4, 3, 16)


def test_bfloat16_fft_is_refused_as_on_a_cuda_gpu():
    """CUDA autocast does not cast FFTs and cuFFT has no bfloat16 kernel: FNet's FFT after its
    bf16 projection fails on a GPU; an fp32 FFT runs."""
    with fake_tensor_mode(), CudaKernels(torch.bfloat16):
        x = torch.empty(2, 8, 16)
        assert torch.fft.fftn(x, dim=(1, 2)).dtype == torch.complex64
        with pytest.raises(UnsupportedModelError, match="no bfloat16 FFT"):
            torch.fft.fftn(nn.Linear(16, 16)(x), dim=(1, 2))
