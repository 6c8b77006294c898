"""The image and vision-language inputs of a step: pixel values in each model's layout.

This module owns how images reach a model's forward: plain ``C x H x W`` pixel values (of
:data:`PIXEL_VALUE`, a grey image), patches with an ``image_grid_thw`` in the layout of the
model's image processor (:data:`GRID_LAYOUTS`), images handed over as patches
(:data:`PATCH_IMAGES`), masks per pixel or per image (:data:`IMAGE_MASKS`), Molmo2's crops
with the patches each token pools, any-resolution tilings, NaFlex rows, videos
(:data:`VIDEO_FRAMES`), Pix2Struct's flattened patches, document boxes (:data:`TOKEN_BOX`),
a vision-language-action model's cameras, state and actions, and images read through
cross-attention (Idefics, Mllama). :mod:`layerscope.estimate.inputs` decides which of these a
model gets and places the image tokens in its text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from layerscope.errors import EstimateError, UnsupportedModelError
from layerscope.estimate.input_types import (
    InputTensor,
    Sizes,
    StepInputs,
    _accepts,
    _decoder,
    _placeholder_id,
    _target_len,
    _tokens,
)

IMAGE_SIZE = 448
"""Pixels per side of an image for a model that takes any size (Qwen2-VL's patches, Pixtral):
448 x 448 is 1024 patches of 14 pixels, 256 tokens after a 2 x 2 merge."""


# -- images ----------------------------------------------------------------------------------
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


