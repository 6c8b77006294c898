"""Random and truncated plan files, configs and command lines: only LayerscopeError comes out
(the command line: exit 2 and one line). Hypothesis, derandomised so CI is reproducible, with a
few hundred examples in all."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from conftest import GPT2, LLAMA, build
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerscope import FreezePlan, LayerscopeError, cli, empty_model, scan

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

KEYS = ["layerscope_plan", "rules", "num_layers", "model", "kind", "n", "patterns", "names",
        "ratio", "keep_embeddings", "keep_tied_head", "case_sensitive", "freeze_embed",
        "architecture", "num_params", "digest"]
KINDS = ["all", "first", "last", "except-last", "embeddings", "regex", "names", "lp-lora", "x"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10), st.integers(), st.floats(allow_nan=True),
    st.sampled_from(KINDS), st.text(max_size=8), st.sampled_from(["mlp", "(", "", ".*", "model.norm.weight"]),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=5)),
    max_leaves=20,
)
RULE = st.fixed_dictionaries({"kind": st.sampled_from(KINDS)},
                             optional={k: SCALARS for k in KEYS[5:13]})
PLAN = st.fixed_dictionaries(
    {"layerscope_plan": st.sampled_from([1, 1, 1, 2, "1", True])},
    optional={"rules": st.one_of(st.lists(RULE, max_size=4), JSON), "num_layers": SCALARS,
              "model": JSON},
)

SCAN = scan(build("llama", "meta"))


@settings(FUZZ, max_examples=150)
@given(st.one_of(PLAN.map(json.dumps), JSON.map(json.dumps), st.text(max_size=60)),
       st.integers(0, 200))
def test_random_and_truncated_plan_json(text, cut):
    for candidate in (text, text[:cut]):
        try:
            plan = FreezePlan.from_json(candidate)
        except LayerscopeError:
            continue
        assert FreezePlan.from_json(plan.to_json()) == plan
        with contextlib.suppress(LayerscopeError):
            plan.resolve(SCAN)


SIZE = st.one_of(st.integers(-3, 6), st.integers(), st.floats(allow_nan=True), st.none(),
                 st.booleans(), st.text(max_size=4), st.lists(st.integers(0, 3), max_size=2))


@settings(FUZZ, max_examples=80)
@given(st.sampled_from([("llama", LLAMA), ("gpt2", GPT2)]),
       st.dictionaries(st.sampled_from(sorted({*LLAMA, *GPT2, "architectures", "torch_dtype",
                                               "model_type", "tie_word_embeddings"})),
                       SIZE | st.sampled_from([["LlamaForCausalLM"], ["Nope"], "float16", "llama"]),
                       max_size=3))
def test_random_configs(base, changes):
    model_type, fields = base
    with contextlib.suppress(LayerscopeError):
        empty_model({**fields, "model_type": model_type, **changes})


BAD_INT = st.sampled_from(["0", "-1", "9" * 400, "1.5", "", "x", "1e3", "２"])
OPTIONS = {
    "--batch-size": BAD_INT | st.sampled_from(["1", "2"]),
    "--seq-len": BAD_INT | st.sampled_from(["8", "16"]),
    "--lora-rank": BAD_INT | st.just("2"),
    "--plan": st.sampled_from(["", "first:2", "first:9", "all", "regex:(", "regex:", "names:x",
                               "lp-lora:2", "first:2+embeddings", "nope", "/nonexistent.json"]),
    "--precision": st.sampled_from(["", "bf16", "fp64", "bf16-mixed"]),
    "--optimizer": st.sampled_from(["", "adamw", "sgdd"]),
    "--attn": st.sampled_from(["", "eager", "flash"]),
    "--gpu": st.sampled_from(["", "h1000", "9" * 400]),
}


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("fuzz") / "config.json"
    path.write_text(json.dumps({**LLAMA, "model_type": "llama", "num_hidden_layers": 2}))
    return str(path)


@settings(FUZZ, max_examples=60)
@given(st.sampled_from(["estimate", "status", "summary"]),
       st.sampled_from(["{model}", "", "nope", "a" * 300, "/nonexistent/config.json"]),
       st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=3).flatmap(
           lambda keys: st.fixed_dictionaries({k: OPTIONS[k] for k in keys})))
def test_random_command_lines(capsys, config_path, command, model, options):
    allowed = {"estimate": set(OPTIONS), "status": {"--plan"}, "summary": set()}[command]
    argv = [command, model.replace("{model}", config_path)]
    for key, value in options.items():
        if key in allowed:
            argv += [f"{key}={value}"]
    try:
        code = cli.main(argv)
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, code, err[-500:])
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("layerscope"), (argv, err)
    assert "Traceback" not in err and "failed:" not in err, (argv, err)


def test_plan_file_fuzz_reaches_the_command_line(capsys, config_path, tmp_path: Path):
    """One plan file per kind of damage, through --plan: exit 2 and one line."""
    good = FreezePlan.first(1).bind(build("llama", "meta")).to_json()
    for i, text in enumerate([good[: len(good) // 2], good.replace('"first"', '"frist"'),
                              good.replace('"n": 1', '"n": "1"'), "[" * 50_000]):
        path = tmp_path / f"plan{i}.json"
        path.write_text(text)
        code = cli.main(["status", config_path, "--plan", str(path)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
