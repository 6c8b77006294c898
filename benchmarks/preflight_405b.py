"""Pre-flight of a large preset in a fresh process, against the bare transformers minimum.

Each variant runs in its own fresh Python process (imports included), ``--repeat`` times,
interleaved; the table shows the median and best wall time, measured from outside the process
(the best is the steadier figure on a shared machine), the peak RSS, and the parameter total
each process found.

* ``baseline``: what any script must do: import torch and transformers, build the same config,
  ``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``, sum ``numel``.
* ``preflight``: ``import layerscope``, ``empty_model(preset)``, then every step in ``STEPS``.

To extend the pre-flight, add a ``(name, function)`` pair to ``STEPS``: the function takes the model
and returns a dict of
results for the table; an ``ImportError`` marks the step skipped. ``--steps`` picks a subset.

    PYTHONPATH=. python benchmarks/preflight_405b.py [--preset llama-3.1-405b] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def step_lp_lora(model: Any) -> dict[str, Any]:
    """Layer Utils' LP-LoRA-style freezing, applied to the skeleton."""
    from layerscope.layer_utils import setup_lp_lora_style

    return {"frozen": setup_lp_lora_style(model)}


def step_memory(model: Any) -> dict[str, Any]:
    """The memory estimate of the plan just applied (flags), batch 1 x 2048, bf16-mixed."""
    from layerscope.estimate.memory import estimate_memory

    est = estimate_memory(model, batch_size=1, seq_len=2048)
    return {"peak_gib": round(est.peak_bytes / 2**30, 1), "params": est.total_params}


STEPS: list[tuple[str, Callable[[Any], dict[str, Any]]]] = [
    ("lp_lora", step_lp_lora),
    ("memory", step_memory),
]


def child_baseline(preset: str, steps: list[str]) -> dict[str, Any]:
    """The bare minimum, with transformers alone, on the preset's published config."""
    t0 = time.perf_counter()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = json.loads((ROOT / "layerscope/catalog/presets" / f"{preset}.json").read_text())
    config = AutoConfig.for_model(**data["config"])
    t1 = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    t2 = time.perf_counter()
    return {"times": {"import+config": t1 - t0, "build+count": t2 - t1}, "params": params}


def child_preflight(preset: str, steps: list[str]) -> dict[str, Any]:
    """layerscope's pre-flight: import, build the skeleton, then each chosen step."""
    times: dict[str, float] = {}
    results: dict[str, Any] = {}
    t = time.perf_counter()
    import layerscope  # noqa: F401
    from layerscope.build import empty_model

    times["import layerscope"] = time.perf_counter() - t
    t = time.perf_counter()
    model = empty_model(preset)
    times["empty_model"] = time.perf_counter() - t
    for name, func in STEPS:
        if name not in steps:
            continue
        t = time.perf_counter()
        try:
            results.update(func(model))
        except ImportError as exc:
            results[name] = f"skipped ({exc.name} not available)"
        times[name] = time.perf_counter() - t
    return {"times": times, **results}


def run_child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One fresh process; wall time measured from outside, so interpreter start-up counts."""
    cmd = [sys.executable, __file__, "--child", variant, "--preset", args.preset]
    cmd += ["--steps", args.steps]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    t = time.perf_counter()
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}, check=True
    )
    wall = time.perf_counter() - t
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "wall": wall}


def table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """One row per variant: median wall time, ratio to the baseline, peak RSS, steps."""
    from tabulate import tabulate

    median = {v: statistics.median(r["wall"] for r in rs) for v, rs in runs.items()}
    best = {v: min(r["wall"] for r in rs) for v, rs in runs.items()}
    rows = []
    for variant, rs in runs.items():
        last = rs[-1]
        rows.append(
            [
                variant,
                f"{median[variant]:.2f}",
                " ".join(f"{r['wall']:.2f}" for r in rs),
                f"{median[variant] / median['baseline']:.2f}x",
                f"{best[variant]:.2f} ({best[variant] / best['baseline']:.2f}x)",
                f"{max(r['peak_rss_mib'] for r in rs):.0f}",
                f"{last['params']:,}" if isinstance(last.get("params"), int) else "-",
                ", ".join(f"{k} {v:.2f}" for k, v in last["times"].items()),
            ]
        )
    headers = ["variant", "wall s (median)", "each run", "vs baseline", "best s", "peak RSS MiB"]
    return tabulate(rows, headers=[*headers, "params", "in-process s (last run)"])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", default="llama-3.1-405b")
    parser.add_argument("--repeat", type=int, default=5, help="fresh processes per variant")
    parser.add_argument("--steps", default=",".join(name for name, _ in STEPS))
    parser.add_argument("--child", choices=["baseline", "preflight"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import resource

        child = child_baseline if args.child == "baseline" else child_preflight
        result = child(args.preset, args.steps.split(","))
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
        print(json.dumps(result))
        return

    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "preflight": []}
    for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits both alike
        for variant, results in runs.items():
            results.append(run_child(variant, args))
    print(f"preset {args.preset}; {args.repeat} fresh processes per variant, interleaved")
    print(table(runs))
    extra = {
        k: v
        for k, v in runs["preflight"][-1].items()
        if k not in ("times", "wall", "params", "peak_rss_mib")
    }
    print("preflight results (last run): " + json.dumps(extra))


if __name__ == "__main__":
    main()
