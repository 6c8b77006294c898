"""The two estimators count FLOPs independently: the memory trace runs the model's operators on
fake tensors (torch.utils.flop_counter's formulas); the time model adds up the matmuls it reads
from the structure. They must agree, and agree on what freezing removes. (bf16: in fp32 the
trace runs MoE experts through a memory-only stand-in that counts no FLOPs.)"""

import pytest
from conftest import build

from layerscope import FreezePlan, estimate_memory, estimate_step_time


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mixtral"])
def test_traced_and_analytic_flops_agree(kind):
    model = build(kind, "meta")
    for plan in (None, FreezePlan.first(1)):
        settings = dict(batch_size=2, seq_len=16, precision="bf16-true")
        traced = estimate_memory(model, plan, **settings)
        analytic = estimate_step_time(model, plan, **settings)
        assert traced.forward_flops == pytest.approx(analytic.forward.flops, rel=0.06)
        assert traced.backward_flops == pytest.approx(analytic.backward.flops, rel=0.06)
