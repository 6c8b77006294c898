"""What stays true whatever the input: no network, weights untouched by any plan or estimate,
scans and plans of FSDP2-wrapped models as of the bare model."""

from __future__ import annotations

import socket
import warnings

import pytest
import torch
from conftest import build, flags
from hypothesis import given, settings
from hypothesis import strategies as st

import layerscope
from layerscope import FreezePlan, LayerscopeError, LayerscopeWarning, apply_plan, scan
from layerscope.fingerprint import ModelFingerprint


def test_no_network_during_builds_estimates_and_commands(monkeypatch, capsys, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing found locally
    layerscope.estimate_memory("gpt2", seq_len=16, lora=2)
    with pytest.raises(LayerscopeError, match="never downloads"):
        layerscope.empty_model("someone/some-model")
    from layerscope import cli

    assert cli.main(["estimate", "qwen2.5-0.5b", "--seq-len", "16", "--gpu", "l4"]) == 0
    capsys.readouterr()


PARTS = st.sampled_from(["first:1", "last:2", "except-last:1", "embeddings", "all", "lp-lora:0.5",
                         "regex:attn", "iregex:MLP", "names:lm_head.weight", "none"])


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(st.lists(PARTS, min_size=1, max_size=3), st.booleans())
def test_weights_are_byte_identical_after_any_plan_and_estimate(parts, estimate):
    model = build("gpt2", "cpu")
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerscopeWarning)
        try:
            apply_plan(model, FreezePlan.parse("+".join(parts)))
            if estimate:
                layerscope.estimate_memory(model, seq_len=8, inference=not any(
                    p.requires_grad for p in model.parameters()))
        except LayerscopeError:
            pass
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and after[name].device == tensor.device
        assert torch.equal(after[name].view(torch.uint8), tensor.view(torch.uint8)), name


@pytest.fixture
def fsdp_mesh():
    dist = pytest.importorskip("torch.distributed")
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from torch.distributed.device_mesh import init_device_mesh

    # A fake process group of two ranks: FSDP2 shards every parameter, nothing is sent anywhere.
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=2)
    try:
        yield init_device_mesh("cpu", (2,))
    finally:
        dist.destroy_process_group()


def test_scan_and_plans_of_an_fsdp2_model(fsdp_mesh):
    from torch.distributed.fsdp import fully_shard

    model, bare = build("llama", "cpu"), scan(build("llama", "cpu"))
    for layer in model.model.layers:
        fully_shard(layer, mesh=fsdp_mesh)
    fully_shard(model, mesh=fsdp_mesh)
    assert type(next(model.parameters())).__name__ == "DTensor"
    s = scan(model)
    assert (s.num_layers, s.total_params, [p.name for p in s.params]) == (
        bare.num_layers, bare.total_params, [p.name for p in bare.params])
    assert ModelFingerprint.of(s) == ModelFingerprint.of(bare)
    plan = FreezePlan.first(2).bind(build("llama", "meta"))  # made on the skeleton
    res = apply_plan(model, plan)
    assert {n for n, f in flags(model).items() if not f} == res.frozen
    assert res.frozen_params == bare.numel(res.frozen)
