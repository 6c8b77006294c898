"""What one training step feeds the model: built from its task, forward signature and config.

A causal LM gets ``input_ids`` and ``labels`` (one tensor, as the calibration loop passes it);
every other head gets what its own data pipeline would give it:

========================  ====================================================================
task                      inputs (B = batch_size, S = seq_len)
========================  ====================================================================
causal-lm                 ``input_ids`` B x S, ``labels`` = ``input_ids``
sequence-classification   ``input_ids`` B x S (ending with the end-of-sequence token where the
                          head pools it), ``labels`` one per sequence (B; B x num_labels floats
                          for multi-label or regression heads)
seq2seq                   ``input_ids`` B x S, ``labels`` B x T (T = ``target_len``), and
                          ``decoder_input_ids`` where the config cannot shift the labels
image-text                ``input_ids`` B x S holding ``images`` x the model's image tokens per
                          sequence, ``pixel_values`` (and the grid or size tensors the model
                          reads, in its image processor's layout:
                          ``image_inputs.GRID_LAYOUTS``; a
                          ``bbox`` per token for document models), ``labels`` = ``input_ids``;
                          Pix2Struct: ``flattened_patches`` and decoder ``labels`` B x T
image-classification      ``pixel_values`` B x C x H x W, ``labels`` one per image
speech-seq2seq            ``input_features`` (or ``input_values``) of ``audio_seconds``,
                          ``labels`` B x T
ctc                       ``input_features`` / ``input_values``, ``labels`` B x L
                          (L = ``audio_inputs.CTC_LABELS_PER_SECOND`` x seconds), and an
                          ``attention_mask`` over the frames of features where the forward
                          takes one (the CTC loss reads the lengths from it)
audio-classification      ``input_features`` / ``input_values``, ``labels`` one per clip
========================  ====================================================================

The task is the one transformers' auto mappings give the model's class (its name's suffix for
remote code). The number of image tokens is what the model's own ``get_image_features``
returns for the images, found by running it on fake tensors, so it follows the model's patch
size, pooling and merging rather than a table. Token ids avoid every special token the config
names, so checks on them (one end-of-sequence token per row, image-token counts) see what a
real batch holds.

This module owns the entry point (the task, :func:`step_inputs`, :func:`prepare_copy`), the
text, class-label and sequence-to-sequence inputs, and the sequences that hold images or audio
as placeholder tokens. How images and audio reach the forward is in
:mod:`layerscope.estimate.image_inputs` and :mod:`layerscope.estimate.audio_inputs`; the
result types and the helpers all three share are in :mod:`layerscope.estimate.input_types`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from layerscope.errors import EstimateError, UnsupportedModelError
from layerscope.estimate.audio_inputs import (
    CTC_LABELS_PER_SECOND,
    FEATURE_FRAMES_PER_SECOND,
    PROJECTED_MASK_EXTRACTORS,
    _audio,
    _audio_codes,
    _frames,
    _padding_mask,
    feature_extractor,
)
from layerscope.estimate.image_inputs import (
    VIDEO_FRAMES,
    _action_inputs,
    _attending_images,
    _boxes,
    _channels,
    _cross_attention_images,
    _flattened_patches,
    _has_vision,
    _image_inputs,
    _image_side,
    _pixel_values,
    _pixels,
    _video_only,
)
from layerscope.estimate.input_types import (
    InputTensor,
    Sizes,
    StepInputs,
    _accepts,
    _decoder,
    _decoder_start,
    _is_encoder_decoder,
    _placeholder_id,
    _special_ids,
    _target_len,
    _tokens,
    _vocab,
    required_arguments,
    text_config,
)

_TASK_MAPPINGS = (
    # most specific first: a class in several mappings gets the first (Gemma-3's
    # ForConditionalGeneration is both image-text and causal LM: it takes images)
    ("image-text", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    ("speech-seq2seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
    ("ctc", "MODEL_FOR_CTC_MAPPING_NAMES"),
    ("audio-classification", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"),
    ("image-classification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("sequence-classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("seq2seq", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
)
_TASK_SUFFIXES = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForImageClassification", "image-classification"),
    ("ForAudioClassification", "audio-classification"),
    ("ForCTC", "ctc"),
    ("ForSpeechSeq2Seq", "speech-seq2seq"),
)


# -- the task ----------------------------------------------------------------------------------
def task_of(model: nn.Module) -> str:
    """The training task of ``model``'s class: the first of transformers' auto mappings that
    lists it (see :data:`_TASK_MAPPINGS`), else its name's suffix; anything else with a
    ``labels`` argument is trained as a causal LM."""
    name = type(model).__name__
    from transformers.models.auto import modeling_auto

    for task, mapping in _TASK_MAPPINGS:
        names = getattr(modeling_auto, mapping, {})
        for value in names.values():
            if name == value or (isinstance(value, (tuple, list)) and name in value):
                if task == "image-text" and not _accepts(model, "pixel_values"):
                    continue  # an image-text class whose forward takes no images
                return task
    for suffix, task in _TASK_SUFFIXES:
        if name.endswith(suffix):
            return task
    return "causal-lm"


# -- building --------------------------------------------------------------------------------
def step_inputs(model: nn.Module, sizes: Sizes,
                count_tokens: Callable[[str, tuple[InputTensor, ...]], int] | None = None
                ) -> StepInputs:
    """The inputs of one training step of ``model``.

    Args:
        model: the model (its class, forward signature and config are read).
        sizes: the settings.
        count_tokens: ``f(function name, inputs) -> tokens`` that runs the model's
            ``get_image_features`` (``get_audio_features``) on the inputs of one image (clip)
            and counts the feature vectors (the trace gives one over fake tensors); needed for
            models that read images or audio through placeholder tokens.

    Raises:
        UnsupportedModelError: the model's inputs cannot be built (no vocabulary, an unknown
            image or audio layout); the message names what is missing.
        EstimateError: a setting the model cannot take (a sequence too short for its images).
    """
    task = task_of(model)
    config = getattr(model, "config", None)
    b, s = sizes.batch_size, sizes.seq_len
    if _accepts(model, "shared_kv_states") and not _accepts(model, "labels"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a drafter for assisted decoding: its forward reads the "
            "main model's input embeddings and key/value states (shared_kv_states) and computes "
            "no loss, so it has no training step of its own; estimate the main model"
        )
    if task == "image-classification":
        if not _accepts(model, "pixel_values") and _accepts(model, "input_ids"):
            # ImageGPT: an image is a sequence of colour-cluster tokens
            ids = _tokens("input_ids", b, s, _vocab(model, config), _special_ids(config))
            return StepInputs(task, (ids, _class_labels(config, b)), tokens=s)
        if _accepts(model, "input_ids") and _placeholder_id(config, "image") is not None:
            # ShieldGemma-2: an image-text model that answers yes or no about its image; the
            # prompt holds the image's tokens, and its head takes no class labels
            vocab = _vocab(model, config)
            inputs = _with_placeholders(model, config, sizes, vocab, _special_ids(config),
                                        count_tokens, False, "image")
            return dataclasses.replace(inputs, task=task, tensors=tuple(
                t for t in inputs.tensors if t.name != "labels"))
        if _accepts(model, "spatial_shapes"):
            media = _image_inputs(model, config, b, 1, sizes)
        else:
            media = (_pixel_values(model, config, b, sizes),)
        return StepInputs(task, (*media, _class_labels(config, b)))
    if task == "speech-seq2seq" and not _accepts(model, "input_values") \
            and not _accepts(model, "input_features"):
        return _audio_codes(model, config, sizes)
    if task == "speech-seq2seq" and _accepts(model, "input_ids") and not _accepts(
            model, "decoder_input_ids"):
        task = "audio-text"  # a decoder-only LM that reads audio through placeholder tokens
    if task in ("ctc", "audio-classification", "speech-seq2seq"):
        audio, seconds = _audio(model, config, b, sizes)
        if task == "audio-classification":
            return StepInputs(task, (audio, _class_labels(config, b)))
        if task == "ctc":
            length = max(1, min(s, math.ceil(seconds * CTC_LABELS_PER_SECOND)))
            vocab = _vocab(model, config)
            labels = _tokens("labels", b, length, vocab, _special_ids(config))
            mask: tuple[InputTensor, ...] = _padding_mask(model, audio)
            if audio.name == "input_features" and _accepts(model, "attention_mask"):
                # frames x features: the feature extractor's mask of the real frames, from
                # which the CTC loss takes each sample's length (Parakeet, LASR)
                frames = (audio.shape[0], _frames(config, audio))
                mask = (InputTensor("attention_mask", frames, torch.long,
                                    torch.ones(frames, dtype=torch.long)),)
            return StepInputs(task, (audio, *mask, labels), tokens=length)
        target = _target_len(config, sizes)
        return StepInputs(task, (audio, *_decoder(model, config, b, target)), tokens=target,
                          target_len=target)
    if _accepts(model, "flattened_patches") and _accepts(model, "decoder_input_ids"):
        return _flattened_patches(model, config, sizes)  # not Kosmos-2.5: a decoder only
    vocab = _vocab(model, config)
    specials = _special_ids(config)
    required = _training_length(config)
    if sizes.training and required is not None and s != required:
        raise EstimateError(
            f"seq_len={s}: {type(model).__name__} trains only on sequences of exactly "
            f"{required} tokens (its axial position embeddings: config.axial_pos_shape "
            f"{tuple(getattr(config, 'axial_pos_shape', ()))} multiply to the length); use "
            f"seq_len={required}"
        )
    if task == "sequence-classification":
        eos = _eos_pooled(model, config)
        ids = _tokens("input_ids", b, s, vocab, specials, eos=eos)
        extra: tuple[InputTensor, ...] = ()
        if _is_encoder_decoder(model, config) and _decoder_start(config) is None \
                and _accepts(model, "decoder_input_ids"):  # nothing to shift the inputs with
            extra = (_tokens("decoder_input_ids", b, s, vocab, specials, eos=eos),)
        return StepInputs(task, (ids, *extra, _class_labels(config, b)), tokens=s)
    encoder_decoder = _is_encoder_decoder(model, config)
    if task == "image-text" and not _has_vision(config):
        if sizes.images:
            raise EstimateError(
                f"images={sizes.images}: {type(model).__name__} was built without a vision "
                "tower (its config's vision_config is None); use images=0 or a config with one"
            )
        sizes = dataclasses.replace(sizes, images=0)  # Gemma-4's default config: text only
    if task == "image-text" and (sizes.images if sizes.images is not None else 1) > 0:
        if _accepts(model, "aspect_ratio_ids"):
            return _cross_attention_images(model, config, sizes, vocab, specials)
        if _accepts(model, "state") and _accepts(model, "actions"):
            return _action_inputs(model, config, sizes, vocab, specials, count_tokens)
        if _accepts(model, "image_attention_mask") and _placeholder_id(config, "image") is None:
            return _attending_images(model, config, sizes, vocab, specials)
        return _with_placeholders(model, config, sizes, vocab, specials, count_tokens,
                                  encoder_decoder, "video" if _video_only(model) else "image")
    if task == "audio-text" and _placeholder_id(config, "audio") is None and isinstance(
            getattr(config, "audio_length_per_tok", None), int):
        return _aligned_audio(model, config, sizes, vocab, specials, count_tokens)
    if task == "audio-text":
        return _with_placeholders(model, config, sizes, vocab, specials, count_tokens,
                                  encoder_decoder, "audio")
    if task == "causal-lm" and not encoder_decoder:
        return causal_lm_inputs(b, s, vocab)
    ids = _tokens("input_ids", b, s, vocab, specials)
    if encoder_decoder:
        target = _target_len(config, sizes)
        return StepInputs("seq2seq", (ids, *_decoder(model, config, b, target)), tokens=s,
                          target_len=target)
    labels = InputTensor("labels", ids.shape, ids.dtype, same_as="input_ids")
    return StepInputs(task if task != "seq2seq" else "causal-lm", (ids, labels), tokens=s)


def _training_length(config: Any) -> int | None:
    """The one sequence length a model trains on, where it has one: Reformer's axial position
    embeddings (``axial_pos_embds``) are a grid of ``axial_pos_shape`` that a training batch
    must fill exactly (transformers raises otherwise; inference takes any shorter length)."""
    shape = getattr(config, "axial_pos_shape", None)
    if not getattr(config, "axial_pos_embds", False) or not isinstance(shape, (list, tuple)):
        return None
    return math.prod(int(d) for d in shape)


def causal_lm_inputs(batch: int, seq_len: int, vocab: int) -> StepInputs:
    """The calibration protocol's step: ``input_ids`` of random tokens and ``labels``, the
    same tensor."""
    if vocab < 1:
        raise UnsupportedModelError("no vocabulary: a causal LM's token ids cannot be built")
    ids = _tokens("input_ids", batch, seq_len, vocab, ())
    labels = InputTensor("labels", ids.shape, ids.dtype, same_as="input_ids")
    return StepInputs("causal-lm", (ids, labels), tokens=seq_len)


def prepare_copy(model: nn.Module, sizes: Sizes) -> None:
    """Set on a *copy* of the model what a training run of its task sets:

    * a padding token (``config.pad_token_id``, set by fine-tuning scripts, usually to the
      end-of-sequence token) for a classifier trained on batches (transformers' sequence
      classifiers pool the last token before the first padding token and refuse a batch
      without one) and for an encoder-decoder, whose labels are shifted into decoder inputs
      with it;
    * the language of a model with per-language adapters (X-MOD: ``set_default_language``,
      the first of ``config.languages``);
    * no KV cache (``config.use_cache = False``) for a forward that reads it from the config
      rather than from an argument (Granite-MoE-hybrid passes it on through ``**kwargs``;
      a cache of linear-attention layers only cannot tell its length).
    """
    config = getattr(model, "config", None)
    if config is None:
        return
    for cfg in {id(config): config, id(text_config(config)): text_config(config)}.values():
        if getattr(cfg, "use_cache", False):
            cfg.use_cache = False
    languages = getattr(config, "languages", None)
    if callable(getattr(model, "set_default_language", None)) and languages \
            and getattr(config, "default_language", None) is None:
        cast(Any, model).set_default_language(next(iter(languages)))
    task = task_of(model)
    classifier = task == "sequence-classification" and sizes.batch_size > 1
    if not classifier and not _is_encoder_decoder(model, config):
        return
    text = text_config(config)
    if getattr(text, "pad_token_id", None) is not None:
        return
    eos = getattr(text, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) and eos else eos
    pad = eos if isinstance(eos, int) else _vocab(model, config) - 1
    for cfg in {id(config): config, id(text): text}.values():
        cfg.pad_token_id = pad


def _eos_pooled(model: nn.Module, config: Any) -> int | None:
    """The end-of-sequence id for heads that pool the hidden state at it (BART and its
    relatives check that every row holds the same number of them)."""
    if not _is_encoder_decoder(model, config):
        return None
    eos = getattr(text_config(config), "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if isinstance(eos, int) else None


def _class_labels(config: Any, batch: int) -> InputTensor:
    """One label per sequence: a class index, or floats for regression and multi-label heads
    (``config.problem_type``, else what transformers infers from ``num_labels``)."""
    num_labels = getattr(config, "num_labels", 2)
    problem = getattr(config, "problem_type", None)
    if problem == "multi_label_classification" or (problem == "regression" and num_labels > 1):
        return InputTensor("labels", (batch, num_labels), torch.float32,
                           torch.zeros(batch, num_labels))
    if problem == "regression" or num_labels == 1:
        return InputTensor("labels", (batch,), torch.float32, torch.zeros(batch))
    return InputTensor("labels", (batch,), torch.long, torch.arange(batch) % max(num_labels, 1))


QFORMER_TOKENS = 32
"""Tokens of the instruction a Q-Former reads (InstructBLIP's ``qformer_input_ids``): a short
prompt."""


def _media(model: nn.Module, config: Any, modality: str, batch: int, per_sequence: int,
           sizes: Sizes) -> tuple[InputTensor, ...]:
    if modality != "audio":
        if modality == "video":  # InstructBLIP-Video: clips of VIDEO_FRAMES frames
            side = _image_side(config, sizes)
            images: tuple[InputTensor, ...] = (_pixels(
                (batch * per_sequence, VIDEO_FRAMES, _channels(config), side, side), sizes.dtype),)
        else:
            images = _image_inputs(model, config, batch, per_sequence, sizes)
        if _accepts(model, "qformer_input_ids"):  # InstructBLIP: the Q-Former's instruction
            qformer = getattr(config, "qformer_config", None)
            qvocab = getattr(qformer, "vocab_size", None) or _vocab(model, config)
            images = (*images, _tokens("qformer_input_ids", batch, QFORMER_TOKENS, qvocab,
                                       _special_ids(config)))
        return images
    audio, _ = _audio(model, config, batch * per_sequence, sizes)
    out = [audio]
    out.extend(_padding_mask(model, audio))
    if _accepts(model, "input_features_mask") and audio.name == "input_features" and \
            feature_extractor(config) not in PROJECTED_MASK_EXTRACTORS:
        frames = _frames(config, audio)
        mask = torch.ones(batch * per_sequence, frames, dtype=torch.bool)
        out.append(InputTensor("input_features_mask", tuple(mask.shape), torch.bool, mask))
    return tuple(out)


def _with_placeholders(model: nn.Module, config: Any, sizes: Sizes, vocab: int,
                       specials: frozenset[int], count_tokens: Callable[..., int] | None,
                       encoder_decoder: bool, modality: str) -> StepInputs:
    """A sequence that holds images (or audio clips) as runs of placeholder tokens, as the
    model's processor writes it: each run as long as the model's own ``get_image_features``
    (``get_video_features``, ``get_audio_features``) makes it, followed by one text token, then
    the text."""
    b, s = sizes.batch_size, sizes.seq_len
    per_sequence = 1 if modality == "audio" or sizes.images is None else sizes.images
    name = type(model).__name__
    token = _placeholder_id(config, modality)
    if token is None and modality == "audio":
        raise UnsupportedModelError(
            f"{name}: its config names no audio_token_id, so the audio cannot be placed in the "
            "text (set it as the checkpoint's config does)"
        )
    if token is None and modality != "audio" and isinstance(
            getattr(config, "num_query_tokens", None), int):
        # BLIP-2, InstructBLIP: the Q-Former's query outputs replace placeholder tokens
        raise UnsupportedModelError(
            f"{name}: its config's {modality}_token_index is None, so the Q-Former's "
            f"{config.num_query_tokens} query tokens cannot be placed in the text (set it as "
            "the checkpoint's config does)"
        )
    media = _media(model, config, modality, b, per_sequence, sizes)
    per_item = 0
    if token is not None:
        if count_tokens is None:
            raise UnsupportedModelError(f"{name}: counting {modality} tokens needs a traced model")
        one = _media(model, config, modality, 1, 1, sizes)
        missing = required_arguments(model, f"get_{modality}_features") - {t.name for t in one}
        if missing:
            raise UnsupportedModelError(
                f"{name}: its get_{modality}_features needs {', '.join(sorted(missing))}, "
                f"which layerscope cannot build (its processor's layout of the {modality} is "
                "not known here)"
            )
        per_item = count_tokens(f"get_{modality}_features", one)
        if (per_item + 1) * per_sequence > s:
            what = f"{per_sequence} image(s)" if modality != "audio" else "its audio"
            raise EstimateError(
                f"seq_len={s} cannot hold {what} of {per_item} tokens each ({name}"
                + (f" at image_size {_image_side(config, sizes)}" if modality != "audio" else "")
                + f"): use seq_len >= {(per_item + 1) * per_sequence}"
                + (", fewer images or a smaller image_size" if modality != "audio" else "")
            )
    ids = _tokens("input_ids", b, s, vocab, specials)
    kind = torch.zeros(b, s, dtype=torch.long)
    if token is not None and per_item and ids.value is not None:
        value = ids.value.clone()
        for k in range(per_sequence):
            start = k * (per_item + 1)
            value[:, start:start + per_item] = token
            kind[:, start:start + per_item] = 1
        ids = InputTensor("input_ids", ids.shape, ids.dtype, value)
    tensors: list[InputTensor] = [ids, *media]
    if modality == "image" and _accepts(model, "bbox"):
        tensors.append(_boxes(b, s, sizes.dtype))
    if modality == "image" and _accepts(model, "mm_token_type_ids"):
        tensors.append(InputTensor("mm_token_type_ids", (b, s), torch.long, kind))
    latents = getattr(config, "latent_query_num", None)
    if token is None and isinstance(latents, int) and _accepts(model, "image_embeds_position_mask"):
        # Kosmos-2: the image's latent queries replace the text embeddings where this mask
        # is set, right after the start token as its processor places them
        if latents + 2 > s:
            raise EstimateError(f"seq_len={s} cannot hold {type(model).__name__}'s "
                                f"{latents} image tokens: use seq_len >= {latents + 2}")
        mask = torch.zeros(b, s, dtype=torch.long)
        mask[:, 1:1 + latents] = 1
        tensors.append(InputTensor("image_embeds_position_mask", (b, s), torch.long, mask))
        per_item, per_sequence = latents, 1
    total = per_item * per_sequence
    task = "audio-text" if modality == "audio" else "image-text"  # videos are images in time
    if encoder_decoder:
        target = _target_len(config, sizes)
        return StepInputs(task, (*tensors, *_decoder(model, config, b, target)),
                          tokens=s, image_tokens=total if task == "image-text" else 0,
                          target_len=target)
    tensors.append(InputTensor("labels", ids.shape, ids.dtype, same_as="input_ids"))
    return StepInputs(task, tuple(tensors), tokens=s,
                      image_tokens=total if task == "image-text" else 0)


def _aligned_audio(model: nn.Module, config: Any, sizes: Sizes, vocab: int,
                   specials: frozenset[int], count_tokens: Callable[..., int] | None
                   ) -> StepInputs:
    """A text stream aligned with the audio (Voxtral Realtime: each token's embedding is
    summed with one audio embedding of ``audio_length_per_tok`` feature frames): ``seq_len``
    tokens hear ``seq_len x audio_length_per_tok`` frames of 10 ms unless ``audio_seconds``
    says otherwise; the text is as long as the model's ``get_audio_features`` makes the
    audio."""
    name = type(model).__name__
    if count_tokens is None:
        raise UnsupportedModelError(f"{name}: counting audio tokens needs a traced model")
    if sizes.audio_seconds is None:
        frames = sizes.seq_len * config.audio_length_per_tok
        sizes = dataclasses.replace(sizes, audio_seconds=frames / FEATURE_FRAMES_PER_SECOND)
    b = sizes.batch_size
    media = _media(model, config, "audio", b, 1, sizes)
    tokens = count_tokens("get_audio_features", _media(model, config, "audio", 1, 1, sizes))
    ids = _tokens("input_ids", b, tokens, vocab, specials)
    labels = InputTensor("labels", ids.shape, ids.dtype, same_as="input_ids")
    return StepInputs("audio-text", (ids, *media, labels), tokens=tokens)


