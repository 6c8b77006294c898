"""The shared parts of a step's inputs: the result types and the helpers every modality uses.

This module owns what :mod:`layerscope.estimate.inputs` (the entry point and the text, class
and sequence-to-sequence inputs), :mod:`layerscope.estimate.image_inputs` and
:mod:`layerscope.estimate.audio_inputs` all build on: the frozen results (:class:`InputTensor`,
:class:`StepInputs`) and settings (:class:`Sizes`), the text config, vocabulary and token-id
builders (ids that avoid every special token), the encoder-decoder targets, placeholder token
ids, the forward-signature check, and the readers of a model's ``get_*_features`` functions
(their arguments, and the tokens counted from what they return). It imports none of those
modules, so they import it without a cycle.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layerscope.errors import EstimateError, UnsupportedModelError

TASKS = ("causal-lm", "sequence-classification", "seq2seq", "image-text", "audio-text",
         "image-classification", "speech-seq2seq", "ctc", "audio-classification")


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


def _placeholder_id(config: Any, modality: str) -> int | None:
    for cfg in (config, text_config(config), getattr(config, "vlm_config", None)):
        for name in (f"{modality}_token_id", f"{modality}_token_index"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


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


# -- helpers ---------------------------------------------------------------------------------
def _accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
