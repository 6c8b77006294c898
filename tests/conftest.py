"""Tiny models built from configs (never downloaded), real on the CPU or as meta skeletons."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

logging.getLogger("transformers").setLevel(logging.ERROR)

# Hand arithmetic for the sizes below lives next to the tests that use them.
GPT2 = dict(n_layer=4, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
            bos_token_id=0, eos_token_id=0)
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False,
             max_position_embeddings=64)
MIXTRAL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=50, num_local_experts=4, num_experts_per_tok=2,
               max_position_embeddings=64)


def build(kind: str, device: str = "cpu") -> nn.Module:
    """A tiny ``gpt2`` (tied head), ``llama`` (untied) or ``mixtral`` (MoE) causal LM."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MixtralConfig

    config = {
        "gpt2": lambda: GPT2Config(**GPT2),
        "llama": lambda: LlamaConfig(**LLAMA),
        "mixtral": lambda: MixtralConfig(**MIXTRAL),
    }[kind]()
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x))


class PlainNet(nn.Module):
    """A plain module: embedding, a ModuleList of 3 blocks, a final norm and a head."""

    def __init__(self, width: int = 8, vocab: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(3))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@pytest.fixture(params=["gpt2", "llama", "mixtral"])
def hf_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=["cpu", "meta"])
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}


def layer_step(layer: nn.Module, tokens: int, n_in: int, n_out: int,
               x_dtype: torch.dtype = torch.bfloat16, autocast: torch.dtype | None = None
               ) -> tuple[object, object, torch.Tensor]:
    """Forward of ``layer`` (its meta buffers made fake) on a ``tokens x n_in`` input that needs
    a gradient, then backward with a ``tokens x n_out`` gradient that exists beforehand, traced
    as the estimator traces a step; returns the forward and backward segments and the input."""
    from layerscope.compat import fake_tensor_mode
    from layerscope.estimate.kernels import CudaKernels
    from layerscope.estimate.trace import _Tracker

    mode = fake_tensor_mode()
    with mode:
        for name, b in list(layer.named_buffers()):
            setattr(layer, name, torch.empty(b.shape, dtype=b.dtype))
        x = torch.empty(tokens, n_in, dtype=x_dtype).requires_grad_()
        grad = torch.empty(tokens, n_out, dtype=x_dtype)
    tracker = _Tracker()
    tracker.ignore([x, grad, *layer.buffers()])
    with mode, CudaKernels(autocast), tracker:
        out = layer(x)
        tracker.switch(("head", "bwd"))
        torch.autograd.backward(out, grad)
        tracker.switch(("head", "end"))
    seg = tracker.segments()
    return seg[("embed", "fwd")], seg[("head", "bwd")], x
