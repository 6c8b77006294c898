"""What the time model needs to know about a model, found once per block type: its matmuls
(every Linear / Conv1D / expert weight, with the share of tokens routed through it), norms,
activations, dropout, attention shape, embeddings and output head.

Read from the scan and, when the model has one, its ``config`` (attention heads, MoE top-k,
rotary, sliding windows, soft-capping). Nothing here runs the model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from layerscope.scan import ModelScan, scan

ATTENTION_NAMES = re.compile(r"(^|\.)(self_attn|attn|attention|self_attention)(\.|$)")
EXPERT_PATH = re.compile(r"(^|\.)experts(\.\d+)?(\.|$)")


@dataclass(frozen=True)
class Gemm:
    """A weight used as a matmul: ``count`` matrices of ``n_out x n_in`` (experts stacked in one
    tensor have count E), each seeing ``share`` of the tokens (a routed expert: top_k / E)."""

    param: str  # name relative to the block prefix (absolute outside the blocks)
    n_in: int
    n_out: int
    count: int
    share: float
    bias: str | None


@dataclass
class Part:
    """The kernels of one block type, or of everything outside the blocks."""

    gemms: list[Gemm] = field(default_factory=list)
    norms: list[tuple[int, bool]] = field(default_factory=list)  # (width, one fused kernel)
    act_kernels: list[int] = field(default_factory=list)
    dropouts: int = 0
    experts: int = 0  # experts run one after another in a Python loop (eager MoE)

    @property
    def mlp_width(self) -> int:
        """Width the activation runs on: the widest GEMM input (down projection)."""
        return max((g.n_in for g in self.gemms), default=0)

    @property
    def gated(self) -> bool:
        """A GLU MLP (gate * up): two GEMMs produce the MLP width, or one fused one twice it."""
        w = self.mlp_width
        outs = [g.n_out for g in self.gemms]
        return bool(w) and (outs.count(w) >= 2 or 2 * w in outs)

    @property
    def mlp_share(self) -> float:
        return min((g.share for g in self.gemms if g.n_in == self.mlp_width), default=1.0)


def _leaf_kind(type_name: str) -> str:
    low = type_name.lower()
    if "norm" in low:
        return "norm"
    if "dropout" in low:
        return "dropout"
    if re.search(r"act|gelu|silu|relu|swish|tanh|sigmoid|softplus", low):
        return "act"
    return "other"


_ACTIVATION_KERNELS = {"newgeluactivation": 8, "fastgeluactivation": 6, "quickgeluactivation": 3}
"""Kernels of transformers' activations written as several Python ops (others are one)."""


def describe(model: nn.Module, s: ModelScan, infos: Iterable[Any], cut: int,
              num_experts: int, top_k: int, training: bool) -> Part:
    """Kernels of the modules ``infos`` (``cut`` characters of block prefix dropped)."""
    part = Part()
    for info in infos:
        kind = _leaf_kind(info.type_name)
        params = [s.by_name[n] for n in info.own_params]
        rel = info.name[cut:]
        routed = bool(EXPERT_PATH.search(rel)) and num_experts > 0
        if not params:
            if info.is_leaf and kind == "act":
                part.act_kernels.append(_ACTIVATION_KERNELS.get(info.type_name.lower(), 1))
            elif info.is_leaf and kind == "dropout" and training:
                part.dropouts += getattr(model.get_submodule(info.name), "p", 0.0) > 0
            continue
        if kind == "norm":
            fused = info.type_name == "LayerNorm" or any(p.name.endswith("bias") for p in params)
            part.norms.append((params[0].numel, fused))
            continue
        bias = next((p.name[cut:] for p in params if len(p.shape) == 1
                     and p.name.rpartition(".")[2] == "bias"), None)
        for p in params:
            if p.name in s.embedding_names:
                continue
            if len(p.shape) == 2:
                n_out, n_in = p.shape
                if info.type_name == "Conv1D":  # GPT-2 stores its linears transposed
                    n_in, n_out = p.shape
                share = top_k / num_experts if routed else 1.0
                part.gemms.append(Gemm(p.name[cut:], n_in, n_out, 1, share, bias))
                if routed:
                    part.experts = num_experts
            elif len(p.shape) == 3:  # experts stacked in one tensor: (E, out, in)
                e = p.shape[0]
                share = min(top_k, e) / e if top_k else 1.0
                part.gemms.append(Gemm(p.name[cut:], p.shape[2], p.shape[1], e, share, None))
                part.experts = e
    return part


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model, found once per block type."""

    scan: ModelScan
    block: Part
    outside: Part
    prefixes: tuple[str, ...]
    heads: int
    kv_heads: int
    head_dim: int
    rotary: bool
    sliding: tuple[int | None, ...]
    logit_softcap: bool
    attn_softcap: bool
    vocab: int
    has_loss: bool
    embeddings: tuple[tuple[str, int, int], ...]  # (name, rows, width)


def _config_int(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def analyse(model: nn.Module, training: bool) -> ModelShape:
    s = scan(model)
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    num_experts = _config_int(config, "num_local_experts", "num_experts", "n_routed_experts")
    top_k = _config_int(config, "num_experts_per_tok", "moe_topk", "top_k")
    prefixes: tuple[str, ...] = s.layers.blocks if s.primary is not None else ()
    first = prefixes[0] + "." if prefixes else ""
    in_block = [m for m in s.modules if first and m.name.startswith(first)]
    primary = s.layers.path + "." if prefixes else None
    outside = [m for m in s.modules
               if (m.name or m.own_params) and not (primary and m.name.startswith(primary))]
    block = describe(model, s, in_block, len(first) if first else 0, num_experts, top_k,
                      training)
    rest = describe(model, s, outside, 0, num_experts, top_k, training)
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    heads = _config_int(config, "num_attention_heads", "n_head")
    kv_heads = _config_int(config, "num_key_value_heads") or heads
    head_dim = _config_int(config, "head_dim") or (hidden // heads if heads else 0)
    has_attention = heads > 0 and any(ATTENTION_NAMES.search(m.name[len(first):])
                                      for m in in_block)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None)
    layer_types = getattr(config, "layer_types", None) or ()
    window = _config_int(config, "sliding_window")
    sliding = tuple(
        window if window and i < len(layer_types) and "sliding" in str(layer_types[i]) else None
        for i in range(len(prefixes))
    )
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    vocab = head.weight.shape[0] if isinstance(head, nn.Linear) else 0
    embeddings = []
    for m in s.modules:
        if m.own_params and m.type_name == "Embedding" and set(m.own_params) <= s.embedding_names:
            rows, width = s.by_name[m.own_params[0]].shape
            embeddings.append((m.own_params[0], rows, width))
    return ModelShape(
        scan=s, block=block, outside=rest, prefixes=prefixes,
        heads=heads if has_attention else 0, kv_heads=kv_heads, head_dim=head_dim,
        rotary=bool(rope) and has_attention, sliding=sliding,
        logit_softcap=bool(getattr(config, "final_logit_softcapping", None)),
        attn_softcap=bool(getattr(config, "attn_logit_softcapping", None)),
        vocab=vocab, has_loss=vocab > 0, embeddings=tuple(embeddings),
    )
