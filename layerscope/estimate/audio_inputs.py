"""The speech and audio inputs of a step: waveforms, filter-bank frames and audio codes.

This module owns how audio reaches a model's forward, as the feature extractor transformers
pairs with it lays it out: raw waveforms (at :data:`SAMPLE_RATE`, or a codec's own rate with a
channel axis: :data:`WAVEFORM_EXTRACTORS`), filter-bank frames (:data:`FEATURE_FRAMES_PER_SECOND`,
frames or bins first: :data:`CHANNELS_FIRST_EXTRACTORS`; Whisper's fixed window; stacked
frames: :data:`STACKED_EXTRACTORS`; frames as wide as the model: :data:`EMBEDDING_EXTRACTORS`),
their padding masks, and a neural codec's codes. :mod:`layerscope.estimate.inputs` decides
which of these a model gets and builds its labels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layerscope.errors import EstimateError, UnsupportedModelError
from layerscope.estimate.input_types import (
    InputTensor,
    Sizes,
    StepInputs,
    _accepts,
    _special_ids,
    _target_len,
    _tokens,
    _vocab,
)

SAMPLE_RATE = 16_000
"""Audio samples per second: every speech feature extractor in transformers resamples to 16 kHz
(Whisper, wav2vec 2.0, HuBERT, SeamlessM4T, Speech2Text, Parakeet...)."""

FEATURE_FRAMES_PER_SECOND = 100
"""Filter-bank frames per second: a 10 ms hop (160 samples at 16 kHz), the hop of Whisper's,
Speech2Text's and the Kaldi-style feature extractors."""

AUDIO_SECONDS = 30.0
"""Seconds of audio per sample when the model does not fix it: Whisper's window, and the usual
cap on utterances in ASR fine-tuning sets."""

CTC_LABELS_PER_SECOND = 5
"""CTC label tokens per second of audio (subword units; a CTC loss needs fewer labels than
output frames, and 8x-subsampled encoders give 12.5 frames per second)."""


def _padding_mask(model: nn.Module, audio: InputTensor) -> tuple[InputTensor, ...]:
    """The mask of real samples that waveform extractors return next to ``input_values``
    (``padding_mask``, B x samples: all real), where the forward takes one."""
    if not _accepts(model, "padding_mask") or audio.name != "input_values":
        return ()
    shape = (audio.shape[0], audio.shape[-1])
    return (InputTensor("padding_mask", shape, torch.bool, torch.ones(shape, dtype=torch.bool)),)


# -- audio -----------------------------------------------------------------------------------
_AUDIO_CONFIGS = ("audio_config", "encoder_config", "speech_config", "audio_encoder_config",
                  "encoder")
_FEATURE_SIZES = ("num_mel_bins", "feature_size", "input_feat_per_channel", "n_mels",
                  "feature_projection_input_dim", "input_dim", "num_mel_features")


WAVEFORM_EXTRACTORS = {
    "DacFeatureExtractor": 16_000, "DiaFeatureExtractor": 16_000,
    "EncodecFeatureExtractor": 24_000, "KyutaiSpeechToTextFeatureExtractor": 24_000,
    "OmniASRFeatureExtractor": 16_000, "PeAudioFeatureExtractor": 48_000,
    "PocketTTSFeatureExtractor": 24_000, "VibeVoiceAcousticTokenizerFeatureExtractor": 24_000,
    "WavTokenizerFeatureExtractor": 24_000,
}
"""Feature extractors whose ``input_values`` are mono waveforms with a channel axis,
B x 1 x samples (with a ``padding_mask`` B x samples), and their sampling rates (Hz): what
each returns for a clip under transformers 5.24 (codec-style extractors; ``Wav2Vec2``'s are
B x samples at 16 kHz)."""

CHANNELS_FIRST_EXTRACTORS = frozenset({
    "WhisperFeatureExtractor", "Qwen3ASRFeatureExtractor", "VoxtralRealtimeFeatureExtractor",
    "ClvpFeatureExtractor", "MossTranscribeDiarizeFeatureExtractor", "Dots3NoteFeatureExtractor",
})
"""Feature extractors whose filter-bank ``input_features`` are B x bins x frames (as Whisper's
log-mel spectrogram); the others' are B x frames x bins (Kaldi-style: Speech2Text, Parakeet,
SeamlessM4T). Measured by running each extractor of transformers 5.24 on a clip."""


STACKED_EXTRACTORS = {
    "GraniteSpeechFeatureExtractor": (1, 2),
    "GraniteSpeech5FeatureExtractor": (4, 2),
    "FunAsrNanoFeatureExtractor": (7, 6),
}
"""Feature extractors that stack consecutive 10-ms frames into one feature vector:
(width of a vector in the config's feature size, frames per vector). Granite Speech stacks
pairs of 80-mel frames (its encoder's ``input_dim`` is the stacked 160); Granite Speech 5 each
mel frame with its delta, then pairs (``num_mel_bins`` x 2 x 2); FunASR's low frame rate stacks
7 frames every 6th (``num_stacked_frames`` x ``num_mel_bins``: 560). From each extractor's
source in transformers 5.24 (``frame_stacking``, ``delta_expansion``, ``num_frames_lfr``,
``stride_lfr``)."""


EMBEDDING_EXTRACTORS = {"Pop2PianoFeatureExtractor": 22_050 / 1_024}
"""Feature extractors whose frames are as wide as the model (``d_model``) and go to its
encoder as input embeddings, and their frames per second: Pop2Piano's log-mel spectrogram of
512 bins (its T5's width), hop 1024 at 22.05 kHz."""

PROJECTED_MASK_EXTRACTORS = frozenset({"GraniteSpeechFeatureExtractor"})
"""Feature extractors whose ``input_features_mask`` marks the *projected* audio tokens, not
the frames (Granite Speech: all true for a clip without padding, and optional): not fed."""


def feature_extractor(config: Any) -> str | None:
    """The class name of the feature extractor transformers pairs with the config's model
    type (``FEATURE_EXTRACTOR_MAPPING_NAMES``), or None."""
    from transformers.models.auto import feature_extraction_auto

    names = getattr(feature_extraction_auto, "FEATURE_EXTRACTOR_MAPPING_NAMES", {})
    name = names.get(getattr(config, "model_type", None) or "")
    return name if isinstance(name, str) else None


def _audio_config(config: Any) -> Any:
    for name in _AUDIO_CONFIGS:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            return sub
    return config


def _audio(model: nn.Module, config: Any, batch: int, sizes: Sizes) -> tuple[InputTensor, float]:
    """Raw samples (``input_values``) or filter-bank frames (``input_features``), as the
    model's ``main_input_name`` (or its encoder's) says."""
    seconds = sizes.audio_seconds if sizes.audio_seconds is not None else AUDIO_SECONDS
    main = getattr(model, "main_input_name", None)
    encoder = getattr(model, "encoder", None)
    name: str | None
    if main == "inputs" and encoder is not None:  # SpeechEncoderDecoder: its encoder's input
        main = getattr(encoder, "main_input_name", None)
        name = "inputs"
    else:
        name = main if main in ("input_values", "input_features") else None
    spectrogram = getattr(config, "num_mel_bins", None)
    if main == "input_values" and isinstance(getattr(config, "max_length", None), int) \
            and isinstance(spectrogram, int):
        # AST: its "values" are a spectrogram of max_length frames
        frames = config.max_length
        return (InputTensor("input_values", (batch, frames, spectrogram), sizes.dtype),
                frames / FEATURE_FRAMES_PER_SECOND)
    extractor = feature_extractor(config)
    if main == "input_values" or (name is None and _accepts(model, "input_values")
                                  and not _accepts(model, "input_features")):
        if extractor in WAVEFORM_EXTRACTORS:  # a codec's mono channel: B x 1 x samples
            samples = max(1, round(seconds * WAVEFORM_EXTRACTORS[extractor]))
            return (InputTensor(name or "input_values", (batch, 1, samples), sizes.dtype),
                    seconds)
        samples = max(1, round(seconds * SAMPLE_RATE))
        return InputTensor(name or "input_values", (batch, samples), sizes.dtype), seconds
    if main != "input_features" and not _accepts(model, "input_features"):
        raise UnsupportedModelError(
            f"{type(model).__name__}: its forward takes neither input_values nor "
            "input_features (audio codes or another audio layout)"
        )
    audio = _audio_config(config)
    bins = None
    for cfg in (audio, config):
        for key in _FEATURE_SIZES:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                channels = getattr(cfg, "input_channels", 1) if key == "input_feat_per_channel" else 1
                bins = value * channels
                break
        if bins:
            break
    if bins is None and extractor in EMBEDDING_EXTRACTORS:
        # frames as wide as the model, read as its encoder's input embeddings
        width = getattr(config, "d_model", None) or getattr(config, "hidden_size", None)
        if isinstance(width, int):
            frames = max(1, round(seconds * EMBEDDING_EXTRACTORS[extractor]))
            return InputTensor(name or "input_features", (batch, frames, width), sizes.dtype), \
                seconds
    if bins is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: the number of filter-bank features per frame is not in "
            f"its config (looked for {', '.join(_FEATURE_SIZES)})"
        )
    positions = getattr(audio, "max_source_positions", None)
    key = name or "input_features"
    if isinstance(positions, int) and _whisper_style(config, bins):
        # Whisper-style encoders take exactly 2 x max_source_positions frames (two convs)
        frames = 2 * positions
        if sizes.audio_seconds is not None and round(seconds * FEATURE_FRAMES_PER_SECOND) != frames:
            raise EstimateError(
                f"{type(model).__name__} takes exactly {frames / FEATURE_FRAMES_PER_SECOND:g} s of "
                f"audio ({frames} frames); audio_seconds={sizes.audio_seconds}"
            )
        return (InputTensor(key, (batch, bins, frames), sizes.dtype),
                frames / FEATURE_FRAMES_PER_SECOND)
    frames = max(1, round(seconds * FEATURE_FRAMES_PER_SECOND))
    if extractor in STACKED_EXTRACTORS:
        width, stride = STACKED_EXTRACTORS[extractor]
        stacked = getattr(audio, "num_stacked_frames", None)
        bins *= stacked if isinstance(stacked, int) and stacked > 0 else width
        frames = -(-frames // stride)
    window = getattr(audio, "n_window", None)
    if isinstance(window, int) and window > 0:  # Qwen3-ASR pads to whole 2 x n_window chunks
        frames = -(-frames // (2 * window)) * 2 * window
    if extractor in CHANNELS_FIRST_EXTRACTORS:
        return InputTensor(key, (batch, bins, frames), sizes.dtype), seconds
    return InputTensor(key, (batch, frames, bins), sizes.dtype), seconds


def _audio_codes(model: nn.Module, config: Any, sizes: Sizes) -> StepInputs:
    """A speech model that reads or writes audio as a neural codec's codes, one code per
    codebook per frame, as its processor encodes them (the codec itself runs outside the
    forward):

    * text to codes (Dia): the text's ``input_ids`` B x S (bytes) to the encoder, the codes
      ``decoder_input_ids`` B x T x C (C = the decoder config's ``num_channels``) and their
      ``labels`` one row per codebook, B*C x T (its loss's layout);
    * codes beside text (Kyutai speech-to-text): ``input_ids`` B x S x (1 + C), each frame's
      text token then its C audio codes (``num_codebooks`` of ``codebook_vocab_size``), and the
      text ``labels`` B x S; S = ``seq_len`` frames (12.5 a second for Mimi's codes).

    Raises:
        UnsupportedModelError: another audio layout.
    """
    b, s = sizes.batch_size, sizes.seq_len
    name = type(model).__name__
    decoder = getattr(config, "decoder_config", None)
    channels = getattr(decoder, "num_channels", None)
    if isinstance(channels, int) and _accepts(model, "decoder_input_ids"):
        encoder = getattr(config, "encoder_config", None)
        text_vocab = getattr(encoder, "vocab_size", None) or _vocab(model, config)
        ids = _tokens("input_ids", b, s, text_vocab, ())
        target = _target_len(config, sizes)
        code_vocab = int(getattr(decoder, "vocab_size", 0))
        codes = _tokens("decoder_input_ids", b * channels, target, code_vocab,
                        _special_ids(decoder))
        assert codes.value is not None  # _tokens gives values
        value = codes.value.view(b, channels, target).transpose(1, 2).contiguous()
        labels = _tokens("labels", b * channels, target, code_vocab, _special_ids(decoder))
        return StepInputs("speech-seq2seq", (
            ids, InputTensor("decoder_input_ids", (b, target, channels), torch.long, value), labels,
        ), tokens=target, target_len=target)
    books, book_vocab = getattr(config, "num_codebooks", None), getattr(
        config, "codebook_vocab_size", None)
    if isinstance(books, int) and isinstance(book_vocab, int) and not _accepts(
            model, "decoder_input_ids"):
        vocab = _vocab(model, config)
        text = _tokens("input_ids", b, s, vocab, _special_ids(config))
        codes = _tokens("codes", b, s * books, book_vocab, _special_ids(config))
        assert text.value is not None and codes.value is not None  # _tokens gives values
        value = torch.cat([text.value.unsqueeze(2), codes.value.view(b, s, books)], dim=2)
        return StepInputs("speech-seq2seq", (
            InputTensor("input_ids", (b, s, 1 + books), torch.long, value),
            InputTensor("labels", (b, s), torch.long, text.value),
        ), tokens=s)
    raise UnsupportedModelError(
        f"{name}: its forward takes neither input_values nor input_features, and its config "
        "names no audio codes layout (decoder num_channels, or num_codebooks with "
        "codebook_vocab_size)"
    )


def _whisper_style(config: Any, bins: int) -> bool:
    """Whether the audio encoder is Whisper's: ``max_source_positions`` and ``num_mel_bins``
    (the features' bins) in its config; it takes bins x (2 x max_source_positions) frames."""
    audio = _audio_config(config)
    return isinstance(getattr(audio, "max_source_positions", None), int) \
        and getattr(audio, "num_mel_bins", None) == bins


def _frames(config: Any, audio: InputTensor) -> int:
    """Frames of filter-bank features B x frames x bins, or B x bins x frames where the
    model's feature extractor lays them out so (:data:`CHANNELS_FIRST_EXTRACTORS`, Whisper)."""
    if feature_extractor(config) in CHANNELS_FIRST_EXTRACTORS or _whisper_style(
            config, audio.shape[1]):
        return audio.shape[2]
    return audio.shape[1]


