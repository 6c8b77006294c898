"""How long the README's pre-flight command takes, against building the skeleton alone.

Each command runs in a fresh process, ``--repeat`` times, interleaved (A B A B ...), timed from
outside; the table shows each command's median and best wall time and the ratio of medians.

* ``skeleton``: ``python -c "import layerscope; layerscope.empty_model(MODEL)"`` (the imports
  and the meta-device build every pre-flight needs).
* ``estimate, fits``: ``layerscope estimate MODEL ... --gpu h200`` (verdict, largest batch).
* ``estimate, does not fit``: the same with ``--gpu h100`` (verdict and every alternative).

    python benchmarks/cli_speed.py [--model llama-3.1-8b] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from tabulate import tabulate


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    step = ["--plan", "lp-lora", "--batch-size", "4", "--seq-len", "2048"]
    cli = [sys.executable, "-m", "layerscope", "estimate", args.model, *step]
    commands = {
        "skeleton": [sys.executable, "-c",
                     f"import layerscope; layerscope.empty_model({args.model!r})"],
        "estimate, fits (--gpu h200)": [*cli, "--gpu", "h200"],
        "estimate, does not fit (--gpu h100)": [*cli, "--gpu", "h100"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _name, argv in commands.items():  # warm-up: file caches, bytecode
        wall(argv)
    for _ in range(args.repeat):
        for name, argv in commands.items():
            times[name].append(wall(argv))
    base = statistics.median(times["skeleton"])
    rows = [[name, f"{statistics.median(t):.2f}", f"{min(t):.2f}",
             f"{statistics.median(t) / base:.2f}x"] for name, t in times.items()]
    print(tabulate(rows, headers=["command", "median s", "best s", "vs skeleton"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
