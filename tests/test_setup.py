"""layerscope.setup: the one description of a run, and every estimator taking it alike."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from conftest import build
from peft import LoraConfig

from layerscope import (
    EstimateError,
    FreezePlan,
    TrainingSetup,
    estimate_memory,
    estimate_memory_savings,
    estimate_step_time,
    estimate_training_time,
    estimate_unfreezing_schedule,
    get_memory_savings_estimate,
    max_batch_size,
)
from layerscope.setup import (
    ATTENTION_IMPLEMENTATIONS,
    OPTIMIZERS,
    PRECISIONS,
    SETTINGS,
    Lora,
    block_linear_names,
    make_setup,
    resolve_optimizer,
    resolve_precision,
)

LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


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
    assert OPTIMIZERS == ("adamw", "adamw-fused", "adam", "sgd", "sgd-momentum", "adamw-8bit", "adafactor",
                          "paged-adamw-8bit", "paged-adamw-32bit", "adamw-hf")
    assert resolve_optimizer("fused_adamw") == "adamw-fused"
    assert resolve_optimizer("adamw_hf") == "adamw-hf"  # the Trainer's optim name
    assert resolve_optimizer("paged_adamw_8bit") == "paged-adamw-8bit"  # transformers' optim name
    assert resolve_optimizer("paged_adamw_32bit") == "paged-adamw-32bit"
    assert resolve_optimizer("SGD_momentum") == "sgd-momentum"
    with pytest.raises(EstimateError, match="unknown optimizer 'lion'; allowed: adamw"):
        resolve_optimizer("lion")


def test_lora_from_a_rank_targets_every_block_linear():
    model = build("llama", "meta")
    assert block_linear_names(model) == LINEARS
    lora = Lora.of(8, model)
    cfg = lora.peft_config()
    assert (lora.rank, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.0)
    # 7 Linears in each of 4 blocks, by their full names
    assert len(lora.targets) == 4 * 7
    assert "model.layers.3.mlp.down_proj" in lora.targets
    for bad in (0, -2, True, "8", 2.0):
        with pytest.raises(EstimateError, match="lora must be a peft LoraConfig or a rank"):
            Lora.of(bad, model)


def test_lora_config_targets_as_peft_matches_them():
    model = build("llama", "meta")
    qv = Lora.of(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), model)
    assert qv.targets == {f"model.layers.{i}.self_attn.{m}" for i in range(4) for m in ("q_proj", "v_proj")}
    # None: peft's default targets for the architecture (q_proj, v_proj for llama)
    assert Lora.of(LoraConfig(r=4), model).targets == qv.targets
    # all-linear: every Linear but the output head
    every = Lora.of(LoraConfig(r=4, target_modules="all-linear"), model)
    assert every.targets == Lora.of(4, model).targets
    assert "lm_head" not in every.targets
    # layers_to_transform narrows to some blocks
    two = Lora.of(LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0, 1]), model)
    assert two.targets == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    with pytest.raises(EstimateError, match="nothing_here"):
        Lora.of(LoraConfig(r=4, target_modules=["nothing_here"]), model)


def test_a_rank_and_the_same_config_give_the_same_estimates():
    model = build("llama", "meta")
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LINEARS)
    by_rank = estimate_memory(model, lora=4, batch_size=1, seq_len=16)
    by_config = estimate_memory(model, lora=config, batch_size=1, seq_len=16)
    assert by_rank.peak_bytes == by_config.peak_bytes
    # adapters on 7 Linears of 4 blocks: r * (in + out) each
    per_block = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))
    assert by_rank.trainable_params == 4 * per_block
    t_rank = estimate_step_time(model, lora=4, batch_size=1, seq_len=16)
    t_config = estimate_step_time(model, lora=config, batch_size=1, seq_len=16)
    assert t_rank.seconds == t_config.seconds
    assert t_rank.trainable_params == by_rank.trainable_params


def test_lora_target_modules_change_the_step_time():
    model = build("llama", "meta")
    qv = LoraConfig(r=16, target_modules=["q_proj", "v_proj"])
    few = estimate_step_time(model, lora=qv, batch_size=4, seq_len=64)
    every = estimate_step_time(model, lora=16, batch_size=4, seq_len=64)
    assert few.trainable_params == 4 * 16 * ((64 + 64) + (64 + 32))
    assert few.trainable_params == estimate_memory(model, lora=qv, batch_size=4, seq_len=64).trainable_params
    assert few.forward.flops < every.forward.flops
    assert few.seconds < every.seconds


def test_time_takes_every_precision_and_optimizer():
    model = build("llama", "meta")
    for precision in PRECISIONS:
        assert estimate_step_time(model, precision=precision, seq_len=16).seconds > 0
    base = estimate_step_time(model, seq_len=16, optimizer="adamw").optimizer.bytes
    assert estimate_step_time(model, seq_len=16, optimizer="adamw-8bit").optimizer.bytes < base


def test_setup_is_validated_immutable_and_hashable():
    model = build("llama", "meta")
    a = TrainingSetup(model, FreezePlan.first(2), batch_size=2, seq_len=32, precision="bf16")
    assert a.precision == "bf16-true" and a.attn_implementation == "sdpa"
    b = TrainingSetup(model, FreezePlan.first(2), batch_size=2, seq_len=32, precision="bf16-true")
    assert a == b and hash(a) == hash(b)
    assert a.replace(batch_size=4) != a and a.replace(batch_size=4).batch_size == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.batch_size = 8  # type: ignore[misc]
    with pytest.raises(EstimateError, match=r"unknown setting\(s\) \['bach_size'\]"):
        a.replace(bach_size=4)
    with pytest.raises(EstimateError, match="plan must be a FreezePlan"):
        TrainingSetup(model, "first:2")  # type: ignore[arg-type]
    with pytest.raises(EstimateError, match="unknown attn_implementation 'flash'"):
        TrainingSetup(model, attn_implementation="flash")
    with pytest.raises(EstimateError, match="nothing is trainable"):
        TrainingSetup(model, FreezePlan.all(), seq_len=16)
    assert TrainingSetup(model, FreezePlan.all(), seq_len=16, inference=True).trainable == frozenset()
    # the plan's trainable names, every alias of a tied tensor included
    assert len(a.trainable) == len([n for n, _ in model.named_parameters()]) - 2 * 9
    assert a.to_dict() == {"batch_size": 2, "seq_len": 32, "precision": "bf16-true",
                           "optimizer": "adamw", "gradient_checkpointing": False,
                           "lora_rank": None, "attn_implementation": "sdpa",
                           "experts_implementation": None, "inference": False,
                           "distributed": None, "num_gpus": 1, "gpus_per_node": 8, "offload": None,
                           "quantization": None, "base_dtype": "bfloat16", "lora_dtype": None,
                           "prepare_kbit": False, "gradient_accumulation_steps": 1,
                           "target_len": None, "images": None, "image_size": None,
                           "audio_seconds": None}


def test_make_setup_takes_a_setup_and_replaces_what_is_given():
    model = build("llama", "meta")
    s = TrainingSetup(model, batch_size=2, seq_len=32)
    assert make_setup(s) is s
    assert make_setup(s, batch_size=4).batch_size == 4
    assert make_setup(s, FreezePlan.first(1)).plan == FreezePlan.first(1)
    assert estimate_memory(s) == estimate_memory(model, batch_size=2, seq_len=32)


def test_every_estimator_takes_the_same_settings():
    """One set of setting names, documented once (TrainingSetup), in every estimator: each takes
    them as ``**settings: Unpack[Settings]`` and passes them to the setup."""
    fields = {f.name for f in dataclasses.fields(TrainingSetup) if f.init} - {"model", "plan"}
    assert set(SETTINGS) == fields
    for func in (estimate_memory, estimate_memory_savings, estimate_step_time, max_batch_size,
                 estimate_training_time, get_memory_savings_estimate, estimate_unfreezing_schedule):
        params = inspect.signature(func).parameters
        assert params["settings"].kind == inspect.Parameter.VAR_KEYWORD, func
        assert params["settings"].annotation in ("Unpack[Settings]", "Unpack[StepSettings]"), func
        assert not set(params) & (fields - {"batch_size"}), func  # nothing named twice
    model = build("llama", "meta")
    for func in (estimate_memory, estimate_step_time, estimate_memory_savings):
        with pytest.raises(EstimateError, match=r"unknown setting\(s\) \['bach_size'\]"):
            func(model, bach_size=2)


def test_every_command_takes_the_same_settings():
    from layerscope.cli import build_parser

    parser = build_parser()
    flags = {"batch_size": "--batch-size", "seq_len": "--seq-len", "precision": "--precision",
             "optimizer": "--optimizer", "gradient_checkpointing": "--gradient-checkpointing",
             "lora": "--lora-rank", "attn_implementation": "--attn",
             "experts_implementation": "--experts",
             "gradient_accumulation_steps": "--gradient-accumulation-steps"}
    sub = next(a for a in parser._actions if a.dest == "command")
    for command in ("estimate", "time", "fit", "report"):
        options = {o for a in sub.choices[command]._actions for o in a.option_strings}
        wanted = set(flags.values()) - ({"--batch-size"} if command == "fit" else set())
        assert wanted <= options, (command, wanted - options)


def test_attention_is_a_setting_estimated_as_asked():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, vocab_size=100,
                                  max_position_embeddings=4096)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    b, s, heads = 2, 1024, 4
    step = {impl: estimate_memory(model, batch_size=b, seq_len=s, precision="bf16",
                                  attn_implementation=impl) for impl in ATTENTION_IMPLEMENTATIONS}
    assert step["sdpa"].attn_implementation == "sdpa"
    # eager keeps the bf16 softmax of every (batch, head) S x S score matrix for backward
    scores = b * heads * s * s * 2
    per_block = step["eager"].activation_bytes_per_block[1] - step["sdpa"].activation_bytes_per_block[1]
    assert per_block >= scores
    # flash-attn and flex keep no score matrix; they save one output copy fewer than sdpa
    for impl in ("flash_attention_2", "flex_attention"):
        assert step[impl].peak_bytes <= step["sdpa"].peak_bytes < step["eager"].peak_bytes
    # the model itself keeps what transformers picked
    assert model.config._attn_implementation == "sdpa"
    t_sdpa = estimate_step_time(model, batch_size=b, seq_len=s, precision="bf16")
    t_eager = estimate_step_time(model, batch_size=b, seq_len=s, precision="bf16",
                                 attn_implementation="eager")
    assert t_eager.seconds > t_sdpa.seconds


def test_each_distinct_setup_is_traced_once(monkeypatch):
    from layerscope.estimate import memory

    calls = []
    original = memory._trace_step
    monkeypatch.setattr(memory, "_trace_step", lambda s: calls.append(s) or original(s))
    model = build("llama", "meta")
    for optimizer in ("adamw", "sgd", "adamw-8bit"):
        estimate_memory(model, batch_size=2, seq_len=32, optimizer=optimizer)
    estimate_memory(model, batch_size=2, seq_len=32)
    assert len(calls) == 1  # the optimizer does not change the trace
    estimate_memory(model, batch_size=3, seq_len=32)
    assert len(calls) == 2
