"""What the CUDA caching allocator reserves for a training loop: ``max_memory_reserved()``.

``torch.cuda.max_memory_allocated()`` counts the blocks tensors hold; ``nvidia-smi`` and
``max_memory_reserved()`` see the *segments* the caching allocator took from ``cudaMalloc`` to
carve those blocks from, which it keeps (cached) until ``empty_cache()``. How far the two
differ depends on the order and sizes of the allocations, so this module replays them: the
traced step's allocation events (:mod:`layerscope.estimate.trace`), expanded block by block
for the full depth (:func:`step_events`), after the weights, for several iterations of
forward, backward, ``optimizer.step()`` and ``zero_grad(set_to_none=True)``
(:func:`simulate_loop`), through :class:`CachingAllocator`, a model of
``c10/cuda/CUDACachingAllocator.cpp`` (PyTorch 2.x, default settings).

What is modelled, as in the allocator's source:

- sizes rounded up to 512 bytes (``round_size``; ``roundup_power2_divisions`` off);
- requests of at most 1 MiB served from a *small* pool of 2 MiB segments, larger ones from
  a *large* pool whose new segments are 20 MiB for requests under 10 MiB and the request
  rounded up to 2 MiB otherwise (``get_allocation_size``);
- best fit: the smallest cached block of the pool that is large enough, lowest address first
  among equals (``get_free_block``, ``BlockComparatorSize``);
- splitting: a block is split when the rest is at least 512 bytes (small pool) or more than
  1 MiB (large pool), otherwise handed out whole (``should_split``);
- freed blocks merge with free neighbours of their segment and stay cached (``free_block``);
  segments are never returned (no ``empty_cache``, no out-of-memory retry: the prediction is
  what the loop reserves when memory is not short);
- ``max_split_size_mb`` (off by default): blocks that large are never split, and serve only
  requests within 20 MiB of their size.

Besides the model's tensors, a training process holds two cuBLAS workspaces
(:data:`CUBLAS_WORKSPACE_BYTES`), one for the thread that runs the forward and one for the
autograd thread that runs the backward.

Not modelled: ``expandable_segments:True`` (off by default), several streams (one stream:
every block is reusable by every later request), CUDA graphs' private pools.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from layerscope.errors import EstimateError
from layerscope.estimate.trace import StepTrace, rounded

MIN_BLOCK_BYTES = 512
"""Every block is a multiple of 512 bytes (``kMinBlockSize``)."""
SMALL_REQUEST_BYTES = 2**20
"""Requests of at most 1 MiB use the small pool (``kSmallSize``)."""
SMALL_SEGMENT_BYTES = 2 * 2**20
"""Small-pool segments are 2 MiB (``kSmallBuffer``)."""
LARGE_SEGMENT_BYTES = 20 * 2**20
"""Requests between 1 and 10 MiB get a 20 MiB segment to share (``kLargeBuffer``)."""
MIN_LARGE_ALLOC_BYTES = 10 * 2**20
"""From 10 MiB on a request gets a segment of its own size (``kMinLargeAlloc``)..."""
ROUND_LARGE_BYTES = 2 * 2**20
"""... rounded up to 2 MiB (``kRoundLarge``)."""

CUBLAS_WORKSPACE_BYTES = 4096 * 8 * 1024
"""Bytes of a cuBLAS workspace: PyTorch takes one from the caching allocator for each cuBLAS
handle and stream on their first matmul, and keeps it (``aten/src/ATen/cuda/CublasHandlePool.cpp``,
``getNewWorkspace``; ``parseChosenWorkspaceSize``: ``:4096:8``, 32 MiB, on sm90 GPUs (H100,
H200), 8 MiB + 128 KiB on others; cuBLASLt shares it, ``TORCH_CUBLASLT_UNIFIED_WORKSPACE``).
Handles are per thread, and the backward runs on autograd's device thread: a training process
holds two, an inference one. The simulation makes them before the model, as in the calibration
runs, whose allocated figures exclude them (they predate the measurements) while the memory
reserved includes their segments; a fresh process makes them at the first forward and
backward, where a cached block may take them. The sm90 size is used for every GPU (the
estimate does not know the GPU); elsewhere the two share one 20 MiB segment, 44 MiB less."""

MAX_STEPS = 6
"""Training steps simulated at most: the calibration protocol's loop length. The loop stops
earlier once a step ends with the cache exactly as the step before left it (from then on
every step repeats)."""


def round_size(nbytes: int) -> int:
    """Block size the allocator hands out for a request of ``nbytes`` (``round_size``)."""
    if nbytes < MIN_BLOCK_BYTES:
        return MIN_BLOCK_BYTES
    return -(-nbytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES


def segment_size(block_bytes: int) -> int:
    """Size of the segment ``cudaMalloc`` gets when no cached block fits a block of
    ``block_bytes`` (already rounded; ``get_allocation_size``)."""
    if block_bytes <= SMALL_REQUEST_BYTES:
        return SMALL_SEGMENT_BYTES
    if block_bytes < MIN_LARGE_ALLOC_BYTES:
        return LARGE_SEGMENT_BYTES
    return -(-block_bytes // ROUND_LARGE_BYTES) * ROUND_LARGE_BYTES


class _Block:
    """A block of a segment: allocated or cached, with its neighbours in the segment."""

    __slots__ = ("addr", "allocated", "next", "prev", "size", "small")

    def __init__(self, addr: int, size: int, small: bool) -> None:
        self.addr = addr
        self.size = size
        self.small = small
        self.allocated = False
        self.prev: _Block | None = None
        self.next: _Block | None = None


class _Pool:
    """Cached (free) blocks of one pool, ordered by (size, address) as ``BlockComparatorSize``."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []
        self.blocks: dict[int, _Block] = {}

    def add(self, block: _Block) -> None:
        bisect.insort(self.keys, (block.size, block.addr))
        self.blocks[block.addr] = block

    def remove(self, block: _Block) -> None:
        i = bisect.bisect_left(self.keys, (block.size, block.addr))
        del self.keys[i]
        del self.blocks[block.addr]


class CachingAllocator:
    """One device's caching allocator, one stream, default settings unless told.

    Args:
        max_split_size: ``PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb`` in bytes; ``None`` (the
            default) means unlimited.

    Attributes:
        reserved, allocated: bytes in segments, and in blocks handed out (the allocator's
            ``reserved_bytes`` and ``allocated_bytes`` stats: a block handed out whole
            counts whole).
        peak_reserved, peak_allocated: their highest values so far.
        segments: number of ``cudaMalloc`` calls so far.
    """

    def __init__(self, max_split_size: int | None = None) -> None:
        if max_split_size is not None and (isinstance(max_split_size, bool)
                                           or not isinstance(max_split_size, int)
                                           or max_split_size <= SMALL_REQUEST_BYTES):
            raise EstimateError(
                f"max_split_size must be None or an int of bytes above 1 MiB, got {max_split_size!r}"
            )
        self.max_split = max_split_size if max_split_size is not None else 2**63
        self.small = _Pool()
        self.large = _Pool()
        self.reserved = 0
        self.allocated = 0
        self.peak_reserved = 0
        self.peak_allocated = 0
        self.segments = 0
        self._next_addr = 0

    def malloc(self, nbytes: int) -> _Block:
        """Hand out a block for ``nbytes`` (> 0), from the cache or a new segment."""
        size = round_size(nbytes)
        small = size <= SMALL_REQUEST_BYTES
        pool = self.small if small else self.large
        block = self._cached(pool, size)
        if block is None:
            seg = segment_size(size)
            block = _Block(self._next_addr, seg, small)
            self._next_addr += seg
            self.reserved += seg
            self.segments += 1
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        rest = block.size - size
        if small:
            split = rest >= MIN_BLOCK_BYTES
        else:
            split = size < self.max_split and rest > SMALL_REQUEST_BYTES
        if split:
            remaining = _Block(block.addr + size, rest, small)
            remaining.prev, remaining.next = block, block.next
            if block.next is not None:
                block.next.prev = remaining
            block.next = remaining
            block.size = size
            pool.add(remaining)
        block.allocated = True
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def _cached(self, pool: _Pool, size: int) -> _Block | None:
        i = bisect.bisect_left(pool.keys, (size, -1))
        if i == len(pool.keys):
            return None
        found, addr = pool.keys[i]
        if size < self.max_split <= found or (size >= self.max_split
                                               and found >= size + LARGE_SEGMENT_BYTES):
            return None  # oversize blocks serve only requests of about their size
        del pool.keys[i]
        return pool.blocks.pop(addr)

    def free(self, block: _Block) -> None:
        """Return ``block`` to the cache, merged with free neighbours of its segment."""
        if not block.allocated:
            raise EstimateError("internal: a block was freed twice in the allocator simulation")
        block.allocated = False
        self.allocated -= block.size
        pool = self.small if block.small else self.large
        prev = block.prev
        if prev is not None and not prev.allocated:
            pool.remove(prev)
            block.addr, block.size, block.prev = prev.addr, prev.size + block.size, prev.prev
            if block.prev is not None:
                block.prev.next = block
        nxt = block.next
        if nxt is not None and not nxt.allocated:
            pool.remove(nxt)
            block.size += nxt.size
            block.next = nxt.next
            if block.next is not None:
                block.next.prev = block
        pool.add(block)

    def cache_state(self) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        """The cached blocks of both pools: equal states behave the same from here on."""
        return tuple(self.small.keys), tuple(self.large.keys)


Op = tuple[int, int]
"""``(handle, bytes)``: allocate ``bytes`` (> 0) as ``handle``; ``(handle, 0)``: free it."""


@dataclass(frozen=True)
class StepEvents:
    """One step's allocations and frees for the full model, in execution order.

    Attributes:
        ops: :data:`Op` s; handles number ``0 .. handles - 1``.
        handles: how many handles the step uses.
        leftover: handles still allocated when backward ends (the gradients), which
            ``zero_grad(set_to_none=True)`` frees after the optimizer step.
    """

    ops: tuple[Op, ...]
    handles: int
    leftover: tuple[int, ...]


def step_events(trace: StepTrace, block_kinds: Sequence[Any], inference: bool) -> StepEvents:
    """Expand the traced segments' events to the full model whose block ``i`` is of kind
    ``block_kinds[i]``, in the order :func:`~layerscope.estimate.trace.replay` runs them.

    A free names the allocation it releases by segment and index in the traced (reduced)
    model; for the full model it is mapped as the trace's structure says:

    - in its own block (or the block's forward, seen from its backward): the same block;
    - a tensor handed on (a block's output, a gradient flowing down): the tensor handed on by
      the part at the same distance in the full model (the previous block, the head...);
    - an allocation of the embedding or head part: that one allocation, freed by the last
      block of the freeing kind to run (the one the reduced model ran);
    - a block's allocation freed by the embedding or head part (autocast's cast weights when
      the forward ends): that allocation in every block of the kind;
    - a free the rules above cannot place, because the reduced model has no example of it in
      the full model's order (an encoder output's gradient summed block by block, handed
      between two frozen blocks where the reduced model has one; a tensor only the first
      block makes and its neighbour frees): the allocation of the same size and rank among the
      tensors the part at that distance hands across blocks, or nothing where it has none
      (:func:`_cross_block`). Only the allocator simulation (``reserved_bytes``) reads these
      events; the peak is the segment replay's.

    Raises:
        EstimateError: ``trace`` has no events, or an event the rules above cannot place.
    """
    if not trace.events:
        raise EstimateError("internal: the step trace recorded no allocation events")
    n = len(block_kinds)
    traced_position = {k: p for p, k in enumerate(trace.kinds)}
    n_traced = len(trace.kinds)
    order: list[tuple[int, tuple[Any, str]]] = [(-1, ("embed", "fwd"))]
    order += [(i, (k, "fwd")) for i, k in enumerate(block_kinds)]
    order += [(n, ("head", "fwd")), (n, ("head", "release"))]
    if not inference:
        order += [(n, ("head", "bwd"))] + [(i, (k, "bwd")) for i, k in reversed(list(enumerate(block_kinds)))]
        order += [(-1, ("embed", "bwd")), (n, ("head", "end"))]
    last_run = {key: i for i, key in order}  # the last position to run each segment

    def traced_pos(key: tuple[Any, str]) -> int:
        if key[0] == "embed":
            return -1
        if key[0] == "head":
            return n_traced
        return traced_position[key[0]]

    def full_key(pos: int, phase: str) -> tuple[Any, str]:
        if pos == -1:
            return ("embed", phase)
        if pos == n:
            return ("head", phase)
        if not 0 <= pos < n:
            raise EstimateError(f"internal: a freed tensor maps to block {pos} of {n}")
        return (block_kinds[pos], phase)

    passed: dict[tuple[Any, str], list[int]] = {}
    for key, j in sorted(trace.passed, key=lambda kj: kj[1]):
        passed.setdefault(key, []).append(j)
    sizes, crossing = _cross_block(trace)
    handles: dict[tuple[int, tuple[Any, str]], list[int | None]] = {}
    alive: set[int] = set()
    ops: list[Op] = []
    count = 0

    def release(h: int | None) -> None:
        if h is not None and h in alive:
            alive.remove(h)
            ops.append((h, 0))

    def counterpart(target: int, owner: tuple[Any, str], j: int) -> None:
        """Free what the part at ``target`` made in place of ``owner``'s ``j``-th allocation:
        the one of the same size and rank among the tensors it hands across blocks."""
        if not -1 <= target <= n:
            return
        tkey = full_key(target, owner[1])
        size = sizes.get((owner, j))
        mine = [i for i in crossing.get(owner, ()) if sizes.get((owner, i)) == size]
        theirs = [i for i in crossing.get(tkey, ()) if sizes.get((tkey, i)) == size]
        made = handles.get((target, tkey))
        if j in mine and made is not None and mine.index(j) < len(theirs):
            release(made[theirs[mine.index(j)]])

    for pos, key in order:
        mine = handles.setdefault((pos, key), [])
        is_block = key[0] not in ("embed", "head")
        for event in trace.events.get(key, ()):
            if len(event) == 2:  # an allocation
                size = event[1]
                if size > 0:
                    ops.append((count, size))
                    alive.add(count)
                    mine.append(count)
                    count += 1
                else:
                    mine.append(None)
                continue
            _, owner, j = event
            if (owner, j) in trace.passed:  # handed on: what the part at that distance handed on
                target = (-1 if key[0] == "embed" else n if key[0] == "head" else pos)
                target += traced_pos(owner) - traced_pos(key)
                tkey = full_key(target, owner[1])
                which = passed[owner].index(j)
                theirs = passed.get(tkey, [])
                if which < len(theirs) and (target, tkey) in handles:
                    release(handles[(target, tkey)][theirs[which]])
                else:  # that part hands on fewer tensors (another layer type's block)
                    counterpart(target, owner, j)
            elif owner[0] in ("embed", "head"):  # the embedding's or head's: one allocation
                if not is_block or last_run[key] == pos:
                    release(handles[(-1 if owner[0] == "embed" else n, owner)][j])
            elif not is_block:  # a block's allocation freed after the blocks: every block's
                for i, k in enumerate(block_kinds):
                    if k == owner[0] and (i, owner) in handles:
                        release(handles[(i, owner)][j])
            else:
                target = pos + traced_pos(owner) - traced_pos(key)
                if 0 <= target < n and block_kinds[target] == owner[0] and (target, owner) in handles:
                    release(handles[(target, owner)][j])
                else:
                    counterpart(target, owner, j)
    return StepEvents(ops=tuple(ops), handles=count, leftover=tuple(sorted(alive)))


def _cross_block(trace: StepTrace) -> tuple[dict[tuple[tuple[Any, str], int], int],
                                            dict[tuple[Any, str], list[int]]]:
    """The bytes of every allocation of ``trace`` by ``(segment, index)``, and per segment the
    indices (in order) of its allocations that another part frees or that it hands on: the
    tensors that cross from one block to the next."""
    sizes: dict[tuple[tuple[Any, str], int], int] = {}
    crossing: dict[tuple[Any, str], set[int]] = {}
    for key, events in trace.events.items():
        j = 0
        for event in events:
            if len(event) == 2:
                sizes[(key, j)] = event[1]
                j += 1
            elif event[1] != key and event[1][0] != key[0]:
                crossing.setdefault(event[1], set()).add(event[2])
    for key, j in trace.passed:
        crossing.setdefault(key, set()).add(j)
    return sizes, {key: sorted(js) for key, js in crossing.items()}


def live_peaks(events: StepEvents, split: int | None = None) -> tuple[int, int, int]:
    """(highest live bytes, live bytes at the end, live bytes after op ``split``) of a step
    replayed alone: the byte count :func:`~layerscope.estimate.trace.replay` gives, for checks."""
    live = high = at_split = 0
    sizes: dict[int, int] = {}
    for i, (h, size) in enumerate(events.ops):
        if size:
            sizes[h] = size
            live += size
            high = max(high, live)
        else:
            live -= sizes.pop(h)
        if split is not None and i == split:
            at_split = live
    return high, live, at_split


@dataclass(frozen=True)
class LoopMemory:
    """The simulated loop's allocator statistics, in bytes.

    Attributes:
        reserved_peak: ``torch.cuda.max_memory_reserved()`` at the end of the loop.
        allocated_peak: ``torch.cuda.max_memory_allocated()`` (blocks handed out whole count
            whole, as the allocator counts them).
        steps: steps simulated until the cache repeated (at most :data:`MAX_STEPS`).
    """

    reserved_peak: int
    allocated_peak: int
    steps: int


def build_ops(
    tensors: Iterable[tuple[int, bool]], adapters: Iterable[tuple[int, int]] = ()
) -> tuple[Op, ...]:
    """The allocations of building a model on the GPU, in construction order.

    Args:
        tensors: ``(bytes, transient)`` per tensor, as the constructors make them; a transient
            tensor (a tied weight's own copy, which ``tie_weights`` replaces by the shared
            tensor once the model is built) is freed after the last one.
        adapters: ``(bytes made, bytes kept)`` per LoRA adapter tensor, in PEFT's order: made
            after the model in the base weight's dtype (``_move_adapter_to_device_of_base_layer``)
            and, where that is not what is kept, re-made one by one in fp32
            (``autocast_adapter_dtype=True``: ``param.data = param.data.to(torch.float32)``).
    """
    ops: list[Op] = []
    transient: list[int] = []
    h = 0
    for size, temporary in tensors:
        if size > 0:
            ops.append((h, size))
            if temporary:
                transient.append(h)
            h += 1
    ops += [(t, 0) for t in transient]
    made = []
    for made_size, kept_size in adapters:
        ops.append((h, made_size))
        made.append((h, made_size, kept_size))
        h += 1
    for old, made_size, kept_size in made:
        if kept_size != made_size:
            ops += [(h, kept_size), (old, 0)]
            h += 1
    return tuple(ops)


def model_build_ops(
    model: nn.Module, param_bytes: int, adapters: Iterable[tuple[int, int]] = ()
) -> tuple[Op, ...]:
    """:func:`build_ops` for ``model`` built from its config on the GPU (the calibration's
    ``from_config`` under ``torch.device("cuda")``): each parameter as its module makes it
    (floating point ones of ``param_bytes`` per element), then the buffers.

    A parameter shared by two modules was made by both (a tied head: the constructor's own
    weight is dropped when the model ties it); one module registered twice made it once.
    """
    owners: dict[int, nn.Module] = {}
    tensors: list[tuple[int, bool]] = []
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = model.get_submodule(name.rpartition(".")[0])
        size = rounded(p.numel() * (param_bytes if p.is_floating_point() else p.element_size()))
        if id(p) not in owners:
            owners[id(p)] = owner
            tensors.append((size, False))
        elif owners[id(p)] is not owner:
            tensors.append((size, True))
    tensors += [(rounded(b.numel() * b.element_size()), False) for b in model.buffers()]
    return build_ops(tensors, adapters)


def simulate_loop(
    build: Sequence[Op],
    step: StepEvents,
    *,
    optimizer_state: Sequence[int] = (),
    optimizer_temporaries: Sequence[int] = (),
    optimizer_ops: Sequence[Op] = (),
    inference: bool = False,
    max_split_size: int | None = None,
    max_steps: int = MAX_STEPS,
    cublas_workspace: int = CUBLAS_WORKSPACE_BYTES,
) -> LoopMemory:
    """Run the calibration loop through a :class:`CachingAllocator`.

    The cuBLAS workspaces (``cublas_workspace`` bytes each, 0 for none) and the model
    (``build``) are allocated, then each step runs ``step``'s events; a training step
    then runs ``optimizer.step()`` (the first one creates ``optimizer_state``, block by block,
    while the gradients are alive; every one allocates ``optimizer_temporaries`` and frees
    them, then runs ``optimizer_ops``, ordered allocations and frees that must free all they
    allocate) and ``zero_grad(set_to_none=True)`` (frees ``step.leftover``). Steps repeat until
    one ends with the cache as the previous one left it, or ``max_steps``.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise EstimateError(f"max_steps must be a positive integer, got {max_steps!r}")
    if isinstance(cublas_workspace, bool) or not isinstance(cublas_workspace, int) or cublas_workspace < 0:
        raise EstimateError(f"cublas_workspace must be an int >= 0 bytes, got {cublas_workspace!r}")
    alloc = CachingAllocator(max_split_size)
    if cublas_workspace:
        for _ in range(1 if inference else 2):
            alloc.malloc(cublas_workspace)
    built: dict[int, _Block] = {}
    for h, size in build:
        if size:
            built[h] = alloc.malloc(size)
        else:
            alloc.free(built.pop(h))
    previous = None
    steps = 0
    for steps in range(1, max_steps + 1):
        blocks: list[_Block | None] = [None] * step.handles
        for h, size in step.ops:
            if size:
                blocks[h] = alloc.malloc(size)
            else:
                alloc.free(blocks[h])  # type: ignore[arg-type]
        if not inference:
            if steps == 1:
                for size in optimizer_state:
                    alloc.malloc(size)
            temporaries = [alloc.malloc(size) for size in optimizer_temporaries if size]
            for b in temporaries:
                alloc.free(b)
            made: dict[int, _Block] = {}
            for h, size in optimizer_ops:
                if size:
                    made[h] = alloc.malloc(size)
                elif h in made:
                    alloc.free(made.pop(h))
                else:
                    raise EstimateError(f"optimizer_ops frees handle {h}, which it did not allocate")
            if made:
                raise EstimateError(f"optimizer_ops leave {len(made)} allocation(s) unfreed")
        for h in step.leftover:
            alloc.free(blocks[h])  # type: ignore[arg-type]
        state = (alloc.reserved, alloc.cache_state())
        if state == previous:
            break
        previous = state
    return LoopMemory(reserved_peak=alloc.peak_reserved, allocated_peak=alloc.peak_allocated,
                      steps=steps)
