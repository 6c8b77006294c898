"""Write ``examples/lengths.txt``: 20,000 token counts of a made-up chat dataset, one per line.

A seeded log-normal draw (median about 366 tokens, mean about 548, 541 examples longer than
2,048 tokens), the shape instruction-tuning sets usually have; the README's ``layerscope time
--lengths`` transcript reads it. Real data: write your tokenizer's counts the same way.

    python examples/make_lengths.py
"""

import random
from pathlib import Path


def main() -> None:
    rng = random.Random(0)
    lengths = [max(16, int(rng.lognormvariate(5.9, 0.9))) for _ in range(20_000)]
    out = Path(__file__).with_name("lengths.txt")
    out.write_text("".join(f"{n}\n" for n in lengths))
    print(f"wrote {len(lengths):,} lengths to {out}")


if __name__ == "__main__":
    main()
