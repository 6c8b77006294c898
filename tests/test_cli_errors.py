"""The command line on bad input: exit 2 and one line, never a traceback, an overflow, or a
half-written file. In-process through ``cli.main`` (what the console script calls)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import LLAMA

from layerscope import cli

HUGE = "9" * 400


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA, "model_type": "llama"}))
    return str(path)


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code  # type: ignore[assignment]
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(code: int, err: str) -> bool:
    return code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["estimate", "{model}", "--batch-size", HUGE],
    ["estimate", "{model}", "--seq-len", HUGE],
    ["estimate", "{model}", "--lora-rank", HUGE],
    ["time", "{model}", "--batch-size", "1", "--samples", HUGE, "--epochs", "1"],
    ["time", "{model}", "--batch-size", "1", "--samples", "10", "--epochs", HUGE],
    ["time", "{model}", "--batch-size", "1", "--samples", "10", "--epochs", "1", "--num-gpus", HUGE],
    ["summary", "{model}", "--depth", HUGE],
    ["estimate", "{model}", "--batch-size", "9" * 5000],  # past Python's int-parsing limit
])
def test_a_huge_integer_is_a_usage_error(capsys, config, argv):
    code, _, err = run(capsys, [a.replace("{model}", config) for a in argv])
    assert usage_error(code, err), (code, err)
    assert "Overflow" not in err


@pytest.mark.parametrize("argv", [
    ["estimate", "{model}", "--seq-len", "16", "--gpu", ""],
    ["time", "{model}", "--batch-size", "1", "--samples", "10", "--epochs", "1", "--gpu", ""],
    ["estimate", "{model}", "--seq-len", "16", "--plan", ""],
    ["status", "{model}", "--plan", ""],
])
def test_an_empty_value_is_an_error_not_the_default(capsys, config, argv):
    code, out, err = run(capsys, [a.replace("{model}", config) for a in argv])
    assert usage_error(code, err), (code, err)
    assert out == ""


@pytest.mark.parametrize("layers", [0, -1])
def test_a_config_without_layers_is_refused(capsys, tmp_path, layers):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA, "model_type": "llama", "num_hidden_layers": layers}))
    code, _, err = run(capsys, ["estimate", str(path), "--seq-len", "16"])
    assert usage_error(code, err) and f"num_hidden_layers={layers}" in err, err


def _no_constants(name: str) -> None:
    raise AssertionError(f"not JSON: {name}")


def test_time_json_is_valid_json_even_past_the_float_range(capsys, config):
    """samples x epochs x price beyond 1.8e308: the cost is null, never Infinity."""
    most = str(2**53)
    code, out, err = run(capsys, ["time", config, "--batch-size", "1", "--seq-len", "16",
                                  "--samples", most, "--epochs", most, "--price-per-hour", "1e308",
                                  "--json"])
    assert code == 0, err
    doc = json.loads(out, parse_constant=_no_constants)
    assert doc["training"]["cost"] is None
    assert doc["training"]["total_seconds"] > 0


def test_report_leaves_an_existing_file_untouched_when_it_fails(capsys, config, tmp_path, monkeypatch):
    from layerscope.render import report

    target = tmp_path / "report.html"
    target.write_text("the previous report")

    def broken(doc: dict) -> str:
        raise RuntimeError("rendering failed")

    monkeypatch.setattr(report, "report_html", broken)
    code, _, err = run(capsys, ["report", config, "--seq-len", "16", "--html", str(target)])
    assert code == 1 and "rendering failed" in err
    assert target.read_text() == "the previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "report.html"]  # no temporary left


def test_report_to_an_empty_name_is_refused_before_the_work(capsys, config):
    code, _, err = run(capsys, ["report", config, "--html", ""])
    assert usage_error(code, err), err
