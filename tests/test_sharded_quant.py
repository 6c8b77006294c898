"""A quantized or 16-bit base under DDP, ZeRO and FSDP (issue 13): what each rank keeps of the
packed weights and their quantisation state, the settings FSDP and ZeRO-3 need, and what stays
refused. Sizes of the tiny Llama of conftest, written out here.

Tiny Llama: hidden 64, MLP 128, 4 heads of 16 with 2 KV heads (k/v: 32 x 64), 4 layers. Its
quantized Linears per layer (transformers keeps lm_head in full precision):

    q_proj 64x64 = 4096, k_proj 32x64 = 2048, v_proj 2048, o_proj 4096,
    gate_proj 128x64 = 8192, up_proj 8192, down_proj 64x128 = 8192   -> 36,864 weights a layer

NF4 packs two weights a byte: 2048, 1024, 1024, 2048, 4096, 4096, 4096 bytes (each a multiple
of 512, so the caching allocator's rounding adds nothing): 18,432 a layer, 73,728 for the 4.
The quantisation state of each Linear, without double quantisation: one fp32 absmax per 64
weights (q: 64 blocks = 256 bytes; gate: 128 blocks = 512 bytes; at most 512 here) and the
16-entry fp32 code table (64 bytes), each one allocation of 512 bytes: 1024 a Linear, 7,168 a
layer, 28,672 in all.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build

from layerscope import estimate_memory
from layerscope.errors import EstimateError
from layerscope.estimate.choose import candidates, persistent_bytes
from layerscope.estimate.distributed import packed_weights, quant_state_sizes
from layerscope.estimate.hardware import get_gpu
from layerscope.estimate.states import scan_tensors
from layerscope.estimate.time import sharded_run
from layerscope.quantization import Quantization
from layerscope.setup import TrainingSetup

PACKED = 4 * (2048 + 1024 + 1024 + 2048 + 3 * 4096)  # 73,728 bytes of NF4 weights
STATE = 4 * 7 * (512 + 512)  # absmax and code of 28 Linears: 28,672 bytes
STEP = dict(lora=8, seq_len=32, batch_size=2, gradient_checkpointing=True)


@pytest.fixture(scope="module")
def model():
    return build("llama", "meta")


def test_the_packed_weights_and_state_per_rank(model):
    # one GPU and DDP: the whole packed base and its state on every GPU
    one = estimate_memory(model, quantization="nf4", **STEP)
    ddp = estimate_memory(model, quantization="nf4", distributed="ddp", num_gpus=2, **STEP)
    assert one.quantized_base_bytes == ddp.quantized_base_bytes == PACKED + STATE == 102_400
    # FSDP2 and ZeRO-3 on 2 GPUs: the packed weights in bf16 storage (2 bytes an element, the
    # model's dtype) are split in two along dim 0: q_proj's 1024 elements -> 512 a rank =
    # 1024 bytes, k_proj 512 -> 256 = 512 bytes (the allocator's minimum), the MLP 2048 bytes:
    # half the packed bytes; the state (not a parameter) stays whole on each rank
    shards = 4 * (1024 + 512 + 512 + 1024 + 3 * 2048)
    assert shards == PACKED // 2
    for strategy in ("fsdp", "zero3"):
        e = estimate_memory(model, quantization="nf4", distributed=strategy, num_gpus=2, **STEP)
        assert e.quantized_base_bytes == shards + STATE == 65_536, strategy
        assert e.total_params == one.total_params  # weights, not packed elements
    # FSDP with the parameters offloaded: only the state stays on the GPU
    off = estimate_memory(model, quantization="nf4", distributed="fsdp", num_gpus=2,
                          offload="params", **STEP)
    assert off.quantized_base_bytes == STATE


def test_double_quantisation_state_under_fsdp(model):
    # double quantisation: absmax in uint8 (64 or 128 bytes -> 512), the fp32 offset (512),
    # state2.absmax (one fp32 per 256 absmax: 4 bytes -> 512), state2.code (256 fp32 = 1024),
    # code (512): 3072 a Linear, 86,016 for the 28
    s = TrainingSetup(model, quantization=Quantization("nf4", double_quant=True),
                      distributed="fsdp", num_gpus=2, **STEP)
    assert sum(quant_state_sizes(s)) == 28 * (512 + 512 + 512 + 512 + 1024) == 86_016


def test_an_int8_base_is_whole_on_each_rank_of_ddp_and_zero2(model):
    # int8: one byte a weight (36,864 a layer) and an fp32 scale per output row (SCB: 256,
    # 128, 128, 256, 512, 512, 256 bytes, each 512 allocated): 3,584 a layer
    whole = 4 * 36_864 + 4 * 7 * 512
    for strategy in ("ddp", "zero2"):
        e = estimate_memory(model, quantization="int8", distributed=strategy, num_gpus=2, **STEP)
        assert e.quantized_base_bytes == whole == 161_792, strategy


def test_fsdp_and_zero3_take_the_base_dtype_as_storage(model):
    bf16 = TrainingSetup(model, quantization="nf4", base_dtype="bf16", distributed="fsdp",
                         num_gpus=2, **STEP)
    assert bf16.quantization is not None and bf16.quantization.storage == torch.bfloat16
    assert not bf16.kbit_prepared  # TRL skips prepare_model_for_kbit_training when sharded
    assert bf16.frozen_dtype == torch.bfloat16
    assert bf16.adapter_dtype == torch.bfloat16  # TRL: autocast_adapter_dtype=False
    # the elements each strategy moves: q_proj's 2048 packed bytes are 1024 bf16 elements
    assert packed_weights(bf16)["model.layers.0.self_attn.q_proj.weight"] == (1024, 2)
    one = TrainingSetup(model, quantization="nf4", **STEP)
    assert one.quantization is not None and one.quantization.storage == torch.uint8
    assert one.kbit_prepared and one.adapter_dtype == torch.float32
    ddp = TrainingSetup(model, quantization="nf4", distributed="ddp", num_gpus=2, **STEP)
    assert ddp.kbit_prepared and ddp.quantization == one.quantization
    zero3 = TrainingSetup(model, quantization="nf4", distributed="zero3", num_gpus=2, **STEP)
    assert zero3.quantization is not None and zero3.quantization.storage == torch.float32
    assert zero3.to_dict()["quantization"]["quant_storage"] == "float32"


def test_the_scan_and_the_wire_see_the_packed_storage(model):
    s = TrainingSetup(model, quantization="nf4", base_dtype="bf16", distributed="fsdp",
                      num_gpus=2, **STEP)
    params = scan_tensors(s.scan, s.trainable, s.lora, itemsize=4, adapter_itemsize=4,
                          packed=packed_weights(s), frozen_itemsize=2)
    quantized = [p for p in params if p.quantized]
    assert len(quantized) == 28 and not any(p.trainable for p in quantized)
    assert sum(p.numel * p.itemsize for p in quantized) == PACKED
    # the embedding and norms are frozen bf16; LoRA adapters fp32
    embed = next(p for p in params if p.shape == (100, 64))
    assert embed.itemsize == 2 and not embed.trainable
    # step time: FSDP gathers a quantized weight as packed bf16 elements (MixedPrecision's
    # dtype is bf16 too): the root and blocks hold 1024 + 512 + 512 + 1024 + 3 * 2048 = 9216
    # packed elements a block, against 36,864 weights of a bf16 base
    run = sharded_run(s, get_gpu("h100-sxm"))
    assert run is not None
    packed_block = sum(p.numel for p in run.params if p.quantized and p.block == 0)
    assert packed_block == 9216


def test_the_floor_of_the_gpu_search_counts_the_packed_base(model):
    s = TrainingSetup(model, quantization="nf4", base_dtype="bf16", distributed="fsdp",
                      num_gpus=2, **STEP)
    plain = TrainingSetup(model, base_dtype="bf16", lora_dtype="bf16", distributed="fsdp",
                          num_gpus=2, **STEP)
    # the quantized base's floor is the bf16 base's (bf16 adapters too, as a sharded QLoRA base
    # keeps them), less the 147,456 bf16 weights' shards
    # (ceil(n / 2) elements x 2 bytes, each at least 512), plus the packed shards and state
    bf16_shards = 4 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)
    assert persistent_bytes(s) == persistent_bytes(plain) - bf16_shards + PACKED // 2 + STATE
    # the search does not try FSDP or ZeRO-3 for an int8 base: they cannot shard it
    int8 = TrainingSetup(model, quantization="int8", **STEP)
    tried = [plain.distributed for plain, _ in candidates(int8, 2, offload=False)]
    assert tried == ["zero2"]


def test_what_stays_refused_changes_nothing(model):
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(EstimateError, match=r"quantization='int8' with distributed='zero3'.*"
                       r"ddp, zero1, zero2"):
        estimate_memory(model, quantization="int8", distributed="zero3", num_gpus=2, **STEP)
    with pytest.raises(EstimateError, match=r"quantization='int8' with distributed='fsdp'"):
        estimate_memory(model, quantization="int8", distributed="fsdp", num_gpus=2,
                        fsdp_version=1, **STEP)
    with pytest.raises(EstimateError, match=r"bnb_4bit_quant_storage=uint8 with distributed="
                       r"'fsdp' and a bfloat16 base"):
        estimate_memory(model, base_dtype="bf16", distributed="fsdp", num_gpus=2, **STEP,
                        quantization=Quantization("nf4", quant_storage=torch.uint8))
    with pytest.raises(EstimateError, match=r"prepare_kbit=True with distributed='zero3'"):
        estimate_memory(model, quantization="nf4", prepare_kbit=True, distributed="zero3",
                        num_gpus=2, **STEP)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    # the same storage and preparation are fine where the base is not sharded
    estimate_memory(model, base_dtype="bf16", distributed="zero2", num_gpus=2, prepare_kbit=True,
                    quantization=Quantization("nf4", quant_storage=torch.uint8), **STEP)


def test_a_bf16_base_with_lora_under_fsdp(model):
    # LoRA on a bf16 base: the frozen base's shards in bf16, half the fp32 base's
    bf16 = estimate_memory(model, base_dtype="bf16", distributed="fsdp", num_gpus=2, **STEP)
    fp32 = estimate_memory(model, distributed="fsdp", num_gpus=2, **STEP)
    assert bf16.quantized_base_bytes == 0 and bf16.quantization is None
    assert bf16.weights_bytes < fp32.weights_bytes


def test_70b_qlora_with_fsdp_on_two_80gb_gpus_fits():
    # answer.ai's FSDP-QLoRA and peft's FSDP-QLoRA guide train a 70B Llama on two GPUs (24 GB
    # ones with CPU offload, 80 GB ones without)
    from layerscope.build import empty_model
    from layerscope.estimate.quant import quantized_base

    model = empty_model("llama-3.1-70b")
    setup = dict(lora=64, gradient_checkpointing=True, distributed="fsdp", num_gpus=2)
    e = estimate_memory(model, quantization="nf4", **setup)
    assert e.fits("h100-sxm") and e.fits("a100-80gb")
    # its quantized base: half the packed weights (~0.5 byte a weight) and the whole state
    q = TrainingSetup(model, quantization="nf4", **setup).quantization
    assert q is not None and q.storage == torch.bfloat16
    base = quantized_base(model, q)
    expected = base.weight_bytes / 2 + base.state_bytes
    assert abs(e.quantized_base_bytes - expected) / expected < 0.01
    # LoRA on the bf16 base (141 GB of weights) does not fit on the same two GPUs
    assert not estimate_memory(model, base_dtype="bf16", **setup).fits("h100-sxm")
    # on two 24 GB GPUs it needs the parameters offloaded (answer.ai's setting); then only the
    # quantisation state of the base stays on each GPU
    assert not e.fits("rtx-4090")
    offloaded = estimate_memory(model, quantization="nf4", offload="params", **setup)
    assert offloaded.fits("rtx-4090") and offloaded.quantized_base_bytes < base.state_bytes * 1.01


def test_fsdp1_wraps_adapters_apart_on_a_quantized_base(model):
    # the HF Trainer applies peft's wrap policy for a quantized base: whatever use_orig_params,
    # no flat parameter mixes packed weights and adapters, so none gets a whole-block gradient
    from layerscope.estimate.sharding import FsdpSettings, make_sharding

    def fsdp1(orig: bool, **kw):
        sharding = make_sharding(distributed="fsdp", num_gpus=2,
                                 fsdp=FsdpSettings(version=1, use_orig_params=orig))
        return estimate_memory(model, sharding=sharding, **STEP, **kw)

    assert fsdp1(True, quantization="nf4").peak_bytes == fsdp1(False, quantization="nf4").peak_bytes
    # on an unquantized base use_orig_params=True still mixes them (issue 12's model)
    assert fsdp1(True).gradient_bytes > fsdp1(False).gradient_bytes
