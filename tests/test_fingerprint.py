"""Plans record the model they were resolved against, and plan files are read defensively."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import GPT2, LLAMA, PlainNet, build, flags
from torch import nn

from layerscope import FreezePlan, LayerscopeWarning, PlanError, apply_plan, freeze_by_name, scan
from layerscope.fingerprint import ModelFingerprint


def test_a_resolved_plan_records_the_model_and_to_json_writes_it():
    model = build("llama", "meta")
    res = FreezePlan.first(2).resolve(model)
    assert res.plan is not None
    fp = res.plan.model
    assert (fp.architecture, fp.num_layers) == ("LlamaForCausalLM", LLAMA["num_hidden_layers"])
    assert fp.num_params == len(list(model.named_parameters(remove_duplicate=False)))
    data = json.loads(res.plan.to_json())
    assert data["model"] == fp.to_dict() and data["num_layers"] == 4
    assert FreezePlan.from_json(res.plan.to_json()) == res.plan
    assert FreezePlan.first(2).bind(model) == res.plan


def test_a_plan_made_for_one_model_refuses_another_unless_strict_is_false():
    llama, gpt2 = build("llama", "meta"), build("gpt2", "meta")  # both have 4 blocks
    assert GPT2["n_layer"] == LLAMA["num_hidden_layers"]
    plan = FreezePlan.from_json(FreezePlan.first(2).bind(llama).to_json())
    with pytest.raises(PlanError, match="another model.*LlamaForCausalLM vs GPT2LMHeadModel"):
        plan.resolve(gpt2)
    before = flags(gpt2)
    with pytest.raises(PlanError, match="strict=False"):
        apply_plan(gpt2, plan)
    assert flags(gpt2) == before
    res = apply_plan(gpt2, plan, strict=False)
    assert res.frozen == {n for n in flags(gpt2) if n.startswith(("transformer.h.0.", "transformer.h.1."))}


def test_same_architecture_other_shapes_is_another_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    plan = FreezePlan.first(1).bind(build("llama", "meta"))
    with torch.device("meta"):
        wider = AutoModelForCausalLM.from_config(LlamaConfig(**{**LLAMA, "intermediate_size": 96}))
    with pytest.raises(PlanError, match="parameter names or shapes differ"):
        plan.resolve(wider)


def test_skeleton_and_real_model_have_one_fingerprint():
    meta, real = build("gpt2", "meta"), build("gpt2", "cpu")
    assert ModelFingerprint.of(scan(meta)) == ModelFingerprint.of(scan(real))
    plan = FreezePlan.first(1).bind(meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerscopeWarning)
        assert apply_plan(real, plan).frozen == plan.resolve(meta).frozen


def test_a_data_parallel_wrapper_keeps_the_fingerprint():
    model = PlainNet()
    wrapped = nn.DataParallel(model)  # names gain "module.", as with DDP and DeepSpeed
    assert ModelFingerprint.of(scan(wrapped)) == ModelFingerprint.of(scan(model))


def test_apply_plan_with_a_scan_of_another_model_changes_nothing():
    model = build("llama", "meta")
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):  # same names for blocks 0-3, and a block 4 the model lacks
        bigger = AutoModelForCausalLM.from_config(LlamaConfig(**{**LLAMA, "num_hidden_layers": 5}))
    for p in model.parameters():
        p.requires_grad_(False)
    before = flags(model)
    with pytest.raises(PlanError, match="scan of this LlamaForCausalLM"):
        apply_plan(model, FreezePlan.first(2), scan(bigger))
    assert flags(model) == before
    assert apply_plan(model, FreezePlan.first(2), scan(model)).frozen_params > 0


def test_freeze_by_name_refuses_an_empty_pattern_and_non_models():
    model = build("llama", "meta")
    before = flags(model)
    for patterns in ("", ["mlp", ""]):
        with pytest.raises(PlanError, match="empty pattern matches every parameter"):
            freeze_by_name(model, patterns)
    with pytest.raises(PlanError, match="case_sensitive must be a bool"):
        freeze_by_name(model, "mlp", case_sensitive="no")
    assert flags(model) == before
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        freeze_by_name(None, "mlp")


@pytest.mark.parametrize("value", [None, 5, b"x", {"a": 1}])
def test_plan_constructors_refuse_non_lists(value):
    with pytest.raises(PlanError):
        FreezePlan.names(value)
    with pytest.raises(PlanError):
        FreezePlan.regex(value)
    with pytest.raises(PlanError):
        FreezePlan(value)


HAND_EDITED = [
    "",
    '{"layerscope_plan": 1, "rules": [{"kind": "first"',  # truncated
    "[" * 100_000 + "]" * 100_000,  # nested deeper than the parser recurses
    '{"layerscope_plan": 1, "rules": 5}',
    '{"layerscope_plan": 1, "rules": ["first"]}',
    '{"layerscope_plan": 1, "rules": [["kind", "first"]]}',
    '{"layerscope_plan": 1, "rules": [{"kind": ["first"]}]}',
    '{"layerscope_plan": 1, "rules": [{"kind": "first", "n": "2"}]}',
    '{"layerscope_plan": 1, "rules": [{"kind": "first", "m": 2}]}',
    '{"layerscope_plan": 1, "rules": [{"kind": "regex", "patterns": ["a"], "case_sensitive": "no"}]}',
    '{"layerscope_plan": 1, "rules": [{"kind": "regex", "patterns": "("}]}',
    '{"layerscope_plan": 1, "rules": [{"kind": "lp-lora", "ratio": NaN}]}',
    '{"layerscope_plan": 1, "rules": [], "num_layers": "4"}',
    '{"layerscope_plan": 1, "rules": [], "num_layers": 4, "model": {"architecture": 1}}',
    '{"layerscope_plan": 1, "rules": [], "num_layers": 3, '
    '"model": {"architecture": "X", "num_layers": 4, "num_params": 1, "digest": "ab"}}',
    '{"layerscope_plan": 2}',
    '[1, 2]',
]


@pytest.mark.parametrize("text", HAND_EDITED)
def test_hand_edited_plan_json_is_a_plan_error(text):
    with pytest.raises(PlanError):
        FreezePlan.from_json(text)


def test_bad_plan_file_is_a_usage_error_on_the_command_line(tmp_path, capsys):
    from layerscope import cli

    config = tmp_path / "config.json"
    config.write_text(json.dumps({**LLAMA, "model_type": "llama"}))
    for i, text in enumerate(HAND_EDITED[:6]):
        plan = tmp_path / f"plan{i}.json"
        plan.write_text(text)
        assert cli.main(["status", str(config), "--plan", str(plan)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("layerscope status: error:"), err
