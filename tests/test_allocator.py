"""layerscope.estimate.allocator: the caching allocator on hand-made allocation sequences.

Every expected number is worked out next to the assertion from the rules of
``c10/cuda/CUDACachingAllocator.cpp``: blocks are multiples of 512 bytes; requests up to 1 MiB
come from 2 MiB small-pool segments; larger ones from the large pool, whose new segments are
20 MiB below 10 MiB and the request rounded up to 2 MiB from there; a found block is split
when the rest is over 1 MiB (large pool) or at least 512 bytes (small pool); freed blocks merge
with free neighbours and stay cached.
"""

from __future__ import annotations

import pytest

from layerscope.errors import EstimateError
from layerscope.estimate.allocator import (
    CachingAllocator,
    StepEvents,
    build_ops,
    live_peaks,
    round_size,
    segment_size,
    simulate_loop,
    step_events,
)
from layerscope.estimate.trace import Segment, StepTrace, replay

KiB, MiB = 2**10, 2**20


def test_block_rounding_and_segment_sizes():
    assert [round_size(n) for n in (1, 511, 512, 513, 3 * MiB + 1)] == [512, 512, 512, 1024,
                                                                         3 * MiB + 512]
    assert segment_size(512) == segment_size(MiB) == 2 * MiB  # small pool
    assert segment_size(MiB + 512) == segment_size(10 * MiB - 512) == 20 * MiB  # shared 20 MiB
    assert segment_size(10 * MiB) == 10 * MiB  # its own, a multiple of 2 MiB already
    assert segment_size(10 * MiB + 512) == 12 * MiB  # rounded up to 2 MiB


def test_small_requests_share_2_mib_segments():
    a = CachingAllocator()
    blocks = [a.malloc(512 * KiB) for _ in range(4)]  # 4 x 512 KiB fill one 2 MiB segment
    assert (a.reserved, a.segments, a.allocated) == (2 * MiB, 1, 2 * MiB)
    a.malloc(100)  # a fifth block (100 bytes -> 512) needs a second segment
    assert (a.reserved, a.allocated) == (4 * MiB, 2 * MiB + 512)
    for b in blocks:
        a.free(b)
    assert a.reserved == 4 * MiB and a.allocated == 512  # segments stay cached


def test_pools_are_separate():
    a = CachingAllocator()
    a.free(a.malloc(MiB))  # a cached 1 MiB small block and 1 MiB rest, merged: 2 MiB free
    a.malloc(MiB + 512)  # large request: the small pool cannot serve it -> a 20 MiB segment
    assert a.reserved == 2 * MiB + 20 * MiB


def test_requests_under_10_mib_carve_a_20_mib_segment():
    a = CachingAllocator()
    a.malloc(6 * MiB)  # new 20 MiB segment, split: 14 MiB cached
    a.malloc(6 * MiB)  # from the 14: 8 MiB cached
    a.malloc(6 * MiB)  # from the 8: the 2 MiB rest is over 1 MiB, so split again
    assert (a.reserved, a.allocated) == (20 * MiB, 18 * MiB)
    a.malloc(3 * MiB)  # the 2 MiB rest is too small: a second 20 MiB segment
    assert a.reserved == 40 * MiB


def test_a_block_is_handed_out_whole_when_the_rest_is_1_mib_or_less():
    a = CachingAllocator()
    a.free(a.malloc(12 * MiB))  # a 12 MiB segment, cached
    b = a.malloc(11 * MiB + 512 * KiB)  # 512 KiB rest: not split, the whole 12 MiB is used
    assert (a.reserved, a.allocated, b.size) == (12 * MiB, 12 * MiB, 12 * MiB)
    a.free(b)
    c = a.malloc(10 * MiB)  # 2 MiB rest, over 1 MiB: split
    assert (a.reserved, a.allocated, c.size) == (12 * MiB, 10 * MiB, 10 * MiB)
    assert a.peak_allocated == 12 * MiB


def test_best_fit_takes_the_smallest_block_that_fits():
    a = CachingAllocator()
    big, small = a.malloc(50 * MiB), a.malloc(30 * MiB)
    a.free(big)
    a.free(small)
    a.malloc(25 * MiB)  # into the 30 (5 MiB left cached), not the 50
    a.malloc(45 * MiB)  # into the 50
    assert a.reserved == 80 * MiB
    a.malloc(5 * MiB)  # the 5 MiB rest of the 30 fits exactly
    a.malloc(5 * MiB)  # the 50's 5 MiB rest fits too
    assert a.reserved == 80 * MiB and a.allocated == 80 * MiB


def test_freed_neighbours_merge():
    a = CachingAllocator()
    x, y, z = (a.malloc(6 * MiB) for _ in range(3))  # one 20 MiB segment: x y z + 2 MiB
    a.free(y)
    a.malloc(7 * MiB)  # 6 MiB free in the middle + 2 MiB at the end: neither fits -> new segment
    assert a.reserved == 40 * MiB
    a.free(x)  # x merges with y: 12 MiB free at the start of the first segment
    a.malloc(12 * MiB)
    assert a.reserved == 40 * MiB
    a.free(z)


def test_fragmentation_costs_a_new_segment():
    a = CachingAllocator()
    first = a.malloc(40 * MiB)
    a.malloc(40 * MiB)
    a.free(first)  # 40 MiB cached, 40 in use: 80 reserved
    a.malloc(60 * MiB)  # no cached block of 60: a new segment though 40 are free
    assert a.reserved == 140 * MiB and a.peak_reserved == 140 * MiB


def test_max_split_size_keeps_oversize_blocks_whole():
    a = CachingAllocator(max_split_size=32 * MiB)
    a.free(a.malloc(64 * MiB))  # an oversize (>= 32 MiB) block, cached
    a.malloc(20 * MiB)  # small requests never take oversize blocks: new 20 MiB segment
    assert a.reserved == 84 * MiB
    b = a.malloc(50 * MiB)  # within 20 MiB of the 64: handed out whole, never split
    assert (a.reserved, b.size) == (84 * MiB, 64 * MiB)
    a.free(b)
    a.malloc(40 * MiB)  # 64 >= 40 + 20: too big to hand out, a new segment
    assert a.reserved == 124 * MiB


def test_allocator_errors():
    a = CachingAllocator()
    b = a.malloc(4 * KiB)
    a.free(b)
    with pytest.raises(EstimateError, match="freed twice"):
        a.free(b)
    with pytest.raises(EstimateError, match="max_split_size"):
        CachingAllocator(max_split_size=MiB)


def test_build_frees_tied_copies_and_recasts_adapters():
    ops = build_ops([(30 * MiB, False), (30 * MiB, True), (512, False)],
                    adapters=[(1024, 2048), (4096, 4096)])
    # three tensors, the tied copy freed, two adapters made, the first re-made in fp32
    assert ops == ((0, 30 * MiB), (1, 30 * MiB), (2, 512), (1, 0), (3, 1024), (4, 4096),
                   (5, 2048), (3, 0))


def test_loop_reuses_the_tied_copy_and_repeats():
    """Weights: 30 MiB kept, a 30 MiB tied copy dropped. Each step: a 24 MiB activation and a
    12 MiB gradient; AdamW-like state of 2 x 12 MiB made in step 1, a 12 MiB temporary."""
    build = build_ops([(30 * MiB, False), (30 * MiB, True)])  # 60 MiB reserved, 30 cached
    step = StepEvents(ops=((0, 24 * MiB), (1, 12 * MiB), (0, 0)), handles=2, leftover=(1,))
    loop = simulate_loop(build, step, optimizer_state=(12 * MiB, 12 * MiB),
                         optimizer_temporaries=(12 * MiB,), cublas_workspace=0)
    # step 1: the activation takes the dropped copy's 30 (6 left, cached), the gradient a new
    # 12 MiB segment; the activation is freed (30 cached again); the state: 12 from the 30
    # (18 left), 12 from the 18 (6 left); the temporary a new 12; then temporary and gradient
    # are freed. Step 2: activation 24 has no block (12, 12, 6 cached): new 24 MiB segment;
    # gradient from a 12, temporary from the other 12. Step 3 repeats step 2 exactly.
    assert loop.reserved_peak == (60 + 12 + 12 + 24) * MiB
    assert loop.steps == 3
    # the highest allocation: step 2's backward, weights 30 + state 24 + activation 24 +
    # gradient 12 = 90 MiB (the optimizer step, 30 + 24 + 12 + 12 = 78, is lower)
    assert loop.allocated_peak == 90 * MiB
    # with the two 32 MiB cuBLAS workspaces (forward and autograd threads), made first: two
    # segments of their own, nothing else moves
    with_ws = simulate_loop(build, step, optimizer_state=(12 * MiB, 12 * MiB),
                            optimizer_temporaries=(12 * MiB,))
    assert with_ws.reserved_peak == loop.reserved_peak + 2 * 32 * MiB
    assert with_ws.allocated_peak == loop.allocated_peak + 2 * 32 * MiB


def test_inference_loop_has_no_optimizer():
    step = StepEvents(ops=((0, 3 * MiB), (1, 3 * MiB), (0, 0), (1, 0)), handles=2, leftover=())
    loop = simulate_loop((), step, optimizer_state=(99 * MiB,), inference=True,
                         cublas_workspace=8 * MiB + 128 * KiB)
    # one workspace (no autograd thread) of 8.125 MiB: a 20 MiB segment, split; both 3 MiB
    # blocks fit in its 11.875 MiB rest
    assert (loop.reserved_peak, loop.allocated_peak, loop.steps) == (
        20 * MiB, 8 * MiB + 128 * KiB + 6 * MiB, 2)
    with pytest.raises(EstimateError, match="max_steps"):
        simulate_loop((), step, max_steps=0)
    with pytest.raises(EstimateError, match="cublas_workspace"):
        simulate_loop((), step, cublas_workspace=-1)


def _stack_trace() -> StepTrace:
    """A reduced model of kinds [0, 1]: each block saves a 1 MiB activation for backward and
    hands on a 2 MiB output; each backward hands down a 2 MiB gradient and keeps a 512 KiB
    weight gradient. The embedding part makes the first hidden state, the head a 4 MiB
    logits tensor that the release frees."""
    e = {
        ("embed", "fwd"): (("a", 2 * MiB),),
        (0, "fwd"): (("a", MiB), ("a", 2 * MiB)),
        (1, "fwd"): (("a", MiB), ("a", 2 * MiB), ("f", (0, "fwd"), 1)),
        ("head", "fwd"): (("a", 4 * MiB), ("f", (1, "fwd"), 1)),
        ("head", "release"): (("f", ("head", "fwd"), 0),),
        ("head", "bwd"): (("a", 2 * MiB),),
        (1, "bwd"): (("a", 2 * MiB), ("a", 512 * KiB), ("f", ("head", "bwd"), 0),
                     ("f", (1, "fwd"), 0)),
        (0, "bwd"): (("a", 2 * MiB), ("a", 512 * KiB), ("f", (1, "bwd"), 0),
                     ("f", (0, "fwd"), 0)),
        ("embed", "bwd"): (("f", (0, "bwd"), 0), ("f", ("embed", "fwd"), 0)),
        ("head", "end"): (),
    }
    passed = frozenset({((0, "fwd"), 1), ((1, "fwd"), 1), (("head", "bwd"), 0), ((1, "bwd"), 0),
                        ((0, "bwd"), 0)})
    return StepTrace(segments={}, events=e, passed=passed, kinds=(0, 1))


def test_step_events_expand_the_reduced_model():
    """Full model [0, 1, 1, 1]: four blocks, each block of kind 1 frees the previous block's
    output (whatever its kind) and, in backward, the gradient the block above handed down."""
    ev = step_events(_stack_trace(), [0, 1, 1, 1], inference=False)
    allocs = [size for _, size in ev.ops if size]
    # embed 2 + 4 blocks x (1 + 2) + logits 4 | head grad 2 + 4 blocks x (2 + 0.5)
    assert sum(allocs) == (2 + 4 * 3 + 4 + 2) * MiB + 4 * (2 * MiB + 512 * KiB)
    high, end, _ = live_peaks(ev)
    # forward: embed 2 + 4 saved 1 MiB + the last output 2 (each earlier one freed by the next
    # block) + logits 4 = 12 MiB; backward never goes higher (each block frees what it adds)
    assert high == 12 * MiB
    assert end == 4 * 512 * KiB  # the weight gradients, freed by zero_grad
    assert len(ev.leftover) == 4 and ev.handles == len(allocs)


def test_step_events_agree_with_the_segment_replay():
    trace = _stack_trace()
    segments = {}  # the same step as net/high per segment
    for key, events in trace.events.items():
        live = high = 0
        for ev in events:
            live += ev[1] if ev[0] == "a" else 0
            high = max(high, live)
        segments[key] = Segment(net=live, high=high)
    sizes = {(key, j): ev[1] for key, events in trace.events.items()
             for j, ev in enumerate(e for e in events if e[0] == "a")}
    for key, events in trace.events.items():
        freed = sum(sizes[(ev[1], ev[2])] for ev in events if ev[0] == "f")
        segments[key] = Segment(net=segments[key].net - freed, high=segments[key].high)
    r = replay(StepTrace(segments), [0, 1, 1, 1], inference=False)
    high, end, _ = live_peaks(step_events(trace, [0, 1, 1, 1], inference=False))
    assert (high, end) == (max(r.forward_peak, r.backward_peak), r.end)


def _encoder_decoder_trace() -> StepTrace:
    """A reduced decoder of kinds [0, 1, 2] (first, frozen, trainable) whose every block adds to
    the encoder output's gradient in backward (cross-attention): a 1 MiB sum each block makes
    and the next block to run backward frees, besides the 2 MiB gradient it hands down."""
    e = {
        ("embed", "fwd"): (("a", 2 * MiB),),
        (0, "fwd"): (("a", 2 * MiB),),
        (1, "fwd"): (("a", 2 * MiB), ("f", (0, "fwd"), 0)),
        (2, "fwd"): (("a", 2 * MiB), ("f", (1, "fwd"), 0)),
        ("head", "fwd"): (("a", 4 * MiB), ("f", (2, "fwd"), 0)),
        ("head", "release"): (("f", ("head", "fwd"), 0),),
        ("head", "bwd"): (("a", 2 * MiB),),
        (2, "bwd"): (("a", 2 * MiB), ("a", MiB), ("f", ("head", "bwd"), 0)),
        (1, "bwd"): (("a", 2 * MiB), ("a", MiB), ("f", (2, "bwd"), 0), ("f", (2, "bwd"), 1)),
        (0, "bwd"): (("a", 2 * MiB), ("a", MiB), ("f", (1, "bwd"), 0), ("f", (1, "bwd"), 1)),
        ("embed", "bwd"): (("f", (0, "bwd"), 0), ("f", (0, "bwd"), 1),
                           ("f", ("embed", "fwd"), 0)),
        ("head", "end"): (),
    }
    passed = frozenset({((0, "fwd"), 0), ((1, "fwd"), 0), ((2, "fwd"), 0), (("head", "bwd"), 0),
                        ((2, "bwd"), 0), ((1, "bwd"), 0), ((0, "bwd"), 0)})
    return StepTrace(segments={}, events=e, passed=passed, kinds=(0, 1, 2))


def test_step_events_place_a_sum_handed_between_blocks_the_reduced_model_never_pairs():
    """Full decoder [0, 1, 1, 1, 2]: two frozen blocks are never neighbours in the reduced
    model, yet each frees the 1 MiB sum of the frozen block below it (the 1 MiB tensor the
    block at that distance hands across). Nothing leaks: every allocation is freed by the end
    (main raised 'has no counterpart' here: BART, LED, M2M-100 under lp-lora)."""
    ev = step_events(_encoder_decoder_trace(), [0, 1, 1, 1, 2], inference=False)
    allocs = [h for h, size in ev.ops if size]
    frees = [h for h, size in ev.ops if not size]
    assert sorted(frees) == sorted(allocs) and ev.leftover == ()
    high, end, _ = live_peaks(ev)
    # forward: embed 2 + one block output 2 + logits 4 = 8; backward: head grad 2, then each
    # block makes 2 + 1 and frees the 2 + 1 handed down: at most embed 2 + 2 + 2 + 1 + 1 = 8
    assert (high, end) == (8 * MiB, 0)


def test_step_events_drop_a_free_only_the_first_block_makes():
    """A tensor block 0 makes and block 1 frees (kind 1's events hold the free): the other
    blocks of kind 1 have nothing to free for it, and nothing else is freed early."""
    trace = _stack_trace()
    e = dict(trace.events)
    e[(0, "fwd")] = (*e[(0, "fwd")], ("a", 3 * MiB))  # made only by the first block
    e[(1, "fwd")] = (*e[(1, "fwd")], ("f", (0, "fwd"), 2))
    ev = step_events(StepTrace(segments={}, events=e, passed=trace.passed, kinds=(0, 1)),
                     [0, 1, 1, 1], inference=False)
    high, end, _ = live_peaks(ev)
    # the 3 MiB is freed once, in block 1 (before the 4 MiB logits): the peak is still the
    # head's 12 MiB; blocks 2 and 3 free nothing more (end: the weight gradients only)
    three = [h for h, size in ev.ops if size == 3 * MiB]
    logits = next(i for i, (_, size) in enumerate(ev.ops) if size == 4 * MiB)
    assert len(three) == 1 and [i for i, op in enumerate(ev.ops) if op == (three[0], 0)] == [
        next(i for i, op in enumerate(ev.ops) if op == (three[0], 0))]
    assert next(i for i, op in enumerate(ev.ops) if op == (three[0], 0)) < logits
    assert (high, end) == (12 * MiB, 4 * 512 * KiB)


def test_step_events_need_events():
    with pytest.raises(EstimateError, match="no allocation events"):
        step_events(StepTrace({}), [0], inference=False)


# --- end to end, on tiny models built from configs on the meta device ---------------------

H, FF, L, V = 64, 128, 4, 256


def _build(model_type: str, **extra):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **extra)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def tiny():
    return {
        "llama": _build("llama", hidden_size=H, intermediate_size=FF, num_hidden_layers=L,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                        max_position_embeddings=1024, tie_word_embeddings=False),
        "gpt2": _build("gpt2", n_embd=H, n_layer=L, n_head=4, vocab_size=V, n_positions=512),
        "mixtral": _build("mixtral", hidden_size=H, intermediate_size=FF, num_hidden_layers=L,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                          num_local_experts=4, num_experts_per_tok=2),
    }


def test_build_ops_of_a_model_follow_its_constructors(tiny):
    from layerscope.estimate.allocator import model_build_ops

    def r(n):
        return -(-n // 512) * 512

    # untied llama, bf16: every parameter once in registration order (head dim 16, 2 key and
    # value heads: 32 wide), then the rotary buffers (inv_freq, original_inv_freq: head dim / 2
    # = 8 fp32 values each, one 512-byte block)
    block = [H * H, H * 32, H * 32, H * H, FF * H, FF * H, H * FF, H, H]
    sizes = [V * H] + block * L + [H, V * H]
    ops = model_build_ops(tiny["llama"], 2)
    n = len(sizes)
    assert ops == (*((h, r(2 * k)) for h, k in enumerate(sizes)), (n, 512), (n + 1, 512))
    # gpt2's head is tied to the token embedding: its own copy is made, then dropped
    ops = model_build_ops(tiny["gpt2"], 4)
    frees = [h for h, size in ops if size == 0]
    assert len(frees) == 1 and dict((h, s) for h, s in ops if s)[frees[0]] == r(4 * V * H)


@pytest.mark.parametrize("kind, settings", [
    ("llama", {}),
    ("llama", {"plan": "first:2"}),
    ("llama", {"gradient_checkpointing": True, "precision": "bf16-true"}),
    ("gpt2", {"precision": "32-true"}),
    ("mixtral", {"plan": "last:2"}),
    ("llama", {"inference": True}),
])
def test_event_replay_matches_the_segment_replay(tiny, kind, settings):
    """The events expanded to the full depth give the live bytes the segment replay gives,
    at every phase: no allocation is lost or freed twice by the expansion."""
    from layerscope.estimate.memory import _step_of
    from layerscope.plan import FreezePlan
    from layerscope.setup import make_setup

    settings = dict(settings)
    plan = FreezePlan.parse(settings.pop("plan")) if "plan" in settings else None
    setup = make_setup(tiny[kind], plan, batch_size=4, seq_len=256, **settings)
    step = _step_of(setup)
    n_forward = max(i for i, (h, size) in enumerate(step.events.ops) if size) if settings.get(
        "inference") else None
    high, end, _ = live_peaks(step.events, n_forward)
    r = step.replay
    assert high == max(r.forward_peak, r.backward_peak)
    assert end == r.end


def test_reserved_is_whole_segments_above_the_peak(tiny):
    from layerscope import estimate_memory
    from layerscope.estimate.memory import CUDA_CONTEXT_BYTES

    for kind in ("llama", "gpt2", "mixtral"):
        e = estimate_memory(tiny[kind], batch_size=8, seq_len=512)
        assert e.reserved_bytes >= e.peak_bytes
        assert e.reserved_bytes % (2 * MiB) == 0  # every segment is a multiple of 2 MiB
        # the fit verdict: reserved memory plus the CUDA context
        assert e.required_bytes() == e.reserved_bytes + CUDA_CONTEXT_BYTES
        assert e.fits(e.required_bytes()) and not e.fits(e.required_bytes() - 1)


def test_optimizer_ops_run_in_their_order():
    """A step that allocates 24 MiB and 12 MiB, frees the 24, then allocates 20 MiB: the 20
    reuses the 24's cached segment (split, 4 MiB left), so 36 MiB are reserved, where the three
    made at once (``optimizer_temporaries``) would reserve 56."""
    step = StepEvents(ops=(), handles=0, leftover=())
    ops = ((0, 24 * MiB), (1, 12 * MiB), (0, 0), (2, 20 * MiB), (1, 0), (2, 0))
    loop = simulate_loop((), step, optimizer_ops=ops, cublas_workspace=0)
    assert (loop.reserved_peak, loop.allocated_peak, loop.steps) == (36 * MiB, 36 * MiB, 2)
    at_once = simulate_loop((), step, optimizer_temporaries=(24 * MiB, 12 * MiB, 20 * MiB),
                            cublas_workspace=0)
    assert at_once.reserved_peak == 56 * MiB
    with pytest.raises(EstimateError, match="frees handle 0"):
        simulate_loop((), step, optimizer_ops=((0, 0),))
    with pytest.raises(EstimateError, match="unfreed"):
        simulate_loop((), step, optimizer_ops=((0, MiB),))
