"""Every private or version-sensitive hook into torch and transformers, in one place.

Each hook names the versions it was checked against (torch 2.4-2.13, transformers 4.46-5.24)
and what happens when it is missing. Nothing here changes what another thread sees: where a
transformers function must answer differently during an estimate, a wrapper installed once
answers differently only inside an estimate *of the calling thread* (a context variable) and
calls the original everywhere else.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# torch.utils._python_dispatch.TorchDispatchMode: the base of every dispatch mode (private
# module, stable since torch 1.13; the trace's storage counter subclasses it).
from torch._subclasses.fake_tensor import (  # stable torch 2.0-2.13
    DataDependentOutputException,
    DynamicOutputShapeException,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map  # private, stable since torch 1.12

from layerscope.errors import EstimateError, LayerscopeWarning, StructureError
from layerscope.process import import_once

__all__ = [
    "DATA_DEPENDENT_ERRORS",
    "TorchDispatchMode",
    "clear_hooks",
    "ddp_reducer_size",
    "disable_dispatch_modes",
    "fake_tensor_mode",
    "flop_registry",
    "fsdp1_flat_param",
    "fsdp1_members",
    "is_fsdp1_flat_param",
    "from_config",
    "no_function_modes",
    "quiet_fake_tensor_log",
    "register_attention",
    "run_backward",
    "tree_leaves",
    "tree_map",
    "unpacked_sequences",
    "use_attention",
    "use_experts",
]


def fake_tensor_mode() -> Any:
    """A new ``torch._subclasses.fake_tensor.FakeTensorMode`` (torch >= 2.0)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


DATA_DEPENDENT_ERRORS = (DataDependentOutputException, DynamicOutputShapeException)
"""What ``FakeTensorMode`` raises for an operator whose result depends on tensor values
(``.item()``, ``nonzero``...)."""


@contextlib.contextmanager
def disable_dispatch_modes() -> Iterator[None]:
    """A context in which no dispatch mode is active, fake tensors' included, so operators run
    on real tensors: ``torch.utils._python_dispatch._disable_current_modes`` and, for the fake
    mode kept in its own slot, ``torch._subclasses.fake_tensor.unset_fake_temporarily``
    (private, stable torch 2.1-2.13)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.utils._python_dispatch import _disable_current_modes

    with unset_fake_temporarily(), _disable_current_modes():
        yield


def flop_registry() -> dict[Any, Callable[..., Any]]:
    """``torch.utils.flop_counter.flop_registry`` (op overload packet -> FLOP formula), copied.

    Checked on torch 2.4-2.13. Without it (an older or changed torch) FLOPs cannot be counted:
    that is an error, never a silent zero.
    """
    try:
        from torch.utils.flop_counter import flop_registry as registry
    except ImportError as exc:  # pragma: no cover - torch < 2.1
        raise EstimateError(
            f"torch {torch.__version__} has no torch.utils.flop_counter.flop_registry; "
            "layerscope needs torch >= 2.4"
        ) from exc
    return dict(registry)


@contextlib.contextmanager
def no_function_modes() -> Iterator[None]:
    """Run ops without the active ``TorchFunctionMode``s (``torch._C.DisableTorchFunction``,
    private, torch 2.0-2.13; fake tensors and dispatch modes, which work below, are unaffected).

    For the backward of an emulated custom autograd function: :func:`run_backward` keeps the
    CUDA emulation active through backward (for recomputations under checkpointing), but a
    custom function's backward on a GPU runs outside autocast.
    """
    with torch._C.DisableTorchFunction():
        yield


def run_backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` with the torch-function modes still active.

    ``Tensor.backward`` dispatches to the active ``TorchFunctionMode``, which is popped while it
    handles the call, so a recomputation under gradient checkpointing would run without the
    CUDA emulation. The autograd engine is therefore called directly, as
    ``torch.autograd.backward`` does after its own checks (``Variable._execution_engine.
    run_backward``, private; same signature torch 2.0-2.13).
    """
    from torch.autograd.variable import Variable

    Variable._execution_engine.run_backward(
        (loss,), (torch.ones_like(loss),), False, False, (), True, True
    )


def from_config(cls: Any, config: Any, dtype: torch.dtype) -> nn.Module:
    """``cls._from_config(config, dtype=...)``: what ``AutoModel*.from_config`` calls. Private in
    transformers, stable 4.30-5.24; the dtype keyword is ``torch_dtype`` before 5.0. It applies
    the dtype to the config and its sub-configs and builds under that default dtype.

    The default dtype is the process's: while a skeleton builds (milliseconds), a tensor another
    thread creates without a dtype gets ``dtype`` too. Builds by layerscope never overlap.
    """
    import transformers

    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    # transformers builds under torch.set_default_dtype(dtype) and restores the previous default
    # afterwards: a process-wide setting. Two builds interleaving in threads would restore each
    # other's dtype and leave the process on bfloat16 for good; one build at a time cannot.
    with _BUILD_LOCK:
        return cls._from_config(config, **{dtype_kw: dtype})  # type: ignore[no-any-return]


_BUILD_LOCK = threading.Lock()


# -- transformers' packed-sequence detection ----------------------------------------------------
_UNPACKED: contextvars.ContextVar[bool] = contextvars.ContextVar("layerscope_unpacked", default=False)
_INSTALL_LOCK = threading.Lock()


def _install_packed_wrapper() -> bool:
    """Wrap ``transformers.masking_utils.find_packed_sequence_indices`` once (5.x; absent in
    4.x, where there is nothing to do). Returns whether the wrapper is in place."""
    try:
        import_once("transformers")  # the first import, safe against other threads
        import transformers.masking_utils as masking
    except ImportError:
        return False
    with _INSTALL_LOCK:
        original = getattr(masking, "find_packed_sequence_indices", None)
        if original is None:
            return False
        if getattr(original, "__layerscope_original__", None) is not None:
            return True

        @functools.wraps(original)
        def find_packed_sequence_indices(position_ids: torch.Tensor) -> Any:
            if _UNPACKED.get():
                return None
            return original(position_ids)

        find_packed_sequence_indices.__layerscope_original__ = original  # type: ignore[attr-defined]
        masking.find_packed_sequence_indices = find_packed_sequence_indices
        return True


@contextlib.contextmanager
def unpacked_sequences() -> Iterator[None]:
    """Inside this block, in this thread, transformers is told the batch holds one sequence per
    row, as it would find on real data.

    Without a KV cache, transformers checks ``position_ids`` for several sequences packed in one
    row by reading their values; on fake tensors it cannot, assumes packing and builds a dense
    mask, which sends attention to another kernel than a GPU runs. Our inputs are never packed
    (positions ``0..seq_len-1``), so the check's answer, ``None``, is given directly. Other
    threads (and this one outside the block) get the original function's answer.
    """
    _install_packed_wrapper()
    token = _UNPACKED.set(True)
    try:
        yield
    finally:
        _UNPACKED.reset(token)


# -- attention implementations ---------------------------------------------------------------
FLASH_KEYS = {
    "flash_attention_2": "layerscope_flash_attention_2",
    "flex_attention": "layerscope_flex_attention",
}
"""The names under which the flash-kernel emulation is registered with transformers'
``AttentionInterface`` (new names: transformers' own entries are never replaced). "flash" in
the first keeps transformers' ``is_flash_attention_requested`` answering as for flash-attn."""


def register_attention() -> None:
    """Register the flash-kernel emulation under :data:`FLASH_KEYS` (idempotent). Checked on
    transformers 5.0-5.24 (``AttentionInterface.register``); names without a mask function get no
    mask, as flash-attn and flex attention build none."""
    from transformers import AttentionInterface

    from layerscope.estimate.kernels import flash_attention_forward

    with _INSTALL_LOCK:
        for key in FLASH_KEYS.values():
            if key not in AttentionInterface._global_mapping:
                AttentionInterface.register(key, flash_attention_forward)


def use_attention(model: nn.Module, implementation: str) -> None:
    """Make a traced *copy* run ``implementation`` (``config._attn_implementation``, which
    transformers 5 reads at every forward and propagates to sub-configs).

    ``sdpa`` and ``eager`` run transformers' own code (the SDPA kernel is then chosen as a GPU
    would, :mod:`layerscope.estimate.kernels`); ``flash_attention_2`` and ``flex_attention`` run
    the flash-kernel emulation registered by :func:`register_attention`.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return
    name = FLASH_KEYS.get(implementation, implementation)
    if name != implementation:
        try:
            register_attention()
        except ImportError as exc:  # transformers 4.x has no AttentionInterface
            raise EstimateError(
                f"attn_implementation={implementation!r} needs transformers >= 5 to estimate"
            ) from exc
    config._attn_implementation = name


def use_experts(model: nn.Module, implementation: str | None) -> None:
    """Make a traced *copy* run its mixture-of-experts layers with ``implementation``
    (``config._experts_implementation``, read at every forward by transformers 5's
    ``use_experts_implementation`` wrapper; checked on 5.17-5.24).

    ``eager`` is traced as ``grouped_mm``: its Python loop asks the GPU which experts were hit
    (``nonzero``), which fake tensors cannot answer; a
    :class:`~layerscope.errors.LayerscopeWarning` says so. A model whose experts do not
    dispatch through that wrapper (JetMoE, Switch Transformers, NLLB-MoE: their own loops; the
    wrapper marks each experts module with ``_is_expert_parallel``) is left as it is: its loop
    is traced with balanced routing (:mod:`layerscope.estimate.values`).
    """
    config = getattr(model, "config", None)
    if implementation is None or config is None or not hasattr(config, "_experts_implementation"):
        return
    if not any(hasattr(m, "_is_expert_parallel") for m in model.modules()):
        return
    if implementation == "eager":
        warnings.warn(
            "experts_implementation='eager': memory is traced with grouped_mm (the eager loop's "
            "routing cannot run on fake tensors); its per-expert full-size weight gradients are "
            "not counted", LayerscopeWarning, stacklevel=3)
        implementation = "grouped_mm"
    config._experts_implementation = implementation
    for sub in model.modules():
        sub_config = getattr(sub, "config", None)
        if sub_config is not None and hasattr(sub_config, "_experts_implementation"):
            sub_config._experts_implementation = implementation


# -- hooks and logs ------------------------------------------------------------------------------
_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks",
)


def clear_hooks(model: nn.Module) -> None:
    """Drop every module hook of a (copied) model: a user's hooks and accelerate's device hooks
    must not run on fake tensors. ``nn.Module``'s private hook dicts, stable since torch 2.0."""
    for module in model.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(module, name, None)
            if hooks is not None:
                hooks.clear()


_TRACING_THREADS: set[int] = set()


class _TracingThreadFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread not in _TRACING_THREADS


_FAKE_LOG_FILTER = _TracingThreadFilter()


@contextlib.contextmanager
def quiet_fake_tensor_log() -> Iterator[None]:
    """Silence ``torch._subclasses.fake_tensor``'s log of a failing op for this thread only (the
    failure is reported once, as an :class:`~layerscope.errors.EstimateError`)."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    with _INSTALL_LOCK:
        if _FAKE_LOG_FILTER not in logger.filters:
            logger.addFilter(_FAKE_LOG_FILTER)
        ident = threading.get_ident()
        _TRACING_THREADS.add(ident)
    try:
        yield
    finally:
        with _INSTALL_LOCK:
            _TRACING_THREADS.discard(ident)


# -- wrapped models: FSDP1 flat parameters and DDP's reducer -------------------------------------
@dataclass(frozen=True)
class FlatMember:
    """One original tensor of an FSDP1 ``FlatParameter``.

    Attributes:
        module: the module it is registered on (by its attribute name ``name``).
        name: the attribute name on ``module`` (``weight``).
        shape: its original, unsharded shape.
        param: the original parameter object with ``use_orig_params=True``; None when FSDP1
            replaced it by views of the flat parameter (``use_orig_params=False``).
        alias_of: for a shared (tied) tensor, the index of the member it is an alias of.
    """

    module: nn.Module
    name: str
    shape: tuple[int, ...]
    param: nn.Parameter | None
    alias_of: int | None = None


def is_fsdp1_flat_param(p: torch.Tensor) -> bool:
    """Whether ``p`` is an FSDP1 ``FlatParameter`` (private marker ``_is_flat_param``, which
    ``FlatParameter.__new__`` sets; torch 2.13: the class is a metaclass check on it)."""
    return bool(getattr(p, "_is_flat_param", False))


def fsdp1_flat_param(module: nn.Module) -> Any | None:
    """The ``FlatParameter`` an FSDP1 ``FullyShardedDataParallel`` unit manages, else None.

    ``FullyShardedDataParallel._handle.flat_param`` (private; checked on torch 2.13). Without
    ``torch.distributed.fsdp`` imported no model can be wrapped by it, so nothing is imported.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FullyShardedDataParallel", None)
    if cls is None or not isinstance(module, cls):
        return None
    handle = getattr(module, "_handle", None)
    return getattr(handle, "flat_param", None)


def fsdp1_members(flat: Any) -> list[FlatMember]:
    """The original tensors an FSDP1 ``FlatParameter`` holds, shared (tied) aliases last.

    Reads ``_param_infos`` (``ParamInfo(param_name, module, module_name)``), ``_shapes``,
    ``_params`` (None unless ``use_orig_params=True``), ``_shared_param_infos``
    (``SharedParamInfo(param_name, module, module_name, prim_param_name, prim_module,
    prim_module_name)``) and ``_shared_params``: private fields of
    ``torch.distributed.fsdp._flat_param.FlatParameter``, the same NamedTuples since torch 2.0,
    checked on torch 2.13.

    Raises:
        StructureError: the fields are missing or inconsistent (a torch this was not checked
            against): the model's parameter names cannot be recovered.
    """
    try:
        infos, shapes = list(flat._param_infos), list(flat._shapes)
        params = None if flat._params is None else list(flat._params)
        shared = list(flat._shared_param_infos)
        shared_params = None if flat._shared_params is None else list(flat._shared_params)
        if len(infos) != len(shapes) or (params is not None and len(params) != len(infos)):
            raise AttributeError("_param_infos, _shapes and _params differ in length")
        members = [
            FlatMember(info.module, info.param_name, tuple(shape),
                       None if params is None else params[i])
            for i, (info, shape) in enumerate(zip(infos, shapes))
        ]
        index = {(id(m.module), m.name): i for i, m in enumerate(members)}
        for j, info in enumerate(shared):
            prim = index[(id(info.prim_module), info.prim_param_name)]
            param = None if shared_params is None else shared_params[j]
            members.append(FlatMember(info.module, info.param_name, members[prim].shape, param,
                                      prim))
    except (AttributeError, KeyError, TypeError) as exc:
        raise StructureError(
            f"torch {torch.__version__}: cannot read the original parameters of an FSDP1 flat "
            f"parameter ({exc}); layerscope reads FSDP1's FlatParameter fields as of torch 2.13"
        ) from None
    return members


def ddp_reducer_size(ddp: nn.Module) -> tuple[int, int] | None:
    """``(tensors, bytes)`` DDP's reducer was built with: the parameters that required a
    gradient when ``DistributedDataParallel`` was constructed (ignored ones left out), each
    tensor once. None where DDP does not say.

    From ``DistributedDataParallel._get_ddp_logging_data()`` (private, "prototype" in its
    docstring; its ``num_parameter_tensors`` and ``total_parameter_size_bytes`` are set from the
    reducer's parameters at construction; checked on torch 2.13).
    """
    get = getattr(ddp, "_get_ddp_logging_data", None)
    try:
        data = get() if callable(get) else None
    except (RuntimeError, AssertionError, AttributeError):
        return None
    if not isinstance(data, dict):
        return None
    tensors, size = data.get("num_parameter_tensors"), data.get("total_parameter_size_bytes")
    if isinstance(tensors, int) and isinstance(size, int):
        return tensors, size
    return None
