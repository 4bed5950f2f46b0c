"""Tests of the softmax family against the naive float64 references in tests/reference.py.

Accuracy bounds are those of design.md §4, applied by the helpers in conftest.py.
Arrays are small: the first call of each kernel compiles, the rest runs in milliseconds.
"""

from __future__ import annotations

import math
import sys
import tracemalloc

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.exceptions import AxisError

import fastsce
from tests import reference as ref
from tests.conftest import (
    FLOAT_DTYPES,
    LINEAR_RTOL,
    SCALED_RTOL,
    assert_close_log,
    assert_close_scaled,
    assert_close_softmax,
    jacobian_scale,
    jit_or_pure,
    log_softmax_backward_scale,
    needs_two_threads,
    softmax_backward_scale,
    tiny_long_rows,
)

FORWARD = ("softmax", "log_softmax", "logsumexp")
BACKWARD = ("softmax_backward", "log_softmax_backward")
ALL = FORWARD + BACKWARD + ("softmax_jacobian",)
WITH_OUT = FORWARD + BACKWARD
SAME_SHAPE = ("softmax", "log_softmax") + BACKWARD  # out has the input's shape
WITH_DTYPE = ("softmax", "log_softmax")

# The Jacobian's entries s_i·s_j carry the error of two probabilities.
JAC_RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 2.5e-13}

SHAPES = [(1, 1), (3, 7), (5, 10), (17, 128), (4, 1000), (2, 3, 33)]
# Shapes that reach other traversals: many short rows, single class, single row.
MORE_SHAPES = [(1000, 2), (64, 5), (300, 1), (1, 777)]
KINDS = ["normal", "uniform1e4", "offset1e4", "equal", "dominant"]


# ------------------------------------------------------------------------ helpers ----
def fn(name):
    return getattr(fastsce, name)


def make_x(kind: str, shape, dtype, rng) -> np.ndarray:
    """Logits of a given character; values are exact in ``dtype``."""
    if kind == "normal":
        x = 3.0 * rng.standard_normal(shape)
    elif kind == "uniform1e4":
        x = rng.uniform(-1e4, 1e4, shape)
    elif kind == "offset1e4":
        sign = np.where(rng.random(shape[:-1] + (1,)) < 0.5, -1.0, 1.0)
        x = sign * 1e4 + 5.0 * rng.standard_normal(shape)
    elif kind == "equal":
        c = rng.choice([-1e4, -3.5, 0.0, 7.25, 1e4], size=shape[:-1] + (1,))
        x = np.broadcast_to(c, shape).copy()
    elif kind == "dominant":
        x = 3.0 * rng.standard_normal(shape)
        hot = rng.integers(0, shape[-1], size=shape[:-1])
        np.put_along_axis(x, hot[..., None], 1e4, axis=-1)
    else:
        raise AssertionError(kind)
    return x.astype(dtype)


def make_inputs(name: str, x: np.ndarray, axis: int, rng) -> tuple:
    """Positional array arguments of ``name`` for the logits ``x``."""
    if name == "softmax_backward":
        g = rng.standard_normal(x.shape).astype(x.dtype)
        return g, ref.softmax(x, axis).astype(x.dtype)
    if name == "log_softmax_backward":
        g = rng.standard_normal(x.shape).astype(x.dtype)
        with np.errstate(over="ignore"):
            return g, ref.log_softmax(x, axis).astype(x.dtype)
    return (x,)


def check(name: str, got, args: tuple, axis: int, dtype) -> None:
    """Compare ``fastsce.<name>(*args, axis)`` = ``got`` with the reference."""
    if name == "softmax":
        assert_close_softmax(got, ref.softmax(args[0], axis), dtype)
    elif name == "log_softmax":
        assert_close_log(got, ref.log_softmax(args[0], axis), dtype)
    elif name == "logsumexp":
        assert_close_log(got, ref.logsumexp(args[0], axis), dtype)
    elif name == "softmax_backward":
        g, s = args
        assert_close_scaled(got, ref.softmax_backward(g, s, axis), softmax_backward_scale(g, s, axis), dtype)
    elif name == "log_softmax_backward":
        g, ls = args
        assert_close_scaled(
            got, ref.log_softmax_backward(g, ls, axis), log_softmax_backward_scale(g, ls, axis), dtype
        )
    elif name == "softmax_jacobian":
        s_last = np.moveaxis(ref.softmax(args[0], axis), axis, -1)
        assert_close_scaled(
            got, ref.softmax_jacobian(args[0], axis), jacobian_scale(s_last), dtype, JAC_RTOL[np.dtype(dtype)]
        )
    else:
        raise AssertionError(name)


def expected_shape(name: str, shape, axis: int, keepdims: bool = False) -> tuple:
    axis = axis % len(shape)
    if name == "logsumexp":
        if keepdims:
            return shape[:axis] + (1,) + shape[axis + 1 :]
        return shape[:axis] + shape[axis + 1 :]
    if name == "softmax_jacobian":
        rest = shape[:axis] + shape[axis + 1 :]
        return rest + (shape[axis], shape[axis])
    return tuple(shape)


def value_cases():
    for name in ALL:
        for shape in SHAPES + MORE_SHAPES:
            if name == "softmax_jacobian" and shape[-1] > 200:
                continue  # the (…, C, C) result and its reference get big
            for kind in KINDS:
                yield pytest.param(name, shape, kind, id=f"{name}-{'x'.join(map(str, shape))}-{kind}")


# ------------------------------------------------------------------------- values ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "shape", "kind"), list(value_cases()))
def test_values(name, shape, kind, dtype, rng):
    x = make_x(kind, shape, dtype, rng)
    args = make_inputs(name, x, -1, rng)
    got = fn(name)(*args)
    assert isinstance(got, np.ndarray)
    assert got.shape == expected_shape(name, shape, -1)
    check(name, got, args, -1, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", FORWARD)
def test_long_rows(name, dtype, rng):
    """Sums over 200 000 classes stay within §4 (several lanes or float64 sums)."""
    x = make_x("normal", (3, jit_or_pure(200_000, 20_000)), dtype, rng)  # pure Python: still ~80 sum blocks
    check(name, fn(name)(x), (x,), -1, dtype)
    xt = np.ascontiguousarray(x.T)  # classes strided: the column kernels
    check(name, fn(name)(xt, axis=0), (xt,), 0, dtype)


@pytest.mark.parametrize("shift", [0, 1, 7])
@pytest.mark.parametrize("name", SAME_SHAPE)
def test_columns_streamed_at_any_alignment(name, shift, rng):
    """axis=0 outputs of 16 MB and more are streamed from scratch tiles whose columns
    start on the output's cache lines: any alignment of ``out``, a last tile of any
    width, and nothing written outside ``out``."""
    shape = jit_or_pure((1000, 4203), (40, 203))  # 16.8 MB of float32 (pure Python: not streamed)
    args = make_inputs(name, make_x("normal", shape, np.float32, rng), 0, rng)
    buf = np.full(args[0].size + 16, 7.0, np.float32)
    out = buf[shift : shift + args[0].size].reshape(shape)
    assert fn(name)(*args, axis=0, out=out) is out
    check(name, out, args, 0, np.float32)
    assert (buf[:shift] == 7.0).all() and (buf[shift + args[0].size :] == 7.0).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("name", FORWARD + BACKWARD)
def test_columns_too_big_for_scratch(name, in_place, dtype, rng):
    """Column tiles bigger than COLUMN_SCRATCH_MAX_BYTES (16 columns of 131k float32
    classes, half that for the backward's two tiles) are computed where they lie, in
    ``out`` (or read in place)."""
    from fastsce._kernels.softmax import COLUMN_SCRATCH_MAX_BYTES

    tiles = 2 if name in BACKWARD else 1
    n_classes = jit_or_pure(COLUMN_SCRATCH_MAX_BYTES // (16 * tiles * np.dtype(dtype).itemsize) + 1000, 2000)
    args = make_inputs(name, make_x("normal", (n_classes, 16), dtype, rng), 0, rng)
    if in_place and name != "logsumexp":
        got = args[0].copy()
        assert fn(name)(got, *args[1:], axis=0, out=got) is got
    else:
        got = fn(name)(*args, axis=0)
    check(name, got, args, 0, dtype)


@pytest.fixture(params=["row per task", "rows split"])
def short_segments(monkeypatch, request):
    """Rows of more than 32 bytes take the long-row kernels, in segments of 16 float32
    (8 float64) elements, each row computed by one task or split across threads in
    chunks of two segments; returns the names of the kernels launched, and checks after
    the test that rows were split (the kernel's last argument) exactly when asked."""
    module = sys.modules["fastsce.softmax"]  # the module, not the function of that name
    split = request.param == "rows split"
    tiny_long_rows(monkeypatch, split=split)
    launched = []
    splits = []
    launch = module._launch

    def recorded(name, *args):
        launched.append(name)
        if name == "forward_long_rows":
            splits.append(args[-1] > 0)  # chunk_segments
        elif name.startswith("logsumexp"):
            splits.append(name == "logsumexp_split_rows")
        return launch(name, *args)

    monkeypatch.setattr(module, "_launch", recorded)
    yield launched
    assert splits and all(s == split for s in splits), (launched, splits)


def _segmented_rows(dtype, rng) -> np.ndarray:
    """101 classes (7 segments of 16 float32, the last ragged), rows whose segments
    disagree: the max far above the first segments (their sums are rescaled), leading
    all -inf segments, all -inf, NaN or +inf in a later segment, the max in the first
    segment, two halves 200 apart, all equal, plain."""
    x = make_x("normal", (9, 101), dtype, rng)
    x[0, 90] = 60.0
    x[1, :50] = -np.inf
    x[2] = -np.inf
    x[3, 77] = np.nan
    x[4, 99] = np.inf
    x[5, 0] = 40.0
    x[6, :50], x[6, 50:] = -100.0, 100.0
    x[7] = 1.5
    return x


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_long_rows_segment_by_segment(short_segments, name, dtype, rng):
    """The long-row kernels (rows reduced a segment at a time, online-softmax merges, then
    written a segment at a time) against the reference, in place and into a strided out."""
    x = _segmented_rows(dtype, rng)
    got = fn(name)(x)
    check(name, got, (x,), -1, dtype)
    assert np.isnan(got[[2, 3, 4]]).all() and not np.isnan(got[[0, 1, 5, 6, 7, 8]]).any()
    y = x.copy()
    assert fn(name)(y, out=y) is y
    np.testing.assert_array_equal(y, got)  # in place: the same kernel, bit for bit
    wide = np.zeros((9, 105), dtype)
    fn(name)(x, out=wide[:, 3:104])
    np.testing.assert_array_equal(wide[:, 3:104], got)
    assert not wide[:, :3].any() and not wide[:, 104:].any()
    assert short_segments == ["forward_long_rows"] * 3


@pytest.mark.parametrize(("dtype", "depth"), [(np.float32, 90.0), (np.float64, 735.0)], ids=["f32", "f64"])
def test_long_rows_far_below_the_max_round_once(short_segments, dtype, depth):
    """Long softmax rows keep each segment's exps (relative to the segment's own max) and
    rescale them: segments ``depth`` below the row max have subnormal probabilities,
    whose rescaling factor is itself below the normal range; they must still be correct
    to a few units of the subnormal spacing, not flushed or garbled."""
    rng = np.random.default_rng(11)
    x = rng.uniform(-1.0, 0.0, (3, 101)).astype(dtype)
    x[0, :16] -= depth  # the first segment (16 float32 / 8 float64 elements: one or two)
    x[1, 40:60] -= depth + 20.0  # deeper still: underflows to 0 or the smallest subnormals
    x[2, 80:] -= depth / 2  # a normal-range factor, for contrast
    got = fastsce.softmax(x)
    expected = ref.softmax(x.astype(np.float64), -1)
    ulps = np.abs(got.astype(np.float64) - expected) / np.spacing(expected.astype(dtype)).astype(np.float64)
    assert ulps.max() <= 4, (np.unravel_index(ulps.argmax(), ulps.shape), ulps.max())
    assert (got[0, :16] > 0).all() and (got[0, :16] < np.finfo(dtype).tiny).all()  # subnormal, not flushed
    assert short_segments == ["forward_long_rows"]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
def test_logsumexp_of_long_rows(short_segments, dtype, rng):
    """Rows of megabytes take logsumexp_split_rows (chunks merged by online-softmax
    rescaling), others logsumexp_rows; both against the reference."""
    x = _segmented_rows(dtype, rng)
    got = fastsce.logsumexp(x)
    assert_close_log(got, ref.logsumexp(x.astype(np.float64), -1), dtype)  # NaN and inf rows included
    with fastsce.threads(1):
        np.testing.assert_array_equal(fastsce.logsumexp(x), got)


@needs_two_threads
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_long_rows_same_bits_for_every_thread_count(short_segments, name, rng):
    """Split rows merge their chunks in chunk order: one thread or two, the same bits."""
    x = _segmented_rows(np.float32, rng)
    results = []
    for n_threads in (1, 2):
        with fastsce.threads(n_threads):
            results.append(fn(name)(x))
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_long_rows_segment_by_segment_16_bit(short_segments, name, half):
    """16-bit long rows: decoded a segment at a time, the float32 results rounded once."""
    ml_dtypes = pytest.importorskip("ml_dtypes") if half == "bfloat16" else None
    dtype = np.dtype(ml_dtypes.bfloat16) if ml_dtypes else np.dtype(np.float16)
    x = _segmented_rows(np.float32, np.random.default_rng(5)).astype(dtype)
    got = fn(name)(x)
    assert got.dtype == dtype
    want = fn(name)(x.astype(np.float32)).astype(dtype)
    np.testing.assert_array_equal(got.view(np.uint16)[~np.isnan(want)], want.view(np.uint16)[~np.isnan(want)])
    assert np.array_equal(np.isnan(got.astype(np.float32)), np.isnan(want.astype(np.float32)))
    assert short_segments == ["forward_long_rows"] * 2


@pytest.mark.parametrize("name", ALL)
def test_one_dimensional(name, rng):
    x = make_x("normal", (9,), np.float64, rng)
    args = make_inputs(name, x, -1, rng)
    got = fn(name)(*args)
    if name == "logsumexp":
        assert type(got) is float
        assert_close_log(np.float64(got), ref.logsumexp(x), np.float64)
    else:
        assert got.shape == expected_shape(name, x.shape, -1)
        check(name, got, args, -1, np.float64)


@pytest.mark.parametrize("name", ("softmax", "log_softmax", "logsumexp", "softmax_jacobian"))
def test_list_input(name):
    x = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
    got = fn(name)(x)
    assert got.dtype == np.float64
    check(name, got, (np.array(x),), -1, np.float64)


# --------------------------------------------------------------- axes and layouts ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2, -3])
@pytest.mark.parametrize("name", ALL)
def test_axes_3d(name, axis, dtype, rng):
    x = make_x("normal", (4, 5, 6), dtype, rng)
    args = make_inputs(name, x, axis, rng)
    got = fn(name)(*args, axis=axis)
    assert got.shape == expected_shape(name, x.shape, axis)
    check(name, got, args, axis, dtype)


VIEWS_3D = {
    "F": lambda a: np.asfortranarray(a[:4, :5, :6]),
    "mid_reversed_last_step2": lambda a: a[:4, ::-1, ::2],
    "first_step2_last_reversed": lambda a: a[::2, :5, ::-1],
    "all_reversed_step2": lambda a: a[::-2, ::-2, ::-2],
}


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("view", list(VIEWS_3D))
@pytest.mark.parametrize("name", ALL)
def test_layouts_3d(name, view, axis, rng):
    base = make_x("normal", (8, 10, 12), np.float64, rng)
    args = tuple(VIEWS_3D[view](a) for a in make_inputs(name, base, axis, rng))
    got = fn(name)(*args, axis=axis)
    assert got.shape == expected_shape(name, args[0].shape, axis)
    check(name, got, args, axis, np.float64)


@pytest.mark.parametrize("axis", [0, 1, -1, -2])
@pytest.mark.parametrize("name", ALL)
def test_axes_3d_transposed_views(name, axis, rng):
    """A transposed view: no axis is contiguous in the order the wrapper sees."""
    x = make_x("normal", (6, 5, 4), np.float32, rng).transpose(2, 0, 1)  # (4, 6, 5) view
    # The same values, each laid out as a transposed view like `x`.
    args = tuple(
        np.ascontiguousarray(a.transpose(1, 2, 0)).transpose(2, 0, 1) for a in make_inputs(name, x, axis, rng)
    )
    assert not args[0].flags.c_contiguous and not args[0].flags.f_contiguous
    got = fn(name)(*args, axis=axis)
    check(name, got, args, axis, np.float32)


LAYOUTS = {
    "C": lambda a: a,
    "F": np.asfortranarray,
    "cols_step2": lambda a: a[:, ::2],
    "rows_step3": lambda a: a[::3],
    "rows_reversed": lambda a: a[::-1],
    "cols_reversed": lambda a: a[:, ::-1],
    "both_reversed_strided": lambda a: a[::-2, ::-3],
    "F_view_of_slice": lambda a: np.asfortranarray(a)[1:-1, 2:],
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", ALL)
def test_layouts_readonly_unmodified(name, layout, axis, dtype, rng):
    """Any memory layout, read-only inputs, and inputs left unchanged."""
    base = make_x("normal", (12, 24), dtype, rng)
    args = tuple(LAYOUTS[layout](a) for a in make_inputs(name, base, axis, rng))
    for a in args:
        a.flags.writeable = False
    before = [a.copy() for a in args]
    got = fn(name)(*args, axis=axis)
    for a, b in zip(args, before):
        assert np.array_equal(a, b, equal_nan=True), "input modified"
        assert not np.shares_memory(got, a), "result shares memory with an input"
    check(name, got, before, axis, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    ("shape", "axis"), [((7, 129), 0), ((2, 33, 257), 1), ((5, 1), 0), ((1, 5), 0), ((3, 2, 1000), 0)]
)
@pytest.mark.parametrize("name", ALL)
def test_class_axis_not_last(name, shape, axis, dtype, rng):
    """Classes strided, a contiguous inner axis of awkward lengths (tiling edges)."""
    if name == "softmax_jacobian" and np.prod(shape) * shape[axis] > 1_000_000:
        pytest.skip("result too big for a unit test")
    x = make_x("normal", shape, dtype, rng)
    args = make_inputs(name, x, axis, rng)
    got = fn(name)(*args, axis=axis)
    assert got.shape == expected_shape(name, shape, axis)
    check(name, got, args, axis, dtype)


@pytest.mark.parametrize("byteorder", [">", "<"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", ALL)
def test_non_native_byte_order(name, dtype, byteorder, rng):
    """Big-endian input (anything np.asarray accepts): right values, float result."""
    x = make_x("normal", (4, 9), dtype, rng)
    args = make_inputs(name, x, -1, rng)
    swapped = tuple(a.astype(np.dtype(dtype).newbyteorder(byteorder)) for a in args)
    got = fn(name)(*swapped)
    assert got.dtype.newbyteorder("=") == np.dtype(dtype)
    check(name, got.astype(dtype), args, -1, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", ALL)
def test_unaligned_input(name, dtype, rng):
    """A buffer at an odd byte offset: an unaligned (but valid) NumPy array."""
    x = make_x("normal", (5, 6), dtype, rng)
    args = make_inputs(name, x, -1, rng)
    unaligned = []
    for a in args:
        raw = np.zeros(a.nbytes + 1, np.uint8)
        u = raw[1:].view(dtype).reshape(a.shape)
        u[...] = a
        assert not u.flags.aligned
        unaligned.append(u)
    got = fn(name)(*unaligned)
    check(name, got, args, -1, dtype)


@pytest.mark.parametrize("name", ALL)
def test_broadcast_view_input(name):
    """Zero strides (np.broadcast_to, read-only) are a valid layout too."""
    row = np.array([0.5, -1.0, 2.0, 3.0], dtype=np.float64)
    x = np.broadcast_to(row, (5, 4))
    args = (
        (x,)
        if name not in BACKWARD
        else (np.broadcast_to(row[::-1], (5, 4)), np.broadcast_to(row / 10, (5, 4)))
    )
    got = fn(name)(*args)
    check(name, got, tuple(np.array(a) for a in args), -1, np.float64)


# --------------------------------------------------------------------------- out= ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("name", WITH_OUT)
def test_out_written_and_returned(name, axis, dtype, rng):
    x = make_x("normal", (6, 9), dtype, rng)
    args = make_inputs(name, x, axis, rng)
    out = np.full(expected_shape(name, x.shape, axis), np.nan, dtype=dtype)
    got = fn(name)(*args, axis=axis, out=out)
    assert got is out
    check(name, out, args, axis, dtype)


@pytest.mark.parametrize("out_layout", ["F", "strided", "reversed", "unaligned"])
@pytest.mark.parametrize("name", WITH_OUT)
def test_out_any_layout(name, out_layout, rng):
    x = make_x("normal", (6, 9), np.float64, rng)
    args = make_inputs(name, x, -1, rng)
    shape = expected_shape(name, x.shape, -1)
    if out_layout == "F":
        out = np.asfortranarray(np.zeros(shape))
    elif out_layout == "strided":
        out = np.zeros(tuple(2 * n for n in shape))[(slice(None, None, 2),) * len(shape)]
    elif out_layout == "reversed":
        out = np.zeros(shape)[(slice(None, None, -1),) * len(shape)]
    else:
        out = np.zeros(int(np.prod(shape)) * 8 + 1, np.uint8)[1:].view(np.float64).reshape(shape)
        assert not out.flags.aligned
    got = fn(name)(*args, out=out)
    assert got is out
    check(name, out, args, -1, np.float64)


@pytest.mark.parametrize("name", WITH_OUT)
def test_out_wrong_shape(name, rng):
    x = make_x("normal", (6, 9), np.float64, rng)
    args = make_inputs(name, x, -1, rng)
    good = expected_shape(name, x.shape, -1)
    for shape in [good[:-1] + (good[-1] + 1,), good + (1,), (good[0] * good[-1],) if len(good) > 1 else (7,)]:
        with pytest.raises(ValueError):
            fn(name)(*args, out=np.empty(shape))


@pytest.mark.parametrize(
    ("in_dtype", "out_dtype"), [(np.float64, np.float32), (np.float32, np.float64), (np.float64, np.int64)]
)
@pytest.mark.parametrize("name", WITH_OUT)
def test_out_wrong_dtype(name, in_dtype, out_dtype, rng):
    x = make_x("normal", (6, 9), in_dtype, rng)
    args = make_inputs(name, x, -1, rng)
    out = np.zeros(expected_shape(name, x.shape, -1), dtype=out_dtype)
    with pytest.raises(TypeError):
        fn(name)(*args, out=out)


@pytest.mark.parametrize("name", WITH_OUT)
def test_out_not_an_array(name, rng):
    x = make_x("normal", (3, 4), np.float64, rng)
    args = make_inputs(name, x, -1, rng)
    with pytest.raises(TypeError):
        fn(name)(*args, out=np.zeros(expected_shape(name, x.shape, -1)).tolist())


@pytest.mark.parametrize("name", WITH_OUT)
def test_out_read_only(name, rng):
    x = make_x("normal", (3, 4), np.float64, rng)
    args = make_inputs(name, x, -1, rng)
    out = np.zeros(expected_shape(name, x.shape, -1))
    out.flags.writeable = False
    with pytest.raises(ValueError):
        fn(name)(*args, out=out)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize(("name", "which"), [(n, 0) for n in SAME_SHAPE] + [(n, 1) for n in BACKWARD])
def test_out_is_input(name, which, axis, order, rng):
    """``out`` is the input itself (in place); for backward either input."""
    x = make_x("normal", (7, 11), np.float32, rng)
    args = [np.array(a, order=order) for a in make_inputs(name, x, axis, rng)]
    before = tuple(a.copy() for a in args)
    got = fn(name)(*args, axis=axis, out=args[which])
    assert got is args[which]
    check(name, got, before, axis, np.float32)


@pytest.mark.parametrize("shift", ["row", "col", "row_and_col"])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("name", SAME_SHAPE)
def test_out_partially_overlapping_input(name, axis, shift, rng):
    """``out`` overlaps the first input shifted by a row and/or a column."""
    n, c = 9, 13
    dr = 1 if shift in ("row", "row_and_col") else 0
    dc = 1 if shift in ("col", "row_and_col") else 0
    buf = np.zeros((n + dr, c + dc))
    x_view = buf[:n, :c]
    out = buf[dr:, dc:]
    x = make_x("normal", (n, c), np.float64, rng)
    args = make_inputs(name, x, axis, rng)
    x_view[...] = args[0]
    call_args = (x_view,) + args[1:]
    got = fn(name)(*call_args, axis=axis, out=out)
    assert got is out
    check(name, out, args, axis, np.float64)


@pytest.mark.parametrize("view", ["transposed", "rows_reversed", "cols_reversed", "F_of_C"])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("name", SAME_SHAPE)
def test_out_same_memory_other_layout(name, view, axis, rng):
    """``out`` covers exactly the input's memory but maps indices differently."""
    n = 7
    x = make_x("normal", (n, n), np.float64, rng)
    args = make_inputs(name, x, axis, rng)
    buf = args[0].copy()
    if view == "transposed":
        out = buf.T
    elif view == "rows_reversed":
        out = buf[::-1]
    elif view == "cols_reversed":
        out = buf[:, ::-1]
    else:  # the same bytes read as a Fortran array
        out = np.ndarray((n, n), buf.dtype, buffer=buf, order="F")
    got = fn(name)(buf, *args[1:], axis=axis, out=out)
    assert got is out
    check(name, out, args, axis, np.float64)


@pytest.mark.parametrize(
    ("axis", "out_view"), [(-1, "row0"), (-1, "col2"), (0, "row0"), (0, "col2"), (-1, "diag")]
)
def test_logsumexp_out_inside_input(axis, out_view, rng):
    """``out`` is a row, column or diagonal of the input being reduced."""
    x = make_x("normal", (6, 6), np.float64, rng)
    buf = x.copy()
    if out_view == "row0":
        out = buf[0]
    elif out_view == "col2":
        out = buf[:, 2]
    else:
        out = np.lib.stride_tricks.as_strided(buf, shape=(6,), strides=(7 * 8,))
    assert fastsce.logsumexp(buf, axis=axis, out=out) is out
    check("logsumexp", out, (x,), axis, np.float64)


@pytest.mark.parametrize("name", BACKWARD)
def test_out_overlaps_second_input(name, rng):
    n, c = 8, 10
    x = make_x("normal", (n, c), np.float64, rng)
    g, o = make_inputs(name, x, -1, rng)
    buf = np.zeros((n + 1, c))
    buf[1:] = o
    got = fn(name)(g, buf[1:], out=buf[:-1])
    check(name, got, (g, o), -1, np.float64)


# ------------------------------------------------------------------------- dtype= ----
@pytest.mark.parametrize("name", WITH_DTYPE)
@pytest.mark.parametrize(
    ("in_dtype", "dtype"),
    [
        (np.float32, np.float64),
        (np.float64, np.float32),
        (np.float32, np.float32),
        (np.int64, np.float32),
        (np.int16, np.float64),
        (np.bool_, np.float32),
        (np.float64, "float32"),
        (np.float32, np.dtype("float64")),
    ],
)
def test_dtype_argument(name, in_dtype, dtype, rng):
    """The input is cast to ``dtype`` first, then computed in that dtype (torch)."""
    x = (10 * rng.standard_normal((5, 12))).astype(in_dtype)
    got = fn(name)(x, dtype=dtype)
    assert got.dtype == np.dtype(dtype)
    check(name, got, (x.astype(dtype),), -1, dtype)


@pytest.mark.parametrize("name", WITH_DTYPE)
def test_dtype_with_out(name, rng):
    x = make_x("normal", (4, 6), np.float32, rng)
    out = np.empty((4, 6), np.float64)
    assert fn(name)(x, dtype=np.float64, out=out) is out
    check(name, out, (x,), -1, np.float64)
    with pytest.raises(TypeError):
        fn(name)(x, dtype=np.float64, out=np.empty((4, 6), np.float32))


@pytest.mark.parametrize("dtype", [np.longdouble, np.int64, np.complex128, object])
@pytest.mark.parametrize("name", WITH_DTYPE)
def test_dtype_argument_unsupported(name, dtype):
    with pytest.raises(TypeError):
        fn(name)(np.ones((2, 3)), dtype=dtype)


# ------------------------------------------------------------ dtype promotion ----
INT_DTYPES = [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64, np.bool_]


@pytest.mark.parametrize("in_dtype", INT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ALL)
def test_integer_and_bool_promote_to_float64(name, in_dtype, rng):
    x = rng.integers(0, 5, size=(4, 7)).astype(in_dtype)
    if name in BACKWARD:
        g = rng.integers(0, 4, size=(4, 7)).astype(in_dtype)
        o = ref.softmax(x) if name == "softmax_backward" else ref.log_softmax(x)
        args = (g, o)
    else:
        args = (x,)
    got = fn(name)(*args)
    assert got.dtype == np.float64
    check(name, got, tuple(a.astype(np.float64) for a in args), -1, np.float64)


def _bad_arrays():
    return {
        "longdouble": np.ones((2, 3), np.longdouble),
        "complex64": np.ones((2, 3), np.complex64),
        "complex128": np.ones((2, 3), np.complex128),
        "object": np.ones((2, 3), dtype=object),
        "str": np.array([["a", "b", "c"], ["d", "e", "f"]]),
        "bytes": np.array([[b"a", b"b", b"c"], [b"d", b"e", b"f"]]),
        "datetime": np.zeros((2, 3), dtype="datetime64[s]"),
    }


@pytest.mark.parametrize("kind", list(_bad_arrays()))
@pytest.mark.parametrize("name", ALL)
def test_unsupported_dtypes_raise_typeerror_naming_dtype(name, kind):
    bad = _bad_arrays()[kind]
    if name in BACKWARD:
        calls = [(bad, np.full((2, 3), 1 / 3)), (np.ones((2, 3)), bad)]
    else:
        calls = [(bad,)]
    for args in calls:
        with pytest.raises(TypeError) as info:
            fn(name)(*args)
        msg = str(info.value)
        dt = bad.dtype
        names = {str(dt), dt.name, dt.str, dt.str.lstrip("<>|=")}
        assert any(n in msg for n in names), f"message {msg!r} does not name the dtype {dt}"


# ------------------------------------------------------------------------- empty ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    ("shape", "axis"), [((0, 5), -1), ((0, 5), 0), ((3, 0), -1), ((3, 0), 0), ((2, 0, 4), 1), ((0,), 0)]
)
@pytest.mark.parametrize("name", ALL)
def test_empty(name, shape, axis, dtype):
    x = np.zeros(shape, dtype)
    args = (x,) if name not in BACKWARD else (x, x.copy())
    got = fn(name)(*args, axis=axis)
    if name == "logsumexp" and len(shape) == 1:
        assert type(got) is float and got == -math.inf
        return
    assert isinstance(got, np.ndarray)
    assert got.dtype == dtype
    assert got.shape == expected_shape(name, shape, axis)
    if name == "logsumexp":
        if shape[axis] == 0:
            assert np.all(got == -np.inf)  # log of an empty sum
    else:
        assert got.size == 0


@pytest.mark.parametrize("name", WITH_OUT)
def test_empty_with_out(name):
    x = np.zeros((0, 5))
    args = (x,) if name not in BACKWARD else (x, x.copy())
    out = np.zeros(expected_shape(name, x.shape, -1))
    assert fn(name)(*args, out=out) is out


# ---------------------------------------------------------------------- stability ----
STABLE_ROWS = {
    np.float32: [
        [1e30, 0.0],
        [3e38, -3e38],
        [-3e38, 3e38, 0.0],
        [3.4028235e38, 3.4028235e38],
        [-3.4028235e38, -3.4028235e38, -3.4028235e38],
        [1000.0, 0.0, -1000.0],
        [88.8, 88.8, 88.8],
        [-104.0, -104.0],
        [-1e30, -1e30],
        [1e4, 1e4 - 1, 1e4 - 2],
        [1e-40, -1e-40, 0.0],  # subnormal inputs
        [90.0, 0.0],  # exp(90) overflows float32 without max subtraction
    ],
    np.float64: [
        [1e30, 0.0],
        [1e308, -1e308],
        [-1.7e308, 1.7e308, 0.0],
        [1.7976931348623157e308, 1.7976931348623157e308],
        [-1.7976931348623157e308, -1.7976931348623157e308],
        [1000.0, 0.0, -1000.0],
        [710.0, 710.0],
        [-746.0, -746.0],
        [-1e300, -1e300],
        [1e15, 1e15 - 1, 1e15 - 2],
        [5e-324, -5e-324, 0.0],
    ],
}


STABLE_CASES = [
    pytest.param(dtype, row, id=f"{np.dtype(dtype).name}-{row}")
    for dtype in FLOAT_DTYPES
    for row in STABLE_ROWS[dtype]
]


@pytest.mark.parametrize(("dtype", "row"), STABLE_CASES)
@pytest.mark.parametrize("name", FORWARD)
def test_no_overflow_for_finite_input(name, dtype, row):
    x = np.array([row, row[::-1]], dtype=dtype)
    got = fn(name)(x)
    check(name, got, (x,), -1, dtype)
    if name == "softmax":
        assert np.all(np.isfinite(got)), f"{row}: {got}"
        np.testing.assert_allclose(got.astype(np.float64).sum(axis=-1), 1.0, rtol=1e-5)
    elif name == "logsumexp":
        assert np.all(np.isfinite(got)), f"{row}: {got}"
    else:
        assert not np.any(np.isnan(got)) and not np.any(got == np.inf), f"{row}: {got}"
    # axis 0 takes the other kernel
    xt = np.ascontiguousarray(x.T)
    check(name, fn(name)(xt, axis=0), (xt,), 0, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("c", [4, 1000])
def test_minus_inf_entries(c, dtype, rng):
    x = make_x("normal", (3, c), dtype, rng)
    x[0, 1] = -np.inf
    x[1, ::3] = -np.inf
    x[2, :-1] = -np.inf  # a single finite entry
    for axis, xx in ((-1, x), (0, np.ascontiguousarray(x.T))):
        s = fastsce.softmax(xx, axis=axis)
        ls = fastsce.log_softmax(xx, axis=axis)
        mask = np.isneginf(xx)
        assert np.all(s[mask] == 0.0)
        assert np.all(ls[mask] == -np.inf)
        assert not np.isnan(s).any() and not np.isnan(ls).any()
        check("softmax", s, (xx,), axis, dtype)
        check("log_softmax", ls, (xx,), axis, dtype)
        check("logsumexp", fastsce.logsumexp(xx, axis=axis), (xx,), axis, dtype)


def _bad_rows(c: int, dtype, rng) -> np.ndarray:
    """Rows: ok, all -inf, a NaN, a +inf, +inf and -inf, NaN and +inf, +inf twice, ok."""
    x = make_x("normal", (8, c), dtype, rng)
    j = c // 2 + 1 if c > 2 else 1
    x[1] = -np.inf
    x[2, j] = np.nan
    x[3, j] = np.inf
    x[4, 0], x[4, j] = np.inf, -np.inf
    x[5, 0], x[5, j] = np.nan, np.inf
    x[6, 0], x[6, j] = np.inf, np.inf
    return x


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("c", [3, 37, 1000])
@pytest.mark.parametrize("axis", [-1, 0])
def test_bad_rows_are_nan_only_in_that_row(axis, c, dtype, rng):
    x = _bad_rows(c, dtype, rng)
    xx = x if axis == -1 else np.ascontiguousarray(x.T)
    for name in ("softmax", "log_softmax"):
        got = fn(name)(xx, axis=axis)
        rows = got if axis == -1 else got.T
        assert np.all(np.isnan(rows[1:7])), f"{name}: bad rows not all NaN: {rows[1:7]}"
        assert not np.isnan(rows[[0, 7]]).any()
        check(name, got, (xx,), axis, dtype)  # the reference agrees, good rows accurate
    lse = fastsce.logsumexp(xx, axis=axis)
    expected = [None, -np.inf, np.nan, np.inf, np.inf, np.nan, np.inf, None]
    for i, e in enumerate(expected):
        if e is None:
            assert np.isfinite(lse[i])
        elif np.isnan(e):
            assert np.isnan(lse[i]), f"row {i}: {lse[i]}"
        else:
            assert lse[i] == e, f"row {i}: {lse[i]} != {e}"
    check("logsumexp", lse, (xx,), axis, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
def test_logsumexp_torch_special_values_1d(dtype):
    cases = [
        ([-np.inf, -np.inf], -np.inf),
        ([-np.inf], -np.inf),
        ([np.inf, 0.0], np.inf),
        ([np.inf, -np.inf], np.inf),
        ([np.inf, np.inf], np.inf),
        ([np.nan, 0.0], np.nan),
        ([np.nan, np.inf], np.nan),
        ([0.0, np.nan, -np.inf], np.nan),
        ([0.0, -np.inf], 0.0),
    ]
    for row, e in cases:
        got = fastsce.logsumexp(np.array(row, dtype))
        assert type(got) is float
        if np.isnan(e):
            assert math.isnan(got), (row, got)
        else:
            assert got == e, (row, got)


# ---------------------------------------------------------------------- logsumexp ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2])
def test_logsumexp_keepdims(axis, dtype, rng):
    x = make_x("normal", (3, 4, 5), dtype, rng)
    got = fastsce.logsumexp(x, axis=axis, keepdims=True)
    assert got.shape == expected_shape("logsumexp", x.shape, axis, keepdims=True)
    assert_close_log(got, ref.logsumexp(x, axis, keepdims=True), dtype)
    out = np.empty(got.shape, dtype)
    assert fastsce.logsumexp(x, axis=axis, keepdims=True, out=out) is out
    assert np.array_equal(out, got)
    with pytest.raises(ValueError):  # a keepdims=False shape is not a keepdims=True one
        fastsce.logsumexp(
            x, axis=axis, keepdims=True, out=np.empty(expected_shape("logsumexp", x.shape, axis), dtype)
        )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
def test_logsumexp_1d_returns_python_float(dtype, rng):
    x = make_x("normal", (50,), dtype, rng)
    got = fastsce.logsumexp(x)
    assert type(got) is float
    assert_close_log(np.asarray(got, dtype), ref.logsumexp(x), dtype)
    kept = fastsce.logsumexp(x, keepdims=True)
    assert isinstance(kept, np.ndarray) and kept.shape == (1,) and kept.dtype == dtype
    assert float(kept[0]) == got
    assert type(fastsce.logsumexp(x, axis=0)) is float


def test_logsumexp_matches_scipy_when_available(rng):
    special = pytest.importorskip("scipy.special")
    x = make_x("normal", (6, 30), np.float64, rng)
    for axis in (0, 1):
        np.testing.assert_allclose(
            fastsce.logsumexp(x, axis=axis), special.logsumexp(x, axis=axis), rtol=1e-13
        )


# ----------------------------------------------------------------------- backward ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(("shape", "axis"), [((5, 10), -1), ((5, 10), 0), ((3, 4, 17), 1), ((2, 60), -1)])
def test_softmax_backward_is_jacobian_vector_product(shape, axis, dtype, rng):
    """VJP = J·g because J is symmetric; J from fastsce and from the reference."""
    x = make_x("normal", shape, dtype, rng)
    g = rng.standard_normal(shape).astype(dtype)
    s = fastsce.softmax(x, axis=axis)
    got = fastsce.softmax_backward(g, s, axis=axis)
    s_exact = ref.softmax(x, axis)
    scale = softmax_backward_scale(g, s_exact, axis)
    jvp_rtol = 2.5 * LINEAR_RTOL[np.dtype(dtype)] + SCALED_RTOL[np.dtype(dtype)]
    assert_close_scaled(got, ref.jvp_via_jacobian(x, g, axis), scale, dtype, jvp_rtol)
    jac = fastsce.softmax_jacobian(x, axis=axis).astype(np.float64)
    jac_gv = np.einsum("...ij,...j->...i", jac, np.moveaxis(g.astype(np.float64), axis, -1))
    assert_close_scaled(
        got, np.moveaxis(jac_gv, -1, axis), scale, dtype, jvp_rtol + JAC_RTOL[np.dtype(dtype)]
    )
    assert np.allclose(jac, np.swapaxes(jac, -1, -2), rtol=0, atol=1e-6 if dtype == np.float32 else 1e-15)


@pytest.mark.parametrize("name", BACKWARD)
def test_backward_keywords(name, rng):
    x = make_x("normal", (3, 5), np.float64, rng)
    g, o = make_inputs(name, x, -1, rng)
    got = fn(name)(grad_output=g, output=o, axis=-1)
    check(name, got, (g, o), -1, np.float64)


@pytest.mark.parametrize(
    ("g_shape", "o_shape"),
    [((3, 5), (3, 4)), ((3, 5), (5, 3)), ((3, 5), (5,)), ((3, 5), (1, 5)), ((2, 3, 5), (3, 5))],
)
@pytest.mark.parametrize("name", BACKWARD)
def test_backward_shape_mismatch(name, g_shape, o_shape):
    with pytest.raises(ValueError):
        fn(name)(np.ones(g_shape), np.full(o_shape, 0.2))
    with pytest.raises(ValueError):
        fn(name)(np.ones(o_shape), np.full(g_shape, 0.2))


def test_log_softmax_backward_is_gradient_of_sum(rng):
    """Σ_j g_j · log_softmax(x)_j: its gradient by finite differences (float64)."""
    x = make_x("normal", (2, 6), np.float64, rng)
    g = rng.standard_normal((2, 6))
    got = fastsce.log_softmax_backward(g, fastsce.log_softmax(x))
    h = 1e-6
    fd = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        fd[idx] = (np.sum(g * fastsce.log_softmax(xp)) - np.sum(g * fastsce.log_softmax(xm))) / (2 * h)
    np.testing.assert_allclose(got, fd, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------- jacobian ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    ("shape", "axis"), [((4,), 0), ((3, 5), -1), ((3, 5), 0), ((2, 3, 4), 1), ((2, 3, 4), -3)]
)
def test_softmax_jacobian_shape_and_values(shape, axis, dtype, rng):
    x = make_x("normal", shape, dtype, rng)
    got = fastsce.softmax_jacobian(x, axis=axis)
    c = shape[axis]
    rest = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
    assert got.shape == rest + (c, c)
    assert got.dtype == dtype
    check("softmax_jacobian", got, (x,), axis, dtype)
    # rows of the Jacobian sum to 0: softmax is shift invariant
    np.testing.assert_allclose(
        got.astype(np.float64).sum(axis=-1), 0.0, atol=1e-6 if dtype == np.float32 else 1e-14
    )


def test_softmax_jacobian_refuses_large_classes_before_allocating():
    x = np.zeros((1, 5000), np.float32)  # the result would take 100 MB
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            fastsce.softmax_jacobian(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value)
    assert peak < 20_000_000, f"peak traced allocation {peak} bytes before refusing"


def test_softmax_jacobian_refuses_too_many_elements():
    x = np.zeros((13_422, 100), np.float32)  # 13422·100·100 > 2**27 elements
    tracemalloc.start()
    try:
        with pytest.raises(ValueError):
            fastsce.softmax_jacobian(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000, f"peak traced allocation {peak} bytes before refusing"


def test_softmax_jacobian_refuses_along_any_axis():
    with pytest.raises(ValueError):
        fastsce.softmax_jacobian(np.zeros((5000, 1), np.float32), axis=0)


# --------------------------------------------------------------------------- axis ----
@pytest.mark.parametrize("axis", [2, -3, 100])
@pytest.mark.parametrize("name", ALL)
def test_axis_out_of_range(name, axis):
    x = np.full((3, 4), 0.25)
    args = (x,) if name not in BACKWARD else (x, x.copy())
    with pytest.raises(AxisError):
        fn(name)(*args, axis=axis)
    with pytest.raises(ValueError):  # AxisError is a ValueError
        fn(name)(*args, axis=axis)


@pytest.mark.parametrize("axis", [1.0, "1", [1], (1,), None])
@pytest.mark.parametrize("name", ALL)
def test_axis_not_an_int(name, axis):
    x = np.full((3, 4), 0.25)
    args = (x,) if name not in BACKWARD else (x, x.copy())
    with pytest.raises(TypeError):
        fn(name)(*args, axis=axis)


@pytest.mark.parametrize("name", ALL)
def test_axis_numpy_integer(name, rng):
    x = make_x("normal", (3, 4), np.float64, rng)
    args = make_inputs(name, x, 0, rng)
    check(name, fn(name)(*args, axis=np.int64(0)), args, 0, np.float64)


def test_keyword_only_arguments():
    x = np.zeros((2, 3))
    with pytest.raises(TypeError):
        fastsce.softmax(x, -1, np.empty((2, 3)))
    with pytest.raises(TypeError):
        fastsce.logsumexp(x, -1, True)


# ------------------------------------------------------------------------ threads ----
MAX_THREADS = numba.config.NUMBA_NUM_THREADS


@pytest.fixture
def restore_threads():
    before = fastsce.get_num_threads()
    yield before
    fastsce.set_num_threads(before)


def test_get_set_num_threads(restore_threads):
    n = fastsce.get_num_threads()
    assert type(n) is int and 1 <= n <= MAX_THREADS
    fastsce.set_num_threads(1)
    assert fastsce.get_num_threads() == 1
    fastsce.set_num_threads(MAX_THREADS)
    assert fastsce.get_num_threads() == MAX_THREADS


@pytest.mark.parametrize("bad", [0, -1, MAX_THREADS + 1])
def test_set_num_threads_bad_value(bad, restore_threads):
    with pytest.raises(ValueError):
        fastsce.set_num_threads(bad)
    assert fastsce.get_num_threads() == restore_threads
    with pytest.raises(ValueError), fastsce.threads(bad):
        pass
    assert fastsce.get_num_threads() == restore_threads


@pytest.mark.parametrize("bad", [1.0, "2", None, True])
def test_set_num_threads_bad_type(bad, restore_threads):
    with pytest.raises(TypeError):
        fastsce.set_num_threads(bad)
    with pytest.raises(TypeError), fastsce.threads(bad):
        pass
    assert fastsce.get_num_threads() == restore_threads


@needs_two_threads
def test_threads_context_restores(restore_threads):
    fastsce.set_num_threads(2)
    with fastsce.threads(1):
        assert fastsce.get_num_threads() == 1
        with fastsce.threads(2):
            assert fastsce.get_num_threads() == 2
        assert fastsce.get_num_threads() == 1
    assert fastsce.get_num_threads() == 2
    with pytest.raises(RuntimeError), fastsce.threads(1):
        assert fastsce.get_num_threads() == 1
        raise RuntimeError("boom")
    assert fastsce.get_num_threads() == 2


def _thread_cases():
    # pure Python (NUMBA_DISABLE_JIT=1): a tenth of the sizes, the same kinds of shape
    for shape in [jit_or_pure((300, 1000), (30, 1000)), jit_or_pure((8, 200_000), (2, 20_000))]:
        for axis in (-1, 0):
            for name in WITH_OUT:
                yield pytest.param(name, shape, axis, id=f"{name}-{shape[0]}x{shape[1]}-axis{axis}")
    huge = jit_or_pure(1_000_000, 100_000)
    for name in ("softmax", "log_softmax", "logsumexp"):  # one huge row
        yield pytest.param(name, (1, huge), -1, id=f"{name}-1x{huge}-axis-1")
    yield pytest.param("softmax_jacobian", (300, 30), -1, id="softmax_jacobian-300x30-axis-1")
    yield pytest.param("softmax_jacobian", (30, 300), 0, id="softmax_jacobian-30x300-axis0")


@needs_two_threads
@pytest.mark.parametrize(("name", "shape", "axis"), list(_thread_cases()))
def test_bitwise_identical_across_thread_counts(name, shape, axis, rng, restore_threads):
    x = make_x("normal", shape, np.float32, rng)
    args = make_inputs(name, x, axis, rng)
    with fastsce.threads(1):
        one = fn(name)(*args, axis=axis)
    with fastsce.threads(2):
        two = fn(name)(*args, axis=axis)
    assert one.dtype == two.dtype and one.shape == two.shape
    assert one.tobytes() == two.tobytes(), "results differ between 1 and 2 threads"


# --------------------------------------------------------------------- hypothesis ----
def _elements(dtype, bound):
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=np.dtype(dtype).itemsize * 8)


# float32 bound 30: `x - max` then rounds to within ulp(60)/2 ≈ 1.9e-6, inside §4's 4e-6.
BOUND = {np.float32: 30.0, np.float64: 300.0}
shapes_1_to_3 = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40)


@st.composite
def logits_and_axis(draw, dtype, bound=None):
    shape = draw(shapes_1_to_3)
    x = draw(hnp.arrays(dtype, shape, elements=_elements(dtype, bound or BOUND[dtype])))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    return x, axis


dtypes = st.sampled_from(FLOAT_DTYPES)


@given(data=st.data(), dtype=dtypes)
def test_property_rows_sum_to_one(data, dtype):
    x, axis = data.draw(logits_and_axis(dtype))
    s = fastsce.softmax(x, axis=axis)
    assert s.dtype == dtype and s.shape == x.shape
    assert np.all(s >= 0)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(s.astype(np.float64).sum(axis=axis), 1.0, rtol=0, atol=tol)


@given(data=st.data(), dtype=dtypes)
def test_property_shift_invariance(data, dtype):
    """softmax(x + c) = softmax(x) for per-row c; x on a 1/8 grid so x + c is exact."""
    shape = data.draw(shapes_1_to_3)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    k = data.draw(hnp.arrays(np.int32, shape, elements=st.integers(-240, 240)))
    c_shape = list(shape)
    c_shape[axis] = 1
    c = data.draw(hnp.arrays(np.int32, tuple(c_shape), elements=st.integers(-1000, 1000)))
    x = (k / 8.0).astype(dtype)
    shifted = (x + c).astype(dtype)
    assert np.array_equal(shifted - c, x)  # exact
    assert_close_softmax(fastsce.softmax(shifted, axis=axis), ref.softmax(x, axis), dtype)
    assert_close_log(fastsce.log_softmax(shifted, axis=axis), ref.log_softmax(x, axis), dtype)
    lse = np.asarray(fastsce.logsumexp(shifted, axis=axis), dtype=dtype)  # 1-D: a Python float
    assert_close_log(lse, ref.logsumexp(x, axis) + np.squeeze(c.astype(np.float64), axis), dtype)


@given(data=st.data(), dtype=dtypes)
def test_property_backward_is_jvp(data, dtype):
    x, axis = data.draw(logits_and_axis(dtype))
    g = data.draw(hnp.arrays(dtype, x.shape, elements=_elements(dtype, 10.0)))
    got = fastsce.softmax_backward(g, fastsce.softmax(x, axis=axis), axis=axis)
    scale = softmax_backward_scale(g, ref.softmax(x, axis), axis)
    rtol = 2.5 * LINEAR_RTOL[np.dtype(dtype)] + SCALED_RTOL[np.dtype(dtype)]
    assert_close_scaled(got, ref.jvp_via_jacobian(x, g, axis), scale, dtype, rtol)


@given(
    x=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=40),
        elements=_elements(np.float64, 30.0),
    ),
    data=st.data(),
)
def test_property_logsumexp_gradient_is_softmax(x, data):
    """Central differences of logsumexp (float64) give softmax."""
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    s = fastsce.softmax(x, axis=axis)
    flat = data.draw(st.lists(st.integers(0, x.size - 1), min_size=1, max_size=4, unique=True))
    h = 1e-4  # truncation ~h²/6 ≈ 2e-9; rounding ~ulp(34)/h ≈ 1e-10
    for f in flat:
        idx = np.unravel_index(f, x.shape)
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        row = tuple(i for d, i in enumerate(idx) if d != axis % x.ndim)
        fp = np.asarray(fastsce.logsumexp(xp, axis=axis))[row]
        fm = np.asarray(fastsce.logsumexp(xm, axis=axis))[row]
        dx = xp[idx] - xm[idx]  # the step actually taken
        assert abs((fp - fm) / dx - s[idx]) <= 1e-7, (idx, (fp - fm) / dx, s[idx])


LAYOUT_STRATEGY = st.sampled_from(["C", "F", "reversed", "strided"])


def _relayout(a: np.ndarray, how: str) -> np.ndarray:
    """The same values in another memory layout."""
    if how == "F":
        return np.asfortranarray(a)
    if how == "reversed":
        return np.flip(np.flip(a).copy())
    if how == "strided":
        buf = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        buf[..., ::2] = a
        return buf[..., ::2]
    return a


@given(data=st.data(), dtype=dtypes, name=st.sampled_from(ALL), layout=LAYOUT_STRATEGY)
def test_property_matches_reference(data, dtype, name, layout):
    x, axis = data.draw(logits_and_axis(dtype))
    if name == "softmax_jacobian":  # keep at most 4 rows per leading axis: (…, C, C) grows fast
        x = x[tuple(slice(None) if d == axis % x.ndim else slice(0, 4) for d in range(x.ndim))]
    if name in BACKWARD:
        g = data.draw(hnp.arrays(dtype, x.shape, elements=_elements(dtype, 10.0)))
        with np.errstate(over="ignore"):
            o = (ref.softmax if name == "softmax_backward" else ref.log_softmax)(x, axis).astype(dtype)
        args = (g, o)
    else:
        args = (x,)
    called = tuple(_relayout(a, layout) for a in args)
    got = fn(name)(*called, axis=axis)
    if name == "logsumexp" and x.ndim == 1:
        assert type(got) is float
        assert_close_log(np.asarray(got, dtype), ref.logsumexp(x, axis), dtype)
    else:
        check(name, got, args, axis, dtype)


@given(data=st.data(), dtype=dtypes)
def test_property_no_overflow_for_any_finite_input(data, dtype):
    """Full-range finite logits: probabilities finite and summing to 1, log-probs <= 0."""
    shape = data.draw(shapes_1_to_3)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    width = np.dtype(dtype).itemsize * 8
    x = data.draw(
        hnp.arrays(dtype, shape, elements=st.floats(allow_nan=False, allow_infinity=False, width=width))
    )
    s = fastsce.softmax(x, axis=axis)
    assert np.all(np.isfinite(s)) and np.all(s >= 0)
    np.testing.assert_allclose(s.astype(np.float64).sum(axis=axis), 1.0, rtol=0, atol=1e-5)
    ls = fastsce.log_softmax(x, axis=axis)
    assert not np.isnan(ls).any() and np.all(ls <= 0)
    assert np.all(np.max(ls, axis=axis) > -np.log(x.shape[axis]) - 1e-3)  # the max entry's log-prob
    lse = np.asarray(fastsce.logsumexp(x, axis=axis))
    assert np.all(np.isfinite(lse))
    assert_close_softmax(s, ref.softmax(x, axis), dtype)


# ------------------------------------------------------ small-class row tiles ----
def _several_tiles(n_classes: int) -> int:
    """Rows spanning three small-class tiles, the last one ragged."""
    from fastsce._kernels.softmax import TILE_ELEMENTS

    return 2 * max(16, TILE_ELEMENTS // n_classes // 16 * 16) + 37


@pytest.mark.parametrize("n_classes", [1, 2, 10, 63])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_small_classes_across_tiles(n_classes, dtype):
    """Rows of few classes go through (classes, rows) tiles: several tiles and a ragged
    last one, rows with NaN/inf and widely different maxima, in place and not."""
    rng = np.random.default_rng(n_classes)
    x = (rng.standard_normal((_several_tiles(n_classes), n_classes)) * 30).astype(dtype)
    x[5] += 1e4  # a row whose max is far from its neighbours'
    x[7, 0] = np.nan
    x[9, -1] = np.inf
    x[11] = -np.inf
    with np.errstate(invalid="ignore"):
        assert_close_softmax(fastsce.softmax(x), ref.softmax(x), dtype)
        assert_close_log(fastsce.log_softmax(x), ref.log_softmax(x), dtype)
        assert_close_log(fastsce.logsumexp(x), ref.logsumexp(x), dtype)
        expected = fastsce.softmax(x)
    y = x.copy()
    assert fastsce.softmax(y, out=y) is y
    np.testing.assert_array_equal(y, expected)
