"""The GPU search (``layerscope gpus`` / ``choose_gpus``): its rules on hand-made memory
figures, then end to end on a small model against the estimators it calls."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from conftest import LLAMA, build
from transformers import AutoModelForCausalLM, LlamaConfig

from layerscope import choose_gpus
from layerscope.errors import EstimateError
from layerscope.estimate.choose import (
    GPU_COUNTS,
    _choose,
    _rank,
    _Search,
    candidates,
    persistent_bytes,
)
from layerscope.estimate.hardware import GPU
from layerscope.estimate.memory import memory_of
from layerscope.estimate.time import step_time_of
from layerscope.setup import TrainingSetup

GIB = 2**30


def fake_gpu(name: str, memory_gib: float, price: float | None = 1.0) -> GPU:
    """A GPU with round figures and NVLink, for the search only."""
    return GPU(name, f"a {name} GPU", memory_bytes=int(memory_gib * GIB),
               peak_flops={"bf16": 1e14, "fp16": 1e14, "tf32": 5e13, "fp32": 1e13},
               memory_bandwidth=1e12, sm_count=8, price_per_hour=price, nvlink_bandwidth=1e11,
               pcie_bandwidth=3.2e10, fabric="infiniband-ndr")


# -- the rules, on memory written out here --------------------------------------------------------
@dataclass(frozen=True)
class Needs:
    """A stand-in MemoryEstimate: needs ``gib`` GiB."""

    gib: float

    def required_bytes(self) -> int:
        return int(self.gib * GIB)

    def fits(self, memory: int) -> bool:
        return self.required_bytes() <= memory


@dataclass(frozen=True)
class Step:
    seconds: float
    tokens_per_second: float = 1000.0


STATES_GIB = 64.0
"""The hand model: 64 GiB of states sharded over the GPUs (ZeRO-2: a quarter stays whole),
8 GiB of activations (1 with checkpointing), offload keeps 2 GiB on the GPU."""


def needs(s: TrainingSetup) -> Needs:
    n = s.num_gpus or 1
    activations = 1.0 if s.gradient_checkpointing else 8.0
    if s.offload:
        return Needs(2.0 + activations)
    if s.distributed == "zero2":
        return Needs(STATES_GIB / 4 + 3 * STATES_GIB / 4 / n + activations)
    return Needs(STATES_GIB / n + activations)


def seconds(s: TrainingSetup, gpu: GPU) -> Step:
    """FSDP a little faster than ZeRO-3, recomputation a third slower, offload much slower."""
    base = {None: 1.0, "zero2": 1.0, "fsdp": 1.1, "zero3": 1.2}[s.distributed]
    return Step(base * (4 / 3 if s.gradient_checkpointing else 1) * (10 if s.offload else 1))


@pytest.fixture(scope="module")
def setup() -> TrainingSetup:
    return TrainingSetup(build("llama", "meta"), seq_len=16)


def search(setup: TrainingSetup, calls: list[TrainingSetup] | None = None,
           floor: float = 0.0) -> _Search:
    def memory(s: TrainingSetup) -> Needs:
        if calls is not None:
            calls.append(s)
        return needs(s)

    return _Search(setup, lambda _: None, memory, lambda s: int(floor * GIB),  # type: ignore[arg-type]
                   seconds)  # type: ignore[arg-type]


def test_one_gpu_when_it_fits(setup):
    c = _choose(search(setup), fake_gpu("big", 80), None, None)
    assert c.chosen is not None and c.num_gpus == 1
    assert c.chosen.setup.distributed is None and not c.chosen.setup.gradient_checkpointing
    assert c.fewer is None and c.reason.startswith("fits on one big")


def test_the_fewest_gpus_then_the_fastest_setting_that_fits_there(setup):
    # 24 GiB: one GPU needs 65 with checkpointing. 2 GPUs: fsdp/zero3 + ckpt need 33, zero2 +
    # ckpt 41. 4 GPUs: zero2 + ckpt 16 + 12 + 1 = 29 no; fsdp/zero3 16 + 8 = 24 fit as do
    # their checkpointed 17: the fastest is fsdp without recomputation (1.1 s)
    c = _choose(search(setup), fake_gpu("mid", 24), None, None)
    assert c.chosen is not None and c.num_gpus == 4
    assert (c.chosen.setup.distributed, c.chosen.setup.gradient_checkpointing) == ("fsdp", False)
    fits = {(t.setup.distributed, t.setup.gradient_checkpointing) for t in c.tried if t.fits}
    assert fits == {("fsdp", False), ("fsdp", True), ("zero3", False), ("zero3", True)}
    assert all(t.step is not None for t in c.tried if t.fits)
    assert c.fewer is not None and c.fewer.required_bytes == 33 * GIB  # at 2 GPUs
    assert "nothing fits on 2 GPUs" in c.reason and "fastest of 4 that fit" in c.reason


def test_offload_only_when_nothing_else_fits(setup):
    # 2.5 GiB: fsdp + ckpt at 64 GPUs needs 64 / 64 + 1 = 2 GiB: it fits, offload is not tried
    c = _choose(search(setup), fake_gpu("small", 2.5), None, None)
    assert c.chosen is not None and c.chosen.setup.offload is None and c.num_gpus == 64
    # 1.5 GiB: nothing without offload (2 GiB at best), and offload + ckpt needs 2 + 1 = 3
    none = _choose(search(setup), fake_gpu("tiny", 1.5), None, None)
    assert none.chosen is None and "nothing tried fits on up to 64" in none.reason
    assert none.fewer is not None and none.fewer.setup.offload is not None


def test_offload_at_the_fewest_count_when_it_is_the_only_way(setup):
    global STATES_GIB
    old = STATES_GIB
    STATES_GIB = 64.0 * 64  # 4 TiB of states: 64 + 1 GiB per GPU at 64 GPUs
    try:
        c = _choose(search(setup), fake_gpu("mid", 24), None, None)
    finally:
        STATES_GIB = old
    assert c.chosen is not None and c.chosen.setup.offload is not None
    assert c.num_gpus == 1  # offload needs 2 + 1 GiB (+ 8 without checkpointing): one GPU
    assert c.chosen.setup.gradient_checkpointing is False  # 10 GiB fits, and is faster
    assert "nothing fits without offload" in c.reason


def test_settings_that_cannot_fit_are_not_estimated(setup):
    calls: list[TrainingSetup] = []
    c = _choose(search(setup, calls), fake_gpu("mid", 24), None, None)
    # without checkpointing: only where checkpointing fits (fsdp and zero3 at 4 GPUs)
    plain = [s for s in calls if not s.gradient_checkpointing]
    assert {(s.num_gpus, s.distributed) for s in plain} == {(4, "fsdp"), (4, "zero3")}
    assert c.num_gpus == 4
    # zero2 + ckpt needs 16 + 12 + 1 = 29 GiB at 4 GPUs: zero2 without it is listed, needing
    # at least as much, and not estimated
    skipped = [t for t in c.tried if t.memory is None]
    assert [(t.setup.distributed, t.setup.gradient_checkpointing) for t in skipped] == [
        ("zero2", False)]
    assert skipped[0].required_bytes == 29 * GIB and not skipped[0].fits
    calls.clear()
    floored = _choose(search(setup, calls, floor=100), fake_gpu("mid", 24), None, None)
    assert calls == [] and floored.chosen is None  # a floor above the GPU: nothing estimated


def test_candidates_are_in_the_search_order(setup):
    assert [(p.distributed, r.gradient_checkpointing) for p, r in candidates(setup, 1, False)] == [
        (None, True)]
    two = candidates(setup, 2, False)
    assert [p.distributed for p, _ in two] == ["zero2", "fsdp", "zero3"]
    assert all(p.num_gpus == 2 and not p.gradient_checkpointing and r.gradient_checkpointing
               for p, r in two)
    off = candidates(setup, 8, True)
    assert [(p.distributed, p.offload) for p, _ in off] == [
        ("zero3", "optimizer"), ("zero3", "params"), ("fsdp", "params")]
    ckpt = candidates(setup.replace(gradient_checkpointing=True), 2, False)
    assert all(r is None and p.gradient_checkpointing for p, r in ckpt)
    assert GPU_COUNTS == (1, 2, 4, 8, 16, 32, 64)


def test_cheapest_first(setup):
    s = search(setup)
    cheap = _choose(s, fake_gpu("cheap", 80, price=1.0), 1000, 1)
    dear = _choose(s, fake_gpu("dear", 80, price=3.0), 1000, 1)
    unpriced = _choose(s, fake_gpu("unpriced", 80, price=None), 1000, 1)
    nothing = _choose(s, fake_gpu("nothing", 1.0), 1000, 1)
    order = sorted([nothing, unpriced, dear, cheap], key=_rank)
    assert [c.gpu.name for c in order] == ["cheap", "dear", "unpriced", "nothing"]
    # one GPU at 1 s a step: ceil(1000 / 1) steps, 1000 s, $1 an hour
    assert cheap.run is not None and cheap.run.total_steps == 1000
    assert cheap.run.cost == pytest.approx(1000 / 3600 * 1.0)
    # 1000 tokens/s on one GPU at $1 an hour: a million tokens take 1000 s
    no_run = _choose(s, fake_gpu("cheap", 80, price=1.0), None, None)
    assert no_run.cost_per_million_tokens == pytest.approx(1e6 / 1000 / 3600)


# -- end to end on a small model ------------------------------------------------------------------
WIDE = dict(LLAMA, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=1000)
"""Wider than conftest's LLAMA, so its states weigh more than the CUDA context."""


@pytest.fixture(scope="module")
def wide() -> TrainingSetup:
    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**WIDE))
    return TrainingSetup(model, seq_len=32)


def test_end_to_end_matches_the_estimators(wide):
    one = memory_of(wide.replace(gradient_checkpointing=True)).required_bytes()
    tight = fake_gpu("tight", (one - 1) / GIB)  # one GPU does not fit, even recomputing
    roomy = fake_gpu("roomy", 80)
    choices = choose_gpus(wide, gpu_types=[tight, roomy], num_samples=100, num_epochs=2)
    by = {c.gpu.name: c for c in choices}
    r = by["roomy"]
    assert r.num_gpus == 1 and r.chosen.setup.distributed is None
    t = by["tight"]
    assert t.chosen is not None and t.num_gpus > 1
    n = t.num_gpus
    assert t.chosen.memory.required_bytes() == memory_of(t.chosen.setup).required_bytes()
    assert t.chosen.memory.fits(tight.memory_bytes)
    for _, s_ckpt in candidates(wide, n // 2, False):  # nothing fits on half as many
        assert not memory_of(s_ckpt).fits(tight.memory_bytes)
    fitting = [x for x in t.tried if x.fits]
    times = {x.label: step_time_of(x.setup, tight).seconds for x in fitting}
    assert min(times.values()) == pytest.approx(t.chosen.step.seconds)
    # the run: ceil(100 / (1 x n)) steps per epoch, two epochs, n GPUs at $1 an hour
    steps = math.ceil(100 / n) * 2
    assert t.run.total_steps == steps
    assert t.run.cost == pytest.approx(steps * t.chosen.step.seconds / 3600 * n * 1.0)


def test_persistent_states_are_a_lower_bound_of_the_estimate(wide):
    for kw in [{}, {"distributed": "ddp", "num_gpus": 2}, {"distributed": "zero2", "num_gpus": 2},
               {"distributed": "zero3", "num_gpus": 4}, {"distributed": "fsdp", "num_gpus": 2},
               {"distributed": "fsdp", "num_gpus": 2, "fsdp_version": 1},
               {"distributed": "zero3", "num_gpus": 2, "offload": "optimizer"},
               {"distributed": "fsdp", "num_gpus": 2, "offload": "params"},
               {"distributed": "zero3", "num_gpus": 2, "lora": 4}]:
        s = wide.replace(**kw)
        assert persistent_bytes(s) <= memory_of(s).peak_bytes, kw
    # one GPU, AdamW in fp32: 4 bytes of weight and 8 of moments a parameter (the gradients
    # come and go with the traced step); every tensor rounded up to 512 bytes
    total = wide.scan.total_params
    tensors = len(wide.scan.tensors)
    assert 12 * total <= persistent_bytes(wide) <= 12 * total + 3 * 512 * tensors


@pytest.mark.parametrize("kwargs, message", [
    ({"distributed": "zero3"}, "searches the strategy, GPU count and offload"),
    ({"num_gpus": 8}, r"do not give them \(got num_gpus=8\)"),
    ({"num_samples": 10}, "give num_samples and num_epochs together"),
    ({"num_samples": 0, "num_epochs": 1}, "num_samples must be an int >= 1, got 0"),
    ({"num_samples": 10, "num_epochs": 0}, "num_epochs must be an int >= 1, got 0"),
    ({"gpu_types": "h100"}, "gpu_types must be a list"),
    ({"gpu_types": []}, "gpu_types is empty"),
    ({"gpu_types": ["h1000"]}, "unknown GPU 'h1000'"),
    ({"fabric": "token-ring"}, "unknown fabric"),
    ({"inference": True}, "inference=True has none"),
    ({"progress": 3}, "progress must be a callable"),
])
def test_bad_input(kwargs, message):
    with pytest.raises(EstimateError, match=message):
        choose_gpus(build("llama", "meta"), seq_len=16, **kwargs)
