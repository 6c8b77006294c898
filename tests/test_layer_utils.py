import math
import warnings

import pytest
import torch
from conftest import PlainNet, build, flags

import layerscope as ls
from layerscope import LayerscopeWarning, ModelTypeError, StructureError, scan

# Per-block sizes by hand (see test_scan.py): gpt2 49,984; llama 36,992;
# mixtral 2*32*32 + 2*16*32 + router 4*32 + experts 4*(96*32 + 32*48) + norms 2*32 = 21,696.
BLOCK = {"gpt2": 49_984, "llama": 36_992, "mixtral": 21_696}
EMBED = {"gpt2": 100 * 64 + 32 * 64, "llama": 100 * 64, "mixtral": 50 * 32}
HEAD = {"gpt2": 128, "llama": 64 + 100 * 64, "mixtral": 32 + 50 * 32}  # gpt2: ln_f (head tied)
LAYERS = {"gpt2": 4, "llama": 4, "mixtral": 2}


def total(kind):
    return LAYERS[kind] * BLOCK[kind] + EMBED[kind] + HEAD[kind]


@pytest.fixture
def model(hf_kind, device):
    return build(hf_kind, device)


def quiet(func, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerscopeWarning)
        return func(*args, **kwargs)


def test_counts_and_percentages(model, hf_kind):
    assert ls.get_num_layers(model) == LAYERS[hf_kind]
    assert ls.get_trainable_params(model) == total(hf_kind)
    assert ls.get_frozen_percentage(model) == 0.0
    assert ls.freeze_model(model) == total(hf_kind)
    assert ls.get_trainable_params(model) == 0
    assert ls.get_frozen_percentage(model) == 100.0
    assert ls.unfreeze_model(model) == total(hf_kind)
    assert all(flags(model).values())


def test_freeze_first_and_last(model, hf_kind):
    assert ls.freeze_first_n_layers(model, 1) == BLOCK[hf_kind]
    assert ls.freeze_last_n_layers(model, 1) == BLOCK[hf_kind]
    assert ls.get_trainable_params(model) == total(hf_kind) - 2 * BLOCK[hf_kind]
    assert math.isclose(ls.get_frozen_percentage(model), 100 * 2 * BLOCK[hf_kind] / total(hf_kind))
    s = scan(model)
    assert not any(s.by_name[n].requires_grad for n in s.block_names(0))
    assert all(s.by_name[n].requires_grad for n in s.block_names(1) if LAYERS[hf_kind] > 2)


def test_freeze_except_last_n(model, hf_kind):
    covered = quiet(ls.freeze_except_last_n, model, 1)
    trainable = BLOCK[hf_kind] + HEAD[hf_kind] + (100 * 64 if hf_kind == "gpt2" else 0)
    assert ls.get_trainable_params(model) == trainable
    assert covered == total(hf_kind) - trainable


def test_tied_head_warnings():
    model = build("gpt2", "meta")
    with pytest.warns(LayerscopeWarning, match="stays trainable"):
        ls.freeze_except_last_n(model, 2)
    assert model.lm_head.weight.requires_grad
    with pytest.warns(LayerscopeWarning, match="freezes the head too"):
        assert ls.freeze_embeddings(model) == EMBED["gpt2"]
    assert not model.lm_head.weight.requires_grad


def test_freeze_embeddings_untied(model, hf_kind):
    assert quiet(ls.freeze_embeddings, model) == EMBED[hf_kind]
    assert ls.get_trainable_params(model) == total(hf_kind) - EMBED[hf_kind]


def test_freeze_by_name():
    model = build("llama", "cpu")
    q = 4 * 64 * 64
    assert ls.freeze_by_name(model, r"q_proj") == q
    assert ls.freeze_by_name(model, ["Q_PROJ", "K_PROJ"], case_sensitive=False) == q + 4 * 32 * 64
    with pytest.warns(LayerscopeWarning, match="'nothing' matches no parameter"):
        ls.freeze_by_name(model, ["v_proj", "nothing"])
    before = flags(model)
    with pytest.raises(ValueError, match="invalid regular expression '\\['"):
        ls.freeze_by_name(model, ["o_proj", "["])
    with pytest.raises(ValueError, match="no parameter name matches"):
        ls.freeze_by_name(model, ["nothing", "nada"])
    assert flags(model) == before  # failed calls change nothing


def test_setup_lp_lora_style(model, hf_kind):
    n = int(LAYERS[hf_kind] * 0.5)
    expected = n * BLOCK[hf_kind] + EMBED[hf_kind]
    assert quiet(ls.setup_lp_lora_style, model) == expected
    frozen = quiet(ls.setup_lp_lora_style, build(hf_kind, "meta"), 1.0, False)
    assert frozen == LAYERS[hf_kind] * BLOCK[hf_kind]
    with pytest.raises(ValueError, match=r"freeze_ratio=1.5 is outside the allowed \[0, 1\]"):
        ls.setup_lp_lora_style(model, 1.5)


def test_bad_inputs_change_nothing():
    model = build("llama", "meta")
    before = flags(model)
    for func in (ls.freeze_first_n_layers, ls.freeze_last_n_layers, ls.freeze_except_last_n):
        with pytest.raises(ValueError, match="the model has 4 layers"):
            func(model, 5)
        with pytest.raises(ValueError, match="negative"):
            func(model, -1)
    for func in (ls.freeze_model, ls.unfreeze_model, ls.get_num_layers, ls.get_trainable_params,
                 ls.get_frozen_percentage, ls.print_layer_status, ls.get_layer_names,
                 ls.get_memory_savings_estimate, ls.print_model_summary, ls.freeze_embeddings):
        with pytest.raises(ModelTypeError, match=func.__name__):
            func([1, 2])
    with pytest.raises(TypeError):
        ls.freeze_first_n_layers("model", 1)
    assert flags(model) == before


def test_plain_module():
    model = PlainNet()
    assert ls.get_num_layers(model) == 3
    block = 8 * 8 + 8 + 2 * 8
    assert ls.freeze_first_n_layers(model, 2) == 2 * block
    assert ls.freeze_embeddings(model) == 10 * 8
    assert ls.get_layer_names(model) == [
        "embed", "blocks.0.fc", "blocks.0.norm", "blocks.1.fc", "blocks.1.norm",
        "blocks.2.fc", "blocks.2.norm", "norm", "head",
    ]
    names = ls.get_layer_names(model, include_params=True)
    assert names[:3] == ["embed.weight", "blocks.0.fc.weight", "blocks.0.fc.bias"]
    empty = torch.nn.ReLU()
    assert ls.get_frozen_percentage(empty) == 0.0 and ls.get_trainable_params(empty) == 0
    with pytest.raises(StructureError, match="no block stack"):
        ls.get_num_layers(empty)


def test_layer_names_include_the_tied_head():
    names = ls.get_layer_names(build("gpt2", "meta"))
    assert names[:3] == ["transformer.wte", "transformer.wpe", "transformer.h.0.ln_1"]
    assert names[-2:] == ["transformer.ln_f", "lm_head"]


def test_weights_are_byte_identical_after_every_call():
    model = build("gpt2", "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quiet(ls.freeze_first_n_layers, model, 2)
    quiet(ls.freeze_except_last_n, model, 1)
    quiet(ls.freeze_embeddings, model)
    quiet(ls.freeze_by_name, model, "attn")
    quiet(ls.setup_lp_lora_style, model)
    ls.unfreeze_model(model)
    ls.freeze_model(model)
    quiet(ls.GradualUnfreezer(model, 3, verbose=False).step, 1)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_memory_savings_from_frozen_dtypes():
    model = build("llama", "meta").to(torch.bfloat16)
    ls.freeze_first_n_layers(model, 2)
    out = ls.get_memory_savings_estimate(model, seq_len=32)
    # two llama blocks, bf16, each tensor in 512-byte allocator blocks: q, o 64x64; k, v 32x64;
    # gate, up 128x64; down 64x128; two norms of 64
    def block(b):
        return sum(-(-n * b // 512) * 512 for n in [4096, 2048, 2048, 4096, 8192, 8192, 8192, 64, 64])

    assert out["gradient_saved_bytes"] == 2 * block(2)
    assert out["optimizer_saved_bytes"] == 2 * 2 * block(2)  # AdamW: two moments
    assert out["gradient_saved_gb"] == 2 * block(2) / 2**30
    assert out["frozen_params"] == 2 * 36_992
    sgd = ls.get_memory_savings_estimate(model, seq_len=32, optimizer="sgd")
    assert sgd["optimizer_saved_bytes"] == 0


def test_estimate_training_time_reference_example(model):
    out = ls.estimate_training_time(model, num_samples=50000, batch_size=16, num_epochs=3)
    assert out["total_steps"] == 9375 and out["formatted"] == "1h 18m 7s"
    assert out["total_seconds"] == 9375 * 0.5
    assert ls.estimate_training_time(model, 10, 3, 2, ms_per_step=1000)["total_steps"] == 8
    for kwargs in ({"batch_size": 0}, {"batch_size": -4}, {"num_samples": -1}, {"num_epochs": -1},
                   {"ms_per_step": -5.0}, {"ms_per_step": float("nan")}):
        args = {"num_samples": 100, "batch_size": 4, "num_epochs": 1, **kwargs}
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            ls.estimate_training_time(model, **args)


def test_every_function_on_a_plain_module(capsys):
    model = PlainNet()
    block, embed, head = 8 * 8 + 8 + 2 * 8, 10 * 8, 2 * 8 + 8 * 10 + 10
    total = 3 * block + embed + head
    assert ls.freeze_model(model) == total and ls.unfreeze_model(model) == total
    assert ls.freeze_last_n_layers(model, 1) == block
    assert ls.freeze_except_last_n(model, 2) == block + embed
    assert ls.get_trainable_params(model) == block + head
    assert ls.setup_lp_lora_style(model, 1 / 3) == block + embed
    assert ls.freeze_by_name(model, r"\.fc\.") == 3 * (8 * 8 + 8)
    # only block 1's norm and the head still train: 11 frozen fp32 tensors (the embedding; fc
    # weight and bias of every block; norm weight and bias of blocks 0 and 2), each under 512
    # bytes, so one 512-byte CUDA allocator block each
    assert ls.get_memory_savings_estimate(model)["gradient_saved_bytes"] == 11 * 512
    ls.print_layer_status(model)
    ls.print_model_summary(model, max_depth=1)
    out = capsys.readouterr().out
    assert "Layer 0: FROZEN" in out and "Layer 1: PARTIAL" in out and "Layer 2: FROZEN" in out
    assert "║  blocks " in out  # depth 1 of the summary
    ls.GradualUnfreezer(model, 2, verbose=False).step(0)
    assert ls.get_trainable_params(model) == head
    assert ls.estimate_training_time(model, 8, 4, 1)["total_steps"] == 2


def test_memory_savings_include_the_step_estimate():
    """Freezing the first blocks (and the embeddings) saves activations; the last, less."""
    first, last = build("llama", "meta"), build("llama", "meta")
    ls.freeze_first_n_layers(first, 2)
    ls.freeze_embeddings(first)
    ls.freeze_last_n_layers(last, 2)
    ls.freeze_embeddings(last)
    a = ls.get_memory_savings_estimate(first, batch_size=2, seq_len=32)
    b = ls.get_memory_savings_estimate(last, batch_size=2, seq_len=32)
    # fp32: two blocks' weights (multiples of 512 bytes) plus their 4 norms (256 bytes each,
    # one 512-byte allocator block) and the 100 x 64 embedding
    grads = 4 * (2 * 36_864 + 6_400) + 4 * 512
    assert a["gradient_saved_bytes"] == b["gradient_saved_bytes"] == grads
    assert a["activation_saved_bytes"] > b["activation_saved_bytes"] >= 0
    assert a["planned_peak_bytes"] < a["baseline_peak_bytes"] == b["baseline_peak_bytes"]
    assert a["estimate_settings"]["precision"] == "32-true"  # the model's fp32 weights


def test_memory_savings_of_a_model_the_estimator_cannot_step():
    out = ls.get_memory_savings_estimate(PlainNet())
    assert out["peak_saved_bytes"] is None and "vocab_size" in out["estimate_note"]
    assert out["gradient_saved_bytes"] == 0


def test_training_time_of_a_strategy_without_a_count_runs_on_one_node():
    # distributed= without num_gpus is one node (gpus_per_node, 8): 8 GPUs share the samples
    from layerscope import estimate_training_time

    model = build("llama", "meta")
    kw = dict(num_samples=800, batch_size=1, num_epochs=1, gpu="h100", distributed="zero3")
    implied = estimate_training_time(model, **kw)
    stated = estimate_training_time(model, num_gpus=8, **kw)
    assert implied["num_gpus"] == stated["num_gpus"] == 8
    assert implied["total_steps"] == stated["total_steps"] == 800 // (1 * 8)
    assert implied["total_seconds"] == stated["total_seconds"]
