"""The command line's sharding flags and config files (issue 12), run in-process."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import build

from layerscope import cli
from layerscope.estimate.hardware import GPU
from layerscope.preflight import Context, suggestions
from layerscope.setup import TrainingSetup

MODEL = "llama-3.2-1b"
STEP = ("--seq-len", "128", "--json")


def main(*args: str) -> tuple[int, dict[str, Any] | None, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exc:  # argparse's own errors
            code = int(exc.code or 0)
    text = out.getvalue()
    return code, (json.loads(text) if text.strip().startswith("{") else None), err.getvalue()


def test_estimate_per_gpu_with_distributed_and_num_gpus():
    code, doc, err = main("estimate", MODEL, "--distributed", "zero3", "--num-gpus", "8", *STEP)
    assert code == 0, err
    assert doc is not None
    s, e = doc["settings"], doc["estimate"]
    assert (s["distributed"], s["num_gpus"], s["gpus_per_node"]) == ("zero3", 8, 8)
    assert (e["distributed"], e["num_gpus"]) == ("zero3", 8)
    assert e["master_weights_bytes"] > 0 and e["buffer_bytes"] > 0
    code, one, _ = main("estimate", MODEL, *STEP)
    assert one is not None and one["estimate"]["peak_bytes"] > e["peak_bytes"]


def test_estimate_text_shows_the_sharding_and_host_memory():
    code, _, err = main("estimate", MODEL, "--distributed", "zero3", "--num-gpus", "4",
                        "--offload", "optimizer", "--seq-len", "128")
    assert code == 0, err
    code, doc, _ = main("estimate", MODEL, "--distributed", "zero3", "--num-gpus", "4",
                        "--offload", "optimizer", *STEP)
    assert doc is not None and doc["estimate"]["host_bytes"] > 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["estimate", MODEL, "--distributed", "zero3", "--num-gpus", "4", "--offload",
                  "optimizer", "--seq-len", "128"])
    text = out.getvalue()
    assert "Sharding: zero3 over 4 GPUs (one node), optimizer offloaded to the CPU" in text
    assert "CPU memory per node" in text and "fp32 master weights" not in text


def test_deepspeed_and_accelerate_files(tmp_path: Path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 2,
                              "optimizer": {"type": "AdamW"},
                              "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    code, doc, err = main("estimate", MODEL, "--deepspeed", str(ds), "--num-gpus", "4", *STEP)
    assert code == 0, err
    assert doc is not None
    s = doc["settings"]
    # the file's batch, precision and optimizer; the command line's GPU count
    assert (s["distributed"], s["num_gpus"], s["batch_size"], s["precision"], s["optimizer"]) == (
        "zero2", 4, 2, "bf16-mixed", "adamw-fused")
    code, doc, _ = main("estimate", MODEL, "--deepspeed", str(ds), "--batch-size", "1", *STEP)
    assert doc is not None and doc["settings"]["batch_size"] == 1  # a flag wins over the file
    acc = tmp_path / "acc.yaml"
    acc.write_text("distributed_type: FSDP\nnum_processes: 2\nmixed_precision: bf16\n"
                   "fsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n  fsdp_version: 1\n")
    code, doc, err = main("estimate", MODEL, "--accelerate-config", str(acc), *STEP)
    assert code == 0, err
    assert doc is not None and (doc["settings"]["distributed"], doc["settings"]["num_gpus"]) == ("fsdp", 2)


@pytest.mark.parametrize("args, message", [
    (("--deepspeed", "/nonexistent/ds.json"), "DeepSpeed config file not found"),
    (("--distributed", "hsdp", "--num-gpus", "12"), "must be a multiple of gpus_per_node=8"),
    (("--distributed", "ddp", "--offload", "params"), "not possible with distributed='ddp'"),
    (("--num-gpus", "0"), "0 must be >= 1"),
    (("--distributed", "tp"), "invalid choice: 'tp'"),
    (("--fabric", "token-ring"), "unknown fabric 'token-ring'; known: ethernet-100g"),
])
def test_bad_sharding_input_is_one_usage_line(args, message):
    code, _, err = main("estimate", MODEL, *args, "--seq-len", "128")
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_run_too_big_for_one_gpu_gets_the_fewest_gpus_that_fit():
    model = build("llama", device="meta")
    setup = TrainingSetup(model, batch_size=1, seq_len=16, gradient_checkpointing=True)
    tiny = GPU("tiny", "a tiny GPU", memory_bytes=1_200_000_000, peak_flops={"bf16": 1e14,
               "fp32": 1e13, "tf32": 5e13, "fp16": 1e14}, memory_bandwidth=1e12, sm_count=8)
    found = suggestions(Context("llama"), setup, tiny)
    sharded = [a for a in found if a.kind == "sharding"]
    assert {a.setup.distributed for a in sharded} == {"fsdp", "zero3"}
    for a in sharded:  # each at the fewest of 2, 4, 8, ... GPUs that fits
        assert a.change == f"--distributed {a.setup.distributed} --num-gpus {a.setup.num_gpus}"
        if a.fits and a.setup.num_gpus > 2:
            fewer = setup.replace(distributed=a.setup.distributed, num_gpus=a.setup.num_gpus // 2)
            from layerscope.estimate.memory import memory_of

            assert not memory_of(fewer).fits(tiny.memory_bytes)


def test_time_of_a_sharded_run_shows_its_communication():
    run = ("time", MODEL, "--batch-size", "2", "--samples", "1000", "--epochs", "1",
           "--seq-len", "64", "--distributed", "fsdp", "--num-gpus", "16")
    code, doc, err = main(*run, "--json")
    assert code == 0, err
    assert doc is not None
    step, t = doc["training"]["step"], doc["training"]
    comm = step["communication"]
    assert (comm["strategy"], comm["num_gpus"], comm["nodes"]) == ("fsdp", 16, 2)
    assert (comm["intra_node"], comm["fabric"]) == ("nvlink", "infiniband-ndr")
    assert set(comm["transfers"]) == {"all-gather", "reduce-scatter"}
    assert all(v["bytes"] > 0 and v["count"] > 0 for v in comm["transfers"].values())
    total = step["forward_seconds"] + step["backward_seconds"] + step["recompute_seconds"]
    assert step["seconds"] == pytest.approx(total + step["optimizer_seconds"]
                                            + comm["exposed_seconds"])
    assert t["total_steps"] == 32  # ceil(1000 / (2 x 16))
    assert doc["gpu"]["fabric"] == "infiniband-ndr"
    code, slow, err = main(*run, "--fabric", "ethernet-25g", "--json")
    assert code == 0 and slow is not None, err
    assert slow["training"]["step"]["communication"]["fabric"] == "ethernet-25g"
    assert slow["training"]["step"]["seconds"] > step["seconds"]
    code, _, err = main(*run)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(list(run))
    text = out.getvalue()
    assert "communication" in text and "exposed of" in text
    assert "infiniband-ndr between 2 nodes" in text and "not modelled" not in text


GPU_ENTRY = {
    "gpu": dict, "fits": bool, "num_gpus": int, "change": str, "settings": dict, "reason": str,
    "estimate": dict, "step": dict, "tokens_per_second": float,
    "cost_per_million_tokens": (float, type(None)), "run": dict,
    "closest_below": (dict, type(None)), "tried": list,
}
TRIED_ENTRY = {"change": str, "distributed": (str, type(None)), "num_gpus": int,
               "offload": (str, type(None)), "gradient_checkpointing": bool, "fits": bool,
               "estimated": bool, "required_bytes": int, "step_seconds": (float, type(None))}


def test_gpus_json_schema_and_order():
    code, doc, err = main("gpus", MODEL, "--seq-len", "128", "--samples", "1000", "--epochs",
                          "2", "--json")
    assert code == 0, err
    assert doc is not None and doc["command"] == "gpus"
    assert {"layerscope_version", "schema_version", "model", "settings", "plan", "assumptions",
            "run", "gpus"} <= set(doc)
    assert doc["run"] == {"samples": 1000, "epochs": 2}
    assert doc["assumptions"]["gpu_counts"] == [1, 2, 4, 8, 16, 32, 64]
    from layerscope.estimate.hardware import gpus

    assert sorted(g["gpu"]["name"] for g in doc["gpus"]) == gpus()  # every catalogue GPU
    for g in doc["gpus"]:
        assert g["fits"]  # a 1B model fits on every catalogue GPU, sharded or not
        for key, kind in GPU_ENTRY.items():
            assert isinstance(g[key], kind), (g["gpu"]["name"], key)
        for t in g["tried"]:
            assert set(t) == set(TRIED_ENTRY)
            for key, kind in TRIED_ENTRY.items():
                assert isinstance(t[key], kind), (key, t)
        assert g["estimate"]["required_bytes"] <= g["gpu"]["memory_bytes"]
        assert g["settings"]["num_gpus"] == g["num_gpus"]
        r = g["run"]
        # ceil(1000 samples / (1 per GPU x GPUs)) steps per epoch, two epochs
        assert r["total_steps"] == -(-1000 // g["num_gpus"]) * 2
        assert r["total_seconds"] == pytest.approx(r["total_steps"] * g["step"]["seconds"])
        price = g["gpu"]["price_per_hour"]
        assert r["cost"] == (None if price is None else pytest.approx(
            r["total_seconds"] / 3600 * g["num_gpus"] * price))
    costs = [g["run"]["cost"] for g in doc["gpus"]]
    priced = [c for c in costs if c is not None]
    assert priced == sorted(priced) and costs[:len(priced)] == priced  # cheapest first
    code, text_doc, err = main("gpus", MODEL, "--seq-len", "128")
    assert code == 0 and text_doc is None, err


def test_gpus_text_and_usage_errors():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["gpus", MODEL, "--seq-len", "128"]) == 0
    text = out.getvalue()
    assert "Fewest GPUs of each type that fit, cheapest first" in text
    assert "per 1M tokens" in text and "Why:" in text and "h100-sxm" in text
    code, _, err = main("gpus", MODEL, "--epochs", "2")
    assert code == 2 and "--epochs needs --samples" in err
    code, _, err = main("gpus", MODEL, "--fabric", "token-ring")
    assert code == 2 and "unknown fabric" in err
