"""Values of the small tensors a traced step computes from its inputs, for data-dependent ops.

Fake tensors have shapes but no values, so an operator whose result depends on values —
``Tensor.item()`` and ``bool(tensor)`` (``aten._local_scalar_dense``), ``nonzero``,
``masked_select``, ``unique_consecutive``, boolean-mask indexing (torch tags them
``data_dependent_output`` or ``dynamic_output_shape``) — stops a fake-tensor trace. Models call
them on *bookkeeping* tensors: sequence lengths from the token ids, a check that every sequence
ends with one end-of-sequence token (BART), the image grid of a Qwen2-VL batch, LayerDrop's
random draw (M2M-100), the sizes the CTC loss reads from its labels.

:class:`KnownValues` keeps a real tensor next to each fake tensor whose value the trace can
know: the step's own inputs (given with their values), tensors made without inputs (``arange``,
``ones``, constants) or from another tensor's shape alone (``full_like``), and everything
computed from those alone, up to
:data:`MAX_KNOWN_ELEMENTS` elements. Data-dependent operators on such tensors are answered from
the real values, so the fake step takes the branch and the shapes the real step would. Nothing
changes for operators on other tensors: the mode only watches, so a step without data-dependent
operators is traced exactly as without it.

Four rules cover what the trace cannot know, the first, second and fourth chosen so the
estimate is of the step that uses the most memory, the third so it is of the step the model is
trained for:

* a uniform random draw (``torch.rand``, ``uniform_``) is taken at its upper end
  (:data:`RANDOM_DRAW`): LayerDrop, which skips a layer when a draw falls below its rate, never
  skips, so every layer runs, as in the worst step;
* a truth value computed from activations (``assert not x.isnan().any()``, transformers'
  ``torch_compilable_check``) is taken as true: the model's own sanity checks pass;
* a choice made from activations — the indices of ``topk``, ``argmax``/``argmin`` and ``sort``
  (a mixture-of-experts router's picks) — is the *balanced* one (:func:`balanced_choice`):
  row ``r``'s ``j``-th of ``k`` picks among ``n`` is ``(r * k + j) mod n``, so each expert
  receives ``tokens * top_k / num_experts`` rows, the load that routers' balancing losses
  train for (the memory traced; the step time, :mod:`~layerscope.estimate.experts`, spreads
  the rows as unevenly as random routing does, since a GEMM's time depends on its row count
  and the peak memory barely does); a sort's order is kept
  (ties). Models that route in a Python loop over the experts hit (JetMoE's ``tolist`` of
  expert sizes, Switch Transformers' and NLLB-MoE's ``nonzero``) are traced with that load
  instead of being refused. A choice's *values* (the gates) stay unknown;
* a threshold on activations (``>``, ``<``, ``>=``, ``<=`` of an unknown tensor) is taken as
  passed everywhere (:data:`ABOVE_THRESHOLD`): where a model selects what to keep by a
  threshold, it keeps everything (BLT starts a new patch at every byte whose entropy is above
  its threshold: every byte is a patch, the longest sequence for its global transformer).

Any other data-dependent operator on an activation is refused with an
:class:`~layerscope.errors.UnsupportedModelError` that names the operator.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from layerscope.compat import (
    DATA_DEPENDENT_ERRORS,
    TorchDispatchMode,
    disable_dispatch_modes,
    tree_map,
)
from layerscope.errors import UnsupportedModelError

MAX_KNOWN_ELEMENTS = 1 << 24
"""Largest tensor (elements) whose value is kept: the token ids of 256 x 65536 tokens, or 16
images of 3 x 560 x 560 pixels, fit; per-element work on them costs milliseconds on the
CPU."""

RANDOM_DRAW = 1.0 - 2.0**-24
"""The value of every uniform random draw in [0, 1): the largest float32 below 1."""

_UNIFORM_RANDOM = {
    torch.ops.aten.rand.default, torch.ops.aten.rand_like.default, torch.ops.aten.uniform_.default,
    torch.ops.aten.uniform.default,
}
_SHAPE_ONLY = {
    torch.ops.aten.full_like, torch.ops.aten.ones_like, torch.ops.aten.zeros_like,
    torch.ops.aten.new_full, torch.ops.aten.new_ones, torch.ops.aten.new_zeros,
}
"""Operators whose result takes only the shape (and dtype) of their tensor argument, not its
values: known even where the argument is an activation (UDOP builds its patch mask with
``torch.full_like(image_embeddings[:, :, 0], True)``)."""
_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default
_CHOICES = {
    torch.ops.aten.topk.default, torch.ops.aten.argmax.default, torch.ops.aten.argmin.default,
    torch.ops.aten.sort.default, torch.ops.aten.sort.stable,
}
_THRESHOLDS = {torch.ops.aten.gt, torch.ops.aten.lt, torch.ops.aten.ge, torch.ops.aten.le}
ABOVE_THRESHOLD = ("every threshold on activations taken as passed (e.g. each byte starts a "
                   "patch where the model splits by entropy): the largest shapes")
"""The note an estimate carries when a comparison of activations was taken as true."""
_EMPTY = {
    torch.ops.aten.empty, torch.ops.aten.empty_strided, torch.ops.aten.empty_like,
    torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided,
}


BALANCED_ROUTING = ("routing taken as balanced: each expert receives tokens x top_k / experts "
                    "rows (the model's router picks from activations)")
"""The note an estimate carries when a choice made from activations was answered with
:func:`balanced_choice`."""


class KnownValues(TorchDispatchMode):
    """A dispatch mode, entered above the fake mode, that keeps the values of small tensors
    computed from known ones and answers data-dependent operators from them.

    Attributes:
        assumptions: what the trace assumed in place of values only a real step knows (e.g.
            :data:`BALANCED_ROUTING`), each once, in order.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.assumptions: list[str] = []
        # storage -> {view: value}. Keyed by the fake storage and the view on it (offset,
        # shape, strides, dtype), not by the tensor object: autograd hands saved tensors back
        # as new objects, and a tensor's __eq__ is elementwise.
        self._values: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], torch.Tensor]] = (
            weakref.WeakKeyDictionary()
        )

    def know(self, fake: torch.Tensor, value: torch.Tensor | None) -> None:
        """Record that ``fake`` holds ``value`` (a real tensor of the same shape); ``None``: its
        value is not known (pixel values, audio)."""
        if value is None:
            self._forget(fake)
            return
        if _is_fake(value):
            raise ValueError("the value of a fake tensor must be a real tensor")
        if tuple(fake.shape) != tuple(value.shape):
            raise ValueError(f"value of shape {tuple(value.shape)} for a tensor {tuple(fake.shape)}")
        self._keep(fake, value)

    def _keep(self, fake: torch.Tensor, value: torch.Tensor) -> None:
        self._values.setdefault(fake.untyped_storage(), {})[_view(fake)] = value

    def _forget(self, fake: torch.Tensor) -> None:
        """``fake``'s storage was written with something unknown: none of its views is known."""
        self._values.pop(fake.untyped_storage(), None)

    def value_of(self, t: torch.Tensor) -> torch.Tensor | None:
        """The real value of ``t`` if known (a real tensor is its own value)."""
        if not _is_fake(t):
            return t
        views = self._values.get(t.untyped_storage())
        return None if views is None else views.get(_view(t))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in _leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        known = [self.value_of(t) for t in tensors]
        all_known = all(v is not None for v in known)
        if func in _UNIFORM_RANDOM:
            out = func(*args, **kwargs)
            if out.numel() <= MAX_KNOWN_ELEMENTS:
                with disable_dispatch_modes():
                    self.know(out, torch.full(out.shape, RANDOM_DRAW, dtype=out.dtype))
            return out
        try:
            out = func(*args, **kwargs)
        except DATA_DEPENDENT_ERRORS:  # the fake mode needs values it does not have
            if all_known:
                return self._answer(func, args, kwargs)
            if func is _LOCAL_SCALAR and tensors and tensors[0].dtype == torch.bool:
                return True  # a check on activations: taken to pass
            if func._schema.is_mutable and args and isinstance(args[0], torch.Tensor):
                return args[0]  # written in place (index_put_ with a mask): same shape
            shaped = self._shaped_by_known(func, args, kwargs)
            if shaped is None:
                raise UnsupportedModelError(
                    f"the step's shapes depend on values computed from activations ({func}), "
                    "which layerscope cannot know without running the model"
                ) from None
            return shaped
        if func.overloadpacket in _SHAPE_ONLY and not all_known and isinstance(out, torch.Tensor) \
                and out.numel() <= MAX_KNOWN_ELEMENTS:
            with disable_dispatch_modes(), torch.no_grad():
                real = func(*tree_map(lambda t: _proxy(t, 0) if isinstance(t, torch.Tensor)
                                      else t, args), **kwargs)
            self._keep(out, real)
            return out
        if func.overloadpacket in _THRESHOLDS and not all_known and isinstance(out, torch.Tensor) \
                and out.dtype == torch.bool and out.numel() <= MAX_KNOWN_ELEMENTS:
            with disable_dispatch_modes():
                self.know(out, torch.ones(out.shape, dtype=torch.bool))
                if ABOVE_THRESHOLD not in self.assumptions:
                    self.assumptions.append(ABOVE_THRESHOLD)
            return out
        if func in _CHOICES and not all_known:
            with disable_dispatch_modes():
                self._choose(func, args, kwargs, out)
            return out
        if func._schema.is_mutable and not all_known:
            for t in _written(func, args, kwargs):  # written with something unknown
                if _is_fake(t):
                    self._forget(t)
            return out
        if all_known and (tensors or not _is_random(func)):
            self._mirror(func, args, kwargs, out)
        return out

    def _choose(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Record the balanced indices of a choice made from activations (``out`` of
        ``topk``, ``argmax``, ``argmin`` or ``sort``); called with no dispatch mode active."""
        bound = func._schema.arguments
        params = {a.name: (args[i] if i < len(args) else kwargs.get(a.name, a.default_value))
                  for i, a in enumerate(bound)}
        source = params["self"]
        if func.overloadpacket in (torch.ops.aten.argmax, torch.ops.aten.argmin):
            indices, dim = out, params.get("dim")
            if dim is None:  # over the flattened tensor: one answer
                self.know(indices, torch.zeros(indices.shape, dtype=indices.dtype))
                return
            picks: int | None = 1
        else:
            indices, dim = out[1], params.get("dim", -1)
            picks = int(params["k"]) if "k" in params else None
        if indices.numel() > MAX_KNOWN_ELEMENTS or source.dim() == 0:
            return
        dim = int(dim) % source.dim()
        if picks is None:  # a sort: the order kept, as for ties
            order = torch.arange(source.shape[dim]).view(
                [-1 if d == dim else 1 for d in range(source.dim())])
            self.know(indices, order.expand(source.shape).to(indices.dtype).clone())
            return
        if BALANCED_ROUTING not in self.assumptions:
            self.assumptions.append(BALANCED_ROUTING)
        keep = indices.dim() == source.dim()  # topk, argmax(keepdim=True)
        shape = list(source.shape)
        shape[dim] = picks
        moved = shape[:dim] + shape[dim + 1:] + [picks]
        value = balanced_choice(math.prod(moved[:-1]), picks, source.shape[dim])
        value = value.view(moved).movedim(-1, dim)
        if not keep:
            value = value.squeeze(dim)
        self.know(indices, value.to(indices.dtype).contiguous())

    def _real(self, value: Any) -> Any:
        return tree_map(lambda t: self.value_of(t) if isinstance(t, torch.Tensor) else t, value)

    def _mirror(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Compute ``func`` on the real values and keep the results of the fake outputs."""
        outs = [t for t in _leaves(out) if isinstance(t, torch.Tensor)]
        if not outs or any(t.numel() > MAX_KNOWN_ELEMENTS for t in outs):
            return
        with disable_dispatch_modes(), torch.no_grad():
            real = func(*self._real(args), **self._real(kwargs))
            if func.overloadpacket in _EMPTY:  # uninitialised memory: zeros until written
                real = real.zero_()
        for fake, value in zip(outs, [t for t in _leaves(real) if isinstance(t, torch.Tensor)]):
            if tuple(fake.shape) != tuple(value.shape):
                continue
            if func._schema.is_mutable:  # other views of the storage hold older values unless
                views = self._values.get(fake.untyped_storage(), {})  # they share the memory
                ptr = value.untyped_storage().data_ptr()
                for key in [k for k, v in views.items() if v.untyped_storage().data_ptr() != ptr]:
                    del views[key]
            self._keep(fake, value)

    def _shaped_by_known(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A data-dependent operator whose result *shape* follows from its known inputs alone
        (``hidden[mask]`` with a known ``mask``): computed with the unknown tensors all zeros
        and again all ones; if both give the same shapes, fake tensors of those shapes (their
        values unknown). None when the shapes differ: they depend on the unknown values."""
        shapes: list[Any] = []
        for fill in (0, 1):
            def real(t: Any, fill: int = fill) -> Any:
                if not isinstance(t, torch.Tensor):
                    return t
                value = self.value_of(t)
                return value if value is not None else _proxy(t, fill)

            with disable_dispatch_modes(), torch.no_grad():
                try:
                    result = func(*tree_map(real, args), **tree_map(real, kwargs))
                except (RuntimeError, IndexError, ValueError):
                    return None
            shapes.append(result)
        leaves = [[(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t
                   for t in _leaves(r)] for r in shapes]
        if leaves[0] != leaves[1]:
            return None
        return tree_map(
            lambda t: torch.empty(t.shape, dtype=t.dtype) if isinstance(t, torch.Tensor) else t,
            shapes[0],
        )

    def _answer(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A data-dependent operator on known values: computed for real; tensor results are
        made as fake tensors of the real results' shapes (allocated below this mode, so the
        storage counter sees them) and their values kept."""
        with disable_dispatch_modes(), torch.no_grad():
            real = func(*self._real(args), **self._real(kwargs))
        if not isinstance(real, (torch.Tensor, tuple, list)):
            return real

        def fake_of(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            fake = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype)
            self._keep(fake, value)
            return fake

        return tree_map(fake_of, real)


def balanced_choice(rows: int, picks: int, choices: int) -> torch.Tensor:
    """``rows`` x ``picks`` indices among ``choices``, spread evenly: row ``r``'s ``j``-th pick
    is ``(r * picks + j) mod choices``. The picks of one row differ (``picks <= choices``), and
    each index is picked ``rows * picks / choices`` times (the remainder spread one each over
    the first indices)."""
    r = torch.arange(rows).unsqueeze(1)
    j = torch.arange(picks).unsqueeze(0)
    return (r * picks + j) % max(choices, 1)


def _proxy(value: Any, fill: int) -> Any:
    """A real stand-in for an unknown tensor: ``fill`` everywhere, no memory (a 0-d tensor
    expanded to the shape)."""
    return torch.full((), fill, dtype=value.dtype).expand(value.shape)


class KnownConstants(TorchFunctionMode):
    """``torch.tensor(data)`` where ``data`` holds 0-d fake tensors of known value (Qwen2-VL
    gathers its position deltas that way), and indices made of sequences of them: built from
    the values, as from Python numbers. (The factory and indexing read such elements' memory
    directly, which fake tensors do not have.) And a 0-d fake tensor of known value formats as
    its number (``f"expert_{idx}"``, as Switch Transformers and NLLB-MoE name the expert module
    to run), as a real tensor does; a fake tensor's ``__format__`` is otherwise its ``repr``."""

    def __init__(self, known: KnownValues) -> None:
        super().__init__()
        self.known = known

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.__format__ and args and isinstance(args[0], torch.Tensor) \
                and _is_fake(args[0]) and args[0].dim() == 0:
            value = self.known.value_of(args[0])
            if value is not None:
                with disable_dispatch_modes():
                    scalar = value.item()
                return format(scalar, *args[1:])
        if func in (torch.tensor, torch.as_tensor) and args:
            def number(t: Any) -> Any:
                if isinstance(t, torch.Tensor) and _is_fake(t):
                    value = self.known.value_of(t)
                    if value is not None:
                        return value.tolist()
                return t

            args = (tree_map(number, args[0]), *args[1:])
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1:
            # an index made of sequences of such tensors (UDOP: ``mask[rows, cols] = False``
            # with ``rows, cols = zip(*pairs)``), which indexing also turns into tensors by
            # reading their memory
            index = args[1]
            index = tuple(self._sequence(i) for i in index) if isinstance(index, tuple) \
                else self._sequence(index)
            args = (args[0], index, *args[2:])
        return func(*args, **kwargs)

    def _sequence(self, index: Any) -> Any:
        """A list or tuple of 0-d fake tensors of known value as a tensor of those values."""
        if not isinstance(index, (list, tuple)) or not index or not all(
                isinstance(t, torch.Tensor) and _is_fake(t) and t.dim() == 0 for t in index):
            return index
        values = [self.known.value_of(t) for t in index]
        if any(v is None for v in values):
            return index
        return torch.tensor([v.tolist() for v in values if v is not None])


def _written(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors ``func`` writes to (its schema's ``Tensor(a!)`` arguments)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        out += [t for t in _leaves(value) if isinstance(t, torch.Tensor)]
    return out


def _view(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, torch._subclasses.FakeTensor)


def _is_random(func: Any) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(func, "tags", ())


def _leaves(value: Any) -> list[Any]:
    from layerscope.compat import tree_leaves

    return list(tree_leaves(value))
