import warnings

import pytest
import torch
from conftest import build, flags

from layerscope import FreezePlan, LayerscopeWarning, ModelTypeError, PlanError, apply_plan


def test_apply_sets_exactly_the_plan(device):
    model = build("llama", device)
    for p in model.parameters():
        p.requires_grad_(False)
    res = apply_plan(model, FreezePlan.first(3))
    state = flags(model)
    assert {n for n, f in state.items() if not f} == res.frozen
    assert all(state[n] for n in res.trainable)


def test_failing_plan_leaves_the_model_as_it_was():
    model = build("llama", "meta")
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before = flags(model)
    with pytest.raises(PlanError):
        apply_plan(model, FreezePlan.first(1) | FreezePlan.last(9))
    with pytest.raises(PlanError):
        apply_plan(model, FreezePlan.regex("nowhere"))
    with pytest.raises(PlanError, match="expected a FreezePlan"):
        apply_plan(model, "first:1")
    with pytest.raises(ModelTypeError):
        apply_plan(object(), FreezePlan.first(1))
    assert flags(model) == before


def test_tied_alias_warning_is_emitted():
    model = build("gpt2", "meta")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_plan(model, FreezePlan.regex("lm_head"))
    assert [str(w.message) for w in caught if w.category is LayerscopeWarning] == [
        "lm_head.weight is tied to transformer.wte.weight: both are frozen"
    ]
    assert model.transformer.wte.weight.requires_grad is False


def test_same_plan_on_skeleton_and_real_model():
    plan = FreezePlan.parse("lp-lora+regex:attn")
    meta, real = build("gpt2", "meta"), build("gpt2", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerscopeWarning)
        assert apply_plan(meta, plan) == apply_plan(real, plan)
    assert flags(meta) == flags(real)


def test_apply_never_touches_weights():
    model = build("gpt2", "cpu")
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerscopeWarning)
        apply_plan(model, FreezePlan.parse("first:2+embeddings"))
        apply_plan(model, FreezePlan.none())
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
