import json

import pytest
from conftest import PlainNet, build

from layerscope import FreezePlan, PlanError, scan
from layerscope.plan import Embeddings, ExceptLast, First, Regex


@pytest.fixture(scope="module")
def gpt2():
    return build("gpt2", "meta")


@pytest.fixture(scope="module")
def llama():
    return build("llama", "meta")


def block_names(model, indices):
    s = scan(model)
    return {n for i in indices for n in s.block_names(i)}


def test_first_last_resolve_to_exact_block_names(llama):
    assert FreezePlan.first(2).resolve(llama).frozen == block_names(llama, [0, 1])
    assert FreezePlan.last(1).resolve(llama).frozen == block_names(llama, [3])
    assert FreezePlan.first(0).resolve(llama).frozen == frozenset()
    assert len(FreezePlan.first(4).resolve(llama).frozen) == 4 * 9


def test_except_last_keeps_last_blocks_and_head(llama):
    res = FreezePlan.except_last(1).resolve(llama)
    kept = block_names(llama, [3]) | {"model.norm.weight", "lm_head.weight"}
    assert res.trainable == kept
    assert res.warnings == ()


def test_except_last_keeps_a_tied_head_trainable_and_says_so(gpt2):
    res = FreezePlan.except_last(1).resolve(gpt2)
    assert "transformer.wte.weight" in res.trainable and "lm_head.weight" in res.trainable
    assert "transformer.wpe.weight" in res.frozen
    assert any("stays trainable" in w for w in res.warnings)


def test_embeddings_freeze_a_tied_head_too(gpt2):
    res = FreezePlan.embeddings().resolve(gpt2)
    assert res.frozen == {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    assert res.frozen_params == 100 * 64 + 32 * 64  # the shared tensor counted once
    assert any("freezes the head too" in w for w in res.warnings)
    kept = FreezePlan.embeddings(keep_tied_head=True).resolve(gpt2)
    assert kept.frozen == {"transformer.wpe.weight"}


def test_regex_on_one_alias_freezes_the_tensor_and_says_so(gpt2):
    res = FreezePlan.regex(r"^lm_head\.").resolve(gpt2)
    assert res.frozen == {"lm_head.weight", "transformer.wte.weight"}
    assert res.warnings == ("lm_head.weight is tied to transformer.wte.weight: both are frozen",)


def test_regex_case_and_errors(llama):
    assert FreezePlan.regex("Q_PROJ", case_sensitive=False).resolve(llama).frozen == {
        f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)
    }
    with pytest.raises(PlanError, match="no parameter name matches.*names look like: model.embed"):
        FreezePlan.regex("Q_PROJ").resolve(llama)
    with pytest.raises(PlanError, match=r"invalid regular expression '\(unclosed'"):
        FreezePlan.regex(["q_proj", "(unclosed"])
    res = FreezePlan.regex(["q_proj", "nothing_here"]).resolve(llama)
    assert res.warnings == ("regex: pattern 'nothing_here' matches no parameter",)


def test_lp_lora_is_first_int_ratio_blocks_plus_embeddings(llama):
    res = FreezePlan.lp_lora(0.75).resolve(llama)  # int(4 * 0.75) = 3 blocks
    assert res.frozen == block_names(llama, [0, 1, 2]) | {"model.embed_tokens.weight"}
    no_embed = FreezePlan.lp_lora(0.5, freeze_embed=False).resolve(llama)
    assert no_embed.frozen == block_names(llama, [0, 1])
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(PlanError, match="freeze_ratio"):
            FreezePlan.lp_lora(bad)


def test_union_and_counts(llama):
    plan = FreezePlan.first(1) | FreezePlan.embeddings()
    assert plan == FreezePlan.first(1) + FreezePlan.embeddings()
    res = plan.resolve(llama)
    assert res.frozen_params == 36_992 + 6_400
    assert res.trainable_params == scan(llama).total_params - res.frozen_params
    assert (plan | plan).rules == plan.rules  # duplicates collapse


def test_bad_n_states_the_layer_count(llama):
    with pytest.raises(PlanError, match=r"n=5 but the model has 4 layers \(model.layers\); allowed: 0..4"):
        FreezePlan.first(5).resolve(llama)
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(PlanError):
            FreezePlan.last(bad)


def test_plan_for_another_model_is_an_error(llama, gpt2):
    plan = FreezePlan.first(2).for_layers(32)
    with pytest.raises(PlanError, match="made for a model with 32 layers"):
        plan.resolve(llama)
    with pytest.raises(PlanError, match="not in this model"):
        FreezePlan.names(["model.layers.0.mlp.up_proj.weight"]).resolve(gpt2)
    with pytest.raises(PlanError, match="cannot combine"):
        FreezePlan.first(1).for_layers(4) | FreezePlan.last(1).for_layers(8)


def test_json_round_trip():
    plan = (
        FreezePlan.first(3) | FreezePlan.regex(["attn", "mlp"], case_sensitive=False)
        | FreezePlan.embeddings(keep_tied_head=True) | FreezePlan.lp_lora(0.25)
        | FreezePlan.names(["b", "a"]) | FreezePlan((ExceptLast(2, keep_embeddings=True),))
    ).for_layers(12)
    data = json.loads(plan.to_json())
    assert data["layerscope_plan"] == 1 and data["num_layers"] == 12
    assert data["rules"][0] == {"kind": "first", "n": 3}
    assert FreezePlan.from_json(plan.to_json()) == plan
    with pytest.raises(PlanError, match="malformed"):
        FreezePlan.from_json("{nope")
    with pytest.raises(PlanError, match="unknown plan rule 'middle'"):
        FreezePlan.from_dict({"layerscope_plan": 1, "rules": [{"kind": "middle"}]})
    with pytest.raises(PlanError, match="bad fields"):
        FreezePlan.from_dict({"layerscope_plan": 1, "rules": [{"kind": "first", "m": 1}]})


def test_parse_grammar(tmp_path):
    assert FreezePlan.parse("first:16+embeddings") == FreezePlan.first(16) | FreezePlan.embeddings()
    assert FreezePlan.parse("none") == FreezePlan()
    assert FreezePlan.parse("lp-lora") == FreezePlan.lp_lora(0.5)
    assert FreezePlan.parse("lp-lora:0.25").rules == (FreezePlan.lp_lora(0.25).rules[0],)
    assert FreezePlan.parse("except-last:4").rules == (ExceptLast(4),)
    rules = FreezePlan.parse(r"regex:h\.\d+\.attn+last:2").rules
    assert rules == (Regex((r"h\.\d+\.attn",)), FreezePlan.last(2).rules[0])
    assert FreezePlan.parse("regex:a+b").rules == (Regex(("a+b",)),)  # '+' inside a regex
    path = tmp_path / "plan.json"
    path.write_text(FreezePlan.first(2).to_json())
    assert FreezePlan.parse(str(path) + "+embeddings").rules == (First(2), Embeddings())
    for bad in ("", "first", "first:x", "middle:3", "lp-lora:lots", str(tmp_path / "missing.json")):
        with pytest.raises(PlanError):
            FreezePlan.parse(bad)


def test_plain_module_plans():
    model = PlainNet()
    assert FreezePlan.except_last(1).resolve(model).trainable == {
        "blocks.2.fc.weight", "blocks.2.fc.bias", "blocks.2.norm.weight", "blocks.2.norm.bias",
        "norm.weight", "norm.bias", "head.weight", "head.bias",
    }
    assert str(FreezePlan.parse("first:1+embeddings")) == "first:1+embeddings"


def test_str_round_trips_through_parse():
    from layerscope.plan import ExceptLast

    plans = [
        FreezePlan.none(), FreezePlan.all(), FreezePlan.first(3), FreezePlan.last(2),
        FreezePlan.except_last(1), FreezePlan((ExceptLast(2, keep_embeddings=True),)),
        FreezePlan.embeddings(), FreezePlan.embeddings(keep_tied_head=True),
        FreezePlan.lp_lora(), FreezePlan.lp_lora(1 / 3, freeze_embed=False),
        FreezePlan.regex(["attn", r"mlp\.c_fc+"]), FreezePlan.regex("ATTN", case_sensitive=False),
        FreezePlan.names(["transformer.h.0.ln_1.weight", "lm_head.weight"]),
        FreezePlan.first(2) | FreezePlan.embeddings() | FreezePlan.regex("norm"),
    ]
    for plan in plans:
        assert FreezePlan.parse(str(plan)) == plan, str(plan)
