"""The ``layerscope`` command line: each command run as a subprocess, JSON schemas, bad input.

Subprocesses (about 4 s of imports each) are kept to one per command and a few error cases;
variants run in-process through ``cli.main``, which is what the console script calls.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from layerscope import cli
from layerscope.estimate.hardware import get_gpu
from layerscope.estimate.memory import CUDA_CONTEXT_BYTES

ROOT = Path(__file__).resolve().parents[1]
NUMBER = (int, float)
OPTIONAL_INT, OPTIONAL_NUMBER = (int, type(None)), (int, float, type(None))

ESTIMATE = {
    "peak_bytes": int, "peak_phase": str, "reserved_bytes": int, "required_bytes": int,
    "weights_bytes": int,
    "gradient_bytes": int, "optimizer_state_bytes": int, "optimizer_temporary_bytes": int,
    "activation_bytes": int, "activation_bytes_per_block": [int], "logits_bytes": int,
    "forward_peak_bytes": int, "backward_peak_bytes": int, "optimizer_peak_bytes": int,
    "trainable_params": int, "total_params": int, "forward_flops": int, "backward_flops": int,
    "quantized_base_bytes": int, "paged_optimizer_bytes": int,
    "inputs": [str],
}
SETTINGS = {"batch_size": int, "seq_len": int, "precision": str, "optimizer": str,
            "gradient_checkpointing": bool, "lora_rank": OPTIONAL_INT,
            "attn_implementation": str, "experts_implementation": (str, type(None)),
            "inference": bool, "distributed": (str, type(None)),
            "num_gpus": int, "gpus_per_node": int, "offload": (str, type(None)),
            "quantization": (dict, type(None)), "base_dtype": str,
            "lora_dtype": (str, type(None)), "prepare_kbit": bool,
            "gradient_accumulation_steps": int,
            "target_len": OPTIONAL_INT, "images": OPTIONAL_INT, "image_size": OPTIONAL_INT}
HEADER = {
    "layerscope_version": str, "schema_version": int, "command": str,
    "model": {"name": str, "class": str, "total_params": int, "num_layers": OPTIONAL_INT},
    "settings": SETTINGS,
    "plan": {"text": str, "json": (dict, type(None)), "lora_rank": OPTIONAL_INT,
             "lora_targets": int, "frozen_params": int, "warnings": [str]},
}
GPU = {"name": str, "full_name": str, "memory_bytes": int, "price_per_hour": OPTIONAL_NUMBER}
ASSUMPTIONS = {"cuda_context_bytes": int, "rule": str}
VERDICT = {"gpu": str, "fits": bool, "required_bytes": int, "available_bytes": int,
           "margin_bytes": int}
SUGGESTION = {"change": str, "kind": str, "plan": str, "settings": SETTINGS, "peak_bytes": int,
              "reserved_bytes": int, "required_bytes": int, "fits": bool, "margin_bytes": int,
              "step_seconds": OPTIONAL_NUMBER, "time_per_token_ratio": OPTIONAL_NUMBER}
ESTIMATE_DOC = {**HEADER, "estimate": ESTIMATE, "full_finetune": ESTIMATE,
                "gpu": (dict, type(None)), "assumptions": ASSUMPTIONS,
                "verdict": (dict, type(None)), "suggestions": [SUGGESTION],
                "fits_on": [{"gpu": str, "memory_bytes": int}]}
STEP = {"seconds": float, "low_seconds": float, "high_seconds": float, "regime": str,
        "band_coverage": float, "forward_seconds": float, "backward_seconds": float,
        "recompute_seconds": float, "optimizer_seconds": float, "flops": NUMBER, "tokens": int,
        "tokens_per_second": float, "gpu": str}
TRAINING = {"samples": int, "epochs": int, "num_gpus": int, "gpu": str, "steps_per_epoch": int,
            "total_steps": int, "total_seconds": float, "low_seconds": float,
            "high_seconds": float, "gpu_hours": float,
            "price_per_hour": OPTIONAL_NUMBER, "cost": OPTIONAL_NUMBER,
            "tokens_per_second": float, "step": STEP, "lengths": (dict, type(None))}
BATCHING = {"steps_per_epoch": int, "longest_seq_len": int, "real_tokens": int,
            "padding_tokens": float, "padding_share": float, "truncated_tokens": int,
            "total_seconds": float, "low_seconds": float, "high_seconds": float,
            "peak_bytes": int, "required_bytes": int}
TIME_DOC = {**HEADER, "gpu": GPU, "training": TRAINING, "estimate": ESTIMATE,
            "assumptions": ASSUMPTIONS, "verdict": VERDICT}
FIT_DOC = {**HEADER, "gpu": GPU, "assumptions": ASSUMPTIONS, "max_batch_size": int,
           "at_max": (dict, type(None)), "above_max": (dict, type(None)),
           "step": (dict, type(None)), "suggestions": [SUGGESTION]}


def check(value: Any, schema: Any, where: str = "$") -> None:
    """``value`` has every key of ``schema`` with the right type (nested dicts, lists of one
    item schema); ``bool`` never passes for ``int``."""
    if isinstance(schema, dict):
        assert isinstance(value, dict), f"{where}: expected an object, got {value!r}"
        missing = set(schema) - set(value)
        assert not missing, f"{where}: missing keys {sorted(missing)}"
        for key, sub in schema.items():
            check(value[key], sub, f"{where}.{key}")
    elif isinstance(schema, list):
        assert isinstance(value, list), f"{where}: expected a list, got {value!r}"
        for i, item in enumerate(value):
            check(item, schema[0], f"{where}[{i}]")
    else:
        types = schema if isinstance(schema, tuple) else (schema,)
        assert isinstance(value, types) and not (
            isinstance(value, bool) and bool not in types
        ), f"{where}: {value!r} is not {types}"


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m layerscope ARGS`` in a subprocess, with this checkout first on the path."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    inherited = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    environ = {**inherited, "PYTHONPATH": path, **env}
    return subprocess.run([sys.executable, "-m", "layerscope", *args], capture_output=True,
                          text=True, env=environ, timeout=300)


def main(*args: str) -> int:
    """``cli.main`` in-process; argparse's SystemExit becomes the exit code."""
    try:
        return cli.main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert "Traceback" not in stderr
    return lines[0]


def required(e: dict) -> int:
    """The fit rule, worked out here: reserved memory + 512 MiB of CUDA context."""
    return e["reserved_bytes"] + 512 * 2**20


# -- every command as a subprocess -----------------------------------------------------------
def test_presets_summary_status_subprocess():
    done = run("presets", "--json")
    assert done.returncode == 0, done.stderr
    names = json.loads(done.stdout)
    assert {"gpt2", "llama-3.2-1b", "llama-3.1-8b"} <= set(names)
    done = run("summary", "gpt2", "--depth", "2")
    assert done.returncode == 0 and "Total Parameters: 124,439,808" in done.stdout
    done = run("status", "gpt2", "--plan", "first:6")
    assert done.returncode == 0
    assert "Layer 0-5:  FROZEN" in done.stdout and "Layer 6-11: ACTIVE" in done.stdout


@pytest.fixture(scope="module")
def not_fitting() -> dict[str, Any]:
    """llama-3.2-1b, LP-LoRA, batch 4 x 2048 on a 24 GB L4: does not fit."""
    done = run("estimate", "llama-3.2-1b", "--plan", "lp-lora", "--gpu", "l4",
               "--batch-size", "4", "--json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return json.loads(done.stdout)


def test_estimate_json_schema_and_arithmetic(not_fitting):
    doc = not_fitting
    check(doc, ESTIMATE_DOC)
    check(doc["gpu"], GPU)
    check(doc["verdict"], VERDICT)
    assert doc["command"] == "estimate" and doc["schema_version"] == 1
    assert doc["model"] == {"name": "llama-3.2-1b", "class": "LlamaForCausalLM",
                            "total_params": doc["model"]["total_params"], "num_layers": 16}
    assert doc["settings"] == {"batch_size": 4, "seq_len": 2048, "precision": "bf16-mixed",
                               "optimizer": "adamw", "gradient_checkpointing": False,
                               "lora_rank": None, "attn_implementation": "sdpa",
                               "experts_implementation": None, "inference": False,
                               "distributed": None, "num_gpus": 1, "gpus_per_node": 8,
                               "offload": None, "quantization": None, "base_dtype": "float32",
                               "lora_dtype": None, "prepare_kbit": False,
                               "gradient_accumulation_steps": 1, "target_len": None,
                               "images": None, "image_size": None, "audio_seconds": None}
    assert doc["plan"]["text"] == "lp-lora:0.5"
    assert doc["plan"]["json"]["rules"] == [{"kind": "lp-lora", "ratio": 0.5, "freeze_embed": True}]
    e, full, v = doc["estimate"], doc["full_finetune"], doc["verdict"]
    assert e["required_bytes"] == required(e)
    assert e["reserved_bytes"] >= e["peak_bytes"]
    assert e["peak_bytes"] == max(e["forward_peak_bytes"], e["backward_peak_bytes"],
                                  e["optimizer_peak_bytes"])
    assert len(e["activation_bytes_per_block"]) == 16
    # full fine-tuning trains every parameter and needs more memory than LP-LoRA
    assert full["trainable_params"] == full["total_params"] == doc["model"]["total_params"]
    assert e["trainable_params"] == full["total_params"] - doc["plan"]["frozen_params"]
    assert full["peak_bytes"] > e["peak_bytes"]
    # the verdict is the fit rule against the catalogue's L4 (23034 MiB)
    assert v["available_bytes"] == 23034 * 2**20 == doc["gpu"]["memory_bytes"]
    assert v["margin_bytes"] == v["available_bytes"] - v["required_bytes"]
    assert v["fits"] is False and v["margin_bytes"] < 0
    assert doc["assumptions"]["cuda_context_bytes"] == CUDA_CONTEXT_BYTES


def test_estimate_suggestions_are_estimated_alternatives(not_fitting):
    suggestions = not_fitting["suggestions"]
    kinds = [s["kind"] for s in suggestions]
    assert {"checkpointing", "batch", "optimizer", "lora"} <= set(kinds)
    for s in suggestions:
        assert s["required_bytes"] == required(s)
        assert s["fits"] == (s["required_bytes"] <= 23034 * 2**20)
    fits = [s["fits"] for s in suggestions]
    assert fits == sorted(fits, reverse=True), "alternatives that fit come first"
    assert any(fits), "a smaller batch with accumulation fits"
    batch = next(s for s in suggestions if s["kind"] == "batch")
    assert batch["settings"]["batch_size"] < 4 and batch["fits"]
    b = batch["settings"]["batch_size"]
    assert batch["change"] == f"--batch-size {b} (x {math.ceil(4 / b)} accumulation)"
    ckpt = next(s for s in suggestions if s["kind"] == "checkpointing")
    assert ckpt["settings"]["gradient_checkpointing"] is True
    assert ckpt["time_per_token_ratio"] > 1  # recomputation costs time
    lora = next(s for s in suggestions if s["kind"] == "lora")
    assert lora["plan"] == "lora:16" and lora["settings"]["lora_rank"] == 16
    # LoRA as peft users run it: the base loaded in bf16 (the run asked is bf16-mixed, fp32
    # weights), fp32 adapters
    assert lora["change"] == "--lora-rank 16 --base-dtype bf16 (instead of --plan)"
    assert lora["settings"]["base_dtype"] == "bfloat16" and lora["settings"]["lora_dtype"] == "float32"
    qlora = next(s for s in suggestions if s["kind"] == "qlora")
    assert qlora["change"] == "--quantization nf4 --double-quant --lora-rank 16 (instead of --plan)"
    assert qlora["settings"]["quantization"]["method"] == "nf4"
    assert qlora["settings"]["quantization"]["double_quant"] is True
    # the GPUs the run as asked fits on: all with at least the memory it needs
    need = not_fitting["estimate"]["required_bytes"]
    assert all(g["memory_bytes"] >= need for g in not_fitting["fits_on"])
    assert "h100-sxm" in {g["gpu"] for g in not_fitting["fits_on"]}


def test_qlora_70b_on_one_h100(capsys):
    """The issue's command: Llama-3.1-70B, NF4 base, LoRA rank 64, checkpointing, one H100."""
    args = ("estimate", "llama-3.1-70b", "--quantization", "nf4", "--lora-rank", "64",
            "--gradient-checkpointing", "--gpu", "h100")
    assert main(*args, "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    check(doc, ESTIMATE_DOC)
    e, v = doc["estimate"], doc["verdict"]
    # 80 layers of q, o (8192 x 8192), k, v (1024 x 8192), gate, up (28672 x 8192), down
    n = 80 * (2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 28672 * 8192)
    assert n == 68_451_041_280
    # packed n / 2, fp32 absmax n / 16, a 64-byte table per layer (one 512-byte block each);
    # every other tensor is a multiple of 512 bytes already
    assert e["quantized_base_bytes"] == n // 2 + n // 16 + 560 * 512 == 38_503_997_440
    assert v["gpu"] == "h100-sxm" and v["required_bytes"] == required(e)
    assert v["fits"] == (v["required_bytes"] <= v["available_bytes"])
    assert doc["settings"]["quantization"]["method"] == "nf4"
    assert main(*args) == 0
    out = capsys.readouterr().out
    assert "Base: nf4 (compute bfloat16, storage uint8), loaded in bfloat16" in out
    assert "quantized base" in out and "35.86 GiB" in out and "On h100-sxm" in out


def test_estimate_text_fits_subprocess():
    done = run("estimate", "gpt2", "--seq-len", "1024", "--gpu", "l4", "--plan", "first:6")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "\033[" not in out  # piped: no colour
    assert "gpt2: GPT2LMHeadModel, 124.4M parameters, 12 layers" in out
    assert "first:6 (freezes" in out and "full fine-tuning" in out
    for row in ("weights", "gradients", "optimizer states", "activations", "peak during",
                "GPU memory needed", "trainable parameters"):
        assert row in out
    assert "On l4 (22.49 GiB): FITS." in out and "largest batch that fits:" in out
    assert "Needed = reserved (the caching allocator, simulated) + 512 MiB (CUDA context)" in out
    assert "reserved (allocator)" in out


def test_time_json_subprocess():
    done = run("time", "llama-3.2-1b", "--samples", "1000", "--batch-size", "4", "--epochs", "2",
               "--gpu", "a100-80gb", "--num-gpus", "2", "--seq-len", "1024", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    check(doc, TIME_DOC)
    t = doc["training"]
    assert t["steps_per_epoch"] == math.ceil(1000 / (4 * 2)) == 125
    assert t["total_steps"] == 250
    assert t["total_seconds"] == pytest.approx(250 * t["step"]["seconds"])
    assert t["gpu_hours"] == pytest.approx(t["total_seconds"] / 3600 * 2)
    assert t["price_per_hour"] == get_gpu("a100-80gb").price_per_hour
    assert t["cost"] == pytest.approx(t["gpu_hours"] * t["price_per_hour"])
    assert t["step"]["tokens"] == 4 * 1024
    assert t["tokens_per_second"] == pytest.approx(2 * 4 * 1024 / t["step"]["seconds"])
    assert doc["verdict"]["fits"] is True
    step = t["step"]
    assert step["low_seconds"] < step["seconds"] < step["high_seconds"]
    assert step["regime"] in ("compute-bound", "memory-bound", "host-bound")
    assert t["low_seconds"] == pytest.approx(250 * step["low_seconds"])
    assert t["lengths"] is None


def test_time_over_real_lengths_subprocess(tmp_path):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("300\n800\n1500\n120\n")  # 1500 is cut at --seq-len 1024
    done = run("time", "gpt2", "--lengths", str(lengths), "--batch-size", "2", "--epochs", "2",
               "--seq-len", "1024", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    check(doc, TIME_DOC)
    t = doc["training"]
    assert t["samples"] == 4 and set(t["lengths"]) == {"padded", "grouped", "packed"}
    for r in t["lengths"].values():
        check(r, BATCHING)
    grouped, packed = t["lengths"]["grouped"], t["lengths"]["packed"]
    # grouped: [1024, 800] and [300, 120]: padded to 1024 and 300
    assert grouped["padding_tokens"] == 2 * 1024 + 2 * 300 - (1024 + 800 + 300 + 120)
    assert grouped["truncated_tokens"] == 1500 - 1024 and grouped["longest_seq_len"] == 1024
    # packed: 2720 tokens in rows of 1024: 3 rows, 2 steps, nothing truncated
    assert packed["steps_per_epoch"] == 2 and packed["truncated_tokens"] == 0
    assert packed["padding_tokens"] == 3 * 1024 - 2720
    assert t["total_seconds"] == t["lengths"]["padded"]["total_seconds"]
    text = run("time", "gpt2", "--lengths", str(lengths), "--batch-size", "2", "--epochs", "2",
               "--seq-len", "1024")
    assert text.returncode == 0 and "grouped by length" in text.stdout
    assert "likely range" in text.stdout


def test_fit_json_subprocess():
    done = run("fit", "gpt2", "--gpu", "l4", "--seq-len", "1024", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    check(doc, FIT_DOC)
    best, memory = doc["max_batch_size"], doc["gpu"]["memory_bytes"]
    assert best > 1
    at, above = doc["at_max"], doc["above_max"]
    assert required(at) <= memory < required(above)
    assert doc["step"]["tokens"] == best * 1024


# -- bad input: one line on stderr, exit 2 (usage) or 1 (failure), never a traceback ---------
def test_unknown_model_subprocess():
    done = run("estimate", "no-such-model")
    assert done.returncode == 2 and done.stdout == ""
    line = one_error_line(done.stderr)
    assert line.startswith("layerscope estimate: error:") and "'no-such-model'" in line
    assert "presets" in line  # says where the allowed names are


def test_argparse_error_is_one_line_subprocess():
    done = run("estimate", "gpt2", "--batch-size", "0")
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert "--batch-size" in line and "0 must be >= 1" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("estimate", "gpt2", "--gpu", "h1000"), ["unknown GPU 'h1000'", "h100-sxm", "l4"]),
        (("estimate", "gpt2", "--precision", "fp12"), ["unknown precision 'fp12'", "bf16-mixed"]),
        (("estimate", "gpt2", "--optimizer", "lion"), ["unknown optimizer 'lion'", "adamw-8bit"]),
        (("estimate", "gpt2", "--plan", "first:40"), ["n=40", "12 layers", "allowed: 0..12"]),
        (("estimate", "gpt2", "--plan", "all"), ["plan all freezes every parameter"]),
        (("estimate", "gpt2", "--plan", "frist:4"), ["unknown plan 'frist:4'", "except-last:N"]),
        (("estimate", "gpt2", "--seq-len", "-5"), ["--seq-len", "-5 must be >= 1"]),
        (("estimate", "gpt2", "--batch-size", "two"), ["--batch-size", "'two' is not a whole"]),
        (("estimate", "gpt2", "--lora-rank", "0"), ["--lora-rank", "0 must be >= 1"]),
        (("estimate", "gpt2", "--attn", "flash"), ["unknown --attn 'flash'", "flash_attention_2"]),
        (("estimate", "gpt2", "--quantization", "nf5"), ["unknown quantization 'nf5'", "nf4, fp4, int8"]),
        (("estimate", "gpt2", "--double-quant"), ["--double-quant needs --quantization nf4 or fp4"]),
        (("estimate", "gpt2", "--quantization", "int8", "--double-quant"), ["--double-quant needs"]),
        (("estimate", "gpt2", "--lora-rank", "8", "--lora-dtype", "int8"),
         ["unknown --lora-dtype 'int8'", "fp32, bf16, fp16"]),
        (("estimate", "gpt2", "--base-dtype", "fp8"), ["unknown --base-dtype 'fp8'", "auto"]),
        (("estimate", "gpt2", "--seq-len", "64", "--quantization", "nf4", "--plan", "last:2"),
         ["trains quantized weights", "cannot receive gradients"]),
        (("estimate", "gpt2", "--fail-if-not-fits"), ["needs --gpu"]),
        (("fit", "gpt2"), ["--gpu"]),
        (("time", "gpt2", "--batch-size", "2", "--epochs", "1"), ["--samples"]),
        (("time", "gpt2", "--batch-size", "2", "--epochs", "1", "--lengths", "/no/such/file"),
         ["cannot read lengths", "/no/such/file"]),
        (("time", "gpt2", "--samples", "0", "--batch-size", "2", "--epochs", "1"),
         ["--samples", "0 must be >= 1"]),
        (("time", "gpt2", "--samples", "9", "--batch-size", "2", "--epochs", "1",
          "--num-gpus", "0"), ["--num-gpus"]),
        (("time", "gpt2", "--samples", "9", "--batch-size", "2", "--epochs", "1",
          "--price-per-hour", "-1"), ["--price-per-hour", ">= 0"]),
        (("report", "gpt2"), ["--html"]),
        (("frobnicate",), ["invalid choice: 'frobnicate'"]),
    ],
)
def test_bad_input_is_a_usage_error(capsys, args, expected):
    assert main(*args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_error_line(captured.err)
    for text in expected:
        assert text in line


def test_unwritable_report_is_a_failure(capsys, tmp_path):
    target = tmp_path / "missing-folder" / "r.html"
    assert main("report", "gpt2", "--html", str(target)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("layerscope report: failed:") and "does not exist" in line


def test_debug_shows_the_traceback(capsys):
    assert main("estimate", "gpt2", "--gpu", "h1000", "--debug") == 2
    err = capsys.readouterr().err
    assert "Traceback" in err  # then the one-line message, as without --debug
    assert err.strip().splitlines()[-1].startswith("layerscope estimate: error: unknown GPU")


def test_a_layerscope_warning_is_one_line(capsys):
    assert main("fit", "gpt2", "--gpu", "h100", "--seq-len", "4096", "--json") == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays a clean JSON document
    line = one_error_line(captured.err)
    assert line == ("layerscope fit: warning: seq_len=4096 exceeds the model's "
                    "max_position_embeddings=1024")


# -- exit codes, colour, progress --------------------------------------------------------------
def test_fail_if_not_fits_gates_with_exit_1(capsys):
    # Without the flag a run that does not fit is an answer (exit 0, see not_fitting above).
    args = ("estimate", "gpt2", "--seq-len", "1024", "--batch-size", "64", "--gpu", "l4",
            "--fail-if-not-fits")
    assert main(*args, "--json") == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["verdict"]["fits"] is False  # the document still comes out
    assert one_error_line(captured.err).endswith("does not fit (--fail-if-not-fits)")
    assert main("estimate", "gpt2", "--seq-len", "1024", "--gpu", "h100",
                "--fail-if-not-fits") == 0
    assert "FITS" in capsys.readouterr().out


def test_estimate_without_gpu_lists_where_it_fits(capsys):
    assert main("estimate", "gpt2", "--seq-len", "512", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    check(doc, ESTIMATE_DOC)
    assert doc["gpu"] is None and doc["verdict"] is None and doc["suggestions"] == []
    assert doc["fits_on"] and all(g["memory_bytes"] >= doc["estimate"]["required_bytes"]
                                  for g in doc["fits_on"])
    assert main("estimate", "gpt2", "--seq-len", "512") == 0
    assert "No --gpu given. Fits as is on: a10g" in capsys.readouterr().out


def test_lora_rank_trains_adapters_only(capsys):
    assert main("estimate", "gpt2", "--seq-len", "512", "--lora-rank", "8", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["plan"]["text"] == "lora:8" and doc["plan"]["frozen_params"] == 124_439_808
    # GPT-2 blocks: c_attn 768x2304, c_proj 768x768, c_fc 768x3072, mlp c_proj 3072x768;
    # rank-8 adapters: 8 x (in + out) each, 12 blocks
    per_block = 8 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))
    assert doc["estimate"]["trainable_params"] == 12 * per_block
    assert doc["full_finetune"]["trainable_params"] == 124_439_808


def test_lora_rank_with_a_plan_trains_what_the_plan_leaves_trainable_too(capsys):
    assert main("estimate", "gpt2", "--seq-len", "512", "--lora-rank", "8", "--plan",
                "except-last:2", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["plan"]["text"] == "lora:8+except-last:2"
    per_block = 8 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))
    # the last two GPT-2 blocks (7,087,872 each) and the final norm (2 x 768) train in full;
    # the head is tied to the embedding, which except-last keeps trainable
    trained = 2 * 7_087_872 + 2 * 768 + 50257 * 768
    assert doc["estimate"]["trainable_params"] == 12 * per_block + trained
    assert doc["plan"]["frozen_params"] == 124_439_808 - trained


def test_attention_implementation_flag(capsys):
    assert main("estimate", "gpt2", "--seq-len", "1024", "--attn", "eager", "--json") == 0
    eager = json.loads(capsys.readouterr().out)
    assert main("estimate", "gpt2", "--seq-len", "1024", "--json") == 0
    default = json.loads(capsys.readouterr().out)
    assert eager["settings"]["attn_implementation"] == "eager"
    assert default["settings"]["attn_implementation"] == "sdpa"
    assert eager["estimate"]["peak_bytes"] > default["estimate"]["peak_bytes"]


def test_color_only_when_asked_and_never_under_no_color(capsys, monkeypatch):
    args = ("estimate", "gpt2", "--seq-len", "512", "--gpu", "l4")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert main(*args) == 0
    assert "\033[32m" in capsys.readouterr().out  # green FITS
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(*args) == 0
    assert "\033[" not in capsys.readouterr().out
    from layerscope.render.console import use_color

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert use_color(Tty(), {}) is True
    assert use_color(Tty(), {"NO_COLOR": "1"}) is False
    assert use_color(Tty(), {"NO_COLOR": ""}) is True  # no-color.org: set and non-empty
    assert use_color(io.StringIO(), {}) is False


def test_progress_only_on_a_terminal_and_after_a_while():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    cli.Progress(tty, delay=0.0)("estimate 1")
    cli.Progress(pipe, delay=0.0)("estimate 1")
    slow = Tty()
    cli.Progress(slow, delay=3600.0)("estimate 1")
    assert "estimate 1" in tty.getvalue() and pipe.getvalue() == "" and slow.getvalue() == ""
