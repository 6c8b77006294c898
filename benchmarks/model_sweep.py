"""Every Hugging Face model type, built tiny, through the whole pre-flight.

Run: ``PYTHONPATH=. python benchmarks/model_sweep.py [--filter TEXT] [--jobs N] [--out FILE]``

For every model type of the installed transformers that has a causal-LM, seq2seq,
classification (sequence, image, audio), image-text, speech-seq2seq or CTC head, and for each
such head class of the type:

1. a *tiny config* is made from the type's default config (:func:`tiny_config`): widths,
   experts and depth shrunk, in the type's sub-configs too; where transformers rejects the
   shrunk values, gentler shrinks are tried (depth only, then the default config);
2. transformers builds the head class from it on the meta device; a type it cannot build is
   reported as such and not counted against layerscope;
3. transformers saves the config (``save_pretrained``), and layerscope goes from that
   ``config.json`` through every step a user takes: ``build`` (``empty_model``), ``scan``
   (the block stack), ``plan`` (``lp-lora`` resolved against the scan), ``memory``
   (``estimate_memory`` with that plan, batch 2), ``time`` (``estimate_step_time``, same
   setup) and ``summary`` (``layerscope summary`` on the command line, in-process).

A type passes when every head class tried passes every step. The table (markdown) gives per
type the verdict, the heads tried, and for a failure the step and the first line of the error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

HEADS = (
    ("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("image-text", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    ("seq2seq", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("speech-seq2seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
    ("ctc", "MODEL_FOR_CTC_MAPPING_NAMES"),
    ("sequence-classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("image-classification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("audio-classification", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"),
)
"""The head families swept, with transformers' auto mapping (model type -> class name)."""

STEPS = ("build", "scan", "plan", "memory", "time", "summary")
BATCH = 2
"""Sequences per step: more than one, so per-sequence and per-token labels differ."""
SEQ_LEN = 64
"""Tokens per sequence asked for (less where the model's text config allows fewer positions;
more where the images of a vision-language model need more)."""
TASK_TIMEOUT_S = 180
REAL_STEP_MAX_PARAMS = 50_000_000
"""Largest real tiny model stepped on the CPU to tell transformers' failures from ours (a
larger one, whose tiny config keeps default widths somewhere, can outlast the alarm)."""
STALL_S = TASK_TIMEOUT_S + 30
"""Seconds without any finished task after which the pool is taken as stalled."""

# -- tiny configs -----------------------------------------------------------------------------
WIDTH = 64
SIZES = {
    # widths
    "hidden_size": WIDTH, "n_embd": WIDTH, "d_model": WIDTH, "embed_dim": WIDTH,
    "word_embed_proj_dim": WIDTH, "projection_dim": WIDTH,
    # heads: 4 x 16
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "head_dim": 16, "attention_head_dim": 16, "n_heads": 4,
    # feed-forward
    "intermediate_size": 128, "ffn_dim": 128, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
    "d_ff": 128, "n_inner": 128, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "ffn_hidden_size": 128, "mlp_dim": 128,
    # a vision (or audio) projector's output: the text model's width
    "out_hidden_size": WIDTH, "text_hidden_size": WIDTH, "output_hidden_size": WIDTH,
}
KV_HEADS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads")
EXPERTS = {"num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4}
TOP_K = ("num_experts_per_tok", "moe_topk", "top_k", "moe_k")
DEPTHS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers",
          "num_decoder_layers", "depth", "num_encoder_layers", "n_layers")
TYPE_FIXES: dict[str, dict[str, Any]] = {
    # transformers' default config pairs a 224-pixel SigLIP tower with 256 tokens per image,
    # which its own pooling cannot make; the published checkpoints use 896 pixels, 14-pixel
    # patches (google/gemma-3-4b-it)
    "gemma3": {"vision_config": {"image_size": 896, "patch_size": 14}},
    "shieldgemma2": {"vision_config": {"image_size": 896, "patch_size": 14}},
    # the same SigLIP tower inside the encoder (google/t5gemma-2-270m-270m: 896 and 14)
    "t5gemma2": {"encoder": {"vision_config": {"image_size": 896, "patch_size": 14}}},
    # default 384-pixel tower: 27 patches per side, which the 2 x 2 pixel shuffle cannot
    # split; CohereLabs/aya-vision-8b uses 364 pixels (26 patches)
    "aya_vision": {"vision_config": {"image_size": 364}},
    # default 224-pixel, 32-pixel-patch tower: 49 patches, not a size its projector has
    # queries for; rhymes-ai/Aria uses 980 pixels and 14-pixel patches
    "aria": {"vision_config": {"image_size": 980, "patch_size": 14}},
    # default 224-pixel, 32-pixel-patch tower: 7 patches per side, which the 2 x 2 pixel
    # shuffle cannot split; HuggingFaceM4/Idefics3-8B-Llama3 uses 364 pixels, 14-pixel
    # patches (26 per side), HuggingFaceTB/SmolVLM-Instruct 384 and 14 with a 3 x 3 shuffle
    # no experts per token in the default config (topk of None); deepseek-ai/DeepSeek-V2-Lite
    # routes each token to 6 of its 64
    "deepseek_v2": {"num_experts_per_tok": 6},
    # the default vision tower (768 wide) makes 3072 features per shuffled patch, its
    # projector takes 5632; meta-llama/Llama-4-Scout-17B-16E: 1408 wide, 336 pixels, 4096 out
    "llama4": {"vision_config": {"hidden_size": 1408, "image_size": 336,
                                 "vision_output_dim": 4096}},
    # no image placeholder token in the default config; nvidia's Nemotron-H Omni checkpoints
    # set img_context_token_id 18
    "nemotron_h_omni": {"image_token_id": 18},
    # the default adapter projects into 3584 features (Molmo 1's Qwen2-7B) while the default
    # text model is 4096 wide (Qwen3-8B, as allenai/Molmo2-8B): the text model's width
    "molmo2": {"adapter_config": {"text_hidden_size": 4096}},
    # no image placeholder token in the default configs of the Q-Former models (their OPT
    # text model's); Salesforce/blip2-opt-2.7b sets image_token_index 50265
    "blip-2": {"image_token_index": 50265},
    "instructblip": {"image_token_index": 50265},
    "instructblipvideo": {"video_token_index": 50265},
    "idefics3": {"vision_config": {"image_size": 364, "patch_size": 14}},
    "smolvlm": {"scale_factor": 3, "vision_config": {"image_size": 384, "patch_size": 14}},
    # the audio projector's output (3584 by default) must be the text model's width (2048 by
    # default), as in Qwen/Qwen3-ASR-1.7B, whose Qwen3-1.7B text model is 2048 wide
    "qwen3_asr": {"audio_config": {"output_dim": 2048}},
    # no audio placeholder in the default config, so no audio reaches the text model;
    # mistralai/Voxtral-Mini-3B-2507 places its audio at token 24 (as transformers' docstring)
    "voxtral": {"audio_token_id": 24},
    # the Q-Former projector cross-attends to the speech encoder's output, 1024 wide
    # (encoder hidden_dim), not 1408 (its BLIP-2 default), as in ibm-granite/granite-speech-3.3-2b
    "granite_speech": {"projector_config": {"encoder_hidden_size": 1024}},
    "granite_speech_plus": {"projector_config": {"encoder_hidden_size": 1024}},
}
"""Config values taken from a published checkpoint where transformers' default config
contradicts itself (an image its own vision tower cannot turn into the number of tokens the
rest of the config expects). Applied at every size."""

TINY_FIXES: dict[str, dict[str, Any]] = {
    # Llama-4's pixel-shuffle MLP takes hidden_size / pixel_shuffle_ratio^2 features (1408 x 4
    # = 5632 in meta-llama/Llama-4-Scout-17B-16E): 4 x 64 at the tiny width; its projector
    # widths (4096) shrink with it
    "llama4": {"vision_config": {"intermediate_size": 4 * WIDTH, "vision_output_dim": WIDTH,
                                 "projector_input_dim": WIDTH, "projector_output_dim": WIDTH}},
}
"""Sizes tied to others by a rule of the model that the generic shrink (:data:`SIZES`) breaks,
written over the tiny config only."""

MAX_DEPTH = 2
"""Blocks per stack, unless more are needed for every layer type to appear once."""


def _fields(cls: type) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}


def _depth(config: Any) -> tuple[str | None, int]:
    for name in DEPTHS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None, 0


def _needed_depth(config: Any, depth: int) -> int:
    """Blocks needed for every distinct per-layer value (layer types, block types) to appear."""
    needed = MAX_DEPTH
    for name in dir(config):
        if name.startswith("_"):
            continue
        try:
            value = getattr(config, name)
        except Exception:  # noqa: BLE001  (a sweep records every failure)
            continue
        if isinstance(value, (list, tuple, str)) and len(value) == depth and depth > 1:
            try:
                distinct = set(value)
            except TypeError:
                continue
            # every value once, and twice where it recurs (Zamba ties its shared block
            # across the hybrid layers: one of them alone cannot be built)
            total = {v: list(value).count(v) for v in distinct}
            count: dict[Any, int] = {}
            for i, item in enumerate(value):
                count[item] = count.get(item, 0) + 1
                if all(count.get(v, 0) >= min(2, n) for v, n in total.items()):
                    needed = max(needed, i + 1)
                    break
    return min(depth, needed)


def _overrides(config: Any, level: int, widths: frozenset[int] = frozenset()) -> dict[str, Any]:
    """Constructor arguments that shrink ``config`` (level 0: widths, experts and depth;
    1: experts and depth; 2: depth only), sub-configs included. ``widths``: the text model's
    default width; a sub-config size equal to it (a vision projector's output width) is that
    width too, and shrinks with it."""
    cls = type(config)
    names = _fields(cls)
    out: dict[str, Any] = {}
    if level == 0:
        for name, value in SIZES.items():
            old = getattr(config, name, None)
            if name in names and isinstance(old, int) and not isinstance(old, bool) and old > value:
                out[name] = value
        for name in names - set(SIZES):
            old = getattr(config, name, None)
            if (isinstance(old, int) and not isinstance(old, bool) and old in widths
                    and re.search(r"hidden|dim|size|width", name)):
                out[name] = WIDTH
        # the shrunk query heads, under whichever name the config keeps them (a vision
        # config's num_heads: its key/value heads must divide that)
        heads = next((out[n] for n in ("num_attention_heads", "num_heads", "n_head", "n_heads")
                      if n in out), getattr(config, "num_attention_heads", None))
        rope = getattr(config, "rope_parameters", None)
        multimodal = "mrope_section" in (getattr(cls, "ignore_keys_at_rope_validation", None)
                                         or ())
        if "rope_parameters" in names and isinstance(rope, dict) and (
                multimodal or "mrope_section" in rope) and "hidden_size" in out:
            # multimodal RoPE splits each head's rotary half in three (time, height, width),
            # 1 : 1.5 : 1.5 in Qwen2-VL's [16, 24, 24] and GLM-4V's [8, 12, 12], the models'
            # defaults when the config names none: the same split of the tiny head
            head = out.get("head_dim") or out["hidden_size"] // (heads or 1)
            factor = rope.get("partial_rotary_factor") or getattr(
                config, "partial_rotary_factor", None) or 1.0  # GLM-4V-MoE rotates half
            half = int(head * factor) // 2
            out["rope_parameters"] = {**rope, "mrope_section": [
                half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]}
        for name in KV_HEADS:
            old = getattr(config, name, None)
            if name in names and isinstance(old, int) and isinstance(heads, int) and old > 0:
                grouped = old < getattr(config, "num_attention_heads", old)  # fewer KV heads
                out[name] = max(1, min(old, heads // 2 if grouped else heads))
    if level <= 1:
        for name, value in EXPERTS.items():
            old = getattr(config, name, None)
            if name in names and isinstance(old, int) and not isinstance(old, bool) and old > value:
                out[name] = value
        for name in TOP_K:
            old = getattr(config, name, None)
            if name in names and isinstance(old, int) and not isinstance(old, bool) and old > 2:
                out[name] = 2
    name, depth = _depth(config)
    if name is not None and name in names:
        new = _needed_depth(config, depth)
        if new < depth:
            for other in DEPTHS:
                if other in names and getattr(config, other, None) == depth:
                    out[other] = new
            for field in names:  # per-layer lists given explicitly: cut to the new depth
                value = getattr(config, field, None)
                if isinstance(value, list) and len(value) == depth:
                    out[field] = value[:new]
    for key in getattr(cls, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            data = sub.to_dict()
            data.update(_overrides(sub, level, widths))
            for drop in ("transformers_version", "architectures", "_name_or_path"):
                data.pop(drop, None)
            out[key] = data
    return out


LEVELS = ((0, "tiny"), (1, "shallow"), (2, "depth-only"), (3, "default"))


def _merged(base: dict[str, Any], fixes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``fixes`` written over it, nested dicts (sub-configs) merged likewise."""
    out = dict(base)
    for key, value in fixes.items():
        old = out.get(key)
        out[key] = _merged(old, value) if isinstance(old, dict) and isinstance(value, dict) \
            else value
    return out


def small_configs(model_type: str, head: str | None = None) -> list[tuple[Any, str]]:
    """The configs of ``model_type`` that transformers accepts and can build ``head`` from,
    smallest first, each with how small it is (``tiny``, ``shallow``, ``depth-only`` or
    ``default``).

    Raises:
        RuntimeError: transformers builds none of them (the last refusal).
    """
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    fixes = TYPE_FIXES.get(model_type, {})
    data: dict[str, Any] = {}
    if fixes:
        for key, value in fixes.items():
            sub = getattr(default, key, None)
            data[key] = _merged(sub.to_dict(), value) if hasattr(sub, "to_dict") else value
        default = cls(**data)
    text = default.get_text_config() if hasattr(default, "get_text_config") else default
    width = getattr(text, "hidden_size", None)
    widths = frozenset({width}) if isinstance(width, int) else frozenset()
    found, errors = [], []
    for level, label in LEVELS:
        try:
            # the fixes again: the shrunk config is made from the overrides alone
            kwargs = _merged(data, _overrides(default, level, widths)) if level < 3 else {}
            if level == 0 and model_type in TINY_FIXES:
                kwargs = _merged(kwargs, TINY_FIXES[model_type])
            config = default if level == 3 else cls(**kwargs)
            if head is not None:
                _transformers_build(head, config)
            found.append((config, label))
        except Exception as exc:  # noqa: BLE001  transformers refused: try a gentler shrink
            errors.append(f"{label}: {type(exc).__name__}: {exc}")
    if not found:
        raise RuntimeError(errors[-1])
    return found


def tiny_config(model_type: str, head: str | None = None) -> tuple[Any, str]:
    """The smallest of :func:`small_configs`."""
    return small_configs(model_type, head)[0]


def _transformers_build(class_name: str, config: Any) -> Any:
    import copy

    import torch
    import transformers

    cls = getattr(transformers, class_name)
    with torch.device("meta"):
        return cls._from_config(copy.deepcopy(config))


# -- one head --------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300]


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout(f"over {TASK_TIMEOUT_S} s")


def run_head(model_type: str, family: str, class_name: str) -> dict[str, Any]:
    """Run one head class of one type through every step; the first failing step stops it."""
    result: dict[str, Any] = {"type": model_type, "family": family, "class": class_name,
                              "size": None, "status": "pass", "step": None, "error": None,
                              "seconds": 0.0}
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TASK_TIMEOUT_S)
    try:
        try:
            configs = small_configs(model_type, class_name)
        except Exception as exc:  # noqa: BLE001  (a sweep records every failure)
            result.update(status="transformers", step="config", error=_first_line(exc))
            return result
        # the smallest; then, if the model's own forward fails there, the default widths:
        # shrunk widths can contradict each other where transformers' defaults do not
        tries = [configs[0]] + [c for c in configs[1:] if c[1] in ("depth-only", "default")]
        reference = None
        first: dict[str, Any] = {}
        tried: tuple[Any, str] = (None, "")
        tiny: Any = None
        for config, size in tries:
            tried = (config, size)
            tiny = config if size == "tiny" and tiny is None else tiny
            attempt = dict(result, size=size)
            config.architectures = [class_name]
            with tempfile.TemporaryDirectory() as folder:
                config.save_pretrained(folder)
                _pipeline(folder, attempt)
            if attempt["status"] == "pass" and size != configs[0][1]:
                attempt["note"] = f"{configs[0][1]}: {first['step']}: {first['error']}"
            if attempt["status"] == "pass" or "its forward failed" not in (attempt["error"] or ""):
                break
            if not first:
                first = attempt
        result.update(attempt)
        # the real model is run on the config whose failure is reported, and only at the tiny
        # size (a CPU step at transformers' default widths is too slow for the sweep): a tiny
        # config transformers cannot train says nothing of a failure at the default widths
        if result["status"] == "fail" and tried[1] == "tiny" and "its forward failed" in (
                result["error"] or ""):
            big = _too_big(tried[0], class_name)
            reference = None if big else real_step(tried[0], class_name,
                                                   result.get("seq_len", SEQ_LEN))
            if big:
                result["error"] = f"{result['error']} ({big})"
            elif reference:
                result.update(status="real-fails", error=f"{result['error']} — the real tiny "
                              f"model fails too, on the CPU: {reference}")
        elif result["status"] == "fail" and tiny is not None and first:
            # failed again at gentler shrinks: say whether transformers trains the tiny one
            big = _too_big(tiny, class_name)
            reference = None if big else real_step(tiny, class_name,
                                                   first.get("seq_len", SEQ_LEN))
            result["error"] = f"{result['error']} (tiny: {first['error']}; " + (
                big or (f"the real tiny model fails too, on the CPU: {reference}" if reference
                        else "the real tiny model trains")) + ")"
    except _Timeout as exc:
        result.update(status="fail", error=f"timeout: {exc}")
    finally:
        signal.alarm(0)
        result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _too_big(config: Any, class_name: str) -> str | None:
    """Why the real model of ``config`` is not stepped on the CPU (more parameters than
    :data:`REAL_STEP_MAX_PARAMS`: a step the alarm cannot interrupt), else None."""
    params = sum(p.numel() for p in _transformers_build(class_name, config).parameters())
    if params <= REAL_STEP_MAX_PARAMS:
        return None
    return f"the real tiny model, {params / 1e6:.0f}M parameters, is too large to step on the CPU"


def real_step(config: Any, class_name: str, seq_len: int) -> str | None:
    """Train the *real* model of ``config`` one step on the CPU with the inputs layerscope
    builds for it (counting image tokens with the real model); the error, or None when it
    trains. Tells a config transformers itself cannot train from a fault of layerscope's."""
    import copy
    import inspect

    import torch
    import transformers

    from layerscope.estimate.input_types import (
        Sizes,
        StepInputs,
        count_features,
        feature_arguments,
        features_function,
    )
    from layerscope.estimate.inputs import prepare_copy, step_inputs

    def realize(specs: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for t in specs:
            if t.same_as is not None:
                out[t.name] = out[t.same_as]
            elif t.value is not None:
                out[t.name] = t.value.clone()
            elif t.dtype.is_floating_point:
                out[t.name] = torch.randn(t.shape, dtype=t.dtype)
            else:
                out[t.name] = torch.zeros(t.shape, dtype=t.dtype)
        return out

    try:
        torch.manual_seed(0)
        model = getattr(transformers, class_name)._from_config(copy.deepcopy(config))
        model.train()
        sizes = Sizes(batch_size=BATCH, seq_len=seq_len)
        prepare_copy(model, sizes)

        def count(name: str, specs: Any) -> int:
            get = features_function(model, name)
            accepted = feature_arguments(model, name)
            with torch.no_grad():
                out = get(**{k: v for k, v in realize(specs).items() if k in accepted})
            return count_features(out)

        inputs: StepInputs = step_inputs(model, sizes, count)
        extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters \
            else {}
        feed = realize(inputs.tensors)
        out = model(**feed, **extra)
        loss = out.loss if hasattr(out, "loss") else out[0]
        if loss is None and "labels" not in feed and hasattr(out, "logits"):
            loss = out.logits.sum()  # a head that takes no labels, as the trace does
        loss.backward()
    except Exception as exc:  # noqa: BLE001  (a sweep records every failure)
        return _first_line(exc)
    return None


def _pipeline(folder: str, result: dict[str, Any]) -> None:
    from layerscope import (
        EstimateError,
        FreezePlan,
        empty_model,
        estimate_memory,
        estimate_step_time,
        scan,
    )
    from layerscope.cli import main as cli_main

    state: dict[str, Any] = {}

    def build() -> None:
        state["model"] = empty_model(folder)

    def scan_() -> None:
        state["scan"] = scan(state["model"])
        state["layers"] = state["scan"].num_layers  # raises without a block stack

    def plan() -> None:
        state["plan"] = FreezePlan.parse("lp-lora")
        state["plan"].resolve(state["scan"])

    def settings() -> dict[str, Any]:
        config = state["model"].config
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        positions = getattr(text, "max_position_embeddings", None)
        seq = min(SEQ_LEN, positions) if isinstance(positions, int) and positions > 8 else SEQ_LEN
        return {"batch_size": BATCH, "seq_len": state.get("seq_len", seq)}

    def memory() -> None:
        try:
            state["memory"] = estimate_memory(state["model"], state["plan"], **settings())
        except EstimateError as exc:  # a vision-language model's images need a longer sequence
            found = re.search(r"use seq_len >= (\d+)", str(exc))
            exact = re.search(r"use seq_len=(\d+)", str(exc))  # the one length it trains on
            if found is None and exact is None:
                raise
            state["seq_len"] = result["seq_len"] = (
                int(found.group(1)) + SEQ_LEN if found else int(exact.group(1)) if exact else 0)
            state["memory"] = estimate_memory(state["model"], state["plan"], **settings())

    def time_() -> None:
        estimate_step_time(state["model"], state["plan"], **settings())

    def summary() -> None:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(["summary", folder])
        if code != 0:
            raise RuntimeError(err.getvalue().strip().splitlines()[-1] if err.getvalue() else
                               f"exit code {code}")

    for step, func in zip(STEPS, (build, scan_, plan, memory, time_, summary)):
        try:
            func()
        except _Timeout:
            raise
        except Exception as exc:  # noqa: BLE001  (a sweep records every failure)
            result.update(status="fail", step=step, error=_first_line(exc))
            if os.environ.get("SWEEP_TRACEBACK"):
                result["traceback"] = traceback.format_exc()
            return
    result["peak_bytes"] = state["memory"].peak_bytes


def _init_worker() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(1)


def _run(task: tuple[str, str, str]) -> dict[str, Any]:
    return run_head(*task)


def tasks(filter_text: str | None = None) -> list[tuple[str, str, str]]:
    """(model type, head family, class name) for every head swept, one per class and type."""
    from transformers.models.auto import modeling_auto

    found: dict[tuple[str, str], str] = {}
    for family, mapping_name in HEADS:
        for model_type, names in getattr(modeling_auto, mapping_name).items():
            name = names[0] if isinstance(names, (tuple, list)) else names
            found.setdefault((model_type, name), family)
    out = [(t, fam, name) for (t, name), fam in found.items()]
    if filter_text:
        out = [task for task in out if filter_text in task[0] or filter_text in task[2]]
    return sorted(out)


# -- the table -------------------------------------------------------------------------------
STATUSES = {
    "pass": "pass",
    "fail": "**fail**",
    "real-fails": "fails in transformers too",
    "transformers": "transformers cannot build",
}
"""A head's (and a type's) verdict: passes every step; fails one; fails where the real tiny
model, fed the same inputs, fails one training step on the CPU too (a config transformers
itself cannot train at this size; the inputs are layerscope's, so the reason is shown); or
transformers cannot build the head from any shrink of the default config."""


def per_type(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model type: the worst verdict of its heads that transformers can build (``pass``
    only when every one passes); ``transformers`` when it builds none."""
    types: dict[str, dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: (r["type"], r["class"])):
        t = types.setdefault(r["type"], {"heads": [], "status": None, "size": set()})
        t["heads"].append(r)
        if r["size"]:
            t["size"].add(r["size"])
    for t in types.values():
        built = {h["status"] for h in t["heads"] if h["status"] != "transformers"}
        t["status"] = next((v for v in ("fail", "real-fails", "pass") if v in built),
                           "transformers")
    return types


def table(results: list[dict[str, Any]], seconds: float, command: str) -> str:
    import torch
    import transformers

    types = per_type(results)
    counts = Counter(t["status"] for t in types.values())
    trainable = counts["pass"] + counts["fail"]
    built = trainable + counts["real-fails"]
    heads = [r for r in results if r["status"] not in ("transformers", "real-fails")]
    head_pass = sum(r["status"] == "pass" for r in heads)
    lines = [
        "# Model sweep",
        "",
        f"`{command}` — transformers {transformers.__version__}, torch {torch.__version__}, "
        f"{len(results)} head classes of {len(types)} model types, {seconds / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores.",
        "",
        f"**{counts['pass']} of {trainable} model types pass every step** "
        f"({100 * counts['pass'] / max(trainable, 1):.1f}%), counting the types transformers "
        f"can build and train at a tiny size; {counts['pass']} of {built} "
        f"({100 * counts['pass'] / max(built, 1):.1f}%) counting also the "
        f"{counts['real-fails']} whose real tiny model fails a training step on the CPU too. "
        f"{counts['transformers']} types transformers cannot build from a small config (not "
        f"counted). Head classes: {head_pass} of {len(heads)} pass.",
        "",
        "Steps: build (`empty_model` of the config.json transformers saved), scan, plan "
        f"(`lp-lora`), memory (`estimate_memory`, batch {BATCH}), time (`estimate_step_time`), "
        "summary (`layerscope summary`). Size: how far the default config was shrunk (`tiny`: "
        "widths, experts and depth; `shallow`: experts and depth; `depth-only`; `default`); "
        "where the model's own forward fails at the tiny size, the step is tried at "
        "transformers' default widths. Verdicts: " + "; ".join(
            f"{v}" for v in STATUSES.values()) + ".",
        "",
        "| type | verdict | head classes | size | failing step: reason |",
        "|---|---|---|---|---|",
    ]
    for name, t in sorted(types.items()):
        classes = ", ".join(h["class"] for h in t["heads"])
        failures = [h for h in t["heads"] if h["status"] != "pass"]
        why = "; ".join(
            f"{h['class']} {h['step'] or ''}: {h['error']}".replace("|", "\\|") for h in failures
        )
        notes = [f"{h['class']} passes at {h['size']} widths ({h['note']})".replace("|", "\\|")
                 for h in t["heads"] if h.get("note") and h["status"] == "pass"]
        why = "; ".join(x for x in (why, *notes) if x)
        lines.append(f"| {name} | {STATUSES[t['status']]} | {classes} | "
                     f"{'/'.join(sorted(t['size'])) or '-'} | {why} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", help="only model types or classes containing this text")
    parser.add_argument("--family", choices=[f for f, _ in HEADS], help="only this head family")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", help="write the markdown table here (default: print it)")
    parser.add_argument("--json", help="write every head's result here")
    args = parser.parse_args(argv)
    todo = [t for t in tasks(args.filter) if args.family in (None, t[1])]
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    # spawned workers: a forked one can inherit a lock held by a torch thread and hang
    context = multiprocessing.get_context("spawn")
    left = list(todo)
    for attempt in range(2):  # a stalled pool's unfinished tasks get one fresh pool
        pool = context.Pool(args.jobs, initializer=_init_worker, maxtasksperchild=150)
        pending = {task: pool.apply_async(_run, (task,)) for task in left}
        last = time.perf_counter()
        while pending:
            finished = [task for task, job in pending.items() if job.ready()]
            for task in finished:
                r = pending.pop(task).get()
                results.append(r)
                last = time.perf_counter()
                mark = {"pass": ".", "fail": "F", "real-fails": "r", "transformers": "t"}[
                    r["status"]]
                print(f"[{len(results)}/{len(todo)}] {mark} {r['type']} {r['class']} "
                      f"{r['step'] or ''} {r['error'] or ''}"[:200], file=sys.stderr, flush=True)
            # no task finished for longer than one may take: a worker hung where the alarm
            # cannot reach (native code) or died and its task was lost
            if pending and time.perf_counter() - last > STALL_S:
                break
            time.sleep(0.2)
        pool.terminate()
        left = list(pending)
        if not left:
            break
        print(f"stalled: {len(left)} tasks " + ("retried in a fresh pool" if attempt == 0
              else "recorded as hung"), file=sys.stderr, flush=True)
    for task in left:
        results.append({"type": task[0], "family": task[1], "class": task[2], "size": None,
                        "status": "fail", "step": None, "error": "timeout: the worker hung",
                        "seconds": 0.0})
    seconds = time.perf_counter() - start
    command = "PYTHONPATH=. python benchmarks/model_sweep.py" + (
        f" --filter {args.filter}" if args.filter else "")
    text = table(results, seconds, command)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(text)
        print(text.split("\n\n")[2])
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
