"""Time of scan() and of resolving freeze plans on a 70B-class meta skeleton.

Run: python benchmarks/scan_resolve.py
Prints one table: the build time (for scale), then scan and each plan's resolve (best of 5).
"""

from __future__ import annotations

import time

from tabulate import tabulate

from layerscope import FreezePlan, empty_model, scan


def best_of(func, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    empty_model("gpt2")  # pay the transformers import before timing
    start = time.perf_counter()
    model = empty_model("llama-3.1-70b")
    build = time.perf_counter() - start
    s = scan(model)
    rows = [["build skeleton (once)", f"{build * 1000:.1f}"],
            ["scan", f"{best_of(lambda: scan(model)) * 1000:.1f}"]]
    for text in ("lp-lora", "first:40", "except-last:4", "embeddings", r"regex:self_attn\.(q|k)_proj",
                 "first:16+embeddings"):
        plan = FreezePlan.parse(text)
        seconds = best_of(lambda plan=plan: plan.resolve(s))
        rows.append([f"resolve {text} (on a scan)", f"{seconds * 1000:.1f}"])
    seconds = best_of(lambda: FreezePlan.lp_lora().resolve(model))
    rows.append(["scan + resolve lp-lora", f"{seconds * 1000:.1f}"])
    print(f"Llama-3.1-70B skeleton: {s.total_params:,} parameters, {len(s.params)} tensors, "
          f"{s.num_layers} layers")
    print(tabulate(rows, headers=["step", "ms"], tablefmt="github"))


if __name__ == "__main__":
    main()
