"""Tests of layerscope.estimate.values: data-dependent operators on fake tensors."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from layerscope.errors import UnsupportedModelError
from layerscope.estimate.values import (
    ABOVE_THRESHOLD,
    BALANCED_ROUTING,
    RANDOM_DRAW,
    KnownConstants,
    KnownValues,
    balanced_choice,
)


def test_item_and_masks_of_known_tensors_are_answered_from_their_values():
    known = KnownValues()
    value = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])  # a real tensor: made outside
    with FakeTensorMode(), known:
        ids = torch.empty(2, 5, dtype=torch.long)
        known.know(ids, value)
        lengths = (ids != 1).sum(dim=1)  # computed from known values: known too
        assert lengths.max().item() == 5 and lengths.min().item() == 3
        hidden = torch.empty(2, 5, 8, requires_grad=True)
        known.know(hidden, None)  # an activation: its values are not known
        picked = hidden[ids == 5]  # the mask is known: 2 rows, whatever hidden holds
        assert picked.shape == (2, 8) and picked.grad_fn is not None
        picked.sum().backward()  # the backward indexes with the saved mask
        assert hidden.grad.shape == (2, 5, 8)
        assert torch.nonzero(ids == 1).shape == (2, 2)


def test_what_activations_decide_is_refused_and_their_checks_pass():
    known = KnownValues()
    with FakeTensorMode(), known:
        hidden, weight = torch.empty(4, 8), torch.empty(8, 8)
        known.know(weight, None)  # a parameter: its values are not known
        scores = hidden @ weight
        assert bool(~scores.isnan().any())  # a check on activations is taken to pass
        with pytest.raises(UnsupportedModelError, match=r"aten\.nonzero"):
            torch.nonzero(scores)


def test_layerdrop_draws_never_skip_a_layer():
    known = KnownValues()
    with FakeTensorMode(), known:
        draw = torch.rand([])
        value = known.value_of(draw)
        assert not bool(draw < 0.999)  # LayerDrop skips when the draw is below its rate
    assert value.item() == pytest.approx(RANDOM_DRAW)


def test_written_with_something_unknown_forgets_the_value():
    known = KnownValues()
    with FakeTensorMode(), known:
        mask = torch.arange(6) > 2
        assert known.value_of(mask) is not None
        weight = torch.empty(8, 1)
        known.know(weight, None)
        activation = torch.empty(6, 8) @ weight
        mask.copy_(activation.squeeze(1).bool())  # now it depends on the activation
        assert known.value_of(mask) is None


def test_tensor_of_known_scalars():
    known = KnownValues()
    with FakeTensorMode(), KnownConstants(known), known:
        a = torch.arange(4).sum()  # 6
        b = torch.arange(3).max()  # 2
        deltas = torch.tensor([a, b])  # reads its elements' values
        value = known.value_of(deltas)
    assert value.tolist() == [6, 2]


def test_shape_only_results_of_activations_and_indices_of_known_scalars():
    known = KnownValues()
    with FakeTensorMode(), KnownConstants(known), known:
        weight = torch.empty(4, 3)
        known.know(weight, None)
        embeds = torch.empty(2, 4) @ weight  # an activation, 2 x 3
        keep = torch.full_like(embeds, True).bool()  # its shape only: known
        pairs = torch.tensor([[0, 1], [1, 2]])
        rows, cols = zip(*pairs)  # tuples of 0-d tensors, as UDOP indexes its patch mask
        keep[rows, cols] = False  # clears (0, 1) and (1, 2)
        assert known.value_of(keep).tolist() == [[True, False, True], [True, True, False]]
        assert embeds[keep].shape == (4,)  # 6 - 2 kept, whatever the activation holds


def test_router_picks_from_activations_are_balanced():
    """JetMoE's router: top-k of the router's logits, scattered into a tokens x experts mask,
    summed per expert and read with ``tolist()``; Switch's: argmax, one-hot, the experts hit."""
    tokens, experts, top_k = 12, 4, 2
    known = KnownValues()
    with FakeTensorMode(), KnownConstants(known), known:
        router = torch.empty(8, experts)
        known.know(router, None)  # a parameter: its values are not known
        logits = torch.empty(tokens, 8) @ router
        _, picks = logits.topk(top_k, dim=1)
        gates = torch.zeros(tokens, experts).scatter(1, picks, 1)
        sizes = gates.long().sum(0).tolist()
        top1 = logits.argmax(dim=-1)
        hit = torch.nonzero(torch.nn.functional.one_hot(top1, experts).sum(0))
        name = f"expert_{hit[-1, 0]}"
    assert sizes == [tokens * top_k // experts] * experts  # 12 x 2 / 4 = 6 each
    assert hit.shape == (experts, 1) and name == "expert_3"
    assert known.assumptions == [BALANCED_ROUTING]


def test_balanced_choice_spreads_picks_evenly():
    picks = balanced_choice(5, 2, 3)  # 5 rows, 2 picks of 3: 10 picks, 4 + 3 + 3
    assert picks.tolist() == [[0, 1], [2, 0], [1, 2], [0, 1], [2, 0]]
    assert torch.bincount(picks.flatten()).tolist() == [4, 3, 3]


def test_thresholds_on_activations_are_taken_as_passed():
    """BLT starts a patch at every byte whose entropy is above a threshold: taken as passed
    everywhere, every one of the 10 bytes starts a patch."""
    known = KnownValues()
    with FakeTensorMode(), known:
        weight = torch.empty(8, 1)
        known.know(weight, None)
        entropy = (torch.empty(2, 10, 8) @ weight).squeeze(-1)
        starts = torch.arange(10).expand(2, 10)[entropy > 1.5]
        kept = torch.arange(10).expand(2, 10)[~(entropy <= 1.5)]  # <= taken as passed too
    assert starts.shape == (2 * 10,) and kept.shape == (0,)
    assert known.assumptions == [ABOVE_THRESHOLD]
