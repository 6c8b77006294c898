"""The host/GPU timeline and the kernel arithmetic of the step-time roofline."""

import pytest

from layerscope.estimate.band import BAND, band, regime_of
from layerscope.estimate.hardware import get_gpu
from layerscope.estimate.roofline import (
    FOREACH_CHUNK,
    Kernels,
    Work,
    aligned,
    busy_share,
    foreach_launches,
    run,
    tile_rows,
)
from layerscope.setup import resolve_precision

US = 1e-6


def test_order_decides_whether_host_and_gpu_overlap():
    small = Kernels("a", 10, host=100 * US, device=10 * US)  # host-bound: 10 us each to issue
    big = Kernels("b", 1, host=1 * US, device=1000 * US)  # one long kernel
    # small kernels first: the GPU waits for the host, then runs the long kernel: a sum
    seconds, phases = run([small, big])
    assert seconds == pytest.approx((100 + 1 + 1000) * US)
    assert phases["a"].seconds == pytest.approx(101 * US)  # the last small kernel ends at 101
    # long kernel first: the host issues the small ones meanwhile: about the maximum
    seconds, _ = run([big, small])
    assert seconds == pytest.approx((1 + 1000 + 10) * US)


def test_a_sync_makes_the_host_wait_for_the_gpu():
    big = Kernels("a", 1, host=1 * US, device=1000 * US)
    after = Kernels("a", 1, host=50 * US, device=1 * US)
    no_sync, _ = run([big, after])
    with_sync, _ = run([big, Kernels("a", 0, 15 * US, 0.0, sync=True), after])
    assert no_sync == pytest.approx((1001 + 1) * US)  # issued at 51 us, run after the long one
    # the host waits until 1001 us, spends 15 us in the sync, then 50 us issuing the kernel
    assert with_sync == pytest.approx((1001 + 15 + 50 + 1) * US)


def test_phases_add_up_to_the_wall_time():
    w = Work(get_gpu("h100"), resolve_precision("bf16-true"), 20 * US)
    w.gemm(4096, 4096, 4096)
    w.label = "backward"
    w.stream(1e9, 10)
    w.host(2e-3)
    seconds, phases = run(w.items)
    assert sum(p.seconds for p in phases.values()) == pytest.approx(seconds)
    fwd = phases["forward"]
    assert fwd.flops == 2 * 4096**3 and fwd.compute_seconds > 0 and fwd.memory_seconds == 0
    assert phases["backward"].memory_seconds > 0 and phases["backward"].host_seconds > 2e-3


def test_batched_gemm_is_one_launch_over_all_tiles():
    gpu = get_gpu("h100")  # 132 SMs
    # 64 GEMMs of 128 x 128 outputs: one launch of 64 tiles, not 64 launches of 1 tile
    assert busy_share(128, 128, 64, gpu.sm_count, batch=64) == pytest.approx(64 / 132)
    w = Work(gpu, resolve_precision("bf16-true"), 0.0)
    w.batched_gemm(128, 128, 64, 64)
    assert len(w.items) == 1 and w.items[0].count == 1
    assert w.items[0].flops == 2 * 128 * 128 * 64 * 64


def test_unaligned_dimensions_slow_tensor_core_gemms_only():
    assert aligned(50304, 2) and not aligned(50257, 2) and not aligned(50257, 4)
    gpu = get_gpu("h100")
    times = {}
    for prec in ("bf16-true", "32-true"):
        for vocab in (50304, 50257):
            w = Work(gpu, resolve_precision(prec), 0.0)
            w.gemm(8192, vocab, 768)
            times[prec, vocab] = w.items[0].compute / (2 * 8192 * vocab * 768)  # s per FLOP
    assert times["bf16-true", 50257] == pytest.approx(2 * times["bf16-true", 50304], rel=0.01)
    assert times["32-true", 50257] == pytest.approx(times["32-true", 50304], rel=0.01)


def test_foreach_launches_by_chunks_or_tensors():
    # one big tensor: 320 chunks of 65536 elements per launch
    assert foreach_launches(640 * FOREACH_CHUNK, 1) == 3  # 640.5 chunks -> 3 launches
    # many small tensors: at most 48 tensors per launch
    assert foreach_launches(224 * 1000, 224) == 5


def test_regime_and_band():
    assert regime_of(1.0, 0.7, 0.2) == "compute-bound"
    assert regime_of(1.0, 0.2, 0.7) == "memory-bound"
    assert regime_of(1.0, 0.2, 0.2) == "host-bound"  # 0.6 s neither FLOP- nor memory-bound
    low, high = band(2.0, "host-bound")
    assert (low, high) == (2.0 * BAND["host-bound"][0], 2.0 * BAND["host-bound"][1])
    for lo, hi in BAND.values():
        assert lo < 1 < hi


def test_grouped_gemm_tiles_each_group_on_its_own_rows():
    gpu = get_gpu("h100")  # 132 SMs
    n, k = 128 * 66, 1024  # 66 output tiles across
    times = {}
    for loads in ((128, 128), (120, 136)):  # the same 256 rows and FLOPs
        w = Work(gpu, resolve_precision("bf16-true"), 0.0)
        w.grouped_gemm([(m, n, k) for m in loads])
        assert len(w.items) == 1 and w.items[0].flops == 2 * 256 * n * k
        times[loads] = w.items[0].compute
    # even: 2 x 66 = 132 tiles, one wave; 120 + 136 rows: 1 + 2 tile rows, 198 tiles, two waves
    # of 132 SMs: the FLOPs at 198 / 264 of the GPU, 4/3 of the time
    assert times[120, 136] == pytest.approx(times[128, 128] * 4 / 3)


def test_a_slices_row_count_does_not_break_alignment():
    gpu = get_gpu("h100")
    times = {}
    for ragged in ("", "m"):
        w = Work(gpu, resolve_precision("bf16-true"), 0.0)
        w.gemm(1021, 4096, 4096, ragged=ragged)  # 1021 rows: not a multiple of 8 bf16 elements
        times[ragged] = w.items[0].compute
    # a full matrix of 1021 rows may be a leading dimension; one expert's 1021 rows of the
    # sorted tokens are a slice whose rows start 4096 elements apart: aligned, but its last
    # tile row is computed whole (1024 rows)
    assert times[""] == pytest.approx(2 * times["m"] * 1021 / 1024)


def test_a_routed_slice_computes_whole_tile_rows():
    gpu = get_gpu("h100")
    times = {}
    for rows in (130, 256):
        w = Work(gpu, resolve_precision("bf16-true"), 0.0)
        w.gemm(rows, 4096, 4096, ragged="m")
        times[rows] = w.items[0].compute
    assert times[130] == pytest.approx(times[256])  # two 128-row tile rows each


def test_tile_rows_of_routed_slices():
    assert tile_rows(130, "m") == 256  # two 128-row tiles
    assert tile_rows(64, "m") == 64  # a slice shorter than a tile gets a 64-row kernel
    assert tile_rows(65, "m") == 128
    assert tile_rows(10, "m") == 16  # no tile is shorter than one MMA (16 rows)
    assert tile_rows(130, "") == 130  # a model's own dimension: no padding counted
