"""Read a model's structure once, without running it: the only reader of module internals.

``scan(model)`` works the same on a real model and on a meta-device skeleton. It records every
parameter name (aliases of tied tensors included), groups aliases by object identity, and finds
the model's parts: the block stack(s), the input embeddings, the head side and the rest.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from layerscope.errors import ModelTypeError, StructureError

EMBEDDING, BLOCK, HEAD, OTHER = "embedding", "block", "head", "other"


@dataclass(frozen=True)
class ParamInfo:
    """One parameter name. Tied aliases share ``tensor`` (an index into the model's tensors)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    numel: int
    requires_grad: bool
    tensor: int
    module: str


@dataclass(frozen=True)
class ModuleInfo:
    """A module of the model, in registration order, with the parameter names it owns directly."""

    name: str
    type_name: str
    depth: int
    own_params: tuple[str, ...]
    is_leaf: bool


@dataclass(frozen=True)
class BlockStack:
    """A run of repeated blocks, e.g. ``model.layers`` with 32 ``LlamaDecoderLayer``s."""

    path: str
    block_type: str
    blocks: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.blocks)


@dataclass(frozen=True)
class ModelScan:
    """Immutable description of a model. Totals count a shared tensor once."""

    model_type: str
    params: tuple[ParamInfo, ...]
    modules: tuple[ModuleInfo, ...]
    stacks: tuple[BlockStack, ...]
    primary: int | None
    embedding_names: frozenset[str]
    head_names: frozenset[str]
    candidates: tuple[str, ...]

    # -- parameters and tensors ------------------------------------------------------------
    @cached_property
    def by_name(self) -> dict[str, ParamInfo]:
        return {p.name: p for p in self.params}

    @cached_property
    def tensors(self) -> tuple[tuple[ParamInfo, ...], ...]:
        """Aliases grouped per tensor, in order of first appearance."""
        groups: dict[int, list[ParamInfo]] = {}
        for p in self.params:
            groups.setdefault(p.tensor, []).append(p)
        return tuple(tuple(g) for g in groups.values())

    @property
    def tie_groups(self) -> tuple[tuple[str, ...], ...]:
        """Names that share one tensor, for every tensor with more than one name."""
        return tuple(tuple(p.name for p in g) for g in self.tensors if len(g) > 1)

    def aliases(self, name: str) -> tuple[str, ...]:
        """Every name of the tensor behind ``name`` (just ``(name,)`` when untied)."""
        tensor = self.by_name[name].tensor
        return tuple(p.name for p in self.tensors[self._tensor_pos[tensor]])

    @cached_property
    def _tensor_pos(self) -> dict[int, int]:
        return {g[0].tensor: i for i, g in enumerate(self.tensors)}

    def numel(self, names: frozenset[str] | set[str] | None = None) -> int:
        """Elements in the tensors behind ``names`` (all when None), each tensor once."""
        if names is None:
            return sum(g[0].numel for g in self.tensors)
        seen = {self.by_name[n].tensor: self.by_name[n].numel for n in names}
        return sum(seen.values())

    @property
    def total_params(self) -> int:
        return self.numel()

    @property
    def trainable_params(self) -> int:
        return sum(g[0].numel for g in self.tensors if g[0].requires_grad)

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params

    @property
    def param_bytes(self) -> int:
        return sum(g[0].numel * g[0].dtype.itemsize for g in self.tensors)

    # -- structure --------------------------------------------------------------------------
    @property
    def layers(self) -> BlockStack:
        """The main block stack (the one with most parameters).

        Raises:
            StructureError: no block stack was found; the message lists what was looked at.
        """
        if self.primary is None:
            raise self._no_stack()
        return self.stacks[self.primary]

    def _no_stack(self) -> StructureError:
        seen = ", ".join(self.candidates) if self.candidates else "no submodules"
        return StructureError(
            f"{self.model_type}: no block stack found (a ModuleList or Sequential of "
            f"same-type blocks holding parameters); candidates found: {seen}"
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @cached_property
    def _block_index(self) -> dict[str, tuple[int, int]]:
        index: dict[str, tuple[int, int]] = {}
        for s, stack in enumerate(self.stacks):
            for b, prefix in enumerate(stack.blocks):
                for name in self._names_under(prefix):
                    index[name] = (s, b)
        return index

    def _names_under(self, prefix: str) -> Iterator[str]:
        dotted = prefix + "."
        return (p.name for p in self.params if p.name.startswith(dotted))

    def block_of(self, name: str) -> tuple[int, int] | None:
        """``(stack index, block index)`` of a parameter name, or None outside every stack."""
        return self._block_index.get(name)

    def block_names(self, index: int, stack: int | None = None) -> tuple[str, ...]:
        """Parameter names of block ``index`` of the main stack (or of ``stack``)."""
        s = self.primary if stack is None else stack
        if s is None:
            raise self._no_stack()
        return tuple(n for n, sb in self._block_index.items() if sb == (s, index))

    def role(self, name: str) -> str:
        """``"block"``, ``"embedding"``, ``"head"`` or ``"other"`` for a parameter name."""
        if name in self._block_index:
            return BLOCK
        if name in self.embedding_names:
            return EMBEDDING
        if name in self.head_names:
            return HEAD
        return OTHER

    def names_with_role(self, role: str) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if self.role(p.name) == role)


def check_module(model: object, func: str) -> nn.Module:
    """Return ``model`` if it is an ``nn.Module``; else a TypeError naming the function."""
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"{func}: expected a torch.nn.Module, got {type(model).__name__}")
    return model


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], ModelScan]] = (
    weakref.WeakKeyDictionary()
)
_CACHE_LOCK = threading.Lock()


def _fingerprint(model: nn.Module) -> tuple[Any, ...]:
    """What a scan records that can change on the same module object: its parameters (objects,
    shapes, dtypes, flags) and its module tree."""
    params = tuple(
        (name, id(p), p.requires_grad, p.dtype,
         None if isinstance(p, nn.parameter.UninitializedParameter) else tuple(p.shape))
        for name, p in model.named_parameters(remove_duplicate=False)
    )
    modules = tuple((name, id(m)) for name, m in model.named_modules(remove_duplicate=False))
    return params, modules


def scan(model: nn.Module) -> ModelScan:
    """Describe ``model`` (real or meta) without running it.

    The result is cached per module object until its parameters, flags or modules change, so
    every estimate of one model shares one scan.

    Raises:
        ModelTypeError: ``model`` is not an ``nn.Module``.
    """
    check_module(model, "scan")
    key = _fingerprint(model)
    with _CACHE_LOCK:
        cached = _CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    result = _scan(model)
    with _CACHE_LOCK:
        _CACHE[model] = (key, result)
    return result


def _check_initialised(model: nn.Module) -> None:
    """Lazy modules (``nn.LazyLinear``...) have no shapes until their first forward."""
    lazy = [name for name, p in model.named_parameters(remove_duplicate=False)
            if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise StructureError(
            f"scan: {len(lazy)} parameter(s) of {type(model).__name__} are not initialised yet, "
            f"e.g. {lazy[0]!r} (a lazy module such as nn.LazyLinear); run one forward first so "
            "that they have shapes"
        )


def _scan(model: nn.Module) -> ModelScan:
    _check_initialised(model)
    ids: dict[int, int] = {}
    params = []
    for name, p in model.named_parameters(remove_duplicate=False):
        tensor = ids.setdefault(id(p), len(ids))
        module = name.rpartition(".")[0]
        params.append(
            ParamInfo(name, tuple(p.shape), p.dtype, p.numel(), p.requires_grad, tensor, module)
        )
    modules = tuple(_module_infos(model))
    stacks, candidates = _find_stacks(model)
    primary = None
    if stacks:
        sizes = [
            sum({p.tensor: p.numel for p in params if p.name.startswith(s.path + ".")}.values())
            for s in stacks
        ]
        primary = max(range(len(stacks)), key=lambda i: (sizes[i], i))
    stack_prefixes = tuple(s.path + "." for s in stacks)
    in_stack = {p.name for p in params if p.name.startswith(stack_prefixes)}
    embeddings = _embedding_names(model, params, stack_prefixes)
    head = _head_names(model, params, stacks, primary, in_stack, embeddings)
    return ModelScan(
        model_type=type(model).__name__,
        params=tuple(params),
        modules=modules,
        stacks=tuple(stacks),
        primary=primary,
        embedding_names=frozenset(embeddings),
        head_names=frozenset(head),
        candidates=tuple(candidates),
    )


def _module_infos(model: nn.Module) -> Iterator[ModuleInfo]:
    for name, module in model.named_modules(remove_duplicate=False):
        own = tuple(
            f"{name}.{p}" if name else p
            for p, _ in module.named_parameters(recurse=False, remove_duplicate=False)
        )
        depth = name.count(".") + 1 if name else 0
        yield ModuleInfo(name, type(module).__name__, depth, own, not any(module.children()))


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_stack(module: nn.Module, allow_leaves: bool) -> bool:
    """A list of same-type blocks that hold parameters (leaf layers only as a fallback)."""
    children = list(module.children())
    if not children or len({type(c) for c in children}) != 1:
        return False
    if not all(_has_params(c) for c in children):
        return False
    if any(children[0].children()):
        return True
    return allow_leaves and len(children) > 1


def _find_stacks(model: nn.Module) -> tuple[list[BlockStack], list[str]]:
    """Outermost ModuleLists/Sequentials of repeated blocks, in registration order.

    Lists of leaf layers (e.g. ``ModuleList([Linear, Linear])``) count only when the model has
    no list of composite blocks, so a plain MLP still has "layers".
    """
    lists = [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and path
    ]
    for allow_leaves in (False, True):
        stacks: list[BlockStack] = []
        for path, m in lists:
            if any(path.startswith(s.path + ".") for s in stacks):
                continue  # inside a block already found: experts, sub-layers
            if _is_stack(m, allow_leaves):
                blocks = tuple(f"{path}.{child}" for child, _ in m.named_children())
                block_type = type(next(iter(m.children()))).__name__
                stacks.append(BlockStack(path, block_type, blocks))
        if stacks:
            return stacks, []
    described = [f"{path} ({len(m)} x {_child_types(m)})" for path, m in lists]
    if not described:  # say what the model holds instead
        described = [f"{n} ({type(c).__name__})" for n, c in model.named_children()]
    return [], described


def _child_types(m: nn.Module) -> str:
    names = sorted({type(c).__name__ for c in m.children()})
    return "/".join(names) if names else "empty"


def _hf_module(model: nn.Module, getter: str) -> nn.Module | None:
    """``model.get_input_embeddings()`` / ``get_output_embeddings()`` where the model has it;
    None for plain modules and for models whose getter is not implemented."""
    get = getattr(model, getter, None)
    if not callable(get):
        return None
    try:
        found = get()
    except (NotImplementedError, AttributeError):  # HF base classes without the module
        return None
    return found if isinstance(found, nn.Module) else None


def _embedding_names(
    model: nn.Module, params: list[ParamInfo], stack_prefixes: tuple[str, ...]
) -> set[str]:
    """Parameters of the input embeddings outside the blocks (token, position, token-type)."""
    emb = _hf_module(model, "get_input_embeddings")
    wanted = {id(emb)} if emb is not None else set()
    prefixes = []
    for path, m in model.named_modules():
        embedding = isinstance(m, nn.Embedding) or id(m) in wanted
        if path and embedding and not (path + ".").startswith(stack_prefixes):
            prefixes.append(path + ".")
    return {p.name for p in params if p.name.startswith(tuple(prefixes))} if prefixes else set()


def _head_names(
    model: nn.Module,
    params: list[ParamInfo],
    stacks: list[BlockStack],
    primary: int | None,
    in_stack: set[str],
    embeddings: set[str],
) -> set[str]:
    """The head side: what is registered after the main stack (final norm, output head),
    plus the output embeddings wherever they are registered."""
    head: set[str] = set()
    out = _hf_module(model, "get_output_embeddings")
    if out is not None:
        for path, m in model.named_modules(remove_duplicate=False):
            if m is out and path:
                head.update(p.name for p in params if p.name.startswith(path + "."))
    if primary is not None:
        prefix = stacks[primary].path + "."
        last = max(i for i, p in enumerate(params) if p.name.startswith(prefix))
        head.update(
            p.name for p in params[last + 1 :] if p.name not in in_stack and p.name not in embeddings
        )
    return head - embeddings
