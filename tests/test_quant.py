"""Quantized bases as bitsandbytes stores them (estimate/quant.py), without bitsandbytes.

The byte counts below are written out from bitsandbytes' CUDA ``quantize_4bit`` op and
``functional.quantize_4bit`` (0.50.1): packed weight ``(n + 1) // (2 * itemsize)`` elements of
the storage dtype, one fp32 absmax per 64 elements, a 16-entry fp32 code table; with double
quantisation a uint8 absmax, a 0-dim fp32 offset, one fp32 per 256 absmax and a 256-entry
fp32 map. The same shapes were produced by bitsandbytes 0.50.1 quantising real weights on the
CPU (``Params4bit(...)._quantize("cpu")``) while this module was written.
"""

from __future__ import annotations

import pytest
import torch

from layerscope.estimate.quant import (
    linear4bit_storage,
    linear8bit_storage,
    load_allocations,
    memory_footprint,
    quantized_base,
)
from layerscope.quantization import Quantization


@pytest.fixture(scope="module")
def llama8b():
    from layerscope import empty_model

    return empty_model("llama-3.1-8b")


def test_4bit_layer_bytes_written_out():
    # 4096 x 4096 (Llama-3.1-8B q_proj), nf4, uint8 storage, no double quant
    n = 4096 * 4096
    s = linear4bit_storage(4096, 4096, double_quant=False)
    assert dict(s.tensors) == {"weight": n // 2, "absmax": 4 * (n // 64), "code": 64}
    assert s.weight_bytes == 8_388_608 and s.state_bytes == 1_048_576 + 64
    # allocator view: every tensor a multiple of 512 bytes (the 64-byte table takes 512)
    assert s.allocated_bytes == 8_388_608 + 1_048_576 + 512

    # the same with double quantisation: 262144 uint8 absmax, 1024 second-level fp32 absmax
    s = linear4bit_storage(4096, 4096, double_quant=True)
    assert dict(s.tensors) == {"weight": 8_388_608, "absmax": 262_144, "code": 64, "offset": 4,
                               "state2.absmax": 4 * 1024, "state2.code": 4 * 256}
    assert s.allocated_bytes == 8_388_608 + 262_144 + 512 + 512 + 4096 + 1024

    # 14336 x 4096 (gate_proj): 917504 blocks, ceil(917504 / 256) = 3584 second-level
    s = linear4bit_storage(14336, 4096, double_quant=True)
    assert dict(s.tensors)["absmax"] == 917_504 and dict(s.tensors)["state2.absmax"] == 3584 * 4

    # bf16 quant storage (FSDP): 4 nibbles per element, same bytes for an even count
    s = linear4bit_storage(4096, 4096, double_quant=False, quant_storage=torch.bfloat16)
    assert s.weight_bytes == 4_194_304 * 2

    # odd shapes: 33 x 7 = 231 elements -> (231 + 1) // 2 = 116 bytes; bf16 storage
    # (231 + 1) // 4 = 58 elements = 116 bytes; ceil(231 / 64) = 4 blocks
    assert dict(linear4bit_storage(33, 7, double_quant=False).tensors)["weight"] == 116
    assert linear4bit_storage(33, 7, double_quant=False, quant_storage=torch.bfloat16).weight_bytes == 116
    assert dict(linear4bit_storage(33, 7, double_quant=False).tensors)["absmax"] == 16
    # 100 x 30 = 3000 elements: ceil(3000 / 64) = 47 blocks, one second-level block
    s = dict(linear4bit_storage(100, 30, double_quant=True).tensors)
    assert (s["weight"], s["absmax"], s["state2.absmax"]) == (1500, 47, 4)


def test_int8_layer_bytes_written_out():
    s = linear8bit_storage(1024, 4096)  # k_proj: int8 weight and one fp32 scale per row
    assert dict(s.tensors) == {"weight": 1024 * 4096, "SCB": 1024 * 4}
    assert s.allocated_bytes == 4_194_304 + 4096


def test_load_allocations_written_out():
    """What quantizing a 4096 x 4096 weight on load allocates, in bitsandbytes' order."""
    n = 4096 * 4096
    # nf4: the bf16 weight moved to the GPU, the fp32 absmax (one per 64), the packed weight,
    # the 64-byte code table (a 512-byte block); the bf16 weight is dropped afterwards
    assert load_allocations(Quantization("nf4"), 4096, 4096, torch.bfloat16) == (
        (2 * n, False), (4 * n // 64, True), (n // 2, True), (512, True))
    # double quant: the offset (0-dim fp32), the shifted fp32 absmax (a temporary), then
    # quantize_blockwise's 1024 second-level fp32 absmax, the 262144 uint8 absmax and the
    # copied 256-entry map; the fp32 absmax, the temporary and the weight are dropped
    assert load_allocations(Quantization("nf4", double_quant=True), 4096, 4096,
                            torch.bfloat16) == (
        (2 * n, False), (4 * n // 64, False), (n // 2, True), (512, True), (512, True),
        (4 * n // 64, False), (4096, True), (n // 64, True), (1024, True))
    # int8: the weight moved in fp16, one fp32 scale per row, then the int8 weight
    assert load_allocations(Quantization("int8"), 1024, 4096, torch.bfloat16) == (
        (2 * 1024 * 4096, False), (4096, True), (1024 * 4096, True))
    # what is kept is the layer's storage
    for q in (Quantization("nf4"), Quantization("fp4", double_quant=True), Quantization("int8")):
        kept = sum(b for b, k in load_allocations(q, 1024, 4096, torch.float32) if k)
        storage = linear8bit_storage(1024, 4096) if q.method == "int8" else linear4bit_storage(
            1024, 4096, double_quant=q.double_quant)
        assert kept == storage.allocated_bytes


def _llama_linears():
    # Llama-3.1-8B: 32 layers of q, k, v, o, gate, up, down
    h, kv, inter = 4096, 1024, 14336
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
    return [s for _ in range(32) for s in shapes]


def test_llama_3_1_8b_quantized_base(llama8b):
    shapes = _llama_linears()
    n = sum(o * i for o, i in shapes)
    assert n == 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096) == 6_979_321_856
    q = Quantization("nf4")
    base = quantized_base(llama8b, q)
    assert base.modules == 224 and base.params == n
    assert base.weight_bytes == n // 2 == 3_489_660_928
    # absmax: one fp32 per 64 elements, plus a 64-byte code table per layer
    assert base.state_bytes == n // 64 * 4 + 224 * 64 == 436_221_952

    dq = quantized_base(llama8b, Quantization("nf4", double_quant=True))
    second = sum(-(-(o * i // 64) // 256) * 4 for o, i in shapes)  # fp32 per 256 absmax
    assert second == 32 * (2 * 4096 + 2 * 1024 + 3 * 14336) == 1_703_936
    per_layer = 64 + 4 + 1024  # code, offset, nested 256-entry map
    assert dq.state_bytes == n // 64 + second + 224 * per_layer == 111_000_448
    assert dq.weight_bytes == base.weight_bytes
    # double quantisation saves 0.373 bits per parameter (QLoRA paper: 32/64 - 8/64 - 32/(64*256))
    saved_bits = 8 * (base.state_bytes - dq.state_bytes) / n
    assert saved_bits == pytest.approx(0.373, abs=0.001)


def test_llama_3_1_8b_memory_footprint_as_transformers_counts(llama8b):
    # get_memory_footprint(): packed weights + every other parameter in bf16 + buffers (the
    # rotary inv_freq and original_inv_freq, 64 fp32 each); quant state not counted
    packed = 3_489_660_928
    embed = head = 128256 * 4096 * 2
    norms = (2 * 32 + 1) * 4096 * 2
    buffers = 2 * 64 * 4
    expected = packed + embed + head + norms + buffers
    assert memory_footprint(llama8b, Quantization("nf4"), torch.bfloat16) == expected
    assert expected == 5_591_540_224  # 5.21 GiB, the "about 5.6 GB" commonly quoted for 8B nf4
    # double quant changes only the state, which the footprint does not count
    assert memory_footprint(llama8b, Quantization("nf4", double_quant=True), torch.bfloat16) == expected


def test_footprint_matches_transformers_and_bitsandbytes():
    """With bitsandbytes installed (not a dependency): a tiny Llama saved and reloaded in 4 and 8
    bits on the CPU reports the footprint computed here. Skipped without bitsandbytes."""
    pytest.importorskip("bitsandbytes")
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as folder:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
        for bnb in (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                    BitsAndBytesConfig(load_in_8bit=True)):
            real = AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=bnb, dtype=torch.bfloat16, device_map="cpu")
            q = Quantization.of(bnb)
            assert real.get_memory_footprint() == memory_footprint(skeleton, q, torch.bfloat16)
