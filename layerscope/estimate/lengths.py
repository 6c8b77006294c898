"""Real data lengths: how a dataset whose examples differ in length becomes training steps.

Three ways to batch ``N`` examples, ``G = batch_size x num_gpus`` per step (each GPU takes
``batch_size`` of them; data-parallel GPUs wait for the slowest, so a step is as long as the
longest example among the ``G``):

* **padded**: random batches (a shuffling sampler, transformers' ``Trainer`` default), each
  padded to its longest example (``DataCollatorWithPadding``), examples truncated at
  ``seq_len``. The longest of ``G`` examples drawn without replacement from ``N`` is at most
  the ``k``-th shortest with probability ``C(k, G) / C(N, G)``; times and padding are
  expectations over that distribution.
* **grouped**: examples of similar length batched together (``group_by_length=True``: a
  length-grouped sampler), here fully sorted: what such samplers approach from above.
* **packed**: every example's tokens concatenated and cut into rows of ``seq_len``
  (TRL/axolotl/LLaMA-Factory packing), so only the last row is padded and nothing is
  truncated.

Lengths are read from a file with :func:`read_lengths`: one token count per line, or JSON
lines with the count (or the token list) in a field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from layerscope.checks import MAX_SIZE
from layerscope.errors import EstimateError

STRATEGIES = ("padded", "grouped", "packed")


@dataclass(frozen=True)
class Batching:
    """One way to batch a dataset for one epoch.

    Attributes:
        strategy: ``"padded"``, ``"grouped"`` or ``"packed"``.
        steps: optimizer steps per epoch (``G = batch_size x num_gpus`` sequences each).
        lengths: (sequence length, steps) pairs: how many steps run at each length (padded:
            expected counts, fractional).
        real_tokens: tokens of the examples that are trained on (after truncation).
        padding_tokens: pad tokens in the batches (expected, for ``padded``).
        truncated_tokens: tokens cut off examples longer than ``seq_len``.
        longest: the longest sequence of any step (its batch has the peak memory).
    """

    strategy: str
    steps: int
    lengths: tuple[tuple[int, float], ...]
    real_tokens: int
    padding_tokens: float
    truncated_tokens: int
    longest: int

    @property
    def padding_share(self) -> float:
        """Pad tokens over all tokens the steps process."""
        total = self.real_tokens + self.padding_tokens
        return self.padding_tokens / total if total else 0.0


def check_lengths(lengths: Iterable[object]) -> list[int]:
    """Validate token counts: a non-empty sequence of ints >= 1.

    Raises:
        EstimateError: an empty list or a count that is not an int >= 1 (with its index).
    """
    if isinstance(lengths, (str, bytes, dict)) or not hasattr(lengths, "__iter__"):
        raise EstimateError(f"seq_lens must be a list of token counts, got {lengths!r}"[:300])
    out = []
    for i, n in enumerate(lengths):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SIZE:
            raise EstimateError(f"seq_lens[{i}] must be a token count (int >= 1), got {n!r}")
        out.append(n)
    if not out:
        raise EstimateError("seq_lens is empty: give one token count per example")
    return out


def read_lengths(path: str | Path, field: str | None = None) -> list[int]:
    """Token counts from a file: one integer per line, or JSON lines whose ``field`` holds a
    count or a list of token ids (the list's length). Blank lines are skipped.

    Raises:
        EstimateError: a missing file, or a line that holds no count (its line number).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise EstimateError(f"cannot read lengths from {str(p)!r}: {exc.strerror}") from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        value: object
        if field is None and not line.startswith("{"):
            try:
                value = int(line)
            except ValueError:
                raise EstimateError(f"{p}:{number}: expected a token count, got {line[:40]!r}"
                                    " (for JSON lines, name the field)") from None
        else:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise EstimateError(f"{p}:{number}: not a JSON object") from None
            key = field or _guess_field(record)
            if not isinstance(record, dict) or key not in record:
                raise EstimateError(f"{p}:{number}: no field {key!r}")
            value = record[key]
            if isinstance(value, list):
                value = len(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EstimateError(f"{p}:{number}: token count must be an int >= 1, got {value!r}")
        out.append(value)
    if not out:
        raise EstimateError(f"{p}: no token counts")
    return out


def _guess_field(record: object) -> str:
    """The usual field names for a token count or token ids in JSON lines."""
    for key in ("length", "num_tokens", "n_tokens", "tokens", "input_ids"):
        if isinstance(record, dict) and key in record:
            return key
    return "length"


def padded(lengths: Sequence[int], batch_size: int, seq_len: int, num_gpus: int = 1) -> Batching:
    """Random batches, each padded to its longest example (expected values)."""
    clipped, truncated = _clip(lengths, seq_len)
    n, g = len(clipped), batch_size * num_gpus
    steps = math.ceil(n / g)
    ordered = sorted(clipped)
    if g >= n:
        probs = [0.0] * (n - 1) + [1.0]
    else:
        # P(max <= k-th shortest) = C(k, G) / C(N, G), k = G..N; via log-gamma for large N
        k = torch.arange(1, n + 1, dtype=torch.float64)
        log_c = torch.where(k >= g, torch.lgamma(k + 1) - torch.lgamma(k - g + 1),
                            torch.full_like(k, -math.inf))
        cdf = torch.exp(log_c - log_c[-1])
        probs = torch.diff(cdf, prepend=torch.zeros(1, dtype=torch.float64)).tolist()
    per_length: dict[int, float] = {}
    for length, p in zip(ordered, probs):
        if p > 0:
            per_length[length] = per_length.get(length, 0.0) + p * steps
    expected_max = sum(length * p for length, p in zip(ordered, probs))
    real = sum(clipped)
    return Batching("padded", steps, tuple(sorted(per_length.items())), real,
                    expected_max * n - real, truncated, max(clipped))


def grouped(lengths: Sequence[int], batch_size: int, seq_len: int,
            num_gpus: int = 1) -> Batching:
    """Batches of similar length: sorted longest first, each padded to its first example."""
    clipped, truncated = _clip(lengths, seq_len)
    g = batch_size * num_gpus
    ordered = sorted(clipped, reverse=True)
    per_length: dict[int, float] = {}
    padded_tokens = 0
    for start in range(0, len(ordered), g):
        batch = ordered[start:start + g]
        per_length[batch[0]] = per_length.get(batch[0], 0.0) + 1
        padded_tokens += batch[0] * len(batch)
    real = sum(clipped)
    return Batching("grouped", math.ceil(len(ordered) / g), tuple(sorted(per_length.items())),
                    real, float(padded_tokens - real), truncated, ordered[0])


def packed(lengths: Sequence[int], batch_size: int, seq_len: int, num_gpus: int = 1) -> Batching:
    """All tokens concatenated into rows of ``seq_len``; only the last row is padded."""
    tokens = sum(lengths)
    rows = math.ceil(tokens / seq_len)
    steps = math.ceil(rows / (batch_size * num_gpus))
    return Batching("packed", steps, ((seq_len, float(steps)),), tokens,
                    float(rows * seq_len - tokens), 0, seq_len)


def batchings(lengths: Sequence[int], batch_size: int, seq_len: int,
              num_gpus: int = 1) -> dict[str, Batching]:
    """The three strategies for one dataset, by name."""
    lengths = check_lengths(lengths)
    return {"padded": padded(lengths, batch_size, seq_len, num_gpus),
            "grouped": grouped(lengths, batch_size, seq_len, num_gpus),
            "packed": packed(lengths, batch_size, seq_len, num_gpus)}


def _clip(lengths: Sequence[int], seq_len: int) -> tuple[list[int], int]:
    clipped = [min(n, seq_len) for n in lengths]
    return clipped, sum(lengths) - sum(clipped)


Times = tuple[float, float, float]
"""A step's (seconds, low, high): the estimate and its band."""


def interpolated(step: Callable[[int], Times], lengths: Iterable[int],
                 points: int = 24) -> Callable[[int], Times]:
    """``step`` at up to ``points`` lengths spread over the range of ``lengths``, linear in
    between: a step's time is smooth in its length, and timing every distinct length of a
    large dataset one by one is needlessly slow."""
    distinct = sorted(set(lengths))
    if len(distinct) <= points:
        known = {n: step(n) for n in distinct}
        return lambda n: known[n] if n in known else step(n)
    lo, hi = distinct[0], distinct[-1]
    grid = sorted({round(lo + (hi - lo) * i / (points - 1)) for i in range(points)})
    values = [step(n) for n in grid]

    def at(n: int) -> Times:
        for i in range(len(grid) - 1):
            a, b = grid[i], grid[i + 1]
            if a <= n <= b:
                f = (n - a) / (b - a)
                return tuple(x + (y - x) * f for x, y in zip(values[i], values[i + 1]))  # type: ignore[return-value]
        return step(n)
    return at


@dataclass(frozen=True)
class StrategyTime:
    """One batching strategy's run.

    Attributes:
        batching: its steps, lengths and token counts per epoch.
        seconds: wall time of all epochs; ``low_seconds``/``high_seconds`` its band (each
            step's band, summed).
        peak_bytes: estimated peak GPU memory of its longest batch (None: not estimated).
        required_bytes: what that batch needs on the GPU (the peak with the allocator's
            headroom and the CUDA context, as a fit verdict counts it).
    """

    batching: Batching
    seconds: float
    low_seconds: float
    high_seconds: float
    peak_bytes: int | None = None
    required_bytes: int | None = None


def run_times(lengths: Sequence[int], batch_size: int, seq_len: int, epochs: int,
              step: Callable[[int, bool], Times], num_gpus: int = 1,
              memory: Callable[[int], tuple[int, int]] | None = None) -> dict[str, StrategyTime]:
    """Each strategy's wall time over ``epochs``, from ``step(length, padded)`` (a step's
    times at a sequence length; ``padded``: the batch carries an attention mask) and,
    optionally, ``memory(length)``: (peak, required) bytes of the longest batch."""
    out: dict[str, StrategyTime] = {}
    peaks: dict[int, tuple[int, int]] = {}
    for name, b in batchings(lengths, batch_size, seq_len, num_gpus).items():
        masked = name != "packed"
        at = interpolated(lambda n, masked=masked: step(n, masked),  # type: ignore[misc]
                          [n for n, _ in b.lengths])
        totals = [sum(k * at(n)[i] for n, k in b.lengths) * epochs for i in range(3)]
        peak: tuple[int | None, int | None] = (None, None)
        if memory is not None:
            if b.longest not in peaks:
                peaks[b.longest] = memory(b.longest)
            peak = peaks[b.longest]
        out[name] = StrategyTime(b, totals[0], totals[1], totals[2], *peak)
    return out
