"""Accuracy of ``estimate_memory`` against the H100 calibration set, and of two baselines.

Run: ``PYTHONPATH=. python benchmarks/accuracy.py [--filter TEXT]``

Prints one row per measured step (predicted ``peak_bytes`` vs measured ``peak_steady_bytes``,
and predicted ``reserved_bytes`` vs measured ``reserved_peak_bytes``, what
``torch.cuda.max_memory_reserved()`` and ``nvidia-smi`` show), then the summary (median and
max |error|, rows within 10% and within 3%) for layerscope's peak, for an
``accelerate estimate-memory``-style estimate, for the naive "weights + gradients + two Adam
states" rule, for layerscope's reserved memory, and for the flat rule it replaced
(``peak x 1.10``) against the measured reserved memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from layerscope import FreezePlan, estimate_memory, scan
from layerscope.units import GIB

CALIBRATION = Path(__file__).resolve().parents[2] / "shared" / "calibration"
if not CALIBRATION.exists():
    CALIBRATION = Path("/work/shared/calibration")
REGIMES = {"fp32": "32-true", "bf16": "bf16-true", "amp_bf16": "bf16-mixed"}


def skeleton(config: dict) -> torch.nn.Module:
    """The calibration model on the meta device, ties kept (built as the measurements were)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def calibration_plan(model: torch.nn.Module, plan: str) -> FreezePlan:
    """The calibration README's plan as a :class:`FreezePlan` (L = number of blocks).

    The head tied to the embedding (gpt2, llama3.2-1b) stayed trainable in every plan except
    ``first_4_trainable``, whose measured ``trainable_params`` is the four blocks alone.
    """
    s = scan(model)
    n = s.num_layers
    plans = {
        "full": lambda: FreezePlan(),
        "lp_lora": lambda: FreezePlan.first(n // 2) | FreezePlan.embeddings(keep_tied_head=True),
        "last_half_frozen": lambda: FreezePlan.last(n // 2),
        "except_last_4": lambda: FreezePlan.except_last(4),
        "embeddings_frozen": lambda: FreezePlan.embeddings(keep_tied_head=True),
        "attention_frozen": lambda: FreezePlan.regex(".*(attn|attention).*"),
        "first_4_trainable": lambda: FreezePlan.last(n - 4) | FreezePlan.embeddings()
        | FreezePlan.names(s.head_names),
    }
    if plan not in plans:
        raise ValueError(f"unknown calibration plan {plan!r}; known: {sorted(plans)}")
    return plans[plan]()


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                       "down_proj"])


def baselines(model: torch.nn.Module, trainable: frozenset[str], row: dict) -> tuple[int, int]:
    """(accelerate-style, naive) predictions in bytes.

    accelerate ``estimate-memory`` reports, for training with Adam, the *largest* of its
    components (weights, gradients, 2 Adam states) in the chosen dtype and applies no activation
    model; the naive rule sums weights + gradients + 2 states of the trainable parameters.
    """
    dtype_bytes = 4 if row["regime"] in ("fp32", "amp_bf16") else 2
    seen, total, train = set(), 0, 0
    for _name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        names = [n for n, q in model.named_parameters(remove_duplicate=False) if q is p]
        if any(n in trainable for n in names):
            train += p.numel()
    if row.get("lora"):
        train = row["trainable_params"]
        total = row["total_params"]
    if row["inference"]:
        return total * dtype_bytes, total * dtype_bytes
    states = 2 if row["optimizer"] == "adamw" else 1
    accelerate = max(total * dtype_bytes, train * dtype_bytes, states * train * dtype_bytes)
    naive = total * dtype_bytes + train * dtype_bytes + states * train * dtype_bytes
    return accelerate, naive


def summary(errors: list[float]) -> list:
    a = [abs(e) for e in errors]
    return [f"{statistics.median(a):.1f}%", f"{max(a):.1f}%", f"{sum(x <= 10 for x in a)}/{len(a)}",
            f"{sum(x <= 3 for x in a)}/{len(a)}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--filter", default="", help="only rows whose label contains this text")
    args = parser.parse_args()
    configs = json.loads((CALIBRATION / "model_configs.json").read_text())
    lines = (CALIBRATION / "h100_training_steps.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line]
    models: dict[str, torch.nn.Module] = {}
    table, errs, errs_acc, errs_naive, errs_reserved, errs_flat = [], [], [], [], [], []
    for row in rows:
        optimizer = {"adamw": "adamw", "sgd_momentum": "sgd-momentum"}[row["optimizer"]]
        if optimizer == "adamw" and row["fused_adamw"]:
            optimizer = "adamw-fused"
        label = (f"{row['model']} {row['regime']} {row['plan']} b{row['batch']}x{row['seq']}"
                 + (" ckpt" if row["grad_ckpt"] else "") + (f" {optimizer}" if optimizer != "adamw" else "")
                 + (f" lora{row['lora']}" if row["lora"] else "") + (" infer" if row["inference"] else ""))
        if args.filter and args.filter not in label:
            continue
        model = models.setdefault(row["model"], skeleton(configs[row["model"]]))
        plan = calibration_plan(model, row["plan"])
        trainable = plan.resolve(model).trainable
        start = time.perf_counter()
        est = estimate_memory(
            model, None if row["lora"] else plan, batch_size=row["batch"], seq_len=row["seq"],
            precision=REGIMES[row["regime"]], optimizer=optimizer, gradient_checkpointing=row["grad_ckpt"],
            lora=lora_config(row["lora"]) if row["lora"] else None, inference=row["inference"],
        )
        seconds = time.perf_counter() - start
        measured = row["peak_steady_bytes"]
        err = 100 * (est.peak_bytes - measured) / measured
        acc, naive = baselines(model, trainable, row)
        errs.append(err)
        errs_acc.append(100 * (acc - measured) / measured)
        errs_naive.append(100 * (naive - measured) / measured)
        same = est.trainable_params == row["trainable_params"] or row["inference"]
        trainable_note = "" if same else " (!params)"
        fwd = ""
        if "peak_forward_bytes" in row:  # first forward: weights only, no optimizer state yet
            first = est.forward_peak_bytes - est.optimizer_state_bytes
            fwd = f"{100 * (first - row['peak_forward_bytes']) / row['peak_forward_bytes']:+.1f}%"
        reserved = ["", "", ""]
        if "reserved_peak_bytes" in row:  # forward-only rows measured no reserved memory
            got = row["reserved_peak_bytes"]
            errs_reserved.append(100 * (est.reserved_bytes - got) / got)
            errs_flat.append(100 * (est.peak_bytes * 1.10 - got) / got)
            reserved = [f"{got / GIB:.2f}", f"{est.reserved_bytes / GIB:.2f}", f"{errs_reserved[-1]:+.1f}%"]
        table.append([label, f"{measured / GIB:.2f}", f"{est.peak_bytes / GIB:.2f}", f"{err:+.1f}%",
                      est.peak_phase + trainable_note, fwd, *reserved, f"{seconds:.2f}"])
    print(tabulate(table, headers=["row", "measured GiB", "estimated GiB", "error", "peak in", "1st fwd err",
                                   "reserved GiB", "est. reserved", "reserved err", "est. s"]))
    print()
    print(tabulate(
        [["layerscope peak", *summary(errs)],
         ["accelerate-style (max of components)", *summary(errs_acc)],
         ["naive weights+grads+states", *summary(errs_naive)],
         ["layerscope reserved (allocator simulated)", *summary(errs_reserved)],
         ["reserved as peak x 1.10 (the old rule)", *summary(errs_flat)]],
        headers=["estimator", "median |error|", "max |error|", "within 10%", "within 3%"],
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
