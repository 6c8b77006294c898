"""Each MoE experts implementation's kernels, syncs and bytes, against hand arithmetic."""

import math

import pytest
from conftest import build

from layerscope.errors import EstimateError, LayerscopeWarning
from layerscope.estimate import experts
from layerscope.estimate.hardware import get_gpu
from layerscope.estimate.memory import estimate_memory
from layerscope.estimate.roofline import Work
from layerscope.estimate.structure import analyse
from layerscope.estimate.time import estimate_step_time
from layerscope.setup import resolve_precision

# conftest MIXTRAL: hidden 32, intermediate 48, 4 experts, top-2, 2 blocks.
E, TOP, HID, INTER = 4, 2, 32, 48
B, S = 2, 16
T = B * S
ROWS = T * TOP  # (token, expert) pairs
EXPERT_FLOPS = 2 * ROWS * (2 * INTER * HID + HID * INTER)  # gate_up and down, top-2 rows


def walk(impl, precision="bf16-true", gpu="h100", backward=False, train=True):
    part = analyse(build("mixtral", "meta"), training=True).block
    prec = resolve_precision(precision)
    w = Work(get_gpu(gpu), prec, 10e-6)
    step = experts.backward if backward else experts.forward
    step(w, part, T, HID, prec, w.gpu, impl, lambda g: train)
    return w


def syncs(w):
    return sum(k.sync for k in w.items)


def test_transformers_default_is_grouped_mm():
    shape = analyse(build("mixtral", "meta"), training=True)
    assert shape.experts_implementation == "grouped_mm"


def test_every_implementation_does_the_active_experts_flops():
    for impl in experts.EXPERTS_IMPLEMENTATIONS:
        assert sum(k.flops for k in walk(impl).items) == pytest.approx(EXPERT_FLOPS), impl


def test_grouped_mm_syncs_only_in_the_fallback():
    # bf16 on Hopper: CUTLASS's grouped GEMM, one launch per projection, no sync
    w = walk("grouped_mm")
    gemms = [k for k in w.items if k.flops]
    assert syncs(w) == 0 and len(gemms) == 2 and all(k.count == 1 for k in gemms)
    # an A100 (sm80) or fp32 weights (bf16-mixed does not autocast grouped_mm): offs.cpu(),
    # then one mm per expert
    for kwargs in ({"gpu": "a100"}, {"precision": "bf16-mixed"}, {"precision": "32-true"}):
        w = walk("grouped_mm", **kwargs)
        assert syncs(w) == 2 and sum(k.count for k in w.items if k.flops) == 2 * E, kwargs
    # backward: input and weight gradients, a sync each in the fallback
    assert syncs(walk("grouped_mm", gpu="a100", backward=True)) == 4
    assert syncs(walk("grouped_mm", gpu="a100", backward=True, train=False)) == 2


def test_expert_loads_spread_like_random_routing():
    loads = experts.expert_loads(4096, 8)
    assert sum(loads) == pytest.approx(4096) and loads == sorted(loads)
    # Binomial(4096, 1/8): mean 512, sd sqrt(512 * 7/8) = 21.17; the busiest of 8 experts at
    # the 15/16 quantile, z = 1.534
    assert loads[-1] == pytest.approx(512 + 21.166 * 1.534, abs=0.1)
    assert loads[0] == pytest.approx(512 - 21.166 * 1.534, abs=0.1)
    assert experts.expert_loads(100, 1) == [100]
    with pytest.raises(EstimateError, match="experts=0"):
        experts.expert_loads(100, 0)


def test_a_gemm_without_rows_is_refused():
    from layerscope.estimate.roofline import gemm_seconds

    with pytest.raises(EstimateError, match="m=0"):
        gemm_seconds(1.0, 1e15, 0, 128, 128, 132, ragged="m")


def test_uneven_loads_cost_tiles_in_grouped_gemms():
    # 4096 pairs over 8 experts: evenly 512 rows each, four 128-row tiles; as routed, the four
    # busier experts (513-545 rows) need a fifth tile row
    loads = experts.expert_loads(4096, 8)
    assert [math.ceil(m / 128) for m in loads] == [4] * 4 + [5] * 4
    times = {}
    for name, rows in (("even", [512.0] * 8), ("routed", loads)):
        w = Work(get_gpu("h100"), resolve_precision("bf16-true"), 0.0)
        w.grouped_gemm([(m, 7168, 1024) for m in rows])  # 56 tiles across
        times[name] = w.items[0].compute
    # even: 8 x 4 x 56 = 1792 tiles, 14 waves of 132 SMs; routed: 36 x 56 = 2016, 16 waves
    assert times["routed"] == pytest.approx(times["even"] * 16 / 14)


def test_eager_loop_syncs_twice_per_expert():
    w = walk("eager")
    assert syncs(w) == 1 + 2 * E  # nonzero over the hit experts, then where + bool per expert


def test_batched_mm_gathers_every_pairs_weights():
    w = walk("batched_mm", precision="bf16-true")
    gathered = ROWS * (2 * INTER * HID + HID * INTER) * 2  # bf16 matrices per (token, expert)
    assert sum(k.bytes for k in w.items) > 2 * gathered  # written by the gather, read by bmm
    assert sum(k.bytes for k in walk("grouped_mm").items) < gathered


def test_eager_weight_gradients_are_full_size_per_expert():
    full = E * (2 * INTER * HID + HID * INTER) * 2  # both stacked weights, bf16
    eager = sum(k.bytes for k in walk("eager", backward=True).items)
    frozen = sum(k.bytes for k in walk("eager", backward=True, train=False).items)
    # E zero-filled full-size gradients and E - 1 read-read-write sums
    assert eager - frozen >= full * (E + 3 * (E - 1))
    grouped = sum(k.bytes for k in walk("grouped_mm", backward=True).items)
    assert grouped < eager


def test_the_experts_setting_is_timed():
    model = build("mixtral", "meta")
    kw = dict(batch_size=B, seq_len=S, precision="bf16-true")
    default = estimate_step_time(model, **kw)  # what transformers picks: grouped_mm
    eager = estimate_step_time(model, experts_implementation="eager", **kw)
    assert eager.forward.flops == default.forward.flops
    assert eager.seconds > default.seconds  # syncs and per-expert kernels
    assert any("experts eager" in n for n in eager.assumptions.notes)
    assert any("experts grouped_mm" in n for n in default.assumptions.notes)
    with pytest.raises(EstimateError, match="unknown experts_implementation 'sonicmoe'"):
        estimate_step_time(model, experts_implementation="sonicmoe", **kw)


def test_memory_traces_the_experts_setting():
    model = build("mixtral", "meta")
    kw = dict(batch_size=B, seq_len=S, precision="bf16-true")
    grouped = estimate_memory(model, **kw)
    batched = estimate_memory(model, experts_implementation="batched_mm", **kw)
    # batched_mm gathers a (2I x H) and an (H x I) matrix per (token, expert) pair and keeps
    # them for backward
    gathered = ROWS * (2 * INTER * HID + HID * INTER) * 2
    assert batched.activation_bytes >= 2 * gathered > 2 * grouped.activation_bytes  # 2 blocks
    with pytest.warns(LayerscopeWarning, match="traced with grouped_mm"):
        eager = estimate_memory(model, experts_implementation="eager", **kw)
    assert eager.peak_bytes == grouped.peak_bytes


def test_sharded_memory_is_traced_per_experts_implementation():
    # the sharded trace is cached across GPU counts; the implementation is part of its key, so
    # the second implementation asked of the same model gets its own trace, not the first one's
    kw = dict(batch_size=2, seq_len=16, distributed="zero2", num_gpus=2)
    fresh = {impl: estimate_memory(build("mixtral", "meta"), experts_implementation=impl, **kw)
             for impl in ("batched_mm", "grouped_mm")}
    model = build("mixtral", "meta")
    for impl in ("batched_mm", "grouped_mm"):
        shared = estimate_memory(model, experts_implementation=impl, **kw)
        assert shared.peak_bytes == fresh[impl].peak_bytes
    # batched_mm gathers each (token, expert) pair's weights: more memory than grouped_mm
    assert fresh["batched_mm"].peak_bytes > fresh["grouped_mm"].peak_bytes
