"""Measure real training steps on a CUDA GPU and print them next to layerscope's estimates.

The protocol is the calibration set's (``../shared/calibration/README.md``): the model built
from its config directly on the GPU with random weights and SDPA attention, the plan applied,
then a Trainer-style loop (only the loss outlives the forward), ``torch.optim.AdamW`` over the
trainable parameters, ``zero_grad(set_to_none=True)``. Memory is ``max_memory_allocated`` minus
the baseline before the model was built; the steady peak is the highest of steps 2..6; time is
the median of steps 3..6 with ``torch.cuda.synchronize()`` around each part.

Not run in CI (it needs a CUDA GPU). Example, on a lent GPU:

    python benchmarks/measure_gpu.py llama-3.2-1b --plan lp-lora --batch-size 4 --seq-len 512 \
        --precision bf16-true --jsonl out.jsonl

Rows appended with ``--jsonl`` have the calibration file's fields, so they can be added to the
accuracy checks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

import layerscope as ls
from layerscope.catalog.resolve import resolve_config
from layerscope.setup import Lora, resolve_optimizer, resolve_precision

GIB = 2**30


def build_on_gpu(source: str, dtype: torch.dtype) -> torch.nn.Module:
    """The model of ``source`` with random weights, built directly on the GPU."""
    from transformers import AutoModelForCausalLM

    config = resolve_config(source).config
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def make_optimizer(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(params, lr=1e-5)
    if name == "adamw-fused":
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    if name in ("sgd", "sgd-momentum"):
        return torch.optim.SGD(params, lr=1e-5, momentum=0.9 if name == "sgd-momentum" else 0.0)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-5)
    import bitsandbytes as bnb  # adamw-8bit

    return bnb.optim.AdamW8bit(params, lr=1e-5)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    prec = resolve_precision(args.precision)
    optimizer = resolve_optimizer(args.optimizer)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = build_on_gpu(args.model, prec.param_dtype)
    if args.lora:
        from peft import get_peft_model

        model = get_peft_model(model, Lora.of(args.lora, model).peft_config())
    elif args.plan:
        ls.apply_plan(model, ls.FreezePlan.parse(args.plan))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    weights = torch.cuda.memory_allocated() - base
    x = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device="cuda")
    peaks, times = [], []
    if args.inference:
        model.eval()
        for _ in range(6):
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                del model(input_ids=x).logits
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            peaks.append(torch.cuda.max_memory_allocated() - base)
    else:
        model.train()
        opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad])
        for _ in range(7):
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=prec.autocast_dtype or torch.float32,
                                enabled=prec.autocast):
                out = model(input_ids=x, labels=x)
            loss = out.loss
            del out
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            peaks.append(torch.cuda.max_memory_allocated() - base)
    return {
        "model": args.model, "plan": args.plan or "none", "precision": prec.name,
        "optimizer": optimizer, "batch": args.batch_size, "seq": args.seq_len,
        "grad_ckpt": args.gradient_checkpointing, "lora": args.lora, "inference": args.inference,
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "weights_bytes": weights, "peak_steady_bytes": max(peaks[1:]),
        "step_seconds_median": statistics.median(times[2:]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--plan", default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--lora", type=int, default=None, help="LoRA rank (base frozen)")
    parser.add_argument("--inference", action="store_true")
    parser.add_argument("--jsonl", default=None, help="append the measured row to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("measure_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    row = measure(args)
    skeleton = ls.empty_model(args.model)
    plan = ls.FreezePlan.parse(args.plan) if args.plan and not args.lora else None
    settings = dict(batch_size=args.batch_size, seq_len=args.seq_len, precision=args.precision,
                    optimizer=args.optimizer, gradient_checkpointing=args.gradient_checkpointing,
                    lora=args.lora, inference=args.inference)
    est = ls.estimate_memory(skeleton, plan, **settings)
    try:
        gpu = ls.get_gpu(row["gpu"]).name  # e.g. "NVIDIA H100 80GB HBM3" is an alias
    except ls.EstimateError:
        gpu = "h100-sxm"  # a board the catalogue lacks: the time is an H100 SXM's, said below
    step = ls.estimate_step_time(skeleton, plan, gpu=gpu, **settings)
    m, e = row["peak_steady_bytes"], est.peak_bytes
    print(f"{row['gpu']}: {args.model} plan={row['plan']} {row['precision']} {row['optimizer']} "
          f"b{args.batch_size}x{args.seq_len}")
    print(f"peak memory: measured {m / GIB:.2f} GiB, estimated {e / GIB:.2f} GiB "
          f"({100 * (e - m) / m:+.1f}%)")
    t, s = row["step_seconds_median"], step.seconds
    print(f"step time:   measured {t * 1000:.1f} ms, estimated {s * 1000:.1f} ms "
          f"({100 * (s - t) / t:+.1f}%; estimated for {gpu})")
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
