"""Softmax-family kernels: softmax, log-softmax, logsumexp and their backward passes.

Every array arrives as a flat buffer with an element offset and strides (see
``fastsce._layout``). Two traversals share the per-element arithmetic below:

* ``*_rows``: classes contiguous. One row per iteration, rows split over threads; the
  row is read from memory by the first pass and from cache by the second.
* ``*_columns``: classes strided, a contiguous ``inner`` axis. A tile of ``block``
  neighbouring columns is reduced with vector operations along the contiguous axis,
  so ``axis=0`` needs no transposed copy.

Reductions accumulate in float64 (whatever the input dtype) across LLVM's vector
lanes, and every row is reduced by a single thread, so results are bitwise identical
for any thread count.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .._config import ELEMENTWISE_FASTMATH, FASTMATH, JIT_OPTIONS
from .._math import exp, exp_diff, fmaximum

_reduce = numba.njit(fastmath=FASTMATH, **JIT_OPTIONS)
# Elementwise loops leave out `reassoc`: `(x - m) - log_sum` must keep its order.
_elementwise = numba.njit(fastmath=ELEMENTWISE_FASTMATH, **JIT_OPTIONS)
_parallel = numba.njit(parallel=True, fastmath=FASTMATH, **JIT_OPTIONS)


# Sums run in the input dtype over blocks of this many elements (spread over LLVM's
# vector lanes), and in float64 across blocks: full vector width, and an error that
# does not grow with the row length.
SUM_BLOCK = 256


# ---------------------------------------------------------------- row primitives ----
# Loops index slices with `range(size)`: a provably non-negative index keeps Numba's
# negative-index wraparound out of the loop, which would otherwise block vectorization.
@_reduce
def row_max(row):
    """Largest entry; NaN if the row holds a NaN."""
    m = row[0]
    for j in range(row.size):
        m = fmaximum(m, row[j])
    return m


@_reduce
def row_sum_exp(row, shift):
    """``Σ exp(row - shift)`` as float64."""
    total = 0.0
    for start in range(0, row.size, SUM_BLOCK):
        src = row[start : start + SUM_BLOCK]
        part = row.dtype.type(0.0)
        for j in range(src.size):
            part += exp_diff(src[j], shift)
        total += part
    return total


@_reduce
def row_exp_into(row, shift, dst):
    """``dst = exp(row - shift)``; returns ``Σ dst`` as float64."""
    total = 0.0
    for start in range(0, row.size, SUM_BLOCK):
        src = row[start : start + SUM_BLOCK]
        out = dst[start : start + SUM_BLOCK]
        part = row.dtype.type(0.0)
        for j in range(src.size):
            e = exp_diff(src[j], shift)
            out[j] = e
            part += e
        total += part
    return total


@_reduce
def row_sum(row):
    """``Σ row`` as float64."""
    total = 0.0
    for start in range(0, row.size, SUM_BLOCK):
        src = row[start : start + SUM_BLOCK]
        part = row.dtype.type(0.0)
        for j in range(src.size):
            part += src[j]
        total += part
    return total


@_reduce
def row_dot(a, b):
    """``Σ a·b`` as float64."""
    total = 0.0
    for start in range(0, a.size, SUM_BLOCK):
        sa = a[start : start + SUM_BLOCK]
        sb = b[start : start + SUM_BLOCK]
        part = a.dtype.type(0.0)
        for j in range(sa.size):
            part += sa[j] * sb[j]
        total += part
    return total


@_elementwise
def scale_into(dst, factor):
    """``dst *= factor``."""
    for j in range(dst.size):
        dst[j] = dst[j] * factor


@_elementwise
def log_softmax_into(row, shift, log_total, dst):
    """``dst = (row - shift) - log_total``; rounded in this order for accuracy."""
    for j in range(row.size):
        dst[j] = (row[j] - shift) - log_total


@_elementwise
def softmax_backward_into(grad, prob, dot, dst):
    """``dst = prob · (grad - dot)``."""
    for j in range(grad.size):
        dst[j] = prob[j] * (grad[j] - dot)


@_elementwise
def log_softmax_backward_into(grad, log_prob, grad_sum, dst):
    """``dst = grad - exp(log_prob) · grad_sum``."""
    for j in range(grad.size):
        dst[j] = grad[j] - exp(log_prob[j]) * grad_sum


@_reduce
def lse_shift(row):
    """The shift for logsumexp: the max, or 0 when it is infinite, so that all -inf
    gives -inf and a +inf entry gives +inf (as torch); NaN stays NaN."""
    m = row_max(row)
    return row.dtype.type(0.0) if math.isinf(m) else m


# ------------------------------------------------------------------- row kernels ----
@_parallel
def softmax_rows(x, x_start, x_ld, out, out_start, out_ld, n_rows, n_cols):
    """``out[i] = softmax(x[i])`` for each row ``i``."""
    for i in numba.prange(n_rows):
        src = x[x_start + i * x_ld : x_start + i * x_ld + n_cols]
        dst = out[out_start + i * out_ld : out_start + i * out_ld + n_cols]
        m = row_max(src)
        total = row_exp_into(src, m, dst)
        scale_into(dst, src.dtype.type(1.0 / total))


@_parallel
def log_softmax_rows(x, x_start, x_ld, out, out_start, out_ld, n_rows, n_cols):
    """``out[i] = log_softmax(x[i])`` for each row ``i``."""
    for i in numba.prange(n_rows):
        src = x[x_start + i * x_ld : x_start + i * x_ld + n_cols]
        dst = out[out_start + i * out_ld : out_start + i * out_ld + n_cols]
        m = row_max(src)
        log_total = src.dtype.type(math.log(row_sum_exp(src, m)))
        log_softmax_into(src, m, log_total, dst)


@_parallel
def logsumexp_rows(x, x_start, x_ld, out, n_rows, n_cols):
    """``out[i] = log Σ_j exp(x[i, j])``, ``out`` contiguous of the input's dtype."""
    for i in numba.prange(n_rows):
        src = x[x_start + i * x_ld : x_start + i * x_ld + n_cols]
        shift = lse_shift(src)
        out[i] = shift + math.log(row_sum_exp(src, shift))


@_parallel
def softmax_backward_rows(g, g_start, g_ld, s, s_start, s_ld, out, out_start, out_ld, n_rows, n_cols):
    """``out[i] = s[i] · (g[i] - Σ_j g[i, j] s[i, j])``: the softmax VJP."""
    for i in numba.prange(n_rows):
        grad = g[g_start + i * g_ld : g_start + i * g_ld + n_cols]
        prob = s[s_start + i * s_ld : s_start + i * s_ld + n_cols]
        dst = out[out_start + i * out_ld : out_start + i * out_ld + n_cols]
        softmax_backward_into(grad, prob, grad.dtype.type(row_dot(grad, prob)), dst)


@_parallel
def log_softmax_backward_rows(g, g_start, g_ld, ls, ls_start, ls_ld, out, out_start, out_ld, n_rows, n_cols):
    """``out[i] = g[i] - exp(ls[i]) · Σ_j g[i, j]``: the log-softmax VJP."""
    for i in numba.prange(n_rows):
        grad = g[g_start + i * g_ld : g_start + i * g_ld + n_cols]
        log_prob = ls[ls_start + i * ls_ld : ls_start + i * ls_ld + n_cols]
        dst = out[out_start + i * out_ld : out_start + i * out_ld + n_cols]
        log_softmax_backward_into(grad, log_prob, grad.dtype.type(row_sum(grad)), dst)


# ------------------------------------------------------------- column primitives ----
# A tile is ``width`` neighbouring columns; class c of the tile starts at base + c*stride.
@_reduce
def columns_max(x, base, stride, n_classes, m):
    """``m[j] = max_c x[c, j]`` over the tile."""
    m[:] = x[base : base + m.size]
    for c in range(1, n_classes):
        seg = x[base + c * stride : base + c * stride + m.size]
        for j in range(m.size):
            m[j] = fmaximum(m[j], seg[j])


@_reduce
def columns_sum_exp(x, base, stride, n_classes, shift, total):
    """``total[j] = Σ_c exp(x[c, j] - shift[j])``."""
    total[:] = 0.0
    for c in range(n_classes):
        seg = x[base + c * stride : base + c * stride + total.size]
        for j in range(total.size):
            total[j] += exp_diff(seg[j], shift[j])


@_reduce
def columns_exp_into(x, x_base, x_stride, n_classes, shift, out, out_base, out_stride, total):
    """``out[c, j] = exp(x[c, j] - shift[j])`` and ``total[j] = Σ_c out[c, j]``."""
    total[:] = 0.0
    for c in range(n_classes):
        src = x[x_base + c * x_stride : x_base + c * x_stride + total.size]
        dst = out[out_base + c * out_stride : out_base + c * out_stride + total.size]
        for j in range(total.size):
            e = exp_diff(src[j], shift[j])
            dst[j] = e
            total[j] += e


@_reduce
def columns_sum(x, base, stride, n_classes, total):
    """``total[j] = Σ_c x[c, j]``."""
    total[:] = 0.0
    for c in range(n_classes):
        seg = x[base + c * stride : base + c * stride + total.size]
        for j in range(total.size):
            total[j] += seg[j]


@_reduce
def columns_dot(a, a_base, a_stride, b, b_base, b_stride, n_classes, total):
    """``total[j] = Σ_c a[c, j] · b[c, j]``."""
    total[:] = 0.0
    for c in range(n_classes):
        sa = a[a_base + c * a_stride : a_base + c * a_stride + total.size]
        sb = b[b_base + c * b_stride : b_base + c * b_stride + total.size]
        for j in range(total.size):
            total[j] += np.float64(sa[j]) * np.float64(sb[j])


@numba.njit(**JIT_OPTIONS)
def _tile(t, n_inner, block):
    """Tile ``t`` → (outer index, first column, width)."""
    per_outer = (n_inner + block - 1) // block
    o = t // per_outer
    j0 = (t - o * per_outer) * block
    return o, j0, min(block, n_inner - j0)


# ---------------------------------------------------------------- column kernels ----
@_parallel
def softmax_columns(x, x_start, x_os, x_cs, out, out_start, out_os, out_cs, n_outer, n_classes, n_inner, block):
    """Softmax along the class axis of ``(n_outer, n_classes, n_inner)`` arrays."""
    n_tiles = n_outer * ((n_inner + block - 1) // block)
    for t in numba.prange(n_tiles):
        o, j0, width = _tile(t, n_inner, block)
        xb = x_start + o * x_os + j0
        ob = out_start + o * out_os + j0
        m = np.empty(width, x.dtype)
        total = np.empty(width, np.float64)
        columns_max(x, xb, x_cs, n_classes, m)
        columns_exp_into(x, xb, x_cs, n_classes, m, out, ob, out_cs, total)
        inv = (1.0 / total).astype(x.dtype)
        for c in range(n_classes):
            seg = out[ob + c * out_cs : ob + c * out_cs + width]
            for j in range(width):
                seg[j] = seg[j] * inv[j]


@_parallel
def log_softmax_columns(x, x_start, x_os, x_cs, out, out_start, out_os, out_cs, n_outer, n_classes, n_inner, block):
    """Log-softmax along the class axis of ``(n_outer, n_classes, n_inner)`` arrays."""
    n_tiles = n_outer * ((n_inner + block - 1) // block)
    for t in numba.prange(n_tiles):
        o, j0, width = _tile(t, n_inner, block)
        xb = x_start + o * x_os + j0
        ob = out_start + o * out_os + j0
        m = np.empty(width, x.dtype)
        total = np.empty(width, np.float64)
        columns_max(x, xb, x_cs, n_classes, m)
        columns_sum_exp(x, xb, x_cs, n_classes, m, total)
        log_total = np.log(total).astype(x.dtype)
        for c in range(n_classes):
            log_softmax_columns_step(x[xb + c * x_cs : xb + c * x_cs + width], m, log_total,
                                     out[ob + c * out_cs : ob + c * out_cs + width])


@_elementwise
def log_softmax_columns_step(src, shift, log_total, dst):
    """``dst[j] = (src[j] - shift[j]) - log_total[j]`` for one class of a tile."""
    for j in range(dst.size):
        dst[j] = (src[j] - shift[j]) - log_total[j]


@_parallel
def logsumexp_columns(x, x_start, x_os, x_cs, out, n_outer, n_classes, n_inner, block):
    """``out[o, j] = log Σ_c exp(x[o, c, j])``, ``out`` a contiguous (n_outer·n_inner) array."""
    n_tiles = n_outer * ((n_inner + block - 1) // block)
    for t in numba.prange(n_tiles):
        o, j0, width = _tile(t, n_inner, block)
        xb = x_start + o * x_os + j0
        m = np.empty(width, x.dtype)
        total = np.empty(width, np.float64)
        columns_max(x, xb, x_cs, n_classes, m)
        for j in range(width):
            m[j] = 0.0 if math.isinf(m[j]) else m[j]  # as lse_shift
        columns_sum_exp(x, xb, x_cs, n_classes, m, total)
        dst = out[o * n_inner + j0 : o * n_inner + j0 + width]
        for j in range(width):
            dst[j] = m[j] + math.log(total[j])


@_parallel
def softmax_backward_columns(g, g_start, g_os, g_cs, s, s_start, s_os, s_cs, out, out_start, out_os, out_cs,
                             n_outer, n_classes, n_inner, block):
    """Softmax VJP along the class axis of ``(n_outer, n_classes, n_inner)`` arrays."""
    n_tiles = n_outer * ((n_inner + block - 1) // block)
    for t in numba.prange(n_tiles):
        o, j0, width = _tile(t, n_inner, block)
        gb = g_start + o * g_os + j0
        sb = s_start + o * s_os + j0
        ob = out_start + o * out_os + j0
        total = np.empty(width, np.float64)
        columns_dot(g, gb, g_cs, s, sb, s_cs, n_classes, total)
        dot = total.astype(g.dtype)
        for c in range(n_classes):
            softmax_backward_columns_step(g[gb + c * g_cs : gb + c * g_cs + width],
                                          s[sb + c * s_cs : sb + c * s_cs + width], dot,
                                          out[ob + c * out_cs : ob + c * out_cs + width])


@_elementwise
def softmax_backward_columns_step(grad, prob, dot, dst):
    """``dst[j] = prob[j] · (grad[j] - dot[j])`` for one class of a tile."""
    for j in range(dst.size):
        dst[j] = prob[j] * (grad[j] - dot[j])


@_parallel
def log_softmax_backward_columns(g, g_start, g_os, g_cs, ls, ls_start, ls_os, ls_cs, out, out_start, out_os,
                                 out_cs, n_outer, n_classes, n_inner, block):
    """Log-softmax VJP along the class axis of ``(n_outer, n_classes, n_inner)`` arrays."""
    n_tiles = n_outer * ((n_inner + block - 1) // block)
    for t in numba.prange(n_tiles):
        o, j0, width = _tile(t, n_inner, block)
        gb = g_start + o * g_os + j0
        lb = ls_start + o * ls_os + j0
        ob = out_start + o * out_os + j0
        total = np.empty(width, np.float64)
        columns_sum(g, gb, g_cs, n_classes, total)
        grad_sum = total.astype(g.dtype)
        for c in range(n_classes):
            log_softmax_backward_columns_step(g[gb + c * g_cs : gb + c * g_cs + width],
                                              ls[lb + c * ls_cs : lb + c * ls_cs + width], grad_sum,
                                              out[ob + c * out_cs : ob + c * out_cs + width])


@_elementwise
def log_softmax_backward_columns_step(grad, log_prob, grad_sum, dst):
    """``dst[j] = grad[j] - exp(log_prob[j]) · grad_sum[j]`` for one class of a tile."""
    for j in range(dst.size):
        dst[j] = grad[j] - exp(log_prob[j]) * grad_sum[j]
