"""What the time model needs to know about a model, found once per block type: its matmuls
(every Linear / Conv1D / expert weight, with the share of tokens routed through it), norms,
activations, dropout, attention shape, embeddings and output head.

Read from the scan and, when the model has one, its ``config`` (attention heads, MoE top-k,
rotary, sliding windows, soft-capping, attention implementation). Nothing here runs the model.
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
    attention: bool = False  # inside the attention module (its projections)


@dataclass
class Part:
    """The kernels of one block type, or of everything outside the blocks."""

    gemms: list[Gemm] = field(default_factory=list)
    norms: list[tuple[int, bool]] = field(default_factory=list)  # (width, one fused kernel)
    act_kernels: list[int] = field(default_factory=list)  # dense MLP activations
    routed_act_kernels: list[int] = field(default_factory=list)  # inside the routed experts
    dropouts: int = 0  # dropout modules run on the hidden states (not attention's)
    attn_dropout: float = 0.0  # p of a dropout module inside attention (on the scores)
    experts: int = 0  # routed experts (E), 0 without

    @property
    def mlp_width(self) -> int:
        """Width the dense MLP's activation runs on: the widest input of a dense GEMM (the
        down projection); 0 without a dense activation."""
        if not self.act_kernels:
            return 0
        return max((g.n_in for g in self.gemms if g.share == 1), default=0)

    @property
    def gated(self) -> bool:
        """A GLU MLP (gate * up): two GEMMs produce the MLP width, or one fused one twice it."""
        return _gated(self.mlp_width, [g for g in self.gemms if g.share == 1])

    @property
    def mlp_share(self) -> float:
        return 1.0

    @property
    def routed_width(self) -> int:
        """Width the routed experts' activation runs on (their down projection's input)."""
        return max((g.n_in for g in self.gemms if g.share < 1), default=0)

    @property
    def routed_gated(self) -> bool:
        return _gated(self.routed_width, [g for g in self.gemms if g.share < 1])


def reads_stream(part: Part, hidden: int) -> list[bool]:
    """Per GEMM of ``part``: does it read the residual stream (a norm's output, fp32 under
    autocast, so cast to bf16 before the matmul)? The projections into attention and into the
    MLP (and a router) do; attention's output projection reads attention's output and the
    down projection the activation's, both already bf16. Routed experts are not autocast."""
    attention = [i for i, g in enumerate(part.gemms) if g.attention]
    last_attention = attention[-1] if len(attention) > 1 else None
    return [g.share == 1 and g.n_in == hidden and i != last_attention
            for i, g in enumerate(part.gemms)]


def _gated(width: int, gemms: list[Gemm]) -> bool:
    outs = [g.n_out for g in gemms]
    return bool(width) and (outs.count(width) >= 2 or 2 * width in outs)


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
                kernels = _ACTIVATION_KERNELS.get(info.type_name.lower(), 1)
                (part.routed_act_kernels if routed else part.act_kernels).append(kernels)
            elif info.is_leaf and kind == "dropout" and training:
                rate = float(getattr(model.get_submodule(info.name), "p", 0.0))
                if ATTENTION_NAMES.search(rel) and re.search(r"attn_drop|attention_drop", rel):
                    part.attn_dropout = max(part.attn_dropout, rate)  # on the scores
                else:
                    part.dropouts += rate > 0
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
                part.gemms.append(Gemm(p.name[cut:], n_in, n_out, 1, share, bias,
                                       bool(ATTENTION_NAMES.search(rel))))
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
    blocks: tuple[Part, ...]  # one per block of the stack (alike blocks share one Part)
    outside: Part
    prefixes: tuple[str, ...]
    heads: int
    kv_heads: int
    head_dim: int
    rotary: bool
    sliding: tuple[int | None, ...]
    logit_softcap: bool
    attn_implementation: str  # "sdpa", "eager", "flash_attention_2", "flex_attention"
    attn_softcap: bool
    vocab: int
    has_loss: bool
    embeddings: tuple[tuple[str, int, int], ...]  # (name, rows, width)
    experts_implementation: str | None = None  # None: no routed experts
    attn_dropout: float = 0.0  # dropout on the attention probabilities, in training
    input_grads: bool = False  # gradient checkpointing makes the embedding output need grad
    causal: bool = True  # decoder self-attention (False: an encoder attends to every key)

    @property
    def block(self) -> Part:
        """The first block's kinds of kernels (every block's, in a uniform stack)."""
        return self.blocks[0] if self.blocks else Part()

    @property
    def experts(self) -> bool:
        """Some block routes tokens to experts."""
        return any(b.experts for b in self.blocks)

    @property
    def eager_attention(self) -> bool:
        """Scores materialised as a tensor (``attn_implementation="eager"``)."""
        return self.attn_implementation == "eager"


def _config_int(config: Any, *names: str) -> int:
    """The first of ``names`` the config sets to an int (0 if none). A value that varies per
    layer (a heterogeneous config, e.g. Gemma-4's ``head_dim``, refuses a global read) is the
    one most layers have (:func:`per_layer_value`)."""
    for name in names:
        value = _config_get(config, name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def _config_get(config: Any, name: str) -> Any:
    try:
        return getattr(config, name, None)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        return per_layer_value(config, name)


def per_layer_value(config: Any, name: str) -> Any:
    """The value of ``name`` that most layers of a heterogeneous config have
    (``config.per_layer_config[i].<name>``, transformers >= 5.20), the first layer's on a tie;
    None when the config has no per-layer view."""
    try:
        values = [getattr(layer, name, None) for layer in config.per_layer_config]
    except (AttributeError, TypeError, RuntimeError):
        return None
    values = [v for v in values if v is not None]
    if not values:
        return None
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], -values.index(v)))


def analyse(model: nn.Module, training: bool, attn_implementation: str | None = None,
            experts_implementation: str | None = None) -> ModelShape:
    """The model's shape for the time estimate.

    ``attn_implementation`` / ``experts_implementation``: what the step runs; None reads the
    model's config (``_attn_implementation``, ``_experts_implementation``), as transformers
    does. Experts held as separate ``nn.Linear`` modules always run as a Python loop.
    """
    s = scan(model)
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    config = get_text() if callable(get_text) else config  # a VLM's sizes are its text model's
    num_experts = _config_int(config, "num_local_experts", "num_experts", "n_routed_experts")
    top_k = _config_int(config, "num_experts_per_tok", "moe_topk", "top_k")
    prefixes: tuple[str, ...] = s.layers.blocks if s.primary is not None else ()
    first = prefixes[0] + "." if prefixes else ""
    in_block = [m for m in s.modules if first and m.name.startswith(first)]
    primary = s.layers.path + "." if prefixes else None
    outside = [m for m in s.modules
               if (m.name or m.own_params) and not (primary and m.name.startswith(primary))]
    blocks = _blocks(model, s, prefixes, num_experts, top_k, training)
    rest = describe(model, s, outside, 0, num_experts, top_k, training)
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    heads = _config_int(config, "num_attention_heads", "n_head")
    kv_heads = _config_int(config, "num_key_value_heads") or heads
    head_dim = _config_int(config, "head_dim") or (hidden // heads if heads else 0)
    has_attention = heads > 0 and any(ATTENTION_NAMES.search(m.name[len(first):])
                                      for m in in_block)
    rope = _config_get(config, "rope_parameters") or _config_get(config, "rope_theta")
    layer_types = _config_get(config, "layer_types") or ()
    window = _config_int(config, "sliding_window")
    # with layer_types, the layers marked sliding; without, every layer when a window is set
    # (Mistral v0.1, Phi-3 build create_sliding_window_causal_mask for the whole stack)
    sliding = tuple(
        window if window and (not layer_types or (i < len(layer_types)
                                                  and "sliding" in str(layer_types[i]))) else None
        for i in range(len(prefixes))
    )
    if getattr(config, "use_sliding_window", True) is False:
        sliding = tuple(None for _ in prefixes)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    vocab = head.weight.shape[0] if isinstance(head, nn.Linear) else 0
    embeddings = []
    for m in s.modules:
        if m.own_params and m.type_name == "Embedding" and set(m.own_params) <= s.embedding_names:
            rows, width = s.by_name[m.own_params[0]].shape
            embeddings.append((m.own_params[0], rows, width))
    block = blocks[0] if blocks else Part()
    return ModelShape(
        scan=s, blocks=blocks, outside=rest, prefixes=prefixes,
        heads=heads if has_attention else 0, kv_heads=kv_heads, head_dim=head_dim,
        rotary=bool(rope) and has_attention, sliding=sliding,
        logit_softcap=bool(_config_get(config, "final_logit_softcapping")),
        attn_implementation=(attn_implementation
                             or getattr(config, "_attn_implementation", None) or "sdpa"),
        attn_softcap=bool(_config_get(config, "attn_logit_softcapping")),
        vocab=vocab, has_loss=vocab > 0, embeddings=tuple(embeddings),
        experts_implementation=_experts(
            next((b for b in blocks if b.experts), block), config, experts_implementation),
        input_grads=getattr(model, "main_input_name", None) == "input_ids",
        attn_dropout=max(block.attn_dropout, _config_float(config, "attention_dropout")),
        causal=_causal(model, first),
    )


def _causal(model: nn.Module, first: str) -> bool:
    """transformers' attention modules say whether they are causal (``is_causal``)."""
    for name, module in model.named_modules():
        if name.startswith(first) and hasattr(module, "is_causal"):
            return bool(module.is_causal)
    return True


def _config_float(config: Any, name: str) -> float:
    value = _config_get(config, name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _blocks(model: nn.Module, s: ModelScan, prefixes: tuple[str, ...], num_experts: int,
            top_k: int, training: bool) -> tuple[Part, ...]:
    """Each block's kernels; blocks alike (same modules, types and parameter shapes: a dense
    first layer before MoE layers is not alike) share one description."""
    by_prefix: dict[str, list[Any]] = {p: [] for p in prefixes}
    for m in s.modules:
        parts = m.name.split(".")
        for i in range(1, len(parts)):
            owner = ".".join(parts[:i])
            if owner in by_prefix:
                by_prefix[owner].append(m)
                break
    described: dict[tuple[Any, ...], Part] = {}
    out = []
    for p in prefixes:
        infos = by_prefix[p]
        cut = len(p) + 1
        key = tuple((m.name[cut:], m.type_name, tuple(tuple(s.by_name[n].shape)
                                                      for n in m.own_params)) for m in infos)
        if key not in described:
            described[key] = describe(model, s, infos, cut, num_experts, top_k, training)
        out.append(described[key])
    return tuple(out)


def _experts(block: Part, config: Any, requested: str | None) -> str | None:
    """The experts implementation the blocks run, None without routed experts."""
    routed = [g for g in block.gemms if g.share < 1]
    if not routed:
        return None
    if any(g.count == 1 for g in routed):
        return "eager"  # one nn.Linear per expert: transformers' Python loop
    return requested or getattr(config, "_experts_implementation", None) or "grouped_mm"
