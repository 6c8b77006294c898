"""Accuracy of ``estimate_memory`` against the H100 calibration set, and of two baselines.

Run: ``PYTHONPATH=. python benchmarks/accuracy.py [--filter TEXT]``

Prints one row per measured step (predicted ``peak_bytes`` vs measured ``peak_steady_bytes``),
then the summary (median and max |error|, rows within 10%) for layerscope, for an
``accelerate estimate-memory``-style estimate, and for the naive "weights + gradients + two
Adam states" rule.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from layerscope.estimate.memory import estimate_memory_for
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


def plan_trainable(model: torch.nn.Module, plan: str) -> frozenset[str]:
    """Trainable parameter names of a calibration plan (README's definitions).

    A tensor tied to an embedding (the head of gpt2 and llama3.2-1b) stayed trainable, except in
    ``first_4_trainable`` (its measured ``trainable_params`` is the four blocks alone).
    """
    from layerscope.estimate.trace import find_blocks

    blocks_name, blocks = find_blocks(model)
    n = len(blocks)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings()
    tied = {id(head.weight)} & embeddings if head is not None else set()
    names = list(model.named_parameters(remove_duplicate=False))

    def block_of(name: str) -> int | None:
        m = re.match(rf"{re.escape(blocks_name)}\.(\d+)\.", name)
        return int(m.group(1)) if m else None

    def frozen(name: str, p: torch.nn.Parameter) -> bool:
        b = block_of(name)
        if plan == "full":
            return False
        if plan == "lp_lora":
            return id(p) in embeddings or (b is not None and b < n // 2)
        if plan == "last_half_frozen":
            return b is not None and b >= n - n // 2
        if plan == "except_last_4":
            return (b is not None and b < n - 4) or (b is None and id(p) in embeddings)
        if plan == "embeddings_frozen":
            return id(p) in embeddings
        if plan == "attention_frozen":
            return re.fullmatch(r".*(attn|attention).*", name) is not None
        if plan == "first_4_trainable":
            return b is None or b >= 4
        raise ValueError(f"unknown plan {plan!r}")

    trainable = {name for name, p in names if not frozen(name, p)}
    if plan != "first_4_trainable":  # that plan froze embeddings and head, tied or not
        trainable |= {name for name, p in names if id(p) in tied}
    return frozenset(trainable)


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def baselines(model: torch.nn.Module, trainable: frozenset[str], row: dict) -> tuple[int, int]:
    """(accelerate-style, naive) predictions in bytes.

    accelerate ``estimate-memory`` reports, for training with Adam, the *largest* of its
    components (weights, gradients, 2 Adam states) in the chosen dtype and applies no activation
    model; the naive rule sums weights + gradients + 2 states of the trainable parameters.
    """
    dtype_bytes = 4 if row["regime"] in ("fp32", "amp_bf16") else 2
    seen, total, train = set(), 0, 0
    for name, p in model.named_parameters(remove_duplicate=False):
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
    return [f"{statistics.median(a):.1f}%", f"{max(a):.1f}%", f"{sum(x <= 10 for x in a)}/{len(a)}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--filter", default="", help="only rows whose label contains this text")
    args = parser.parse_args()
    configs = json.loads((CALIBRATION / "model_configs.json").read_text())
    rows = [json.loads(line) for line in (CALIBRATION / "h100_training_steps.jsonl").read_text().splitlines() if line]
    models: dict[str, torch.nn.Module] = {}
    table, errs, errs_acc, errs_naive = [], [], [], []
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
        trainable = plan_trainable(model, row["plan"])
        start = time.perf_counter()
        est = estimate_memory_for(
            model, frozenset() if row["lora"] else trainable, batch_size=row["batch"], seq_len=row["seq"],
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
        trainable_note = "" if est.trainable_params == row["trainable_params"] or row["inference"] else " (!params)"
        fwd = ""
        if "peak_forward_bytes" in row:  # first forward: weights only, no optimizer state yet
            first = est.forward_peak_bytes - est.optimizer_state_bytes
            fwd = f"{100 * (first - row['peak_forward_bytes']) / row['peak_forward_bytes']:+.1f}%"
        table.append([label, f"{measured / GIB:.2f}", f"{est.peak_bytes / GIB:.2f}", f"{err:+.1f}%",
                      est.peak_phase + trainable_note, fwd, f"{seconds:.2f}"])
    print(tabulate(table, headers=["row", "measured GiB", "estimated GiB", "error", "peak in", "1st fwd err", "est. s"]))
    print()
    print(tabulate(
        [["layerscope", *summary(errs)], ["accelerate-style (max of components)", *summary(errs_acc)],
         ["naive weights+grads+states", *summary(errs_naive)]],
        headers=["estimator", "median |error|", "max |error|", "within 10%"],
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
