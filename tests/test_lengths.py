"""Real data lengths: padding and packing arithmetic on a hand-made list of lengths."""

import json

import pytest
from conftest import build

from layerscope import estimate_training_time
from layerscope.errors import EstimateError
from layerscope.estimate.hardware import get_gpu
from layerscope.estimate.lengths import grouped, packed, padded, read_lengths, run_times
from layerscope.estimate.memory import estimate_memory
from layerscope.estimate.time import step_timer
from layerscope.setup import TrainingSetup

# Four examples, batches of 2, truncation at 6 tokens: 8 is cut to 6 (2 tokens lost).
LENGTHS = [3, 5, 8, 2]
B, SEQ = 2, 6
REAL = 3 + 5 + 6 + 2  # 16 tokens trained on


def test_grouped_batches_sort_by_length():
    g = grouped(LENGTHS, B, SEQ)
    # sorted longest first: [6, 5] padded to 6, [3, 2] padded to 3
    assert g.steps == 2 and g.lengths == ((3, 1.0), (6, 1.0))
    assert g.real_tokens == REAL and g.truncated_tokens == 2
    assert g.padding_tokens == (6 + 6 + 3 + 3) - REAL == 2
    assert g.longest == 6


def test_random_batches_pad_to_the_expected_longest():
    p = padded(LENGTHS, B, SEQ)
    # the 6 equally likely pairs of [2, 3, 5, 6] have maxima 3, 5, 6, 5, 6, 6:
    # P(max=3) = 1/6, P(max=5) = 2/6, P(max=6) = 3/6, E[max] = 31/6
    assert p.steps == 2
    assert dict(p.lengths) == pytest.approx({3: 2 / 6, 5: 2 * 2 / 6, 6: 2 * 3 / 6})
    assert p.padding_tokens == pytest.approx(4 * 31 / 6 - REAL)
    assert p.truncated_tokens == 2 and p.longest == 6
    # one batch holding everything: padded to the longest, no expectation involved
    whole = padded(LENGTHS, 4, SEQ)
    assert whole.steps == 1 and whole.lengths == ((6, 1.0),)
    assert whole.padding_tokens == 4 * 6 - REAL


def test_packing_fills_rows_and_truncates_nothing():
    k = packed(LENGTHS, B, SEQ)
    # 18 tokens in rows of 6: 3 rows, batches of 2 rows: 2 steps, no pad, nothing cut
    assert k.steps == 2 and k.lengths == ((6, 2.0),)
    assert k.real_tokens == 18 and k.padding_tokens == 0 and k.truncated_tokens == 0
    k = packed([4, 4, 4], B, SEQ)  # 12 tokens: 2 full rows, one step
    assert k.steps == 1 and k.padding_tokens == 0
    k = packed([4, 4, 5], B, SEQ)  # 13 tokens: 3 rows, the last with 5 pad tokens
    assert k.steps == 2 and k.padding_tokens == 3 * 6 - 13


def test_data_parallel_gpus_share_a_step_padded_to_the_longest_of_all():
    # 2 GPUs x batch 1: the global batch is 2 examples, as with batch 2 on one GPU
    assert grouped(LENGTHS, 1, SEQ, num_gpus=2) == grouped(LENGTHS, 2, SEQ)
    assert packed(LENGTHS, 1, SEQ, num_gpus=2).steps == 2


def test_run_times_add_each_steps_time():
    def step(length, masked):  # a made-up step time: 1 ms + 1 ms per token, masked +10%
        t = (1 + length) * (1.1 if masked else 1.0)
        return t, 0.9 * t, 1.2 * t

    runs = run_times(LENGTHS, B, SEQ, epochs=3, step=step, memory=lambda n: (1000 * n, 1100 * n))
    assert runs["grouped"].seconds == pytest.approx(3 * ((1 + 3) * 1.1 + (1 + 6) * 1.1))
    assert runs["packed"].seconds == pytest.approx(3 * 2 * (1 + 6))
    # expected steps at each padded length: 2 x (1/6, 2/6, 3/6) at 3, 5 and 6 tokens
    epoch = (2 / 6 * (1 + 3) + 4 / 6 * (1 + 5) + 6 / 6 * (1 + 6)) * 1.1
    assert runs["padded"].seconds == pytest.approx(3 * epoch)
    assert runs["padded"].high_seconds == pytest.approx(1.2 * runs["padded"].seconds)
    assert runs["packed"].peak_bytes == runs["padded"].peak_bytes == 6000
    assert runs["grouped"].required_bytes == 6600


def test_read_lengths_from_lines_and_json_lines(tmp_path):
    plain = tmp_path / "lengths.txt"
    plain.write_text("3\n\n5\n8\n")
    assert read_lengths(plain) == [3, 5, 8]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in (
        {"input_ids": [1, 2, 3], "n": 7}, {"input_ids": [4, 5], "n": 9})))
    assert read_lengths(jsonl) == [3, 2]  # the token list's length
    assert read_lengths(jsonl, field="n") == [7, 9]
    with pytest.raises(EstimateError, match="no field 'x'"):
        read_lengths(jsonl, field="x")
    bad = tmp_path / "bad.txt"
    bad.write_text("3\nseven\n")
    with pytest.raises(EstimateError, match=r"bad.txt:2: expected a token count"):
        read_lengths(bad)
    with pytest.raises(EstimateError, match="cannot read lengths"):
        read_lengths(tmp_path / "missing.txt")


def test_training_time_over_real_lengths():
    model = build("llama", "meta")
    settings = dict(precision="bf16-true")
    out = estimate_training_time(model, 4, B, 2, seq_len=SEQ, gpu="h100", seq_lens=LENGTHS,
                                 **settings)
    timer = step_timer(TrainingSetup(model, seq_len=SEQ, **settings), get_gpu("h100"))
    runs = out["lengths"]
    at = timer.at(B, SEQ).seconds
    assert runs["packed"].seconds == pytest.approx(2 * 2 * at)  # 2 steps at 6 tokens, 2 epochs
    grouped_s = 2 * (timer.at(B, 3, padded=True).seconds + timer.at(B, 6, padded=True).seconds)
    assert runs["grouped"].seconds == pytest.approx(grouped_s)
    assert out["total_seconds"] == runs["padded"].seconds and out["total_steps"] == 4
    longest = estimate_memory(model, batch_size=B, seq_len=6, **settings)
    assert runs["padded"].peak_bytes == longest.peak_bytes
    assert runs["padded"].required_bytes == longest.required_bytes()
    for bad, match in (({"seq_lens": [3, 0, 2, 1]}, r"seq_lens\[1\]"),
                       ({"seq_lens": [3, 2]}, "num_samples=4 but seq_lens has 2")):
        with pytest.raises(EstimateError, match=match):
            estimate_training_time(model, 4, B, 1, seq_len=SEQ, gpu="h100", **bad)
    with pytest.raises(EstimateError, match="needs gpu"):
        estimate_training_time(model, 4, B, 1, seq_len=SEQ, seq_lens=LENGTHS)
