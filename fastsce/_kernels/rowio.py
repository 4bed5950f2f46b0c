"""Bringing rows into kernels and writing them back, for every supported dtype.

Kernels compute on a *working row*: the destination row itself for float32/float64
outputs, or a float32 scratch row for float16/bfloat16 outputs (passed as uint16 bits).
These helpers resolve at compile time from the array types (Numba overloads), so each
kernel is written once and compiled per dtype:

* :func:`work_buffer`/:func:`working_row`: where a row is computed;
* :func:`load_row`: copy or decode the source into the working row, returning its max;
* :func:`readable_row`: a read-only source as floats (decoded into scratch if 16-bit);
* :func:`store_row`: encode the working row into a 16-bit destination (else nothing).

The Python bodies are the same logic for ``NUMBA_DISABLE_JIT=1``.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import overload

from .._config import ELEMENTWISE_FASTMATH, FASTMATH, JIT_OPTIONS
from .._math import (
    FLOAT16,
    bfloat16_bits_to_float32,
    float16_bits_to_float32,
    float32_to_bfloat16_bits,
    float32_to_float16_bits,
    fmaximum,
)

_reduction = numba.njit(fastmath=FASTMATH, **JIT_OPTIONS)
_elementwise = numba.njit(fastmath=ELEMENTWISE_FASTMATH, **JIT_OPTIONS)
_OVERLOAD = {"jit_options": {"fastmath": FASTMATH, **JIT_OPTIONS}}


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
def encode_into(values, bits, half_format):
    """``bits = 16-bit(values)``, rounded to nearest even."""
    if half_format == FLOAT16:
        for j in range(bits.size):
            bits[j] = float32_to_float16_bits(np.float32(values[j]))
    else:
        for j in range(bits.size):
            bits[j] = float32_to_bfloat16_bits(np.float32(values[j]))


# ------------------------------------------------------ dtype-generic helpers ----
def work_buffer(out, n):
    """Scratch for one working row: float32[n] for 16-bit ``out``, else nothing."""
    return np.empty(n, np.float32) if out.dtype == np.uint16 else out[:0]


@overload(work_buffer, **_OVERLOAD)
def _work_buffer(out, n):
    if _is_bits(out):
        return lambda out, n: np.empty(n, np.float32)
    return lambda out, n: out[:0]


def working_row(dst, work):
    """The row a kernel computes on: ``dst`` itself, or ``work`` for 16-bit ``dst``."""
    return work if dst.dtype == np.uint16 else dst


@overload(working_row, **_OVERLOAD)
def _working_row(dst, work):
    if _is_bits(dst):
        return lambda dst, work: work
    return lambda dst, work: dst


def load_row(src, row, in_place, half_format):
    """Bring ``src`` into the working ``row`` (unless already there); returns its max."""
    if src.dtype == np.uint16:
        return decode_max(src, row, half_format)
    return row_max(row) if in_place else copy_max(src, row)


@overload(load_row, **_OVERLOAD)
def _load_row(src, row, in_place, half_format):
    if _is_bits(src):
        return lambda src, row, in_place, half_format: decode_max(src, row, half_format)

    def load(src, row, in_place, half_format):
        return row_max(row) if in_place else copy_max(src, row)

    return load


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


def store_row(row, dst, half_format):
    """Write the working ``row`` to a 16-bit ``dst``; nothing for float ``dst`` (it is ``row``)."""
    if dst.dtype == np.uint16:
        encode_into(row, dst, half_format)


@overload(store_row, **_OVERLOAD)
def _store_row(row, dst, half_format):
    if _is_bits(dst):
        return lambda row, dst, half_format: encode_into(row, dst, half_format)
    return lambda row, dst, half_format: None


# -------------------------------------------------------------- kernel prologues ----
@_reduction
def open_row(x, x_start, x_ld, out, out_start, out_ld, i, n_cols, in_place, half_format):
    """Row ``i`` ready to compute on: ``(destination, working row, max)``."""
    dst = out[out_start + i * out_ld : out_start + i * out_ld + n_cols]
    row = working_row(dst, work_buffer(out, n_cols))
    m = load_row(x[x_start + i * x_ld : x_start + i * x_ld + n_cols], row, in_place, half_format)
    return dst, row, m


@_reduction
def open_block(x, x_start, out, out_start, lo, hi, n_cols, in_place, half_format):
    """Back-to-back rows ``[lo, hi)`` ready to compute on: ``(destination, working block)``."""
    dst = out[out_start + lo * n_cols : out_start + hi * n_cols]
    block = working_row(dst, work_buffer(out, dst.size))
    load_row(x[x_start + lo * n_cols : x_start + hi * n_cols], block, in_place, half_format)
    return dst, block
