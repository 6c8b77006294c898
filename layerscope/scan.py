"""Read a model's structure once, without running it: the only reader of module internals.

``scan(model)`` works the same on a real model and on a meta-device skeleton. It records every
parameter name (aliases of tied tensors included), groups aliases by object identity, and finds
the model's parts: the block stack(s), the input embeddings, the head side and the rest.

A model wrapped for training is read as the model it wraps, by its original parameter names
and shapes, so one plan fits the skeleton and the wrapped model alike: DDP, ``DataParallel``
and a DeepSpeed engine (the model is their ``.module``), FSDP1's ``FullyShardedDataParallel``
(``_fsdp_wrapped_module.`` segments removed, shapes read from its flat parameters, also with
``use_orig_params=False`` where the original tensors are no parameters any more),
``checkpoint_wrapper`` and ``torch.compile`` (``_checkpoint_wrapped_module.``, ``_orig_mod.``),
and FSDP2's ``fully_shard`` (DTensor parameters, names and global shapes unchanged; its
``FSDP<Name>`` classes read as ``<Name>``). :func:`flag_holders` says where each original
parameter's ``requires_grad`` lives on the wrapped model.
"""

from __future__ import annotations

import math
import sys
import threading
import weakref
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from layerscope.compat import fsdp1_flat_param, fsdp1_members, is_fsdp1_flat_param
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
    """A run of repeated blocks, e.g. ``model.layers`` with 32 ``LlamaDecoderLayer``s.

    ``block_type`` names the blocks' class, or their classes joined by ``/`` in order of first
    appearance for a hybrid stack (``"JambaMambaDecoderLayer/JambaAttentionDecoderLayer"``).
    """

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
    wrappers: tuple[str, ...] = ()
    """The wrappers the model was read through, outermost first (``DistributedDataParallel``,
    ``FullyShardedDataParallel``, ``fully_shard``, ``DeepSpeedEngine``...); empty for a bare
    model."""

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
            f"blocks holding parameters); candidates found: {seen}"
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


# -- wrappers: read a wrapped model as the model it wraps -------------------------------------
_WRAPPED_CHILD = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
"""The child under which FSDP1's ``FullyShardedDataParallel``, ``checkpoint_wrapper`` and
``torch.compile``'s ``OptimizedModule`` hold the module they wrap (their only child).
``torch.distributed.fsdp._common_utils.clean_tensor_name`` removes the same segments."""
_MODULE_WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine")
"""Wrappers that hold the model as ``.module`` (checked by class name along the class's MRO, so
DeepSpeed need not be installed and its subclasses count)."""


_HOLDS_MODULE: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _holds_module(cls: type) -> bool:
    """Whether ``cls`` is one of :data:`_MODULE_WRAPPERS` or a subclass (cached per class: a
    scan asks for every module)."""
    found = _HOLDS_MODULE.get(cls)
    if found is None:
        found = _HOLDS_MODULE[cls] = any(c.__name__ in _MODULE_WRAPPERS for c in cls.__mro__)
    return found


def _wrapped(module: nn.Module) -> nn.Module | None:
    """The module ``module`` wraps when it is a wrapper, else None."""
    children = module._modules
    if len(children) == 1:
        name, child = next(iter(children.items()))
        if name in _WRAPPED_CHILD and child is not None:
            return child
    return children.get("module") if _holds_module(type(module)) else None


def _unwrap(module: nn.Module) -> nn.Module:
    """The module under every wrapper around ``module``."""
    inner = _wrapped(module)
    while inner is not None:
        module, inner = inner, _wrapped(inner)
    return module


def _fsdp2_base() -> type | None:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is fully_shard'ed
    base = getattr(fsdp, "FSDPModule", None)
    return base if isinstance(base, type) else None


def _class_name(module: nn.Module, fsdp2: type | None) -> str:
    """The class name, ``fully_shard``'s ``FSDP<Name>`` subclass read as ``<Name>``."""
    cls = type(module)
    if fsdp2 is not None and fsdp2 in cls.__bases__:
        cls = next((b for b in cls.__bases__ if b is not fsdp2), cls)
    return cls.__name__


@dataclass(frozen=True)
class _Tree:
    """A model read through its wrappers.

    Attributes:
        modules: ``(name, module)`` as ``named_modules(remove_duplicate=False)`` gives them on
            the bare model: every wrapper skipped, each module the one the wrappers hold.
        wrappers: the wrapper modules passed, outermost first.
    """

    modules: list[tuple[str, nn.Module]]
    wrappers: list[nn.Module]

    def unique(self) -> list[tuple[str, nn.Module]]:
        """As ``named_modules()``: a module reached twice only under its first name."""
        seen: set[int] = set()
        out = []
        for name, module in self.modules:
            if id(module) not in seen:
                seen.add(id(module))
                out.append((name, module))
        return out


def _tree(model: nn.Module) -> _Tree:
    modules: list[tuple[str, nn.Module]] = []
    wrappers: list[nn.Module] = []
    stack = [("", model)]
    while stack:
        path, module = stack.pop()
        inner = _wrapped(module)
        while inner is not None:
            wrappers.append(module)
            module, inner = inner, _wrapped(inner)
        modules.append((path, module))
        children = [(f"{path}.{name}" if path else name, child)
                    for name, child in module._modules.items() if child is not None]
        stack.extend(reversed(children))
    return _Tree(modules, wrappers)


@dataclass(frozen=True)
class FlagHolder:
    """Where one original parameter's ``requires_grad`` lives on a (possibly wrapped) model.

    Attributes:
        param: the parameter whose flag to read or set: the parameter itself, or the FSDP1
            flat parameter that holds it (``use_orig_params=False``).
        flat: ``param`` is an FSDP1 flat parameter: one flag for every tensor it holds.
    """

    param: nn.Parameter
    flat: bool = False


@dataclass(frozen=True)
class _Entry:
    name: str
    module: str
    key: Hashable
    shape: tuple[int, ...]
    holder: FlagHolder


def _entries(tree: _Tree) -> list[_Entry]:
    """Every original parameter name in registration order (aliases included), with the
    original shape and the identity of its tensor (aliases share ``key``)."""
    shapes: dict[int, tuple[int, ...]] = {}  # FSDP1 use_orig_params=True: id(param) -> shape
    owned: dict[int, list[tuple[str, tuple[int, ...], Hashable, FlagHolder]]] = {}
    for wrapper in tree.wrappers:
        flat = fsdp1_flat_param(wrapper)
        if flat is None:
            continue
        members = fsdp1_members(flat)
        holder = FlagHolder(flat, flat=True)
        for i, m in enumerate(members):
            if m.param is not None:
                shapes[id(m.param)] = m.shape
            else:  # replaced by views of the flat parameter: no parameter of its own any more
                key = (id(flat), i if m.alias_of is None else m.alias_of)
                owned.setdefault(id(m.module), []).append((m.name, m.shape, key, holder))
    entries = []
    for path, module in tree.modules:
        prefix = path + "." if path else ""
        for name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            if not is_fsdp1_flat_param(p):
                shape = shapes.get(id(p), tuple(p.shape))
                entries.append(_Entry(prefix + name, path, id(p), shape, FlagHolder(p)))
        for name, shape, tensor, holder in owned.get(id(module), ()):
            entries.append(_Entry(prefix + name, path, tensor, shape, holder))
    return entries


def flag_holders(model: nn.Module) -> dict[str, FlagHolder]:
    """Original parameter name -> where its ``requires_grad`` lives (see :class:`FlagHolder`).

    The names are :func:`scan`'s: those of the model under any wrapper.

    Raises:
        ModelTypeError: ``model`` is not an ``nn.Module``.
        StructureError: FSDP1's flat parameters cannot be read on this torch.
    """
    check_module(model, "flag_holders")
    return {e.name: e.holder for e in _entries(_tree(model))}


def _wrapper_names(tree: _Tree, fsdp2: type | None) -> tuple[str, ...]:
    names = [type(m).__name__ for m in tree.wrappers]
    if fsdp2 is not None and any(isinstance(m, fsdp2) for _, m in tree.modules):
        names.append("fully_shard")
    return tuple(dict.fromkeys(names))


# -- the scan ---------------------------------------------------------------------------------
def _scan(model: nn.Module) -> ModelScan:
    _check_initialised(model)
    fsdp2 = _fsdp2_base()
    tree = _tree(model)
    entries = _entries(tree)
    ids: dict[Hashable, int] = {}
    params = []
    for e in entries:
        tensor = ids.setdefault(e.key, len(ids))
        p = e.holder.param
        params.append(ParamInfo(e.name, e.shape, p.dtype, math.prod(e.shape), p.requires_grad,
                                tensor, e.module))
    own: dict[str, list[str]] = {}
    for e in entries:
        own.setdefault(e.module, []).append(e.name)
    root = tree.modules[0][1]
    modules = tuple(
        ModuleInfo(path, _class_name(m, fsdp2), path.count(".") + 1 if path else 0,
                   tuple(own.get(path, ())), _is_leaf(m))
        for path, m in tree.modules
    )
    unique = tree.unique()
    stacks, candidates = _find_stacks(unique, _holding(entries), fsdp2)
    primary = None
    if stacks:
        sizes = [
            sum({p.tensor: p.numel for p in params if p.name.startswith(s.path + ".")}.values())
            for s in stacks
        ]
        primary = max(range(len(stacks)), key=lambda i: (sizes[i], i))
    stack_prefixes = tuple(s.path + "." for s in stacks)
    in_stack = {p.name for p in params if p.name.startswith(stack_prefixes)}
    embeddings = _embedding_names(unique, root, params, stack_prefixes)
    head = _head_names(tree, root, params, stacks, primary, in_stack, embeddings)
    return ModelScan(
        model_type=_class_name(root, fsdp2),
        params=tuple(params),
        modules=modules,
        stacks=tuple(stacks),
        primary=primary,
        embedding_names=frozenset(embeddings),
        head_names=frozenset(head),
        candidates=tuple(candidates),
        wrappers=_wrapper_names(tree, fsdp2),
    )


def _is_leaf(module: nn.Module) -> bool:
    return all(c is None for c in module._modules.values())


def _holding(entries: list[_Entry]) -> set[str]:
    """Paths of the modules that hold a parameter, themselves or below them."""
    out: set[str] = set()
    for e in entries:
        parts = e.module.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def _is_stack(path: str, module: nn.Module, holding: set[str], fsdp2: type | None,
              allow_leaves: bool) -> bool:
    """A list of blocks that hold parameters: composite modules of one class, or of several
    (hybrid stacks: Jamba's attention and Mamba layers, OLMo-hybrid's attention and
    linear-attention layers); lists of same-type leaf layers only as a fallback."""
    children = [(name, _unwrap(c)) for name, c in module._modules.items() if c is not None]
    if not children or not all(f"{path}.{name}" in holding for name, _ in children):
        return False
    if not any(_is_leaf(c) for _, c in children):
        return True
    return allow_leaves and len(children) > 1 and len({_class_name(c, fsdp2) for _, c in children}) == 1


def _find_stacks(
    unique: list[tuple[str, nn.Module]], holding: set[str], fsdp2: type | None
) -> tuple[list[BlockStack], list[str]]:
    """Outermost ModuleLists/Sequentials of repeated blocks, in registration order.

    Lists of leaf layers (e.g. ``ModuleList([Linear, Linear])``) count only when the model has
    no list of composite blocks, so a plain MLP still has "layers".
    """
    lists = [
        (path, m)
        for path, m in unique
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and path
    ]
    for allow_leaves in (False, True):
        stacks: list[BlockStack] = []
        for path, m in lists:
            if any(path.startswith(s.path + ".") for s in stacks):
                continue  # inside a block already found: experts, sub-layers
            if _is_stack(path, m, holding, fsdp2, allow_leaves):
                kids = [(child, _unwrap(c)) for child, c in m._modules.items() if c is not None]
                blocks = tuple(f"{path}.{child}" for child, _ in kids)
                types = dict.fromkeys(_class_name(c, fsdp2) for _, c in kids)
                block_type = "/".join(types)  # several classes: a hybrid stack
                stacks.append(BlockStack(path, block_type, blocks))
        if stacks:
            return stacks, []
    described = [f"{path} ({len(m)} x {_child_types(m, fsdp2)})" for path, m in lists]
    if not described:  # say what the model holds instead
        root = unique[0][1]
        described = [f"{n} ({_class_name(_unwrap(c), fsdp2)})"
                     for n, c in root._modules.items() if c is not None]
    return [], described


def _child_types(m: nn.Module, fsdp2: type | None) -> str:
    names = sorted({_class_name(_unwrap(c), fsdp2) for c in m.children()})
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
    unique: list[tuple[str, nn.Module]], root: nn.Module, params: list[ParamInfo],
    stack_prefixes: tuple[str, ...]
) -> set[str]:
    """Parameters of the input embeddings outside the blocks (token, position, token-type)."""
    emb = _hf_module(root, "get_input_embeddings")
    wanted = {id(emb)} if emb is not None else set()
    prefixes = []
    for path, m in unique:
        embedding = isinstance(m, nn.Embedding) or id(m) in wanted
        if path and embedding and not (path + ".").startswith(stack_prefixes):
            prefixes.append(path + ".")
    return {p.name for p in params if p.name.startswith(tuple(prefixes))} if prefixes else set()


def _head_names(
    tree: _Tree,
    root: nn.Module,
    params: list[ParamInfo],
    stacks: list[BlockStack],
    primary: int | None,
    in_stack: set[str],
    embeddings: set[str],
) -> set[str]:
    """The head side: what is registered after the main stack (final norm, output head),
    plus the output embeddings wherever they are registered."""
    head: set[str] = set()
    out = _hf_module(root, "get_output_embeddings")
    if out is not None:
        out = _unwrap(out)
        for path, m in tree.modules:
            if m is out and path:
                head.update(p.name for p in params if p.name.startswith(path + "."))
    if primary is not None:
        prefix = stacks[primary].path + "."
        last = max(i for i, p in enumerate(params) if p.name.startswith(prefix))
        head.update(
            p.name for p in params[last + 1 :] if p.name not in in_stack and p.name not in embeddings
        )
    return head - embeddings
