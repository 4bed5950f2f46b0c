"""Softmax-family kernels: softmax, log-softmax, logsumexp and their backward passes.

Every array arrives as a flat buffer with an element offset and strides (see
``fastsce._layout``). Two traversals share the arithmetic:

* ``*_rows``: classes contiguous. One row per iteration, rows split over threads.
* ``*_columns``: classes strided, a contiguous ``inner`` axis. A tile of neighbouring
  columns is reduced with vector operations along the contiguous axis, so ``axis=0``
  needs no transposed copy.
* ``*_row_blocks``: back-to-back rows of few classes, too short for a vector loop each;
  a block of them is transposed into a small (classes, rows) tile and computed there
  by the column loops, one vector lane per row.

Kernels that write an array first copy their source row (or tile) into the
destination, then transform the destination in place with loops over one array.
LLVM vectorizes a loop over two arrays only after a runtime check that they do not
overlap, and falls back to scalar code when they do; single-array loops make
``out=x`` (and the cross-entropy's ``inplace=True``) as fast as a separate output.
The copy reads memory once; every later pass hits cache.

Sums run in the input dtype over blocks of ``SUM_BLOCK`` elements (spread across
LLVM's vector lanes) and in float64 across blocks. Each row is reduced by one
thread, so results are bitwise identical for every thread count.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import overload

from .._config import ELEMENTWISE_FASTMATH, FASTMATH, JIT_OPTIONS
from .._math import (
    CACHE_LINE_BYTES,
    UNSCALE,
    exp,
    exp_diff,
    fmaximum,
    log,
    mul_pow2,
    prefetch,
    scaled_exp_diff,
    scaled_exp_diff_rounded,
    store_fence,
)
from .rowio import (
    exact_exps,
    first_line_start,
    glue,
    load_row,
    load_tile,
    open_row,
    readable_row,
    readable_row_max,
    row_scratch,
    store_row,
    store_tile,
    stream_scaled_into,
    work_buffer,
)

reduction = numba.njit(fastmath=FASTMATH, **JIT_OPTIONS)
# Elementwise loops leave out `reassoc`: `(x - m) - log_sum` must keep its order.
elementwise = numba.njit(fastmath=ELEMENTWISE_FASTMATH, **JIT_OPTIONS)
parallel = numba.njit(parallel=True, fastmath=FASTMATH, **JIT_OPTIONS)

SUM_BLOCK = 256

# Loops index slices with `range(size)`: a provably non-negative index keeps Numba's
# negative-index wraparound out of the loop body, where it would block vectorization.


# ---------------------------------------------------------------- row primitives ----
@elementwise
def copy_into(src, dst):
    """``dst[:] = src`` (the arrays must not overlap)."""
    for j in range(dst.size):
        dst[j] = src[j]


# Rows up to this size are prefetched whole: with the working row they fit in L2. A
# longer row would evict its own working row; the hardware prefetcher streams it.
PREFETCH_MAX_BYTES = 128 * 1024


@glue
def next_row(x, x_start, x_ld, i, n_rows, n_cols):
    """Row ``i + 1`` of ``x`` (to prefetch while row ``i`` is computed), or an empty slice
    (last row, or rows too long to prefetch)."""
    if i + 1 >= n_rows or n_cols * x.itemsize > PREFETCH_MAX_BYTES:
        return x[:0]
    return x[x_start + (i + 1) * x_ld : x_start + (i + 1) * x_ld + n_cols]


@glue
def next_pair(x, x_start, x_ld, i, n_rows, n_cols):
    """Rows ``i + 2`` and ``i + 3`` of ``x`` (to prefetch while rows ``i`` and ``i + 1``
    are computed): :func:`next_row` of rows ``i + 1`` and ``i + 2``."""
    return next_row(x, x_start, x_ld, i + 1, n_rows, n_cols), next_row(x, x_start, x_ld, i + 2, n_rows, n_cols)


@glue
def next_row_block(x, x_start, hi, n_rows, n_cols, per_tile):
    """The back-to-back rows ``[hi, hi + per_tile)`` of ``x`` (clipped to ``n_rows``): the
    row block after the one ending at row ``hi``, to prefetch while that one is computed."""
    return x[x_start + hi * n_cols : x_start + min(n_rows, hi + per_tile) * n_cols]


@numba.njit(**JIT_OPTIONS)
def prefetch_span(ahead, lo, hi):
    """Prefetch ``ahead[lo:hi]`` (clipped to its size), one hint per cache line."""
    step = max(1, CACHE_LINE_BYTES // ahead.itemsize)
    for j in range(lo, min(hi, ahead.size), step):
        prefetch(ahead, j)


# The exp loops below prefetch the next row (`ahead`) block by block: a row's arithmetic
# then overlaps the next row's read from memory instead of following it (measured on
# 65536x1000 float32: 1.7x the time of a copy without, 1.2x with).
@reduction
def row_sum_exp(row, shift, ahead):
    """``Σ exp(row - shift)`` as float64; prefetches ``ahead`` (see above)."""
    total = 0.0
    for start in range(0, row.size, SUM_BLOCK):
        prefetch_span(ahead, start, start + SUM_BLOCK)
        block = row[start : start + SUM_BLOCK]
        part = row.dtype.type(0.0)
        for j in range(block.size):
            part += scaled_exp_diff_rounded(block[j], shift)
        total += part
    return total * UNSCALE


# Rows up to this many classes are reduced two at a time: one loop over both rows gives
# the core two independent chains, which hides the latency of each row's reductions
# (measured, logsumexp on one core: 262144 x 128 26 -> 13 ms, 1000 classes -15%, 2048
# classes +9%). Kernels that also write the rows pair fewer (log_softmax: 128 classes
# 16 -> 9.5 ms on two cores, 256 even, 512 and 1000 slower; cross-entropy gradient rows:
# 128 classes 18.4 -> 15.3 ms, 1000 classes 21 -> 27 ms; all on Zen 4, when pairs did not
# prefetch). Pairs now prefetch the next pair as the single-row loops prefetch the next
# row: on Zen 3 (AVX2), logsumexp of 65536x1000 32 -> 23 ms, cross_entropy 32 -> 24,
# 262144x128 unchanged within the noise. The written limit was not measured again.
PAIR_MAX_CLASSES = 1024
PAIR_MAX_WRITTEN_CLASSES = 256


@reduction
def pair_sum_exp(a, shift_a, b, shift_b, ahead_a, ahead_b):
    """``(Σ exp(a - shift_a), Σ exp(b - shift_b))`` as float64 for two rows of one length,
    in one loop; otherwise as :func:`row_sum_exp`, prefetching the next pair of rows."""
    total_a = 0.0
    total_b = 0.0
    for start in range(0, a.size, SUM_BLOCK):
        prefetch_span(ahead_a, start, start + SUM_BLOCK)
        prefetch_span(ahead_b, start, start + SUM_BLOCK)
        block_a = a[start : start + SUM_BLOCK]
        block_b = b[start : start + SUM_BLOCK]
        part_a = a.dtype.type(0.0)
        part_b = a.dtype.type(0.0)
        for j in range(block_a.size):
            part_a += scaled_exp_diff_rounded(block_a[j], shift_a)
            part_b += scaled_exp_diff_rounded(block_b[j], shift_b)
        total_a += part_a
        total_b += part_b
    return total_a * UNSCALE, total_b * UNSCALE


@reduction
def exp_inplace(row, shift, ahead, exact):
    """``row = 2**EXP_SCALE_BITS · exp(row - shift)``; returns the new ``Σ row`` (so
    scaled too) as float64. Prefetches ``ahead``. ``exact``: take ``row - shift``
    exactly (see :func:`scaled_exp_diff`); false for results rounded to 16 bits, where
    the rounded difference's error (below 1e-5 relative) is invisible.

    Each block is summed by a loop of its own, after its exps are stored: a loop that
    both stores and sums got a different summation order wherever LLVM optimized it
    again (a kernel freshly compiled and the same kernel loaded from the cache gave
    different bits, AVX-512); a read-only sum keeps its order. The re-read hits L1.
    """
    total = 0.0
    for start in range(0, row.size, SUM_BLOCK):
        prefetch_span(ahead, start, start + SUM_BLOCK)
        block = row[start : start + SUM_BLOCK]
        scaled_exp_inplace(block, shift, exact)
        part = row.dtype.type(0.0)
        for j in range(block.size):
            part += block[j]
        total += part
    return total


@reduction
def pair_exp_inplace(a, shift_a, b, shift_b, ahead_a, ahead_b, exact):
    """:func:`exp_inplace` of two rows of one length in one loop, prefetching the next
    pair of rows; returns both new sums."""
    total_a = 0.0
    total_b = 0.0
    for start in range(0, a.size, SUM_BLOCK):
        prefetch_span(ahead_a, start, start + SUM_BLOCK)
        prefetch_span(ahead_b, start, start + SUM_BLOCK)
        block_a = a[start : start + SUM_BLOCK]
        block_b = b[start : start + SUM_BLOCK]
        if exact:
            for j in range(block_a.size):
                block_a[j] = scaled_exp_diff(block_a[j], shift_a)
                block_b[j] = scaled_exp_diff(block_b[j], shift_b)
        else:
            for j in range(block_a.size):
                block_a[j] = scaled_exp_diff_rounded(block_a[j], shift_a)
                block_b[j] = scaled_exp_diff_rounded(block_b[j], shift_b)
        part_a = a.dtype.type(0.0)
        part_b = a.dtype.type(0.0)
        for j in range(block_a.size):
            part_a += block_a[j]
            part_b += block_b[j]
        total_a += part_a
        total_b += part_b
    return total_a, total_b


@reduction
def row_sum(row):
    """``Σ row`` as float64."""
    total = 0.0
    for start in range(0, row.size, SUM_BLOCK):
        block = row[start : start + SUM_BLOCK]
        part = row.dtype.type(0.0)
        for j in range(block.size):
            part += block[j]
        total += part
    return total


@reduction
def row_dot(a, b):
    """``Σ a·b`` as float64."""
    total = 0.0
    for start in range(0, a.size, SUM_BLOCK):
        block_a = a[start : start + SUM_BLOCK]
        block_b = b[start : start + SUM_BLOCK]
        part = a.dtype.type(0.0)
        for j in range(block_a.size):
            part += block_a[j] * block_b[j]
        total += part
    return total


@elementwise
def scaled_exp_inplace(row, shift, exact):
    """``row = 2**EXP_SCALE_BITS · exp(row - shift)``, ``row - shift`` taken exactly or
    (``exact`` false, see :func:`exp_inplace`) rounded."""
    if exact:
        for j in range(row.size):
            row[j] = scaled_exp_diff(row[j], shift)
    else:
        for j in range(row.size):
            row[j] = scaled_exp_diff_rounded(row[j], shift)


@elementwise
def log_softmax_inplace(row, shift, log_total):
    """``row = (row - shift) - log_total``, rounded in this order for accuracy."""
    for j in range(row.size):
        row[j] = (row[j] - shift) - log_total


@elementwise
def softmax_backward_inplace(grad, prob, dot):
    """``grad = prob · (grad - dot)``."""
    for j in range(grad.size):
        grad[j] = prob[j] * (grad[j] - dot)


@elementwise
def log_softmax_backward_inplace(grad, log_prob, grad_sum):
    """``grad = grad - exp(log_prob) · grad_sum``."""
    for j in range(grad.size):
        grad[j] = grad[j] - exp(log_prob[j]) * grad_sum


@glue
def lse_from_total(m, total):
    """``m + log(total)`` as float64, where ``total = Σ exp(row - m)`` and ``m`` the row max.

    As torch: a ``+inf`` max gives ``+inf`` and an all ``-inf`` row ``-inf`` (``total`` is
    NaN for both); NaN stays NaN.
    """
    return np.float64(m) if abs(m) == np.inf else m + log(np.float64(total))


@reduction
def logsumexp_from_max(row, m, ahead):
    """``log Σ exp(row)`` as float64 given ``m = row_max(row)``; see :func:`lse_from_total`.
    Prefetches ``ahead``."""
    return lse_from_total(m, row_sum_exp(row, m, ahead))


@reduction
def log_softmax_row(row, m, ahead):
    """``row = log_softmax(row)`` in place, given ``m = max(row)``. Prefetches ``ahead``."""
    log_total = row.dtype.type(log(row_sum_exp(row, m, ahead)))
    log_softmax_inplace(row, m, log_total)


# ------------------------------------------------------------------- row kernels ----
# Rows are split into tasks of consecutive rows; a task allocates its scratch row once.
# `stream` (chosen by the caller for outputs bigger than the cache) computes each row in
# that scratch and streams it out with non-temporal stores (see rowio).
TASK_ROWS = 64


MIN_TASKS = 16  # enough to balance the threads of a typical machine


@glue
def task_size(n_rows):
    """Rows per task: up to TASK_ROWS, but at least MIN_TASKS tasks when there are enough
    rows. (Independent of the thread count, which a cached kernel cannot read.)"""
    return max(1, min(TASK_ROWS, n_rows // MIN_TASKS))


@glue
def task_bounds(task, n_rows, rows_per_task):
    """Rows ``[lo, hi)`` of ``task``."""
    lo = task * rows_per_task
    return lo, min(lo + rows_per_task, n_rows)


@parallel
def softmax_rows(x, x_start, x_ld, out, out_start, out_ld, n_rows, n_cols, half_format, stream):
    """``out[i] = softmax(x[i])`` for each row (``out`` may be ``x``).

    16-bit arrays arrive as uint16 bits (``half_format`` says which); ``stream``: write
    around the caches. See ``rowio``.
    """
    per_task = task_size(n_rows)
    for task in numba.prange((n_rows + per_task - 1) // per_task):
        row = row_scratch(out, n_cols)
        lo, hi = task_bounds(task, n_rows, per_task)
        for i in range(lo, hi):
            dst, m = open_row(x, x_start, x_ld, out, out_start, out_ld, i, n_cols, half_format, row)
            total = exp_inplace(row, m, next_row(x, x_start, x_ld, i, n_rows, n_cols), exact_exps(out))
            store_row(row, dst, half_format, stream, 1.0 / total)  # the softmax's division, on the way out
        store_fence()


@parallel
def log_softmax_rows(x, x_start, x_ld, out, out_start, out_ld, n_rows, n_cols, half_format, stream):
    """``out[i] = log_softmax(x[i])`` for each row; arguments as :func:`softmax_rows`."""
    per_task = task_size(n_rows)
    for task in numba.prange((n_rows + per_task - 1) // per_task):
        row = row_scratch(out, n_cols)
        row_b = row_scratch(out, n_cols if n_cols <= PAIR_MAX_WRITTEN_CLASSES else 0)
        lo, hi = task_bounds(task, n_rows, per_task)
        i = lo
        while i < hi:
            dst, m = open_row(x, x_start, x_ld, out, out_start, out_ld, i, n_cols, half_format, row)
            if i + 1 < hi and n_cols <= PAIR_MAX_WRITTEN_CLASSES:  # rows i and i + 1 together
                dst_b, m_b = open_row(x, x_start, x_ld, out, out_start, out_ld, i + 1, n_cols, half_format, row_b)
                ahead_a, ahead_b = next_pair(x, x_start, x_ld, i, n_rows, n_cols)
                total, total_b = pair_sum_exp(row, m, row_b, m_b, ahead_a, ahead_b)
                log_softmax_inplace(row, m, row.dtype.type(log(total)))
                log_softmax_inplace(row_b, m_b, row.dtype.type(log(total_b)))
                store_row(row, dst, half_format, stream)
                store_row(row_b, dst_b, half_format, stream)
                i += 2
            else:
                log_softmax_row(row, m, next_row(x, x_start, x_ld, i, n_rows, n_cols))
                store_row(row, dst, half_format, stream)
                i += 1
        store_fence()


@parallel
def logsumexp_rows(x, x_start, x_ld, out, n_rows, n_cols, half_format):
    """``out[i] = log Σ_j exp(x[i, j])``, ``out`` contiguous float32/float64."""
    per_task = task_size(n_rows)
    for task in numba.prange((n_rows + per_task - 1) // per_task):
        work = work_buffer(x, n_cols)
        work_b = work_buffer(x, n_cols if n_cols <= PAIR_MAX_CLASSES else 0)  # the pair's second row
        lo, hi = task_bounds(task, n_rows, per_task)
        i = lo
        while i < hi:
            values, m = readable_row_max(x[x_start + i * x_ld : x_start + i * x_ld + n_cols], work, half_format)
            if i + 1 < hi and n_cols <= PAIR_MAX_CLASSES:  # rows i and i + 1 together
                values_b, m_b = readable_row_max(x[x_start + (i + 1) * x_ld : x_start + (i + 1) * x_ld + n_cols],
                                                 work_b, half_format)
                ahead_a, ahead_b = next_pair(x, x_start, x_ld, i, n_rows, n_cols)
                total, total_b = pair_sum_exp(values, m, values_b, m_b, ahead_a, ahead_b)
                out[i] = lse_from_total(m, total)
                out[i + 1] = lse_from_total(m_b, total_b)
                i += 2
            else:
                out[i] = logsumexp_from_max(values, m, next_row(x, x_start, x_ld, i, n_rows, n_cols))
                i += 1


@parallel
def backward_rows(g, g_start, g_ld, y, y_start, y_ld, out, out_start, out_ld, n_rows, n_cols, half_format, stream,
                  log_form):
    """The softmax-family VJP for each row (``out`` may be ``g``), from the forward output ``y``:

    * ``log_form`` false, ``y = softmax``: ``out[i] = y[i] · (g[i] - Σ_j g[i, j] y[i, j])``;
    * ``log_form`` true, ``y = log_softmax``: ``out[i] = g[i] - exp(y[i]) · Σ_j g[i, j]``.

    One kernel for both keeps one compiled signature per dtype; the branch is per row,
    outside the loops over the elements.
    """
    per_task = task_size(n_rows)
    for task in numba.prange((n_rows + per_task - 1) // per_task):
        row = row_scratch(out, n_cols)
        forward_work = work_buffer(y, n_cols)
        lo, hi = task_bounds(task, n_rows, per_task)
        for i in range(lo, hi):
            forward = readable_row(y[y_start + i * y_ld : y_start + i * y_ld + n_cols], forward_work, half_format)
            dst, _ = open_row(g, g_start, g_ld, out, out_start, out_ld, i, n_cols, half_format, row)
            if log_form:
                log_softmax_backward_inplace(row, forward, row.dtype.type(row_sum(row)))
            else:
                softmax_backward_inplace(row, forward, row.dtype.type(row_dot(row, forward)))
            store_row(row, dst, half_format, stream)
        store_fence()


# -------------------------------------------------------------- long-row kernels ----
# A row whose working copy does not fit in L2 beside it (a million classes) would come
# from L3 or memory on every pass. Such a row is reduced a segment at a time in one read
# (online softmax: each segment's (max, Σ exp) merged into the row's by rescaling), then
# computed and written a segment at a time in a second read, each segment's working copy
# staying in L1/L2. Softmax and gradient rows written as floats keep each segment's exps
# (relative to the segment's own max) in the output instead, and the second pass only
# rescales them: one exp per element, not two (measured 32 x 2097152 float32 softmax
# 30-31 -> 26-28 ms, CE+grad 33 -> 29-30 ms). The wrapper chooses these kernels from the
# row length (LONG_ROW_BYTES).
@glue
def merge_max_sum(m, total, m_part, total_part):
    """``(max, Σ exp(x - max))`` of a row from those of its parts ``a`` and ``b``:
    ``Σ = Σ_a·e^(m_a - m) + Σ_b·e^(m_b - m)`` with ``m = max(m_a, m_b)``, in float64.
    A part of only ``-inf`` adds nothing (its own sum is NaN); NaN and ``+inf`` propagate
    as in :func:`lse_from_total`."""
    if m_part == -np.inf:
        return m, total
    merged = fmaximum(m, m_part)
    kept = total if m == merged else total * exp(m - merged)
    return merged, kept + (total_part if m_part == merged else total_part * exp(m_part - merged))


@glue
def long_row_max_sum(src, segment, half_format, weight):
    """``(max, Σ exp(src - max), Σ weight·src)`` (float64) of a long row, read once,
    ``segment`` elements at a time (the next one prefetched while one is summed); the
    weighted sum (the cross-entropy's label smoothing) only for a non-empty ``weight``."""
    m = -np.inf
    total = 0.0
    weighted = 0.0
    for start in range(0, src.size, segment):
        part = src[start : start + segment]
        values, m_part = readable_row_max(part, work_buffer(src, part.size), half_format)
        part_total = row_sum_exp(values, m_part, src[start + segment : start + 2 * segment])
        m, total = merge_max_sum(m, total, np.float64(m_part), part_total)
        if weight.size:
            weighted += row_dot(weight[start : start + part.size], values)
    return m, total, weighted


@elementwise
def scale_inplace(row, factor):
    """``row *= factor``."""
    for j in range(row.size):
        row[j] = row[j] * factor


@elementwise
def zero_inplace(row):
    """``row = 0``."""
    for j in range(row.size):
        row[j] = 0.0


@reduction
def first_argmax(row, m):
    """As ``np.argmax`` and ``torch.argmax``: the first NaN if the row holds one, else the
    first entry equal to ``m = max(row)``."""
    for j in range(row.size):
        if row[j] != row[j]:
            return j
    for j in range(row.size):
        if row[j] == m:
            return j
    return 0


@glue
def long_row_kept_exps(src, dst, segment, half_format, segment_max, weight, with_argmax):
    """Pass one of a long row whose output holds floats: each segment's scaled exps of
    ``src - (the segment's own max)`` written to ``dst`` (which may be ``src``: a segment
    is read before it is written), its max to ``segment_max``.

    Returns ``(max, Σ exp(src - max), Σ weight·src, argmax)`` of the row: the first two
    as :func:`long_row_max_sum`, the weighted sum only for a non-empty ``weight`` (else
    0), the :func:`first_argmax` only ``with_argmax`` (else -1), all from this one read.
    """
    m = -np.inf
    total = 0.0
    weighted = 0.0
    argmax = -1
    argmax_value = -np.inf
    for k in range(segment_max.size):
        start = k * segment
        part = row_scratch(dst, min(segment, src.size - start))
        m_part = load_row(src[start : start + segment], part, half_format)
        if weight.size:
            weighted += row_dot(weight[start : start + part.size], part)
        # The row's first argmax: in the first segment holding NaN, or else the first
        # segment whose max beats every earlier one.
        if with_argmax and argmax_value == argmax_value and (m_part != m_part or argmax < 0 or m_part > argmax_value):
            argmax = start + first_argmax(part, m_part)
            argmax_value = m_part
        part_total = exp_inplace(part, m_part, src[start + segment : start + 2 * segment], exact_exps(dst))
        store_row(part, dst[start : start + segment], half_format, False)  # read again soon: cached
        segment_max[k] = m_part
        m, total = merge_max_sum(m, total, np.float64(m_part), part_total * UNSCALE)
    return m, total, weighted, argmax


@elementwise
def subtract_scaled(row, scale, weight):
    """``row -= scale·weight``."""
    for j in range(row.size):
        row[j] = row[j] - scale * weight[j]


@glue
def rescale_long_row(dst, segment, segment_max, m, scale, weight_scale, weight):
    """Pass two over exps kept by :func:`long_row_kept_exps`: ``dst = exp(x - m)·scale -
    weight_scale·weight`` (no weight term for an empty ``weight``), segment ``k``
    multiplied in place by ``e**(segment_max[k] - m)·scale``. A segment of only ``-inf``
    (its exps are NaN) below a finite row max has exps 0."""
    for k in range(segment_max.size):
        part = dst[k * segment : (k + 1) * segment]
        if segment_max[k] == -np.inf and m != -np.inf:
            zero_inplace(part)
        else:
            rescale_kept_exps(part, segment_max[k] - m, scale)
        if weight.size:
            subtract_scaled(part, part.dtype.type(weight_scale), weight[k * segment : k * segment + part.size])


@elementwise
def rescale_inplace(row, mantissa, exponent):
    """``row = row · mantissa · 2**exponent``, rounded once where the result is
    subnormal (``mul_pow2``'s exact power-of-two factors)."""
    for j in range(row.size):
        row[j] = mul_pow2(row[j] * mantissa, exponent)


def rescale_kept_exps(part, shift, scale):
    """``part *= e**shift · scale`` (float64 ``shift <= 0``) for exps kept by
    :func:`long_row_kept_exps`: one multiply where the factor is a normal number of
    ``part``'s dtype. Below that (a segment far below the row max) the factor is taken
    as mantissa and power of two from its logarithm, never rounded through the
    subnormals itself, so that subnormal results keep the precision subnormals hold; 0
    where even ``2**EXP_SCALE_BITS`` times the factor underflows. (A no-op for 16-bit bits, which
    never keep exps, so that kernels compile for them.)"""
    tiny = np.float64(np.finfo(part.dtype).tiny)
    factor = exp(shift) * scale
    if abs(factor) >= tiny or factor != factor or scale == 0.0:
        scale_inplace(part, part.dtype.type(factor))
        return
    log_factor = shift + log(abs(scale))
    if log_factor < 2.0 * log(tiny):  # float32: below 2**-252
        zero_inplace(part)
        return
    exponent = math.floor(log_factor / _LN2)
    mantissa = math.copysign(exp(log_factor - exponent * _LN2), scale)  # in [1, 2)
    rescale_inplace(part, part.dtype.type(mantissa), int(exponent))


_LN2 = math.log(2.0)


@overload(rescale_kept_exps, jit_options={"fastmath": FASTMATH, **JIT_OPTIONS}, inline="always")
def _rescale_kept_exps(part, shift, scale):
    if part.dtype == types.uint16:
        return lambda part, shift, scale: None
    return rescale_kept_exps


@glue
def long_row_reduce(src, dst, segment, half_format, keep_exps, segment_max):
    """Pass one of :func:`forward_long_rows` over a row (or a chunk of one, whole
    segments): ``(max, Σ exp(src - max))``, the exps kept in ``dst`` if ``keep_exps``."""
    if keep_exps:
        m, total, _, _ = long_row_kept_exps(src, dst, segment, half_format, segment_max, dst[:0], False)
        return m, total
    m, total, _ = long_row_max_sum(src, segment, half_format, dst[:0])
    return m, total


@glue
def long_row_write(src, dst, segment, half_format, stream, keep_exps, log_form, segment_max, m, total):
    """Pass two of :func:`forward_long_rows` over a row (or a chunk of one), given the
    whole row's ``(max, Σ exp(x - max))``."""
    if keep_exps:
        rescale_long_row(dst, segment, segment_max, m, UNSCALE / total, 0.0, dst[:0])  # exps scaled
        return
    factor = UNSCALE / total  # scaled_exp_inplace's exps carry 2**EXP_SCALE_BITS
    log_total = log(total)
    for start in range(0, src.size, segment):
        part = row_scratch(dst, min(segment, src.size - start))
        load_row(src[start : start + segment], part, half_format)
        if log_form:
            log_softmax_inplace(part, part.dtype.type(m), part.dtype.type(log_total))
            store_row(part, dst[start : start + segment], half_format, stream)
        else:
            scaled_exp_inplace(part, part.dtype.type(m), exact_exps(dst))
            store_row(part, dst[start : start + segment], half_format, stream, factor)


@parallel
def forward_long_rows(x, x_start, x_ld, out, out_start, out_ld, n_rows, n_cols, half_format, stream, segment,
                      log_form, chunk_segments):
    """:func:`softmax_rows` (``log_form`` false) or :func:`log_softmax_rows` (true) for long
    rows (``out`` may be ``x``). One kernel for both keeps one compiled signature per
    dtype; the branch is per segment, outside the element loops.

    * softmax into floats: :func:`long_row_kept_exps` writes each segment's exps to
      ``out``, then each is rescaled there by ``e**(its max - the row's) / Σ``: one exp
      per element (a second would make 8 MB rows compute-bound).
    * otherwise (log_softmax, 16-bit softmax): reduced by :func:`long_row_max_sum`, then
      computed and written ``segment`` elements at a time, read again from ``x`` (a
      segment is read before it is written, and only after the whole row was reduced).

    ``chunk_segments`` 0: a row per task. Otherwise each row is split into chunks of that
    many segments, reduced by all threads, merged in chunk order, then written by all
    threads (see ``_config.SPLIT_ROW_BYTES``).
    """
    keep_exps = not log_form and exact_exps(out)  # 16-bit out cannot hold float32 exps
    n_segments = (n_cols + segment - 1) // segment
    if chunk_segments == 0:
        for i in numba.prange(n_rows):
            src = x[x_start + i * x_ld : x_start + i * x_ld + n_cols]
            dst = out[out_start + i * out_ld : out_start + i * out_ld + n_cols]
            segment_max = np.empty(n_segments if keep_exps else 0, np.float64)
            m, total = long_row_reduce(src, dst, segment, half_format, keep_exps, segment_max)
            long_row_write(src, dst, segment, half_format, stream, keep_exps, log_form, segment_max, m, total)
            store_fence()
        return
    chunk = chunk_segments * segment
    n_chunks = (n_cols + chunk - 1) // chunk
    segment_max = np.empty(n_segments if keep_exps else 0, np.float64)
    chunk_max = np.empty(n_chunks, np.float64)
    chunk_total = np.empty(n_chunks, np.float64)
    for i in range(n_rows):
        src = x[x_start + i * x_ld : x_start + i * x_ld + n_cols]
        dst = out[out_start + i * out_ld : out_start + i * out_ld + n_cols]
        for c in numba.prange(n_chunks):
            chunk_max[c], chunk_total[c] = long_row_reduce(
                src[c * chunk : (c + 1) * chunk], dst[c * chunk : (c + 1) * chunk], segment, half_format, keep_exps,
                segment_max[c * chunk_segments : (c + 1) * chunk_segments])
        m = -np.inf
        total = 0.0
        for c in range(n_chunks):
            m, total = merge_max_sum(m, total, chunk_max[c], chunk_total[c])
        for c in numba.prange(n_chunks):
            long_row_write(src[c * chunk : (c + 1) * chunk], dst[c * chunk : (c + 1) * chunk], segment, half_format,
                           stream, keep_exps, log_form, segment_max[c * chunk_segments : (c + 1) * chunk_segments],
                           m, total)
            store_fence()


@glue
def merged_long_row(part_max, part_total, part_weighted, part_argmax):
    """``(max, Σ exp(x - max), Σ w·x, argmax)`` of a row from those of its chunks, merged
    in chunk order; the argmax is the first chunk's holding NaN, else the first chunk's
    whose max is the row's (each chunk's its :func:`first_argmax`, offset)."""
    m = -np.inf
    total = 0.0
    weighted = 0.0
    for c in range(part_max.size):
        m, total = merge_max_sum(m, total, part_max[c], part_total[c])
        weighted += part_weighted[c]
    argmax = part_argmax[0]
    for c in range(part_max.size):
        if part_max[c] != part_max[c] or (m == m and part_max[c] == m):
            argmax = part_argmax[c]
            break
    return m, total, weighted, argmax


@parallel
def logsumexp_split_rows(x, x_start, x_ld, out, n_rows, n_cols, half_format, segment, chunk_segments):
    """:func:`logsumexp_rows` for rows of megabytes, a row at a time, each split across
    the threads in chunks of ``chunk_segments`` segments merged in chunk order (see
    :func:`forward_long_rows`)."""
    chunk = chunk_segments * segment
    n_parts = (n_cols + chunk - 1) // chunk
    part_max = np.empty(n_parts, np.float64)
    part_total = np.empty(n_parts, np.float64)
    no_weighted, no_argmax = np.zeros(n_parts, np.float64), np.zeros(n_parts, np.int64)  # merged, unused
    for i in range(n_rows):
        src = x[x_start + i * x_ld : x_start + i * x_ld + n_cols]
        for c in numba.prange(n_parts):
            part_max[c], part_total[c], _ = long_row_max_sum(src[c * chunk : (c + 1) * chunk], segment, half_format,
                                                             out[:0])
        m, total, _, _ = merged_long_row(part_max, part_total, no_weighted, no_argmax)
        out[i] = lse_from_total(m, total)


# ------------------------------------------------------------- column primitives ----
# A tile is `width` neighbouring columns of an (n_classes, ·) block; class c of the
# tile starts at `base + c * stride`. Per-column accumulators are float64 arrays.
# `lead` > 0 widens each outer index's first tile by that many columns, so that the
# others start where the output's cache lines do (see forward_columns).
@glue
def tiles_per_outer(n_inner, block, lead):
    """Tiles per outer index: the first ``lead + block`` columns wide, the others ``block``."""
    return max(1, (n_inner - lead + block - 1) // block)


@glue
def tile_of(t, n_inner, block, lead=0):
    """Tile ``t`` → (outer index, first column, width)."""
    per_outer = tiles_per_outer(n_inner, block, lead)
    o = t // per_outer
    k = t - o * per_outer
    j0 = 0 if k == 0 else lead + k * block
    return o, j0, min(lead + (k + 1) * block, n_inner) - j0


@glue
def tile_count(n_outer, n_inner, block, lead=0):
    """Number of tiles of ``block`` columns over ``(n_outer, ·, n_inner)``."""
    return n_outer * tiles_per_outer(n_inner, block, lead)


@elementwise
def copy_tile(x, x_base, x_stride, out, out_base, out_stride, n_classes, width):
    """Copy a tile from ``x`` into ``out`` (which must not overlap it)."""
    for c in range(n_classes):
        copy_into(x[x_base + c * x_stride : x_base + c * x_stride + width],
                  out[out_base + c * out_stride : out_base + c * out_stride + width])


@reduction
def copy_max_tile(x, x_base, x_stride, tile, t_base, t_stride, n_classes, m):
    """:func:`copy_tile` from ``x`` into ``tile`` fused with :func:`columns_max`: one read of
    ``x``. (On AVX-512 this loop is packed code; as a copy followed by ``np.maximum`` it
    was scalar.)"""
    width = m.size
    copy_into(x[x_base : x_base + width], m)
    for c in range(n_classes):
        src = x[x_base + c * x_stride : x_base + c * x_stride + width]
        dst = tile[t_base + c * t_stride : t_base + c * t_stride + width]
        for j in range(width):
            v = src[j]
            dst[j] = v
            m[j] = fmaximum(m[j], v)


@glue
def prefetch_class(ahead, ahead_stride, ahead_width, c):
    """Prefetch class ``c`` of the next tile (``ahead_width`` columns from ``ahead[c *
    ahead_stride]``); nothing for a zero width."""
    if ahead_width:
        prefetch_span(ahead, c * ahead_stride, c * ahead_stride + ahead_width)


# Column loops keep one array read-modify-written per loop in the data's own dtype:
# measured on AVX2, `m[j] = fmaximum(m[j], seg[j])` compiles to a scalar chain (0.54 ns
# per element) where np.maximum(m, seg, m) is vector code (0.09 ns), and accumulating
# float32 terms into a float64 array keeps the exp loop scalar (1.26 vs 0.57 ns). So
# sums run in the dtype over blocks of SUM_BLOCK classes and in float64 across blocks,
# as the row sums do.
@reduction
def columns_max(x, base, stride, n_classes, m):
    """``m[j] = max_c x[c, j]`` (NaN if the column holds NaN)."""
    m[:] = x[base : base + m.size]
    for c in range(1, n_classes):
        np.maximum(m, x[base + c * stride : base + c * stride + m.size], m)


# The per-class loops are functions of their own: on fresh arguments LLVM vectorizes
# them without the overlap checks and register pressure of the enclosing loop nest
# (measured: 0.41 against 0.56 ns per element at 10 classes).
@reduction
def add_scaled_exp(seg, shift, part):
    """``part += 2**EXP_SCALE_BITS · exp(seg - shift)`` (the terms of a sum: rounded ``x - m``)."""
    for j in range(part.size):
        part[j] += scaled_exp_diff_rounded(seg[j], shift[j])


@reduction
def exp_add_inplace(seg, shift, part):
    """``seg = exp(seg - shift)`` and ``part += seg``."""
    for j in range(part.size):
        e = exp_diff(seg[j], shift[j])
        seg[j] = e
        part[j] += e


@reduction
def columns_sum_exp(x, base, stride, n_classes, shift, total, ahead=None, ahead_stride=0, ahead_width=0):
    """``total[j] = Σ_c exp(x[c, j] - shift[j])``, given ``shift[j] = max_c x[c, j]``.
    ``ahead``: the next tile to prefetch, class by class (see :func:`prefetch_class`)."""
    total[:] = 0.0
    part = np.empty(total.size, x.dtype)
    for first in range(0, n_classes, SUM_BLOCK):
        part[:] = 0.0
        for c in range(first, min(first + SUM_BLOCK, n_classes)):
            if ahead is not None:
                prefetch_class(ahead, ahead_stride, ahead_width, c)
            add_scaled_exp(x[base + c * stride : base + c * stride + total.size], shift, part)
        for j in range(total.size):
            total[j] += part[j]
    for j in range(total.size):
        total[j] *= UNSCALE


@reduction
def columns_exp_inplace(x, base, stride, n_classes, shift, total, ahead=None, ahead_stride=0, ahead_width=0):
    """``x[c, j] = exp(x[c, j] - shift[j])`` and ``total[j] = Σ_c x[c, j]``; ``ahead`` as
    :func:`columns_sum_exp`."""
    total[:] = 0.0
    part = np.empty(total.size, x.dtype)
    for first in range(0, n_classes, SUM_BLOCK):
        part[:] = 0.0
        for c in range(first, min(first + SUM_BLOCK, n_classes)):
            if ahead is not None:
                prefetch_class(ahead, ahead_stride, ahead_width, c)
            exp_add_inplace(x[base + c * stride : base + c * stride + total.size], shift, part)
        for j in range(total.size):
            total[j] += part[j]


@reduction
def columns_sum(x, base, stride, n_classes, total):
    """``total[j] = Σ_c x[c, j]``."""
    total[:] = 0.0
    for c in range(n_classes):
        seg = x[base + c * stride : base + c * stride + total.size]
        for j in range(total.size):
            total[j] += seg[j]


@reduction
def columns_dot(a, a_base, a_stride, b, b_base, b_stride, n_classes, total):
    """``total[j] = Σ_c a[c, j] · b[c, j]``."""
    total[:] = 0.0
    for c in range(n_classes):
        seg_a = a[a_base + c * a_stride : a_base + c * a_stride + total.size]
        seg_b = b[b_base + c * b_stride : b_base + c * b_stride + total.size]
        for j in range(total.size):
            total[j] += np.float64(seg_a[j]) * np.float64(seg_b[j])


@elementwise
def columns_scale_inplace(x, base, stride, n_classes, factor):
    """``x[c, j] *= factor[j]``."""
    for c in range(n_classes):
        seg = x[base + c * stride : base + c * stride + factor.size]
        for j in range(factor.size):
            seg[j] = seg[j] * factor[j]


@elementwise
def columns_log_softmax_inplace(x, base, stride, n_classes, shift, log_total):
    """``x[c, j] = (x[c, j] - shift[j]) - log_total[j]``."""
    for c in range(n_classes):
        seg = x[base + c * stride : base + c * stride + shift.size]
        for j in range(shift.size):
            seg[j] = (seg[j] - shift[j]) - log_total[j]


@glue
def store_segment(seg, out, start, stream):
    """``out[start : start + seg.size] = seg``, streamed around the caches if ``stream``."""
    if stream:
        stream_scaled_into(seg, out, start, seg.dtype.type(1.0))
    else:
        for j in range(seg.size):
            out[start + j] = seg[j]


@elementwise
def store_columns(tile, n_classes, width, out, base, stride, stream):
    """``out[c, j] = tile[c, j]`` from a contiguous ``tile`` of ``width`` columns."""
    for c in range(n_classes):
        store_segment(tile[c * width : (c + 1) * width], out, base + c * stride, stream)


# The write passes of the scratch tiles finish each class in the tile (just read into
# L1) and store it: one read of the tile, then the output written once.
@elementwise
def columns_scale_into(tile, n_classes, factor, out, base, stride, stream):
    """``out[c, j] = tile[c, j] · factor[j]`` from a contiguous ``tile`` (overwritten)."""
    width = factor.size
    for c in range(n_classes):
        seg = tile[c * width : (c + 1) * width]
        for j in range(width):
            seg[j] = seg[j] * factor[j]
        store_segment(seg, out, base + c * stride, stream)


@elementwise
def columns_log_softmax_into(tile, n_classes, shift, log_total, out, base, stride, stream):
    """``out[c, j] = (tile[c, j] - shift[j]) - log_total[j]`` from a contiguous ``tile``."""
    width = shift.size
    for c in range(n_classes):
        seg = tile[c * width : (c + 1) * width]
        for j in range(width):
            seg[j] = (seg[j] - shift[j]) - log_total[j]
        store_segment(seg, out, base + c * stride, stream)


@elementwise
def columns_softmax_backward_inplace(grad, g_base, g_stride, prob, p_base, p_stride, n_classes, dot):
    """``grad[c, j] = prob[c, j] · (grad[c, j] - dot[j])``."""
    for c in range(n_classes):
        seg_g = grad[g_base + c * g_stride : g_base + c * g_stride + dot.size]
        seg_p = prob[p_base + c * p_stride : p_base + c * p_stride + dot.size]
        for j in range(dot.size):
            seg_g[j] = seg_p[j] * (seg_g[j] - dot[j])


@elementwise
def columns_log_softmax_backward_inplace(grad, g_base, g_stride, log_prob, l_base, l_stride, n_classes, grad_sum):
    """``grad[c, j] = grad[c, j] - exp(log_prob[c, j]) · grad_sum[j]``."""
    for c in range(n_classes):
        seg_g = grad[g_base + c * g_stride : g_base + c * g_stride + grad_sum.size]
        seg_l = log_prob[l_base + c * l_stride : l_base + c * l_stride + grad_sum.size]
        for j in range(grad_sum.size):
            seg_g[j] = seg_g[j] - exp(seg_l[j]) * grad_sum[j]


# ---------------------------------------------------------------- column kernels ----
# A column tile is computed in a contiguous scratch tile of its task, not where it lies:
# the classes of an axis=0 tile are a whole row of the array apart (256 KB at 65536
# columns), so a tile in place maps onto a few cache sets and every pass over it missed
# to L3 or memory. In scratch the passes stay in cache. The tile's one read of memory is
# strided (1.7x slower than a sequential read here), so the exp pass, the one bound by
# arithmetic, prefetches the next tile meanwhile (log_softmax 42.6 -> 31.3 ms at
# 1000x65536 in one A/B; softmax unchanged). Tiles bigger than this (past ~131k classes
# at 16 columns of float32) stay in place.
COLUMN_SCRATCH_MAX_BYTES = 8 * 2**20


@glue
def next_tile(x, x_start, x_os, t, n_outer, n_inner, block, lead):
    """``(ahead, width)``: ``x`` from the start of the tile after ``t`` (to prefetch), and
    that tile's width (0 after the last tile)."""
    if t + 1 >= tile_count(n_outer, n_inner, block, lead):
        return x[:0], 0
    o, j0, width = tile_of(t + 1, n_inner, block, lead)
    return x[x_start + o * x_os + j0 :], width


@glue
def output_lead(out, out_start, stream):
    """The ``lead`` of :func:`tile_of` that starts tiles on the cache lines of ``out``
    (whose stores are then whole lines), if it is streamed."""
    return first_line_start(out[out_start:]) if stream else 0


@glue
def in_scratch(n_classes, width, dtype_like):
    """Whether a tile is computed in a scratch tile (see above)."""
    return n_classes * width * dtype_like.itemsize <= COLUMN_SCRATCH_MAX_BYTES


# Tasks take consecutive tiles and allocate their scratch once: a 1000x65536
# softmax_backward that allocated and freed its two 2 MB tiles per tile had glibc give
# the memory back and fault it in again, 345k page faults (3x the time).
@glue
def tiles_per_task(n_tiles):
    """Tiles per task: at least MIN_TASKS tasks when there are enough tiles."""
    return max(1, n_tiles // MIN_TASKS)


@glue
def task_scratch(n_tiles_held, n_classes, n_inner, block, lead, like):
    """A task's scratch for ``n_tiles_held`` tiles of the widest tile (of ``like``'s
    dtype), or empty if those are too big for scratch (:func:`in_scratch`)."""
    width = min(block + lead, n_inner)
    fits = in_scratch(n_tiles_held * n_classes, width, like)
    return np.empty(n_tiles_held * n_classes * width if fits else 0, like.dtype)


@parallel
def forward_columns(x, x_start, x_os, x_cs, out, out_start, out_os, out_cs, n_outer, n_classes, n_inner, block,
                    in_place, stream, log_form):
    """Softmax (``log_form`` false) or log-softmax (true) along the classes of
    ``(n_outer, n_classes, n_inner)`` arrays; ``stream``: write ``out`` around the caches.
    One kernel for both, as :func:`forward_long_rows`; the branches are per tile."""
    lead = output_lead(out, out_start, stream)
    n_tiles = tile_count(n_outer, n_inner, block, lead)
    per_task = tiles_per_task(n_tiles)
    for task in numba.prange((n_tiles + per_task - 1) // per_task):
        scratch = task_scratch(1, n_classes, n_inner, block, lead, out)
        first, last = task_bounds(task, n_tiles, per_task)
        for t in range(first, last):
            o, j0, width = tile_of(t, n_inner, block, lead)
            xb = x_start + o * x_os + j0
            ob = out_start + o * out_os + j0
            m = np.empty(width, out.dtype)
            total = np.empty(width, np.float64)
            if scratch.size:
                ahead, ahead_width = next_tile(x, x_start, x_os, t, n_outer, n_inner, block, lead)
                tile = scratch[: n_classes * width]
                copy_max_tile(x, xb, x_cs, tile, 0, width, n_classes, m)
                if log_form:
                    columns_sum_exp(tile, 0, width, n_classes, m, total, ahead, x_cs, ahead_width)
                    columns_log_softmax_into(tile, n_classes, m, logs_of(total, out), out, ob, out_cs, stream)
                else:
                    columns_exp_inplace(tile, 0, width, n_classes, m, total, ahead, x_cs, ahead_width)
                    columns_scale_into(tile, n_classes, (1.0 / total).astype(out.dtype), out, ob, out_cs, stream)
            else:
                if in_place:
                    columns_max(out, ob, out_cs, n_classes, m)
                else:
                    copy_max_tile(x, xb, x_cs, out, ob, out_cs, n_classes, m)
                if log_form:
                    columns_sum_exp(out, ob, out_cs, n_classes, m, total)
                    columns_log_softmax_inplace(out, ob, out_cs, n_classes, m, logs_of(total, out))
                else:
                    columns_exp_inplace(out, ob, out_cs, n_classes, m, total)
                    columns_scale_inplace(out, ob, out_cs, n_classes, (1.0 / total).astype(out.dtype))
        store_fence()


@parallel
def logsumexp_columns(x, x_start, x_os, x_cs, out, n_outer, n_classes, n_inner, block):
    """``out[o, j] = log Σ_c exp(x[o, c, j])``, ``out`` contiguous ``(n_outer·n_inner)``."""
    n_tiles = tile_count(n_outer, n_inner, block)
    per_task = tiles_per_task(n_tiles)
    for task in numba.prange((n_tiles + per_task - 1) // per_task):
        scratch = task_scratch(1, n_classes, n_inner, block, 0, x)
        first, last = task_bounds(task, n_tiles, per_task)
        for t in range(first, last):
            o, j0, width = tile_of(t, n_inner, block)
            xb = x_start + o * x_os + j0
            m = np.empty(width, x.dtype)
            total = np.empty(width, np.float64)
            if scratch.size:
                ahead, ahead_width = next_tile(x, x_start, x_os, t, n_outer, n_inner, block, 0)
                tile = scratch[: n_classes * width]
                copy_max_tile(x, xb, x_cs, tile, 0, width, n_classes, m)
                columns_sum_exp(tile, 0, width, n_classes, m, total, ahead, x_cs, ahead_width)
            else:
                columns_max(x, xb, x_cs, n_classes, m)
                columns_sum_exp(x, xb, x_cs, n_classes, m, total)
            dst = out[o * n_inner + j0 : o * n_inner + j0 + width]
            for j in range(width):  # infinities as logsumexp_from_max
                dst[j] = lse_from_total(m[j], total[j])


@glue
def backward_tile(grad, g_base, g_stride, prob, p_base, p_stride, n_classes, reduced, log_form):
    """The backward of one tile, in place of the incoming gradient's tile ``grad``."""
    if log_form:
        columns_sum(grad, g_base, g_stride, n_classes, reduced)
        columns_log_softmax_backward_inplace(grad, g_base, g_stride, prob, p_base, p_stride, n_classes,
                                             reduced.astype(grad.dtype))
    else:
        columns_dot(grad, g_base, g_stride, prob, p_base, p_stride, n_classes, reduced)
        columns_softmax_backward_inplace(grad, g_base, g_stride, prob, p_base, p_stride, n_classes,
                                         reduced.astype(grad.dtype))


@parallel
def backward_columns(g, g_start, g_os, g_cs, y, y_start, y_os, y_cs, out, out_start, out_os, out_cs,
                     n_outer, n_classes, n_inner, block, in_place, stream, log_form):
    """:func:`backward_rows` (``log_form`` as there) along the classes of
    ``(n_outer, n_classes, n_inner)`` arrays: both inputs' tiles copied into scratch
    tiles, the result streamed out from there as :func:`forward_columns` does."""
    lead = output_lead(out, out_start, stream)
    n_tiles = tile_count(n_outer, n_inner, block, lead)
    per_task = tiles_per_task(n_tiles)
    for task in numba.prange((n_tiles + per_task - 1) // per_task):
        scratch = task_scratch(2, n_classes, n_inner, block, lead, out)  # the gradient's and the output's
        first, last = task_bounds(task, n_tiles, per_task)
        for t in range(first, last):
            o, j0, width = tile_of(t, n_inner, block, lead)
            gb = g_start + o * g_os + j0
            yb = y_start + o * y_os + j0
            ob = out_start + o * out_os + j0
            reduced = np.empty(width, np.float64)  # Σ_c g·s, or Σ_c g
            if scratch.size:
                grad = scratch[: n_classes * width]
                prob = scratch[n_classes * width : 2 * n_classes * width]
                copy_tile(g, gb, g_cs, grad, 0, width, n_classes, width)
                copy_tile(y, yb, y_cs, prob, 0, width, n_classes, width)
                backward_tile(grad, 0, width, prob, 0, width, n_classes, reduced, log_form)
                store_columns(grad, n_classes, width, out, ob, out_cs, stream)
            else:
                if not in_place:
                    copy_tile(g, gb, g_cs, out, ob, out_cs, n_classes, width)
                backward_tile(out, ob, out_cs, y, yb, y_cs, n_classes, reduced, log_form)
        store_fence()


# ----------------------------------------------------- small-class row kernels ----
# Back-to-back rows with few classes (C < SMALL_CLASSES) are too short for vector loops
# along a row. A block of rows is transposed into a (C, rows) tile instead, whose class
# segments are long contiguous runs: the column primitives above then reduce over the
# classes with one vector lane per row, and the result is transposed back.
TILE_ELEMENTS = 4096  # 16 KB of float32: the tile stays in L1 between its passes


@glue
def tile_rows(n_cols):
    """Rows per small-class tile: a multiple of 16 (whole vectors), at least 16."""
    return max(16, TILE_ELEMENTS // n_cols // 16 * 16)


@glue
def open_tile(x, x_start, lo, hi, n_cols, like, half_format):
    """Rows ``[lo, hi)`` of ``x`` transposed into a new tile (of ``row_scratch(like)``'s
    dtype): ``(tile, column maxima, float64 per-row scratch for the sums)``."""
    tile = row_scratch(like, (hi - lo) * n_cols)
    load_tile(x[x_start + lo * n_cols : x_start + hi * n_cols], n_cols, tile, half_format)
    m = np.empty(hi - lo, tile.dtype)
    columns_max(tile, 0, hi - lo, n_cols, m)
    return tile, m, np.empty(hi - lo)


@reduction
def columns_lse(m, total, out):
    """``out[j] = lse_from_total(m[j], total[j])``, vectorized (see :func:`log`)."""
    for j in range(out.size):
        out[j] = lse_from_total(m[j], total[j])


@reduction
def logs_of(values, dtype_like):
    """``log(values)`` (float64 :func:`log`) as an array of ``dtype_like``'s dtype."""
    result = np.empty(values.size, dtype_like.dtype)
    for j in range(values.size):
        result[j] = log(values[j])
    return result


@parallel
def softmax_row_blocks(x, x_start, out, out_start, n_rows, n_cols, half_format):
    """Softmax of back-to-back rows (``ld == n_cols``) with few classes, tile by tile.
    ``out`` may be ``x``: a tile is read whole before it is written."""
    per_tile = tile_rows(n_cols)
    for b in numba.prange((n_rows + per_tile - 1) // per_tile):
        lo, hi = task_bounds(b, n_rows, per_tile)
        tile, m, total = open_tile(x, x_start, lo, hi, n_cols, out, half_format)
        ahead = next_row_block(x, x_start, hi, n_rows, n_cols, per_tile)
        columns_exp_inplace(tile, 0, hi - lo, n_cols, m, total, ahead, per_tile, per_tile)
        columns_scale_inplace(tile, 0, hi - lo, n_cols, (1.0 / total).astype(tile.dtype))
        store_tile(tile, n_cols, out[out_start + lo * n_cols : out_start + hi * n_cols], half_format)


@parallel
def log_softmax_row_blocks(x, x_start, out, out_start, n_rows, n_cols, half_format):
    """Log-softmax of back-to-back rows with few classes; see :func:`softmax_row_blocks`."""
    per_tile = tile_rows(n_cols)
    for b in numba.prange((n_rows + per_tile - 1) // per_tile):
        lo, hi = task_bounds(b, n_rows, per_tile)
        tile, m, total = open_tile(x, x_start, lo, hi, n_cols, out, half_format)
        ahead = next_row_block(x, x_start, hi, n_rows, n_cols, per_tile)
        columns_sum_exp(tile, 0, hi - lo, n_cols, m, total, ahead, per_tile, per_tile)
        columns_log_softmax_inplace(tile, 0, hi - lo, n_cols, m, logs_of(total, tile))
        store_tile(tile, n_cols, out[out_start + lo * n_cols : out_start + hi * n_cols], half_format)


@parallel
def logsumexp_row_blocks(x, x_start, out, n_rows, n_cols, half_format):
    """``out[i] = log Σ_j exp(x[i, j])`` for back-to-back rows with few classes."""
    per_tile = tile_rows(n_cols)
    for b in numba.prange((n_rows + per_tile - 1) // per_tile):
        lo, hi = task_bounds(b, n_rows, per_tile)
        tile, m, total = open_tile(x, x_start, lo, hi, n_cols, out, half_format)
        ahead = next_row_block(x, x_start, hi, n_rows, n_cols, per_tile)
        columns_sum_exp(tile, 0, hi - lo, n_cols, m, total, ahead, per_tile, per_tile)
        columns_lse(m, total, out[lo:hi])
