"""Vision-language models whose image processors lay pixels out their own way (issue 15):
each built tiny from its config type (meta device), its step's inputs checked against
arithmetic written here, and estimated end to end where the trace can run it."""

from __future__ import annotations

import pytest

from layerscope import TrainingSetup, UnsupportedModelError, empty_model, estimate_memory
from layerscope.estimate.image_inputs import FLATTENED_PATCHES, TOKEN_BOX
from layerscope.estimate.memory import step_inputs_of

B = 2
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=512)
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def _model(model_type: str, architecture: str, **fields):
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type](**fields)
    config.architectures = [architecture]
    return empty_model(config)


def _tensors(inputs) -> dict:
    return {t.name: t for t in inputs.tensors}


def _placed(inputs, token: int) -> int:
    return int((_tensors(inputs)["input_ids"].value == token).sum())


def test_video_llama_3_images_are_unmerged_rows_with_their_merge_sizes():
    patch, side = 8, 32
    model = _model("video_llama_3", "VideoLlama3ForConditionalGeneration", image_token_id=299,
                   video_token_id=298, text_config={"model_type": "qwen2", **TEXT},
                   vision_config={**TOWER, "patch_size": patch})
    e = estimate_memory(model, batch_size=B, seq_len=64, image_size=side)
    # its processor leaves images unmerged: one token per 8 x 8 patch, (32 / 8)^2 = 16
    assert e.inputs.image_tokens == (side // patch) ** 2 == 16
    t = _tensors(e.inputs)
    assert t["pixel_values"].shape == (B * 16, 3 * patch * patch)  # no temporal repeat
    assert t["image_grid_thw"].value.tolist() == [[1, 4, 4]] * B
    assert t["image_merge_sizes"].value.tolist() == [1] * B
    assert _placed(e.inputs, 299) == B * 16


def test_paddleocr_vl_patches_are_unflattened():
    patch, merge, side = 14, 2, 56
    model = _model("paddleocr_vl", "PaddleOCRVLForConditionalGeneration",
                   text_config={**TEXT, "rope_parameters": {
                       "rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}},
                   vision_config={**TOWER, "patch_size": patch, "spatial_merge_size": merge})
    inputs = step_inputs_of(TrainingSetup(model, batch_size=B, seq_len=64, image_size=side))
    cells = side // patch  # 4 x 4 patches of 3 x 14 x 14, merged 2 x 2 into tokens
    assert _tensors(inputs)["pixel_values"].shape == (B * cells * cells, 3, patch, patch)
    assert inputs.image_tokens == cells * cells // merge**2 == 4


def test_inkling2_pixels_are_merged_cells_and_its_grid_counts_tokens():
    patch, merge, side = 8, 2, 64
    model = _model("inkling2", "Inkling2ForConditionalGeneration", image_token_id=299,
                   text_config={"hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 1, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300},
                   vision_config={**TOWER, "patch_size": patch, "spatial_merge_size": merge,
                                  "text_hidden_size": 64, "projection_hidden_dim": 64})
    e = estimate_memory(model, batch_size=B, seq_len=64, image_size=side)
    tokens = (side // (patch * merge)) ** 2  # 4 x 4 cells of 2 x 2 patches
    assert e.inputs.image_tokens == tokens == 16
    t = _tensors(e.inputs)
    assert t["pixel_values"].shape == (B * tokens, merge * patch, merge * patch, 3)
    assert t["image_grid_thw"].value.tolist() == [[1, 4, 4]] * B
    assert _placed(e.inputs, 299) == B * tokens


def test_nemotron_h_omni_grid_is_height_and_width_in_whole_shuffle_cells():
    patch, side = 16, 96  # 6 x 6 patches, pixel-shuffled by 0.5: 3 x 3 tokens
    model = _model("nemotron_h_omni", "NemotronH_Omni_Reasoning_V3", image_token_id=299,
                   downsample_ratio=0.5, vision_hidden_size=32, projector_hidden_size=64,
                   text_config={"hidden_size": 64, "intermediate_size": 128, "vocab_size": 300,
                                "num_hidden_layers": 2, "hybrid_override_pattern": "M*",
                                "num_attention_heads": 4, "num_key_value_heads": 2,
                                "head_dim": 16, "mamba_num_heads": 4, "mamba_head_dim": 16,
                                "ssm_state_size": 16, "n_groups": 1},
                   vision_config={"model_type": "radio", "hidden_size": 32,
                                  "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "patch_size": patch,
                                  "image_size": side, "video_temporal_patch_size": 2})
    inputs = step_inputs_of(TrainingSetup(model, batch_size=B, seq_len=64))
    t = _tensors(inputs)
    assert t["image_grid_hw"].value.tolist() == [[6, 6]] * B
    assert t["pixel_values"].shape == (B * 36, 3 * patch * patch)
    assert inputs.image_tokens == 36 // 4 == 9


def test_instructblip_places_its_query_tokens_and_reads_an_instruction():
    queries = 8
    fields = dict(num_query_tokens=queries,
                  text_config={"model_type": "opt", "hidden_size": 64, "ffn_dim": 128,
                               "num_hidden_layers": 1, "num_attention_heads": 4,
                               "vocab_size": 300, "word_embed_proj_dim": 64},
                  vision_config={**TOWER, "image_size": 32, "patch_size": 8},
                  qformer_config={**TOWER, "num_attention_heads": 2, "encoder_hidden_size": 32,
                                  "vocab_size": 100})
    model = _model("instructblip", "InstructBlipForConditionalGeneration",
                   image_token_index=299, **fields)
    e = estimate_memory(model, batch_size=B, seq_len=64)
    assert e.inputs.image_tokens == queries  # one token per Q-Former query
    assert _placed(e.inputs, 299) == B * queries
    assert _tensors(e.inputs)["qformer_input_ids"].shape[0] == B
    blip2 = _model("blip-2", "Blip2ForConditionalGeneration",
                   **{k: v for k, v in fields.items() if k != "qformer_config"})
    with pytest.raises(UnsupportedModelError, match="image_token_index is None"):
        estimate_memory(blip2, batch_size=B, seq_len=64)


def test_t5gemma2_reads_the_image_size_of_its_encoders_vision_config():
    side, patch, tokens = 64, 8, 16
    text = {k: v for k, v in TEXT.items() if k != "max_position_embeddings"}
    encoder = {"text_config": {**text, "sliding_window": 32},
               "vision_config": {**TOWER, "image_size": side, "patch_size": patch},
               "mm_tokens_per_image": tokens}
    model = _model("t5gemma2", "T5Gemma2ForConditionalGeneration", image_token_index=299,
                   encoder=encoder, decoder={**text, "sliding_window": 32})
    inputs = step_inputs_of(TrainingSetup(model, batch_size=B, seq_len=64))
    assert _tensors(inputs)["pixel_values"].shape == (B, 3, side, side)  # not 448 pixels
    assert inputs.image_tokens == tokens  # 8 x 8 patches pooled to 4 x 4


def test_pix2struct_encoder_reads_flattened_patches():
    model = _model("pix2struct", "Pix2StructForConditionalGeneration",
                   text_config={"hidden_size": 64, "d_ff": 128, "num_layers": 1,
                                "num_heads": 4, "d_kv": 16, "vocab_size": 300},
                   vision_config={"hidden_size": 64, "d_ff": 128, "num_hidden_layers": 1,
                                  "num_attention_heads": 4, "d_kv": 16,
                                  "patch_embed_hidden_size": 3 * 4 * 4})
    e = estimate_memory(model, batch_size=B, seq_len=16)
    t = _tensors(e.inputs)
    # the processor's 2048 rows of (row, column, 3 x 4 x 4 pixel values)
    assert t["flattened_patches"].shape == (B, FLATTENED_PATCHES, 2 + 48)
    assert t["attention_mask"].shape == (B, FLATTENED_PATCHES)
    assert t["labels"].shape == (B, 16) and e.inputs.target_len == 16


def test_udop_gets_a_box_per_token_and_is_traced_through_its_patch_mask():
    model = _model("udop", "UdopForConditionalGeneration", vocab_size=300, d_model=64, d_ff=128,
                   d_kv=16, num_heads=4, num_layers=1, num_decoder_layers=1, image_size=32,
                   patch_size=8)
    e = estimate_memory(model, batch_size=B, seq_len=16)
    box = _tensors(e.inputs)["bbox"]
    assert box.shape == (B, 16, 4)
    assert box.value[1, 15].tolist() == list(TOKEN_BOX)
    # its patch mask (full_like of the image embeddings, the boxes' patches cleared through a
    # tuple of 0-d indices, then a boolean mask) is followed from its known values
    assert e.peak_bytes > 0


def test_fuyu_reads_raw_patches_one_token_each():
    patch, side = 10, 40
    model = _model("fuyu", "FuyuForCausalLM", image_token_id=299, patch_size=patch,
                   image_size=side, text_config={"model_type": "persimmon", **TEXT})
    e = estimate_memory(model, batch_size=B, seq_len=64)
    # (40 / 10)^2 = 16 patches of 10 x 10 x 3 values, embedded linearly: 16 tokens
    assert _tensors(e.inputs)["pixel_values"].shape == (B, 16, patch * patch * 3)
    assert e.inputs.image_tokens == 16 and _placed(e.inputs, 299) == B * 16


def test_idefics_images_are_attended_through_a_mask_per_token():
    model = _model("idefics", "IdeficsForVisionText2Text", vocab_size=300, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   cross_layer_interval=1,
                   vision_config={"embed_dim": 32, "image_size": 32, "patch_size": 8,
                                  "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "intermediate_size": 64},
                   perceiver_config={"resampler_n_latents": 4, "resampler_depth": 1,
                                     "resampler_n_heads": 2, "resampler_head_dim": 16})
    e = estimate_memory(model, batch_size=B, seq_len=16, images=2)
    t = _tensors(e.inputs)
    assert t["pixel_values"].shape == (B, 2, 3, 32, 32)
    mask = t["image_attention_mask"].value
    # token 0 sees the first image, every later token the second (the last one before it)
    assert mask.shape == (B, 16, 2)
    assert mask[0, 0].tolist() == [1, 0] and mask[0, 1:].sum(0).tolist() == [0, 15]


def test_instructblip_video_places_query_tokens_per_frame():
    from layerscope.estimate.image_inputs import VIDEO_FRAMES

    queries = 4
    model = _model("instructblipvideo", "InstructBlipVideoForConditionalGeneration",
                   video_token_index=299, num_query_tokens=queries,
                   text_config={"model_type": "opt", "hidden_size": 64, "ffn_dim": 128,
                                "num_hidden_layers": 1, "num_attention_heads": 4,
                                "vocab_size": 300, "word_embed_proj_dim": 64},
                   vision_config={**TOWER, "image_size": 32, "patch_size": 8},
                   qformer_config={**TOWER, "encoder_hidden_size": 32, "vocab_size": 100})
    e = estimate_memory(model, batch_size=B, seq_len=64)
    assert _tensors(e.inputs)["pixel_values"].shape == (B, VIDEO_FRAMES, 3, 32, 32)
    assert e.inputs.image_tokens == queries * VIDEO_FRAMES == 16
    assert _placed(e.inputs, 299) == B * 16


def test_pi0_cameras_state_and_actions():
    side, patch = 32, 8
    model = _model("pi0", "PI0ForConditionalGeneration", chunk_size=5, max_state_dim=6,
                   max_action_dim=7,
                   vlm_config={"model_type": "paligemma", "image_token_id": 299,
                               "projection_dim": 64,
                               "text_config": {"model_type": "gemma", **TEXT},
                               "vision_config": {"model_type": "siglip_vision_model", **TOWER,
                                                 "image_size": side, "patch_size": patch}},
                   dit_config={"model_type": "gemma", **TEXT})
    e = estimate_memory(model, batch_size=B, seq_len=64, images=2)
    t = _tensors(e.inputs)
    tokens = (side // patch) ** 2  # SigLIP patches, one token each: 16 per camera
    assert e.inputs.image_tokens == 2 * tokens and _placed(e.inputs, 299) == B * 2 * tokens
    assert t["pixel_values"].shape == (B, 2, 3, side, side)
    assert t["pixel_attention_mask"].shape == (B, 2)
    assert t["state"].shape == (B, 6) and t["actions"].shape == (B, 5, 7)
    assert "labels" not in t


def test_molmo2_crops_and_the_patches_each_token_pools():
    side, patch = 56, 14  # one crop: 4 x 4 patches, pooled 2 x 2 into 2 x 2 tokens
    model = _model("molmo2", "Molmo2ForConditionalGeneration", image_token_id=299,
                   text_config={k: v for k, v in TEXT.items() if k != "max_position_embeddings"},
                   vision_config={**TOWER, "num_key_value_heads": 2, "head_dim": 16,
                                  "image_size": [side, side], "patch_size": patch},
                   adapter_config={"hidden_size": 32, "intermediate_size": 64,
                                   "num_attention_heads": 4, "num_key_value_heads": 4,
                                   "head_dim": 16, "text_hidden_size": 64,
                                   "vision_feature_layer": [-1]})
    e = estimate_memory(model, batch_size=B, seq_len=32)
    t = _tensors(e.inputs)
    # the image resized to one crop, and the crop: 2 views of 2 x 2 tokens each
    assert e.inputs.image_tokens == 2 * (4 // 2) ** 2 == 8
    assert t["pixel_values"].shape == (B * 2, 16, patch * patch * 3)
    pooling = t["image_token_pooling"].value
    assert pooling.shape == (B * 8, 4)
    assert pooling[0].tolist() == [0, 1, 4, 5]  # the first token: the top-left 2 x 2 patches
    assert pooling[8].tolist() == [32, 33, 36, 37]  # the second image's, after 2 x 16 patches
    assert t["image_grids"].value.tolist() == [[2, 2, 2, 2]] * B
    with pytest.raises(UnsupportedModelError, match="tiled into overlapping crops"):
        estimate_memory(model, batch_size=B, seq_len=32, image_size=2 * side)


def test_feature_arguments_the_inputs_lack_are_named():
    from torch import nn

    from layerscope.estimate.input_types import required_arguments

    class Inner(nn.Module):
        def get_image_features(self, pixel_values, image_grids, pooling=None, **kwargs):
            return pixel_values

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

        def get_image_features(self, pixel_values, **kwargs):  # passes the rest on
            return self.model.get_image_features(pixel_values, **kwargs)

    assert required_arguments(Outer(), "get_image_features") == {"pixel_values", "image_grids"}


def test_shieldgemma2_prompt_holds_its_image_tokens_and_trains_on_its_logits():
    side, patch, tokens = 64, 8, 16
    model = _model("shieldgemma2", "ShieldGemma2ForImageClassification", image_token_index=299,
                   boi_token_index=297, eoi_token_index=298, mm_tokens_per_image=tokens,
                   yes_token_index=10, no_token_index=11,  # within the 300-token vocabulary
                   text_config={"model_type": "gemma3_text", **TEXT, "sliding_window": 32},
                   vision_config={**TOWER, "image_size": side, "patch_size": patch})
    e = estimate_memory(model, batch_size=B, seq_len=64)
    # 8 x 8 patches pooled to 4 x 4 tokens; the head takes no labels (it answers yes or no)
    assert e.inputs.image_tokens == tokens and _placed(e.inputs, 299) == B * tokens
    assert "labels" not in _tensors(e.inputs) and e.peak_bytes > 0
