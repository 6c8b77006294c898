import dataclasses

import pytest
import torch
from conftest import PlainNet, build
from torch import nn

from layerscope import ModelTypeError, StructureError, scan

# Tiny GPT-2 (n_embd 64, 4 blocks, vocab 100, 32 positions), by hand:
#   block = ln_1 2*64 + c_attn 64*192+192 + c_proj 64*64+64 + ln_2 2*64
#           + c_fc 64*256+256 + mlp c_proj 256*64+64 = 49,984
#   wte 100*64 = 6,400 (tied with lm_head), wpe 32*64 = 2,048, ln_f 2*64 = 128
GPT2_BLOCK = 128 + 64 * 192 + 192 + 64 * 64 + 64 + 128 + 64 * 256 + 256 + 256 * 64 + 64
GPT2_TOTAL = 4 * GPT2_BLOCK + 100 * 64 + 32 * 64 + 128
# Tiny Llama (hidden 64, inter 128, 4 heads of 16, 2 kv heads): q,o 64*64; k,v 32*64;
#   gate, up, down 128*64; two norms 64 -> 36,992 per block; embed and lm_head 100*64; norm 64.
LLAMA_BLOCK = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64 + 2 * 64
LLAMA_TOTAL = 4 * LLAMA_BLOCK + 2 * 100 * 64 + 64


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_gpt2_totals_count_the_tied_tensor_once(device):
    s = scan(build("gpt2", device))
    assert GPT2_BLOCK == 49_984
    assert s.total_params == GPT2_TOTAL
    assert s.tie_groups == (("transformer.wte.weight", "lm_head.weight"),)
    assert s.aliases("lm_head.weight") == ("transformer.wte.weight", "lm_head.weight")
    assert s.numel({"lm_head.weight", "transformer.wte.weight"}) == 6_400


def test_gpt2_parts():
    s = scan(build("gpt2", "meta"))
    assert s.layers.path == "transformer.h" and len(s.layers) == 4
    assert s.layers.block_type == "GPT2Block"
    assert s.embedding_names == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert s.head_names == {"lm_head.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    assert s.role("transformer.h.2.attn.c_attn.bias") == "block"
    assert s.block_of("transformer.h.2.attn.c_attn.bias") == (0, 2)
    assert len(s.block_names(3)) == 12


def test_llama_untied_totals_and_parts():
    s = scan(build("llama", "meta"))
    assert s.total_params == LLAMA_TOTAL
    assert s.tie_groups == ()
    assert s.head_names == {"model.norm.weight", "lm_head.weight"}
    assert s.embedding_names == {"model.embed_tokens.weight"}
    assert s.names_with_role("other") == ()


def test_moe_experts_stay_inside_their_block():
    s = scan(build("mixtral", "meta"))
    assert [st.path for st in s.stacks] == ["model.layers"]
    assert s.role("model.layers.1.mlp.experts.gate_up_proj") == "block"
    # experts: 4 x (96*32 + 32*48) per block; router 4*32
    assert s.numel(set(s.block_names(0))) == (
        2 * 32 * 32 + 2 * 16 * 32 + 4 * 32 + 4 * (96 * 32 + 32 * 48) + 2 * 32
    )


def test_composite_model_reports_each_stack():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=100),
    )
    with torch.device("meta"):
        s = scan(LlavaForConditionalGeneration(config))
    assert [(st.path, len(st)) for st in s.stacks] == [
        ("model.vision_tower.encoder.layers", 2), ("model.language_model.layers", 3)
    ]
    assert s.layers.path == "model.language_model.layers"  # the larger stack
    assert "lm_head.weight" in s.head_names
    assert s.role("model.multi_modal_projector.linear_1.weight") == "other"


def test_encoder_decoder_uses_the_larger_stack():
    from transformers import T5Config, T5ForConditionalGeneration

    with torch.device("meta"):
        s = scan(T5ForConditionalGeneration(T5Config(d_model=32, d_ff=32, num_layers=2,
                                                     num_heads=2, d_kv=16, vocab_size=50)))
    assert [st.path for st in s.stacks] == ["encoder.block", "decoder.block"]
    assert s.layers.path == "decoder.block"  # cross-attention makes it larger
    assert len(s.tie_groups[0]) == 4  # shared, encoder/decoder embed_tokens, lm_head


def test_plain_module_with_a_module_list():
    s = scan(PlainNet())
    assert s.layers.path == "blocks" and s.num_layers == 3
    assert s.embedding_names == {"embed.weight"}
    assert s.head_names == {"norm.weight", "norm.bias", "head.weight", "head.bias"}


def test_list_of_leaf_layers_is_a_fallback_stack():
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    assert scan(model).num_layers == 3


def test_no_block_stack_names_the_candidates():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    s = scan(model)  # scanning works; asking for layers explains why there are none
    assert s.total_params == 3 * 3 + 3 + 3 * 2 + 2
    with pytest.raises(StructureError, match=r"no block stack.*0 \(Linear\), 1 \(ReLU\)"):
        s.layers
    mixed = nn.Module()
    mixed.parts = nn.ModuleList([nn.Linear(2, 2), nn.LayerNorm(2)])
    with pytest.raises(StructureError, match=r"parts \(2 x LayerNorm/Linear\)"):
        scan(mixed).num_layers


def test_scan_is_immutable_and_records_flags():
    model = build("llama", "meta")
    model.lm_head.weight.requires_grad_(False)
    s = scan(model)
    assert s.by_name["lm_head.weight"].requires_grad is False
    assert s.frozen_params == 100 * 64
    assert s.by_name["lm_head.weight"].dtype == torch.float32
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.primary = 1  # type: ignore[misc]


def test_non_module_is_a_type_error():
    with pytest.raises(ModelTypeError, match="expected a torch.nn.Module, got str"):
        scan("gpt2")
    with pytest.raises(TypeError):
        scan(None)
