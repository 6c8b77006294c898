"""Step-time accuracy against measured H100 training steps.

Run: python benchmarks/time_accuracy.py [path/to/calibration]
Prints one row per calibration row (measured vs estimated step, forward+backward and optimizer
seconds), then a summary: median |error| and the share of rows within 30%, for layerscope and
for the rule of thumb 6 * N * tokens / (peak * MFU) (2 * N * tokens for inference rows).
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
from pathlib import Path

import torch
from tabulate import tabulate

from layerscope.estimate.hardware import get_gpu
from layerscope.setup import resolve_precision
from layerscope.estimate.time import estimate_step_time
from layerscope.plan import Embeddings, FreezePlan, Last, Names, Regex, ExceptLast, First

CALIBRATION = next(
    (p / "shared" / "calibration" for p in Path(__file__).resolve().parents
     if (p / "shared" / "calibration").is_dir()),
    Path("../shared/calibration"),
)
"""The nearest ``shared/calibration`` above this file (the checkout's ``../shared``)."""
RULE_OF_THUMB_MFU = 0.4
"""The MFU a planner typically assumes in 6*N*tokens/(peak*MFU) (PaLM-style accounting)."""

REGIMES = {"fp32": "32-true", "bf16": "bf16-true", "amp_bf16": "bf16-mixed"}


def build(config: dict, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    cfg = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")


def plan_for(name: str, model: torch.nn.Module) -> FreezePlan | None:
    """The calibration README's plan definitions (the tied head stays trainable)."""
    from layerscope import scan

    s = scan(model)
    L = s.num_layers
    if name == "full":
        return None
    if name == "lp_lora":
        return FreezePlan((First(L // 2), Embeddings(keep_tied_head=True)))
    if name == "last_half_frozen":
        return FreezePlan((Last(L // 2),))
    if name == "except_last_4":
        return FreezePlan((ExceptLast(4),))
    if name == "embeddings_frozen":
        return FreezePlan((Embeddings(keep_tied_head=True),))
    if name == "attention_frozen":
        return FreezePlan((Regex((r".*(attn|attention).*",)),))
    if name == "first_4_trainable":
        keep = {n for i in range(4) for n in s.block_names(i)}
        return FreezePlan((Names(tuple(p.name for p in s.params if p.name not in keep)),))
    raise ValueError(f"unknown plan {name!r}")


def rule_of_thumb(row: dict) -> float:
    gpu = get_gpu("h100-sxm")
    peak = gpu.peak(resolve_precision(REGIMES[row["regime"]]).matmul)
    flops_per = 2 if row["inference"] else 6
    return flops_per * row["total_params"] * row["tokens_per_step"] / (peak * RULE_OF_THUMB_MFU)


def err(est: float, real: float) -> float:
    return (est - real) / real


def main(root: Path = CALIBRATION) -> None:
    import warnings

    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = [json.loads(line) for line in (root / "h100_training_steps.jsonl").open()]
    configs = json.loads((root / "model_configs.json").read_text())
    models: dict[tuple[str, str], torch.nn.Module] = {}
    table, ours, thumb = [], [], []
    for row in rows:
        regime = REGIMES[row["regime"]]
        dtype = torch.bfloat16 if row["regime"] == "bf16" else torch.float32
        key = (row["model"], str(dtype))
        if key not in models:
            models[key] = build(configs[row["model"]], dtype)
        model = models[key]
        plan = plan_for(row["plan"], model) if not row["lora"] else None
        optimizer = {"adamw": "adamw-fused" if row["fused_adamw"] else "adamw",
                     "sgd_momentum": "sgd-momentum"}[row["optimizer"]]
        t = estimate_step_time(
            model, plan, batch_size=row["batch"], seq_len=row["seq"], precision=regime,
            optimizer=optimizer, gradient_checkpointing=row["grad_ckpt"], lora=row["lora"],
            inference=row["inference"], gpu="h100-sxm",
        )
        if not row["lora"] and not row["inference"] and t.trainable_params != row["trainable_params"]:
            print(f"warning: plan {row['plan']} gives {t.trainable_params} trainable, "
                  f"measured run had {row['trainable_params']}")
        e, r = err(t.seconds, row["step_seconds_median"]), err(rule_of_thumb(row),
                                                                row["step_seconds_median"])
        ours.append(e)
        thumb.append(r)
        fb = row.get("fwd_bwd_seconds_median")
        op = row.get("optimizer_seconds_median")
        setting = row["regime"] + (" ckpt" if row["grad_ckpt"] else "") + (
            " fused" if row["fused_adamw"] else "") + (
            " sgd" if row["optimizer"] != "adamw" else "") + (
            f" lora{row['lora']}" if row["lora"] else "") + (" infer" if row["inference"] else "")
        table.append([
            row["model"], setting, row["plan"], f"{row['batch']}x{row['seq']}",
            f"{row['step_seconds_median'] * 1e3:.1f}", f"{t.seconds * 1e3:.1f}", f"{e:+.0%}",
            f"{fb * 1e3:.1f}" if fb else "-", f"{t.fwd_bwd_seconds * 1e3:.1f}",
            f"{err(t.fwd_bwd_seconds, fb):+.0%}" if fb else "-",
            f"{op * 1e3:.1f}" if op else "-", f"{t.optimizer.seconds * 1e3:.1f}",
            f"{err(t.optimizer.seconds, op):+.0%}" if op else "-", f"{r:+.0%}",
        ])
    print(tabulate(table, headers=[
        "model", "setting", "plan", "BxS", "step ms", "est", "err", "fwd+bwd", "est", "err",
        "optim", "est", "err", "6N rule",
    ], disable_numparse=True))

    def summary(errors: list[float]) -> tuple[str, str, str]:
        a = [abs(x) for x in errors]
        return (f"{statistics.median(a):.1%}", f"{sum(x <= 0.30 for x in a) / len(a):.0%}",
                f"{max(a):.0%}")

    print()
    print(tabulate(
        [["layerscope", *summary(ours)],
         [f"6*N*tokens/(peak*{RULE_OF_THUMB_MFU})", *summary(thumb)]],
        headers=[f"step time, {len(rows)} rows", "median |err|", "within 30%", "max |err|"],
    ))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else CALIBRATION)
