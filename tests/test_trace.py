"""layerscope.estimate.trace on hand-checkable steps: every byte and FLOP worked out here."""

from __future__ import annotations

import torch
from torch import nn

from layerscope.compat import fake_tensor_mode, run_backward
from layerscope.estimate.trace import (
    Segment,
    StepTrace,
    _Tracker,
    reduced_copy,
    replay,
    rounded,
)


def test_rounding_is_the_cuda_allocators():
    assert [rounded(n) for n in (0, 1, 512, 513, 4096)] == [0, 512, 512, 1024, 4096]


def _fake(mode, *shape, grad=False, dtype=torch.float32):
    with mode:
        t = torch.empty(*shape, dtype=dtype)
    return nn.Parameter(t, requires_grad=True) if grad else t


def test_a_linear_layer_step_by_hand():
    """y = x @ W.T with x: 64 x 128, W: 256 x 128 trainable, fp32; loss = y.sum()."""
    mode = fake_tensor_mode()
    w, x = _fake(mode, 256, 128, grad=True), _fake(mode, 64, 128)
    tracker = _Tracker()
    tracker.ignore([w, x])  # they exist before the step
    with mode, tracker:
        y = torch.nn.functional.linear(x, w)
        tracker.switch(("head", "fwd"))
        loss = y.sum()
        tracker.switch(("head", "bwd"))
        run_backward(loss)
        tracker.switch(("head", "end"))
        del y, loss
    seg = tracker.segments()
    # forward: y is 64 x 256 fp32 = 65,536 bytes; 2 * 64 * 256 * 128 FLOPs
    assert seg[("embed", "fwd")] == Segment(net=65_536, high=65_536, flops=2 * 64 * 256 * 128,
                                            allocated=65_536)
    # the loss: one fp32 scalar, one 512-byte block
    assert seg[("head", "fwd")].net == 512
    # backward: W.grad = dY.T @ x, 256 x 128 fp32 = 131,072 bytes and as many FLOPs as the
    # forward (x needs no gradient); dY, the expanded ones, is a view of a 512-byte scalar
    bwd = seg[("head", "bwd")]
    assert bwd.flops == 2 * 256 * 64 * 128
    assert bwd.allocated == 131_072 + 512
    assert w.grad is not None and tuple(w.grad.shape) == (256, 128)
    # after the step only the gradient is left: y (65,536) and the loss (512) are freed
    assert seg[("head", "end")].net == -(65_536 + 512)


def test_replay_rebuilds_a_deep_stack_from_its_kinds():
    """Segments of 3 kinds (0: first block, 1: a frozen block, 2: a trainable one) replayed for
    blocks [0, 1, 1, 2, 2, 2]: the forward keeps what each block saves, backward frees it."""
    s = {
        ("embed", "fwd"): Segment(net=100, high=100),
        (0, "fwd"): Segment(net=10, high=50),
        (1, "fwd"): Segment(net=0, high=40),  # frozen, no gradient flows in: saves nothing
        (2, "fwd"): Segment(net=30, high=60),
        ("head", "fwd"): Segment(net=200, high=500),
        ("head", "release"): Segment(net=-150, high=0),
        ("head", "bwd"): Segment(net=-40, high=300),
        (2, "bwd"): Segment(net=-20, high=70),  # frees its 30, keeps a 10-byte weight gradient
        (1, "bwd"): Segment(),
        (0, "bwd"): Segment(),
        ("embed", "bwd"): Segment(net=-100, high=0),
        ("head", "end"): Segment(net=-10, high=0),
    }
    r = replay(StepTrace(s), [0, 1, 1, 2, 2, 2], inference=False)
    after_blocks = 100 + 10 + 0 + 0 + 3 * 30  # 200
    assert r.forward_peak == after_blocks + 500  # the head's high point on top
    assert r.after_forward == after_blocks + 200 - 150  # 250
    # backward: the head's 300 above 250, then each trainable block's 70 above what is left
    assert r.backward_peak == 250 + 300
    assert r.end == 250 - 40 - 3 * 20 - 100 - 10  # 40: three weight gradients of 10, and 10 more
    infer = replay(StepTrace(s), [0, 1, 1, 2, 2, 2], inference=True)
    assert infer.backward_peak == 0 and infer.end == infer.after_forward


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(5))
        self.head = nn.Linear(8, 10)


def test_reduced_copy_keeps_the_representatives_and_leaves_the_model_alone():
    model = _Stack()
    seen = []
    model.layers[3].register_forward_hook(lambda *a: seen.append(a))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reduced, kept, memo = reduced_copy(model, model.layers, [0, 3])
    assert len(kept) == 2 and reduced.layers is kept
    # every tensor of the copy is a meta placeholder: no weight is ever duplicated
    assert all(p.device.type == "meta" for p in reduced.parameters())
    assert memo[id(model.layers[3].weight)] is kept[1].weight
    # a user's hooks never reach the copy
    assert not kept[1]._forward_hooks and model.layers[3]._forward_hooks
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])
    assert len(model.layers) == 5
