import warnings

import pytest
import torch
from conftest import build, flags

from layerscope import FreezePlan, GradualUnfreezer, LayerscopeWarning, scan


def trainable_blocks(model):
    s = scan(model)
    return [all(s.by_name[n].requires_grad for n in s.block_names(i)) for i in range(s.num_layers)]


def test_schedule_unfreezes_from_the_top_and_never_refreezes():
    model = build("llama", "meta")  # 4 blocks
    unfreezer = GradualUnfreezer(model, total_epochs=5, verbose=False)
    seen = []
    for epoch in range(5):
        unfreezer.step(epoch)
        seen.append(trainable_blocks(model))
    # top L*e//(E-1) blocks train: 0, 1, 2, 3, 4
    assert seen == [
        [False] * 4,
        [False, False, False, True],
        [False, False, True, True],
        [False, True, True, True],
        [True] * 4,
    ]
    assert model.model.embed_tokens.weight.requires_grad is False  # frozen throughout
    unfreezer.step(9)  # past the schedule: everything but the embeddings trains
    assert all(trainable_blocks(model))


def test_epoch_zero_trains_only_the_head_side():
    model = build("llama", "meta")
    GradualUnfreezer(model, 3, verbose=False).step(0)
    assert {n for n, f in flags(model).items() if f} == {"model.norm.weight", "lm_head.weight"}


def test_embeddings_unfreeze_at_the_given_epoch():
    model = build("llama", "meta")
    unfreezer = GradualUnfreezer(model, 10, unfreeze_embeddings_at=3, verbose=False)
    unfreezer.step(2)
    assert not model.model.embed_tokens.weight.requires_grad
    unfreezer.step(3)
    assert model.model.embed_tokens.weight.requires_grad
    assert trainable_blocks(model) == [False, False, False, True]  # 4*3//9 = 1
    GradualUnfreezer(model, 10, freeze_embeddings=False, verbose=False).step(0)
    assert model.model.embed_tokens.weight.requires_grad


def test_tied_head_trains_from_epoch_zero_with_a_warning():
    model = build("gpt2", "meta")
    with pytest.warns(LayerscopeWarning, match="stays trainable"):
        GradualUnfreezer(model, 4, verbose=False).step(0)
    assert model.lm_head.weight.requires_grad and not model.transformer.wpe.weight.requires_grad


def test_step_is_stateless_and_resumable(capsys):
    a, b = build("llama", "meta"), build("llama", "meta")
    first = GradualUnfreezer(a, 5)
    for epoch in range(4):
        first.step(epoch)
    assert "epoch 3: top 3/4 blocks trainable" in capsys.readouterr().out
    second = GradualUnfreezer(b, 1 + 1, verbose=False)
    second.load_state_dict(first.state_dict())  # resume: re-applies epoch 3
    assert flags(a) == flags(b)
    assert second.state_dict() == first.state_dict()
    first.step(1)  # going back sets epoch 1 from scratch
    assert trainable_blocks(a) == [False, False, False, True]


def test_plan_of_any_epoch_matches_step():
    model = build("llama", "meta")
    unfreezer = GradualUnfreezer(model, 4, verbose=False)
    plan = unfreezer.plan(2)
    assert isinstance(plan, FreezePlan) and plan.num_layers == 4
    unfreezer.step(2)
    assert {n for n, f in flags(model).items() if not f} == plan.resolve(model).frozen


def test_bad_arguments():
    model = build("llama", "meta")
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="total_epochs"):
            GradualUnfreezer(model, bad)
    with pytest.raises(ValueError, match="unfreeze_embeddings_at"):
        GradualUnfreezer(model, 4, unfreeze_embeddings_at=-1)
    unfreezer = GradualUnfreezer(model, 4, verbose=False)
    before = flags(model)
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        unfreezer.step(-1)
    with pytest.raises(ValueError, match="this model has 4"):
        unfreezer.load_state_dict({"num_layers": 7})
    assert flags(model) == before


def _train_step(model, optimizer):
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_optimizer_built_before_unfreezing_updates_unfrozen_blocks():
    """Give the optimizer every parameter up front: frozen ones get no grad and are skipped,
    and they start updating as soon as a later epoch unfreezes them."""
    torch.manual_seed(0)
    model = build("llama", "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    unfreezer = GradualUnfreezer(model, 5, verbose=False)
    block0 = model.model.layers[0].mlp.up_proj.weight
    start = block0.detach().clone()
    unfreezer.step(0)
    _train_step(model, optimizer)
    assert torch.equal(block0.detach(), start)  # frozen: untouched
    unfreezer.step(4)
    _train_step(model, optimizer)
    assert not torch.equal(block0.detach(), start)  # unfrozen: really updated


def test_optimizer_of_only_trainable_params_misses_later_blocks():
    """The documented pitfall: parameters left out of the optimizer never update."""
    model = build("llama", "cpu")
    unfreezer = GradualUnfreezer(model, 5, verbose=False)
    unfreezer.step(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    block0 = model.model.layers[0].mlp.up_proj.weight
    start = block0.detach().clone()
    unfreezer.step(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train_step(model, optimizer)
    assert torch.equal(block0.detach(), start)
