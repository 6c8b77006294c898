"""The kernels of a mixture-of-experts layer, as each ``experts_implementation`` runs them.

transformers 5 stores a block's experts as stacked weights (``gate_up_proj``: E x 2I x H,
``down_proj``: E x H x I) and runs them through ``experts_implementation``
(``transformers/integrations/moe.py``); the default, wherever the model supports it, is
``"grouped_mm"``:

* ``"grouped_mm"``: tokens sorted by expert, then one ``torch._grouped_mm`` per projection.
  On compute capability 9.x/10.x with bf16 weights and inputs PyTorch runs one CUTLASS grouped
  GEMM (no sync); otherwise (fp32 or fp16 weights, other GPUs) its fallback copies the offsets
  to the host (a sync) and loops over the experts with one ``mm`` each
  (``aten/src/ATen/native/GroupedMMUtils.h``). ``grouped_mm`` is not an autocast op: under
  bf16 autocast the fp32 expert weights stay fp32, the input is cast to fp32 and the experts
  run fp32 matmuls (the fallback). Backward is two more grouped GEMMs per projection
  (``_grouped_mm_mat1_backward``/``_mat2_backward``), the weight gradient one (E, ., .) tensor.
* ``"batched_mm"``: every (token, expert) pair gathers its expert's weight matrix
  (``gate_up_proj[expert_ids]``: tokens x top_k x 2I x H elements) and runs a ``bmm`` of
  matrix-vector products: memory-bound, meant for a handful of tokens (decoding).
* ``"eager"``: the Python loop over the experts hit, with ``nonzero``/``where`` syncs per
  expert; each expert's weight is an index of the stacked tensor, so its gradient is a
  zero-filled full-size tensor summed into the others.

Routing is taken as random: ``tokens * top_k`` (token, expert) pairs spread over the E experts
as evenly as independent random choices spread them (:func:`expert_loads`), and each expert's
matmul is tiled on its own rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

from layerscope.errors import EstimateError
from layerscope.estimate.hardware import GPU
from layerscope.estimate.roofline import (
    BACKWARD_ELEMENTWISE_RATIO,
    EXPERT_LOOP_KERNELS,
    HOST_ATEN_S_PER_KERNEL,
    HOST_LOOP_S_PER_KERNEL,
    Work,
)
from layerscope.estimate.structure import Gemm, Part
from layerscope.setup import EXPERTS_IMPLEMENTATIONS, Precision

ROUTER_KERNELS = 6
"""Kernels of a top-k router besides its linear: the fp32 cast, softmax, topk (2) and the
renormalisation (sum, divide), as in ``MixtralTopKRouter``."""

GROUPED_MM_KERNELS = 14
"""Bookkeeping kernels of ``grouped_mm_experts_forward`` besides the two grouped GEMMs and the
activation: sort (2), ``perm // top_k``, the token gather, the routing-weight gather, the
histogram (cast + ``histc``), ``cumsum``, the routing-weight multiply, the inverse permutation
(``arange``, ``index_put``), its gather, the ``sum`` over top-k and the cast back."""

GROUPED_MM_ROW_PASSES = 10
"""Passes over (tokens x top_k) x hidden elements those bookkeeping kernels make: the token
gather (read, write), the routing-weight multiply (read, write), the inverse gather (read,
write), the top-k sum (read, write) and the cast (read, write)."""

BATCHED_MM_KERNELS = 8
"""Kernels of ``batched_mm_experts_forward`` besides the two ``bmm`` and the activation:
``repeat_interleave``, two weight gathers, the routing-weight multiply, the top-k sum, the cast
back, and the reshapes that copy."""

EAGER_SYNCS_PER_EXPERT = 2
"""Host-device syncs per expert of the eager loop: ``torch.where(expert_mask[i])`` (a
``nonzero``) and ``if expert_idx == num_experts`` (``Tensor.__bool__``)."""


def fast_grouped_gemm(gpu: GPU, matmul: str) -> bool:
    """PyTorch's CUTLASS grouped GEMM: bf16 on compute capability 9.x or 10.x
    (``_scaled_mm_allowed_device(sm90_only, sm100_only)`` in ``GroupedBlas.cpp``)."""
    return matmul == "bf16" and gpu.compute_capability[0] in (9, 10)


def expert_dtype(prec: Precision) -> tuple[str, int]:
    """The (catalogue matmul dtype, bytes) the stacked experts compute in: the weights' own
    dtype, since ``grouped_mm`` and ``batched_mm`` are not autocast ops."""
    if prec.autocast:
        return "fp32" if prec.param_dtype.itemsize == 4 else prec.matmul, prec.weight_bytes
    return prec.matmul, prec.act_bytes


def check_implementation(name: str) -> str:
    """Validate an ``experts_implementation`` name.

    Raises:
        EstimateError: an unknown name, with the allowed ones.
    """
    if name not in EXPERTS_IMPLEMENTATIONS:
        raise EstimateError(f"unknown experts_implementation {name!r}; allowed: "
                            f"{', '.join(EXPERTS_IMPLEMENTATIONS)}")
    return name


def _activation(part: Part, rows: float, nbytes: int) -> tuple[float, int]:
    """Bytes and kernels of the experts' activation (and the GLU multiply) on ``rows``."""
    width = part.routed_width
    kernels = sum(part.routed_act_kernels) or 1
    moved = rows * width * nbytes * 2 * kernels
    if part.routed_gated:
        moved += rows * width * 3 * nbytes
        kernels += 1
    return moved, kernels


def _routed(part: Part) -> list[Gemm]:
    return [g for g in part.gemms if g.share < 1]


def expert_loads(pairs: float, experts: int) -> list[float]:
    """Rows each of ``experts`` experts receives out of ``pairs`` (token, expert) pairs.

    A router does not split tokens evenly: even a router choosing at random gives each expert a
    binomial share, ``Binomial(pairs, 1/E)`` (mean ``pairs/E``, standard deviation
    ``sqrt(pairs/E * (1 - 1/E))``); a trained or freshly initialised one is no more even. The
    loads are that distribution's E evenly spaced quantiles (normal approximation; they sum to
    ``pairs``, up to the clamp at 0), so each expert's GEMM is tiled and timed on rows it could
    really get: 512 rows fill exactly four 128-row tiles, 530 need a fifth.
    """
    if experts < 1:
        raise EstimateError(f"experts={experts!r} must be >= 1")
    if experts == 1 or pairs <= 0:
        return [pairs / experts] * experts
    p = 1 / experts
    sd = math.sqrt(pairs * p * (1 - p))
    z = NormalDist()
    return [max(0.0, pairs * p + sd * z.inv_cdf((i + 0.5) / experts)) for i in range(experts)]


def _mm(w: Work, fast: bool, m_each: float, n: int, k: float, groups: int, matmul: str,
        nbytes: int, ragged: str = "m") -> None:
    """``groups`` matmuls of (m_each x k) @ (k x n) as ``torch._grouped_mm`` runs them, the
    ``ragged`` dimension (``"m"``: the rows; ``"k"``: the reduction of a weight gradient)
    split over the experts as :func:`expert_loads` says, not evenly."""
    even = m_each if ragged == "m" else k
    shapes = [(load, n, k) if ragged == "m" else (m_each, n, load)
              for load in expert_loads(even * groups, groups)]
    if fast:
        w.grouped_gemm(shapes, dtype_bytes=nbytes, matmul=matmul, ragged=ragged)
        return
    w.sync()  # offs.cpu()
    with w.host_rate(HOST_ATEN_S_PER_KERNEL):
        for m, n_, k_ in shapes:
            w.gemm(m, n_, k_, dtype_bytes=nbytes, matmul=matmul, ragged=ragged)


def forward(w: Work, part: Part, tokens: int, hidden: int, prec: Precision, gpu: GPU,
            impl: str, trainable: Callable[[Gemm], bool]) -> None:
    """The routed experts of one block, forward (the router's linear is an ordinary GEMM)."""
    routed = _routed(part)
    if not routed:
        return
    e, ab = part.experts, prec.act_bytes
    share = routed[0].share
    rows = tokens * share * e  # (token, expert) pairs
    w.stream(tokens * e * 4 * 4, ROUTER_KERNELS)
    if impl == "eager" or any(g.count == 1 for g in routed):
        _eager_forward(w, part, routed, tokens, hidden, prec)
        return
    matmul, xb = expert_dtype(prec)
    act, act_kernels = _activation(part, rows, xb)
    if impl == "grouped_mm":
        fast = fast_grouped_gemm(gpu, matmul)
        w.stream(rows * hidden * xb * GROUPED_MM_ROW_PASSES, GROUPED_MM_KERNELS)
        for g in routed:
            _mm(w, fast, rows / e, g.n_out, g.n_in, e, matmul, xb)
        w.stream(act, act_kernels)
        return
    # batched_mm: each pair gathers its expert's matrix, then a bmm of matrix-vector products
    w.stream(rows * hidden * ab * 2, 1)  # repeat_interleave
    for g in routed:
        gathered = rows * g.n_in * g.n_out
        w.stream(gathered * prec.weight_bytes * 2, 1)  # weight[expert_ids]
        if prec.autocast:  # bmm autocasts the gathered fp32 matrices
            w.stream(gathered * (prec.weight_bytes + ab), 1)
        w.batched_gemm(1, g.n_out, g.n_in, rows)
    w.stream(act + rows * hidden * ab * 4, BATCHED_MM_KERNELS + act_kernels)
    del trainable


def backward(w: Work, part: Part, tokens: int, hidden: int, prec: Precision, gpu: GPU,
             impl: str, trainable: Callable[[Gemm], bool]) -> None:
    """The routed experts of one block, backward: input gradients always (the caller only
    walks blocks gradients flow through), weight gradients for trainable expert weights."""
    routed = _routed(part)
    if not routed:
        return
    e, ab, wb = part.experts, prec.act_bytes, prec.weight_bytes
    share = routed[0].share
    rows = tokens * share * e
    w.stream(tokens * e * 4 * 4 * BACKWARD_ELEMENTWISE_RATIO,
             ROUTER_KERNELS * BACKWARD_ELEMENTWISE_RATIO)
    if impl == "eager" or any(g.count == 1 for g in routed):
        _eager_backward(w, part, routed, tokens, hidden, prec, trainable)
        return
    matmul, xb = expert_dtype(prec)
    act, act_kernels = _activation(part, rows, xb)
    if impl == "grouped_mm":
        fast = fast_grouped_gemm(gpu, matmul)
        # the gathers' backward: zero-filled gradients and index_put_ with accumulation
        w.stream(rows * hidden * xb * GROUPED_MM_ROW_PASSES * BACKWARD_ELEMENTWISE_RATIO,
                 GROUPED_MM_KERNELS * BACKWARD_ELEMENTWISE_RATIO)
        w.stream(act * BACKWARD_ELEMENTWISE_RATIO, act_kernels * BACKWARD_ELEMENTWISE_RATIO)
        for g in reversed(routed):
            _mm(w, fast, rows / e, g.n_in, g.n_out, e, matmul, xb)  # input gradient
            if trainable(g):
                # weight gradient, returned in the weight's own layout (the backward formula
                # takes its strides, as mm_mat2_backward does): no copy into .grad
                _mm(w, fast, g.n_in, g.n_out, rows / e, e, matmul, xb, "k")
        return
    # batched_mm: gradients of the gathered matrices, then index backward onto the experts
    for g in reversed(routed):
        gathered = rows * g.n_in * g.n_out
        w.batched_gemm(1, g.n_in, g.n_out, rows)  # input gradient: reads every matrix
        if trainable(g):
            w.batched_gemm(g.n_out, g.n_in, 1, rows)  # outer products
            if prec.autocast:
                w.stream(gathered * (ab + wb), 1)
            w.stream(e * g.n_in * g.n_out * wb + gathered * wb * 2, 2)  # zeros + index_put_
    w.stream((act + rows * hidden * ab * 4) * BACKWARD_ELEMENTWISE_RATIO,
             (BATCHED_MM_KERNELS + act_kernels) * BACKWARD_ELEMENTWISE_RATIO)


def _eager_forward(w: Work, part: Part, routed: list[Gemm], tokens: int, hidden: int,
                   prec: Precision) -> None:
    """transformers' eager loop: per expert two syncs, then its kernels from Python."""
    e, ab = part.experts, prec.act_bytes
    with w.host_rate(HOST_LOOP_S_PER_KERNEL):
        w.stream(tokens * e * 8, 5)  # one_hot, permute, sum, greater, nonzero
        w.sync()
        for load in expert_loads(tokens * routed[0].share * e, e):
            for _ in range(EAGER_SYNCS_PER_EXPERT):
                w.sync()
            for g in routed:
                per = g.count / e  # stacked: one matrix of E; separate Linears: 1/E of them
                w.gemm(load, g.n_out, g.n_in, per, ragged="m")
                if prec.autocast:  # the expert's slice is not a leaf: cast every time
                    w.stream(per * g.n_in * g.n_out * (prec.weight_bytes + ab), 1)
            w.stream(tokens * hidden * 4 * ab / e, EXPERT_LOOP_KERNELS)
            act, kernels = _activation(part, tokens * routed[0].share, ab)
            w.stream(act, kernels)


def _eager_backward(w: Work, part: Part, routed: list[Gemm], tokens: int, hidden: int,
                    prec: Precision, trainable: Callable[[Gemm], bool]) -> None:
    e, ab, wb = part.experts, prec.act_bytes, prec.weight_bytes
    for g in routed:
        loads = expert_loads(tokens * g.share * e, e)
        for load in loads:  # input gradient, each expert on its rows
            w.gemm(load, g.n_in, g.n_out, g.count / e, ragged="m")
        if trainable(g):
            for load in loads:  # weight gradient
                w.gemm(g.n_out, g.n_in, load, g.count / e, ragged="k")
            if prec.autocast:
                w.stream(g.count * g.n_in * g.n_out * (ab + wb), g.count)
            if g.count > 1:
                # each expert's weight is an index of the stacked tensor: its gradient is a
                # zero-filled full-size tensor (index backward), summed in place into the
                # others: E fills + (E - 1) read-read-write adds
                full = g.count * g.n_in * g.n_out * wb
                w.stream(full * (g.count + 3 * (g.count - 1)), 2 * g.count)
    # the loop's gathers and scatters each have a single-kernel backward
    w.stream(tokens * hidden * 8 * ab, math.ceil(e * EXPERT_LOOP_KERNELS))
    act, kernels = _activation(part, tokens * routed[0].share * e, ab)
    w.stream(act * BACKWARD_ELEMENTWISE_RATIO, e * kernels * BACKWARD_ELEMENTWISE_RATIO)
