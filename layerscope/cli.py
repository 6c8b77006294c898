"""The ``layerscope`` command line: the only module that prints besides the ``print_*`` helpers.

Exit codes: 0 success (also for a run that does not fit, unless asked otherwise); 2 a usage
error (bad arguments or values: unknown model, plan, GPU, precision, optimizer, non-positive
sizes), reported as one line on stderr; 1 a failure while doing the work (e.g. a file that
cannot be written), or, with ``--fail-if-not-fits``, a run that does not fit on the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from layerscope.errors import LayerscopeError

USAGE, FAILURE = 2, 1
DEFAULT_SAMPLES, DEFAULT_EPOCHS = 10_000, 1
"""The run the report prices when ``--samples``/``--epochs`` are not given."""


class UsageError(Exception):
    """A bad command-line value found after argparse (exit code 2)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (what is wrong, where to look)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Progress:
    """``\r``-updated status on stderr: only on a terminal, and only once the work has
    taken more than a second (quick commands stay silent)."""

    def __init__(self, stream: Any = None, delay: float = 1.0) -> None:
        # stderr read now, not when the module was imported (a test may have swapped it since)
        self.stream, self.delay = sys.stderr if stream is None else stream, delay
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start, self.shown = time.monotonic(), False

    def __call__(self, message: str) -> None:
        if self.enabled and time.monotonic() - self.start > self.delay:
            self.stream.write(f"\r\033[K{message}...")
            self.stream.flush()
            self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``minimum`` to :data:`~layerscope.checks.MAX_COUNT`
    (a 400-digit number is a usage error, not an overflow deep in the arithmetic)."""
    from layerscope.checks import MAX_COUNT

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # also past Python's 4300-digit limit
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        if value > MAX_COUNT:
            raise argparse.ArgumentTypeError(f"{text[:20]}... is too large (at most 2**53)")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _load(args: argparse.Namespace) -> Any:
    """The model skeleton for ``args.model`` (anything ``empty_model`` accepts)."""
    from layerscope.build import empty_model

    return empty_model(args.model, trust_remote_code=getattr(args, "trust_remote_code", False))


def _plan(args: argparse.Namespace) -> Any:
    from layerscope.plan import FreezePlan

    plan = getattr(args, "plan", None)
    return None if plan is None else FreezePlan.parse(plan)  # "" is an error, not "none"


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of seconds > 0")
    return value


def _price(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0 (USD per GPU-hour)")
    return value


def _check_names(args: argparse.Namespace) -> None:
    """Setting names checked before any model is built (a typo fails in milliseconds)."""
    from layerscope.setup import (
        ATTENTION_IMPLEMENTATIONS,
        EXPERTS_IMPLEMENTATIONS,
        FLOAT_DTYPES,
        resolve_optimizer,
        resolve_precision,
    )

    if getattr(args, "fabric", None) is not None:
        from layerscope.estimate.hardware import get_fabric

        get_fabric(args.fabric)
    if args.precision is not None:
        resolve_precision(args.precision)
    if args.optimizer is not None:
        resolve_optimizer(args.optimizer)
    if args.attn is not None and args.attn not in ATTENTION_IMPLEMENTATIONS:
        raise UsageError(
            f"unknown --attn {args.attn!r}; allowed: {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if args.experts is not None and args.experts not in EXPERTS_IMPLEMENTATIONS:
        raise UsageError(
            f"unknown --experts {args.experts!r}; allowed: {', '.join(EXPERTS_IMPLEMENTATIONS)}"
        )
    _quantization(args)
    for flag, value, allowed in (("--base-dtype", args.base_dtype, ("auto",)),
                                 ("--lora-dtype", args.lora_dtype, ())):
        if value is not None and value.lower() not in (*FLOAT_DTYPES, *allowed):
            raise UsageError(f"unknown {flag} {value!r}; allowed: fp32, bf16, fp16"
                             + "".join(f", {a}" for a in allowed))


def _quantization(args: argparse.Namespace) -> Any:
    """``--quantization`` and ``--double-quant`` as a ``Quantization`` (None without them).

    Raises:
        UsageError: ``--double-quant`` without a 4-bit ``--quantization``.
    """
    from layerscope.quantization import Quantization

    q = Quantization.of(args.quantization)
    if args.double_quant:
        if q is None or not q.four_bit:
            raise UsageError("--double-quant needs --quantization nf4 or fp4")
        q = q.replace_double_quant(True)
    return q


def _gpu(args: argparse.Namespace, default: str | None = None) -> Any:
    from layerscope.estimate.hardware import get_gpu

    name = default if args.gpu is None else args.gpu  # "" is an unknown GPU, not "no GPU"
    if name is None:
        return None
    gpu = get_gpu(name).with_fabric(getattr(args, "fabric", None))
    price = getattr(args, "price_per_hour", None)
    return gpu if price is None else gpu.with_price(price)


def _run_config(args: argparse.Namespace, model: Any) -> Any:
    """The ``--deepspeed`` / ``--accelerate-config`` file read (None without one)."""
    from layerscope.distributed_config import read_accelerate_config, read_deepspeed_config

    deepspeed, accelerate = getattr(args, "deepspeed", None), getattr(args, "accelerate_config", None)
    if deepspeed and accelerate:
        raise UsageError("give --deepspeed or --accelerate-config, not both")
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(
        getattr(config, "text_config", None), "hidden_size", None)
    if deepspeed:
        return read_deepspeed_config(deepspeed, hidden_size=hidden, num_gpus=args.num_gpus,
                                     gpus_per_node=args.gpus_per_node)
    if accelerate:
        return read_accelerate_config(accelerate, hidden_size=hidden)
    return None


def _setup(args: argparse.Namespace, progress: Progress, batch_size: int | None = None) -> Any:
    """The pre-flight context and the training setup: the model built, the plan checked against
    it (a plan beyond the layer count, or one that trains nothing, is a usage error). A
    DeepSpeed or accelerate file gives the sharding, and the precision, optimizer, batch and
    checkpointing it states; flags given on the command line win."""
    from layerscope.preflight import Context
    from layerscope.setup import TrainingSetup

    _check_names(args)
    model, plan = _load(args), _plan(args)
    run = _run_config(args, model)

    def pick(flag: Any, from_file: Any, default: Any) -> Any:
        return flag if flag is not None else from_file if from_file is not None else default

    batch = batch_size if batch_size is not None else getattr(args, "batch_size", None)
    setup = TrainingSetup(
        model, plan,
        batch_size=pick(batch, run and run.batch_size, 1),
        seq_len=args.seq_len,
        precision=pick(args.precision, run and run.precision, "bf16-mixed"),
        optimizer=pick(args.optimizer, run and run.optimizer, "adamw"),
        gradient_checkpointing=pick(args.gradient_checkpointing,
                                    run and run.gradient_checkpointing, False),
        gradient_accumulation_steps=pick(getattr(args, "gradient_accumulation_steps", None),
                                         run and run.gradient_accumulation_steps, 1),
        lora=args.lora_rank, attn_implementation=args.attn,
        experts_implementation=args.experts, quantization=_quantization(args),
        base_dtype=args.base_dtype, lora_dtype=args.lora_dtype,
        sharding=run.sharding if run is not None else None,
        distributed=getattr(args, "distributed", None), num_gpus=getattr(args, "num_gpus", None),
        gpus_per_node=getattr(args, "gpus_per_node", None), offload=getattr(args, "offload", None),
        fsdp_version=getattr(args, "fsdp_version", None),
        target_len=getattr(args, "target_len", None), images=getattr(args, "images", None),
        image_size=getattr(args, "image_size", None),
        audio_seconds=getattr(args, "audio_seconds", None),
    )
    return Context(args.model, progress), setup


def _finite(value: Any) -> Any:
    """``value`` with every infinite or NaN float as None: JSON has no Infinity (a rate over a
    zero time, a cost past the float range)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _emit(args: argparse.Namespace, doc: dict[str, Any], text: Callable[..., str]) -> None:
    from layerscope.render.console import use_color

    if args.json:
        print(json.dumps(_finite(doc), indent=2, allow_nan=False))
    else:
        print(text(doc, color=use_color(sys.stdout)))


def _gate(args: argparse.Namespace, fits: bool) -> int:
    """Exit code 1 for a run that does not fit, when ``--fail-if-not-fits`` asks for it."""
    if args.fail_if_not_fits and not fits:
        print(f"layerscope {args.command}: the run does not fit (--fail-if-not-fits)",
              file=sys.stderr)
        return FAILURE
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from layerscope.preflight import estimate_document
    from layerscope.render.console import estimate_text

    if args.fail_if_not_fits and not args.gpu:
        raise UsageError("--fail-if-not-fits needs --gpu (the GPU to check against)")
    progress = Progress()
    gpu = _gpu(args)
    ctx, setup = _setup(args, progress)
    doc = estimate_document(ctx, setup, gpu)
    progress.done()
    _emit(args, doc.to_dict(), estimate_text)
    return _gate(args, doc.verdict is None or doc.verdict.fits)


def cmd_time(args: argparse.Namespace) -> int:
    from layerscope.preflight import DEFAULT_TIME_GPU, time_document
    from layerscope.render.console import time_text

    gpu = _gpu(args, DEFAULT_TIME_GPU)
    samples, seq_lens = _samples(args)
    progress = Progress()
    ctx, setup = _setup(args, progress)
    doc = time_document(ctx, setup, gpu, samples, args.epochs, setup.num_gpus, seq_lens)
    progress.done()
    _emit(args, doc.to_dict(), time_text)
    return _gate(args, doc.estimate.fits(gpu.memory_bytes))


def _samples(args: argparse.Namespace) -> tuple[int, list[int] | None]:
    """--samples, or the number of --lengths (which must agree when both are given)."""
    if args.lengths is None:
        if args.samples is None:
            raise UsageError("time needs --samples N (or --lengths FILE, one count per example)")
        return args.samples, None
    from layerscope.estimate.lengths import read_lengths

    lengths = read_lengths(args.lengths, args.lengths_field)
    if args.samples is not None and args.samples != len(lengths):
        raise UsageError(f"--samples {args.samples} but --lengths {args.lengths} holds "
                         f"{len(lengths)} counts (one per example)")
    return len(lengths), lengths


def cmd_gpus(args: argparse.Namespace) -> int:
    from layerscope.preflight import gpus_document
    from layerscope.render.console import gpus_text

    if args.epochs is not None and args.samples is None:
        raise UsageError("--epochs needs --samples (the run's size)")
    epochs = None if args.samples is None else (args.epochs or 1)
    progress = Progress()
    ctx, setup = _setup(args, progress)
    doc = gpus_document(ctx, setup, args.samples, epochs, args.fabric)
    progress.done()
    _emit(args, doc.to_dict(), gpus_text)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from layerscope.preflight import fit_document
    from layerscope.render.console import fit_text

    progress = Progress()
    gpu = _gpu(args)
    ctx, setup = _setup(args, progress, batch_size=1)
    doc = fit_document(ctx, setup, gpu)
    progress.done()
    _emit(args, doc.to_dict(), fit_text)
    return _gate(args, doc.max_batch_size > 0)


def cmd_report(args: argparse.Namespace) -> int:
    from layerscope.preflight import report_document
    from layerscope.render.report import report_html

    folder = os.path.dirname(os.path.abspath(args.html))
    if not args.html or os.path.isdir(args.html):  # fail before minutes of work, not after
        raise UsageError(f"--html {args.html!r} is not a file name")
    if not os.path.isdir(folder):
        raise OSError(f"cannot write {args.html}: folder {folder} does not exist")
    progress = Progress()
    gpu = _gpu(args)
    ctx, setup = _setup(args, progress)
    doc = report_document(ctx, setup, gpu, args.samples or DEFAULT_SAMPLES,
                          args.epochs or DEFAULT_EPOCHS, setup.num_gpus)
    progress.done()
    _write_atomically(args.html, report_html(_finite(doc.to_dict())))
    print(f"wrote {args.html}")
    return 0


def _write_atomically(path: str, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: a
    failure (or Ctrl-C) part-way leaves an existing file as it was."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".layerscope-", suffix=".html.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def cmd_presets(args: argparse.Namespace) -> int:
    from layerscope.catalog import presets

    names = presets()
    if args.json:
        print(json.dumps(names))
    else:
        print("\n".join(names))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from layerscope.layer_utils import model_summary

    print(model_summary(_load(args), max_depth=args.depth))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import warnings

    from layerscope.apply import apply_plan
    from layerscope.layer_utils import layer_status

    model = _load(args)
    plan = _plan(args)
    if plan is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            apply_plan(model, plan)
        for w in caught:
            print(f"note: {w.message}", file=sys.stderr)
    print(layer_status(model, show_all=args.all))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="layerscope",
        description="Pre-flight checks for fine-tuning: will it fit, what will it cost, "
        "which layers to freeze.",
        epilog="Exit codes: 0 done; 2 usage error (bad argument or value); 1 failure while "
        "working, or a run that does not fit with --fail-if-not-fits.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
        return p

    def add_model(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", metavar="MODEL",
                       help="a preset (see `layerscope presets`), a config.json file or folder, "
                       "or a hub id already in the local cache")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow configs that need the model's own code")

    def add_plan(p: argparse.ArgumentParser) -> None:
        p.add_argument("--plan", metavar="PLAN",
                       help="none, all, lp-lora[:RATIO], first:N, last:N, except-last:N, "
                       "embeddings, regex:PATTERN or a plan .json file; + combines "
                       "(default: none, full fine-tuning)")

    def add_step(p: argparse.ArgumentParser, batch: str | None = "optional") -> None:
        if batch is not None:
            p.add_argument("--batch-size", type=_positive_int, metavar="B",
                           required=batch == "required", default=None,
                           help="sequences per step per GPU" + ("" if batch == "required"
                                                                else " (default 1)"))
        p.add_argument("--seq-len", type=_positive_int, default=2048, metavar="S",
                       help="tokens per sequence (default 2048)")
        p.add_argument("--precision", default=None, metavar="P",
                       help="32-true, bf16-true, 16-true, bf16-mixed, 16-mixed or an alias "
                       "such as fp32, bf16 (default bf16-mixed)")
        p.add_argument("--optimizer", default=None, metavar="O",
                       help="adamw, adamw-fused, adam, sgd, sgd-momentum, adamw-8bit, "
                       "paged-adamw-8bit, paged-adamw-32bit, adafactor, adamw-hf (default adamw)")
        p.add_argument("--gradient-checkpointing", action="store_true", default=None,
                       help="recompute each block's forward during backward")
        p.add_argument("--gradient-accumulation-steps", type=_positive_int, default=None,
                       metavar="K", help="micro-batches of --batch-size per optimizer step "
                       "(default 1): the kept gradients add to the peak, the optimizer runs "
                       "once per K")
        p.add_argument("--lora-rank", type=_positive_int, metavar="R",
                       help="LoRA adapters of rank R on every Linear of the blocks, base frozen "
                       "(with --plan: the base parameters the plan leaves trainable train too)")
        p.add_argument("--attn", metavar="IMPL",
                       help="attention implementation: sdpa, eager, flash_attention_2 or "
                       "flex_attention (default: what transformers picks for the model)")
        p.add_argument("--experts", metavar="IMPL",
                       help="mixture-of-experts implementation: grouped_mm, batched_mm or eager "
                       "(default: what transformers picks for the model, grouped_mm)")
        p.add_argument("--quantization", metavar="Q",
                       help="a bitsandbytes-quantized frozen base: nf4, fp4 or int8 (QLoRA: "
                       "with --lora-rank); prepare_model_for_kbit_training is assumed on one GPU, DDP "
                       "and ZeRO-1/2, not under FSDP or ZeRO-3 (as TRL does)")
        p.add_argument("--double-quant", action="store_true",
                       help="with --quantization nf4/fp4: bnb_4bit_use_double_quant")
        p.add_argument("--base-dtype", metavar="D",
                       help="dtype the frozen base is loaded in: fp32, bf16, fp16 or auto (the "
                       "config's); default: the config's with --quantization, else the "
                       "precision's parameter dtype")
        p.add_argument("--lora-dtype", metavar="D",
                       help="dtype of the LoRA adapters: fp32 (default, as peft upcasts them) or "
                       "bf16")
        inputs = p.add_argument_group(
            "inputs of models that are not causal LMs (default: the model's config)")
        inputs.add_argument("--target-len", type=_positive_int, metavar="T",
                            help="decoder tokens per sequence of an encoder-decoder (default: "
                            "--seq-len, at most the decoder's maximum length)")
        inputs.add_argument("--images", type=_non_negative_int, metavar="N",
                            help="images per sequence of a vision-language model, their tokens "
                            "counted in --seq-len (default 1; 0: text only)")
        inputs.add_argument("--image-size", type=_positive_int, metavar="PX",
                            help="pixels per image side (default: the vision config's)")
        inputs.add_argument("--audio-seconds", type=_positive_seconds, metavar="SEC",
                            help="seconds of audio per sample of a speech model (default: "
                            "what the model takes, else 30)")

    def add_gpu(p: argparse.ArgumentParser, help: str, required: bool = False) -> None:
        p.add_argument("--gpu", metavar="GPU", required=required,
                       help=help + " (a name from the catalogue: h100, a100-80gb, l4, ...)")

    def add_run(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--samples", type=_positive_int, metavar="N",
                       help="training samples (sequences) per epoch"
                       + (" (or --lengths)" if required else f" (default {DEFAULT_SAMPLES:,})"))
        p.add_argument("--epochs", type=_positive_int, required=required, metavar="E",
                       help="passes over the samples" + ("" if required else
                                                         f" (default {DEFAULT_EPOCHS})"))
        p.add_argument("--price-per-hour", type=_price, metavar="USD",
                       help="price of one GPU-hour (default: the catalogue's, where known)")

    def add_sharding(p: argparse.ArgumentParser) -> None:
        from layerscope.estimate.sharding import OFFLOADS, STRATEGIES

        p.add_argument("--distributed", choices=STRATEGIES, metavar="STRATEGY",
                       help=f"data parallelism: {', '.join(STRATEGIES)} (default: one GPU; "
                       "memory is then per GPU, the busiest)")
        p.add_argument("--num-gpus", type=_positive_int, metavar="K",
                       help="GPUs in the run, each taking --batch-size per step (default 1, or "
                       "one node with --distributed; more than 1 alone means ddp)")
        p.add_argument("--gpus-per-node", type=_positive_int, metavar="G",
                       help="GPUs per node (default 8): hsdp shards within a node; host memory "
                       "is per node")
        p.add_argument("--offload", choices=OFFLOADS, metavar="WHAT",
                       help="optimizer (ZeRO-Offload) or params (ZeRO-3 offload_param, FSDP "
                       "CPUOffload: parameters, gradients and optimizer on the CPU)")
        p.add_argument("--fsdp-version", type=int, choices=(1, 2),
                       help="FSDP2 fully_shard (2, default) or FSDP1 FullyShardedDataParallel "
                       "(1, the HF Trainer's and accelerate's default)")
        p.add_argument("--deepspeed", metavar="DS_CONFIG",
                       help="a DeepSpeed config (ds_config.json): ZeRO stage, offload, buckets, "
                       "precision, optimizer and batch as it states them")
        p.add_argument("--accelerate-config", metavar="YAML",
                       help="an accelerate config (`accelerate config`): distributed type, "
                       "processes, FSDP/DeepSpeed settings, mixed precision")
        add_fabric(p)

    def add_fabric(p: argparse.ArgumentParser) -> None:
        from layerscope.estimate.hardware import fabrics

        p.add_argument("--fabric", metavar="NET",
                       help=f"the network between nodes: {', '.join(fabrics())} (default: the "
                       "GPU's in the catalogue, e.g. infiniband-ndr for h100)")

    def add_output(p: argparse.ArgumentParser, gate: bool = True) -> None:
        p.add_argument("--json", action="store_true",
                       help="print one JSON document (bytes, seconds) instead of text")
        if gate:
            p.add_argument("--fail-if-not-fits", action="store_true",
                           help="exit with code 1 when the run does not fit on the GPU")

    p = add("presets", cmd_presets, "list the built-in model presets")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = add("summary", cmd_summary, "the model's structure and parameter counts")
    add_model(p)
    p.add_argument("--depth", type=_non_negative_int, default=3, metavar="N",
                   help="module levels to show (default 3)")

    p = add("status", cmd_status, "which blocks a plan freezes")
    add_model(p)
    add_plan(p)
    p.add_argument("--all", action="store_true", help="one line per block")

    p = add("estimate", cmd_estimate,
            "peak GPU memory of a training step, against full fine-tuning and a GPU")
    add_model(p)
    add_plan(p)
    add_step(p)
    add_sharding(p)
    add_gpu(p, "the GPU to check against; without it, no verdict")
    add_output(p)

    p = add("time", cmd_time, "time and cost of a training run")
    add_model(p)
    add_plan(p)
    add_step(p, batch="required")
    add_sharding(p)
    add_gpu(p, "the GPU (default h100-sxm)")
    add_run(p, required=True)
    p.add_argument("--lengths", metavar="FILE",
                   help="the examples' token counts, one per line (or JSON lines, see "
                   "--lengths-field): compares padded, length-grouped and packed batches; "
                   "--seq-len is then the truncation and packing length")
    p.add_argument("--lengths-field", metavar="NAME",
                   help="the JSON-lines field holding a count or the token ids "
                   "(default: length, num_tokens, n_tokens, tokens or input_ids)")
    add_output(p)

    p = add("fit", cmd_fit, "the largest batch size that fits on a GPU")
    add_model(p)
    add_plan(p)
    add_step(p, batch=None)
    add_sharding(p)
    add_gpu(p, "the GPU to fit", required=True)
    add_output(p)

    p = add("gpus", cmd_gpus, "for every GPU type, the fewest GPUs and the sharding that fit, "
            "with step time and cost; cheapest first")
    add_model(p)
    add_plan(p)
    add_step(p)
    p.add_argument("--samples", type=_positive_int, metavar="N",
                   help="training samples per epoch: adds wall time and cost (default: cost of "
                   "a million tokens)")
    p.add_argument("--epochs", type=_positive_int, metavar="E",
                   help="passes over the samples (default 1)")
    p.add_argument("--gpus-per-node", type=_positive_int, metavar="G",
                   help="GPUs per node (default 8)")
    add_fabric(p)
    add_output(p, gate=False)

    p = add("report", cmd_report, "a self-contained HTML report: structure, memory, time, cost")
    add_model(p)
    add_plan(p)
    add_step(p)
    add_sharding(p)
    add_gpu(p, "the GPU to check against and to time on (default for time: h100-sxm)")
    add_run(p, required=False)
    p.add_argument("--html", required=True, metavar="FILE", help="where to write the report")
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("LAYERSCOPE_DEBUG") == "1"
    if not debug:  # transformers' config chatter is not the user's business; read at import
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code: int = args.func(args)
        from layerscope.errors import LayerscopeWarning

        shown = [w for w in caught if debug or issubclass(w.category, LayerscopeWarning)]
        for message in dict.fromkeys(str(w.message) for w in shown):
            print(f"layerscope {args.command}: warning: {message}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"layerscope {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `layerscope presets | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (UsageError, LayerscopeError) as exc:
        if debug:
            traceback.print_exc()
        print(f"layerscope {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return USAGE
    except Exception as exc:  # noqa: BLE001 - any failure while working: one line, --debug traces
        if debug:
            traceback.print_exc()
        print(f"layerscope {args.command}: failed: {type(exc).__name__}: {_one_line(exc)}",
              file=sys.stderr)
        return FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
