"""Bringing rows into kernels and writing them back, for every supported dtype.

Row kernels compute on a *working row*, a scratch row per task (float32 for
float16/bfloat16 outputs, which arrive as uint16 bits), and write it out once, at the
end; outputs bigger than the cache are *streamed* (non-temporal stores, see
:func:`stream_scaled`, and :func:`stream_encoded` for 16-bit bits). The small-class
kernels compute on a block of rows transposed into a (classes, rows) tile.
These helpers resolve at compile time from the array types (Numba overloads), so each
kernel is written once and compiled per dtype:

* :func:`row_scratch`: where a row kernel computes (a scratch row per task);
  :func:`exact_exps`: whether its exps take ``x - max`` exactly (not for 16-bit outputs);
  :func:`work_buffer`: float32 scratch to decode a 16-bit source into;
* :func:`load_row`: copy or decode the source into the working row, returning its max;
* :func:`readable_row`: a read-only source as floats (decoded into scratch if 16-bit);
  :func:`readable_row_max`: the same and its max, in one pass; :func:`decoded_row`: the
  floats of a source decoded before;
* :func:`store_row`: write the working row out, encoded for a 16-bit destination,
  streamed around the caches for a big one;
* :func:`load_tile`/:func:`store_tile`: back-to-back rows into a (classes, rows) tile
  and back.

The Python bodies are the same logic for ``NUMBA_DISABLE_JIT=1``.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import overload

from .._config import ELEMENTWISE_FASTMATH, FASTMATH, JIT_OPTIONS
from .._math import (
    CACHE_LINE_BYTES,
    FLOAT16,
    TRANSPOSE_BYTES,
    TRANSPOSE_MIN_CLASSES,
    bfloat16_bits_to_float32,
    bfloat16_rows_into_tile,
    element_address,
    float16_bits_to_float32,
    float16_rows_into_tile,
    float32_to_bfloat16_bits,
    float32_to_float16_bits,
    fmaximum,
    rows_into_tile,
    stream_bfloat16_line,
    stream_float16_line,
    stream_line,
    tile_into_bfloat16_rows,
    tile_into_float16_rows,
    tile_into_rows,
)

_reduction = numba.njit(fastmath=FASTMATH, **JIT_OPTIONS)
_elementwise = numba.njit(fastmath=ELEMENTWISE_FASTMATH, **JIT_OPTIONS)
# Glue between a kernel and its loops is inlined into the kernel (Numba IR inlining): a
# parallel kernel pays ~200 ns per call to a separate small function, per row
# (measured: +25% on a 1000-class softmax).
_OVERLOAD = {"jit_options": {"fastmath": FASTMATH, **JIT_OPTIONS}, "inline": "always"}
glue = numba.njit(inline="always", **JIT_OPTIONS)


def _is_bits(array_type) -> bool:
    return array_type.dtype == types.uint16


# ------------------------------------------------------------------ primitives ----
@_reduction
def copy_max(src, dst):
    """``dst[:] = src`` (no overlap) fused with the row max: one read of ``src``."""
    m = src[0]
    for j in range(dst.size):
        v = src[j]
        dst[j] = v
        m = fmaximum(m, v)
    return m


@_reduction
def row_max(row):
    """Largest entry; NaN if the row holds a NaN."""
    m = row[0]
    for j in range(row.size):
        m = fmaximum(m, row[j])
    return m


@_reduction
def decode_max(bits, dst, half_format):
    """``dst = float(bits)`` for float16/bfloat16 ``bits``; returns the max."""
    m = dst.dtype.type(-np.inf)
    if half_format == FLOAT16:
        for j in range(dst.size):
            v = dst.dtype.type(float16_bits_to_float32(bits[j]))
            dst[j] = v
            m = fmaximum(m, v)
    else:
        for j in range(dst.size):
            v = dst.dtype.type(bfloat16_bits_to_float32(bits[j]))
            dst[j] = v
            m = fmaximum(m, v)
    return m


@_elementwise
def encode_into(values, bits, half_format, factor):
    """``bits = 16-bit(values · factor)``, rounded to nearest even."""
    if half_format == FLOAT16:
        for j in range(bits.size):
            bits[j] = float32_to_float16_bits(np.float32(values[j] * factor))
    else:
        for j in range(bits.size):
            bits[j] = float32_to_bfloat16_bits(np.float32(values[j] * factor))


@glue
def encode_entries_into(values, bits, start, lo, hi, half_format, factor):
    """``bits[start + j] = 16-bit(values[j] · factor)`` for ``lo <= j < hi`` (the ragged
    ends of :func:`stream_encoded`)."""
    if half_format == FLOAT16:
        for j in range(lo, hi):
            bits[start + j] = float32_to_float16_bits(np.float32(values[j] * factor))
    else:
        for j in range(lo, hi):
            bits[start + j] = float32_to_bfloat16_bits(np.float32(values[j] * factor))


@_elementwise
def stream_encoded(values, bits, start, half_format, factor):
    """``bits[start : start + values.size] = 16-bit(values · factor)``, written around the
    caches as :func:`stream_scaled` writes floats: whole aligned cache lines of ``bits``
    encoded in registers and stored non-temporally, the ragged ends by plain stores.
    Callers end a task with ``store_fence()``."""
    n = values.size
    line = CACHE_LINE_BYTES // bits.itemsize
    head = line_start_from(bits, start, n)
    encode_entries_into(values, bits, start, 0, head, half_format, factor)
    j = head
    if half_format == FLOAT16:
        while j + line <= n:
            stream_float16_line(bits, start + j, values, j, factor)
            j += line
    else:
        while j + line <= n:
            stream_bfloat16_line(bits, start + j, values, j, factor)
            j += line
    encode_entries_into(values, bits, start, j, n, half_format, factor)


@glue
def line_start_from(dst, start, n):
    """Elements from ``dst[start]`` to the first cache-line boundary, at most ``n`` (``n``
    if elements are misaligned within lines and never meet one)."""
    size = dst.itemsize
    offset = element_address(dst, start) % CACHE_LINE_BYTES
    if offset % size:
        return n
    return min(n, ((CACHE_LINE_BYTES - offset) % CACHE_LINE_BYTES) // size)


@numba.njit(**JIT_OPTIONS)
def first_line_start(dst):
    """Index of ``dst``'s first element on a cache-line boundary, or ``dst.size`` if none."""
    return line_start_from(dst, 0, dst.size)


@_elementwise
def copy_scaled(src, dst, factor):
    """``dst[:] = src · factor`` (no overlap)."""
    for j in range(dst.size):
        dst[j] = src[j] * factor


@glue
def stream_scaled_into(src, dst, start, factor):
    """``dst[start : start + src.size] = src · factor`` (no overlap), written around the
    caches: whole aligned cache lines by non-temporal stores, the ragged ends by plain
    ones. Callers end a task with ``store_fence()``. Inlined, and given ``dst`` whole:
    kernels that store many short segments would otherwise pass a slice per call, whose
    reference on ``dst`` the threads contend for (20% of an axis=0 softmax)."""
    n = src.size
    line = CACHE_LINE_BYTES // dst.itemsize
    head = line_start_from(dst, start, n)
    for j in range(head):
        dst[start + j] = src[j] * factor
    j = head
    while j + line <= n:
        stream_line(dst, start + j, src, j, factor)
        j += line
    for k in range(j, n):
        dst[start + k] = src[k] * factor


@_elementwise
def stream_scaled(src, dst, start, factor):
    """:func:`stream_scaled_into` as a function of its own: its callers pass rows (arrays
    they hold) directly, so that no reference count changes after the streamed stores
    (see :func:`store_row_at`)."""
    stream_scaled_into(src, dst, start, factor)


# Transposes between back-to-back rows of `n_cols` classes and a (n_cols, rows) tile.
# Whole groups of rows go through vector registers (see _math's in-register
# transposes); the rows left over, and rows of too few classes for a group to pay, take
# plain loops class by class (strided reads, contiguous writes, or the reverse).
@glue
def grouped_rows(n_rows, n_cols, tile):
    """``(leading rows the in-register transposes take, rows per group)``."""
    group = TRANSPOSE_BYTES // tile.itemsize
    if TRANSPOSE_MIN_CLASSES <= n_cols <= group:
        return n_rows // group * group, group
    return 0, group


@_elementwise
def transpose_into(src, n_cols, tile):
    """``tile[c, r] = src[r, c]``."""
    n_rows = tile.size // n_cols
    done, group = grouped_rows(n_rows, n_cols, tile)
    for r in range(0, done, group):
        rows_into_tile(src, r * n_cols, n_cols, tile, r, n_rows)
    for c in range(n_cols):
        for r in range(done, n_rows):
            tile[c * n_rows + r] = src[r * n_cols + c]


@_elementwise
def decode_transposed(bits, n_cols, tile, half_format):
    """``tile[c, r] = float(bits[r, c])`` for float16/bfloat16 ``bits``."""
    n_rows = tile.size // n_cols
    done, group = grouped_rows(n_rows, n_cols, tile)
    if half_format == FLOAT16:
        for r in range(0, done, group):
            float16_rows_into_tile(bits, r * n_cols, n_cols, tile, r, n_rows)
        for c in range(n_cols):
            for r in range(done, n_rows):
                tile[c * n_rows + r] = float16_bits_to_float32(bits[r * n_cols + c])
    else:
        for r in range(0, done, group):
            bfloat16_rows_into_tile(bits, r * n_cols, n_cols, tile, r, n_rows)
        for c in range(n_cols):
            for r in range(done, n_rows):
                tile[c * n_rows + r] = bfloat16_bits_to_float32(bits[r * n_cols + c])


@_elementwise
def transpose_from(tile, n_cols, dst):
    """``dst[r, c] = tile[c, r]``."""
    n_rows = tile.size // n_cols
    done, group = grouped_rows(n_rows, n_cols, tile)
    for r in range(0, done, group):
        tile_into_rows(tile, r, n_rows, n_cols, dst, r * n_cols)
    for c in range(n_cols):
        for r in range(done, n_rows):
            dst[r * n_cols + c] = tile[c * n_rows + r]


@_elementwise
def encode_transposed(tile, n_cols, bits, half_format):
    """``bits[r, c] = 16-bit(tile[c, r])``, rounded to nearest even."""
    n_rows = tile.size // n_cols
    done, group = grouped_rows(n_rows, n_cols, tile)
    if half_format == FLOAT16:
        for r in range(0, done, group):
            tile_into_float16_rows(tile, r, n_rows, n_cols, bits, r * n_cols)
        for c in range(n_cols):
            for r in range(done, n_rows):
                bits[r * n_cols + c] = float32_to_float16_bits(np.float32(tile[c * n_rows + r]))
    else:
        for r in range(0, done, group):
            tile_into_bfloat16_rows(tile, r, n_rows, n_cols, bits, r * n_cols)
        for c in range(n_cols):
            for r in range(done, n_rows):
                bits[r * n_cols + c] = float32_to_bfloat16_bits(np.float32(tile[c * n_rows + r]))


# ------------------------------------------------------ dtype-generic helpers ----
def work_buffer(out, n):
    """Scratch for one working row: float32[n] for 16-bit ``out``, else nothing."""
    return np.empty(n, np.float32) if out.dtype == np.uint16 else out[:0]


@overload(work_buffer, **_OVERLOAD)
def _work_buffer(out, n):
    if _is_bits(out):
        return lambda out, n: np.empty(n, np.float32)
    return lambda out, n: out[:0]


def row_scratch(out, n):
    """The working row of a task writing ``out``: float32[n] for 16-bit ``out``, else
    ``out.dtype[n]``. (Computing in a task's own scratch rather than in ``out`` lets
    LLVM see that nothing aliases it; measured 25% faster on 1000-class rows.)"""
    return np.empty(n, np.float32 if out.dtype == np.uint16 else out.dtype)


@overload(row_scratch, **_OVERLOAD)
def _row_scratch(out, n):
    if _is_bits(out):
        return lambda out, n: np.empty(n, np.float32)
    return lambda out, n: np.empty(n, out.dtype)


def exact_exps(out):
    """Whether a kernel writing ``out`` takes ``x - max`` exactly in its exps (see
    softmax.exp_inplace): not for a 16-bit ``out``, whose rounding hides the difference."""
    return out.dtype != np.uint16


@overload(exact_exps, **_OVERLOAD)
def _exact_exps(out):
    exact = not _is_bits(out)
    return lambda out: exact


def load_row(src, row, half_format):
    """Copy or decode ``src`` into the working ``row``; returns its max."""
    if src.dtype == np.uint16:
        return decode_max(src, row, half_format)
    return copy_max(src, row)


@overload(load_row, **_OVERLOAD)
def _load_row(src, row, half_format):
    if _is_bits(src):
        return lambda src, row, half_format: decode_max(src, row, half_format)
    return lambda src, row, half_format: copy_max(src, row)


def readable_row(src, work, half_format):
    """``src`` as floats to read: itself, or decoded into ``work`` if 16-bit."""
    if src.dtype == np.uint16:
        decode_max(src, work, half_format)
        return work
    return src


@overload(readable_row, **_OVERLOAD)
def _readable_row(src, work, half_format):
    if _is_bits(src):

        def decoded(src, work, half_format):
            decode_max(src, work, half_format)
            return work

        return decoded
    return lambda src, work, half_format: src


def readable_row_max(src, work, half_format):
    """``(values, max)``: :func:`readable_row` and its max, from the one pass that decodes
    a 16-bit source (a second pass over the decoded row cost 12% of a 16-bit logsumexp
    of 65536x1000)."""
    if src.dtype == np.uint16:
        return work, decode_max(src, work, half_format)
    return src, row_max(src)


@overload(readable_row_max, **_OVERLOAD)
def _readable_row_max(src, work, half_format):
    if _is_bits(src):
        return lambda src, work, half_format: (work, decode_max(src, work, half_format))
    return lambda src, work, half_format: (src, row_max(src))


def decoded_row(src, work):
    """``src`` as floats once :func:`readable_row` or :func:`readable_row_max` has decoded
    it into ``work``."""
    return work if src.dtype == np.uint16 else src


@overload(decoded_row, **_OVERLOAD)
def _decoded_row(src, work):
    if _is_bits(src):
        return lambda src, work: work
    return lambda src, work: src


def store_row(row, dst, half_format, stream, factor=1.0):
    """Write the working ``row · factor`` to ``dst``: encoded if 16-bit, else streamed
    around the caches (``stream``) or copied. (Scaling on the way out saves a pass.)"""
    factor = row.dtype.type(factor)
    if dst.dtype == np.uint16 and stream:
        stream_encoded(row, dst, 0, half_format, factor)
    elif dst.dtype == np.uint16:
        encode_into(row, dst, half_format, factor)
    elif stream:
        stream_scaled(row, dst, 0, factor)
    else:
        copy_scaled(row, dst, factor)


@overload(store_row, **_OVERLOAD)
def _store_row(row, dst, half_format, stream, factor=1.0):
    if _is_bits(dst):

        def encode(row, dst, half_format, stream, factor=1.0):
            if stream:
                stream_encoded(row, dst, 0, half_format, row.dtype.type(factor))
            else:
                encode_into(row, dst, half_format, row.dtype.type(factor))

        return encode

    def store(row, dst, half_format, stream, factor=1.0):
        if stream:
            stream_scaled(row, dst, 0, row.dtype.type(factor))
        else:
            copy_scaled(row, dst, row.dtype.type(factor))

    return store


def store_row_at(row, out, start, half_format, stream, factor=1.0):
    """:func:`store_row` into ``out[start : start + row.size]``.

    A function of its own (not inlined), streaming through ``out`` itself: a reference
    count changed after streamed stores (a slice, an array argument of inlined glue that
    the reference-count pruning misses) is a locked instruction, which waits until the
    streamed stores have reached memory (a 65536x1000 float32 gradient on one thread:
    80 instead of 65 ms)."""
    if not stream:
        store_row(row, out[start : start + row.size], half_format, False, factor)
    elif out.dtype == np.uint16:
        stream_encoded(row, out, start, half_format, row.dtype.type(factor))
    else:
        stream_scaled(row, out, start, row.dtype.type(factor))


@overload(store_row_at, **_OVERLOAD)
def _store_row_at(row, out, start, half_format, stream, factor=1.0):
    if _is_bits(out):

        def encode(row, out, start, half_format, stream, factor=1.0):
            if stream:
                stream_encoded(row, out, start, half_format, row.dtype.type(factor))
            else:
                encode_into(row, out[start : start + row.size], half_format, row.dtype.type(factor))

        return encode

    def store(row, out, start, half_format, stream, factor=1.0):
        if stream:
            stream_scaled(row, out, start, row.dtype.type(factor))
        else:
            copy_scaled(row, out[start : start + row.size], row.dtype.type(factor))

    return store


def store_entry(dst, j, value, half_format):
    """``dst[j] = value``, encoded if ``dst`` holds 16-bit bits. (No slice: a slice's
    reference count is a locked instruction, which waits for every pending streamed
    store to reach memory.)"""
    if dst.dtype == np.uint16:
        encode_into(np.array([value], np.float32), dst[j : j + 1], half_format, np.float32(1.0))
    else:
        dst[j] = value


@overload(store_entry, **_OVERLOAD)
def _store_entry(dst, j, value, half_format):
    if _is_bits(dst):

        def encode(dst, j, value, half_format):
            if half_format == FLOAT16:
                dst[j] = float32_to_float16_bits(np.float32(value))
            else:
                dst[j] = float32_to_bfloat16_bits(np.float32(value))

        return encode

    def store(dst, j, value, half_format):
        dst[j] = value

    return store


def load_tile(src, n_cols, tile, half_format):
    """Back-to-back rows ``src`` (floats, or 16-bit bits) into the (n_cols, rows) ``tile``."""
    if src.dtype == np.uint16:
        decode_transposed(src, n_cols, tile, half_format)
    else:
        transpose_into(src, n_cols, tile)


@overload(load_tile, **_OVERLOAD)
def _load_tile(src, n_cols, tile, half_format):
    if _is_bits(src):
        return lambda src, n_cols, tile, half_format: decode_transposed(src, n_cols, tile, half_format)
    return lambda src, n_cols, tile, half_format: transpose_into(src, n_cols, tile)


def store_tile(tile, n_cols, dst, half_format):
    """The (n_cols, rows) ``tile`` out to back-to-back rows ``dst`` (encoded if 16-bit)."""
    if dst.dtype == np.uint16:
        encode_transposed(tile, n_cols, dst, half_format)
    else:
        transpose_from(tile, n_cols, dst)


@overload(store_tile, **_OVERLOAD)
def _store_tile(tile, n_cols, dst, half_format):
    if _is_bits(dst):
        return lambda tile, n_cols, dst, half_format: encode_transposed(tile, n_cols, dst, half_format)
    return lambda tile, n_cols, dst, half_format: transpose_from(tile, n_cols, dst)


# -------------------------------------------------------------- kernel prologues ----
@glue
def open_row(x, x_start, x_ld, out, out_start, out_ld, i, n_cols, half_format, work):
    """Row ``i`` of ``x`` loaded into ``work`` (from :func:`row_scratch`): ``(destination
    row of out, max)``. ``out`` may be ``x`` (in place)."""
    m = load_row(x[x_start + i * x_ld : x_start + i * x_ld + n_cols], work, half_format)
    return out[out_start + i * out_ld : out_start + i * out_ld + n_cols], m
