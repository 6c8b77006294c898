import pytest
from peft import LoraConfig

from conftest import build
from layerscope import EstimateError, estimate_memory
from layerscope.estimate.settings import (
    OPTIMIZERS,
    PRECISIONS,
    block_linear_names,
    lora_config,
    lora_rank,
    resolve_optimizer,
    resolve_precision,
)
from layerscope.estimate.time import estimate_step_time


def test_precisions_and_aliases():
    assert set(PRECISIONS) == {"32-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed"}
    assert resolve_precision("fp32").name == "32-true"
    assert resolve_precision("BF16").name == "bf16-true"
    assert resolve_precision("fp16").name == "16-true"
    mixed = resolve_precision("bf16-mixed")
    assert (mixed.weight_bytes, mixed.act_bytes, mixed.stream_bytes, mixed.autocast) == (4, 2, 4, True)
    with pytest.raises(EstimateError, match="unknown precision 'int4'; allowed: 32-true, bf16-true"):
        resolve_precision("int4")


def test_optimizers_and_aliases():
    assert OPTIMIZERS == ("adamw", "adamw-fused", "adam", "sgd", "sgd-momentum", "adamw-8bit", "adafactor")
    assert resolve_optimizer("fused_adamw") == "adamw-fused"
    assert resolve_optimizer("SGD_momentum") == "sgd-momentum"
    with pytest.raises(EstimateError, match="unknown optimizer 'lion'; allowed: adamw"):
        resolve_optimizer("lion")


def test_lora_from_a_rank_targets_every_block_linear():
    model = build("llama", "meta")
    assert block_linear_names(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    cfg = lora_config(model, 8)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.0)
    assert set(cfg.target_modules) == set(block_linear_names(model))
    given = LoraConfig(r=4, target_modules=["q_proj"])
    assert lora_config(model, given) is given and lora_rank(given) == 4 and lora_rank(None) is None
    for bad in (0, -2, True, "8", 2.0):
        with pytest.raises(EstimateError, match="lora must be a peft LoraConfig or a rank"):
            lora_rank(bad)


def test_both_estimators_take_a_rank_or_a_config():
    model = build("llama", "meta")
    by_rank = estimate_memory(model, lora=4, batch_size=1, seq_len=16)
    by_config = estimate_memory(model, lora=lora_config(model, 4), batch_size=1, seq_len=16)
    assert by_rank.peak_bytes == by_config.peak_bytes
    # adapters on 7 Linears of 4 blocks: r * (in + out) each
    per_block = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))
    assert by_rank.trainable_params == 4 * per_block
    t_rank = estimate_step_time(model, lora=4, batch_size=1, seq_len=16)
    t_config = estimate_step_time(model, lora=LoraConfig(r=4), batch_size=1, seq_len=16)
    assert t_rank.seconds == t_config.seconds


def test_time_takes_every_precision_and_optimizer():
    model = build("llama", "meta")
    for precision in PRECISIONS:
        assert estimate_step_time(model, precision=precision, seq_len=16).seconds > 0
    base = estimate_step_time(model, seq_len=16, optimizer="adamw").optimizer.bytes
    assert estimate_step_time(model, seq_len=16, optimizer="adamw-8bit").optimizer.bytes < base
