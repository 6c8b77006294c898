"""The built-in presets: names, data files, and each preset built with its published total."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from torch import nn

from layerscope.build import empty_model
from layerscope.catalog import Preset, find_preset, get_preset, presets
from layerscope.errors import ConfigError

# Published parameter totals, written here from the sources named (not from layerscope's
# output). "card" is the safetensors total the Hub shows for the repository.
PUBLISHED = {
    "gpt2": 124_439_808,  # openai-community/gpt2; OpenAI's "124M"
    "llama-2-7b": 6_738_415_616,  # meta-llama/Llama-2-7b-hf, card
    "llama-2-13b": 13_015_864_320,  # meta-llama/Llama-2-13b-hf, card
    "llama-2-70b": 68_976_648_192,  # meta-llama/Llama-2-70b-hf, card
    "llama-3-8b": 8_030_261_248,  # meta-llama/Meta-Llama-3-8B, card
    "llama-3-70b": 70_553_706_496,  # meta-llama/Meta-Llama-3-70B, card
    "llama-3.1-8b": 8_030_261_248,  # meta-llama/Llama-3.1-8B, card
    "llama-3.1-70b": 70_553_706_496,  # meta-llama/Llama-3.1-70B, card
    "llama-3.1-405b": 405_853_388_800,  # meta-llama/Llama-3.1-405B, card
    "llama-3.2-1b": 1_235_814_400,  # meta-llama/Llama-3.2-1B, card
    "llama-3.2-3b": 3_212_749_824,  # meta-llama/Llama-3.2-3B, card
    "mistral-7b": 7_248_023_552,  # mistralai/Mistral-7B-v0.3, card
    "mistral-7b-v0.1": 7_241_732_096,  # mistralai/Mistral-7B-v0.1, card
    "mixtral-8x7b": 46_702_792_704,  # mistralai/Mixtral-8x7B-v0.1, card
    "mixtral-8x22b": 140_620_634_112,  # mistralai/Mixtral-8x22B-v0.1, card
    "qwen2.5-0.5b": 494_032_768,  # Qwen/Qwen2.5-0.5B, card
    "qwen2.5-1.5b": 1_543_714_304,  # Qwen/Qwen2.5-1.5B, card
    "qwen2.5-3b": 3_085_938_688,  # Qwen/Qwen2.5-3B, card
    "qwen2.5-7b": 7_615_616_512,  # Qwen/Qwen2.5-7B, card
    "qwen2.5-14b": 14_770_033_664,  # Qwen/Qwen2.5-14B, card
    "qwen2.5-32b": 32_763_876_352,  # Qwen/Qwen2.5-32B, card
    "qwen2.5-72b": 72_706_203_648,  # Qwen/Qwen2.5-72B, card
    "qwen3-8b": 8_190_735_360,  # Qwen/Qwen3-8B, card
    "qwen3-30b-a3b": 30_532_122_624,  # Qwen/Qwen3-30B-A3B, card
    "gemma-2-2b": 2_614_341_888,  # google/gemma-2-2b, card
    "gemma-2-9b": 9_241_705_984,  # google/gemma-2-9b, card
    "gemma-2-27b": 27_227_128_320,  # google/gemma-2-27b, card
    "phi-3-mini": 3_821_079_552,  # microsoft/Phi-3-mini-4k-instruct, card
    "deepseek-v2-lite": 15_706_484_224,  # deepseek-ai/DeepSeek-V2-Lite, card
    "llava-1.5-7b": 7_063_427_072,  # llava-hf/llava-1.5-7b-hf, card
    "t5-base": 222_903_552,  # google-t5/t5-base; card "223M", exact sum below
    "bert-base-uncased": 109_514_298,  # published only as "110M"; BertForMaskedLM sum below
    # Added for the published-measurements benchmark (benchmarks/published.py); exact sums below
    # where the publisher gives only a rounded figure (named next to each).
    "qwen2-7b": 7_615_616_512,  # Qwen/Qwen2-7B, card 7.62B; the shapes of Qwen2.5-7B
    "gemma-7b": 8_537_680_896,  # google/gemma-7b, card "8.54B"; sum below
    "codellama-34b": 33_743_970_304,  # codellama/CodeLlama-34b-hf, card "33.7B"; sum below
    "bert-large-uncased": 335_174_458,  # card "336M" (with pooler and NSP head); MLM sum below
    "t0-3b": 2_849_757_184,  # bigscience/T0_3B, "3B"; sum below (head untied)
    "mt0-xxl": 12_921_057_280,  # bigscience/mt0-xxl, "13B"; sum below (head untied)
    "bloomz-7b1": 7_069_016_064,  # bigscience/bloom-7b1 card: 7,069,016,064 parameters
    "qwen-1.8b": 1_836_828_672,  # Qwen/Qwen-1_8B, "1.8B" (card 1.84B); sum below
    "qwen-7b": 7_721_324_544,  # Qwen/Qwen-7B, "7B" (card 7.72B); sum below
    "qwen-14b": 14_167_290_880,  # Qwen/Qwen-14B, "14B" (card 14.2B); sum below
    "qwen-72b": 72_287_920_128,  # Qwen/Qwen-72B, "72B" (card 72.3B); sum below
}

# transformers 5.x always ties T5's lm_head to the shared embedding (configuration_t5.py), so
# a T5 v1.1 skeleton holds one vocab x d_model matrix fewer than the published checkpoint.
FORCED_TIE = {"t0-3b": 32128 * 2048, "mt0-xxl": 250112 * 4096}

# The list: every one of these must exist.
REQUIRED = [
    "gpt2", "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3.1-8b", "llama-3.1-70b",
    "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b", "mistral-7b", "mixtral-8x7b",
    "mixtral-8x22b", "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-72b", "gemma-2-2b", "gemma-2-9b",
    "gemma-2-27b", "phi-3-mini",
]  # fmt: skip

# Presets whose output embedding is the input embedding (tie_word_embeddings).
TIED = {
    "gpt2", "llama-3.2-1b", "llama-3.2-3b", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b",
    "gemma-2-2b", "gemma-2-9b", "gemma-2-27b", "t5-base", "bert-base-uncased",
    "gemma-7b", "bert-large-uncased", "bloomz-7b1", "t0-3b", "mt0-xxl",
}  # fmt: skip


def unique_numel(model: nn.Module) -> int:
    """Parameters counted once per tensor object (ties by identity)."""
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(p.numel() for p in unique.values())


# --- hand arithmetic for a few totals, independent of transformers ---------------------------


def test_hand_arithmetic_gpt2() -> None:
    d, v, ctx, layers = 768, 50257, 1024, 12
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert v * d + ctx * d + layers * block + 2 * d == PUBLISHED["gpt2"]  # lm_head tied


def test_hand_arithmetic_llama_405b() -> None:
    d, ff, layers, v, kv_dim = 16384, 53248, 126, 128256, 8 * 128
    block = 2 * d * d + 2 * d * kv_dim + 3 * d * ff + 2 * d
    assert layers * block + 2 * v * d + d == PUBLISHED["llama-3.1-405b"]


def test_hand_arithmetic_t5_base() -> None:
    d, ff, layers, v, buckets, heads = 768, 3072, 12, 32128, 32, 12
    encoder = layers * (4 * d * d + 2 * d * ff + 2 * d) + buckets * heads + d
    decoder = layers * (8 * d * d + 2 * d * ff + 3 * d) + buckets * heads + d
    assert v * d + encoder + decoder == PUBLISHED["t5-base"]  # one shared embedding


def test_hand_arithmetic_bert_mlm() -> None:
    d, ff, layers, v = 768, 3072, 12, 30522
    embeddings = v * d + 512 * d + 2 * d + 2 * d
    block = 4 * (d * d + d) + 2 * d + (d * ff + ff) + (ff * d + d) + 2 * d
    mlm_head = (d * d + d) + 2 * d + v  # transform, LayerNorm, decoder bias; weight tied
    assert embeddings + layers * block + mlm_head == PUBLISHED["bert-base-uncased"]


def test_hand_arithmetic_gemma_7b() -> None:
    d, ff, layers, v, heads, head_dim = 3072, 24576, 28, 256000, 16, 256
    block = 4 * d * heads * head_dim + 3 * d * ff + 2 * d  # q, k, v, o (MHA); MLP; two norms
    assert v * d + layers * block + d == PUBLISHED["gemma-7b"]  # head tied
    assert round(PUBLISHED["gemma-7b"] / 1e9, 2) == 8.54


def test_hand_arithmetic_codellama_34b() -> None:
    d, ff, layers, v, kv_dim = 8192, 22016, 48, 32000, 8 * 128
    block = 2 * d * d + 2 * d * kv_dim + 3 * d * ff + 2 * d
    assert layers * block + 2 * v * d + d == PUBLISHED["codellama-34b"]
    assert round(PUBLISHED["codellama-34b"] / 1e9, 1) == 33.7


def test_hand_arithmetic_qwen2_7b() -> None:
    d, ff, layers, v, kv_dim = 3584, 18944, 28, 152064, 4 * 128
    block = (d * d + d) + 2 * (d * kv_dim + kv_dim) + d * d + 3 * d * ff + 2 * d  # q,k,v biased
    assert layers * block + 2 * v * d + d == PUBLISHED["qwen2-7b"]


@pytest.mark.parametrize(
    ("name", "d", "qwen1_intermediate", "layers", "vocab", "card"),
    [
        ("qwen-1.8b", 2048, 11008, 24, 151936, 1.84),
        ("qwen-7b", 4096, 22016, 32, 151936, 7.72),
        ("qwen-14b", 5120, 27392, 40, 152064, 14.17),
        ("qwen-72b", 8192, 49152, 80, 152064, 72.29),
    ],
)
def test_hand_arithmetic_qwen1(name: str, d: int, qwen1_intermediate: int, layers: int,
                               vocab: int, card: float) -> None:
    # Qwen-1's own modules (modeling_qwen.py): c_attn d -> 3d with bias, c_proj d -> d, w1 and
    # w2 d -> intermediate/2, mlp.c_proj intermediate/2 -> d, ln_1 and ln_2; wte, ln_f, lm_head.
    ff = qwen1_intermediate // 2
    block = (d * 3 * d + 3 * d) + d * d + 2 * d * ff + ff * d + 2 * d
    total = layers * block + 2 * vocab * d + d
    assert total == PUBLISHED[name]
    assert round(total / 1e9, 2) == card
    config = get_preset(name).config()  # the Qwen2 equivalent keeps every shape
    assert config["intermediate_size"] == ff and config["num_key_value_heads"] == config[
        "num_attention_heads"]


def test_hand_arithmetic_bert_large_mlm() -> None:
    d, ff, layers, v = 1024, 4096, 24, 30522
    embeddings = v * d + 512 * d + 2 * d + 2 * d
    block = 4 * (d * d + d) + 2 * d + (d * ff + ff) + (ff * d + d) + 2 * d
    mlm_head = (d * d + d) + 2 * d + v  # transform, LayerNorm, decoder bias; weight tied
    assert embeddings + layers * block + mlm_head == PUBLISHED["bert-large-uncased"]
    pooler_and_nsp = (d * d + d) + (2 * d + 2)
    assert round((PUBLISHED["bert-large-uncased"] + pooler_and_nsp) / 1e6) == 336  # the card


@pytest.mark.parametrize(
    ("name", "d", "ff", "heads", "layers", "v"),
    [("t0-3b", 2048, 5120, 32, 24, 32128), ("mt0-xxl", 4096, 10240, 64, 24, 250112)],
)
def test_hand_arithmetic_t5_v1_1(name: str, d: int, ff: int, heads: int, layers: int,
                                 v: int) -> None:
    attention = 4 * d * (heads * 64)  # q, k, v, o with d_kv = 64
    gated_ff = 2 * d * ff + ff * d  # wi_0, wi_1, wo
    encoder = layers * (attention + gated_ff + 2 * d) + 32 * heads + d  # + relative bias, norm
    decoder = layers * (2 * attention + gated_ff + 3 * d) + 32 * heads + d
    assert 2 * v * d + encoder + decoder == PUBLISHED[name]  # shared embedding + untied head
    assert FORCED_TIE[name] == v * d


def test_hand_arithmetic_bloom_7b1() -> None:
    d, layers, v = 4096, 30, 250880
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert v * d + 2 * d + layers * block + 2 * d == PUBLISHED["bloomz-7b1"]  # head tied


# --- the catalog itself ----------------------------------------------------------------------


def test_presets_lists_every_data_file_sorted() -> None:
    names = presets()
    assert names == sorted(names)
    files = resources.files("layerscope.catalog").joinpath("presets").iterdir()
    assert sorted(f.name[:-5] for f in files if f.name.endswith(".json")) == names
    assert set(REQUIRED) <= set(names)
    assert set(names) == set(PUBLISHED), "every preset needs its published total in this test"


@pytest.mark.parametrize("name", presets())
def test_preset_file_records_its_source(name: str) -> None:
    path = resources.files("layerscope.catalog").joinpath("presets").joinpath(f"{name}.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["name"] == name
    assert data["source"]["file"] == "config.json"
    assert "/" in data["source"]["repo"] and data["source"]["note"]
    assert data["params_note"]
    config = data["config"]
    assert config["model_type"] and config["architectures"]
    published = data["published_params"]
    assert published is None or published == PUBLISHED[name]


@pytest.mark.parametrize("name", presets())
def test_preset_builds_with_published_total_and_ties(name: str) -> None:
    model = empty_model(name)
    assert unique_numel(model) == PUBLISHED[name] - FORCED_TIE.get(name, 0)
    assert all(p.is_meta for p in model.parameters())
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    assert out is not None, "the head must be built (lm_head), not only the base model"
    if name in TIED:
        assert out.weight is inp.weight
    else:
        assert out.weight is not inp.weight


@pytest.mark.parametrize("name", [n for n in REQUIRED if n != "gpt2"])
def test_causal_presets_are_for_causal_lm(name: str) -> None:
    model = empty_model(name)
    assert type(model).__name__.endswith("ForCausalLM")
    assert model.get_output_embeddings() is model.lm_head


def test_t5_shares_one_embedding_four_ways() -> None:
    model = empty_model("t5-base")
    shared = model.shared.weight
    assert model.encoder.embed_tokens.weight is shared
    assert model.decoder.embed_tokens.weight is shared
    assert model.lm_head.weight is shared


def test_vision_language_preset_has_tower_projector_and_head() -> None:
    model = empty_model("llava-1.5-7b")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    names = {name for name, _ in model.named_modules()}
    assert any("vision_tower" in n for n in names)
    assert any("multi_modal_projector" in n for n in names)
    assert model.lm_head.weight.shape == (32064, 4096)


def test_moe_presets_hold_every_expert() -> None:
    # Mixtral-8x7B: 8 experts x 3 matrices of 4096 x 14336 per layer, 32 layers.
    model = empty_model("mixtral-8x7b")
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert experts == 32 * 8 * 3 * 4096 * 14336


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("llama-3.1-8b", torch.bfloat16),  # "torch_dtype": "bfloat16"
        ("llama-2-7b", torch.float16),  # "torch_dtype": "float16"
        ("gemma-2-2b", torch.float32),  # the base checkpoint is float32
        ("gpt2", torch.float32),  # records none
    ],
)
def test_preset_dtype_is_the_config_dtype(name: str, dtype: torch.dtype) -> None:
    assert {p.dtype for p in empty_model(name).parameters()} == {dtype}


# --- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("llama-3.1-8b", "llama-3.1-8b"),
        ("Llama-3.1-8B", "llama-3.1-8b"),
        ("LLAMA_3.1_8B", "llama-3.1-8b"),
        (" llama 3.1 8b ", "llama-3.1-8b"),
        ("meta-llama/Llama-3.1-8B", "llama-3.1-8b"),
        ("meta-llama/Meta-Llama-3.1-8B", "llama-3.1-8b"),
        ("Meta-Llama-3.1-8B", "llama-3.1-8b"),
        ("meta-llama/Llama-2-7b-hf", "llama-2-7b"),
        ("Qwen/Qwen2.5-7B", "qwen2.5-7b"),
        ("qwen2_5_7b", "qwen2.5-7b"),
        ("mistralai/Mistral-7B-v0.3", "mistral-7b"),
        ("Mistral-7B-v0.1", "mistral-7b-v0.1"),
        ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini"),
        ("openai-community/gpt2", "gpt2"),
    ],
)
def test_spelling_variants_find_the_preset(spelling: str, name: str) -> None:
    preset = get_preset(spelling)
    assert isinstance(preset, Preset)
    assert preset.name == name


def test_instruct_repo_is_not_silently_the_base_preset() -> None:
    assert find_preset("meta-llama/Llama-3.1-8B-Instruct") is None


def test_unknown_preset_suggests_close_names() -> None:
    with pytest.raises(ConfigError, match=r"'llama-3.1-7b' is not a built-in preset") as info:
        get_preset("llama-3.1-7b")
    assert "'llama-3.1-8b'" in str(info.value) and "'llama-3.1-70b'" in str(info.value)
    with pytest.raises(ConfigError, match="phi-3-mini"):
        get_preset("phi3")
    assert isinstance(info.value, ValueError)


def test_preset_config_is_a_fresh_copy() -> None:
    preset = get_preset("gpt2")
    preset.config()["n_layer"] = 1
    assert preset.config()["n_layer"] == 12
    assert preset.repo == "openai-community/gpt2"
