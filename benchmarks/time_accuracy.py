"""Step-time accuracy against measured training steps.

Run: ``PYTHONPATH=. python benchmarks/time_accuracy.py [--gpu h200] [--filter TEXT]
[--derive-band] [calibration_dir]``

Prints one row per calibration row (measured vs estimated step; forward+backward and optimizer
seconds; the regime and the band), then the error per regime and the summary: median |error|,
90th percentile |error|, the share within 20% and 30%, the max, and the share of rows whose
measured time lies inside the band; the same for the rule of thumb
6 * N * tokens / (peak * MFU) (2 * N * tokens for inference rows).

``--gpu h200``: estimates every row on the H200 instead. Where the calibration directory holds
``h200_training_steps.jsonl`` (same fields), those measurements are the reference; otherwise
the reference is the H100 measurement scaled by the catalogue's H200/H100 ratios: the share
of the row's H100 estimate spent in FLOP-bound kernels by the peak FLOP/s ratio, the share in
bandwidth-bound kernels by the DRAM bandwidth ratio, the rest (host, launch latency: the same
CPU) by 1. That scaled reference is not a measurement; it checks that the estimate moves
between the GPUs as the catalogue says it should (the timeline's overlap of host and GPU is
what can make the two differ).

``--derive-band``: prints, per regime, the measured/estimated ratios at the edges of the
central ``BAND_COVERAGE`` share, the numbers :data:`layerscope.estimate.band.BAND` holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

from layerscope.estimate.band import BAND_COVERAGE
from layerscope.estimate.band import REGIMES as TIME_REGIMES
from layerscope.estimate.hardware import get_gpu
from layerscope.estimate.time import StepTime, estimate_step_time
from layerscope.plan import Embeddings, ExceptLast, First, FreezePlan, Last, Names, Regex
from layerscope.setup import resolve_precision

CALIBRATION = next(
    (p / "shared" / "calibration" for p in Path(__file__).resolve().parents
     if (p / "shared" / "calibration").is_dir()),
    Path("../shared/calibration"),
)
"""The nearest ``shared/calibration`` above this file (the checkout's ``../shared``)."""
RULE_OF_THUMB_MFU = 0.4
"""The MFU a planner typically assumes in 6*N*tokens/(peak*MFU) (PaLM-style accounting)."""

REGIMES = {"fp32": "32-true", "bf16": "bf16-true", "amp_bf16": "bf16-mixed"}
MEASURED_GPU = "h100-sxm"


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


def rule_of_thumb(row: dict, gpu: str) -> float:
    peak = get_gpu(gpu).peak(resolve_precision(REGIMES[row["regime"]]).matmul)
    flops_per = 2 if row["inference"] else 6
    return flops_per * row["total_params"] * row["tokens_per_step"] / (peak * RULE_OF_THUMB_MFU)


def err(est: float, real: float) -> float:
    return (est - real) / real


def catalogue_ratio(step: StepTime, gpu: str, matmul: str) -> float:
    """Time on ``gpu`` over time on the H100 per the catalogue, for a step whose H100 estimate
    spends ``step``'s shares in FLOP-bound kernels (scaled by the peak FLOP/s ratio), in
    bandwidth-bound kernels (by the bandwidth ratio) and elsewhere (host, latency: 1.0)."""
    new, old = get_gpu(gpu), get_gpu(MEASURED_GPU)
    phases = (step.forward, step.backward, step.recompute, step.optimizer)
    compute = sum(p.compute_seconds for p in phases)
    memory = sum(p.memory_seconds for p in phases)
    other = max(0.0, step.seconds - compute - memory)
    scaled = (compute * old.peak(matmul) / new.peak(matmul)
              + memory * old.memory_bandwidth / new.memory_bandwidth + other)
    return scaled / (compute + memory + other)


def estimate(row: dict, models: dict, configs: dict, gpu: str) -> StepTime:
    dtype = torch.bfloat16 if row["regime"] == "bf16" else torch.float32
    key = (row["model"], str(dtype))
    if key not in models:
        models[key] = build(configs[row["model"]], dtype)
    model = models[key]
    plan = plan_for(row["plan"], model) if not row["lora"] else None
    optimizer = {"adamw": "adamw-fused" if row["fused_adamw"] else "adamw",
                 "sgd_momentum": "sgd-momentum"}[row["optimizer"]]
    t = estimate_step_time(
        model, plan, batch_size=row["batch"], seq_len=row["seq"],
        precision=REGIMES[row["regime"]], optimizer=optimizer,
        gradient_checkpointing=row["grad_ckpt"], lora=row["lora"],
        inference=row["inference"], gpu=gpu,
    )
    if not row["lora"] and not row["inference"] and t.trainable_params != row["trainable_params"]:
        print(f"warning: plan {row['plan']} gives {t.trainable_params} trainable, "
              f"measured run had {row['trainable_params']}")
    return t


def setting(row: dict) -> str:
    return row["regime"] + (" ckpt" if row["grad_ckpt"] else "") + (
        " fused" if row["fused_adamw"] else "") + (
        " sgd" if row["optimizer"] != "adamw" else "") + (
        f" lora{row['lora']}" if row["lora"] else "") + (" infer" if row["inference"] else "")


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between order statistics."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summary(errors: list[float], inside: list[bool] | None = None) -> list[str]:
    a = [abs(x) for x in errors]
    out = [str(len(a)), f"{statistics.median(a):.1%}", f"{percentile(a, 0.9):.1%}",
           f"{sum(x <= 0.20 for x in a) / len(a):.0%}", f"{sum(x <= 0.30 for x in a) / len(a):.0%}",
           f"{max(a):.0%}"]
    out.append("-" if inside is None else f"{sum(inside) / len(inside):.0%}")
    return out


def derive_band(ratios: dict[str, list[float]]) -> None:
    """Per regime, the measured/estimated ratios bounding the central BAND_COVERAGE share."""
    tail = (1 - BAND_COVERAGE) / 2
    rows = []
    for regime in TIME_REGIMES:
        r = ratios.get(regime, [])
        if not r:
            rows.append([regime, 0, "-", "-"])
            continue
        rows.append([regime, len(r), f"{percentile(r, tail):.3f}", f"{percentile(r, 1 - tail):.3f}"])
    print()
    print(tabulate(rows, headers=["regime", "rows", f"low (q{tail:.2f})", f"high (q{1 - tail:.2f})"]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", type=Path, default=CALIBRATION)
    ap.add_argument("--gpu", default=MEASURED_GPU, help="GPU to estimate on (default h100-sxm)")
    ap.add_argument("--filter", default="", help="only rows whose model or setting contains this")
    ap.add_argument("--derive-band", action="store_true",
                    help="print the per-regime band ratios from these rows")
    args = ap.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    gpu = get_gpu(args.gpu).name
    root: Path = args.root
    measured_here = root / "h100_training_steps.jsonl"
    own = root / f"{gpu.split('-')[0]}_training_steps.jsonl"
    scaled = gpu != MEASURED_GPU and not own.exists()
    rows = [json.loads(line) for line in ((measured_here if scaled or gpu == MEASURED_GPU
                                           else own).open())]
    rows = [r for r in rows if args.filter in r["model"] + " " + setting(r) + " " + r["plan"]]
    configs = json.loads((root / "model_configs.json").read_text())
    models: dict[tuple[str, str], torch.nn.Module] = {}
    table: list[list[str]] = []
    ours: list[float] = []
    thumb: list[float] = []
    inside: list[bool] = []
    by_regime: dict[str, list[tuple[float, bool]]] = {}
    ratios: dict[str, list[float]] = {}
    for row in rows:
        t = estimate(row, models, configs, gpu)
        real = row["step_seconds_median"]
        fb = row.get("fwd_bwd_seconds_median")
        op = row.get("optimizer_seconds_median")
        if scaled:  # the H100 measurement moved to the other GPU by the catalogue's ratios
            h100 = estimate(row, models, configs, MEASURED_GPU)
            k = catalogue_ratio(h100, gpu, resolve_precision(REGIMES[row["regime"]]).matmul)
            real, fb, op = real * k, fb * k if fb else fb, op * k if op else op
        e, r = err(t.seconds, real), err(rule_of_thumb(row, gpu), real)
        ok = t.low_seconds <= real <= t.high_seconds
        ours.append(e)
        thumb.append(r)
        inside.append(ok)
        by_regime.setdefault(t.regime, []).append((e, ok))
        ratios.setdefault(t.regime, []).append(real / t.seconds)
        table.append([
            row["model"], setting(row), row["plan"], f"{row['batch']}x{row['seq']}",
            f"{real * 1e3:.1f}", f"{t.seconds * 1e3:.1f}", f"{e:+.0%}",
            f"{t.low_seconds * 1e3:.0f}-{t.high_seconds * 1e3:.0f}", "yes" if ok else "NO",
            t.regime.split("-")[0],
            f"{fb * 1e3:.1f}" if fb else "-", f"{t.fwd_bwd_seconds * 1e3:.1f}",
            f"{err(t.fwd_bwd_seconds, fb):+.0%}" if fb else "-",
            f"{op * 1e3:.1f}" if op else "-", f"{t.optimizer.seconds * 1e3:.1f}",
            f"{err(t.optimizer.seconds, op):+.0%}" if op else "-", f"{r:+.0%}",
        ])
    print(tabulate(table, headers=[
        "model", "setting", "plan", "BxS", "step ms", "est", "err", "band", "in", "regime",
        "fwd+bwd", "est", "err", "optim", "est", "err", "6N rule",
    ], disable_numparse=True))
    reference = ("measured" if not scaled else
                 f"H100 measurement x catalogue {gpu}/h100 ratio (not a measurement)")
    print(f"\nGPU: {gpu}; reference: {reference}")
    heads = ["rows", "median |err|", "p90 |err|", "within 20%", "within 30%", "max |err|",
             "in band"]
    print()
    print(tabulate(
        [[regime, *summary([e for e, _ in by_regime[regime]], [ok for _, ok in by_regime[regime]])]
         for regime in TIME_REGIMES if regime in by_regime],
        headers=["regime", *heads], disable_numparse=True))
    print()
    print(tabulate(
        [["layerscope", *summary(ours, inside)],
         [f"6*N*tokens/(peak*{RULE_OF_THUMB_MFU})", *summary(thumb)]],
        headers=["step time", *heads], disable_numparse=True))
    widths = [(float(c.split("-")[1]) - float(c.split("-")[0])) / float(t)
              for c, t in ((row[7], row[5]) for row in table) if float(t) > 0]
    print(f"\nband width: {statistics.mean(widths):.0%} of the estimate on average "
          f"(high - low, over the {len(widths)} rows)")
    if args.derive_band:
        derive_band(ratios)


if __name__ == "__main__":
    main()
