"""The small-class kernels' transposes between back-to-back rows and a (classes, rows)
tile (``rowio.load_tile``/``store_tile``), which move whole groups of rows through
vector registers (``_math``'s in-register transposes) and the rest with scalar loops.

Every class count around the in-register range (5 to 16 float32 classes, 5 to 8
float64), row counts around the group size, every dtype: the tile must be the exact
transpose, the rows written back must be the exact rows (16-bit: the bits, rounded to
nearest even), and nothing outside the destination rows may change, although a row's
vector is written whole (spilling into the next row) where that stays inside them.
"""

from __future__ import annotations

import ml_dtypes
import numba
import numpy as np
import pytest

from fastsce._config import BFLOAT16, FLOAT16, NOT_16BIT
from fastsce._kernels import rowio

DTYPES = {
    "float32": (np.float32, np.float32, NOT_16BIT),
    "float64": (np.float64, np.float64, NOT_16BIT),
    "float16": (np.float16, np.float32, FLOAT16),
    "bfloat16": (ml_dtypes.bfloat16, np.float32, BFLOAT16),
}
ROW_COUNTS = [1, 7, 8, 15, 16, 17, 31, 33, 400]


@numba.njit(cache=True)
def load_tile(src, n_cols, tile, half_format):
    rowio.load_tile(src, n_cols, tile, half_format)


@numba.njit(cache=True)
def store_tile(tile, n_cols, dst, half_format):
    rowio.store_tile(tile, n_cols, dst, half_format)


def _as_kernel_input(a: np.ndarray, half_format: int) -> np.ndarray:
    return a.view(np.uint16) if half_format != NOT_16BIT else a


@pytest.mark.parametrize("n_rows", ROW_COUNTS)
@pytest.mark.parametrize("n_cols", list(range(1, 18)))
@pytest.mark.parametrize("name", list(DTYPES))
def test_rows_into_tile_and_back(name, n_cols, n_rows):
    dtype, tile_dtype, half_format = DTYPES[name]
    rng = np.random.default_rng(n_cols * 1000 + n_rows)
    rows = rng.standard_normal((n_rows, n_cols)).astype(dtype)
    # A parent array with sentinels around the rows: the kernels get the middle slice.
    sentinel = dtype(-7.25)
    src = np.full(n_rows * n_cols + 64, sentinel, dtype)
    src[16 : 16 + rows.size] = rows.ravel()
    tile = np.full(rows.size, np.nan, tile_dtype)
    load_tile(_as_kernel_input(src, half_format)[16 : 16 + rows.size], n_cols, tile, half_format)
    np.testing.assert_array_equal(tile.reshape(n_cols, n_rows), rows.T.astype(tile_dtype))
    np.testing.assert_array_equal(src[16 : 16 + rows.size], rows.ravel())  # the source is untouched

    dst = np.full_like(src, sentinel)
    values = rng.standard_normal(tile.size).astype(tile_dtype)  # not representable in 16 bits
    store_tile(values, n_cols, _as_kernel_input(dst, half_format)[16 : 16 + rows.size], half_format)
    expected = values.reshape(n_cols, n_rows).T.astype(dtype)  # NumPy/ml_dtypes round to nearest even
    np.testing.assert_array_equal(dst[16 : 16 + rows.size].reshape(n_rows, n_cols), expected)
    assert (dst[:16] == sentinel).all() and (dst[16 + rows.size :] == sentinel).all()


@pytest.mark.parametrize("name", ["float32", "float16"])
def test_special_values_cross_unchanged(name):
    """NaN, infinities, signed zeros and subnormals go through the registers bit for bit."""
    dtype, tile_dtype, half_format = DTYPES[name]
    tiny = np.finfo(dtype).smallest_subnormal
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, tiny, -tiny, 1.0, -2.5, 3e4], dtype)
    rows = np.resize(specials, (48, 10))
    tile = np.empty(rows.size, tile_dtype)
    load_tile(_as_kernel_input(rows.ravel(), half_format), 10, tile, half_format)
    assert tile.view(np.uint32 if tile_dtype == np.float32 else np.uint64).tolist() == (
        rows.T.astype(tile_dtype).ravel().view(np.uint32).tolist())
    out = np.empty_like(rows.ravel())
    store_tile(tile, 10, _as_kernel_input(out, half_format), half_format)
    assert out.view(np.uint16 if half_format != NOT_16BIT else np.uint32).tolist() == (
        rows.ravel().view(np.uint16 if half_format != NOT_16BIT else np.uint32).tolist())
