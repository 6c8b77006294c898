"""A torchao NF4 base (estimate/torchao.py): what ``NF4Tensor`` keeps, and every allocation of
quantizing, dequantizing and torchtune's build, written out from torchao's ``nf4tensor.py``
(tags v0.1, v0.2.0, v0.3.0) and torchtune @0914d5cfb. Sizes are bytes before the allocator's
512-byte rounding unless the test says otherwise."""

from __future__ import annotations

import pytest
import torch
from conftest import layer_step

from layerscope.errors import EstimateError
from layerscope.estimate.allocator import Op
from layerscope.estimate.torchao import (
    OpRecorder,
    dequantize_ops,
    nf4_storage,
    quantize_ops,
    torchtune_build_ops,
)
from layerscope.estimate.trace import rounded
from layerscope.quantization import Quantization

V01 = Quantization("nf4", library="torchao", torchao_version="0.1")
V02 = Quantization("nf4", library="torchao", torchao_version="0.2.0")
LATEST = Quantization("nf4", library="torchao")

# Llama-2-7B's MLP weight: 11008 x 4096
N = 11008 * 4096  # 45_088_768 elements
BLOCKS = N // 64  # 704_512 scalers, one per 64 elements
SCALER_BLOCKS = BLOCKS // 256  # 2752 factors, one per 256 scalers


def _replay(ops: list[Op]) -> tuple[int, int, list[int]]:
    """(highest live bytes, live bytes at the end, allocation sizes in order)."""
    sizes: dict[int, int] = {}
    live = high = 0
    made = []
    for h, size in ops:
        if size:
            assert h not in sizes
            sizes[h] = size
            live += size
            high = max(high, live)
            made.append(size)
        else:
            live -= sizes.pop(h)
    return high, live, made


def test_storage_written_out():
    # torchao 0.1 and 0.2: quantized_data n/2 uint8, quantized_scalers one int8 per block,
    # quantization_factor a [:, 0] view that keeps its whole per-block bf16 tensor, scaler_mean
    # a 0-dim bf16, the 16-entry bf16 table
    s = nf4_storage(V01, 11008, 4096)
    assert dict(s.tensors) == {"weight": N // 2, "quantized_scalers": BLOCKS,
                               "quantization_factor": 2 * BLOCKS, "scaler_mean": 2, "nf4": 32}
    assert s.weight_bytes == 22_544_384
    assert nf4_storage(V02, 11008, 4096) == s
    # 0.3 on: quantization_factor contiguous, one bf16 per 256 scalers
    assert dict(nf4_storage(LATEST, 11008, 4096).tensors)["quantization_factor"] == 2 * 2752
    # allocator view: 22_544_384 + 704_512 + 1_409_024 + 512 + 512 (all but the two small ones
    # already multiples of 512)
    assert s.allocated_bytes == 22_544_384 + 704_512 + 1_409_024 + 512 + 512
    # the same storage through the setting (estimate/quant.py dispatches on the library)
    from layerscope.estimate.quant import layer_storage

    assert layer_storage(V01, 11008, 4096) == s


def test_one_piece_quantization_written_out():
    """torchao 0.1's from_tensor of a resident 11008 x 4096 bf16 weight, statement by statement."""
    rec = OpRecorder()
    kept = quantize_ops(rec, V01, N)
    high, live, made = _replay(rec.ops)
    b, sb = BLOCKS, SCALER_BLOCKS
    assert made == [rounded(x) for x in [
        16 * 2,  # the NF4 table, bf16
        2 * N, 2 * b, 8 * b,  # double_quantize_scalers: abs(), max(dim=1) values, int64 indices
        2,  # scalers.mean()
        2 * b,  # scalers - mean
        2 * b, 2 * sb, 8 * sb,  # absmax per scaler block: abs(), values, indices
        2 * b, 2 * b,  # 2 * absmax and 256 / it, over the broadcast (per-block) shape
        2 * b, 2 * b, 2 * b,  # scaled, round(), clamp()
        b,  # .to(torch.int8): quantized_scalers
        2 * N, 2 * b, 8 * b,  # convert_to_norm_float_weight: absmax again
        2 * N,  # blocks / scales
        11008 * 4096 * 16 * 2, 11008 * 4096 * 16 * 2,  # value - nf4, .abs(): numel x 16 bf16
        2 * N, 8 * N,  # min(dim=-1): values, int64 indices
        4 * N, 4 * N,  # [::2] << 4 and | [1::2] over n/2 int64
        N // 2,  # .to(torch.uint8): quantized_data
    ]]
    # the peak: both numel x 16 temporaries with the scaled blocks, the per-block absmax, and
    # what is already kept (table, mean, per-block factor, int8 scalers)
    assert high == 2 * (11008 * 4096 * 16 * 2) + 2 * N + 2 * b + 512 + 512 + 2 * b + b
    assert high == 2_979_382_272  # 2.98 GB (2.77 GiB) above the weight itself, for one MLP weight
    # what stays is NF4Tensor's storage, handles in its order (data, scalers, factor, mean, table)
    assert live == nf4_storage(V01, 11008, 4096).allocated_bytes
    assert [dict(rec.ops)[h] for h in kept] == [N // 2, b, 2 * b, 512, 512]


def test_chunked_quantization_written_out():
    """From 0.2: a uint8 buffer, and the comparison a million elements at a time."""
    rec = OpRecorder()
    quantize_ops(rec, V02, N)
    high, live, made = _replay(rec.ops)
    chunks = -(-N // 1024**2)  # 43 chunks
    assert chunks == 43
    assert made.count(1024**2 * 16 * 2) == 2 * chunks  # value - nf4 and .abs() per chunk
    assert max(made) == 2 * N  # now the largest: abs() of the weight, and the scaled blocks
    b = BLOCKS
    # peak: the two chunk temporaries over the scaled blocks (2n), the uint8 buffer (n), the
    # per-block absmax and what is kept so far
    assert high == 2 * (1024**2 * 16 * 2) + 2 * N + N + 2 * b + 512 + 512 + 2 * b + b
    assert live == nf4_storage(V02, 11008, 4096).allocated_bytes
    # 0.3: the contiguous factor is made and the per-block tensor freed
    rec = OpRecorder()
    quantize_ops(rec, LATEST, N)
    assert _replay(rec.ops)[1] == nf4_storage(LATEST, 11008, 4096).allocated_bytes


def test_dequantization_written_out():
    rec = OpRecorder()
    weight = dequantize_ops(rec, N)
    high, live, made = _replay(rec.ops)
    b = BLOCKS
    assert made == [rounded(x) for x in [
        N // 2, 4 * N,  # data >> 4, .to(torch.long)
        N // 2, 4 * N,  # data & 0b1111, .to(torch.long)
        N, N,  # nf4[first], nf4[second]: n/2 bf16 each
        2 * b, 2 * b,  # scalers / factors, + mean
        N, N, N, N,  # per half: the repeated scalers flattened, the product
        2 * N,  # torch.stack: the bf16 weight
    ]]
    assert live == 2 * N and dict(rec.ops)[weight] == 2 * N
    # the peak: both int64 index tensors, both lookups, scalers, both products, the stack
    assert high == 4 * N + 4 * N + N + N + 2 * b + N + N + 2 * N


def test_torchtune_build_order():
    """One template block, the others, a copy per block, then the checkpoint loaded."""
    n = 128 * 128  # one quantized weight per block, plus a 256-byte norm
    rec = OpRecorder()
    torchtune_build_ops(rec, V01, [[(n, 0), (0, 256)]] * 2, others=[1000], buffers=[64],
                        checkpoint=torch.float16)
    _, live, made = _replay(rec.ops)
    storage = nf4_storage(V01, 128, 128).allocated_bytes
    # kept: two blocks' storage and norms, the other parameter, the buffer (512 each, rounded)
    assert live == 2 * (storage + 512) + 1024 + 512
    # quantized 1 (template) + 2 (copies) + 2 (load) times: the numel x 16 temporary 10 times
    assert made.count(n * 16 * 2) == 2 * 5
    # order: the template's weight quantized, then the embedding/norm/head (1000 -> 1024 bytes),
    # then the copies (each quantizes again)
    compares = [i for i, size in enumerate(made) if size == n * 16 * 2]
    assert compares[0] < made.index(1024) < compares[2]
    # the load: the fp16 checkpoint tensor moved to the GPU (2n), to_nf4's bf16 copy (2n), then
    # from_tensor's first allocation, the table (32 bytes -> 512)
    loads = [i for i in range(len(made) - 2) if made[i:i + 3] == [2 * n, 2 * n, 512]]
    assert len(loads) == 2
    assert compares[5] < loads[0] < compares[6] and compares[7] < loads[1] < compares[8]
    # a bf16 checkpoint is quantized as moved (no second copy)
    rec16 = OpRecorder()
    torchtune_build_ops(rec16, V01, [[(n, 0)]], others=[], buffers=[], checkpoint=torch.bfloat16)
    rec32 = OpRecorder()
    torchtune_build_ops(rec32, V01, [[(n, 0)]], others=[], buffers=[], checkpoint=torch.float32)
    assert len(rec32.ops) == len(rec16.ops) + 2  # the bf16 conversion, made and freed


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"library": "bnb"}, "quantization library must be one of bitsandbytes, torchao, got 'bnb'"),
    ({"torchao_version": "0.1"}, "torchao_version='0.1' needs library='torchao'"),
    ({"library": "torchao", "torchao_version": "v0.1"},
     "torchao_version must be a release such as '0.1' or '0.2.0', got 'v0.1'"),
    ({"library": "torchao", "torchao_version": 0.1}, "torchao_version must be a release"),
    ({"library": "torchao", "torchao_version": "0.0.9"}, "torchao_version must be 0.1 or later"),
    ({"library": "torchao", "quant_storage": torch.bfloat16},
     "library='torchao' stores NF4 weights as uint8"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(EstimateError, match=message):
        Quantization("nf4", **kwargs)


def test_torchao_is_nf4_only_and_whole_blocks():
    with pytest.raises(EstimateError, match="library='torchao' quantizes to NF4 only.*'int8'"):
        Quantization("int8", library="torchao")
    # 64 x 64 = 4096 elements: not whole scaler blocks (64 * 256 = 16384 per scaler block)
    with pytest.raises(EstimateError, match="a weight of 4096 elements cannot be quantized"):
        nf4_storage(LATEST, 64, 64)


def test_default_is_bitsandbytes_unchanged():
    q = Quantization("nf4")
    assert q.library == "bitsandbytes" and q.torchao_version is None and not q.double_quant
    assert q == Quantization("nf4", library="bitsandbytes")
    assert "library" not in q.to_dict() and q.describe() == "nf4"
    # torchao always quantizes its scalers; described with its version
    assert V01.double_quant and V01.describe() == "nf4 (torchao 0.1)"
    assert V01.to_dict()["library"] == "torchao" and V01.torchao_release == (0, 1)
    assert LATEST.torchao_release == (0, 3)


@pytest.fixture(scope="module")
def llama1024():
    """A small Llama whose every projection is whole torchao blocks: 1024 x 1024, 4096 x 1024."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=100,
                         tie_word_embeddings=False, max_position_embeddings=64)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_estimate_with_a_torchao_base(llama1024):
    from layerscope import estimate_memory

    kw = dict(batch_size=1, seq_len=16, precision="bf16-true", lora=8, base_dtype="bf16",
              lora_dtype="bf16", gradient_checkpointing=True)
    old = estimate_memory(llama1024, quantization=V01, **kw)
    new = estimate_memory(llama1024, quantization=LATEST, **kw)
    bnb = estimate_memory(llama1024, quantization=Quantization("nf4", double_quant=True), **kw)
    # storage: 2 layers x (4 of 1024 x 1024 + 3 of 4096 x 1024): data n/2, int8 scalers n/64,
    # factor, mean, table (512-byte blocks at least). 0.1 keeps one bf16 factor per block
    # (2 * n / 64), 0.3 one per 256 blocks (n / 8192 bytes: 128 and 512, one block each)
    q_old = 1024 * 1024 // 2 + 16384 + 32768 + 512 + 512
    mlp_old = 4096 * 1024 // 2 + 65536 + 131072 + 512 + 512
    q_new = 1024 * 1024 // 2 + 16384 + 512 + 512 + 512
    mlp_new = 4096 * 1024 // 2 + 65536 + 512 + 512 + 512
    assert old.quantized_base_bytes == 2 * (4 * q_old + 3 * mlp_old)
    assert new.quantized_base_bytes == 2 * (4 * q_new + 3 * mlp_new)
    # 0.1 quantizes a 4096 x 1024 weight in one piece: two 4096 * 1024 x 16 bf16 temporaries
    # (128 MiB each) alive together, which the allocator keeps; from 0.2, 32 MiB at a time
    assert old.reserved_bytes >= 2 * 4096 * 1024 * 16 * 2
    assert new.reserved_bytes < 2 * 4096 * 1024 * 16 * 2
    # torchtune does not run peft's prepare_model_for_kbit_training: the norms stay bf16,
    # where the bitsandbytes base upcasts them (and the embedding and head) to fp32
    embed_head = 2 * 100 * 1024
    assert bnb.weights_bytes - bnb.quantized_base_bytes > new.weights_bytes - new.quantized_base_bytes
    assert new.weights_bytes - new.quantized_base_bytes >= 2 * embed_head
    with pytest.raises(EstimateError, match="library='torchao' with distributed='ddp'"):
        estimate_memory(llama1024, quantization=LATEST, distributed="ddp", num_gpus=2, **kw)


def test_step_dequantizes_with_get_original_weight_and_saves_nothing():
    """torchao's linear_nf4 on a 64 x 128 bf16 input, weight 256 x 128 (n = 32768)."""
    from layerscope.estimate.torchao import LinearNF4

    fwd, bwd, _ = layer_step(LinearNF4(128, 256, None), 64, 128, 256)
    n, blocks = 256 * 128, 256 * 128 // 64
    # get_original_weight's highest point, at the stack: both int64 index halves (4n bytes
    # each), both table lookups and both scaled halves (n bytes each: n/2 bf16), the scalers
    # (2 * blocks), and the stacked bf16 weight (2n)
    dequantized = 4 * n + 4 * n + n + n + 2 * blocks + n + n + 2 * n
    assert dequantized == 459_776
    out_bytes, grad_in = 64 * 256 * 2, 64 * 128 * 2
    assert (fwd.high, fwd.net) == (dequantized, out_bytes)  # only the output stays
    assert (bwd.high, bwd.net) == (dequantized, grad_in)  # dequantized again, then x.grad


def test_report_names_the_torchao_base(llama1024):
    from layerscope.render.console import base_text
    from layerscope.setup import make_setup

    setup = make_setup(llama1024, None, batch_size=1, seq_len=16, precision="bf16-true", lora=8,
                       quantization=V01, base_dtype="bf16", lora_dtype="bf16")
    assert base_text(setup.to_dict()) == (
        "Base: nf4 (torchao 0.1, torchtune's build), loaded in bfloat16, adapters bfloat16")
    bnb = make_setup(llama1024, None, batch_size=1, seq_len=16, precision="bf16-true", lora=8,
                     quantization="nf4", base_dtype="bf16", lora_dtype="bf16")
    assert base_text(bnb.to_dict()).startswith(
        "Base: nf4 (compute bfloat16, storage uint8), loaded in bfloat16, "
        "prepare_model_for_kbit_training")
