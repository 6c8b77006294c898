"""Plans and the Layer Utils on wrapped models, by the original parameter names (issue 12).

Two kinds of checks:

* In this process, under PyTorch's fake process group of two ranks (nothing is sent): every
  Layer Utils function and ``apply_plan`` on DDP, FSDP2 (``fully_shard``), FSDP1 (both
  ``use_orig_params``), ``DataParallel``, ``checkpoint_wrapper``, ``torch.compile`` and a
  DeepSpeed engine give what they give on the bare model, or refuse as the wrapper requires.
  DeepSpeed is not installed here: its engine is stood in for by the smallest object layerscope
  relies on, an ``nn.Module`` subclass named ``DeepSpeedEngine`` holding the model as
  ``.module`` (what ``deepspeed.initialize`` returns).
* Real training: ``wrapped_worker.py`` in two processes on a gloo process group on 127.0.0.1
  (CPU), each scenario stepping SGD on rank-specific data. Skipped, with the reason, where
  gloo cannot run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Block, PlainNet
from torch import nn

from layerscope import (
    FreezePlan,
    GradualUnfreezer,
    LayerscopeWarning,
    PlanError,
    apply_plan,
    freeze_by_name,
    freeze_embeddings,
    freeze_except_last_n,
    freeze_first_n_layers,
    freeze_last_n_layers,
    freeze_model,
    get_frozen_percentage,
    get_layer_names,
    get_num_layers,
    get_trainable_params,
    layer_status,
    model_summary,
    scan,
    setup_lp_lora_style,
    unfreeze_model,
)
from layerscope.fingerprint import ModelFingerprint
from layerscope.plan import GradualSchedule

dist = pytest.importorskip("torch.distributed")


def net(device: str = "cpu") -> nn.Module:
    """``PlainNet`` with its head tied to the embedding (as GPT-2's), the worker's model."""
    torch.manual_seed(0)
    with torch.device(device):
        model = PlainNet()
    model.head.weight = model.embed.weight
    return model


# PlainNet(width=8, vocab=10), head tied: 17 names, 16 tensors.
NAMES = ["embed.weight"] + [f"blocks.{i}.{p}" for i in range(3)
                            for p in ("fc.weight", "fc.bias", "norm.weight", "norm.bias")] + [
    "norm.weight", "norm.bias", "head.weight", "head.bias"]
BLOCK = {i: {n for n in NAMES if n.startswith(f"blocks.{i}.")} for i in range(3)}
TOTAL = 10 * 8 + 3 * (8 * 8 + 8 + 8 + 8) + 8 + 8 + 10  # 370 elements (head.weight is embed's)


def flags(model: nn.Module) -> dict[str, bool]:
    return {p.name: p.requires_grad for p in scan(model).params}


# -- wrapping, in this process ------------------------------------------------------------------
class DeepSpeedEngine(nn.Module):
    """Stand-in for ``deepspeed.DeepSpeedEngine`` (not installed here): an ``nn.Module`` that
    holds the model as ``.module``, which is all layerscope relies on."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


@pytest.fixture
def fake_group() -> Iterator[Any]:
    """A fake process group of two ranks (FSDP shards, DDP builds its reducer; nothing is sent)."""
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=2)
    try:
        yield init_device_mesh("cpu", (2,))
    finally:
        dist.destroy_process_group()


def _fully_shard(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _fsdp1(use_orig_params: bool) -> Callable[[nn.Module, Any], nn.Module]:
    def wrap(model: nn.Module, mesh: Any) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FullyShardedDataParallel(model, use_orig_params=use_orig_params,
                                        auto_wrap_policy=ModuleWrapPolicy({Block}),
                                        device_id=torch.device("cpu"))
    return wrap


def _checkpointed(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)
    return model


WRAPS: dict[str, Callable[[nn.Module, Any], nn.Module]] = {
    "ddp": lambda m, mesh: nn.parallel.DistributedDataParallel(m),
    "fsdp2": _fully_shard,
    "fsdp1-orig-params": _fsdp1(True),
    "fsdp1-flat-params": _fsdp1(False),
    "deepspeed": lambda m, mesh: DeepSpeedEngine(m),
    "data-parallel": lambda m, mesh: nn.DataParallel(m),
    "checkpoint-wrapper": _checkpointed,
    "torch-compile": lambda m, mesh: torch.compile(m),  # an OptimizedModule; nothing compiles
}

RAW_PREFIX = {  # what the wrapper does to the first block's first name
    "ddp": "module.blocks.0.fc.weight",
    "fsdp2": "blocks.0.fc.weight",
    "fsdp1-orig-params": "_fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.fc.weight",
    "fsdp1-flat-params": "_fsdp_wrapped_module.blocks.0._fsdp_wrapped_module._flat_param",
    "deepspeed": "module.blocks.0.fc.weight",
    "data-parallel": "module.blocks.0.fc.weight",
    "checkpoint-wrapper": "blocks.0._checkpoint_wrapped_module.fc.weight",
    "torch-compile": "_orig_mod.blocks.0.fc.weight",
}


@pytest.mark.parametrize("kind", WRAPS)
def test_a_wrapped_model_is_scanned_as_the_model_it_wraps(kind, fake_group):
    wrapped, bare, skeleton = WRAPS[kind](net(), fake_group), scan(net()), scan(net("meta"))
    assert RAW_PREFIX[kind] in [n for n, _ in wrapped.named_parameters()]
    s = scan(wrapped)
    assert sorted(p.name for p in s.params) == sorted(NAMES)
    # FSDP1 re-registers a module's parameters (head.bias before the tied head.weight)
    assert [p.name for p in s.params if p.name != "head.weight"] == [
        n for n in NAMES if n != "head.weight"]
    assert {p.name: p.shape for p in s.params} == {p.name: p.shape for p in bare.params}
    assert (s.model_type, s.num_layers, s.layers.path, s.layers.block_type) == (
        "PlainNet", 3, "blocks", "Block")
    assert (s.total_params, len(s.tensors), s.tie_groups) == (TOTAL, 16, (("embed.weight", "head.weight"),))
    assert (s.embedding_names, s.head_names) == (bare.embedding_names, bare.head_names)
    assert ModelFingerprint.of(s) == ModelFingerprint.of(skeleton)
    assert s.wrappers and bare.wrappers == ()
    # a scan of the skeleton is a scan of this model too (DDP then refuses the change itself)
    if kind == "ddp":
        with pytest.raises(PlanError, match="Freeze before wrapping"):
            apply_plan(wrapped, FreezePlan.first(1), skeleton)
    else:
        assert apply_plan(wrapped, FreezePlan.first(1), skeleton).frozen == BLOCK[0]


def _utils() -> dict[str, Callable[[nn.Module], Any]]:
    return {
        "freeze_model": freeze_model,
        "unfreeze_model": unfreeze_model,
        "freeze_first_n_layers": lambda m: freeze_first_n_layers(m, 1),
        "freeze_last_n_layers": lambda m: freeze_last_n_layers(m, 1),
        "freeze_except_last_n": lambda m: freeze_except_last_n(m, 1),
        "freeze_embeddings": freeze_embeddings,
        "freeze_by_name": lambda m: freeze_by_name(m, r"blocks\.1\."),
        "freeze_by_name_norm": lambda m: freeze_by_name(m, "norm"),
        "setup_lp_lora_style": setup_lp_lora_style,
        "apply_plan": lambda m: sorted(apply_plan(m, FreezePlan.parse("first:1+last:1")).frozen),
        "bound_plan": lambda m: sorted(apply_plan(m, FreezePlan.first(2).bind(net("meta"))).frozen),
        "gradual_unfreezer": lambda m: GradualUnfreezer(m, 3, verbose=False).step(1),
    }


def _reads(model: nn.Module) -> tuple[Any, ...]:
    return (get_trainable_params(model), get_frozen_percentage(model), get_num_layers(model),
            get_layer_names(model), sorted(get_layer_names(model, include_params=True)),
            layer_status(model, show_all=True), model_summary(model))


def _run(func: Callable[[nn.Module], Any], model: nn.Module) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = func(model)
    return value, [str(w.message) for w in caught if w.category is LayerscopeWarning]


def _units_mixed(state: dict[str, bool]) -> bool:
    """Whether the flags differ inside one FSDP1 unit of the worker's wrapping (one unit per
    block, the root unit holding embed, norm and head)."""
    units = [BLOCK[0], BLOCK[1], BLOCK[2], set(NAMES) - BLOCK[0] - BLOCK[1] - BLOCK[2]]
    return any(len({state[n] for n in unit}) > 1 for unit in units)


@pytest.mark.parametrize("kind", [k for k in WRAPS if k != "ddp"])
@pytest.mark.parametrize("util", _utils())
def test_layer_utils_on_a_wrapped_model_do_what_they_do_on_the_bare_model(kind, util, fake_group):
    func = _utils()[util]
    bare, wrapped = net(), WRAPS[kind](net(), fake_group)
    expected, notes = _run(func, bare)
    if kind == "fsdp1-flat-params" and _units_mixed(flags(bare)):
        before = flags(wrapped)
        with pytest.raises(PlanError, match=r"use_orig_params=False keeps one requires_grad per "
                                            r"flat parameter.*use_orig_params=True"):
            func(wrapped)
        assert flags(wrapped) == before
        return
    assert _run(func, wrapped) == (expected, notes)
    assert flags(wrapped) == flags(bare)
    assert _reads(wrapped) == _reads(bare)


def test_fsdp1_flat_parameters_take_a_plan_that_keeps_each_unit_whole(fake_group):
    """The cases the test above refuses, and one it applies, worked out by hand."""
    model = WRAPS["fsdp1-flat-params"](net(), fake_group)
    assert not _units_mixed(dict.fromkeys(NAMES, True))
    for plan in ("embeddings", r"regex:fc\.weight", "lp-lora:0.5"):  # root or blocks split
        with pytest.raises(PlanError, match="flattened into one parameter"):
            apply_plan(model, FreezePlan.parse(plan))
    assert all(flags(model).values())
    res = apply_plan(model, FreezePlan.parse("first:1+last:1"))
    assert res.frozen == BLOCK[0] | BLOCK[2]
    assert res.frozen_params == 2 * (64 + 8 + 8 + 8)
    flat = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flat == {
        "_fsdp_wrapped_module._flat_param": True,
        "_fsdp_wrapped_module.blocks.0._fsdp_wrapped_module._flat_param": False,
        "_fsdp_wrapped_module.blocks.1._fsdp_wrapped_module._flat_param": True,
        "_fsdp_wrapped_module.blocks.2._fsdp_wrapped_module._flat_param": False,
    }


@pytest.mark.parametrize("util", _utils())
def test_ddp_refuses_what_changes_which_parameters_train_and_changes_nothing(util, fake_group):
    func = _utils()[util]
    bare, ddp = net(), WRAPS["ddp"](net(), fake_group)
    expected, _ = _run(func, bare)
    if all(flags(bare).values()):  # nothing changes for DDP (unfreeze_model on a trained model)
        value, notes = _run(func, ddp)
        assert value == expected and all(flags(ddp).values())
        assert any("leaves the same parameters trainable as when DDP was built" in n for n in notes)
        return
    frozen = sum(1 for n, f in flags(bare).items() if not f and n != "head.weight")
    with pytest.raises(PlanError, match=rf"16 trainable tensor\(s\), 1,480 bytes; this would "
                                        rf"freeze {frozen} tensor\(s\).*Freeze before wrapping"):
        func(ddp)
    assert all(flags(ddp).values())
    assert _reads(ddp) == _reads(net())


def test_ddp_takes_the_plan_it_was_built_with_and_refuses_another_of_the_same_size(fake_group):
    model = net()
    plan = FreezePlan.first(1).bind(net("meta"))
    apply_plan(model, plan)
    ddp = nn.parallel.DistributedDataParallel(model)
    with pytest.warns(LayerscopeWarning, match="freeze before wrapping|apply the plan before wrapping"):
        assert apply_plan(ddp, plan).frozen == BLOCK[0]
    # blocks are alike: the same count and bytes as DDP recorded, other tensors
    with pytest.raises(PlanError, match=r"freeze 4 tensor\(s\) \(blocks\.2\..*unfreeze 4 tensor"):
        apply_plan(ddp, FreezePlan.last(1))
    with pytest.raises(PlanError, match=r"unfreeze 4 tensor"):
        unfreeze_model(ddp)
    assert {n for n, f in flags(ddp).items() if not f} == BLOCK[0]
    ignored = nn.parallel.DistributedDataParallel  # parameters DDP ignores may change freely
    model = net()
    model._ddp_params_and_buffers_to_ignore = sorted(BLOCK[0])
    assert apply_plan(ignored(model), FreezePlan.first(1)).frozen == BLOCK[0]


def test_deepspeed_stand_in_and_its_subclasses_are_unwrapped():
    class PipelineEngine(DeepSpeedEngine):  # DeepSpeed's pipeline engine subclasses the engine
        pass

    for engine in (DeepSpeedEngine(net()), PipelineEngine(net())):
        res = apply_plan(engine, FreezePlan.first(2).bind(net("meta")))
        assert res.frozen == BLOCK[0] | BLOCK[1]
        assert not engine.module.blocks[1].fc.weight.requires_grad
        assert engine.module.blocks[2].fc.weight.requires_grad
        assert scan(engine).wrappers == (type(engine).__name__,)


# -- real training on two gloo ranks ----------------------------------------------------------------
WORKER = Path(__file__).with_name("wrapped_worker.py")
SCENARIOS = ("ddp_plan_then_wrap", "ddp_wrap_then_plan", "fsdp2", "fsdp1_orig_params",
             "fsdp1_flat_params")
TIMEOUT = 180  # seconds for both ranks and every scenario; each takes about 10 s in all


def _free_port() -> int:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    except OSError as exc:
        pytest.skip(f"cannot bind a TCP port on 127.0.0.1: {exc}")


def _launch(out: Path) -> list[dict[str, Any]]:
    """Run both ranks over every scenario; their records (or ``init_error``)."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1"}
    if "lo" in {name for _, name in socket.if_nameindex()}:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # never a hostname that resolves elsewhere
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), *SCENARIOS],
                              cwd=WORKER.parent, env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    deadline = time.monotonic() + TIMEOUT
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.communicate()
        pytest.fail(f"the two ranks did not finish within {TIMEOUT} s")
    records = []
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        path = out / f"rank{rank}.json"
        if proc.returncode != 0 or not path.exists():
            pytest.fail(f"rank {rank} exited {proc.returncode}:\n{log[-3000:]}")
        records.append(json.loads(path.read_text()))
    return records


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Both ranks' records of every scenario (one launch of two processes for all of them; a
    second on a new port if the first could not start a process group)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    errors: list[str] = []
    for attempt in range(2):
        records = _launch(tmp_path_factory.mktemp(f"ranks{attempt}"))
        errors = [r["init_error"] for r in records if "init_error" in r]
        if not errors:
            return records
    pytest.skip(f"gloo cannot run two ranks on 127.0.0.1 here: {errors[0]}")


def scenario(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    got = [r[name] for r in ranks]
    for rank, r in enumerate(got):
        assert "crashed" not in r, f"rank {rank}:\n{r['crashed']}"
    return got


def check_step(steps: list[dict[str, Any]], frozen: set[str]) -> None:
    """Frozen tensors byte-identical on every rank; every trainable one changed (on the rank
    that holds its shard: FSDP1 gives some ranks an empty piece)."""
    names = set(steps[0])
    assert frozen <= names
    for name in names:
        changed = [s[name]["changed"] for s in steps]
        if name in frozen:
            assert not any(changed), name
        else:
            assert any(changed), name


def test_ddp_plan_before_wrapping_trains_and_keeps_frozen_weights_byte_identical(ranks):
    for r in scenario(ranks, "ddp_plan_then_wrap"):
        assert r["applied"] == {"value": sorted(BLOCK[0]), "error": None, "warnings": []}
        assert r["fingerprint"] == r["skeleton"]
        assert r["reapplied"]["error"] is None
        assert [w for w in r["reapplied"]["warnings"] if "DistributedDataParallel" in w]
        assert {n for n, f in r["flags"].items() if not f} == BLOCK[0]
    runs = scenario(ranks, "ddp_plan_then_wrap")
    for step in ("step1", "step2"):  # the second proves DDP's reducer was left intact
        check_step([r[step] for r in runs], BLOCK[0])
        # each rank saw its own batch; averaged gradients keep the replicas equal
        assert {n: v["digest"] for n, v in runs[0][step].items()} == {
            n: v["digest"] for n, v in runs[1][step].items()}


def test_ddp_plan_after_wrapping_is_refused_and_changes_nothing(ranks):
    for r in scenario(ranks, "ddp_wrap_then_plan"):
        assert r["before"] == r["after"] == dict.fromkeys(NAMES, True)
        for key in ("freeze", "utils", "swap", "thaw"):
            error = r[key]["error"]
            assert error and error["type"] == "PlanError" and error["layerscope"], key
            assert "Freeze before wrapping: apply_plan(model, plan), then " \
                   "DistributedDataParallel(model, ...)" in error["message"]
        assert "16 trainable tensor(s), 1,480 bytes; this would freeze 4" in r["freeze"]["error"]["message"]
        # 12 tensors left: 1,480 - 4 * (64 + 8 + 8 + 8) = 1,128 bytes, the same after the swap
        assert "freeze 4 tensor(s) (blocks.2." in r["swap"]["error"]["message"]
        assert "unfreeze 4 tensor(s) (blocks.0." in r["swap"]["error"]["message"]
        assert "leaving 12, 1,128 bytes" in r["swap"]["error"]["message"]
        assert {n for n, f in r["flags2"].items() if not f} == BLOCK[0]
    check_step([r["step"] for r in scenario(ranks, "ddp_wrap_then_plan")], BLOCK[0])


def _gradual_expectations() -> dict[str, set[str]]:
    """What the skeleton's plans freeze: the plan applied first, then GradualUnfreezer's
    epochs 0 and 2 of 3."""
    skeleton = net("meta")
    schedule = GradualSchedule(3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerscopeWarning)
        return {"step1": set(FreezePlan.first(1).resolve(skeleton).frozen),
                "epoch0": set(schedule.plan(0).resolve(skeleton).frozen),
                "epoch2": set(schedule.plan(2).resolve(skeleton).frozen)}


@pytest.mark.parametrize("name", ["fsdp2", "fsdp1_orig_params"])
def test_fsdp_applies_the_skeletons_plan_by_original_names_and_trains_only_the_rest(ranks, name):
    expect = _gradual_expectations()
    assert expect["epoch0"] == set(NAMES) - {"embed.weight", "head.weight", "head.bias",
                                             "norm.weight", "norm.bias"}  # head side (tied)
    assert expect["epoch2"] == set()  # the tied embedding trains with the head
    runs = scenario(ranks, name)
    for r in runs:
        assert sorted(r["names"]) == sorted(NAMES)
        assert r["fingerprint"] == r["skeleton"]
        assert r["applied"] == {"value": sorted(BLOCK[0]), "error": None, "warnings": []}
        assert r["trainable"] == TOTAL - (64 + 8 + 8 + 8)
        assert {n for n, f in r["flags1"].items() if not f} == expect["step1"]
        for epoch in ("epoch0", "epoch2"):
            assert {n for n, f in r[epoch]["flags"].items() if not f} == expect[epoch]
    check_step([r["step1"] for r in runs], expect["step1"])
    for epoch in ("epoch0", "epoch2"):  # flags changed between steps are honoured
        check_step([r[epoch]["step"] for r in runs], expect[epoch])
    if name == "fsdp2":
        assert runs[0]["dtensor"] == "DTensor"
    else:
        assert all(n.startswith("_fsdp_wrapped_module.") for n in runs[0]["raw_names"])


def test_fsdp1_flat_parameters_take_a_plan_whole_per_unit_and_refuse_a_split(ranks):
    runs = scenario(ranks, "fsdp1_flat_params")
    for r in runs:
        assert len(r["raw_names"]) == 4 and sorted(r["names"]) == sorted(NAMES)
        assert r["fingerprint"] == r["skeleton"]
        for key in ("mixed", "embeddings"):
            assert r[key]["error"]["type"] == "PlanError"
            assert "use_orig_params=True" in r[key]["error"]["message"]
        assert r["unchanged"]
        assert r["applied"]["value"] == sorted(BLOCK[0])
        assert {n for n, f in r["flags"].items() if not f} == BLOCK[0]
    check_step([r["step"] for r in runs], {"blocks.0._flat_param"})
