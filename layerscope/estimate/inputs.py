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
                          reads, in its image processor's layout: :data:`GRID_LAYOUTS`; a
                          ``bbox`` per token for document models), ``labels`` = ``input_ids``;
                          Pix2Struct: ``flattened_patches`` and decoder ``labels`` B x T
image-classification      ``pixel_values`` B x C x H x W, ``labels`` one per image
speech-seq2seq            ``input_features`` (or ``input_values``) of ``audio_seconds``,
                          ``labels`` B x T
ctc                       ``input_features`` / ``input_values``, ``labels`` B x L
                          (L = :data:`CTC_LABELS_PER_SECOND` x seconds), and an
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
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from layerscope.errors import EstimateError, UnsupportedModelError

TASKS = ("causal-lm", "sequence-classification", "seq2seq", "image-text", "audio-text",
         "image-classification", "speech-seq2seq", "ctc", "audio-classification")

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

IMAGE_SIZE = 448
"""Pixels per side of an image for a model that takes any size (Qwen2-VL's patches, Pixtral):
448 x 448 is 1024 patches of 14 pixels, 256 tokens after a 2 x 2 merge."""


# -- the result --------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputTensor:
    """One argument of the forward.

    Attributes:
        name: the keyword, e.g. ``"pixel_values"``.
        shape, dtype: of the tensor.
        value: its values where the step's bookkeeping reads them (token ids, labels, grids),
            else None (pixel values, audio: their values change nothing).
        same_as: the name of another input this one *is* (``labels`` = ``input_ids``).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    value: torch.Tensor | None = field(default=None, repr=False, compare=False)
    same_as: str | None = None

    def describe(self) -> str:
        dims = " x ".join(str(d) for d in self.shape)
        return f"{self.name} {dims} {str(self.dtype).removeprefix('torch.')}"


@dataclass(frozen=True)
class StepInputs:
    """What the traced step feeds the model.

    Attributes:
        task: one of :data:`TASKS`.
        tensors: the forward's tensor arguments.
        tokens: tokens per sequence the text part reads (image tokens included), 0 without text.
        image_tokens: tokens per sequence that stand for images.
        target_len: decoder tokens per sequence of an encoder-decoder, else None.
        assumptions: what the traced step assumed where only a real step knows the values
            (:mod:`layerscope.estimate.values`: balanced routing), each a sentence.
    """

    task: str
    tensors: tuple[InputTensor, ...]
    tokens: int = 0
    image_tokens: int = 0
    target_len: int | None = None
    assumptions: tuple[str, ...] = ()

    def make(self, know: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None
             ) -> dict[str, torch.Tensor]:
        """The tensors, allocated in the active (fake) mode; ``know(tensor, value)`` is told
        the value of each (``None`` for those whose values are not given)."""
        out: dict[str, torch.Tensor] = {}
        for spec in self.tensors:
            if spec.same_as is not None:
                out[spec.name] = out[spec.same_as]
                continue
            t = torch.empty(spec.shape, dtype=spec.dtype)
            if know is not None:
                know(t, spec.value)
            out[spec.name] = t
        return out

    def for_inference(self) -> StepInputs:
        """The inputs of a forward without loss: no labels; an encoder-decoder gets its
        decoder tokens as ``decoder_input_ids`` instead."""
        kept = []
        names = {t.name for t in self.tensors}
        for t in self.tensors:
            if t.name != "labels":
                kept.append(t)
            elif self.target_len is not None and "decoder_input_ids" not in names:
                kept.append(InputTensor("decoder_input_ids", t.shape, t.dtype, t.value))
        return dataclasses.replace(self, tensors=tuple(kept))

    def describe(self) -> tuple[str, ...]:
        """One line per input, e.g. ``"input_ids 2 x 256 int64"``."""
        lines = [t.describe() if t.same_as is None else f"{t.name} = {t.same_as}"
                 for t in self.tensors]
        if self.image_tokens:
            lines.append(f"{self.image_tokens} image tokens per sequence")
        return (*lines, *self.assumptions)


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
@dataclass(frozen=True)
class Sizes:
    """The input settings of a setup (see :class:`~layerscope.setup.TrainingSetup`)."""

    batch_size: int
    seq_len: int
    target_len: int | None = None
    images: int | None = None
    image_size: int | None = None
    audio_seconds: float | None = None
    dtype: torch.dtype = torch.float32
    training: bool = True


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


# -- text --------------------------------------------------------------------------------------
def text_config(config: Any, decoder: bool = True) -> Any:
    """The config that holds the text model's sizes: ``config.get_text_config()`` (the text
    sub-config of a vision-language or speech model), else ``config`` itself."""
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get(decoder=decoder)
        except (TypeError, ValueError):  # several text configs, or an old signature
            return get()
    return config


UNICODE_CODE_POINTS = 0x110000
"""Ids of a character-level model without a vocabulary (CANINE: ids are Unicode code points,
U+0000 to U+10FFFF, hashed into ``num_hash_buckets`` embedding rows)."""


def _vocab(model: nn.Module, config: Any) -> int:
    """Token ids range over the text config's ``vocab_size`` (the input embeddings' rows when
    the config does not say; Unicode code points where the model hashes them into buckets)."""
    vlm = getattr(config, "vlm_config", None)  # an action model's vision-language model
    for cfg in (text_config(config), config, *([text_config(vlm)] if vlm is not None else [])):
        vocab = getattr(cfg, "vocab_size", None)
        if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0:
            return vocab
    if isinstance(getattr(config, "num_hash_buckets", None), int):
        return UNICODE_CODE_POINTS
    emb = getattr(model, "get_input_embeddings", lambda: None)
    try:
        module = emb()
    except (NotImplementedError, AttributeError):
        module = None
    if isinstance(module, nn.Embedding):
        return module.num_embeddings
    raise UnsupportedModelError(
        f"{type(model).__name__}: no vocabulary found (config.vocab_size, the text config's "
        "vocab_size or the input embeddings); the step's token ids cannot be built"
    )


def _special_ids(config: Any) -> frozenset[int]:
    """Every token id the config (and its sub-configs) names: padding, begin and end of
    sequence, image and audio placeholders, ..."""
    found: set[int] = set()
    seen: set[int] = set()

    def visit(cfg: Any) -> None:
        if cfg is None or id(cfg) in seen:
            return
        seen.add(id(cfg))
        for key, value in vars(cfg).items():
            if key.endswith(("_token_id", "_token_index", "_token_ids", "_id")) or key in (
                    "pad_index", "eos_index", "unk_index", "bos_index", "mask_index"):
                for v in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                        found.add(v)
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):
                visit(value)

    visit(config)
    return frozenset(found)


def _ordinary_id(vocab: int, specials: frozenset[int]) -> int:
    """The first token id that is no special token (what fills a sequence)."""
    for i in range(min(vocab, len(specials) + 2)):
        if i not in specials:
            return i
    raise UnsupportedModelError(f"every token id below {vocab} is a special token")


def _tokens(name: str, batch: int, length: int, vocab: int, specials: frozenset[int] | tuple[int, ...],
            eos: int | None = None) -> InputTensor:
    """Token ids: random in [0, vocab) (deterministic), special ids replaced by an ordinary one;
    ``eos`` closes every row."""
    generator = torch.Generator().manual_seed(0)
    value = torch.randint(0, vocab, (batch, length), generator=generator)
    if specials:
        ordinary = _ordinary_id(vocab, frozenset(specials))
        for special in specials:
            value[value == special] = ordinary
    if eos is not None:
        value[:, -1] = eos
    return InputTensor(name, (batch, length), torch.long, value)


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


# -- encoder-decoder -------------------------------------------------------------------------
def _is_encoder_decoder(model: nn.Module, config: Any) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False)) or _accepts(model, "decoder_input_ids")


def _decoder_positions(config: Any) -> int | None:
    """The decoder's maximum sequence length, where it has one."""
    for cfg in (text_config(config, decoder=True), config):
        for name in ("max_target_positions", "max_decoder_position_embeddings",
                     "max_position_embeddings", "n_positions"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _target_len(config: Any, sizes: Sizes) -> int:
    """``target_len``, else ``seq_len`` capped at the decoder's maximum length."""
    limit = _decoder_positions(config)
    if sizes.target_len is not None:
        if limit is not None and sizes.target_len > limit:
            raise EstimateError(
                f"target_len={sizes.target_len} exceeds the decoder's maximum length {limit}"
            )
        return sizes.target_len
    return min(sizes.seq_len, limit) if limit else sizes.seq_len


def _decoder_start(config: Any) -> int | None:
    for cfg in (config, text_config(config, decoder=True)):
        start = getattr(cfg, "decoder_start_token_id", None)
        if isinstance(start, int):
            return start
    return None


def _decoder(model: nn.Module, config: Any, batch: int, target: int) -> tuple[InputTensor, ...]:
    """``labels`` B x T, plus ``decoder_input_ids`` when the model cannot make them by shifting
    the labels (no ``decoder_start_token_id`` in its config)."""
    vocab = _vocab(model, config)
    labels = _tokens("labels", batch, target, vocab, _special_ids(config))
    if _decoder_start(config) is None and _accepts(model, "decoder_input_ids"):
        decoder_ids = _tokens("decoder_input_ids", batch, target, vocab, _special_ids(config))
        return labels, decoder_ids
    return (labels,)


# -- images ----------------------------------------------------------------------------------
QFORMER_TOKENS = 32
"""Tokens of the instruction a Q-Former reads (InstructBLIP's ``qformer_input_ids``): a short
prompt."""


def _has_vision(config: Any) -> bool:
    """False for a config with a slot for a vision config that is empty (the model then has no
    vision tower: transformers' default Gemma-4 config)."""
    slots = getattr(config, "sub_configs", None) or {}
    return "vision_config" not in slots or getattr(config, "vision_config", None) is not None


def _vision_config(config: Any) -> Any:
    """The config that holds the image sizes: ``vision_config``, a vision ``encoder``
    (VisionEncoderDecoder) or the ``vision_config`` of an encoder (T5Gemma-2) or of a wrapped
    vision-language model's ``vlm_config`` (PI0), else the config itself."""
    for name in ("vision_config", "encoder", "vision_encoder_config", "vlm_config"):
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            return _vision_config(sub) if name in ("encoder", "vlm_config") else sub
    return config


def _int_or_first(value: Any) -> int | None:
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _image_side(config: Any, sizes: Sizes, vision: Any = None) -> int:
    if sizes.image_size is not None:
        return sizes.image_size
    side = _int_or_first(getattr(vision or _vision_config(config), "image_size", None))
    return side if side else IMAGE_SIZE


def _channels(config: Any) -> int:
    vision = _vision_config(config)
    for name in ("num_channels", "in_channels", "in_chans"):
        value = getattr(vision, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 3


PIXEL_VALUE = 0.5
"""Every normalised pixel value: a grey image. Its values are known to the trace, so a model
that tells images from padding by their pixels (Idefics: an all-zero image is padding) sees an
image."""


def _pixels(shape: tuple[int, ...], dtype: torch.dtype, name: str = "pixel_values"
            ) -> InputTensor:
    """Pixel values of :data:`PIXEL_VALUE` (one stored element, expanded: no memory)."""
    return InputTensor(name, shape, dtype, torch.full((), PIXEL_VALUE, dtype=dtype).expand(shape))


def _pixel_values(model: nn.Module, config: Any, count: int, sizes: Sizes) -> InputTensor:
    side = _image_side(config, sizes)
    return _pixels((count, _channels(config), side, side), sizes.dtype)


def _anyres_patches(config: Any, side: int) -> int:
    """Crops of the largest tiling LLaVA-NeXt's processor makes (its ``image_grid_pinpoints``)
    plus the downscaled whole image: the processor pads every image to that many."""
    pinpoints = getattr(config, "image_grid_pinpoints", None) or [[side, side]]
    return 1 + max(math.ceil(int(h) / side) * math.ceil(int(w) / side) for h, w in pinpoints)


PATCH_IMAGES = {
    "fuyu": "rows",  # FuyuImageProcessor: (images, patches, P x P x C)
    "inkling_mm_model": "clips",  # InklingImageProcessor: (patches, T, P, P, C)
}
"""Model types whose image processor hands over an image's ``patch_size`` patches, not the
image: ``rows``, per image one row of P x P x C pixel values per patch (Fuyu embeds them
linearly, without a vision tower); ``clips``, the patches of every image stacked, each
repeated over the vision config's ``temporal_patch_size`` frames, channels last. Both pad the
image to whole patches. Read from the processors' source in transformers 5.24."""

IMAGE_MASKS = frozenset({"granite_docling", "pi0"})
"""Model types whose ``pixel_attention_mask`` marks whole images (Granite-Docling's tiles,
PI0's cameras: B x N booleans, as their image processors write it), not pixels."""


CROP_MARGIN_PATCHES = 4
"""Patches each crop of Molmo2's image processor overlaps its neighbours by, on each side
(its ``overlap_margins`` [4, 4])."""
POOLED_PATCHES = 2
"""Patches per side that Molmo2 pools into one image token (its processor's ``pooling_size``
[2, 2])."""


def _pooling_rows(side: int, offset: int) -> torch.Tensor:
    """Which of a ``side`` x ``side`` grid of patches (numbered from ``offset``, row-major)
    each image token pools: the grid padded with -1 (nothing) to whole
    :data:`POOLED_PATCHES`-square windows, the padding split before and after, one row of
    window indices per token, windows row-major."""
    pool = POOLED_PATCHES
    padded = -(-side // pool) * pool
    grid = torch.full((padded, padded), -1, dtype=torch.long)
    start = (padded - side) // 2
    grid[start:start + side, start:start + side] = offset + torch.arange(side * side).view(
        side, side)
    cells = padded // pool
    return grid.view(cells, pool, cells, pool).permute(0, 2, 1, 3).reshape(-1, pool * pool)


def _crop_pooled_images(model: nn.Module, config: Any, vision: Any, count: int, side: int,
                        channels: int, dtype: torch.dtype) -> tuple[InputTensor, ...]:
    """Molmo2: each image as its processor hands it over for an image no larger than one crop
    (the vision config's ``image_size``): the image resized to a crop, then the crop itself,
    each as rows of P x P x C patch values; ``image_token_pooling``, the patches each token
    pools (:func:`_pooling_rows`, numbered across the batch); ``image_grids``, the pooled
    grids of both views; ``image_num_crops``, 2 per image.

    Raises:
        UnsupportedModelError: a larger image, which the processor tiles into overlapping
            crops (not built here).
    """
    crop = _int_or_first(getattr(vision, "image_size", None))
    patch = _int_or_first(getattr(vision, "patch_size", None))
    if not crop or not patch:
        raise UnsupportedModelError(
            f"{type(model).__name__}: its crops need the vision config's image_size and "
            "patch_size"
        )
    if side > crop:
        raise UnsupportedModelError(
            f"{type(model).__name__}: image_size={side} is tiled into overlapping crops of "
            f"{crop} pixels by its processor, which layerscope does not build; use "
            f"image_size <= {crop}"
        )
    per_side = crop // patch
    patches = per_side * per_side
    rows = [_pooling_rows(per_side, (2 * i + view) * patches)
            for i in range(count) for view in (0, 1)]
    pooling = torch.cat(rows)
    cells = -(-per_side // POOLED_PATCHES)
    return (
        _pixels((2 * count, patches, patch * patch * channels), dtype),
        InputTensor("image_token_pooling", tuple(pooling.shape), torch.long, pooling),
        InputTensor("image_grids", (count, 4), torch.long,
                    torch.tensor([[cells, cells, cells, cells]] * count)),
        InputTensor("image_num_crops", (count,), torch.long,
                    torch.full((count,), 2, dtype=torch.long)),
    )


def _image_inputs(model: nn.Module, config: Any, batch: int, per_sequence: int, sizes: Sizes
                  ) -> tuple[InputTensor, ...]:
    """The vision inputs of ``per_sequence`` images in each of ``batch`` sequences, in the
    layout the model's forward takes (read from its signature and config):

    * ``image_grid_thw`` (Qwen2-VL, GLM-4V, ...): flattened patches of ``patch_size`` pixels
      (times ``temporal_patch_size`` frames), ``image_size`` rounded to whole merged cells;
    * an image's patches (:data:`PATCH_IMAGES`: Fuyu, Inkling); Molmo2's crops with the
      indices its tokens pool (:func:`_crop_pooled_images`);
    * ``pixel_attention_mask`` (Idefics2/3, SmolVLM): one row of images per sequence, masked
      per pixel (per image: :data:`IMAGE_MASKS`);
    * ``image_sizes`` with ``image_grid_pinpoints`` (LLaVA-NeXt): every image padded to the
      largest tiling; ``image_sizes`` alone (Pixtral, Mistral-3): the sizes of plain images;
    * otherwise one ``C x H x W`` image each.
    """
    vision = _vision_config(config)
    side = _image_side(config, sizes)
    count = batch * per_sequence
    channels = _channels(config)
    extra: list[InputTensor] = []
    if _accepts(model, "high_res_pixel_values"):  # DeepSeek-VL hybrid: a second, larger view
        high = getattr(config, "high_res_vision_config", None)
        hside = _image_side(config, sizes, high) if sizes.image_size is None else side
        extra.append(_pixels((count, channels, hside, hside), sizes.dtype,
                             "high_res_pixel_values"))
    if _accepts(model, "spatial_shapes"):  # SigLIP-2 NaFlex: padded rows of patches
        patch = _int_or_first(getattr(vision, "patch_size", None)) or 16
        cells = max(1, side // patch)
        rows = getattr(vision, "num_patches", None) or cells * cells
        cells = min(cells, math.isqrt(rows))
        width = channels * patch * patch
        mask = torch.zeros(count, rows, dtype=torch.long)
        mask[:, : cells * cells] = 1
        return (_pixels((count, rows, width), sizes.dtype),
                InputTensor("spatial_shapes", (count, 2), torch.long,
                            torch.tensor([[cells, cells]] * count)),
                InputTensor("pixel_attention_mask", (count, rows), torch.long, mask), *extra)
    if _accepts(model, "image_grid_thw") or _accepts(model, "image_grid_hw"):
        return (*_grid_images(model, config, vision, count, side, channels, sizes.dtype),
                *extra)
    if _accepts(model, "image_token_pooling"):
        return (*_crop_pooled_images(model, config, vision, count, side, channels, sizes.dtype),
                *extra)
    model_type = getattr(config, "model_type", None)
    if model_type in PATCH_IMAGES:
        patch = _int_or_first(getattr(vision, "patch_size", None)) or 1
        cells = math.ceil(side / patch) ** 2
        if PATCH_IMAGES[model_type] == "clips":
            temporal = _first_int(vision, _TEMPORAL_SIZES) or 1
            shape: tuple[int, ...] = (count * cells, temporal, patch, patch, channels)
        else:
            shape = (count, cells, channels * patch * patch)
        return _pixels(shape, sizes.dtype), *extra
    if _accepts(model, "pixel_attention_mask"):
        shape = (batch, per_sequence, channels, side, side)
        mask = torch.ones(batch, per_sequence, side, side, dtype=torch.bool)
        if model_type in IMAGE_MASKS:
            mask = torch.ones(batch, per_sequence, dtype=torch.bool)
        return (_pixels(shape, sizes.dtype),
                InputTensor("pixel_attention_mask", tuple(mask.shape), torch.bool, mask), *extra)
    if _accepts(model, "image_sizes"):
        image_sizes = InputTensor("image_sizes", (count, 2), torch.long,
                                  torch.tensor([[side, side]] * count))
        if getattr(config, "image_grid_pinpoints", None):
            patches = _anyres_patches(config, side)
            shape = (count, patches, channels, side, side)
            return _pixels(shape, sizes.dtype), image_sizes, *extra
        if not _accepts(model, "vision_feature_select_strategy"):  # Pixtral-style towers
            return _pixel_values(model, config, count, sizes), image_sizes, *extra
    return _pixel_values(model, config, count, sizes), *extra


_MERGE_SIZES = ("spatial_merge_size", "merge_size", "merge_kernel_size")
_TEMPORAL_SIZES = ("temporal_patch_size", "patch_temporal")

GRID_LAYOUTS = {
    # model type: (pixel layout, merge size of an image), as its image processor writes them
    "kimi_k25": ("patches", None),  # Kimi_K25ImageProcessor: (patches, C, P, P)
    "paddleocr_vl": ("patches", None),  # PaddleOCRVLImageProcessor: (patches, C x T, P, P)
    "inkling2": ("cells", None),  # Inkling2ImageProcessor: (tokens, M x P, M x P, C)
    "inkling2_loop": ("cells", None),  # the same processor
    "video_llama_3": ("rows", 1),  # VideoLlama3ImageProcessor: images unmerged
}
"""Pixel layouts of the image processors that differ from Qwen2-VL's, for models that take an
``image_grid_thw``. ``rows`` (every other model, Qwen2-VL's processor): one row of
C x T x P x P values per patch (T = the temporal patch size, an image repeated T times), the
grid in patches; ``patches``: one C x P x P patch each; ``cells``: one merged M x M cell of
patches per image token, channels last, the grid in tokens. The second value, where given, is
the processor's merge size for images (``image_merge_sizes``), else the vision config's.
Read from each processor's source in transformers 5.24: the layout is the processor's, the
model's forward takes it as is, and nothing in the model's config names it. (The processors
themselves need Pillow or torchvision, which layerscope does not install.)"""


def _first_int(config: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = _int_or_first(getattr(config, name, None))
        if value:
            return value
    return None


def _grid_images(model: nn.Module, config: Any, vision: Any, count: int, side: int,
                 channels: int, dtype: torch.dtype) -> tuple[InputTensor, ...]:
    """``count`` images as patches with an ``image_grid_thw`` (Qwen2-VL and its relatives) or
    ``image_grid_hw`` (Nemotron-H Omni): ``side`` rounded down to whole merged cells (merged
    by the vision config's merge size, or the inverse of the config's pixel-shuffle
    ``downsample_ratio``), the pixels in the layout of the model's image
    processor (:data:`GRID_LAYOUTS`), and ``image_merge_sizes`` where the forward takes them."""
    patch = _int_or_first(getattr(vision, "patch_size", None)) or 14
    layout, image_merge = GRID_LAYOUTS.get(getattr(config, "model_type", ""), ("rows", None))
    ratio = getattr(config, "downsample_ratio", None)  # a pixel shuffle by this ratio
    shuffle = round(1 / ratio) if isinstance(ratio, float) and 0 < ratio < 1 else None
    merge = image_merge or _first_int(vision, _MERGE_SIZES) or shuffle or 1
    temporal = _first_int(vision, _TEMPORAL_SIZES) or 1
    cells = max(1, side // (patch * merge)) * merge
    patches = count * cells * cells
    if layout == "patches":
        shape: tuple[int, ...] = (patches, channels * temporal, patch, patch)
    elif layout == "cells":
        shape = (patches // (merge * merge), merge * patch, merge * patch, channels)
    else:
        shape = (patches, channels * temporal * patch * patch)
    grid = [1, cells // merge, cells // merge] if layout == "cells" else [1, cells, cells]
    name = "image_grid_thw"
    if not _accepts(model, name):  # Nemotron-H Omni: height and width only
        name, grid = "image_grid_hw", grid[1:]
    out = [_pixels(shape, dtype),
           InputTensor(name, (count, len(grid)), torch.long, torch.tensor([grid] * count))]
    if _accepts(model, "image_merge_sizes"):
        out.append(InputTensor("image_merge_sizes", (count,), torch.long,
                               torch.full((count,), merge, dtype=torch.long)))
    return tuple(out)


VIDEO_FRAMES = 4
"""Frames per clip of a model that reads only videos (InstructBLIP-Video: its processor
samples four frames, and the model's Q-Former makes ``num_query_tokens`` tokens per frame)."""


def _video_only(model: nn.Module) -> bool:
    """Whether ``model`` reads its pixels as videos only (a ``get_video_features`` and no
    ``get_image_features``, on it or its inner model)."""
    owners = (model, getattr(model, "model", None))
    return not any(callable(getattr(o, "get_image_features", None)) for o in owners) and any(
        callable(getattr(o, "get_video_features", None)) for o in owners)


def _placeholder_id(config: Any, modality: str) -> int | None:
    for cfg in (config, text_config(config), getattr(config, "vlm_config", None)):
        for name in (f"{modality}_token_id", f"{modality}_token_index"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


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


def _padding_mask(model: nn.Module, audio: InputTensor) -> tuple[InputTensor, ...]:
    """The mask of real samples that waveform extractors return next to ``input_values``
    (``padding_mask``, B x samples: all real), where the forward takes one."""
    if not _accepts(model, "padding_mask") or audio.name != "input_values":
        return ()
    shape = (audio.shape[0], audio.shape[-1])
    return (InputTensor("padding_mask", shape, torch.bool, torch.ones(shape, dtype=torch.bool)),)


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


TOKEN_BOX = (0.25, 0.25, 0.75, 0.75)
"""The bounding box of every token of a document model (UDOP): (x0, y0, x1, y1) as fractions
of the page, as UDOP's forward reads them (it places each token on the image patch under its
box's centre)."""


def _boxes(batch: int, length: int, dtype: torch.dtype) -> InputTensor:
    """``bbox`` B x S x 4: every token's box (:data:`TOKEN_BOX`)."""
    value = torch.tensor(TOKEN_BOX, dtype=dtype).expand(batch, length, 4)
    return InputTensor("bbox", (batch, length, 4), dtype, value)


def _action_inputs(model: nn.Module, config: Any, sizes: Sizes, vocab: int,
                   specials: frozenset[int], count_tokens: Callable[..., int] | None
                   ) -> StepInputs:
    """A vision-language-action model (PI0): ``images`` camera views per sample
    (B x N x C x H x W, a ``pixel_attention_mask`` per view), each a run of image tokens in
    ``input_ids`` as long as its vision-language model's ``get_image_features`` makes one
    image (the model hands it the views flattened), the robot ``state``
    (B x ``max_state_dim``) and, as the training target, ``actions``
    (B x ``chunk_size`` x ``max_action_dim``); no token labels."""
    b, s = sizes.batch_size, sizes.seq_len
    name = type(model).__name__
    cams = 1 if sizes.images is None else sizes.images
    token = _placeholder_id(config, "image")
    sizes_needed = [getattr(config, k, None) for k in ("max_state_dim", "chunk_size",
                                                       "max_action_dim")]
    if token is None or count_tokens is None or not all(
            isinstance(v, int) and v > 0 for v in sizes_needed):
        raise UnsupportedModelError(
            f"{name}: an action model needs its image token id and its config's "
            "max_state_dim, chunk_size and max_action_dim"
        )
    state_dim, chunk, action_dim = cast(list[int], sizes_needed)
    side, channels = _image_side(config, sizes), _channels(config)
    per_item = count_tokens("get_image_features", (_pixels((1, channels, side, side),
                                                            sizes.dtype),))
    if (per_item + 1) * cams > s:
        raise EstimateError(
            f"seq_len={s} cannot hold {cams} image(s) of {per_item} tokens each ({name} at "
            f"image_size {side}): use seq_len >= {(per_item + 1) * cams}, fewer images or a "
            "smaller image_size"
        )
    ids = _tokens("input_ids", b, s, vocab, specials)
    value = cast(torch.Tensor, ids.value).clone()
    for k in range(cams):
        value[:, k * (per_item + 1):k * (per_item + 1) + per_item] = token
    mask = torch.ones(b, cams, dtype=torch.bool)
    tensors = (
        InputTensor("input_ids", ids.shape, ids.dtype, value),
        _pixels((b, cams, channels, side, side), sizes.dtype),
        InputTensor("pixel_attention_mask", (b, cams), torch.bool, mask),
        InputTensor("state", (b, state_dim), sizes.dtype),
        InputTensor("actions", (b, chunk, action_dim), sizes.dtype),
    )
    return StepInputs("image-text", tensors, tokens=s, image_tokens=per_item * cams)


def _attending_images(model: nn.Module, config: Any, sizes: Sizes, vocab: int,
                      specials: frozenset[int]) -> StepInputs:
    """Idefics: the text reads its images through cross-attention, not placeholder tokens:
    ``pixel_values`` B x N x C x H x W, and ``image_attention_mask`` B x S x N, one-hot per
    token on the last image at or before it, as IdeficsProcessor marks it (the images open
    the sequence, one token each)."""
    b, s = sizes.batch_size, sizes.seq_len
    images = 1 if sizes.images is None else sizes.images
    if images > s:
        raise EstimateError(f"seq_len={s} cannot hold {images} image token(s): use seq_len >= "
                            f"{images}")
    side = _image_side(config, sizes)
    ids = _tokens("input_ids", b, s, vocab, specials)
    mask = torch.zeros(b, s, images, dtype=torch.long)
    for t in range(s):
        mask[:, t, min(t, images - 1)] = 1
    tensors = (
        ids,
        _pixels((b, images, _channels(config), side, side), sizes.dtype),
        InputTensor("image_attention_mask", (b, s, images), torch.long, mask),
        InputTensor("labels", ids.shape, ids.dtype, same_as="input_ids"),
    )
    return StepInputs("image-text", tensors, tokens=s)


FLATTENED_PATCHES = 2048
"""Patches per image of Pix2Struct (and its relatives that take ``flattened_patches``): its
image processor's ``max_patches``, to which every image is resized and padded."""


def _flattened_patches(model: nn.Module, config: Any, sizes: Sizes) -> StepInputs:
    """Pix2Struct: an image-to-text encoder-decoder whose encoder reads
    :data:`FLATTENED_PATCHES` rows of (row index, column index, the patch's C x P x P
    values), with their mask, and whose decoder is trained on ``labels`` B x T."""
    b = sizes.batch_size
    width = getattr(_vision_config(config), "patch_embed_hidden_size", None)
    if not isinstance(width, int) or width < 1:
        raise UnsupportedModelError(
            f"{type(model).__name__}: flattened_patches need the values per patch "
            "(the vision config's patch_embed_hidden_size)"
        )
    patches = (b, FLATTENED_PATCHES, 2 + width)
    mask = torch.ones(b, FLATTENED_PATCHES, dtype=torch.long)
    target = _target_len(config, sizes)
    tensors = (_pixels(patches, sizes.dtype, "flattened_patches"),
               InputTensor("attention_mask", tuple(mask.shape), torch.long, mask),
               *_decoder(model, config, b, target))
    return StepInputs("image-text", tensors, tokens=target, target_len=target)


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


def _cross_attention_images(model: nn.Module, config: Any, sizes: Sizes, vocab: int,
                            specials: frozenset[int]) -> StepInputs:
    """A cross-attention vision-language model (Mllama, Llama-3.2-Vision): one placeholder
    token per image in the text, the images as tiles (padded to ``max_num_tiles``, one used:
    an image no larger than a tile) that the text attends to."""
    b, s = sizes.batch_size, sizes.seq_len
    images = 1 if sizes.images is None else sizes.images
    vision = _vision_config(config)
    tiles = getattr(vision, "max_num_tiles", None) or 1
    side = _image_side(config, sizes)
    token = _placeholder_id(config, "image")
    if images + 1 > s:
        raise EstimateError(f"seq_len={s} cannot hold {images} image token(s): use seq_len >= "
                            f"{images + 1}")
    ids = _tokens("input_ids", b, s, vocab, specials)
    if token is not None and ids.value is not None:
        value = ids.value.clone()
        value[:, :images] = token
        ids = InputTensor("input_ids", ids.shape, ids.dtype, value)
    used = torch.zeros(b, images, tiles, dtype=torch.long)
    used[:, :, 0] = 1
    cross = torch.zeros(b, s, images, tiles, dtype=torch.long)
    cross[:, :, :, 0] = 1
    tensors = (
        ids,
        _pixels((b, images, tiles, _channels(config), side, side), sizes.dtype),
        InputTensor("aspect_ratio_ids", (b, images), torch.long,
                    torch.ones(b, images, dtype=torch.long)),
        InputTensor("aspect_ratio_mask", tuple(used.shape), torch.long, used),
        InputTensor("cross_attention_mask", tuple(cross.shape), torch.long, cross),
        InputTensor("labels", ids.shape, ids.dtype, same_as="input_ids"),
    )
    return StepInputs("image-text", tensors, tokens=s, image_tokens=images)


def count_features(out: Any) -> int:
    """Feature vectors in what a ``get_image_features`` (``get_audio_features``) returned: its
    ``pooler_output`` (the projected features, transformers 5), else the tensor(s) themselves;
    each vector is one token."""
    value = out
    for attr in ("pooler_output", "image_embeds", "audio_embeds", "last_hidden_state"):
        if hasattr(out, attr) and getattr(out, attr) is not None:
            value = getattr(out, attr)
            break
    if isinstance(value, torch.Tensor):
        return value.numel() // value.shape[-1] if value.dim() else 0
    if isinstance(value, (list, tuple)):
        return sum(count_features(v) for v in value)
    raise UnsupportedModelError(
        f"get_image_features returned {type(out).__name__}; its tokens cannot be counted"
    )


def _feature_owners(model: nn.Module) -> list[Any]:
    """Where a feature function may live: the model, its inner ``model``, and the
    vision-language model (``vlm``) an action model wraps (PI0)."""
    inner = getattr(model, "model", None)
    return [model, inner, getattr(inner, "vlm", None)]


def features_function(model: nn.Module, name: str) -> Callable[..., Any]:
    """``model.<name>`` (``get_image_features``, ``get_audio_features``), or its inner model's
    where the outer one only passes ``*args, **kwargs`` on."""
    found = []
    for owner in _feature_owners(model):
        get = getattr(owner, name, None)
        if callable(get):
            found.append(get)
    for get in found:
        if named_parameters(get):
            return get  # type: ignore[no-any-return]
    if found:
        return found[0]  # type: ignore[no-any-return]
    raise UnsupportedModelError(
        f"{type(model).__name__} has no {name}; its placeholder tokens cannot be counted"
        + (" (estimate it with images=0 for text only)" if "image" in name else "")
    )


def feature_arguments(model: nn.Module, name: str) -> set[str]:
    """The keywords ``model.<name>`` takes: those it names, and where it passes ``**kwargs``
    on to its inner model's function of that name (Video-LLaMA-3: ``image_merge_sizes``),
    those that one names too."""
    accepted: set[str] = set()
    for owner in _feature_owners(model):
        get = getattr(owner, name, None)
        if not callable(get):
            continue
        accepted |= named_parameters(get)
        if not _takes_kwargs(get):
            break
    return accepted


def required_arguments(model: nn.Module, name: str) -> set[str]:
    """The arguments ``model.<name>`` cannot do without (no default), followed through
    ``**kwargs`` to its inner model's function as :func:`feature_arguments` does."""
    required: set[str] = set()
    for owner in _feature_owners(model):
        get = getattr(owner, name, None)
        if not callable(get):
            continue
        try:
            params = inspect.signature(get).parameters.values()
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            break
        required |= {p.name for p in params if p.default is p.empty
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not _takes_kwargs(get):
            break
    return required


def _takes_kwargs(func: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    return any(p.kind is p.VAR_KEYWORD for p in params)


def named_parameters(func: Callable[..., Any]) -> set[str]:
    """The parameters ``func`` names (not ``*args``/``**kwargs``)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return set()
    return {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


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


# -- helpers ---------------------------------------------------------------------------------
def _accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
