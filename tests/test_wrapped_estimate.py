"""Estimates of models already wrapped by FSDP1, from a skeleton with their flags (issue 12)."""

from __future__ import annotations

import pytest
import torch
from conftest import build

from layerscope import FreezePlan, apply_plan, estimate_memory

dist = pytest.importorskip("torch.distributed")


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_an_fsdp1_model_is_estimated_with_the_flags_of_its_original_tensors(use_orig_params):
    """With use_orig_params=False the original tensors are no parameters any more; their flags
    are their flat parameter's, read by original name."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    plan = FreezePlan.first(2)
    plain = build("llama", device="meta")
    apply_plan(plain, plan)
    expected = estimate_memory(plain, batch_size=1, seq_len=16)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model = FullyShardedDataParallel(build("llama"), use_orig_params=use_orig_params,
                                         auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                         device_id=torch.device("cpu"))
        apply_plan(model, plan)  # each block is one flat parameter: frozen or trained whole
        before = {n: (p.shape, p.requires_grad) for n, p in model.named_parameters()}
        est = estimate_memory(model, batch_size=1, seq_len=16)
        assert {n: (p.shape, p.requires_grad) for n, p in model.named_parameters()} == before
    finally:
        dist.destroy_process_group()
    assert est == expected
    # conftest.LLAMA: a block holds q, o 64*64, k, v 64*32, gate, up, down 64*128, two norms 64
    block = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert est.trainable_params == 2 * block + 100 * 64 + 100 * 64 + 64  # blocks 2-3, embed, head, norm
