"""One training step traced on fake tensors, for a model reduced to one block per kind.

The model is never run for real and never modified. :func:`trace_step` copies the skeleton
with only one representative of each *kind* of block (same parameter flags, same LoRA targets,
whether its input needs a gradient, same layer type), swaps every tensor for a fake one of the
target dtype, and runs forward and backward under
:class:`torch._subclasses.fake_tensor.FakeTensorMode`, with :class:`~.kernels.CudaKernels` making
autocast and attention behave as on a CUDA GPU. A dispatch mode watches every storage the step
allocates (rounded as the CUDA caching allocator rounds) and when it dies, and attributes each
change to a *segment*: the embedding part, the forward of each block, the head and loss, the
backward of each of those. Because a block's segments are the same wherever the block sits,
the step of the full model is the concatenation of segments in execution order
(:func:`replay`), which is how a 126-block model costs the trace of one or two blocks.

Each segment also records the FLOPs of its operators (``torch.utils.flop_counter``'s formulas)
and the bytes its outputs allocate, for a time estimator to reuse, and its allocation *events*
(every allocation and free, in order), which :mod:`~layerscope.estimate.allocator` replays
block by block to simulate the CUDA caching allocator.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerscope.compat import (
    TorchDispatchMode,
    clear_hooks,
    flop_registry,
    quiet_fake_tensor_log,
    run_backward,
    tree_leaves,
    unpacked_sequences,
)
from layerscope.errors import UnsupportedModelError
from layerscope.estimate.input_types import (
    InputTensor,
    StepInputs,
    count_features,
    feature_arguments,
    features_function,
)
from layerscope.estimate.inputs import causal_lm_inputs
from layerscope.estimate.kernels import CudaKernels
from layerscope.estimate.values import KnownConstants, KnownValues

ALLOCATOR_ROUNDING = 512
"""Bytes: the CUDA caching allocator rounds every block up to a multiple of 512
(``c10/cuda/CUDACachingAllocator.cpp``, ``kMinBlockSize``/``round_size``), and
``max_memory_allocated`` counts the rounded sizes."""


def rounded(nbytes: int) -> int:
    """``nbytes`` as the CUDA caching allocator accounts it (a multiple of 512, at least 512)."""
    if nbytes <= 0:
        return 0
    return -(-nbytes // ALLOCATOR_ROUNDING) * ALLOCATOR_ROUNDING


@dataclass(frozen=True)
class Segment:
    """Memory change of one part of the step, in bytes relative to its start.

    Attributes:
        net: live bytes at the end minus live bytes at the start.
        high: the highest live bytes reached inside, relative to the start (>= 0).
        flops: floating-point operations of the part (``torch.utils.flop_counter`` formulas).
        allocated: bytes of every storage the part allocated (a proxy for memory traffic).
        freed_per_block: ``(kind, bytes)``: what this part (outside the blocks) frees that a block
            of that kind allocated, once per such block (e.g. autocast's cast weights, dropped
            when the forward ends); the replay frees it once per block of the full model.
    """

    net: int = 0
    high: int = 0
    flops: int = 0
    allocated: int = 0
    freed_per_block: tuple[tuple[Any, int], ...] = ()


Alloc = tuple[str, int]
"""``("a", bytes)``: a storage allocated (allocator-rounded bytes)."""
Free = tuple[str, tuple[Any, str], int]
"""``("f", segment, index)``: the ``index``-th allocation of ``segment`` freed."""


@dataclass(frozen=True)
class StepTrace:
    """The segments of one traced step of a reduced model.

    ``segments`` maps ``(part, phase)`` to a :class:`Segment`, where ``part`` is ``"embed"``,
    ``"head"`` or the kind index of a block, and ``phase`` is ``"fwd"`` or ``"bwd"``; plus
    ``("head", "release")`` (the model output dropped after the loss is taken) and
    ``("head", "end")`` (the loss dropped after backward).

    ``events`` maps the same keys to the segment's allocations and frees in order
    (:data:`Alloc`, :data:`Free`); a storage still alive when the step ends (a gradient) has
    no free. ``passed`` holds the ``(segment, index)`` of the tensors a part hands to the next
    one: a block's output in forward, the gradient of its input in backward.
    ``kinds`` is the kind of each block of the traced (reduced) model, in order.
    ``assumptions`` says what the trace assumed where only values decide (balanced routing,
    :mod:`layerscope.estimate.values`).
    """

    segments: dict[tuple[Any, str], Segment]
    events: dict[tuple[Any, str], tuple[Alloc | Free, ...]] = dataclasses.field(default_factory=dict)
    passed: frozenset[tuple[tuple[Any, str], int]] = frozenset()
    kinds: tuple[Any, ...] = ()
    assumptions: tuple[str, ...] = ()


_GLOBAL_PARTS = ("embed", "head")

_HOST_OUTPUTS: dict[Any, frozenset[int]] = {
    torch.ops.aten._scaled_dot_product_efficient_attention.default: frozenset({2, 3}),
}
"""Outputs that a CUDA GPU keeps in host memory: the memory-efficient kernel's RNG seed and
offset, 0-dim int64 tensors made without a device (``at::empty({}, at::dtype(at::kLong))`` in
``attention.cu``) unless it runs under CUDA graph capture. (The flash kernel's RNG state is
made on the GPU, ``.device(at::kCUDA)``, and is counted.)"""


class _Tracker(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts live storages (allocator-rounded) and attributes changes to the current segment."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.live = 0
        self.current: tuple[Any, str] = ("embed", "fwd")
        self._start: dict[tuple[Any, str], int] = {}
        self._high: dict[tuple[Any, str], int] = {}
        self._end: dict[tuple[Any, str], int] = {}
        self._flops: dict[tuple[Any, str], int] = {}
        self._alloc: dict[tuple[Any, str], int] = {}
        self._freed_per_block: dict[tuple[Any, str], dict[Any, int]] = {}
        # allocation events per segment; off once the step is over (what dies later outlived it)
        self._events: dict[tuple[Any, str], list[Alloc | Free]] = {}
        self._count: dict[tuple[Any, str], int] = {}
        self.passed: set[tuple[tuple[Any, str], int]] = set()
        self.recording = True
        # storage -> [bytes, allocating segment, passed on as a block's output, index in segment]
        self._info: weakref.WeakKeyDictionary[Any, list[Any] | None] = weakref.WeakKeyDictionary()
        self._finalizers: list[Any] = []  # weakref.finalize objects
        self.switch(self.current)

    def total(self) -> int:
        """Live bytes now (a subclass may add memory it watches another way)."""
        return self.live

    def switch(self, segment: tuple[Any, str]) -> None:
        live = self.total()
        self._end[self.current] = live
        self.current = segment
        # A segment can recur (a block kind's backward re-entered); keep the first start.
        self._start.setdefault(segment, live)
        self._high.setdefault(segment, live)

    def ignore(self, tensors: Iterable[torch.Tensor]) -> None:
        """Storages that exist before the step (weights, buffers): their views allocate nothing.
        A distributed tensor stands for its local shard."""
        for t in tensors:
            local = getattr(t, "_local_tensor", t)
            self._info[local.untyped_storage()] = None

    def mark_passed_on(self, t: torch.Tensor) -> None:
        """``t`` is a block's output: freed once by whoever consumes it, not once per block."""
        info = self._info.get(t.untyped_storage())
        if info is not None:
            info[2] = True
            self.passed.add((info[1], info[3]))

    def _free(self, info: list[Any]) -> None:
        nbytes, allocated_in, passed_on, index = info
        if self.recording:
            self._events.setdefault(self.current, []).append(("f", allocated_in, index))
        self.live -= nbytes
        if passed_on:
            return
        if self.current[0] in _GLOBAL_PARTS and allocated_in[0] not in _GLOBAL_PARTS:
            per_kind = self._freed_per_block.setdefault(self.current, {})
            per_kind[allocated_in[0]] = per_kind.get(allocated_in[0], 0) + nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        seg = self.current
        flop_fn = _FLOP_REGISTRY.get(func._overloadpacket)
        if flop_fn is not None:  # the registry's formulas take tensors and read their shapes
            flops = int(flop_fn(*args, **(kwargs or {}), out_val=out))
            self._flops[seg] = self._flops.get(seg, 0) + flops
        host = _HOST_OUTPUTS.get(func)
        for i, t in enumerate(tree_leaves(out)):
            if not isinstance(t, torch.Tensor) or (host is not None and i in host):
                continue
            storage = t.untyped_storage()
            if storage in self._info:
                continue
            size = rounded(storage.nbytes())
            index = self._count.get(seg, 0)
            self._count[seg] = index + 1
            self._events.setdefault(seg, []).append(("a", size))
            info = [size, seg, False, index]
            self._info[storage] = info
            self.live += size
            self._alloc[seg] = self._alloc.get(seg, 0) + size
            self._finalizers.append(weakref.finalize(storage, self._free, info))
        live = self.total()
        if live > self._high[seg]:
            self._high[seg] = live
        return out

    def close(self) -> None:
        """Stop counting: storages that outlive the step (gradients of the traced copy) then
        die without running Python code, wherever and whenever the collector frees them."""
        for f in self._finalizers:
            f.detach()
        self._finalizers.clear()

    def segments(self) -> dict[tuple[Any, str], Segment]:
        self._end[self.current] = self.total()
        return {
            key: Segment(
                net=self._end[key] - start,
                high=max(0, self._high[key] - start),
                flops=self._flops.get(key, 0),
                allocated=self._alloc.get(key, 0),
                freed_per_block=tuple(self._freed_per_block.get(key, {}).items()),
            )
            for key, start in self._start.items()
        }

    def events(self) -> dict[tuple[Any, str], tuple[Alloc | Free, ...]]:
        return {key: tuple(log) for key, log in self._events.items()}


def _grouped_mm_flops(a: torch.Tensor, b: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    """``torch._grouped_mm`` (MoE experts): every row of ``a`` meets one group's matrix, so
    ``2 * a.numel() * b.shape[-1]`` for each layout autograd uses (2-D x 3-D forward, 2-D x 2-D
    weight gradient, 3-D x 3-D batched). ``flop_counter`` has no formula for it."""
    return 2 * a.numel() * b.shape[-1]


_FLOP_REGISTRY: dict[Any, Any] = flop_registry()
if hasattr(torch.ops.aten, "_grouped_mm"):
    _FLOP_REGISTRY.setdefault(torch.ops.aten._grouped_mm, _grouped_mm_flops)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, torch.Tensor):
                return v
    return None


class ReshapingBlocks(Exception):
    """A block's output has another shape than its input (a strided convolution, a downsampling
    stage): a reduced stack would run on other shapes than the full one."""


def reduced_copy(
    model: nn.Module, blocks: nn.ModuleList, representatives: Sequence[int]
) -> tuple[nn.Module, nn.ModuleList, dict[int, Any]]:
    """A deep copy of ``model`` whose block stack holds only ``representatives``.

    Returns:
        The copy, its block list, and the deepcopy memo (``id(original) -> copy``).
    """
    memo: dict[int, Any] = {}
    # Tensors are copied as meta placeholders: a real model's weights are never duplicated.
    for t in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(t, device="meta")
        is_param = isinstance(t, nn.Parameter)
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if is_param else meta
    kept = nn.ModuleList([copy.deepcopy(blocks[i], memo) for i in representatives])
    memo[id(blocks)] = kept
    reduced = copy.deepcopy(model, memo)
    clear_hooks(reduced)  # the user's (and accelerate's) hooks must not see fake tensors
    owner = next((m for m in reduced.modules() if any(c is kept for c in m.children())), None)
    configs = [getattr(reduced, "config", None), getattr(owner, "config", None)]
    for config in {id(c): c for c in configs if c is not None}.values():
        reduce_config_depth(config, len(blocks), representatives)
    for position, block in enumerate(kept):
        for sub in block.modules():  # the KV cache is indexed by layer_idx
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = position  # type: ignore[assignment]
    return reduced, kept, memo


_REFUSED = (AttributeError, NotImplementedError, RuntimeError, TypeError, ValueError)
"""What a config raises when an attribute cannot be read or set (a property without setter,
ProphetNet's depth, a heterogeneous config's per-layer value, a validation error)."""

DEPTH_ATTRIBUTES = ("num_hidden_layers", "n_layer", "num_layers")
"""Config attributes that give the depth of a block stack."""


def _per_layer(config: Any, n: int) -> dict[str, Any]:
    """The config's per-layer values for ``n`` layers: lists (or pattern strings) of length
    ``n`` named for layers, blocks or patterns (``layer_types``, Jamba's ``layers_block_type``
    and ``layers_num_experts``, Nemotron-H's ``hybrid_override_pattern``), properties too."""
    found = {}
    for name in dir(config):
        if name.startswith("_") or not any(w in name for w in ("layer", "block", "pattern")):
            continue
        try:
            value = getattr(config, name)
        except _REFUSED:  # a property that refuses (Gemma-4's per-layer accessors)
            continue
        if isinstance(value, (list, tuple, str)) and len(value) == n and n > 1:
            found[name] = value
    return found


def reduce_config_depth(config: Any, n: int, representatives: Sequence[int]) -> None:
    """Make a *copied* config describe the reduced stack: its depth and per-layer values kept
    for ``representatives`` only.

    transformers derives some per-layer values from others through read-only properties
    (Mamba's ``layer_types``, Jamba's and RecurrentGemma's ``layers_block_type``) and refuses
    some depths (ProphetNet's ``num_hidden_layers``). A derived value that is already right
    after the depth change is left alone; one that is not is fixed on this copy only, by giving
    it a subclass of its config class that holds the value. A depth the config refuses to set
    is left as it is: the stack that runs is the reduced module list.
    """
    before = _per_layer(config, n)
    for attr in DEPTH_ATTRIBUTES:
        if getattr(config, attr, None) == n:
            with contextlib.suppress(*_REFUSED):
                setattr(config, attr, len(representatives))
    overrides = {}
    for name, value in before.items():
        wanted = [value[i] for i in representatives]
        if isinstance(value, str):
            wanted = "".join(wanted)  # type: ignore[assignment]
        elif isinstance(value, tuple):
            wanted = tuple(wanted)  # type: ignore[assignment]
        with contextlib.suppress(*_REFUSED):
            if getattr(config, name) == wanted:
                continue
        try:
            setattr(config, name, wanted)
        except _REFUSED:
            overrides[name] = wanted
    if overrides:  # read-only properties: a per-copy subclass answers them
        cls = type(config)
        config.__class__ = type(cls.__name__, (cls,), {"__module__": cls.__module__, **overrides})


def fake_parameters(
    model: nn.Module,
    mode: Any,
    dtype_of: Any,
    trainable_of: Any,
) -> None:
    """Replace every parameter and buffer of ``model`` (a copy) by a fake tensor, ties kept.

    Args:
        dtype_of: ``(name, parameter) -> dtype``.
        trainable_of: ``(parameter) -> bool``.
    """
    done: dict[int, nn.Parameter] = {}
    with mode:
        for module_name, module in model.named_modules(remove_duplicate=False):
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in done:
                    full = f"{module_name}.{name}" if module_name else name
                    fake = torch.empty(p.shape, dtype=dtype_of(full, p))
                    done[id(p)] = nn.Parameter(fake, requires_grad=trainable_of(p))
                module._parameters[name] = done[id(p)]
            for name, b in list(module._buffers.items()):
                if b is not None and not isinstance(b, torch._subclasses.FakeTensor):
                    module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def run_step(
    model: nn.Module,
    blocks: nn.ModuleList,
    *,
    kinds: Sequence[Any],
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    autocast_dtype: torch.dtype | None,
    inference: bool,
    mode: Any,
    tracker: _Tracker | None = None,
    inputs: StepInputs | None = None,
    reduced: bool = False,
    watch_values: bool | None = None,
) -> StepTrace:
    """Run one step of a fake reduced ``model`` and return its segments.

    ``kinds[p]`` is the kind index of the block at position ``p`` of ``blocks``. The step is the
    calibration protocol's: ``out = model(input_ids=x, labels=x)``, only the loss outlives the
    forward, then ``loss.backward()``; for ``inference``, ``model(input_ids=x)`` under no_grad
    with the logits dropped. No KV cache is kept (``use_cache=False`` where the model takes it):
    a training step does not use one, and the calibration's forward-only row shows none.

    ``tracker`` replaces the default :class:`_Tracker` (the FSDP trace watches more).
    ``inputs`` replaces the causal-LM inputs (``batch_size`` x ``seq_len`` token ids of
    ``vocab_size``, the labels the same tensor) with a model's own
    (:mod:`layerscope.estimate.inputs`); data-dependent operators are answered from their
    values (:class:`~layerscope.estimate.values.KnownValues`). With ``reduced`` (``blocks``
    stands for a longer stack), a block that changes the shape of its input stops the step
    with :class:`ReshapingBlocks`.

    ``watch_values`` None decides: watching values costs a fifth of the trace, and most models
    never need them, so with its own tracker the step is traced first without the watch and,
    if that fails (a data-dependent operator, or anything else), again with it, which traces
    exactly the same step when no operator needs a value (:mod:`~layerscope.estimate.values`);
    a given ``tracker`` is always watched (it cannot be traced twice).
    """
    if watch_values is None:
        again = functools.partial(
            run_step, model, blocks, kinds=kinds, batch_size=batch_size, seq_len=seq_len,
            vocab_size=vocab_size, autocast_dtype=autocast_dtype, inference=inference, mode=mode,
            inputs=inputs, reduced=reduced)
        if tracker is not None:
            return again(tracker=tracker, watch_values=True)
        try:
            return again(watch_values=False)
        except ReshapingBlocks:
            raise
        except Exception:  # noqa: BLE001 - retried with the values watched; that error is raised
            for p in model.parameters():
                p.grad = None
            return again(watch_values=True)
    tracker = tracker if tracker is not None else _Tracker()
    if inputs is None:
        inputs = causal_lm_inputs(batch_size, seq_len, vocab_size)
    if inference:
        inputs = inputs.for_inference()
    extra = {"use_cache": False} if _accepts(model, "use_cache") else {}
    tracker.ignore([*model.parameters(), *model.buffers()])
    kernels = CudaKernels(autocast_dtype)
    block_ids = {id(b): p for p, b in enumerate(blocks)}
    inside_blocks = {id(m) for b in blocks for m in b.modules()}
    state = {"phase": "fwd", "after_blocks": False}
    handles = []

    def entering(segment: tuple[Any, str]) -> Any:
        """A backward pre-hook: the gradient arriving was handed on by the part above."""

        def hook(grad_outputs: tuple[Any, ...]) -> None:
            grad = _first_tensor(grad_outputs)
            if grad is not None:
                tracker.mark_passed_on(grad)
            tracker.switch(segment)

        return hook

    def on_block_pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if state["phase"] != "fwd":
            return  # a recomputation under gradient checkpointing
        p = block_ids[id(module)]
        tracker.switch((kinds[p], "fwd"))
        if p == 0:
            hidden = _first_tensor(args) if args else kwargs.get("hidden_states")
            if hidden is not None and hidden.grad_fn is not None:
                hidden.grad_fn.register_prehook(entering(("embed", "bwd")))

    def on_block_post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                      output: Any) -> None:
        if state["phase"] != "fwd":
            return
        p = block_ids[id(module)]
        out = _first_tensor(output)
        hidden = _first_tensor(args) if args else kwargs.get("hidden_states")
        if (reduced and out is not None and isinstance(hidden, torch.Tensor)
                and hidden.shape != out.shape):
            raise ReshapingBlocks(f"{type(module).__name__}: {tuple(hidden.shape)} -> "
                                  f"{tuple(out.shape)}")
        if out is not None:
            tracker.mark_passed_on(out)
        if out is not None and out.grad_fn is not None:
            # a tensor hook, registered before any wrapper's (FSDP's pre-backward): the block's
            # backward segment starts when its output's gradient arrives, before the wrapper acts
            arriving = entering((kinds[p], "bwd"))
            out.register_hook(lambda grad: arriving((grad,)))  # type: ignore[no-untyped-call]
        if p == len(blocks) - 1:
            state["after_blocks"] = True

    def on_other_pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        part, phase = tracker.current
        if state["phase"] == "fwd" and state["after_blocks"] and phase == "fwd" and part != "head":
            tracker.switch(("head", "fwd"))

    for block in blocks:
        # prepended: a block's segment starts before any hook a wrapper (FSDP) put there
        handles.append(block.register_forward_pre_hook(on_block_pre, with_kwargs=True, prepend=True))
        handles.append(block.register_forward_hook(on_block_post, with_kwargs=True, prepend=True))
    for m in model.modules():
        if id(m) not in inside_blocks and m is not blocks:
            handles.append(m.register_forward_pre_hook(on_other_pre))

    try:
        known = KnownValues()
        watch = ((KnownConstants(known), known) if watch_values
                 else (contextlib.nullcontext(), contextlib.nullcontext()))
        with unpacked_sequences(), quiet_fake_tensor_log(), mode, kernels, watch[0], tracker, \
                watch[1]:
            feed = inputs.make(known.know if watch_values else _unknown)
            if inference:
                with torch.no_grad():
                    out = model(**feed, **extra)
                tracker.switch(("head", "release"))
                del out
                kernels.leave_autocast()
            else:
                out = model(**feed, **extra)
                tracker.switch(("head", "release"))
                kernels.leave_autocast()
                loss = out.loss if hasattr(out, "loss") else out[0]
                if loss is None and "labels" not in feed and hasattr(out, "logits"):
                    # a head that takes no labels (ShieldGemma-2's yes/no classifier returns
                    # logits and probabilities): the training loop computes the loss on its
                    # logits, and the gradient flows back from them
                    loss = out.logits
                if not isinstance(loss, torch.Tensor):
                    raise UnsupportedModelError(
                        f"{type(model).__name__}: its forward returned no loss for these inputs "
                        f"({type(out).__name__}.loss is {loss!r})"
                    )
                del out
                state["phase"] = "bwd"
                tracker.switch(("head", "bwd"))
                run_backward(loss)
                tracker.switch(("head", "end"))
                del loss
            del feed
            tracker.recording = False  # what dies from here on (gradients) outlives the step
    except BaseException:
        tracker.close()
        raise
    finally:
        for h in handles:
            h.remove()
    try:
        return StepTrace(segments=tracker.segments(), events=tracker.events(),
                         passed=frozenset(tracker.passed), kinds=tuple(kinds),
                         assumptions=tuple(known.assumptions))
    finally:
        tracker.close()


def _unknown(fake: torch.Tensor, value: torch.Tensor | None) -> None:
    """Values are not watched: nothing to record."""


def token_counter(model: nn.Module, mode: Any, autocast_dtype: torch.dtype | None
                  ) -> Callable[[str, tuple[InputTensor, ...]], int]:
    """``f(name, inputs) -> tokens``: runs ``model``'s own ``name`` (``get_image_features``,
    ``get_audio_features``) on fake tensors (a fake copy, outside the traced step: nothing is
    counted) and counts the feature vectors it returns, one placeholder token each."""
    def count(name: str, specs: tuple[InputTensor, ...]) -> int:
        get = features_function(model, name)
        accepted = feature_arguments(model, name)
        known = KnownValues()
        with unpacked_sequences(), quiet_fake_tensor_log(), mode, CudaKernels(autocast_dtype), \
                KnownConstants(known), known, torch.no_grad():
            feed = StepInputs("probe", specs).make(known.know)
            out = get(**{k: v for k, v in feed.items() if k in accepted})
            return count_features(out)

    return count


def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


@dataclass(frozen=True)
class Replay:
    """The full model's step rebuilt from segments, in bytes above the persistent state.

    Attributes:
        forward_peak: highest live bytes during forward (head and loss included).
        backward_peak: highest live bytes during backward.
        after_forward: live bytes after the forward, once only the loss is kept.
        end: live bytes after backward (the gradients, and anything the step leaks).
        forward_extra, backward_extra: the part of each peak that ``extra`` added (bytes a
            sharding strategy holds besides the traced step, at the moment of the peak).
    """

    forward_peak: int
    backward_peak: int
    after_forward: int
    end: int
    forward_extra: int = 0
    backward_extra: int = 0


Extra = Callable[[str, str, "int | None"], int]
"""``(part, phase, block index) -> bytes``: memory held besides the trace during one segment;
``part`` is ``"embed"``, ``"block"`` or ``"head"``, ``phase`` ``"fwd"``, ``"release"``,
``"bwd"`` or ``"end"``, the index is the block's (None outside the blocks)."""


def replay(
    trace: StepTrace, block_kinds: Sequence[int], inference: bool, extra: Extra | None = None
) -> Replay:
    """Concatenate segments in execution order for a model whose block ``i`` has ``block_kinds[i]``.

    ``extra`` adds, to each segment's high point, what a sharding strategy holds then besides
    the traced step (gathered parameters, gradient buckets); it does not change the live bytes
    carried to the next segment.
    """
    seg = trace.segments
    n = len(block_kinds)
    order: list[tuple[tuple[Any, str], str, int | None]] = [(("embed", "fwd"), "embed", None)]
    order += [((k, "fwd"), "block", i) for i, k in enumerate(block_kinds)]
    order += [(("head", "fwd"), "head", None), (("head", "release"), "head", None)]
    n_forward = len(order)
    if not inference:
        order += [(("head", "bwd"), "head", None)]
        order += [((block_kinds[i], "bwd"), "block", i) for i in reversed(range(n))]
        order += [(("embed", "bwd"), "embed", None), (("head", "end"), "head", None)]
    blocks_of_kind: dict[Any, int] = {}
    for k in block_kinds:
        blocks_of_kind[k] = blocks_of_kind.get(k, 0) + 1
    live = 0
    peaks = [0, 0]
    at_peak = [0, 0]
    after_forward = 0
    for i, (key, part, index) in enumerate(order):
        s = seg.get(key, Segment())
        phase = 0 if i < n_forward else 1
        held = extra(part, key[1], index) if extra is not None else 0
        if live + s.high + held > peaks[phase]:
            peaks[phase], at_peak[phase] = live + s.high + held, held
        # the traced model had one block of each kind; the full model frees once per block
        live += s.net - sum(b * (blocks_of_kind.get(k, 0) - 1) for k, b in s.freed_per_block)
        if i == n_forward - 1:
            after_forward = live
    return Replay(
        forward_peak=peaks[0], backward_peak=peaks[1], after_forward=after_forward, end=live,
        forward_extra=at_peak[0], backward_extra=at_peak[1],
    )
