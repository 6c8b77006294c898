"""Models that are not plain causal LMs: each is built tiny from a config (meta device) and
estimated end to end; what its step is fed is checked against arithmetic written here.

One test per family of issue 15 (each raised an error before): the vocabulary of a
vision-language model's text config, per-sequence labels, data-dependent operators, configs
whose depth is a read-only property, hybrid stacks, per-layer head sizes, transformers' own
``inf`` in a saved config, speech inputs, an FSDP2-wrapped model; plus the popular ones
(Gemma-3, Qwen2.5-VL, LLaVA, BERT classification, Whisper, Jamba).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from layerscope import (
    FreezePlan,
    TrainingSetup,
    UnsupportedModelError,
    empty_model,
    estimate_memory,
    estimate_step_time,
    scan,
)
from layerscope.errors import ConfigError, EstimateError
from layerscope.estimate.memory import step_inputs_of
from layerscope.estimate.values import BALANCED_ROUTING

B = 2  # sequences per step: more than one, so a label per sequence and per token differ
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=512)


def _config(model_type: str, architecture: str, **fields) -> dict:
    return {"model_type": model_type, "architectures": [architecture], **fields}


def _inputs(estimate) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {t.name: (t.shape, t.dtype) for t in estimate.inputs.tensors}


# -- vision-language models: the text config's vocabulary, image tokens in the sequence -------
def test_llava_counts_its_image_tokens_in_the_sequence():
    side, patch = 32, 8
    model = empty_model(_config(
        "llava", "LlavaForConditionalGeneration", image_token_index=299,
        text_config={"model_type": "llama", **TEXT},
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": side, "patch_size": patch},
    ))
    assert not hasattr(model.config, "vocab_size") or model.config.text_config.vocab_size == 300
    e = estimate_memory(model, batch_size=B, seq_len=64)
    # CLIP's patches, the class token dropped ("default" feature selection): (32 / 8)^2 = 16
    assert e.inputs.image_tokens == (side // patch) ** 2 == 16
    ids = next(t for t in e.inputs.tensors if t.name == "input_ids")
    assert int((ids.value == 299).sum()) == B * 16
    assert _inputs(e)["pixel_values"] == ((B, 3, side, side), torch.float32)
    with pytest.raises(EstimateError, match=r"seq_len=16 cannot hold 1 image.*seq_len >= 17"):
        estimate_memory(model, batch_size=B, seq_len=16)
    text_only = estimate_memory(model, batch_size=B, seq_len=64, images=0)
    assert "pixel_values" not in _inputs(text_only)
    # the vision tower's activations come on top of the text's
    assert e.activation_bytes > text_only.activation_bytes


def test_gemma3_pools_its_image_to_mm_tokens_per_image():
    side, patch, tokens = 64, 8, 16
    model = empty_model(_config(
        "gemma3", "Gemma3ForConditionalGeneration", image_token_index=299, boi_token_index=297,
        eoi_token_index=298, mm_tokens_per_image=tokens,
        text_config={"model_type": "gemma3_text", **TEXT, "sliding_window": 32},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": side, "patch_size": patch},
    ))
    e = estimate_memory(model, batch_size=B, seq_len=64)
    # 8 x 8 patches average-pooled to sqrt(16) = 4 per side
    assert e.inputs.image_tokens == tokens == ((side // patch) // 2) ** 2
    assert e.peak_bytes > 0 and estimate_step_time(model, batch_size=B, seq_len=64).seconds > 0


def test_qwen2_5_vl_patches_merge_into_tokens():
    patch, merge, side = 14, 2, 56
    model = empty_model(_config(
        "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", image_token_id=299,
        video_token_id=298, vision_start_token_id=296, vision_end_token_id=297,
        text_config={"model_type": "qwen2_5_vl_text", **TEXT,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": [2, 3, 3]}},
        vision_config={"model_type": "qwen2_5_vl", "depth": 1, "hidden_size": 32,
                       "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                       "patch_size": patch, "spatial_merge_size": merge,
                       "temporal_patch_size": 2, "fullatt_block_indexes": [0]},
    ))
    e = estimate_memory(model, batch_size=B, seq_len=64, image_size=side)
    cells = side // patch  # 4 x 4 patches, merged 2 x 2 into tokens
    assert e.inputs.image_tokens == cells * cells // merge**2 == 4
    shapes = _inputs(e)
    assert shapes["image_grid_thw"][0] == (B, 3)
    assert shapes["pixel_values"][0] == (B * cells * cells, 3 * 2 * patch * patch)


# -- classification: one label per sequence ----------------------------------------------------
def test_bert_classifier_gets_one_label_per_sequence():
    model = empty_model(_config(
        "bert", "BertForSequenceClassification", hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, vocab_size=300, num_labels=3,
    ))
    e = estimate_memory(model, batch_size=4, seq_len=32)
    labels = next(t for t in e.inputs.tensors if t.name == "labels")
    assert labels.shape == (4,) and labels.dtype == torch.long  # not 4 x 32
    assert set(labels.value.tolist()) <= {0, 1, 2}
    # the head's output is 4 x 3 logits, not 4 x 32 x vocabulary: its memory (logits, their
    # fp32 copy, the loss) fits in a few 512-byte allocator blocks
    assert e.logits_bytes < 4 * 32 * 300 * 4


def test_decoder_classifier_without_pad_token_is_given_one():
    model = empty_model(_config("llama", "LlamaForSequenceClassification", **TEXT,
                                num_labels=2, eos_token_id=2))
    assert model.config.pad_token_id is None
    e = estimate_memory(model, batch_size=B, seq_len=32)  # transformers refuses B > 1 unpadded
    assert e.inputs.task == "sequence-classification"
    assert model.config.pad_token_id is None  # set on the traced copy only


# -- data-dependent operators --------------------------------------------------------------------
def test_bart_classifier_pools_its_end_of_sequence_tokens():
    # hidden[eos_mask] and a check that every row has as many <eos>: values of the inputs
    model = empty_model(_config(
        "bart", "BartForSequenceClassification", d_model=64, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=300, eos_token_id=2,
        max_position_embeddings=128,
    ))
    e = estimate_memory(model, batch_size=B, seq_len=32)
    ids = next(t for t in e.inputs.tensors if t.name == "input_ids")
    assert (ids.value == 2).sum(dim=1).tolist() == [1] * B  # one <eos>, at the end


def test_xlm_reads_its_sequence_lengths():
    # assert lengths.max().item() <= slen; and it loops over config.n_layers
    model = empty_model(_config("xlm", "XLMWithLMHeadModel", emb_dim=64, n_layers=2,
                                n_heads=4, vocab_size=300))
    assert estimate_memory(model, batch_size=B, seq_len=32).peak_bytes > 0


def test_routing_in_a_python_loop_is_traced_with_balanced_load():
    """JetMoE counts each expert's tokens with ``tolist()`` of the router's top-k picks (refused
    before): the picks are taken balanced, and the estimate says so."""
    model = empty_model(_config(
        "jetmoe", "JetMoeForCausalLM", hidden_size=64, num_hidden_layers=2,
        num_key_value_heads=2, kv_channels=16, intermediate_size=128, num_local_experts=4,
        num_experts_per_tok=2, vocab_size=300,
    ))
    e = estimate_memory(model, batch_size=B, seq_len=16)
    assert e.peak_bytes > 0
    assert BALANCED_ROUTING in e.inputs.assumptions and BALANCED_ROUTING in e.inputs.describe()
    # a sharded estimate traces its own step and says the same
    ddp = estimate_memory(model, batch_size=B, seq_len=16, distributed="ddp", num_gpus=2)
    assert BALANCED_ROUTING in ddp.inputs.assumptions


@pytest.mark.parametrize("model_type, architecture, fields", [
    # top-1 by argmax, then a loop over ``expert_hit = (...).nonzero()`` naming each expert's
    # module f"expert_{idx}" from a 0-d tensor
    ("switch_transformers", "SwitchTransformersForConditionalGeneration", dict(
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
        vocab_size=300, decoder_start_token_id=0, pad_token_id=0)),
    ("nllb-moe", "NllbMoeForConditionalGeneration", dict(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_experts=4,
        encoder_sparse_step=1, decoder_sparse_step=1, vocab_size=300,
        decoder_start_token_id=2, pad_token_id=1)),
])
def test_top1_routers_loop_over_the_experts_hit(model_type, architecture, fields):
    e = estimate_memory(empty_model(_config(model_type, architecture, **fields)),
                        batch_size=B, seq_len=16)
    assert e.peak_bytes > 0 and BALANCED_ROUTING in e.inputs.assumptions


def test_canine_ids_are_unicode_code_points():
    """CANINE has no vocabulary: it hashes Unicode code points into embedding buckets."""
    model = empty_model(_config(
        "canine", "CanineForSequenceClassification", hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, num_hash_buckets=64, num_hash_functions=4,
    ))
    e = estimate_memory(model, batch_size=B, seq_len=32)
    ids = next(t for t in e.inputs.tensors if t.name == "input_ids")
    assert ids.shape == (B, 32) and int(ids.value.max()) < 0x110000  # U+0000..U+10FFFF
    assert _inputs(e)["labels"] == ((B,), torch.long)


def test_reformer_trains_only_on_its_axial_grid():
    """Reformer's axial position embeddings are an 8 x 4 grid here: a training batch must be
    exactly 32 tokens long; inference takes a shorter one."""
    model = empty_model(_config(
        "reformer", "ReformerForSequenceClassification", hidden_size=64, attention_head_size=16,
        num_attention_heads=4, attn_layers=["local", "lsh"], feed_forward_size=128,
        axial_pos_shape=[8, 4], axial_pos_embds_dim=[16, 48], local_attn_chunk_length=8,
        lsh_attn_chunk_length=8, max_position_embeddings=32, vocab_size=300, pad_token_id=0,
    ))
    with pytest.raises(EstimateError, match=r"exactly 32 tokens .* use seq_len=32"):
        estimate_memory(model, batch_size=B, seq_len=16)
    assert _inputs(estimate_memory(model, batch_size=B, seq_len=8 * 4))["input_ids"][0] == (B, 32)
    assert estimate_memory(model, batch_size=B, seq_len=16, inference=True).peak_bytes > 0


def test_hybrid_of_linear_attention_only_keeps_no_cache():
    """Granite-MoE-hybrid's forward takes use_cache only through **kwargs: a cache made from
    the config would be asked its length by linear-attention layers only, and fail."""
    model = empty_model(_config(
        "granitemoehybrid", "GraniteMoeHybridForCausalLM", hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=300,
        num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=128,
        layer_types=["linear_attention", "linear_attention"], mamba_n_heads=8, mamba_d_head=16,
        mamba_d_state=16, mamba_chunk_size=16,
    ))
    assert model.config.use_cache
    assert estimate_memory(model, batch_size=B, seq_len=16).peak_bytes > 0
    assert model.config.use_cache  # set on the traced copy only


def test_bf16_fft_is_refused_and_fp32_estimated():
    model = empty_model(_config(
        "fnet", "FNetForSequenceClassification", hidden_size=64, num_hidden_layers=2,
        intermediate_size=128, vocab_size=300, pad_token_id=3, eos_token_id=2,
    ))
    with pytest.raises(UnsupportedModelError, match="no bfloat16 FFT.*precision='fp32'"):
        estimate_memory(model, batch_size=B, seq_len=16, precision="bf16-mixed")
    assert estimate_memory(model, batch_size=B, seq_len=16, precision="fp32").peak_bytes > 0


def test_assisted_decoding_drafter_is_refused_with_the_reason():
    model = empty_model(_config(
        "gemma4_unified_assistant", "Gemma4UnifiedAssistantForCausalLM",
        text_config={"model_type": "gemma4_unified_text", **TEXT}, backbone_hidden_size=64,
    ))
    with pytest.raises(UnsupportedModelError, match="drafter for assisted decoding"):
        estimate_memory(model, batch_size=B, seq_len=16)


# -- configs whose depth is a read-only property, hybrid stacks ----------------------------------
@pytest.mark.parametrize("model_type, architecture, fields", [
    ("mamba", "MambaForCausalLM", dict(hidden_size=64, state_size=8, num_hidden_layers=2,
                                       vocab_size=300, use_mambapy=False)),
    ("prophetnet", "ProphetNetForConditionalGeneration", dict(
        hidden_size=64, num_encoder_layers=2, num_decoder_layers=2,
        num_encoder_attention_heads=4, num_decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, vocab_size=300)),
])
def test_depth_that_transformers_will_not_set(model_type, architecture, fields):
    model = empty_model(_config(model_type, architecture, **fields))
    assert estimate_memory(model, batch_size=B, seq_len=16).peak_bytes > 0


def test_jamba_hybrid_stack_is_one_stack_of_two_block_classes():
    model = empty_model(_config(
        "jamba", "JambaForCausalLM", hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8,
        mamba_dt_rank=8, use_mamba_kernels=False,
    ))
    stack = scan(model).layers
    assert stack.path == "model.layers" and len(stack) == 4
    assert set(stack.block_type.split("/")) == {"JambaMambaDecoderLayer",
                                               "JambaAttentionDecoderLayer"}
    e = estimate_memory(model, FreezePlan.first(1), batch_size=B, seq_len=16)
    assert len(e.activation_bytes_per_block) == 4


def test_kosmos2_places_its_latent_image_queries_by_mask():
    """Kosmos-2 has no image token: its latent_query_num image queries replace the text
    embeddings where image_embeds_position_mask is set (it failed on None)."""
    latents = 8
    model = empty_model(_config(
        "kosmos-2", "Kosmos2ForConditionalGeneration", latent_query_num=latents,
        text_config={"model_type": "kosmos_2_text_model", "embed_dim": 64, "layers": 2,
                     "attention_heads": 4, "ffn_dim": 128, "vocab_size": 300},
        vision_config={"model_type": "kosmos_2_vision_model", "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    ))
    e = estimate_memory(model, batch_size=B, seq_len=32)
    mask = next(t for t in e.inputs.tensors if t.name == "image_embeds_position_mask")
    assert mask.shape == (B, 32) and e.inputs.image_tokens == latents
    # after the start token, latent_query_num positions per sequence
    assert mask.value[:, 1:1 + latents].eq(1).all() and int(mask.value.sum()) == B * latents
    with pytest.raises(EstimateError, match=f"use seq_len >= {latents + 2}"):
        estimate_memory(model, batch_size=B, seq_len=latents + 1)


def test_image_text_model_built_without_a_vision_tower_trains_on_text():
    """Gemma-4's default config has no vision_config, so the model has no vision tower: the
    step is text only (it was fed an image), and asking for images says why not."""
    from transformers import Gemma4TextConfig

    defaults = Gemma4TextConfig()
    text = dict(model_type="gemma4_text", hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                global_head_dim=16, vocab_size=300, hidden_size_per_layer_input=8,
                vocab_size_per_layer_input=300,
                layer_types=["sliding_attention", "full_attention"],
                **{k: getattr(defaults, k) for k in ("rope_parameters",) if hasattr(defaults, k)})
    model = empty_model(_config("gemma4", "Gemma4ForConditionalGeneration", text_config=text,
                                vision_config=None, audio_config=None))
    assert getattr(model.model, "vision_tower", None) is None
    e = estimate_memory(model, batch_size=B, seq_len=32)
    assert _inputs(e)["input_ids"][0] == (B, 32) and e.inputs.image_tokens == 0
    with pytest.raises(EstimateError, match="images=1: .* without a vision tower"):
        estimate_memory(model, batch_size=B, seq_len=32, images=1)


# -- the time model: per-layer head sizes, empty matrices ---------------------------------------
def test_gemma4_per_layer_head_dim_is_read_per_layer():
    from transformers import Gemma4TextConfig

    defaults = Gemma4TextConfig()
    model = empty_model(_config(
        "gemma4_text", "Gemma4ForCausalLM", hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        global_head_dim=32, vocab_size=300, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=300, layer_types=["sliding_attention", "full_attention"],
        **{k: getattr(defaults, k) for k in ("rope_parameters",) if hasattr(defaults, k)},
    ))
    assert estimate_step_time(model, batch_size=B, seq_len=32).seconds > 0


# -- a config.json transformers writes with inf ------------------------------------------------
def test_saved_config_with_infinity_reads_back(tmp_path):
    from transformers import BambaConfig

    BambaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, vocab_size=300,
                mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["time_step_limit"][1] == {"__float__": "Infinity"}
    model = empty_model(tmp_path)
    assert model.config.time_step_limit[1] == math.inf


def test_saved_config_with_sizes_per_stage_reads_back(tmp_path):
    """SegFormer gives its heads per stage, Gemma-3n its feed-forward width per layer: lists
    of sizes are read (they were 'not a size'); a list holding a zero is still refused."""
    from transformers import SegformerConfig

    SegformerConfig(num_attention_heads=[1, 2, 4, 8], hidden_sizes=[16, 32, 64, 128],
                    depths=[1, 1, 1, 1], num_labels=3).save_pretrained(tmp_path)
    model = empty_model(tmp_path)
    assert model.config.num_attention_heads == [1, 2, 4, 8]
    assert scan(model).num_layers >= 4
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "num_attention_heads": [1, 0]}))
    with pytest.raises(ConfigError, match=r"num_attention_heads=\[1, 0\] is not a size"):
        empty_model(tmp_path)


def test_sharded_step_is_traced_per_input_setting():
    """The sharded trace is cached per setting that shapes the inputs: a longer decoder
    sequence under DDP is a new trace (the first one asked answered every later one)."""
    model = empty_model(_config(
        "bart", "BartForConditionalGeneration", d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, vocab_size=300, max_position_embeddings=128,
    ))
    short, long = (estimate_memory(model, batch_size=B, seq_len=32, target_len=t,
                                   distributed="ddp", num_gpus=2) for t in (8, 64))
    assert long.activation_bytes > short.activation_bytes
    # and the sharded estimate says what it fed the model, as the one-GPU one does
    one_gpu = estimate_memory(model, batch_size=B, seq_len=32, target_len=64)
    assert long.inputs == one_gpu.inputs is not None


# -- speech: features, decoder length ---------------------------------------------------------
def test_whisper_decoder_stays_within_max_target_positions():
    model = empty_model(_config(
        "whisper", "WhisperForConditionalGeneration", d_model=64, encoder_layers=1,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=300, num_mel_bins=16,
        max_source_positions=50, max_target_positions=32, decoder_start_token_id=1,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ))
    e = estimate_memory(model, batch_size=B, seq_len=512)
    shapes = _inputs(e)
    # Whisper's encoder takes exactly 2 x max_source_positions frames
    assert shapes["input_features"][0] == (B, 16, 2 * 50)
    assert shapes["labels"][0] == (B, 32) and e.inputs.target_len == 32
    assert _inputs(estimate_memory(model, batch_size=B, seq_len=512, target_len=8))[
        "labels"][0] == (B, 8)
    with pytest.raises(EstimateError, match="target_len=40 exceeds the decoder's maximum length 32"):
        estimate_memory(model, batch_size=B, target_len=40)


def test_wav2vec2_ctc_reads_raw_audio_of_audio_seconds():
    model = empty_model(_config(
        "wav2vec2", "Wav2Vec2ForCTC", hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, vocab_size=32,
        conv_dim=[32, 32], conv_stride=[5, 2], conv_kernel=[10, 3], num_feat_extract_layers=2,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    ))
    e = estimate_memory(model, batch_size=B, audio_seconds=2.0)
    shapes = _inputs(e)
    assert shapes["input_values"][0] == (B, 2 * 16_000)  # 16 kHz samples
    assert shapes["labels"][0] == (B, 2 * 5)  # CTC_LABELS_PER_SECOND labels per second


def test_parakeet_ctc_gets_the_mask_its_loss_reads_lengths_from():
    """Parakeet's CTC loss takes each sample's length from the attention mask over its
    filter-bank frames (it failed on None): a mask of ones, frames x batch, is fed."""
    model = empty_model(_config(
        "parakeet_ctc", "ParakeetForCTC", vocab_size=32, pad_token_id=31,
        encoder_config={"model_type": "parakeet_encoder", "hidden_size": 64,
                        "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 4, "intermediate_size": 128,
                        "num_mel_bins": 16, "subsampling_conv_channels": 32},
    ))
    e = estimate_memory(model, batch_size=B, audio_seconds=1.0)
    shapes = _inputs(e)
    # 100 frames a second (a 10 ms hop) of 16 mel bins; the mask covers the frames
    assert shapes["input_features"][0] == (B, 100, 16)
    assert shapes["attention_mask"] == ((B, 100), torch.long)
    assert shapes["labels"][0] == (B, 5)


def test_qwen3_asr_features_are_bins_by_frames_in_whole_chunks():
    """Qwen3-ASR's feature extractor lays out bins x frames (as Whisper's) and its encoder
    takes whole chunks of 2 x n_window frames; its audio tokens are counted per chunk."""
    model = empty_model(_config(
        "qwen3_asr", "Qwen3ASRForConditionalGeneration", audio_token_id=290,
        audio_config={"model_type": "qwen3_asr_encoder", "num_mel_bins": 16, "encoder_layers": 1,
                      "encoder_attention_heads": 4, "encoder_ffn_dim": 128, "d_model": 64,
                      "n_window": 50, "output_dim": 64, "downsample_hidden_size": 32},
        text_config={"model_type": "qwen3", **TEXT},
    ))
    e = estimate_memory(model, batch_size=B, seq_len=64, audio_seconds=1.5)
    shapes = _inputs(e)
    # 1.5 s = 150 frames of 10 ms, padded to whole chunks of 2 x 50: 200
    assert shapes["input_features"][0] == (B, 16, 200)
    assert shapes["input_features_mask"][0] == (B, 200)
    # per 100-frame chunk three stride-2 convolutions: 100 -> 50 -> 25 -> 13; two chunks
    ids = next(t for t in e.inputs.tensors if t.name == "input_ids")
    assert (ids.value == 290).sum(dim=1).tolist() == [2 * 13] * B


def test_codec_style_waveforms_have_a_channel_axis_and_a_padding_mask():
    """OmniASR's extractor returns input_values B x 1 x samples and a padding_mask B x samples
    (a B x samples tensor failed its first convolution)."""
    model = empty_model(_config(
        "omniasr_ctc", "OmniASRForCTC", vocab_size=32, pad_token_id=1,
        audio_config={"model_type": "omniasr_audio", "hidden_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "intermediate_size": 128,
                      "conv_dim": [32, 32], "conv_kernel": [10, 3], "conv_stride": [5, 2],
                      "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4},
    ))
    shapes = _inputs(estimate_memory(model, batch_size=B, audio_seconds=1.0))
    assert shapes["input_values"][0] == (B, 1, 16_000)  # 16 kHz, one channel
    assert shapes["padding_mask"] == ((B, 16_000), torch.bool)
    assert shapes["labels"][0] == (B, 5)  # CTC_LABELS_PER_SECOND


def test_stacked_filter_bank_frames_as_the_extractor_stacks_them():
    """Granite Speech 5's extractor puts each 80-mel frame next to its delta and stacks pairs:
    vectors of 80 x 2 x 2 = 320 features, one per 20 ms."""
    model = empty_model(_config(
        "granite_speech5_ctc", "GraniteSpeech5ForCTC", vocab_size=32, pad_token_id=0,
        encoder_config={"model_type": "granite_speech5_encoder", "vocab_size": 32,
                        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 4, "num_mel_bins": 80,
                        "head_dim": 16, "subsample_layers": [0, 1]},
    ))
    shapes = _inputs(estimate_memory(model, batch_size=B, audio_seconds=1.5))
    # 1.5 s = 150 frames of 10 ms, stacked in pairs: 75 vectors
    assert shapes["input_features"][0] == (B, 75, 320)
    assert shapes["attention_mask"][0] == (B, 75)


def test_text_to_speech_codes_in_the_decoder():
    """Dia writes audio as codes of 3 codebooks: decoder_input_ids B x T x 3 and labels one row
    per codebook, B*3 x T, the layout of its loss."""
    model = empty_model(_config(
        "dia", "DiaForConditionalGeneration",
        encoder_config={"model_type": "dia_encoder", "hidden_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16,
                        "intermediate_size": 128, "vocab_size": 256},
        decoder_config={"model_type": "dia_decoder", "hidden_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                        "intermediate_size": 128, "cross_num_attention_heads": 4,
                        "cross_head_dim": 16, "cross_num_key_value_heads": 4,
                        "cross_hidden_size": 64, "vocab_size": 40, "num_channels": 3,
                        "max_position_embeddings": 64},
        delay_pattern=[0, 1, 2],
    ))
    e = estimate_memory(model, batch_size=B, seq_len=32, target_len=20)
    shapes = _inputs(e)
    assert shapes["input_ids"][0] == (B, 32)
    assert shapes["decoder_input_ids"][0] == (B, 20, 3)
    assert shapes["labels"][0] == (B * 3, 20)
    codes = next(t for t in e.inputs.tensors if t.name == "decoder_input_ids")
    assert int(codes.value.max()) < 40


def test_speech_to_text_codes_beside_the_text():
    """Kyutai speech-to-text reads each frame's text token and its audio codes together:
    input_ids B x S x (1 + num_codebooks), text labels B x S."""
    model = empty_model(_config(
        "kyutai_speech_to_text", "KyutaiSpeechToTextForConditionalGeneration",
        codebook_vocab_size=65, vocab_size=300, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, ffn_dim=128,
        num_codebooks=4, audio_bos_token_id=64, audio_pad_token_id=299, pad_token_id=3,
        bos_token_id=1, max_position_embeddings=128, sliding_window=64,
        codec_config={"model_type": "mimi", "hidden_size": 64, "num_filters": 64,
                      "num_hidden_layers": 1, "intermediate_size": 128,
                      "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16,
                      "codebook_size": 64, "num_quantizers": 4, "upsample_groups": 64},
    ))
    e = estimate_memory(model, batch_size=B, seq_len=25)
    shapes = _inputs(e)
    assert shapes["input_ids"][0] == (B, 25, 1 + 4)
    assert shapes["labels"][0] == (B, 25)
    ids = next(t for t in e.inputs.tensors if t.name == "input_ids").value
    assert int(ids[..., 1:].max()) < 65  # codes within one codebook


def test_pop2piano_reads_spectrogram_frames_as_embeddings():
    """Pop2Piano's extractor makes log-mel frames as wide as its T5 (d_model), 22050 / 1024
    frames a second, which its encoder reads as input embeddings."""
    model = empty_model(_config(
        "pop2piano", "Pop2PianoForConditionalGeneration", vocab_size=300, d_model=64, d_kv=16,
        d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    ))
    shapes = _inputs(estimate_memory(model, batch_size=B, seq_len=16, audio_seconds=2.0))
    assert shapes["input_features"][0] == (B, round(2.0 * 22_050 / 1_024), 64)  # 43 frames


def test_voxtral_realtime_text_is_as_long_as_its_audio():
    """Voxtral Realtime sums each token's embedding with one audio embedding of
    audio_length_per_tok frames: seq_len tokens hear seq_len x 8 frames."""
    model = empty_model(_config(
        "voxtral_realtime", "VoxtralRealtimeForConditionalGeneration", audio_length_per_tok=8,
        downsample_factor=4, hidden_size=64,
        audio_config={"model_type": "voxtral_realtime_encoder", "hidden_size": 64,
                      "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                      "num_mel_bins": 16, "head_dim": 16},
        text_config={"model_type": "voxtral_realtime_text", **TEXT},
    ))
    shapes = _inputs(estimate_memory(model, batch_size=B, seq_len=16))
    # 16 tokens x 8 frames = 128 frames, bins x frames; a stride-2 conv and a 4-frame stack
    # make them 128 / 2 / 4 = 16 audio embeddings, one per token
    assert shapes["input_features"][0] == (B, 16, 16 * 8)
    assert shapes["input_ids"][0] == (B, 16)


# -- an FSDP2-wrapped model, and a module without config ----------------------------------------
def test_fsdp2_wrapped_model_is_estimated_without_touching_it():
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from transformers import AutoModelForCausalLM, LlamaConfig

    if dist.is_initialized():
        pytest.skip("a process group is already running")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        config = LlamaConfig(**TEXT)
        torch.manual_seed(0)
        plain = AutoModelForCausalLM.from_config(config)
        wrapped = AutoModelForCausalLM.from_config(config)
        mesh = init_device_mesh("cpu", (1,))
        for layer in wrapped.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(wrapped, mesh=mesh)
        wrapped.model.embed_tokens.weight.requires_grad_(False)
        plain.model.embed_tokens.weight.requires_grad_(False)
        before = {n: (type(p), p.requires_grad) for n, p in wrapped.named_parameters()}
        a = estimate_memory(wrapped, batch_size=B, seq_len=32)  # "FSDP does not support deepcopy"
        b = estimate_memory(plain, batch_size=B, seq_len=32)
        assert a.trainable_params == b.trainable_params and a.total_params == b.total_params
        assert a.distributed == "fsdp" and a.num_gpus == 1  # the sharding its wrapper implies
        assert isinstance(wrapped, FSDPModule)  # untouched
        assert {n: (type(p), p.requires_grad) for n, p in wrapped.named_parameters()} == before
    finally:
        dist.destroy_process_group()


def test_a_module_without_config_is_refused_with_what_is_missing():
    from conftest import PlainNet

    with pytest.raises(UnsupportedModelError, match="PlainNet has no config"):
        TrainingSetup(PlainNet(), seq_len=8)
        estimate_memory(PlainNet(), seq_len=8)


def test_step_inputs_of_matches_the_estimate():
    model = empty_model(_config("llama", "LlamaForCausalLM", **TEXT))
    setup = TrainingSetup(model, batch_size=B, seq_len=16)
    inputs = step_inputs_of(setup)
    assert inputs.describe() == ("input_ids 2 x 16 int64", "labels = input_ids")
    assert estimate_memory(setup).inputs == inputs
