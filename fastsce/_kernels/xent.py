"""Fused cross-entropy: per-row loss, and the gradient written in the same pass.

Notation per row (``x`` logits, ``s = softmax(x)``, ``lse = logsumexp(x)``, ``w`` class
weights, ``ε`` label smoothing, ``C`` classes, ``λ`` the z-loss coefficient):

* class index ``t``: ``loss = (1-ε)·w_t·(lse - x_t) + ε/C·Σ_c w_c·(lse - x_c)``
  = ``(1-ε)·w_t·(lse - x_t) + ε/C·(W·lse - Σ_c w_c x_c)`` with ``W = Σ_c w_c``;
  ``grad = g·[s·((1-ε)·w_t + ε/C·W) - (1-ε)·w_t·onehot(t) - ε/C·w]``.
* probabilities ``y`` (smoothed ``y' = (1-ε)·y + ε/C``), ``v = w·y'``:
  ``loss = V·lse - Σ_c v_c x_c`` with ``V = Σ_c v_c``; ``grad = g·(s·V - v)``.
* z-loss adds ``λ·lse²`` and ``g_z·2λ·lse·s`` to the gradient.

``g`` (``g_z``) is ``grad_output`` divided by the loss's (z-loss's) mean denominator,
known before the kernel runs. Each row's gradient is ``s·a - b`` for a per-row ``a``
and a sparse or per-class ``b``; it is written over the copied logits in place, so
``exp`` is evaluated once per element and ``inplace=True`` costs no second array.

Rows are processed in chunks of ``chunk_rows(n_rows)`` (at most ``CHUNK_ROWS``, fixed by
the row count alone); each chunk's losses are summed
in float64 in row order and the chunk sums are added in order by the caller, so
"mean" and "sum" are bitwise identical for every thread count.
"""

from __future__ import annotations


import numba
import numpy as np

from .rowio import (
    decoded_row,
    exact_exps,
    glue,
    load_row,
    load_tile,
    open_row,
    readable_row,
    readable_row_max,
    row_scratch,
    store_entry,
    store_row,
    store_row_at,
    store_tile,
    work_buffer,
)
from .._math import UNSCALE, store_fence
from .softmax import (
    PAIR_MAX_CLASSES,
    PAIR_MAX_WRITTEN_CLASSES,
    exp_inplace,
    first_argmax,
    logsumexp_from_max,
    long_row_kept_exps,
    long_row_max_sum,
    lse_from_total,
    merged_long_row,
    next_pair,
    next_row,
    next_row_block,
    pair_exp_inplace,
    pair_sum_exp,
    parallel,
    rescale_long_row,
    reduction,
    scale_inplace,
    scaled_exp_inplace,
    zero_inplace,
)
from .._config import CHUNK_ROWS, ELEMENTWISE_FASTMATH, JIT_OPTIONS, MIN_CHUNKS

elementwise = numba.njit(fastmath=ELEMENTWISE_FASTMATH, **JIT_OPTIONS)


# Row-block tasks take this many loss chunks each, and allocate their tile and scratch
# once (a chunk is 2560 elements at 10 classes). Each chunk's sums are its own, so the
# grouping changes no result.
CHUNKS_PER_TASK = 16


@glue
def chunk_rows(n_rows):
    """Rows per loss chunk: ``_config.loss_chunk_rows``, which the wrapper uses."""
    return max(1, min(CHUNK_ROWS, n_rows // MIN_CHUNKS))


@glue
def chunk_bounds(chunk, n_rows):
    """Rows ``[lo, hi)`` of chunk ``chunk``."""
    size = chunk_rows(n_rows)
    lo = chunk * size
    return lo, min(lo + size, n_rows)


@glue
def chunk_count(n_rows):
    """Number of row chunks."""
    size = chunk_rows(n_rows)
    return (n_rows + size - 1) // size


@parallel
def check_targets(target, n_classes, ignore_index, weight, chunk_weight, chunk_count_valid):
    """Validate class indices and sum the weights of the rows that count.

    ``chunk_weight[k]`` = Σ ``weight[t]`` and ``chunk_count_valid[k]`` = the number of
    rows with ``t != ignore_index`` in chunk ``k``. Returns the first row whose target
    is neither in ``[0, C)`` nor ``ignore_index``, or -1; nothing is indexed with it.
    """
    n_rows = target.size
    n_chunks = chunk_count(n_rows)
    first_bad = np.full(n_chunks, n_rows, np.int64)
    for k in numba.prange(n_chunks):
        lo, hi = chunk_bounds(k, n_rows)
        total = 0.0
        count = 0
        for i in range(lo, hi):
            t = target[i]
            if t == ignore_index:
                continue
            if t < 0 or t >= n_classes:
                first_bad[k] = min(first_bad[k], i)
                continue
            total += weight[t]
            count += 1
        chunk_weight[k] = total
        chunk_count_valid[k] = count
    worst = first_bad.min()
    return -1 if worst == n_rows else worst


@reduction
def row_dot_weights(row, weight):
    """``Σ_c weight[c]·row[c]`` as float64."""
    total = 0.0
    for j in range(row.size):
        total += weight[j] * row[j]
    return total


@reduction
def soft_target_sums(row, y, weight, keep, spread):
    """``(V, Σ_c v_c·row_c)`` as float64, with ``v = weight·(keep·y + spread)``."""
    v_total = 0.0
    vx_total = 0.0
    for j in range(row.size):
        v = weight[j] * (keep * y[j] + spread)
        v_total += v
        vx_total += v * row[j]
    return v_total, vx_total


@glue
def pre_exp_terms(row, m, t, weight, smoothing, with_argmax):
    """What a gradient row needs from its logits before they become exps: ``(argmax or -1,
    x_t, Σ_c w_c·x_c or 0 without label smoothing)``."""
    argmax = first_argmax(row, m) if with_argmax else -1
    smooth_dot = row_dot_weights(row, weight) if smoothing != 0.0 else 0.0
    return argmax, np.float64(row[t]), smooth_dot


@elementwise
def smoothed_grad_inplace(row, a, smooth_scale, weight):
    """``row = row·a - smooth_scale·weight`` (``row`` holds ``exp(x - m)``)."""
    for j in range(row.size):
        row[j] = row[j] * a - smooth_scale * weight[j]


@elementwise
def soft_grad_inplace(row, a, y, weight, g, keep, spread):
    """``row = row·a - g·weight·(keep·y + spread)`` (``row`` holds ``exp(x - m)``)."""
    for j in range(row.size):
        row[j] = row[j] * a - g * (weight[j] * (keep * y[j] + spread))


# Streamed gradient rows up to this size are finished in their scratch row, in L1 (see
# write_grad_row); longer ones, in L2, pay more for that pass than for the one plain
# store (2048x32000 float32: 27.4 against 26.2 ms).
FINISH_IN_SCRATCH_MAX_BYTES = 16 * 1024


@glue
def write_grad_row(row, out, start, t, a, smooth_scale, target_term, weight, smoothed, half_format, stream):
    """``out[start:][:row.size] = row·a - smooth_scale·weight - target_term·onehot(t)``
    (``row`` holds ``exp(x - m)``; ``smooth_scale`` only if ``smoothed``).

    A row is scaled on its way out and its target entry written again (a pass fewer),
    but a short streamed row is finished in ``row`` first: a plain store into a line
    whose streamed stores are still in a write-combining buffer waits for them to reach
    memory, then reads the line back (65536x1000 float32 on one thread: 80 ms, against
    59 finished in ``row`` and 65 cached)."""
    if smoothed:
        smoothed_grad_inplace(row, a, smooth_scale, weight)
        row[t] -= target_term
        store_row_at(row, out, start, half_format, stream)
        return
    target_value = row[t] * a - target_term
    if stream and row.size * row.itemsize <= FINISH_IN_SCRATCH_MAX_BYTES:
        scale_inplace(row, a)
        row[t] = target_value
        store_row_at(row, out, start, half_format, stream)
    else:
        store_row_at(row, out, start, half_format, stream, a)
        store_entry(out, start + t, target_value, half_format)


@glue
def long_row_first_argmax(src, m, segment, half_format):
    """:func:`first_argmax` of a long row whose max is ``m`` (NaN if the row holds NaN),
    a segment at a time."""
    for start in range(0, src.size, segment):
        part = src[start : start + segment]
        values = readable_row(part, work_buffer(src, part.size), half_format)
        for j in range(values.size):
            if values[j] == m or (m != m and values[j] != values[j]):
                return start + j
    return 0


@glue
def long_row_grad(src, dst, m, a, smooth_scale, target_term, t, weight, smoothed, segment, half_format, stream):
    """``dst = exp(src - m)·a - smooth_scale·weight - target_term·onehot(t)`` for a long
    row (see softmax.py's long-row kernels), computed and written a segment at a time."""
    for start in range(0, src.size, segment):
        part = row_scratch(dst, min(segment, src.size - start))
        load_row(src[start : start + segment], part, half_format)
        scaled_exp_inplace(part, part.dtype.type(m), exact_exps(dst))
        holds_target = start <= t < start + part.size
        if smoothed:
            smoothed_grad_inplace(part, a, smooth_scale, weight[start : start + part.size])
            if holds_target:
                part[t - start] -= target_term
            store_row(part, dst[start : start + segment], half_format, stream)
        elif holds_target:
            write_grad_row(part, dst, start, t - start, a, smooth_scale, target_term, weight, False, half_format, stream)
        else:
            store_row(part, dst[start : start + segment], half_format, stream, a)


@glue
def hard_row_loss(lse, x_t, w_t, smooth_dot, keep, spread, weight_sum):
    """``(1-ε)·w_t·(lse - x_t) + ε/C·(W·lse - Σ_c w_c x_c)`` for a counted row."""
    return keep * w_t * (lse - x_t) + spread * (weight_sum * lse - smooth_dot)


@glue
def softmax_coefficient(g, g_z, ce_mass, z_loss, lse, total):
    """``a`` in ``grad = exp(x - m)·a - b``: ``(g·ce_mass + g_z·2λ·lse) / Σ exp(x - m)``."""
    return (g * ce_mass + g_z * 2.0 * z_loss * lse) / total


@glue
def _grad_rows_at(grad_rows, i):
    """``grad_output`` for row ``i``: per-row factors, or one for all rows."""
    return grad_rows[i] if grad_rows.size > 1 else grad_rows[0]


@glue
def record_row(r, loss, lse, argmax, row_loss, row_lse, row_argmax):
    """Store row ``r``'s results in the per-row outputs that were asked for (non-empty);
    ``r`` may be a slice of rows, with arrays of their results."""
    if row_loss.size:
        row_loss[r] = loss
    if row_lse.size:
        row_lse[r] = lse
    if row_argmax.size:
        row_argmax[r] = argmax


@parallel
def hard_xent_rows(x, x_start, x_ld, out, out_start, out_ld, n_rows, n_classes, with_grad,
                   target, ignore_index, weight, weight_sum, smoothing, z_loss, grad_scale, z_grad_scale,
                   grad_rows, chunk_loss, chunk_z, row_loss, row_lse, row_argmax, half_format, stream, segment):
    """Cross-entropy with class-index targets for each row; see the module docstring.

    ``with_grad``: write the gradient into ``out`` (which may be ``x``).
    ``grad_rows``: per-row ``grad_output`` factors (length ``n_rows``) or one factor.
    ``row_loss``, ``row_lse``, ``row_argmax``: per-row outputs, or empty to skip.
    ``chunk_loss``/``chunk_z``: per-chunk sums of the weighted loss and of ``lse²``
    over the rows that count. 16-bit logits arrive as uint16 bits (``half_format``).
    ``stream``: compute gradient rows in scratch and stream them out (see ``rowio``).
    ``segment`` > 0 (long rows): the gradient rows are reduced, then written, that many
    elements at a time (see softmax.py's long-row kernels); loss-only rows need one read
    either way.
    """
    keep = 1.0 - smoothing
    spread = smoothing / n_classes
    dtype = weight.dtype.type  # the compute dtype: float32 for 16-bit logits
    for k in numba.prange(chunk_count(n_rows)):
        lo, hi = chunk_bounds(k, n_rows)
        row = row_scratch(out, n_classes if with_grad else 0)
        values_work = work_buffer(x, n_classes)
        # Loss only, up to PAIR_MAX_CLASSES: each row's lse is computed with the next row's.
        pairs = not with_grad and n_classes <= PAIR_MAX_CLASSES
        values_work_b = work_buffer(x, n_classes if pairs else 0)
        paired_lse = False
        next_lse = 0.0
        # Gradients, up to PAIR_MAX_WRITTEN_CLASSES: two counted rows exponentiated together.
        pair_grads = with_grad and not segment and n_classes <= PAIR_MAX_WRITTEN_CLASSES
        row_b = row_scratch(out, n_classes if pair_grads else 0)
        paired_exps = False
        m_b = total_b = x_t_b = smooth_dot_b = 0.0
        argmax_b = -1
        loss_sum = 0.0
        z_sum = 0.0
        for i in range(lo, hi):
            t = target[i]
            valid = t != ignore_index
            x_t = smooth_dot = w_t = 0.0
            if with_grad and valid and segment:
                src = x[x_start + i * x_ld : x_start + i * x_ld + n_classes]
                dst = out[out_start + i * out_ld : out_start + i * out_ld + n_classes]
                m, total, smooth_dot = long_row_max_sum(src, segment, half_format,
                                                        weight if smoothing != 0.0 else weight[:0])
                argmax = long_row_first_argmax(src, m, segment, half_format) if row_argmax.size else -1
                x_t = np.float64(readable_row(src[t : t + 1], work_buffer(src, 1), half_format)[0])
                lse = lse_from_total(m, total)
                w_t = np.float64(weight[t])
                g = _grad_rows_at(grad_rows, i) * grad_scale
                a = softmax_coefficient(g, _grad_rows_at(grad_rows, i) * z_grad_scale, keep * w_t + spread * weight_sum,
                                        z_loss, lse, total / UNSCALE)  # long_row_grad's exps are scaled
                # (rows of 4 MB and more, hard_xent_split_rows, keep their exps instead)
                long_row_grad(src, dst, m, dtype(a), dtype(g * spread), dtype(g * keep * w_t), t, weight,
                              smoothing != 0.0, segment, half_format, stream)
            elif with_grad and valid:
                from_pair = paired_exps  # row i was loaded and exponentiated with row i - 1, into row_b
                if paired_exps:
                    m, total, argmax, x_t, smooth_dot = m_b, total_b, argmax_b, x_t_b, smooth_dot_b
                    paired_exps = False
                else:
                    m = load_row(x[x_start + i * x_ld : x_start + i * x_ld + n_classes], row, half_format)
                    argmax, x_t, smooth_dot = pre_exp_terms(row, m, t, weight, smoothing, row_argmax.size)
                    t_b = target[i + 1] if pair_grads and i + 1 < hi else ignore_index
                    if t_b != ignore_index:  # rows i and i + 1 together
                        m_b = load_row(x[x_start + (i + 1) * x_ld : x_start + (i + 1) * x_ld + n_classes], row_b,
                                       half_format)
                        argmax_b, x_t_b, smooth_dot_b = pre_exp_terms(row_b, m_b, t_b, weight, smoothing,
                                                                      row_argmax.size)
                        ahead_a, ahead_b = next_pair(x, x_start, x_ld, i, n_rows, n_classes)
                        total, total_b = pair_exp_inplace(row, m, row_b, m_b, ahead_a, ahead_b,
                                                          exact_exps(out))  # scaled
                        paired_exps = True
                    else:
                        total = exp_inplace(row, m, next_row(x, x_start, x_ld, i, n_rows, n_classes),
                                            exact_exps(out))  # scaled
                lse = lse_from_total(m, total * UNSCALE)
                w_t = np.float64(weight[t])
                g = _grad_rows_at(grad_rows, i) * grad_scale
                a = softmax_coefficient(g, _grad_rows_at(grad_rows, i) * z_grad_scale, keep * w_t + spread * weight_sum,
                                        z_loss, lse, total)
                if from_pair:
                    write_grad_row(row_b, out, out_start + i * out_ld, t, dtype(a), dtype(g * spread),
                                   dtype(g * keep * w_t), weight, smoothing != 0.0, half_format, stream)
                else:
                    write_grad_row(row, out, out_start + i * out_ld, t, dtype(a), dtype(g * spread),
                                   dtype(g * keep * w_t), weight, smoothing != 0.0, half_format, stream)
            else:
                src = x[x_start + i * x_ld : x_start + i * x_ld + n_classes]
                if paired_lse:  # read and reduced with row i - 1
                    values, m, lse = decoded_row(src, values_work_b), m_b, next_lse
                    paired_lse = False
                else:
                    values, m = readable_row_max(src, values_work, half_format)
                    if pairs and i + 1 < hi:  # loss only: every row comes here; rows i and i + 1 together
                        values_b, m_b = readable_row_max(
                            x[x_start + (i + 1) * x_ld : x_start + (i + 1) * x_ld + n_classes], values_work_b,
                            half_format)
                        ahead_a, ahead_b = next_pair(x, x_start, x_ld, i, n_rows, n_classes)
                        total, total_b = pair_sum_exp(values, m, values_b, m_b, ahead_a, ahead_b)
                        lse = lse_from_total(m, total)
                        next_lse = lse_from_total(m_b, total_b)
                        paired_lse = True
                    else:
                        ahead = next_row(x, x_start, x_ld, i, n_rows, n_classes)
                        lse = logsumexp_from_max(values, m, ahead) if valid or row_lse.size else 0.0
                argmax = first_argmax(values, m) if row_argmax.size else -1
                if valid:
                    x_t = np.float64(values[t])
                    smooth_dot = row_dot_weights(values, weight) if smoothing != 0.0 else 0.0
                    w_t = np.float64(weight[t])
                if with_grad:
                    zero_inplace(out[out_start + i * out_ld : out_start + i * out_ld + n_classes])
            loss = 0.0
            if valid:
                loss = hard_row_loss(lse, x_t, w_t, smooth_dot, keep, spread, weight_sum)
                loss_sum += loss
                z_sum += lse * lse
                loss += z_loss * lse * lse
            record_row(i, loss, lse, argmax, row_loss, row_lse, row_argmax)
        chunk_loss[k] = loss_sum
        chunk_z[k] = z_sum
        store_fence()


@parallel
def hard_xent_split_rows(x, x_start, x_ld, out, out_start, out_ld, n_rows, n_classes, with_grad,
                         target, ignore_index, weight, weight_sum, smoothing, z_loss, grad_scale, z_grad_scale,
                         grad_rows, chunk_loss, chunk_z, row_loss, row_lse, row_argmax, half_format, stream, segment,
                         chunk_segments):
    """:func:`hard_xent_rows` for long rows split across threads (see softmax.py's
    ``forward_long_rows``): a row at a time, its chunks of ``chunk_segments`` segments
    reduced by all threads and merged in chunk order, then (``with_grad``) written by
    all threads. Loss chunks, sums and per-row outputs as :func:`hard_xent_rows`."""
    keep = 1.0 - smoothing
    spread = smoothing / n_classes
    dtype = weight.dtype.type
    keep_exps = with_grad and exact_exps(out)  # gradients into floats keep their exps
    smoothing_weight = weight if smoothing != 0.0 else weight[:0]
    chunk = chunk_segments * segment
    n_parts = (n_classes + chunk - 1) // chunk
    segment_max = np.empty((n_classes + segment - 1) // segment if keep_exps else 0, np.float64)
    part_max = np.empty(n_parts, np.float64)
    part_total = np.empty(n_parts, np.float64)
    part_weighted = np.zeros(n_parts, np.float64)
    part_argmax = np.zeros(n_parts, np.int64)
    for k in range(chunk_count(n_rows)):
        lo, hi = chunk_bounds(k, n_rows)
        loss_sum = 0.0
        z_sum = 0.0
        for i in range(lo, hi):
            src = x[x_start + i * x_ld : x_start + i * x_ld + n_classes]
            dst = out[out_start + i * out_ld : out_start + i * out_ld + n_classes]
            t = target[i]
            valid = t != ignore_index
            x_t = np.float64(readable_row(src[t : t + 1], work_buffer(src, 1), half_format)[0]) if valid else 0.0
            kept = keep_exps and valid  # ignored rows are only read (their gradient is 0)
            for c in numba.prange(n_parts):
                src_c = src[c * chunk : (c + 1) * chunk]
                if kept:
                    part_max[c], part_total[c], part_weighted[c], j = long_row_kept_exps(
                        src_c, dst[c * chunk : (c + 1) * chunk], segment, half_format,
                        segment_max[c * chunk_segments : (c + 1) * chunk_segments],
                        smoothing_weight[c * chunk : (c + 1) * chunk], row_argmax.size > 0)
                else:
                    part_max[c], part_total[c], part_weighted[c] = long_row_max_sum(
                        src_c, segment, half_format, smoothing_weight[c * chunk : (c + 1) * chunk])
                    j = long_row_first_argmax(src_c, part_max[c], segment, half_format) if row_argmax.size else 0
                part_argmax[c] = c * chunk + j
            m, total, smooth_dot, argmax = merged_long_row(part_max, part_total, part_weighted, part_argmax)
            lse = lse_from_total(m, total)
            loss = w_t = 0.0
            if valid:
                w_t = np.float64(weight[t])
                loss = hard_row_loss(lse, x_t, w_t, smooth_dot, keep, spread, weight_sum)
                loss_sum += loss
                z_sum += lse * lse
                loss += z_loss * lse * lse
            if with_grad and valid:
                g = _grad_rows_at(grad_rows, i) * grad_scale
                a = softmax_coefficient(g, _grad_rows_at(grad_rows, i) * z_grad_scale,
                                        keep * w_t + spread * weight_sum, z_loss, lse, total / UNSCALE)  # scaled exps
                for c in numba.prange(n_parts):
                    if kept:
                        rescale_long_row(dst[c * chunk : (c + 1) * chunk], segment,
                                         segment_max[c * chunk_segments : (c + 1) * chunk_segments], m, a, g * spread,
                                         smoothing_weight[c * chunk : (c + 1) * chunk])
                    else:
                        long_row_grad(src[c * chunk : (c + 1) * chunk], dst[c * chunk : (c + 1) * chunk], m, dtype(a),
                                      dtype(g * spread), dtype(g * keep * w_t), t - c * chunk,
                                      weight[c * chunk : (c + 1) * chunk], smoothing != 0.0, segment, half_format,
                                      stream)
                        store_fence()
                if kept:
                    dst[t] -= dtype(g * keep * w_t)
            elif with_grad:
                for c in numba.prange(n_parts):
                    zero_inplace(dst[c * chunk : (c + 1) * chunk])
            record_row(i, loss, lse, argmax, row_loss, row_lse, row_argmax)
        chunk_loss[k] = loss_sum
        chunk_z[k] = z_sum


@parallel
def soft_xent_rows(x, x_start, x_ld, out, out_start, out_ld, y, y_start, y_ld, n_rows, n_classes, with_grad, weight,
                   smoothing, z_loss, grad_scale, z_grad_scale, grad_rows, chunk_loss, chunk_z, row_loss, row_lse,
                   row_argmax, half_format, stream):
    """Cross-entropy with class-probability targets ``y`` for each row; see the module
    docstring. Arguments as :func:`hard_xent_rows`."""
    keep = 1.0 - smoothing
    spread = smoothing / n_classes
    dtype = weight.dtype.type  # the compute dtype: float32 for 16-bit logits
    for k in numba.prange(chunk_count(n_rows)):
        lo, hi = chunk_bounds(k, n_rows)
        row = row_scratch(out, n_classes if with_grad else 0)
        values_work = work_buffer(x, n_classes)
        probs_work = work_buffer(y, n_classes)
        loss_sum = 0.0
        z_sum = 0.0
        for i in range(lo, hi):
            src = x[x_start + i * x_ld : x_start + i * x_ld + n_classes]
            probs = readable_row(y[y_start + i * y_ld : y_start + i * y_ld + n_classes], probs_work, half_format)
            if with_grad:
                dst, m = open_row(x, x_start, x_ld, out, out_start, out_ld, i, n_classes, half_format, row)
                argmax = first_argmax(row, m) if row_argmax.size else -1
                v_total, vx_total = soft_target_sums(row, probs, weight, keep, spread)
                total = exp_inplace(row, m, next_row(x, x_start, x_ld, i, n_rows, n_classes),
                                    exact_exps(out))  # scaled
                lse = lse_from_total(m, total * UNSCALE)
                g = _grad_rows_at(grad_rows, i) * grad_scale
                a = softmax_coefficient(g, _grad_rows_at(grad_rows, i) * z_grad_scale, v_total, z_loss, lse, total)
                soft_grad_inplace(row, dtype(a), probs, weight, dtype(g), dtype(keep), dtype(spread))
                store_row(row, dst, half_format, stream)
            else:
                values, m = readable_row_max(src, values_work, half_format)
                argmax = first_argmax(values, m) if row_argmax.size else -1
                v_total, vx_total = soft_target_sums(values, probs, weight, keep, spread)
                lse = logsumexp_from_max(values, m, next_row(x, x_start, x_ld, i, n_rows, n_classes))
            loss = v_total * lse - vx_total
            loss_sum += loss
            z_sum += lse * lse
            record_row(i, loss + z_loss * lse * lse, lse, argmax, row_loss, row_lse, row_argmax)
        chunk_loss[k] = loss_sum
        chunk_z[k] = z_sum
        store_fence()


# --------------------------------------------------------------- column kernels ----
# Classes strided, a contiguous `inner` axis: Fortran-ordered (N, C) logits, or
# (N, C, d1, ...) with the classes on axis 1 (see fastsce._layout). As softmax.py's
# column kernels, a tile of `width` neighbouring columns (each one row of the loss) is
# reduced with vector loops along the contiguous axis, and with_grad copies the tile
# into the gradient and computes there, so no logits-sized copy is made. Every per-row
# value uses the row kernels' formulas (hard_row_loss, softmax_coefficient,
# lse_from_total). Each tile is one loss chunk, summed in column order; the wrapper cuts
# tiles from the shape alone, so "mean"/"sum" are bitwise identical for every thread
# count. float32/float64 only: 16-bit logits keep the row kernels (after a 16-bit copy).

# Imported here, not at the top, so that this section stands apart from the row kernels.
from .softmax import (
    columns_exp_inplace,
    columns_lse,
    columns_max,
    columns_scale_inplace,
    columns_sum_exp,
    copy_tile,
    store_columns,
    task_bounds,
    task_scratch,
    tile_count,
    tile_of,
    tiles_per_task,
)


@reduction
def columns_first_argmax(x, base, stride, n_classes, m, argmax):
    """``argmax[j]`` = the first class ``c`` with ``x[c, j] == m[j]`` or, in a column
    holding NaN, the first NaN: :func:`first_argmax` per column."""
    argmax[:] = 0
    for c in range(n_classes - 1, -1, -1):  # backwards: the first match is written last
        seg = x[base + c * stride : base + c * stride + m.size]
        for j in range(m.size):
            v = seg[j]
            if v == m[j] or v != v:
                argmax[j] = c


@reduction
def columns_max_argmax(x, base, stride, n_classes, m, argmax):
    """``m[j] = max_c x[c, j]``, and ``argmax`` (unless empty) as :func:`columns_first_argmax`."""
    columns_max(x, base, stride, n_classes, m)
    if argmax.size:
        columns_first_argmax(x, base, stride, n_classes, m, argmax)


@reduction
def columns_dot_weights(x, base, stride, n_classes, weight, total):
    """``total[j] = Σ_c weight[c]·x[c, j]`` as float64 (:func:`row_dot_weights` per column)."""
    total[:] = 0.0
    for c in range(n_classes):
        seg = x[base + c * stride : base + c * stride + total.size]
        w = weight[c]
        for j in range(total.size):
            total[j] += w * seg[j]


@numba.njit(**JIT_OPTIONS)
def columns_at_target(x, base, stride, target, ignore_index, weight, values, weights):
    """``values[j] = x[target[j], j]`` and ``weights[j] = weight[target[j]]`` as float64; 0
    where ``target[j]`` is ``ignore_index``. (The only gathers of the loss: the loops
    after it vectorize, which LLVM does not do with gathers on this CPU.)"""
    for j in range(values.size):
        t = target[j]
        if t != ignore_index:
            values[j] = np.float64(x[base + t * stride + j])
            weights[j] = np.float64(weight[t])
        else:
            values[j] = weights[j] = 0.0


@reduction
def columns_hard_terms(x, base, stride, n_classes, target, ignore_index, weight, smoothing, m, argmax,
                       logit_t, w_t, smooth_dot):
    """What the class-index loss reads from a tile before ``exp``: the column maxima
    ``m`` (and ``argmax``), ``x[t, j]`` and, with label smoothing, ``Σ_c w_c·x[c, j]``."""
    columns_max_argmax(x, base, stride, n_classes, m, argmax)
    columns_at_target(x, base, stride, target, ignore_index, weight, logit_t, w_t)
    if smoothing != 0.0:
        columns_dot_weights(x, base, stride, n_classes, weight, smooth_dot)
    else:
        smooth_dot[:] = 0.0


@reduction
def columns_soft_terms(x, base, stride, y, y_base, y_stride, n_classes, weight, keep, spread, m, argmax,
                       v_total, vx_total):
    """What the probability loss reads from a tile before ``exp``: the column maxima
    ``m`` (and ``argmax``) and ``(V, Σ_c v_c·x[c, j])`` with ``v = weight·(keep·y + spread)``
    (:func:`soft_target_sums` per column)."""
    columns_max_argmax(x, base, stride, n_classes, m, argmax)
    v_total[:] = 0.0
    vx_total[:] = 0.0
    for c in range(n_classes):
        seg = x[base + c * stride : base + c * stride + m.size]
        seg_y = y[y_base + c * y_stride : y_base + c * y_stride + m.size]
        w = weight[c]
        for j in range(m.size):
            v = w * (keep * seg_y[j] + spread)
            v_total[j] += v
            vx_total[j] += v * seg[j]


@elementwise
def columns_smoothed_grad_inplace(x, base, stride, n_classes, a, smooth_scale, weight):
    """``x[c, j] = x[c, j]·a[j] - smooth_scale[j]·weight[c]`` (:func:`smoothed_grad_inplace` per column)."""
    for c in range(n_classes):
        seg = x[base + c * stride : base + c * stride + a.size]
        w = weight[c]
        for j in range(a.size):
            seg[j] = seg[j] * a[j] - smooth_scale[j] * w


@elementwise
def columns_soft_grad_inplace(x, base, stride, y, y_base, y_stride, n_classes, a, g, weight, keep, spread):
    """``x[c, j] = x[c, j]·a[j] - g[j]·weight[c]·(keep·y[c, j] + spread)``
    (:func:`soft_grad_inplace` per column)."""
    for c in range(n_classes):
        seg = x[base + c * stride : base + c * stride + a.size]
        seg_y = y[y_base + c * y_stride : y_base + c * y_stride + a.size]
        w = weight[c]
        for j in range(a.size):
            seg[j] = seg[j] * a[j] - g[j] * (w * (keep * seg_y[j] + spread))


@elementwise
def columns_zero_where(x, base, stride, n_classes, ignored):
    """``x[c, j] = 0`` where ``ignored[j]`` (ignored rows: exp may be NaN there)."""
    for c in range(n_classes):
        seg = x[base + c * stride : base + c * stride + ignored.size]
        for j in range(ignored.size):
            if ignored[j]:
                seg[j] = 0.0


@glue
def grad_terms(j, g_row, counted, weight_sum, keep, spread, z_loss, grad_scale, z_grad_scale, lse, w_t, total, a,
               smooth_scale, target_term):
    """Row ``j``'s gradient coefficients for :func:`hard_tile_rows` (zero unless ``counted``)."""
    g = g_row * grad_scale
    coefficient = softmax_coefficient(g, g_row * z_grad_scale, keep * w_t[j] + spread * weight_sum, z_loss, lse[j],
                                      total[j])
    a[j] = coefficient if counted else 0.0
    smooth_scale[j] = g * spread if counted else 0.0
    target_term[j] = g * keep * w_t[j] if counted else 0.0


@reduction
def hard_tile_rows(r0, targets, ignore_index, weight_sum, keep, spread, z_loss, with_grad, grad_scale, z_grad_scale,
                   grad_rows, lse, logit_t, w_t, smooth_dot, total, argmax, losses, a, smooth_scale, target_term,
                   row_loss, row_lse, row_argmax):
    """The per-row part of :func:`hard_xent_tile` (rows ``r0 + j``): each row's loss into
    ``losses`` and the per-row outputs asked for, and with ``with_grad`` the gradient
    coefficients (zero for ignored rows). Returns ``(Σ loss, Σ lse², ignored rows)`` over
    the counted rows; ``w_t``: the target's weight (0 if ignored). Loops without
    branches, so that they vectorize: an ignored row is computed, then masked (at 10
    classes a loop with branches per row took 17% of the time)."""
    loss_sum = 0.0
    z_sum = 0.0
    n_ignored = 0
    for j in range(targets.size):
        counted = targets[j] != ignore_index
        loss = hard_row_loss(lse[j], logit_t[j], w_t[j], smooth_dot[j], keep, spread, weight_sum) if counted else 0.0
        z = lse[j] * lse[j] if counted else 0.0
        loss_sum += loss
        z_sum += z
        n_ignored += 0 if counted else 1
        losses[j] = loss + z_loss * z
    if with_grad and grad_rows.size > 1:  # a factor per row: two loops, each without a branch
        for j in range(targets.size):
            grad_terms(j, grad_rows[r0 + j], targets[j] != ignore_index, weight_sum, keep, spread, z_loss, grad_scale,
                       z_grad_scale, lse, w_t, total, a, smooth_scale, target_term)
    elif with_grad:
        for j in range(targets.size):
            grad_terms(j, grad_rows[0], targets[j] != ignore_index, weight_sum, keep, spread, z_loss, grad_scale,
                       z_grad_scale, lse, w_t, total, a, smooth_scale, target_term)
    record_row(slice(r0, r0 + targets.size), losses, lse, argmax, row_loss, row_lse, row_argmax)
    return loss_sum, z_sum, n_ignored


@glue
def hard_tile_scratch(width, x, weight, row_argmax):
    """Scratch for :func:`hard_xent_tile` on tiles of up to ``width`` columns of ``x``'s
    dtype: ``(maxima, argmax (empty unless asked for), 6 float64 rows, 3 rows of the
    compute dtype)``. Kernels with many small tiles allocate it once per task (at 10
    classes, allocating per tile took 10% of the time)."""
    return (np.empty(width, x.dtype), np.zeros(width if row_argmax.size else 0, np.int64), np.empty((6, width)),
            np.empty((3, width), weight.dtype))


@glue
def hard_xent_tile(x, xb, x_cs, out, ob, out_cs, n_classes, width, r0, with_grad, target, ignore_index, weight,
                   weight_sum, smoothing, z_loss, grad_scale, z_grad_scale, grad_rows, row_loss, row_lse, row_argmax,
                   scratch, ahead):
    """Rows ``r0 .. r0 + width`` of the class-index loss, held as a tile of ``width``
    columns (class ``c`` of the tile at ``base + c·stride``): the per-row outputs, and
    with ``with_grad`` the gradient, computed over the logits already copied into
    ``out``'s tile. ``scratch``: from :func:`hard_tile_scratch`. ``ahead``: back-to-back
    rows to prefetch during the exp pass (the next row block), or None. Returns the
    tile's sums of the loss and of ``lse²``."""
    keep = 1.0 - smoothing
    spread = smoothing / n_classes
    targets = target[r0 : r0 + width]
    maxima, argmaxes, sums, coefficients = scratch
    m = maxima[:width]
    argmax = argmaxes[:width]
    logit_t = sums[0, :width]
    smooth_dot = sums[1, :width]
    total = sums[2, :width]
    lse = sums[3, :width]
    losses = sums[4, :width]
    w_t = sums[5, :width]
    a = coefficients[0, :width]
    smooth_scale = coefficients[1, :width]
    target_term = coefficients[2, :width]
    if with_grad:  # exp(x - m) is written into the gradient's tile, then turned into it
        columns_hard_terms(out, ob, out_cs, n_classes, targets, ignore_index, weight, smoothing, m, argmax,
                           logit_t, w_t, smooth_dot)
        columns_exp_inplace(out, ob, out_cs, n_classes, m, total, ahead, width, width)
    else:
        columns_hard_terms(x, xb, x_cs, n_classes, targets, ignore_index, weight, smoothing, m, argmax,
                           logit_t, w_t, smooth_dot)
        columns_sum_exp(x, xb, x_cs, n_classes, m, total, ahead, width, width)
    columns_lse(m, total, lse)
    loss_sum, z_sum, n_ignored = hard_tile_rows(r0, targets, ignore_index, weight_sum, keep, spread, z_loss, with_grad,
                                                grad_scale, z_grad_scale, grad_rows, lse, logit_t, w_t, smooth_dot,
                                                total, argmax, losses, a, smooth_scale, target_term, row_loss,
                                                row_lse, row_argmax)
    if with_grad:
        if smoothing != 0.0:
            columns_smoothed_grad_inplace(out, ob, out_cs, n_classes, a, smooth_scale, weight)
        else:
            columns_scale_inplace(out, ob, out_cs, n_classes, a)
        for j in range(width):
            t = targets[j]
            if t != ignore_index:
                out[ob + t * out_cs + j] -= target_term[j]
        if n_ignored:
            columns_zero_where(out, ob, out_cs, n_classes, targets == ignore_index)
    return loss_sum, z_sum


@parallel
def hard_xent_columns(x, x_start, x_os, x_cs, out, out_start, out_os, out_cs, n_outer, n_classes, n_inner, block,
                      in_place, with_grad, target, ignore_index, weight, weight_sum, smoothing, z_loss, grad_scale,
                      z_grad_scale, grad_rows, chunk_loss, chunk_z, row_loss, row_lse, row_argmax, stream):
    """:func:`hard_xent_rows` along the classes of ``(n_outer, n_classes, n_inner)`` arrays.

    Arrays as softmax.py's column kernels (``*_os`` outer, ``*_cs`` class strides; tiles
    of ``block`` columns), and as there a tile is computed in a contiguous scratch tile
    unless too big (``in_scratch``), its gradient written out from there (streamed if
    ``stream``). Row ``r = o·n_inner + j`` of the loss is column ``j`` of outer index
    ``o``: the order of ``target``, ``grad_rows`` and the per-row outputs.
    ``chunk_loss[k]``/``chunk_z[k]`` are the sums over tile ``k``. float32/float64 only.
    """
    n_tiles = tile_count(n_outer, n_inner, block)
    per_task = tiles_per_task(n_tiles)
    for task in numba.prange((n_tiles + per_task - 1) // per_task):
        scratch = hard_tile_scratch(min(block, n_inner), x, weight, row_argmax)
        logits = task_scratch(1, n_classes, n_inner, block, 0, x)
        first, last = task_bounds(task, n_tiles, per_task)
        for k in range(first, last):
            o, j0, width = tile_of(k, n_inner, block)
            xb = x_start + o * x_os + j0
            ob = out_start + o * out_os + j0
            r0 = o * n_inner + j0
            if logits.size:
                tile = logits[: n_classes * width]
                copy_tile(x, xb, x_cs, tile, 0, width, n_classes, width)
                chunk_loss[k], chunk_z[k] = hard_xent_tile(
                    tile, 0, width, tile, 0, width, n_classes, width, r0, with_grad, target, ignore_index, weight,
                    weight_sum, smoothing, z_loss, grad_scale, z_grad_scale, grad_rows, row_loss, row_lse,
                    row_argmax, scratch, None)
                if with_grad:
                    store_columns(tile, n_classes, width, out, ob, out_cs, stream)
            else:
                if with_grad and not in_place:
                    copy_tile(x, xb, x_cs, out, ob, out_cs, n_classes, width)
                chunk_loss[k], chunk_z[k] = hard_xent_tile(
                    x, xb, x_cs, out, ob, out_cs, n_classes, width, r0, with_grad, target, ignore_index, weight,
                    weight_sum, smoothing, z_loss, grad_scale, z_grad_scale, grad_rows, row_loss, row_lse,
                    row_argmax, scratch, None)
        store_fence()


@parallel
def soft_xent_columns(x, x_start, x_os, x_cs, out, out_start, out_os, out_cs, y, y_start, y_os, y_cs, n_outer,
                      n_classes, n_inner, block, in_place, with_grad, weight, smoothing, z_loss, grad_scale,
                      z_grad_scale, grad_rows, chunk_loss, chunk_z, row_loss, row_lse, row_argmax):
    """:func:`soft_xent_rows` along the classes of ``(n_outer, n_classes, n_inner)`` arrays,
    with probabilities ``y`` in the same view; arguments as :func:`hard_xent_columns`."""
    keep = 1.0 - smoothing
    spread = smoothing / n_classes
    dtype = weight.dtype.type
    for k in numba.prange(tile_count(n_outer, n_inner, block)):
        o, j0, width = tile_of(k, n_inner, block)
        r0 = o * n_inner + j0
        xb = x_start + o * x_os + j0
        ob = out_start + o * out_os + j0
        yb = y_start + o * y_os + j0
        m = np.empty(width, x.dtype)
        argmax = np.zeros(width if row_argmax.size else 0, np.int64)
        v_total = np.empty(width)
        vx_total = np.empty(width)
        total = np.empty(width)
        if with_grad:  # exp(x - m) is written into the gradient's tile, then turned into it
            if not in_place:
                copy_tile(x, xb, x_cs, out, ob, out_cs, n_classes, width)
            columns_soft_terms(out, ob, out_cs, y, yb, y_cs, n_classes, weight, keep, spread, m, argmax,
                               v_total, vx_total)
            columns_exp_inplace(out, ob, out_cs, n_classes, m, total)
        else:
            columns_soft_terms(x, xb, x_cs, y, yb, y_cs, n_classes, weight, keep, spread, m, argmax,
                               v_total, vx_total)
            columns_sum_exp(x, xb, x_cs, n_classes, m, total)
        a = np.empty(width, dtype)
        g_columns = np.empty(width, dtype)
        loss_sum = 0.0
        z_sum = 0.0
        for j in range(width):
            r = r0 + j
            lse = lse_from_total(m[j], total[j])
            loss = v_total[j] * lse - vx_total[j]
            loss_sum += loss
            z_sum += lse * lse
            if with_grad:
                g = _grad_rows_at(grad_rows, r) * grad_scale
                a[j] = softmax_coefficient(g, _grad_rows_at(grad_rows, r) * z_grad_scale, v_total[j], z_loss, lse,
                                           total[j])
                g_columns[j] = g
            record_row(r, loss + z_loss * lse * lse, lse, argmax[j] if argmax.size else -1, row_loss, row_lse,
                       row_argmax)
        chunk_loss[k] = loss_sum
        chunk_z[k] = z_sum
        if with_grad:
            columns_soft_grad_inplace(out, ob, out_cs, y, yb, y_cs, n_classes, a, g_columns, weight, dtype(keep),
                                      dtype(spread))


# ------------------------------------------------------ small-class row blocks ----
@parallel
def hard_xent_row_blocks(x, x_start, out, out_start, n_rows, n_classes, with_grad, target, ignore_index, weight,
                         weight_sum, smoothing, z_loss, grad_scale, z_grad_scale, grad_rows, chunk_loss, chunk_z,
                         row_loss, row_lse, row_argmax, half_format):
    """:func:`hard_xent_rows` for back-to-back rows with few classes (``ld == n_classes``).

    Each loss chunk of rows is transposed into a (classes, rows) tile, computed there by
    :func:`hard_xent_tile` with vector loops across the rows (as softmax.py's small-class
    kernels), and the gradient transposed back into ``out`` (which may be ``x``); tasks
    of ``CHUNKS_PER_TASK`` chunks share one tile and one scratch.
    """
    per_task = CHUNKS_PER_TASK
    size = chunk_rows(n_rows)
    n_chunks = chunk_count(n_rows)
    for task in numba.prange((n_chunks + per_task - 1) // per_task):
        tiles = np.empty(size * n_classes, weight.dtype)  # the compute dtype
        scratch = hard_tile_scratch(size, tiles, weight, row_argmax)
        for k in range(task * per_task, min(n_chunks, (task + 1) * per_task)):
            lo, hi = chunk_bounds(k, n_rows)
            tile = tiles[: (hi - lo) * n_classes]
            load_tile(x[x_start + lo * n_classes : x_start + hi * n_classes], n_classes, tile, half_format)
            chunk_loss[k], chunk_z[k] = hard_xent_tile(
                tile, 0, hi - lo, tile, 0, hi - lo, n_classes, hi - lo, lo, with_grad, target, ignore_index, weight,
                weight_sum, smoothing, z_loss, grad_scale, z_grad_scale, grad_rows, row_loss, row_lse, row_argmax,
                scratch, next_row_block(x, x_start, hi, n_rows, n_classes, hi - lo))
            if with_grad:
                store_tile(tile, n_classes, out[out_start + lo * n_classes : out_start + hi * n_classes], half_format)
