"""Estimates against published, measured GPU memory of real fine-tuning runs.

Run: ``PYTHONPATH=. python benchmarks/published.py [--filter TEXT] [--points FILE] [--verbose]``

Reads ``../shared/published/points.jsonl`` (191 points transcribed from the projects that
measured them; its README explains every field) and, for each point:

1. translates it into layerscope settings (:func:`translate`): model preset, batch, sequence,
   precision, optimizer, checkpointing, LoRA, quantization, strategy, GPUs, GPU, and the
   statistic and unit the point states;
2. decides whether the run can be expressed at all. A point is **not expressible** when the
   run depends on something layerscope does not model by design or the record does not say
   (tensor/pipeline/context parallelism, torch.compile, float8/NVFP4 matmuls, chunked or fused
   cross-entropy, Liger/Unsloth kernels, an optimizer fused into backward, activation
   offloading, selective checkpointing, GPTQ, unknown lengths or batch, a bound or capacity
   rather than a peak); it is **pending** when it needs a setting layerscope will have but does
   not have yet (:data:`FEATURES`: distributed strategies, offload, 4-bit bases, reserved
   bytes, gradient accumulation, ...). The features are detected from the installed
   layerscope, so a point becomes comparable as soon as its feature lands; a feature whose
   keyword differs from the one guessed here is a one-line change in :data:`FEATURES`;
3. for a comparable point, estimates and prints the estimate in the point's own statistic and
   unit (allocated = ``peak_bytes``; reserved = ``reserved_bytes``; ``nvidia-smi`` = reserved +
   the CUDA context; a total over GPUs = per-GPU x GPUs; GiB, GB or MiB as published), its
   error, and the median and worst |error| per group and overall.

A second table does the same for the published throughputs that layerscope can express
(``metric`` or ``paired_metric``: tokens/s per GPU, or a total over GPUs divided by them), with
the step time of :mod:`layerscope.estimate.time`, which includes the communication of a
data-parallel strategy (:mod:`layerscope.estimate.comm`).

Choices where a record leaves room (each printed with the point it affects):
- a statistic that is not stated is taken as reserved (``torch.cuda.max_memory_reserved``,
  what most tools print); "GB" without a stated base is GiB (most scripts divide by 1024**3),
  unless a figure of the same table, per GPU, exceeds its GPU's whole memory in GiB, which no
  statistic can: that table's figures are then 10**9 bytes (:func:`decimal_groups`);
- a sequence length given as ``<=L`` with truncation at ``L`` is ``L``: a run's peak is the
  peak of its longest batch, and Alpaca (the dataset of those runs) has samples beyond 512
  tokens, so some batch is padded to ``L`` (unless the floor below contradicts it);
- an unpacked record whose published figure is below what its stated batch and length must
  hold (:func:`stated_length_floor`, hand arithmetic) ran shorter batches than stated: not
  expressible, lengths unknown (never re-expressed at a length chosen to match);
- a ZeRO stage the record leaves unstated is the project's own recipe default where one is
  documented (:data:`RECIPE_ZERO_STAGE`), printed as an assumption; a ZeRO-3 run of a recipe
  that ships its DeepSpeed config uses that config's knobs (:data:`RECIPE_ZERO3_CONFIG`), and
  every DeepSpeed run of such a recipe the optimizer its config names, which DeepSpeed builds
  in place of the script's (:data:`RECIPE_DEEPSPEED_OPTIMIZER`);
- FSDP full fine-tuning through the HF Trainer with ``--bf16`` published after accelerate
  0.30.0 trains fp32 shards (:data:`ACCELERATE_FSDP_UPCAST`);
- LoRA on a 16-bit base published between peft 0.7 and 0.12 trains adapters in the base's
  dtype (:data:`PEFT_AUTOCAST_ADAPTERS`), before peft 0.7 in fp32 (:data:`PEFT_BASE_LAYER`);
- an ``nvidia-smi`` figure adds the CUDA context the source measured, where it did
  (:data:`MEASURED_CONTEXT`), else layerscope's default;
- an Instruct/Chat checkpoint is its base preset (same config); Qwen-1 is its Qwen2
  equivalent (see the preset's note); torchtune's native Llama and LoRA modules are estimated
  as transformers' Llama with peft adapters.

No constant here is fitted to a point; the script only reads what the record says.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import re
import statistics
import sys
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "published" / "points.jsonl"
if not PUBLISHED.exists():
    PUBLISHED = Path("/work/shared/published/points.jsonl")

GIB, GB, MIB = 2**30, 10**9, 2**20


# -- what layerscope supports (detected, one line each) ---------------------------------------
def _estimate_keywords() -> set[str]:
    """The settings ``estimate_memory`` accepts: its named parameters and, for ``**settings``
    typed with a TypedDict (``Unpack[Settings]``), that TypedDict's keys."""
    import typing

    from layerscope import estimate_memory

    names = set()
    hints = typing.get_type_hints(estimate_memory, include_extras=True)
    for name, param in inspect.signature(estimate_memory).parameters.items():
        if param.kind is not inspect.Parameter.VAR_KEYWORD:
            names.add(name)
            continue
        for arg in typing.get_args(hints.get(name)):  # Unpack[Settings] -> Settings
            names |= set(typing.get_type_hints(arg))
    return names


def _memory_fields() -> set[str]:
    from layerscope.estimate.memory import MemoryEstimate

    return {f.name for f in dataclasses.fields(MemoryEstimate)}


def _optimizers() -> set[str]:
    from layerscope.setup import OPTIMIZERS

    return set(OPTIMIZERS)


@functools.cache
def _counts_modules_to_save() -> bool:
    """Whether ``estimate_memory`` trains peft's copies of ``modules_to_save``: a tiny Llama
    with LoRA on ``q_proj``, with and without ``modules_to_save=["lm_head"]``."""
    from peft import LoraConfig

    from layerscope import estimate_memory
    from layerscope.build import empty_model

    tiny = empty_model({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                        "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 2, "num_attention_heads": 4,
                        "tie_word_embeddings": False})
    counts = [estimate_memory(tiny, batch_size=1, seq_len=8, lora=LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=saved)).trainable_params
        for saved in (None, ["lm_head"])]
    return counts[1] > counts[0]


FEATURES: dict[str, Any] = {
    # feature -> predicate on the installed layerscope; the keyword names follow issues 11-13
    "distributed": lambda: {"distributed", "num_gpus"} <= _estimate_keywords(),
    "offload": lambda: "offload" in _estimate_keywords(),
    "quantization": lambda: "quantization" in _estimate_keywords(),
    "base_dtype": lambda: "base_dtype" in _estimate_keywords(),
    "lora_dtype": lambda: "lora_dtype" in _estimate_keywords(),
    "attn_implementation": lambda: "attn_implementation" in _estimate_keywords(),
    "gradient_accumulation": lambda: "gradient_accumulation_steps" in _estimate_keywords(),
    "reserved_bytes": lambda: "reserved_bytes" in _memory_fields(),
    # the trained copies of modules_to_save counted (a tiny model estimated with and without)
    "lora.modules_to_save": lambda: _counts_modules_to_save(),
}
"""A feature is supported when its predicate holds. Optimizers are features too
(``optimizer:<name>``, supported when layerscope lists the name)."""


def supported(feature: str) -> bool:
    if feature.startswith("optimizer:"):
        return feature.split(":", 1)[1] in _optimizers()
    return bool(FEATURES[feature]())


# -- a point in layerscope's terms ------------------------------------------------------------
@dataclass(frozen=True)
class Lora:
    rank: int
    alpha: int
    dropout: float
    targets: tuple[str, ...]
    modules_to_save: tuple[str, ...] = ()


@dataclass(frozen=True)
class Run:
    """One published run as layerscope settings, and how its figure was measured."""

    preset: str
    architecture: str | None
    batch_size: int
    seq_len: int
    precision: str
    optimizer: str
    gradient_checkpointing: bool
    lora: Lora | None
    quantization: str | None
    base_dtype: str | None
    lora_dtype: str | None
    distributed: str | None
    num_gpus: int
    gpus_per_node: int
    offload: str | None
    accumulation: int
    attn: str | None  # None: what transformers picks for the model
    gpu: str | None
    statistic: str  # "allocated" | "reserved" | "nvidia-smi"
    unit: str  # "GiB" | "GB" | "MiB"
    summed: bool  # a total over the GPUs
    assumptions: tuple[str, ...] = ()
    fsdp1_use_orig_params: bool | None = None  # FSDP1 (its flat-parameter setting); None: FSDP2
    double_quant: bool = False  # bnb_4bit_use_double_quant
    zero: tuple[tuple[str, Any], ...] = ()  # DeepSpeed zero_optimization entries of the recipe
    context_bytes: int | None = None  # the CUDA context the source measured (None: default)
    torchao: bool = False  # a torchao NF4 base (else bitsandbytes)
    torchao_version: str | None = None  # its release (None: 0.3 or later)

    def features(self) -> list[str]:
        out = []
        if self.distributed:
            out.append("distributed")
        if self.offload:
            out.append("offload")
        if self.quantization:
            out.append("quantization")
        if self.base_dtype:
            out.append("base_dtype")
        if self.lora_dtype:
            out.append("lora_dtype")
        if self.lora and self.lora.modules_to_save:
            out.append("lora.modules_to_save")
        if self.attn is not None:
            out.append("attn_implementation")
        if self.accumulation > 1:
            out.append("gradient_accumulation")
        if self.statistic != "allocated":
            out.append("reserved_bytes")
        out.append(f"optimizer:{self.optimizer}")
        return out


@dataclass(frozen=True)
class Verdict:
    """Why a point cannot be compared (yet)."""

    status: str  # "not expressible" | "pending"
    reasons: tuple[str, ...]
    run: Run | None = None


# -- translation --------------------------------------------------------------------------------
MODELS = [  # (pattern on the record's model field, preset)
    (r"Llama-3\.1-405B|3\.1 405B", "llama-3.1-405b"),
    (r"Llama-3\.1-70B", "llama-3.1-70b"),
    (r"Llama-3\.1-8B", "llama-3.1-8b"),
    (r"Llama-3\.2-3B", "llama-3.2-3b"),
    (r"Meta-Llama-3-8B|Llama 3 8B", "llama-3-8b"),
    (r"Llama 3 70B", "llama-3-70b"),
    (r"Llama-2-70b", "llama-2-70b"),
    (r"Llama-2-7b|LLaMA2-7B", "llama-2-7b"),
    (r"Qwen3-8B", "qwen3-8b"),
    (r"Qwen2-7B", "qwen2-7b"),
    (r"Qwen-1_8B", "qwen-1.8b"),
    (r"Qwen-7B", "qwen-7b"),
    (r"Qwen-14B", "qwen-14b"),
    (r"Qwen-72B", "qwen-72b"),
    (r"gemma-7b", "gemma-7b"),
    (r"bert-large-uncased", "bert-large-uncased"),
    (r"T0_3B", "t0-3b"),
    (r"mt0-xxl", "mt0-xxl"),
    (r"bloomz-7b1", "bloomz-7b1"),
    (r"CodeLlama 34B", "codellama-34b"),
    (r"Mistral 7B", "mistral-7b-v0.1"),
]

GPUS = [  # (pattern on the record's gpu field, catalogue name); no match: not in the catalogue
    ((r"A100-SXM4-80G|A100 80GB|A100 \(80GB|A100 \(memory size not stated; 60 GiB|"
     r"A100 \(size not stated\)"), "a100-80gb"),
    (r"A100 40GB|40GB GPUs", "a100-40gb"),
    (r"RTX 4090", "rtx-4090"),
    (r"^H100 80GB", "h100-sxm"),
    (r"H200 141GB", "h200"),
]

LORA_TARGETS = {  # the record's target text -> transformers module names
    "q_proj,v_proj": ("q_proj", "v_proj"),
    "q_proj,k_proj,v_proj": ("q_proj", "k_proj", "v_proj"),
    "q_proj,v_proj,output_proj + MLP": ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                        "down_proj"),
    "q_proj,v_proj,k_proj,output_proj + MLP": ("q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"),
    "all layers: q,k,v,output_proj + MLP + final output projection": (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    # Qwen-1's c_attn, c_proj (attention and MLP), w1, w2 on the Qwen2 equivalent
    "c_attn,c_proj,w1,w2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"),
    "query_key_value": ("query_key_value",),
    "q,v (PEFT default for T5/mT5)": ("q", "v"),
    "all linear: q,k,v,o,gate,up,down": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                         "up_proj", "down_proj"),
    "Q,K,V,O,gate,up,down": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"),
}


def _text(p: dict[str, Any], *keys: str) -> str:
    return " ".join(str(p.get(k) or "") for k in keys)


def _compiled(p: dict[str, Any]) -> bool:
    notes = p["notes"]
    return ("compile" in str(p["precision"]) or "torch compile enabled" in notes
            or notes.startswith("torch.compile=True")
            or (p["group"] == "torchtune_llama2_table" and "**" in p["quote"]))


def _accumulation(p: dict[str, Any]) -> int | None:
    """Gradient accumulation steps the record states (None: not stated)."""
    m = re.search(r"(?i)grad(?:ient)?[ _]acc\w*(?:\s*(?:of|=|:))?\s*(\d+)",
                  _text(p, "notes", "quote"))
    return int(m.group(1)) if m else None


UNSTATED_GB = "'GB' without a stated base"
"""The start of the assumption :func:`_statistic` notes when it takes such a figure as GiB."""


def _unstated_gb(run: Run) -> bool:
    return any(UNSTATED_GB in a for a in run.assumptions)


def _statistic(metric: str) -> tuple[str, str, bool, list[str]]:
    """(statistic, unit, summed over GPUs, assumptions) from the record's metric."""
    notes: list[str] = []
    if "nvidia_smi" in metric or "nvidia-smi" in metric:
        stat = "nvidia-smi"
    elif "allocated" in metric or "active" in metric or "max_memory_allocated" in metric:
        stat = "allocated"  # active: allocated blocks (the caching allocator's "active")
    elif "reserved" in metric and "likely" not in metric:
        stat = "reserved"
    else:
        stat = "reserved"
        notes.append("statistic not stated: taken as reserved")
    if "1e9" in metric:
        unit = "GB"
    elif "MiB-based" in metric or "GiB" in metric:
        unit = "GiB"
    elif "MiB" in metric or "_MB" in metric:
        unit = "MiB"
    else:
        unit = "GiB"
        if "GB" in metric:
            notes.append(f"{UNSTATED_GB}: taken as GiB")
    return stat, unit, "summed_over_GPUs" in metric, notes


def _precision(text: str, lora: bool) -> tuple[str | None, str | None, str | None, list[str]]:
    """(precision, base_dtype, lora_dtype, notes); precision None when not stated."""
    t = text.lower()
    if t.startswith("bf16; quant_storage"):  # peft's sft script, launched with --bf16 True
        return "bf16-mixed", "bf16", None, [("the Trainer's --bf16 (the launch in the notes) "
                                            "over a bf16 base")]
    if t.startswith("bf16 (pure") or t == "bf16 (pure)":
        return "bf16-true", None, "bf16" if lora else None, [
            "bf16 parameters, gradients and optimizer state (torchtune dtype=bf16)"]
    if t.startswith("fp32"):
        return "32-true", None, None, []
    if t.startswith("fp16 mixed"):
        return "16-mixed", None, None, []
    if t == "bf16" and lora:  # HF Trainer --bf16 over a bf16 base with peft's fp32 adapters
        return "bf16-mixed", "bf16", None, [("base loaded in bf16, peft adapters fp32, "
                                            "Trainer bf16 autocast")]
    if t.startswith(("bf16 mixed", "bf16 (mixed")):
        loaded = re.search(r"torch_dtype = (?:\w+ = )*(?:bf16|bfloat16)\b", t)
        return "bf16-mixed", "bf16" if loaded else None, None, []
    if t.startswith("bf16 (trainingarguments"):
        return "bf16-mixed", "bf16", None, []
    return None, None, None, []


def _optimizer(text: str) -> str | None:
    t = text.lower()
    if not t or t == "none":
        return None
    if "pagedadamw8bit" in t or "8-bit adamw" in t:
        return "paged-adamw-8bit"
    if "pagedadamw" in t:
        return "paged-adamw-32bit"
    if "adam8bit" in t:
        return "adamw-8bit"  # bitsandbytes Adam8bit keeps the state of AdamW8bit
    if "adafactor" in t:
        return "adafactor"
    if "adamw_hf" in t:
        return "adamw-hf"  # transformers' own AdamW: a per-tensor loop, not torch's foreach
    if "fused=true" in t or "fused optimizer" in t:
        return "adamw-fused"
    if "adamw" in t:
        return "adamw"
    return None


RECIPE_ZERO_STAGE = {
    # group -> (what the record's runs are, ZeRO stage, the recipe's DeepSpeed config, source)
    "qwen1_readme_profiling": (
        "LoRA", "zero2",
        {"reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000,
         "overlap_comm": True, "contiguous_gradients": True},
        "Qwen's multi-GPU LoRA recipe finetune/finetune_lora_ds.sh @e8e1596 defaults to "
        "DS_CONFIG_PATH=\"finetune/ds_config_zero2.json\" (stage 2, reduce/allgather buckets 2e8, "
        "overlap_comm, contiguous_gradients), and the README names ZeRO 3 only where it was "
        "passed (72B); the stage is assumed from that default"),
}
"""A project's own documented default where a record leaves the ZeRO stage unstated: used only
for the runs of that recipe (LoRA here), and printed as an assumption with each point."""


RECIPE_ZERO3_CONFIG = {
    # group -> (the recipe's zero_optimization section, source)
    "qwen1_readme_profiling": (
        {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
         "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
         "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9},
        "Qwen's ZeRO-3 runs use finetune/ds_config_zero3.json @e8e1596 (finetune_ds.sh passes "
        "it; the README passes it to finetune_lora_ds.sh for 72B): overlap_comm, "
        "contiguous_gradients, max live parameters 1e9, and 'auto' buckets the HF Trainer fills "
        "from the hidden size (reduce hidden^2, prefetch 0.9 hidden^2, persistence 10 hidden)"),
}
"""A project's own DeepSpeed config for the ZeRO-3 runs of a record group: its
``zero_optimization`` entries, read with :func:`layerscope.distributed_config.read_deepspeed_config`
(``"auto"`` filled from the preset's hidden size as the HF Trainer fills it) rather than
DeepSpeed's defaults, and printed as an assumption."""


RECIPE_DEEPSPEED_OPTIMIZER = {
    # group -> (layerscope optimizer, source)
    "qwen1_readme_profiling": (
        "adamw-fused",
        "Qwen's DeepSpeed configs (finetune/ds_config_zero2.json, ds_config_zero3.json "
        "@e8e1596) have an optimizer section, {\"type\": \"AdamW\"}: the HF Trainer then "
        "leaves the optimizer to DeepSpeed (transformers' deepspeed_optim_sched hands it a "
        "DummyOptim when 'optimizer' is in the config), whose _configure_basic_optimizer builds FusedAdam "
        "(adam_w_mode=True, multi-tensor kernels, no foreach temporaries), not the "
        "script's adamw_torch"),
}
"""A project's DeepSpeed config that names its optimizer: DeepSpeed builds that optimizer
instead of the training script's, for the DeepSpeed runs of the record group."""


def _recipe_zero3(group: str, preset: str) -> tuple[tuple[tuple[str, Any], ...], list[str]]:
    """The :class:`~layerscope.estimate.sharding.ZeroSettings` entries of a group's ZeRO-3
    recipe (:data:`RECIPE_ZERO3_CONFIG`) and the assumption; ``((), [])`` for another group."""
    if group not in RECIPE_ZERO3_CONFIG:
        return (), []
    from layerscope.catalog import get_preset
    from layerscope.distributed_config import read_deepspeed_config

    section, why = RECIPE_ZERO3_CONFIG[group]
    hidden = get_preset(preset).config()["hidden_size"]
    knobs = read_deepspeed_config({"zero_optimization": section}, hidden_size=hidden,
                                  num_gpus=1).sharding.zero
    return tuple(dataclasses.asdict(knobs).items()), [why]


def _strategy(p: dict[str, Any]) -> tuple[str | None, str | None, list[str]]:
    """(strategy, offload, not-expressible reasons) from the record's parallelism."""
    text = str(p["parallelism"])
    if re.search(r"\bTP\b|\bPP\b|context parallel|\bCP\b", text):
        return None, None, ["tensor/pipeline/context parallelism"]
    if "ZeRO stage not stated" in text:
        recipe = RECIPE_ZERO_STAGE.get(p["group"])
        if recipe and (recipe[0] != "LoRA" or p["lora_rank"]):
            return recipe[1], None, []
        return None, None, ["data parallel with the ZeRO stage not stated"]
    offload = "params" if re.search(r"(?i)offload_params true|cpu_offload=True|CPU offload of "
                                    r"params", text) else None
    if "ZeRO-3" in text:
        return "zero3", offload, []
    if "ZeRO-2" in text:
        return "zero2", offload, []
    if "FSDP" in text:
        return "fsdp", offload, []
    if text.lower().startswith("single"):
        return None, None, []
    return None, None, [f"parallelism not understood: {text}"]


def _fsdp1(p: dict[str, Any]) -> tuple[bool | None, list[str]]:
    """FSDP1's ``use_orig_params`` when the record's run used FSDP1 (None for FSDP2 or no
    FSDP): the HF Trainer and accelerate set True, PyTorch's FSDP1 defaults to False."""
    text = str(p["parallelism"])
    if "FSDP1" not in text:
        return None, []
    if re.search(r"use_orig_params False", text):
        return False, []
    if re.search(r"HF Trainer|accelerate", text + str(p["notes"])):
        return True, ["FSDP1 through the HF Trainer/accelerate: use_orig_params=True"]
    return False, ["FSDP1 with PyTorch's default use_orig_params=False"]


ACCELERATE_FSDP_UPCAST = "2024-05-03"
"""accelerate v0.30.0's release (PR #2674, ``accelerator.py``): with FSDP and mixed precision on
(``mixed_precision != "no"``, which the HF Trainer's ``--bf16`` sets), every FSDP unit's flat
parameter that requires grad and is not fp32 is upcast, ``param.data = param.data.to(
torch.float32)``, "to mimic DeepSpeed's casting": a bf16-loaded model then trains with fp32
sharded parameters, gradients and AdamW state and bf16 compute (``bf16-mixed``)."""


TORCHTUNE_TORCHAO = {
    # group -> (torchao version, source): the torchao a torchtune record's commit pinned
    "torchtune_qlora_tutorial": ("0.1", (
        "torchao 0.1: torchtune's pyproject.toml @0914d5cfb (2024-04-15, the tutorial's commit) "
        "pins torchao==0.1 (tag v0.1, 2024-04-04), which quantizes each weight in one piece "
        "(chunks came with pytorch/ao #196, 2024-05-01, in 0.2.0)")),
}
"""The torchao release a torchtune record ran, from the dependency pin at the record's commit:
NF4 quantization's load-time temporaries and stored scale factors changed between releases
(:mod:`layerscope.estimate.torchao`)."""


PEFT_BASE_LAYER = "2023-12-06"
"""peft v0.7.0's release, the first whose ``LoraLayer.update_layer`` finds the base weight
(``weight = getattr(self.get_base_layer(), "weight", None)``, then ``self.to(weight.device,
dtype=weight.dtype)``). Before it the adapters stayed in ``nn.Linear``'s default fp32: v0.6.x's
``Linear.__init__`` calls ``update_layer`` before ``LoraModel._replace_module`` attaches the
base weight (``new_module.weight = child.weight``), so ``getattr(self, "weight", None)`` is None
and nothing is cast, and ``_replace_module`` then moves the ``lora_`` modules with
``module.to(child.weight.device)``, a device and no dtype; v0.5.0's ``update_layer`` ends with
``self.to(self.weight.device)``, a device only."""

PEFT_AUTOCAST_ADAPTERS = "2024-07-24"
"""peft v0.12.0's release, the first with ``autocast_adapter_dtype=True`` (PR #1706): from
v0.7.0 (:data:`PEFT_BASE_LAYER`) to it, ``LoraLayer.update_layer`` made the adapters in the
base weight's dtype (``self.to(weight.device, dtype=weight.dtype)``), so a bf16 base trained
bf16 adapters."""


def _old_peft_adapters(p: dict[str, Any], lora: bool, base_dtype: str | None,
                       lora_dtype: str | None) -> tuple[str | None, list[str]]:
    """The adapters' dtype a LoRA record on a 16-bit base implies by its publication date (the
    source's latest date; the peft version used is not stated), and the assumption to print:
    the base's dtype between peft 0.7 and 0.12, fp32 (layerscope's default, None) before 0.7
    and from 0.12 on. ``(lora_dtype, [])`` when the record is not such a run."""
    dates = re.findall(r"20\d\d-\d\d-\d\d", str(p["source"]))
    if (not lora or base_dtype not in ("bf16", "fp16") or lora_dtype is not None
            or not dates or max(dates) >= PEFT_AUTOCAST_ADAPTERS):
        return lora_dtype, []
    if max(dates) < PEFT_BASE_LAYER:
        return None, [f"published {max(dates)}, before peft 0.7 (released {PEFT_BASE_LAYER}; "
                      f"version not stated): adapters left in nn.Linear's fp32 (update_layer "
                      f"runs before _replace_module attaches the base weight), not cast to "
                      f"the base's {base_dtype}"]
    return base_dtype, [f"published {max(dates)}, between peft 0.7 and 0.12 (released "
                        f"{PEFT_BASE_LAYER} and {PEFT_AUTOCAST_ADAPTERS}; version not stated): "
                        f"adapters made in the base's {base_dtype} (LoraLayer.update_layer), "
                        f"not upcast to fp32"]


def _accelerate_upcast(p: dict[str, Any], precision: str | None) -> list[str]:
    """The assumption when a full fine-tuning record ran FSDP through the HF Trainer or
    accelerate with ``--bf16`` on a bf16-loaded model, published after accelerate 0.30.0
    (the source's latest date; the version used is not stated): empty when not such a run."""
    text = _text(p, "parallelism", "notes")
    dates = re.findall(r"20\d\d-\d\d-\d\d", str(p["source"]))
    if (precision != "bf16-true" or p["lora_rank"] or "FSDP" not in str(p["parallelism"])
            or not re.search(r"HF Trainer|accelerate", text) or "--bf16" not in text
            or not dates or max(dates) < ACCELERATE_FSDP_UPCAST):
        return []
    return [f"FSDP through the HF Trainer with --bf16, published {max(dates)}: accelerate "
            f">= 0.30 (released {ACCELERATE_FSDP_UPCAST}; version not stated) upcasts the "
            f"trainable flat parameters to fp32 (PR #2674): bf16-mixed, fp32 shards"]


def _seq_len(value: Any) -> tuple[int | None, list[str]]:
    if isinstance(value, int):
        return value, []
    m = re.match(r"<=(\d+)", str(value))
    if m:
        return int(m.group(1)), [(f"sequences truncated at {m.group(1)} tokens and padded per "
                                 f"batch: the peak is that of a batch padded to "
                                 f"{m.group(1)}")]
    return None, []


def translate(p: dict[str, Any]) -> Run | Verdict:
    """The point as a :class:`Run`, or why it is not expressible."""
    reasons: list[str] = []
    assumptions: list[str] = []
    metric = str(p["metric"])
    if "tokens_per_sec" in metric:
        reasons.append("a throughput, not a memory figure (see the time table)")
    elif "OOM" in metric:
        reasons.append("a bound (the run ran out of memory), not a peak")
    elif "max_seq_len" in metric:
        reasons.append("a capacity (the longest sequence that fit), not a peak")
    strategy, offload, why = _strategy(p)
    reasons += why
    if _compiled(p):
        reasons.append("torch.compile")
    if re.search(r"(?i)float8|mxfp8|nvfp4", _text(p, "precision")):
        reasons.append("float8 / MXFP8 / NVFP4 matmuls")
    ce = str(p["fused_ce"] or "")
    if re.search(r"(?i)chunked|liger|unsloth|fused", ce.replace("not chunked", "")):
        reasons.append(f"chunked or fused cross-entropy ({ce})")
    if re.search(r"(?i)unsloth", _text(p, "attn")):
        reasons.append("Unsloth kernels")
    if "optimizer_in_bwd=True" in str(p["optimizer"]) and "not use optimizer_in_bwd" not in str(
            p["optimizer"]):
        reasons.append("optimizer step fused into backward (optimizer_in_bwd)")
    if p["act_offload"]:
        reasons.append("activation offloading")
    ckpt = p["grad_ckpt"]
    if isinstance(ckpt, str) and ckpt.startswith("selective"):
        reasons.append("selective activation checkpointing")
    elif ckpt is None:
        reasons.append("gradient checkpointing not stated")
    if "GPTQ" in str(p["quant"]):
        reasons.append("GPTQ int4 base (auto-gptq): layerscope models bitsandbytes and NF4 "
                       "bases only")
    seq, notes = _seq_len(p["seq_len"])
    assumptions += notes
    if p["packing"] is False and "much shorter than" in p["notes"]:
        reasons.append("unpacked samples shorter than the stated length (padded to the longest "
                       "of each batch): lengths unknown")
    elif p["packing"] is False and isinstance(p["seq_len"], int):
        assumptions.append(f"unpacked data: the peak taken at the stated {p['seq_len']} tokens")
    if seq is None:
        reasons.append("sequence length not stated" if p["seq_len"] is None else
                       f"unknown sequence lengths ({p['seq_len']})")
    if p["batch_per_gpu"] is None:
        reasons.append("batch size not stated")
    optimizer = _optimizer(str(p["optimizer"] or ""))
    if optimizer is None:
        reasons.append("optimizer not stated")
    preset = next((name for pattern, name in MODELS if re.search(pattern, p["model"])), None)
    if preset is None:
        reasons.append(f"no preset for {p['model']}")
    if "no config for this run" in p["notes"]:
        reasons.append("setup undocumented")
    lora = None
    if p["lora_rank"]:
        targets_text = str(p["lora_targets"] or "")
        key = next((k for k in sorted(LORA_TARGETS, key=len, reverse=True)
                    if targets_text.startswith(k)), None)
        if key is None:
            reasons.append(f"LoRA targets not stated ({targets_text})")
        else:
            alpha = re.search(r"alpha (\d+)", targets_text)
            dropout = re.search(r"dropout (\d+(?:\.\d+)?)", targets_text + " " + p["notes"])
            saved = ("embed_tokens", "lm_head") if "modules_to_save wte,lm_head" in (
                targets_text) else ()
            lora = Lora(int(p["lora_rank"]), int(alpha.group(1)) if alpha else 2 * p["lora_rank"],
                        float(dropout.group(1)) if dropout else 0.0, LORA_TARGETS[key], saved)
            if p["group"] == "qwen1_readme_profiling":
                lora = dataclasses.replace(lora, dropout=0.05)  # finetune.py's lora_dropout
                assumptions.append("Qwen-1's fused c_attn adapter as q, k, v adapters")
    precision, base_dtype, lora_dtype, notes = _precision(str(p["precision"] or ""), bool(lora))
    upcast = _accelerate_upcast(p, precision)
    if upcast:  # replaces the record's "pure bf16" reading
        precision, base_dtype, lora_dtype, notes = "bf16-mixed", None, None, upcast
    lora_dtype, old_peft = _old_peft_adapters(p, bool(lora), base_dtype, lora_dtype)
    if old_peft:
        notes = [n for n in notes if "peft adapters fp32" not in n] + [
            "base loaded in bf16, Trainer bf16 autocast", *old_peft]
    assumptions += notes
    if precision is None and not reasons:
        reasons.append(f"precision not understood: {p['precision']}")
    if reasons:
        return Verdict("not expressible", tuple(dict.fromkeys(reasons)))
    quant = None
    if re.search(r"(?i)nf4|4-bit", str(p["quant"])):
        quant = "nf4"
    torchao, version = bool(quant and "torchao" in str(p["quant"])), None
    if torchao:
        version, why = TORCHTUNE_TORCHAO.get(
            p["group"], (None, "torchao version not stated: 0.3 or later"))
        assumptions.append(why)
        if base_dtype is None and precision == "bf16-true":
            base_dtype = "bf16"
            assumptions.append("torchtune builds every parameter in the recipe's dtype (bf16)")
    accumulation = _accumulation(p)
    if accumulation is None:
        accumulation = 1
        if "without gradient accumulation" not in p["notes"]:
            assumptions.append("gradient accumulation not stated: 1")
    attn_text = str(p["attn"] or "").lower()
    attn: str | None = ("flash_attention_2" if "flash_attention_2" in attn_text else
                        "eager" if attn_text.startswith("eager") else
                        "sdpa" if "sdpa" in attn_text else None)
    if preset == "bloomz-7b1":
        attn = None  # BLOOM has one attention (its own, eager); nothing to choose
        assumptions.append("BLOOM's own attention (the only one transformers has)")
    stat, unit, summed, notes = _statistic(metric)
    assumptions += notes
    architecture = None
    if "sequence classification" in p["model"]:
        architecture = "BertForSequenceClassification"
    if preset and p["model"].split(" ")[0].rstrip(")").endswith(("Instruct", "-it", "Chat")):
        assumptions.append("Instruct/Chat checkpoint estimated with its base preset")
    if p["group"].startswith("torchtune"):
        assumptions.append("torchtune's Llama and LoRA modules as transformers' with peft")
    gpu = next((name for pattern, name in GPUS if re.search(pattern, str(p["gpu"] or ""))), None)
    assert preset is not None and optimizer is not None and precision is not None
    assert seq is not None
    orig_params, fsdp1_notes = _fsdp1(p)
    assumptions += fsdp1_notes
    double_quant = bool(re.search(r"(?i)double quant|use_nested_quant true", str(p["quant"])))
    zero: tuple[tuple[str, Any], ...] = ()
    if "ZeRO stage not stated" in str(p["parallelism"]):  # a recipe's default (RECIPE_ZERO_STAGE)
        _, _, config, why = RECIPE_ZERO_STAGE[p["group"]]
        zero = tuple(config.items())
        assumptions.append(why)
    elif strategy == "zero3":  # a recipe's own ZeRO-3 config (RECIPE_ZERO3_CONFIG)
        zero, why_zero3 = _recipe_zero3(p["group"], preset)
        assumptions += why_zero3
    if strategy in ("zero1", "zero2", "zero3") and p["group"] in RECIPE_DEEPSPEED_OPTIMIZER:
        optimizer, why_optimizer = RECIPE_DEEPSPEED_OPTIMIZER[p["group"]]
        assumptions.append(why_optimizer)
    context, where = context_bytes(p["group"])
    if stat == "nvidia-smi" and where:
        assumptions.append(f"CUDA context {context / MIB:.0f} MiB: {where}")
    nodes = re.search(r"(\d+) nodes x (\d+)", str(p["parallelism"]))
    per_node = int(nodes.group(2)) if nodes else 8
    return Run(preset, architecture, int(p["batch_per_gpu"]), seq, precision, optimizer,
               bool(ckpt), lora, quant, base_dtype, lora_dtype, strategy, int(p["num_gpus"]),
               per_node, offload, accumulation, attn, gpu, stat, unit, summed,
               tuple(assumptions), orig_params, double_quant, zero,
               context if where else None, torchao, version)


def stated_length_floor(run: Run, params: int, config: dict[str, Any]) -> int | None:
    """Bytes per GPU that any step at the run's stated batch and length must hold, by hand
    arithmetic and deliberately low (None when the config lacks the sizes), the sum of:

    * the parameters as stored (2 bytes for a bf16 model, 4 for fp32, half a byte for a 4-bit
      base; divided by the GPUs under FSDP or ZeRO-3; nothing when offloaded);
    * under full fine-tuning with an AdamW (:data:`ADAM_STATES`), its two states per parameter
      in the parameters' dtype (fp32 under mixed precision, where they follow the fp32
      master), divided by the GPUs under FSDP and ZeRO; they exist from the first step on,
      which the published peak of a run's steps includes; nothing when offloaded;
    * what every block keeps for backward, in bf16: its input under checkpointing (layers x
      tokens x hidden x 2), else at least its MLP's gate and up projections, which the
      SiLU-and-product's backward reads (layers x tokens x 2 x intermediate x 2; one
      projection for an MLP that is not gated);
    * the loss: the causal-LM loss of transformers (every release) and of torchtune's
      ``TransformerDecoder`` reads the logits in fp32 (``.float()``), and cross-entropy's
      log-softmax keeps its fp32 output for backward while its input is still referenced, so
      both are alive at once: 8 bytes per predicted token (tokens - one per row) and vocabulary
      entry.
    """
    layers, hidden = config.get("num_hidden_layers"), config.get("hidden_size")
    inter, vocab = config.get("intermediate_size"), config.get("vocab_size")
    if not all(isinstance(v, int) for v in (layers, hidden, inter, vocab)):
        return None
    assert isinstance(layers, int) and isinstance(hidden, int) and isinstance(inter, int)
    assert isinstance(vocab, int)
    per_param = (0.5 if run.quantization else
                 2 if run.precision in ("bf16-true", "16-true") or run.base_dtype else 4)
    shards = run.num_gpus if run.distributed in ("fsdp", "zero3") else 1
    state_shards = run.num_gpus if run.distributed in ("fsdp", "zero1", "zero2", "zero3") else 1
    if run.offload == "params":  # the parameters live on the CPU
        per_param = 0
    states = 0
    if run.lora is None and run.optimizer in ADAM_STATES and run.offload is None:
        states = int(params * 2 * (2 if run.precision in ("bf16-true", "16-true") else 4)
                     / state_shards)
    tokens = run.batch_size * run.seq_len
    # a gated MLP (SwiGLU/GeGLU) keeps gate and up; any other keeps at least its activation's
    # input
    gated = 2 if config.get("model_type") in GATED_MLP else 1
    kept = hidden * 2 if run.gradient_checkpointing else gated * inter * 2
    loss = run.batch_size * (run.seq_len - 1) * vocab * 8
    return int(params * per_param / shards) + states + layers * tokens * kept + loss


ADAM_STATES = frozenset({"adamw", "adamw-fused", "adamw-hf"})
"""Optimizers that keep two full-size states (``exp_avg``, ``exp_avg_sq``) per parameter."""


GATED_MLP = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2"})
"""Model types whose MLP is ``down(act(gate(x)) * up(x))``: its backward reads both ``gate(x)``
and ``up(x)``."""


def _contradicted(p: dict[str, Any], run: Run) -> str | None:
    """Why an unpacked record's stated length cannot be what ran, or None: its published
    figure is below :func:`stated_length_floor`, so its batches were shorter than stated and
    their lengths are unknown (a padded batch is as long as its longest sample)."""
    if p["packing"] is not False:
        return None
    from layerscope.catalog import get_preset

    model = skeleton(run.preset, run.architecture)
    params = sum(t.numel() for t in model.parameters())
    floor = stated_length_floor(run, params, get_preset(run.preset).config())
    per_gpu = p["value"] * {"GiB": GIB, "GB": GB, "MiB": MIB}[run.unit] / (
        run.num_gpus if run.summed else 1)
    if floor is None or floor <= per_gpu:
        return None
    return (f"the stated {run.batch_size}x{run.seq_len} tokens cannot have run: parameters, "
            f"optimizer states, the blocks' saved tensors and the loss's fp32 logits alone are "
            f"{floor / GB:.1f} GB > the published "
            f"{per_gpu / GB:.1f} GB, so the unpacked batches were shorter (lengths unknown)")


def decimal_groups(points: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Groups whose "GB" without a stated base cannot be GiB, with the figure that shows it:
    one of the group's figures, per GPU, is above its GPU's whole memory (``nvidia-smi``'s
    total) in GiB, which neither the allocator's statistics nor ``nvidia-smi`` can show. The
    group's figures are then read as 10**9 bytes, the SI reading ("GB" as 1000 MiB, the other
    one left, would be 4.9% more)."""
    from layerscope.estimate.hardware import get_gpu

    out: dict[str, str] = {}
    for i, p in enumerate(points):
        run = translate(p)
        if isinstance(run, Verdict) or run.unit != "GiB" or run.gpu is None:
            continue
        if not _unstated_gb(run):
            continue
        per_gpu = p["value"] / (run.num_gpus if run.summed else 1)
        memory = get_gpu(run.gpu).memory_bytes / GIB
        if per_gpu > memory and p["group"] not in out:
            out[p["group"]] = (f"'GB' read as 10**9 bytes: #{i}'s {per_gpu:g} per GPU is more "
                               f"than a {run.gpu}'s {memory:.2f} GiB (as 1000 MiB, the other "
                               f"reading left, the figures would be 4.9% more)")
    return out


def judge(p: dict[str, Any], decimal: Mapping[str, str] | None = None) -> Run | Verdict:
    """A comparable :class:`Run`, or a :class:`Verdict` saying why not (yet). ``decimal``:
    :func:`decimal_groups` of the points read."""
    run = translate(p)
    if isinstance(run, Verdict):
        return run
    why = (decimal or {}).get(p["group"])
    if why and run.unit == "GiB" and _unstated_gb(run):
        kept = tuple(a for a in run.assumptions if UNSTATED_GB not in a)
        run = dataclasses.replace(run, unit="GB", assumptions=(*kept, why))
    contradiction = _contradicted(p, run)
    if contradiction:
        return Verdict("not expressible", (contradiction,))
    missing = [f for f in run.features() if not supported(f)]
    if missing:
        return Verdict("pending", tuple(missing), run)
    return run


# -- estimation ----------------------------------------------------------------------------------
_MODELS: dict[tuple[str, str | None], Any] = {}


def skeleton(preset: str, architecture: str | None) -> Any:
    from layerscope.build import empty_model
    from layerscope.catalog import get_preset

    key = (preset, architecture)
    if key not in _MODELS:
        source: Any = preset
        if architecture:
            source = get_preset(preset).config()
            source["architectures"] = [architecture]
            source["num_labels"] = 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _MODELS[key] = empty_model(source)
    return _MODELS[key]


def settings(run: Run) -> dict[str, Any]:
    """Keyword arguments of ``estimate_memory`` for the run (the pending ones only once their
    feature is supported: each is one line here)."""
    kw: dict[str, Any] = {"batch_size": run.batch_size, "seq_len": run.seq_len,
                              "precision": run.precision, "optimizer": run.optimizer,
                              "gradient_checkpointing": run.gradient_checkpointing}
    if run.lora:
        from peft import LoraConfig

        kw["lora"] = LoraConfig(r=run.lora.rank, lora_alpha=run.lora.alpha,
                                lora_dropout=run.lora.dropout,
                                target_modules=list(run.lora.targets),
                                modules_to_save=list(run.lora.modules_to_save) or None)
    if run.distributed:
        kw.update(distributed=run.distributed, num_gpus=run.num_gpus,
                  gpus_per_node=run.gpus_per_node)
    if run.offload:
        kw["offload"] = run.offload
    if run.fsdp1_use_orig_params is not None:  # FSDP1: a Sharding carries its knobs
        from layerscope.estimate.sharding import FsdpSettings, make_sharding

        flat = {k: kw.pop(k, None) for k in ("distributed", "num_gpus", "gpus_per_node", "offload")}
        kw["sharding"] = make_sharding(**flat, fsdp=FsdpSettings(
            version=1, use_orig_params=run.fsdp1_use_orig_params))
    elif run.zero:  # a recipe's DeepSpeed config: a Sharding carries its zero_optimization
        from layerscope.estimate.sharding import ZeroSettings, make_sharding

        flat = {k: kw.pop(k, None) for k in ("distributed", "num_gpus", "gpus_per_node", "offload")}
        kw["sharding"] = make_sharding(**flat, zero=ZeroSettings(**dict(run.zero)))
    if run.quantization:
        from layerscope.quantization import Quantization

        if run.torchao:
            kw["quantization"] = Quantization(run.quantization, library="torchao",
                                              torchao_version=run.torchao_version)
        else:
            kw["quantization"] = Quantization(run.quantization, double_quant=run.double_quant)
    if run.base_dtype:
        kw["base_dtype"] = run.base_dtype
    if run.lora_dtype:
        kw["lora_dtype"] = run.lora_dtype
    if run.attn is not None:
        kw["attn_implementation"] = run.attn
    if run.accumulation > 1:
        kw["gradient_accumulation_steps"] = run.accumulation
    return kw


MEASURED_CONTEXT = {
    # group -> (bytes, source): the CUDA context a source measured in its own environment
    "hf_perf_train_gpu_one": (1343 * MIB, (
        "the doc's own measurement before loading the model: torch.ones((1, 1)).to('cuda') -> "
        "'GPU memory occupied: 1343 MB' (pynvml used // 1024**2), 'the kernels alone take up "
        "1.3GB'")),
}
"""Where a source measured the CUDA context of its runs (an older CUDA without lazy module
loading), its ``nvidia-smi`` figures are the reserved bytes plus that measurement rather than
layerscope's :data:`~layerscope.estimate.memory.CUDA_CONTEXT_BYTES`."""


def context_bytes(group: str) -> tuple[int, str | None]:
    """The CUDA context an ``nvidia-smi`` figure of ``group`` includes, and its source (None:
    layerscope's default)."""
    from layerscope.estimate.memory import CUDA_CONTEXT_BYTES

    measured = MEASURED_CONTEXT.get(group)
    return measured if measured else (CUDA_CONTEXT_BYTES, None)


def estimate(run: Run) -> tuple[float, Any]:
    """The estimate in the point's statistic and unit, and the ``MemoryEstimate``."""
    from layerscope import estimate_memory
    from layerscope.estimate.memory import CUDA_CONTEXT_BYTES

    model = skeleton(run.preset, run.architecture)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = estimate_memory(model, **settings(run))
    nbytes = est.peak_bytes if run.statistic == "allocated" else est.reserved_bytes
    if run.statistic == "nvidia-smi":
        nbytes += run.context_bytes if run.context_bytes is not None else CUDA_CONTEXT_BYTES
    if run.summed:
        nbytes *= run.num_gpus
    return nbytes / {"GiB": GIB, "GB": GB, "MiB": MIB}[run.unit], est


APPROXIMABLE = {"reserved_bytes", "attn_implementation", "lora_dtype", "base_dtype",
                "gradient_accumulation"}
"""Pending features that ``--approximate`` may ignore to show where a point stands today."""


def nearest_today(run: Run) -> tuple[Run, list[str]]:
    """The run with its unsupported :data:`APPROXIMABLE` settings dropped: allocated for
    reserved (+ the CUDA context for nvidia-smi), the model's default attention, fp32 adapters,
    the base dtype as the whole model's precision, one micro-batch."""
    ignored = [f for f in run.features() if f in APPROXIMABLE and not supported(f)]
    near = run
    if "reserved_bytes" in ignored:
        near = dataclasses.replace(near, statistic="allocated")
    if "attn_implementation" in ignored:
        near = dataclasses.replace(near, attn=None)
    if "lora_dtype" in ignored:
        near = dataclasses.replace(near, lora_dtype=None)
    if "base_dtype" in ignored:
        near = dataclasses.replace(near, base_dtype=None, precision=f"{run.base_dtype}-true")
    if "gradient_accumulation" in ignored:
        near = dataclasses.replace(near, accumulation=1)
    return near, ignored


# -- the step-time table --------------------------------------------------------------------------
TIME_FEATURES = {"distributed", "offload", "quantization", "base_dtype", "lora_dtype",
                 "gradient_accumulation", "attn_implementation"}
"""Pending features that change a step's time (``reserved_bytes`` does not)."""


def throughput(p: dict[str, Any], metric: str, value: float) -> tuple[float, list[str]] | str:
    """The published throughput as tokens/s per GPU, with its assumptions, or why not."""
    gpus = int(p["num_gpus"] or 1)
    seq, _ = _seq_len(p["seq_len"])
    if "tokens_per_sec_per_gpu" in metric or "tokens_per_gpu_per_sec" in metric:
        return value, []
    m = re.search(r"tokens_per_sec_total_(\d+)gpu", metric)
    if m:
        return value / int(m.group(1)), [f"a total over {m.group(1)} GPUs, divided by them"]
    if metric.startswith("tokens_per_sec"):
        return value, ["tokens/s taken as per GPU (torchtune logs tokens_per_second_per_gpu)"]
    if metric == "train_samples_per_second" and seq is not None:
        return value * seq / gpus, ["the Trainer's samples/s over every GPU, x seq_len tokens"]
    if metric.startswith("step_time_s_per_iter"):
        steps, batch = _accumulation(p) or 1, p["batch_per_gpu"]
        if seq is None or not isinstance(batch, int):
            return "an iteration's tokens are not stated (batch or sequence length)"
        if not supported("gradient_accumulation"):
            return f"an iteration of {steps} accumulated micro-batches (pending: gradient_accumulation)"
        return batch * steps * seq / value, [
            f"s/iter taken as one optimizer step (the HF Trainer's progress bar) of {steps} "
            f"micro-batches of {batch}x{seq} tokens per GPU"]
    return f"no throughput understood ({metric})"


def time_run(p: dict[str, Any], metric: str, value: float) -> tuple[float, float, str] | str:
    """(published tokens/s per GPU, estimated tokens/s per GPU, note) for a throughput point,
    or why it is not expressible (the step from ``estimate_step_time`` with every setting the
    memory table passes: strategy, GPUs, LoRA, precision; communication included)."""
    published = throughput(p, metric, value)
    if isinstance(published, str):
        return published
    per_gpu, notes = published
    stripped = dict(p, metric="peak_memory_GiB")  # judge the setting, not the figure
    run = translate(stripped)
    if isinstance(run, Verdict):
        return "; ".join(run.reasons)
    missing = [f for f in run.features() if (f in TIME_FEATURES or f.startswith("optimizer:"))
               and not supported(f)]
    if missing:
        return "pending: " + ", ".join(missing)
    if run.gpu is None:
        return f"GPU not in the catalogue ({p['gpu']})"
    from layerscope.errors import LayerscopeError
    from layerscope.estimate.time import estimate_step_time

    model = skeleton(run.preset, run.architecture)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step = estimate_step_time(model, gpu=run.gpu, **settings(run))
    except LayerscopeError as exc:  # a setting layerscope refuses: pending, as in memory
        return f"pending: layerscope: {str(exc).splitlines()[0][:90]}"
    if not isinstance(p["seq_len"], int):  # e.g. "<=512": batches padded to their longest
        return (f"batches padded to their longest, under {run.seq_len} tokens: the mean length, "
                f"which sets the throughput, is not stated (at {run.seq_len} tokens: "
                f"{step.tokens_per_second:.0f} tokens/s per GPU, "
                f"{100 * (step.tokens_per_second - per_gpu) / per_gpu:+.0f}%)")
    c = getattr(step, "communication", None)  # None: one GPU, or a layerscope without it
    note = "one GPU" if c is None else (
        f"{c.strategy} x{c.num_gpus}: compute {c.compute_seconds:.2f} s, exposed comm "
        f"{c.exposed_seconds:.3f} s, optimizer {c.optimizer_seconds:.3f} s")
    return per_gpu, step.tokens_per_second, "; ".join([note, *notes])


# -- report ---------------------------------------------------------------------------------------
@dataclass
class Tally:
    errors: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    kinds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    methods: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    status: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    pending: Counter[str] = field(default_factory=Counter)


def _summary(errors: list[float]) -> list[str]:
    a = [abs(e) for e in errors]
    return [str(len(a)), f"{statistics.median(a):.1f}%", f"{max(a):.1f}%",
            f"{sum(x <= 10 for x in a)}/{len(a)}", f"{sum(x <= 25 for x in a)}/{len(a)}"]


def _setting(run: Run) -> str:
    parts = [run.preset, f"b{run.batch_size}x{run.seq_len}", run.precision, run.optimizer]
    if run.gradient_checkpointing:
        parts.append("ckpt")
    if run.lora:
        parts.append(f"lora{run.lora.rank}")
    if run.quantization:
        parts.append(run.quantization + ("+dq" if run.double_quant else "") + (
            f"(torchao {run.torchao_version or '0.3+'})" if run.torchao else ""))
    if run.distributed:
        fsdp1 = "(fsdp1)" if run.fsdp1_use_orig_params is not None else ""
        parts.append(f"{run.distributed}x{run.num_gpus}{fsdp1}")
    if run.offload:
        parts.append(f"offload {run.offload}")
    return " ".join(parts)


def _kind(run: Run) -> str:
    """The point's kind for the second summary: its strategy and offload."""
    kind = run.distributed or "one GPU"
    if run.fsdp1_use_orig_params is not None:
        kind += " (FSDP1)"
    return kind + (f" + offload {run.offload}" if run.offload else "")


def _method(run: Run) -> str:
    """The point's fine-tuning method for the third summary, one GPU or sharded."""
    method = ("QLoRA (4-bit base, LoRA)" if run.quantization and run.lora else
              "LoRA" if run.lora else "full or partial")
    return f"{method}, {'sharded' if run.distributed else 'one GPU'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", default="", help="only points whose group or model "
                        "contains this text")
    parser.add_argument("--points", type=Path, default=PUBLISHED, help="points.jsonl to read")
    parser.add_argument("--verbose", action="store_true", help="print assumptions per point")
    parser.add_argument("--approximate", action="store_true", help="also estimate pending "
                        "single-GPU points with their missing settings ignored (a diagnostic "
                        "table, never counted in the results)")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the traced steps' notices are not results
    points = [json.loads(line) for line in args.points.read_text().splitlines() if line]
    decimal = decimal_groups(points)
    tally = Tally()
    rows, bounds, times = [], [], []
    for i, p in enumerate(points):
        if args.filter and args.filter not in p["group"] and args.filter not in p["model"]:
            continue
        times.append((i, p))
        verdict = judge(p, decimal)
        published = f"{p['value']:g}"
        if isinstance(verdict, Verdict):
            tally.status[verdict.status] += 1
            for r in verdict.reasons:
                (tally.reasons if verdict.status == "not expressible" else tally.pending)[r] += 1
            setting = _setting(verdict.run) if verdict.run else p["model"][:40]
            rows.append([i, p["group"], setting, published, "", "",
                         f"{verdict.status}: {'; '.join(verdict.reasons)}"])
            if verdict.run and set(verdict.reasons) <= APPROXIMABLE:
                bounds.append((i, p, verdict.run))
        else:
            try:
                value, _ = estimate(verdict)
            except Exception as exc:
                from layerscope.errors import LayerscopeError

                if not isinstance(exc, LayerscopeError):
                    raise
                tally.status["pending"] += 1
                reason = f"layerscope: {str(exc).splitlines()[0][:90]}"
                tally.pending[reason] += 1
                rows.append([i, p["group"], _setting(verdict), published, "", "",
                             f"pending: {reason}"])
                continue
            err = 100 * (value - p["value"]) / p["value"]
            tally.status["compared"] += 1
            tally.errors[p["group"]].append(err)
            tally.kinds[_kind(verdict)].append(err)
            tally.methods[_method(verdict)].append(err)
            rows.append([i, p["group"], _setting(verdict),
                         f"{published} {verdict.unit} {verdict.statistic}"
                         + (" (sum)" if verdict.summed else ""), f"{value:.2f}", f"{err:+.1f}%",
                         "; ".join(verdict.assumptions) if args.verbose else ""])
    print(tabulate(rows, headers=["#", "group", "setting", "published", "estimate", "error",
                                  "status / assumptions"]))
    print()
    all_errors = [e for errs in tally.errors.values() for e in errs]
    summary = [[g, *_summary(e)] for g, e in sorted(tally.errors.items())]
    if all_errors:
        summary.append(["overall", *_summary(all_errors)])
    print(tabulate(summary, headers=["group", "points", "median |error|", "worst |error|",
                                     "within 10%", "within 25%"]))
    print()
    kinds = [[k, *_summary(e)] for k, e in sorted(tally.kinds.items())]
    sharded = [e for k, errs in tally.kinds.items() if k != "one GPU" for e in errs]
    if sharded:
        kinds.append(["data parallel and offload (all above but one GPU)", *_summary(sharded)])
    print(tabulate(kinds, headers=["kind", "points", "median |error|", "worst |error|",
                                   "within 10%", "within 25%"]))
    print()
    methods = [[m, *_summary(e)] for m, e in sorted(tally.methods.items())]
    adapters = [e for m, errs in tally.methods.items() if "LoRA" in m for e in errs]
    if adapters:
        methods.append(["LoRA and QLoRA (the rows above with adapters)", *_summary(adapters)])
    print(tabulate(methods, headers=["method", "points", "median |error|", "worst |error|",
                                     "within 10%", "within 25%"]))
    print()
    print("points:", ", ".join(f"{n} {s}" for s, n in tally.status.most_common()))
    print()
    print(tabulate(tally.reasons.most_common(), headers=["not expressible because", "points"]))
    print()
    print(tabulate(tally.pending.most_common(), headers=["pending on", "points"]))
    if args.approximate and bounds:
        print()
        approx, aerrs = [], []
        for i, p, run in bounds:
            near, ignored = nearest_today(run)
            try:
                value, _ = estimate(near)
            except Exception as exc:
                from layerscope.errors import LayerscopeError

                if not isinstance(exc, LayerscopeError):
                    raise
                continue
            err = 100 * (value - p["value"]) / p["value"]
            aerrs.append(err)
            approx.append([i, p["group"], _setting(run), f"{p['value']:g} {run.unit}",
                           f"{value:.2f}", f"{err:+.1f}%", ", ".join(ignored)])
        print("DIAGNOSTIC ONLY (--approximate): pending single-GPU points estimated with their "
              "missing settings ignored; not a result, not counted above")
        print(tabulate(approx, headers=["#", "group", "setting", "published", "approximation",
                                        "error", "ignored"]))
        if aerrs:
            print(tabulate([["approximation", *_summary(aerrs)]], headers=[
                "", "points", "median |error|", "worst |error|", "within 10%", "within 25%"]))
    print()
    trows, terrs = [], []
    for i, p in times:
        pair = [(str(p["metric"]), p["value"])] if "tokens_per_sec" in str(p["metric"]) else []
        if p.get("paired_metric"):
            pair.append((str(p["paired_metric"]), p["paired_value"]))
        for metric, value in pair:
            result = time_run(p, metric, float(value))
            if isinstance(result, str):
                trows.append([i, p["group"], f"{value:g}", "", "", "", f"not compared: {result}"])
                continue
            published, tps, note = result
            err = 100 * (tps - published) / published
            terrs.append(err)
            trows.append([i, p["group"], f"{value:g}", f"{published:.0f}", f"{tps:.0f}",
                          f"{err:+.1f}%", note])
    print("Throughput (tokens/s per GPU): estimate_step_time, communication included")
    print(tabulate(trows, headers=["#", "group", "published", "per GPU", "estimate", "error",
                                   "note"]))
    if terrs:
        print(tabulate([["time", *_summary(terrs)]], headers=[
            "", "points", "median |error|", "worst |error|", "within 10%", "within 25%"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
