"""Every kind of bad input, and what each public function does with it (issue 9, item 3).

One test (parametrized over the public functions) per row of the README's table
"bad input → what it gets". Besides the documented outcome, every test checks the
promises that hold for all bad input: nothing crashes the interpreter, nothing outside
the arrays is read or written (arrays live inside NaN-filled guard buffers, so a stray
read shows up as a NaN result and a stray write as a changed guard), and no input is
modified unless ``inplace=True``.

The arrays-over-2**31-elements tests run in a subprocess on a read-only anonymous
mapping of 16 GiB of virtual memory (untouched pages are the kernel's shared zero page,
so it costs no RAM) with a data limit, so that an accidental full-size copy fails with
MemoryError instead of taking the machine's memory.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy.exceptions import AxisError

import fastsce
from tests import reference as ref
from tests.conftest import (
    assert_close_log,
    assert_close_scaled,
    assert_close_softmax,
    jacobian_scale,
    log_softmax_backward_scale,
    softmax_backward_scale,
)

ROOT = Path(__file__).resolve().parents[1]

SOFTMAX_FAMILY = (
    "softmax",
    "log_softmax",
    "logsumexp",
    "softmax_backward",
    "log_softmax_backward",
    "softmax_jacobian",
)
LOSSES = ("cross_entropy", "cross_entropy_with_grad", "nll_loss")
PUBLIC = SOFTMAX_FAMILY + LOSSES
WITH_OUT = (
    "softmax",
    "log_softmax",
    "logsumexp",
    "softmax_backward",
    "log_softmax_backward",
    "cross_entropy_with_grad",
)
WITH_TARGET = LOSSES
NOT_FUNCTIONS = {"get_num_threads", "set_num_threads", "threads"}
# hidden @ weight.T + bias → cross-entropy: no logits argument, no axis, no out=; the rows
# of the table that apply to them are tested in their own section below.
LINEAR = ("linear_cross_entropy", "linear_cross_entropy_with_grad")

# Tolerances of design.md §4; losses and gradients as tests/test_loss.py bounds them,
# with the loss bounded relative to the magnitude of its terms (it can be ~0).
LOSS_TOL = {np.dtype(np.float32): 4e-6, np.dtype(np.float64): 1e-12}
GRAD_RTOL = {np.dtype(np.float32): 4e-6, np.dtype(np.float64): 1e-12}
JAC_RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 2.5e-13}


# ------------------------------------------------------------------------ helpers ----
def fn(name):
    return getattr(fastsce, name)


def make_args(name: str, x: np.ndarray, axis: int = -1, rng=None, target=None) -> tuple:
    """Positional arguments of ``name`` whose first (logits-like) argument is ``x``."""
    rng = np.random.default_rng(5) if rng is None else rng
    dtype = x.dtype if x.dtype.kind == "f" and x.dtype.itemsize in (4, 8) else np.dtype(np.float64)
    if name == "softmax_backward":
        return x, ref.softmax(rng.standard_normal(x.shape), axis).astype(dtype)
    if name == "log_softmax_backward":
        return x, ref.log_softmax(rng.standard_normal(x.shape), axis).astype(dtype)
    if name in LOSSES:
        if target is None:
            a = axis % x.ndim
            shape = x.shape[:a] + x.shape[a + 1 :]
            target = (
                rng.integers(0, max(x.shape[a], 1), size=shape) if x.shape[a] else np.zeros(shape, np.int64)
            )
        return x, target
    return (x,)


def expected(name: str, args: tuple, axis: int, **options):
    """Reference result of ``name`` on ``args`` (float64)."""
    if name == "softmax":
        return ref.softmax(args[0], axis)
    if name == "log_softmax":
        return ref.log_softmax(args[0], axis)
    if name == "logsumexp":
        return ref.logsumexp(args[0], axis)
    if name == "softmax_backward":
        return ref.softmax_backward(args[0], args[1], axis)
    if name == "log_softmax_backward":
        return ref.log_softmax_backward(args[0], args[1], axis)
    if name == "softmax_jacobian":
        return ref.softmax_jacobian(args[0], axis)
    if name == "cross_entropy":
        return ref.cross_entropy_ref(args[0], args[1], axis=axis, **options)
    if name == "cross_entropy_with_grad":
        return (
            ref.cross_entropy_ref(args[0], args[1], axis=axis, **options),
            ref.cross_entropy_grad_ref(args[0], args[1], axis=axis, **options),
        )
    if name == "nll_loss":
        return ref.nll_loss_ref(args[0], args[1], axis=axis, **options)
    raise AssertionError(name)


def loss_condition(logits, target, axis, reduction="mean") -> np.ndarray | float:
    """Σ of the magnitudes of the per-row loss terms ``|lse| + |x_t|`` (+1), reduced."""
    x = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
    lse = np.abs(ref.logsumexp(x, -1))
    t = np.asarray(target)
    with np.errstate(invalid="ignore"):
        return _reduce_condition(x, t, lse, axis, reduction)


def _reduce_condition(x, t, lse, axis, reduction):
    if t.dtype.kind == "f":
        picked = np.sum(np.abs(np.moveaxis(t.astype(np.float64), axis, -1) * x), axis=-1)
    else:
        picked = np.abs(np.take_along_axis(x, np.clip(t, 0, max(x.shape[-1] - 1, 0))[..., None], -1)[..., 0])
    rows = np.where(np.isfinite(lse + picked), 1.0 + lse + picked, np.inf)
    if reduction == "none":
        return rows
    return float(np.sum(rows)) / (1 if reduction == "sum" else max(rows.size, 1))


def assert_loss(got, want, cond, dtype, reduction) -> None:
    tol = LOSS_TOL[np.dtype(dtype)]
    if reduction == "none":
        got = np.asarray(got)
        assert got.dtype == dtype and got.shape == np.shape(want), (got.dtype, got.shape, np.shape(want))
        want = np.asarray(want, np.float64)
        g64 = got.astype(np.float64)
        assert np.array_equal(np.isnan(g64), np.isnan(want)), (got, want)
        assert np.array_equal(np.isinf(g64), np.isinf(want)), (got, want)
        ok = np.isfinite(want)
        assert np.all(np.abs(g64[ok] - want[ok]) <= tol * np.asarray(cond)[ok]), (got, want)
    else:
        assert type(got) is float, type(got)
        if math.isnan(want):
            assert math.isnan(got), got
        else:
            assert abs(got - want) <= tol * cond, (got, want)


def assert_grad(got, want, dtype) -> None:
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.shape == want.shape, (
        type(got),
        getattr(got, "dtype", None),
        getattr(got, "shape", None),
        want.shape,
    )
    g64 = got.astype(np.float64)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(g64), nan), np.argwhere(np.isnan(g64) != nan)[:5]
    if nan.all():
        return
    scale = np.max(np.abs(want[~nan]))
    err = np.max(np.abs(g64[~nan] - want[~nan]))
    assert err <= GRAD_RTOL[np.dtype(dtype)] * scale + 1e-30, (err, scale)


def check_result(name: str, got, args: tuple, axis: int, dtype, **options) -> None:
    """``got`` (the result of ``fastsce.<name>(*args, axis=axis, **options)``) against
    the float64 reference within the design's tolerances."""
    dtype = np.dtype(dtype)
    want = expected(name, args, axis, **options)
    if name == "softmax":
        assert_close_softmax(got, want, dtype)
    elif name in ("log_softmax", "logsumexp"):
        assert_close_log(got, want, dtype)
    elif name == "softmax_backward":
        assert_close_scaled(got, want, softmax_backward_scale(args[0], args[1], axis), dtype)
    elif name == "log_softmax_backward":
        assert_close_scaled(got, want, log_softmax_backward_scale(args[0], args[1], axis), dtype)
    elif name == "softmax_jacobian":
        s_last = np.moveaxis(ref.softmax(args[0], axis), axis, -1)
        assert_close_scaled(got, want, jacobian_scale(s_last), dtype, JAC_RTOL[dtype])
    else:
        reduction = options.get("reduction", "mean")
        cond = loss_condition(args[0], args[1], axis, reduction)
        if name == "cross_entropy_with_grad":
            assert_loss(got[0], want[0], cond, dtype, reduction)
            assert_grad(got[1], want[1], dtype)
        else:
            assert_loss(got, want, cond, dtype, reduction)


def snapshot(*arrays) -> list[bytes]:
    """The bytes of each array's whole memory block (base buffer), NaN-exact."""
    return [bytes(np.asarray(a.base if isinstance(a.base, np.ndarray) else a).tobytes()) for a in arrays]


def guarded(shape, dtype, rng, layout: str = "C", scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """``(view, guard)``: random values in a view of ``shape`` and ``layout`` inside a
    NaN-filled buffer ``guard`` with NaN margins and NaN gaps between strided elements."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    pad = 64
    guard = np.full(3 * n + 2 * pad + 8, np.nan, dtype)
    region = guard[pad : pad + 3 * n]
    if layout == "C":
        view = region[:n].reshape(shape)
    elif layout == "F":
        view = region[:n].reshape(shape[::-1]).T
    elif layout == "strided":  # every third element along the last axis, gaps hold NaN
        view = region[: 3 * n].reshape(shape[:-1] + (3 * shape[-1],))[..., ::3]
    elif layout == "reversed":  # negative strides on every axis
        view = region[: 2 * n].reshape(shape[:-1] + (2 * shape[-1],))[..., ::2][
            tuple(slice(None, None, -1) for _ in shape)
        ]
    elif layout == "transposed_strided":  # Fortran-like and strided
        view = region[: 2 * n].reshape(shape[::-1][:-1] + (2 * shape[0],))[..., ::2].T
    else:
        raise AssertionError(layout)
    assert view.shape == tuple(shape)
    assert np.shares_memory(view, guard)
    view[...] = (scale * rng.standard_normal(shape)).astype(dtype)
    return view, guard


def expect_raises(exc, call, *match: str):
    """``call()`` raises ``exc`` whose message contains every string in ``match``."""
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for part in match:
        assert part in message, f"{exc.__name__} message {message!r} does not mention {part!r}"
    return info.value


# ------------------------------------------------------------------ the registry ----
def test_registry_covers_every_public_function():
    """Adding a public function without adding it here would leave it out of the table."""
    public = set(fastsce.__all__) - NOT_FUNCTIONS
    known = set(PUBLIC) | set(LINEAR)
    assert public == known, (
        f"public functions {sorted(public - known)} are not in tests/test_bad_input.py's registry; "
        f"registry names not public: {sorted(known - public)}"
    )


# ---------------------------------------------------------------- wrong dtypes ----
BAD_DTYPES = [np.complex64, np.complex128, "U3", "S3", "datetime64[s]", "timedelta64[s]", np.longdouble]


def _as_bad(x: np.ndarray, dtype) -> np.ndarray:
    if np.dtype(dtype).kind in "US":
        return x.astype(int).astype(dtype)
    if np.dtype(dtype).kind in "mM":
        return x.astype(np.int64).astype(dtype)
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", PUBLIC)
def test_wrong_dtype_raises_type_error_naming_it(name, dtype, rng):
    """complex, strings, datetimes, long double: TypeError naming the dtype (the
    logits-like argument; for the backward passes either argument). float16 and
    bfloat16 are supported (computed in float32: tests/test_16bit.py)."""
    if np.dtype(dtype) == np.dtype(np.float64):
        pytest.skip("long double is float64 on this platform")
    x = rng.standard_normal((3, 4))
    bad = _as_bad(x, dtype)
    args = make_args(name, x)
    expect_raises(TypeError, lambda: fn(name)(bad, *args[1:]), str(np.dtype(dtype)))
    if name in ("softmax_backward", "log_softmax_backward"):
        expect_raises(TypeError, lambda: fn(name)(args[0], _as_bad(args[1], dtype)), str(np.dtype(dtype)))


@pytest.mark.parametrize("dtype", [np.complex128, np.int64, object, "U3"], ids=str)
@pytest.mark.parametrize("name", ("softmax", "log_softmax"))
def test_wrong_dtype_argument_raises_type_error(name, dtype):
    """``dtype=`` accepts only float dtypes fastsce computes in: TypeError naming the dtype."""
    expect_raises(TypeError, lambda: fn(name)(np.zeros((2, 3)), dtype=dtype), str(np.dtype(dtype)))


@pytest.mark.parametrize("dtype", [np.bool_, np.complex64, "U3", object, "datetime64[s]"], ids=str)
@pytest.mark.parametrize("name", WITH_TARGET)
def test_wrong_target_dtype_raises_type_error_naming_it(name, dtype):
    """Targets must be integer class indices (or float probabilities for cross_entropy)."""
    x = np.zeros((3, 4))
    target = np.array([0, 1, 2]).astype(dtype)
    expect_raises(TypeError, lambda: fn(name)(x, target), str(np.dtype(dtype)))


@pytest.mark.parametrize("dtype", [np.complex128, object, "U3", np.bool_], ids=str)
@pytest.mark.parametrize("name", WITH_TARGET)
def test_wrong_weight_dtype_raises_type_error(name, dtype):
    x = np.zeros((3, 4))
    weight = np.ones(4).astype(dtype)
    expect_raises(TypeError, lambda: fn(name)(x, np.array([0, 1, 2]), weight=weight), str(np.dtype(dtype)))


@pytest.mark.parametrize("dtype", [np.int8, np.int64, np.uint16, np.bool_], ids=str)
@pytest.mark.parametrize("name", PUBLIC)
def test_integer_and_bool_logits_are_computed_in_float64(name, dtype, rng):
    """Not bad input: integer and bool inputs are promoted to float64 (design §1)."""
    x = rng.integers(0, 2 if dtype == np.bool_ else 5, size=(4, 6)).astype(dtype)
    args = make_args(name, x, rng=rng)
    got = fn(name)(*args)
    check_result(name, got, args, -1, np.float64)


# -------------------------------------------------------------- wrong ndim / axis ----
@pytest.mark.parametrize("name", PUBLIC)
def test_zero_dimensional_input_raises_value_error(name):
    """A 0-d array has no class axis: ValueError (numpy's AxisError, a ValueError, for
    the softmax family), never a crash or a scalar result."""
    x = np.array(1.5)
    args = (x, np.array(1.5)) if name.endswith("_backward") else (x, np.array(0)) if name in LOSSES else (x,)
    with pytest.raises(ValueError):
        fn(name)(*args)


@pytest.mark.parametrize("axis", [2, -3, 10])
@pytest.mark.parametrize("name", PUBLIC)
def test_axis_out_of_range_raises_axis_error(name, axis, rng):
    x = rng.standard_normal((3, 4))
    args = make_args(name, x, rng=rng)
    with pytest.raises(AxisError):
        fn(name)(*args, axis=axis)


@pytest.mark.parametrize("axis", [1.0, "1", None, True])
@pytest.mark.parametrize("name", PUBLIC)
def test_axis_not_an_int_raises_type_error(name, axis, rng):
    x = rng.standard_normal((3, 4))
    args = make_args(name, x, rng=rng)
    with pytest.raises(TypeError):
        fn(name)(*args, axis=axis)


@pytest.mark.parametrize("name", WITH_TARGET)
def test_one_dimensional_logits_are_one_row_with_0d_results(name, rng):
    """1-D logits are a single row: the target is 0-d, and the per-row results
    (reduction="none", return_lse, return_argmax) are 0-d like the target, as in torch
    (``F.cross_entropy(x[C], t[]), reduction="none"`` has shape ())."""
    x = rng.standard_normal(7)
    target = np.array(3)
    got = fn(name)(x, target, reduction="none")
    loss = got[0] if isinstance(got, tuple) else got
    assert np.shape(loss) == (), f"per-row loss of 1-D logits has shape {np.shape(loss)}, expected ()"
    check_result(name, got, (x, target), -1, np.float64, reduction="none")
    if name != "nll_loss":
        extras = fn(name)(x, target, reduction="none", return_lse=True, return_argmax=True)
        lse, argmax = extras[-2], extras[-1]
        assert np.shape(lse) == () and np.shape(argmax) == (), (np.shape(lse), np.shape(argmax))
        assert int(argmax) == int(np.argmax(x))
        assert abs(float(lse) - float(ref.logsumexp(x))) <= 1e-13 * (1 + abs(float(lse)))
    assert type(fn(name)(x, target) if name != "cross_entropy_with_grad" else fn(name)(x, target)[0]) is float


# ------------------------------------------------------------- mismatched shapes ----
@pytest.mark.parametrize("name", ("softmax_backward", "log_softmax_backward"))
def test_backward_mismatched_shapes_raise_value_error(name):
    g, s = np.zeros((3, 4)), np.full((3, 5), 0.2)
    expect_raises(ValueError, lambda: fn(name)(g, s), "(3, 4)", "(3, 5)")
    expect_raises(ValueError, lambda: fn(name)(np.zeros((4, 3)), np.zeros((3, 4))), "(4, 3)", "(3, 4)")


@pytest.mark.parametrize("target_shape", [(2,), (3, 1), (4,), ()])
@pytest.mark.parametrize("name", WITH_TARGET)
def test_target_shape_mismatch_raises_value_error(name, target_shape):
    x = np.zeros((3, 4))
    target = np.zeros(target_shape, np.int64)
    expect_raises(ValueError, lambda: fn(name)(x, target), str(target_shape), "(3,)")


@pytest.mark.parametrize("name", ("cross_entropy", "cross_entropy_with_grad"))
def test_probability_target_shape_mismatch_raises_value_error(name):
    x = np.zeros((3, 4))
    expect_raises(ValueError, lambda: fn(name)(x, np.full((3, 5), 0.2)), "(3, 4)", "(3, 5)")
    expect_raises(ValueError, lambda: fn(name)(x, np.full((4, 3), 0.25)), "(3, 4)", "(4, 3)")


@pytest.mark.parametrize("weight_shape", [(5,), (3,), (1, 4), ()])
@pytest.mark.parametrize("name", WITH_TARGET)
def test_weight_shape_mismatch_raises_value_error(name, weight_shape):
    x = np.zeros((3, 4))
    expect_raises(
        ValueError, lambda: fn(name)(x, np.array([0, 1, 2]), weight=np.ones(weight_shape)), str(weight_shape)
    )


def test_grad_output_shape_mismatch_raises_value_error():
    x = np.zeros((3, 4))
    t = np.array([0, 1, 2])
    f = fastsce.cross_entropy_with_grad
    expect_raises(ValueError, lambda: f(x, t, reduction="none", grad_output=np.ones(2)), "(2,)", "(3,)")
    expect_raises(ValueError, lambda: f(x, t, reduction="mean", grad_output=np.ones(3)), "scalar")


@pytest.mark.parametrize("loss_shape", [(1,), (1, 1), (1, 1, 1)])
def test_grad_output_shaped_like_a_single_row_loss(loss_shape):
    """A per-row ``grad_output`` of the loss's shape is right however many size-1 axes
    that shape has (found by tools/stress.py: (1, 1) reached the kernel as 2-D)."""
    x = np.random.default_rng(0).standard_normal(loss_shape + (3,)).astype(np.float32)
    t = np.zeros(loss_shape, np.int64)
    g = np.full(loss_shape, 2.0)
    got = fastsce.cross_entropy_with_grad(x, t, reduction="none", grad_output=g, label_smoothing=0.1)
    check_result("cross_entropy", got[0], (x, t), -1, np.float32, reduction="none", label_smoothing=0.1)
    want = ref.cross_entropy_grad_ref(x, t, reduction="none", label_smoothing=0.1, grad_output=g)
    assert_grad(got[1], want, np.float32)


@pytest.mark.parametrize("name", PUBLIC)
def test_ragged_nested_lists_raise_value_error(name):
    """``np.asarray`` refuses ragged input: NumPy's ValueError reaches the caller."""
    ragged = [[1.0, 2.0], [3.0]]
    args = (
        (ragged, ragged) if name.endswith("_backward") else (ragged, [0, 1]) if name in LOSSES else (ragged,)
    )
    with pytest.raises(ValueError):
        fn(name)(*args)


# ------------------------------------------------------- out-of-range targets ----
@pytest.mark.parametrize("bad_value", [4, 5, 1_000_000, -1, -101, -(2**40), 2**62])
@pytest.mark.parametrize("name", WITH_TARGET)
def test_out_of_range_target_raises_value_error_naming_row_and_value(name, bad_value, rng):
    """A class index outside [0, C) that is not ignore_index: ValueError naming the row
    (its full index) and the value, raised before any logits are read or written."""
    x, guard = guarded((2, 3, 4), np.float32, rng)
    target = rng.integers(0, 4, size=(2, 3))
    target[1, 2] = bad_value
    target[0, 1] = -100  # ignore_index is fine
    before = snapshot(guard, target)
    expect_raises(ValueError, lambda: fn(name)(x, target), "target[1, 2]", str(bad_value))
    if name == "cross_entropy_with_grad":
        out = np.full(x.shape, 7.0, np.float32)
        expect_raises(ValueError, lambda: fn(name)(x, target, out=out), "target[1, 2]", str(bad_value))
        assert np.all(out == 7.0), "out was written before the targets were checked"
        expect_raises(ValueError, lambda: fn(name)(x, target, inplace=True), "target[1, 2]", str(bad_value))
    assert snapshot(guard, target) == before, "logits or target modified"


@pytest.mark.parametrize("name", WITH_TARGET)
def test_out_of_range_unsigned_target_raises_value_error(name):
    x = np.zeros((3, 4))
    target = np.array([0, 1, 2**64 - 1], np.uint64)
    expect_raises(ValueError, lambda: fn(name)(x, target), "target[2]", str(2**64 - 1))


@pytest.mark.parametrize("name", WITH_TARGET)
def test_ignore_index_outside_range_is_accepted(name, rng):
    """Not bad input: a custom ignore_index (even inside [0, C)) marks rows to skip."""
    x = rng.standard_normal((5, 4))
    target = np.array([0, 7, 2, 7, 3])
    got = fn(name)(x, target, ignore_index=7)
    check_result(name, got, (x, target), -1, np.float64, ignore_index=7)
    target = np.array([0, 1, 2, 1, 3])
    got = fn(name)(x, target, ignore_index=1)
    check_result(name, got, (x, target), -1, np.float64, ignore_index=1)


# -------------------------------------------------------- float index targets ----
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("name", WITH_TARGET)
def test_float_targets_where_indices_belong_raise_value_error(name, dtype):
    """Float targets are probabilities; shaped like indices they are refused with a hint."""
    x = np.zeros((3, 4))
    target = np.array([0.0, 1.0, 2.0], dtype)
    expect_raises(ValueError, lambda: fn(name)(x, target), "integer dtype")


def test_nll_loss_refuses_probability_targets():
    expect_raises(
        TypeError, lambda: fastsce.nll_loss(np.zeros((3, 4)), np.full((3, 4), 0.25)), "class indices"
    )


# ------------------------------------------------------------------ empty arrays ----
@pytest.mark.parametrize("shape", [(0, 5), (0,), (2, 0, 3)], ids=str)
@pytest.mark.parametrize("name", SOFTMAX_FAMILY)
def test_no_rows_gives_empty_results(name, shape):
    """N = 0: results of the right (empty) shape and dtype, no error."""
    x = np.zeros(shape, np.float32)
    axis = -1
    if shape == (0,):  # a 1-D empty array has no rows but also no classes
        pytest.skip("(0,) is the C = 0 case")
    args = make_args(name, x)
    got = fn(name)(*args, axis=axis)
    want = expected(name, args, axis)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == want.shape


@pytest.mark.parametrize("shape", [(3, 0), (0,), (2, 3, 0)], ids=str)
@pytest.mark.parametrize("name", SOFTMAX_FAMILY)
def test_no_classes(name, shape):
    """C = 0: softmax-like results are empty; logsumexp over nothing is -inf (as torch);
    the Jacobian is (..., 0, 0)."""
    x = np.zeros(shape, np.float32)
    args = make_args(name, x)
    got = fn(name)(*args)
    if name == "logsumexp":
        want_shape = shape[:-1]
        if want_shape == ():
            assert got == -math.inf and type(got) is float
        else:
            assert got.shape == want_shape and got.dtype == np.float32 and np.all(got == -np.inf)
        kept = fn(name)(x, keepdims=True)
        assert np.shape(kept) == shape[:-1] + (1,) and np.all(np.asarray(kept) == -np.inf)
    elif name == "softmax_jacobian":
        assert got.shape == shape[:-1] + (0, 0)
    else:
        assert got.shape == shape and got.dtype == np.float32


@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", WITH_TARGET)
def test_losses_with_no_rows(name, reduction, soft):
    """N = 0 (C > 0): "mean" is NaN (0/0, as torch), "sum" is 0.0, "none" an empty array;
    the gradient is an empty array of the logits' shape."""
    if soft and name == "nll_loss":
        pytest.skip("nll_loss takes class indices only")
    x = np.zeros((0, 5), np.float32)
    target = np.zeros((0, 5), np.float32) if soft else np.zeros(0, np.int64)
    got = fn(name)(x, target, reduction=reduction)
    loss = got[0] if name == "cross_entropy_with_grad" else got
    if reduction == "mean":
        assert type(loss) is float and math.isnan(loss)
    elif reduction == "sum":
        assert type(loss) is float and loss == 0.0
    else:
        assert isinstance(loss, np.ndarray) and loss.shape == (0,) and loss.dtype == np.float32
    if name == "cross_entropy_with_grad":
        assert got[1].shape == (0, 5) and got[1].dtype == np.float32


@pytest.mark.parametrize("shape", [(3, 0), (0,), (2, 4, 0)], ids=str)
@pytest.mark.parametrize("name", WITH_TARGET)
def test_losses_with_no_classes_raise_value_error(name, shape):
    """C = 0 with rows: no class can be a target; ValueError."""
    x = np.zeros(shape, np.float32)
    target = np.zeros(shape[:-1], np.int64)
    with pytest.raises(ValueError):
        fn(name)(x, target)
    if name != "nll_loss":
        with pytest.raises(ValueError):
            fn(name)(x, np.zeros(shape, np.float32))


def test_losses_with_neither_rows_nor_classes():
    """N = 0 and C = 0: as N = 0 (nothing to be wrong about)."""
    x = np.zeros((0, 0), np.float32)
    assert math.isnan(fastsce.cross_entropy(x, np.zeros(0, np.int64)))
    assert fastsce.cross_entropy(x, np.zeros(0, np.int64), reduction="sum") == 0.0
    loss, grad = fastsce.cross_entropy_with_grad(x, np.zeros(0, np.int64), reduction="sum")
    assert loss == 0.0 and grad.shape == (0, 0)
    assert fastsce.nll_loss(x, np.zeros(0, np.int64), reduction="sum") == 0.0


# -------------------------------------------------------------------- NaN and inf ----
def _special_logits(dtype, n_classes: int) -> np.ndarray:
    """Rows: ordinary, NaN, +inf, all -inf, some -inf, +inf and -inf, ordinary."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((7, n_classes)).astype(dtype)
    x[1, 2] = np.nan
    x[2, 1] = np.inf
    x[3, :] = -np.inf
    x[4, ::2] = -np.inf
    x[5, 0], x[5, 1] = np.inf, -np.inf
    return x


BAD_ROWS = [1, 2, 3, 5]


@pytest.mark.parametrize("n_classes", [5, 100])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ("softmax", "log_softmax", "logsumexp", "softmax_jacobian"))
def test_nan_and_inf_forward(name, dtype, axis, n_classes):
    """A row holding NaN or +inf, or all -inf, is NaN in that row only (logsumexp: NaN,
    +inf, -inf as torch); -inf entries get probability 0. Rows along ``axis=0`` are
    columns: the same promise per column."""
    x = _special_logits(dtype, n_classes)
    x = np.ascontiguousarray(x.T) if axis == 0 else x
    before = snapshot(x)
    got = fn(name)(x, axis=axis)
    check_result(name, got, (x,), axis, dtype)
    assert snapshot(x) == before
    if name in ("softmax", "log_softmax"):
        rows = np.moveaxis(got, axis, -1)
        assert np.all(np.isnan(rows[BAD_ROWS])), "bad rows are NaN"
        good = [0, 4, 6]
        assert not np.any(np.isnan(rows[good])), "NaN leaked into other rows"
        if name == "softmax":
            assert np.all(rows[4, ::2] == 0.0)
        else:
            assert np.all(rows[4, ::2] == -np.inf)
    if name == "logsumexp":
        assert np.isnan(got[1]) and got[2] == np.inf and got[3] == -np.inf and got[5] == np.inf


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ("softmax_backward", "log_softmax_backward"))
def test_nan_and_inf_backward(name, dtype, rng):
    """NaN or inf in one row of either argument makes that row's gradient non-finite
    as the formula says, and no other row."""
    g = rng.standard_normal((6, 9)).astype(dtype)
    args = make_args(name, g, rng=rng)
    out_arg = args[1].copy()
    g[1, 3] = np.nan
    out_arg[2, 4] = np.nan
    g[3, 0] = np.inf
    with np.errstate(all="ignore"):
        got = fn(name)(g, out_arg)
        check_result(name, got, (g, out_arg), -1, dtype)
    assert np.all(np.isfinite(got[[0, 4, 5]]))


@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("n_classes", [5, 100])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ("cross_entropy", "cross_entropy_with_grad"))
def test_nan_and_inf_cross_entropy(name, dtype, n_classes, soft):
    """Per-row loss and gradient: NaN in the rows holding NaN or +inf or all -inf (as
    torch), exact elsewhere; a -inf logit away from the target costs nothing, at the
    target the loss is +inf; "mean"/"sum" are NaN when any row is NaN."""
    x = _special_logits(dtype, n_classes)
    target = np.array([0, 0, 0, 0, 1, 2, 3])  # row 4: x[4, 0] = -inf, target 1 finite
    if soft:
        t = np.full((7, n_classes), 1.0 / n_classes, dtype)
        t[4] = 0.0
        t[4, 1] = 1.0
        target = t
    before = snapshot(x, target)
    with np.errstate(all="ignore"):
        got = fn(name)(x, target, reduction="none")
    loss = got[0] if name == "cross_entropy_with_grad" else got
    assert snapshot(x, target) == before
    assert np.all(np.isnan(loss[BAD_ROWS])), loss
    good = [0, 4, 6]
    want = ref.cross_entropy_ref(x[good], target[good], reduction="none")
    assert_loss(loss[good], want, loss_condition(x[good], target[good], -1, "none"), dtype, "none")
    if name == "cross_entropy_with_grad":
        grad = got[1]
        assert np.all(np.isnan(grad[BAD_ROWS]))
        assert_grad(grad[good], ref.cross_entropy_grad_ref(x[good], target[good], reduction="none"), dtype)
    mean = fn(name)(x, target)
    assert math.isnan(mean[0] if isinstance(mean, tuple) else mean)
    if not soft:
        hit = x.copy()
        hit[0, 0] = -np.inf  # -inf at the target: infinite loss
        assert fastsce.cross_entropy(hit[[0]], target[[0]]) == math.inf


def test_nan_and_inf_nll_loss():
    """nll_loss picks one entry per row: NaN only if the picked entry is NaN, +inf for a
    picked -inf, and other entries never matter."""
    lp = np.log(np.full((4, 3), 1 / 3))
    lp[0, 1] = np.nan
    lp[1, 0] = np.nan
    lp[2, 2] = -np.inf
    lp[3, 0] = np.inf
    got = fastsce.nll_loss(lp, np.array([1, 1, 2, 1]), reduction="none")
    assert np.isnan(got[0]) and got[1] == pytest.approx(np.log(3)) and got[2] == np.inf
    assert got[3] == pytest.approx(np.log(3))


@pytest.mark.parametrize("name", ("cross_entropy", "cross_entropy_with_grad"))
def test_nan_in_probability_target_poisons_its_row_only(name):
    x = np.zeros((3, 4))
    t = np.full((3, 4), 0.25)
    t[1, 2] = np.nan
    got = fn(name)(x, t, reduction="none")
    loss = got[0] if isinstance(got, tuple) else got
    assert np.isnan(loss[1]) and np.allclose(loss[[0, 2]], np.log(4))


# ------------------------------------------------- layouts: strided, reversed, ... ----
LAYOUT_CASES = [  # (shape, axis, dtype)
    ((7, 37), -1, np.float32),  # few classes: row blocks
    ((5, 130), -1, np.float64),  # row kernels
    ((37, 7), 0, np.float64),  # classes along axis 0: column kernels
    ((130, 5), 0, np.float32),
]
VIEWS = ["C", "F", "strided", "reversed", "transposed_strided"]


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize(
    ("shape", "axis", "dtype"),
    LAYOUT_CASES,
    ids=[f"{'x'.join(map(str, s))}-axis{a}-{np.dtype(d).name}" for s, a, d in LAYOUT_CASES],
)
@pytest.mark.parametrize("name", PUBLIC)
def test_non_contiguous_and_negative_stride_inputs(name, shape, axis, dtype, view, rng):
    """Fortran, strided (NaN in the gaps), negative strides on every axis, transposed:
    correct results; nothing outside the view is read (a read of a gap would make a
    NaN) or written; inputs unchanged. Both arguments of the backward passes and the
    targets of the losses get the same layout."""
    if name == "softmax_jacobian" and max(shape) > 40:
        shape = (shape[0], 9) if axis == -1 else (9, shape[1])
    x, guard = guarded(shape, dtype, rng, view)
    args = make_args(name, np.array(x), axis, rng)
    guards = [guard]
    if name in ("softmax_backward", "log_softmax_backward"):
        second, guard2 = guarded(shape, dtype, rng, view)
        second[...] = args[1]
        args = (x, second)
        guards.append(guard2)
    elif name in LOSSES:
        target = args[1]
        t_view = np.full((2,) + target.shape, -7, np.int64)[1]  # a writeable int64 view, then reversed
        t_view[...] = target
        if view in ("reversed", "strided"):
            t_big = np.full(target.shape + (3,), -7, np.int64)
            t_big[..., 0] = target
            t_view = t_big[..., 0]
        if name == "nll_loss":
            x[...] = ref.log_softmax(np.array(x), axis).astype(dtype)
        args = (x, t_view)
        guards.append(t_view.base if t_view.base is not None else t_view)
    before = snapshot(*guards)
    got = fn(name)(*args, axis=axis)
    check_result(name, got, tuple(np.array(a) for a in args), axis, dtype)
    assert snapshot(*guards) == before, "an input or the memory around it was modified"


@pytest.mark.parametrize("name", ("cross_entropy", "cross_entropy_with_grad"))
@pytest.mark.parametrize("view", VIEWS)
def test_non_contiguous_probability_targets(name, view, rng):
    x, guard = guarded((6, 11), np.float32, rng, view)
    t, t_guard = guarded((6, 11), np.float32, rng, view)
    p = rng.random((6, 11)) + 0.1
    t[...] = p / p.sum(-1, keepdims=True)
    before = snapshot(guard, t_guard)
    got = fn(name)(x, t, reduction="none")
    check_result(name, got, (np.array(x), np.array(t)), -1, np.float32, reduction="none")
    assert snapshot(guard, t_guard) == before


@pytest.mark.parametrize("name", PUBLIC)
def test_read_only_inputs(name, rng):
    """Read-only arrays (and read-only broadcast views with zero strides) work and stay
    as they are."""
    x = rng.standard_normal((6, 10)).astype(np.float32)
    args = tuple(np.array(a) for a in make_args(name, x, rng=rng))
    if name == "nll_loss":
        args = (ref.log_softmax(args[0]).astype(np.float32), args[1])
    for a in args:
        a.flags.writeable = False
    got = fn(name)(*args)
    check_result(name, got, args, -1, np.float32)
    row = np.array(args[0][:1])
    broadcast = np.broadcast_to(row, (5, 10))
    assert broadcast.strides[0] == 0 and not broadcast.flags.writeable
    bargs = (broadcast,) + tuple(np.broadcast_to(a[:1], (5,) + a.shape[1:]) for a in args[1:])
    got = fn(name)(*bargs)
    check_result(name, got, tuple(np.array(a) for a in bargs), -1, np.float32)


@pytest.mark.parametrize("name", PUBLIC)
def test_unaligned_and_byte_swapped_inputs(name, rng):
    """Unaligned views and non-native byte order: correct results, inputs unchanged."""
    x = rng.standard_normal((5, 9))
    raw = np.zeros(x.nbytes + 1, np.uint8)
    unaligned = raw[1:].view(np.float64).reshape(5, 9)
    assert not unaligned.flags.aligned
    unaligned[...] = x
    args = make_args(name, unaligned, rng=rng)
    before = snapshot(raw)
    got = fn(name)(*args)
    check_result(name, got, tuple(np.array(a) for a in args), -1, np.float64)
    assert snapshot(raw) == before
    swapped = x.astype(">f4")
    args = make_args(name, swapped, rng=rng)
    got = fn(name)(*args)
    check_result(name, got, tuple(np.array(a) for a in args), -1, np.float32)


# ------------------------------------------------------------------- out= arrays ----
def _out_shape(name: str, shape) -> tuple:
    return shape[:-1] if name == "logsumexp" else shape


def _call_with_out(name, args, out, **kw):
    """The array written by ``fastsce.<name>(*args, out=out)``."""
    result = fn(name)(*args, out=out, **kw)
    return result[1] if name == "cross_entropy_with_grad" else result


@pytest.mark.parametrize("name", WITH_OUT)
def test_out_of_wrong_shape_raises_value_error(name, rng):
    x = rng.standard_normal((4, 5))
    args = make_args(name, x, rng=rng)
    for shape in [(5, 4), (4, 5, 1), (20,), ()]:
        if shape == _out_shape(name, x.shape):
            continue
        out = np.full(shape, 7.0)
        expect_raises(ValueError, lambda out=out: _call_with_out(name, args, out), "shape", str(tuple(shape)))
        assert np.all(out == 7.0)


@pytest.mark.parametrize("out_dtype", [np.float32, np.int64, np.complex128, object])
@pytest.mark.parametrize("name", WITH_OUT)
def test_out_of_wrong_dtype_raises_type_error(name, out_dtype, rng):
    x = rng.standard_normal((4, 5))
    args = make_args(name, x, rng=rng)
    out = np.zeros(_out_shape(name, x.shape), out_dtype)
    expect_raises(TypeError, lambda: _call_with_out(name, args, out), str(np.dtype(out_dtype)))


@pytest.mark.parametrize("name", WITH_OUT)
def test_out_not_an_array_or_read_only(name, rng):
    x = rng.standard_normal((4, 5))
    args = make_args(name, x, rng=rng)
    shape = _out_shape(name, x.shape)
    with pytest.raises(TypeError):
        _call_with_out(name, args, np.zeros(shape).tolist())
    frozen = np.zeros(shape)
    frozen.flags.writeable = False
    expect_raises(ValueError, lambda: _call_with_out(name, args, frozen), "read-only")
    assert np.all(frozen == 0)


def _overlapping_out(name: str, x: np.ndarray, kind: str) -> np.ndarray:
    """A view of ``x``'s memory to pass as ``out``."""
    if name == "logsumexp":
        return {"itself": x[:, 0], "reversed": x[::-1, -1], "transposed": x.T[2]}[kind]
    return {"itself": x, "reversed": x[::-1, ::-1], "transposed": x.T}[kind]


@pytest.mark.parametrize("kind", ["itself", "reversed", "transposed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", WITH_OUT)
def test_out_overlapping_the_input_gives_the_correct_result(name, dtype, kind):
    """``out`` may be the input itself or any other view of an input's memory (the
    input reversed, transposed, a column of it for logsumexp): the result is what a
    separate ``out`` would get. For the backward passes, ``out`` overlaps either input."""
    for which in (0, 1) if name.endswith("_backward") else (0,):
        rng = np.random.default_rng(1)
        args = [np.array(a) for a in make_args(name, rng.standard_normal((8, 8)).astype(dtype), rng=rng)]
        original = tuple(np.array(a) for a in args)
        out = _overlapping_out(name, args[which], kind)
        got = fn(name)(*args, out=out)
        written = got[1] if name == "cross_entropy_with_grad" else got
        assert written is out, f"out = input {which} {kind}: the result is not out"
        check_result(name, got, original, -1, dtype)


@pytest.mark.parametrize("name", WITH_OUT)
def test_out_partially_overlapping_the_input(name, rng):
    """``out`` shifted by one element against the input in one buffer."""
    buf = rng.standard_normal(6 * 9 + 1)
    x = buf[:-1].reshape(6, 9)
    out = buf[1:].reshape(6, 9)
    out = out[:, 0] if name == "logsumexp" else out
    args = list(make_args(name, x, rng=rng))
    original = tuple(np.array(a) for a in args)
    got = fn(name)(*args, out=out)
    written = got[1] if name == "cross_entropy_with_grad" else got
    assert written is out
    check_result(name, got, original, -1, np.float64)


@pytest.mark.parametrize("view", ["F", "strided", "reversed", "transposed_strided"])
@pytest.mark.parametrize("name", WITH_OUT)
def test_out_of_any_layout_is_written_exactly_in_place(name, view, rng):
    """A non-contiguous ``out`` inside a NaN-filled guard buffer: it holds the result,
    and nothing around or between its elements is written (the finite values in the
    buffer afterwards are exactly the elements of ``out``)."""
    x = rng.standard_normal((6, 11))
    args = make_args(name, x, rng=rng)
    out, guard = guarded(_out_shape(name, x.shape), np.float64, rng, view)
    out[...] = np.nan
    got = fn(name)(*args, out=out)
    written = got[1] if name == "cross_entropy_with_grad" else got
    assert written is out
    check_result(name, got, args, -1, np.float64)
    finite = np.isfinite(guard)
    assert finite.sum() == out.size, f"{finite.sum() - out.size} elements written outside out"
    assert np.array_equal(np.sort(guard[finite]), np.sort(out.ravel()))


# ------------------------------------------------------------ inplace=True misuse ----
def test_inplace_on_read_only_logits_raises_value_error(rng):
    x = rng.standard_normal((4, 5)).astype(np.float32)
    x.flags.writeable = False
    before = snapshot(x)
    expect_raises(
        ValueError,
        lambda: fastsce.cross_entropy_with_grad(x, np.zeros(4, np.int64), inplace=True),
        "read-only",
    )
    assert snapshot(x) == before
    view = np.broadcast_to(np.zeros(5, np.float32), (4, 5))
    expect_raises(
        ValueError,
        lambda: fastsce.cross_entropy_with_grad(view, np.zeros(4, np.int64), inplace=True),
        "read-only",
    )


@pytest.mark.parametrize(
    "logits", [[[0.0, 1.0]], np.array([[0, 1]]), np.array([[0, 1]], np.uint8)], ids=["list", "int64", "uint8"]
)
def test_inplace_needs_a_float_ndarray(logits):
    """inplace=True cannot write into a list or an integer array: TypeError."""
    with pytest.raises(TypeError):
        fastsce.cross_entropy_with_grad(logits, np.array([1]), inplace=True)


def test_inplace_with_out_raises_value_error(rng):
    x = rng.standard_normal((4, 5))
    expect_raises(
        ValueError,
        lambda: fastsce.cross_entropy_with_grad(x, np.zeros(4, np.int64), inplace=True, out=np.empty_like(x)),
        "not both",
    )


@pytest.mark.parametrize("view", VIEWS)
def test_inplace_on_non_contiguous_logits(view, rng):
    """inplace=True on any writeable layout writes the gradient over exactly the logits."""
    x, guard = guarded((6, 13), np.float32, rng, view)
    target = rng.integers(0, 13, 6)
    original = np.array(x)
    outside = np.isnan(guard)
    _, grad = fastsce.cross_entropy_with_grad(x, target, inplace=True, label_smoothing=0.1)
    assert grad is x
    assert_grad(np.array(grad), ref.cross_entropy_grad_ref(original, target, label_smoothing=0.1), np.float32)
    assert np.all(np.isnan(guard[outside])), "memory around the logits was written"


@pytest.mark.parametrize("name", [n for n in PUBLIC if n != "cross_entropy_with_grad"])
def test_no_function_modifies_its_input_without_inplace(name, rng):
    x = rng.standard_normal((5, 7))
    args = [np.array(a) for a in make_args(name, x, rng=rng)]
    before = snapshot(*args)
    fn(name)(*args)
    assert snapshot(*args) == before
    if name in ("softmax", "log_softmax"):
        fn(name)(args[0], dtype=np.float32)
        assert snapshot(*args) == before


# ----------------------------------------------------------------- object arrays ----
@pytest.mark.parametrize("name", PUBLIC)
def test_object_arrays_raise_type_error(name):
    """Object arrays (even of floats) are refused with TypeError naming ``object``, in any
    argument: logits, the backward passes' second argument, targets, weights."""
    floats = np.array([[0.5, 1.5, 2.5]] * 2, dtype=object)
    args = make_args(name, np.array(floats, np.float64))
    expect_raises(TypeError, lambda: fn(name)(floats, *args[1:]), "object")
    if name.endswith("_backward"):
        expect_raises(TypeError, lambda: fn(name)(args[0], np.array(args[1], dtype=object)), "object")
    if name in LOSSES:
        expect_raises(TypeError, lambda: fn(name)(args[0], np.array([0, 1], dtype=object)), "object")
        expect_raises(
            TypeError, lambda: fn(name)(args[0], args[1], weight=np.ones(3, dtype=object)), "object"
        )


# ------------------------------------------------------------------- bad options ----
@pytest.mark.parametrize("name", WITH_TARGET)
def test_bad_options_raise(name):
    """reduction, label_smoothing, z_loss, ignore_index out of their domains."""
    x, t = np.zeros((3, 4)), np.array([0, 1, 2])
    expect_raises(ValueError, lambda: fn(name)(x, t, reduction="avg"), "reduction", "avg")
    expect_raises(TypeError, lambda: fn(name)(x, t, ignore_index=1.5), "ignore_index")
    if name != "nll_loss":
        for bad in (-0.1, 1.5, math.nan):
            expect_raises(ValueError, lambda bad=bad: fn(name)(x, t, label_smoothing=bad), "label_smoothing")
        for bad in (-1.0, math.inf, math.nan):
            expect_raises(ValueError, lambda bad=bad: fn(name)(x, t, z_loss=bad), "z_loss")


def test_bad_thread_counts_raise():
    limit = fastsce.get_num_threads()
    expect_raises(ValueError, lambda: fastsce.set_num_threads(0), "between 1")
    expect_raises(TypeError, lambda: fastsce.set_num_threads(1.0), "int")
    expect_raises(TypeError, lambda: fastsce.set_num_threads(True), "int")
    with pytest.raises(ValueError), fastsce.threads(10_000):
        pass
    assert fastsce.get_num_threads() == limit


# --------------------------------------------- linear_cross_entropy(hidden, weight) ----
def linear_problem(rng, n=6, d=4, v=9, dtype=np.float64):
    hidden = rng.standard_normal((n, d)).astype(dtype)
    weight = rng.standard_normal((v, d)).astype(dtype)
    return hidden, weight, rng.integers(0, v, n)


def check_linear(name, got, hidden, weight, target, bias=None, grad_output=1.0, **options):
    """Against the materialized float64 computation, with tests/test_linear.py's tolerance."""
    h, w = np.asarray(hidden, np.float64), np.asarray(weight, np.float64)
    logits = h @ w.T + (0.0 if bias is None else np.asarray(bias, np.float64))
    loss = ref.cross_entropy_ref(logits, target, **options)
    results = [got] if name == "linear_cross_entropy" else list(got)
    wants = [loss]
    if name == "linear_cross_entropy_with_grad":
        g = ref.cross_entropy_grad_ref(logits, target, grad_output=grad_output, **options)
        wants += [g @ w, g.T @ h] + ([g.sum(axis=0)] if bias is not None else [])
    assert len(results) == len(wants)
    rtol, atol = (2e-5, 2e-6) if np.asarray(hidden).dtype == np.float32 else (1e-11, 1e-12)
    for what, r, want in zip(("loss", "d_hidden", "d_weight", "d_bias"), results, wants):
        want = np.asarray(want, np.float64)
        assert np.shape(r) == want.shape, (what, np.shape(r), want.shape)
        scale = max(float(np.max(np.abs(want[np.isfinite(want)]), initial=0.0)), 1.0)
        np.testing.assert_allclose(
            np.asarray(r, np.float64), want, rtol=rtol, atol=atol * scale, err_msg=what
        )


@pytest.mark.parametrize("dtype", [np.complex128, "U3", object, "datetime64[s]", np.int64, np.bool_], ids=str)
@pytest.mark.parametrize("name", LINEAR)
def test_linear_wrong_dtype_raises_type_error_naming_it(name, dtype, rng):
    """hidden and weight must be float16, bfloat16, float32 or float64 (integers are not
    promoted here: a matmul of integers is not what anyone meant), of one dtype."""
    hidden, weight, target = linear_problem(rng)
    expect_raises(
        TypeError,
        lambda: fn(name)(_as_bad(hidden, dtype), _as_bad(weight, dtype), target),
        str(np.dtype(dtype)),
    )
    expect_raises(
        TypeError, lambda: fn(name)(hidden.astype(np.float32), weight, target), "float32", "float64"
    )
    expect_raises(
        TypeError,
        lambda: fn(name)(
            hidden, weight, target.astype(dtype) if np.dtype(dtype).kind not in "iu" else target.astype(bool)
        ),
        "target",
    )


@pytest.mark.parametrize("name", LINEAR)
def test_linear_wrong_ndim_raises_value_error(name, rng):
    hidden, weight, target = linear_problem(rng)
    for bad in (np.array(1.0), hidden[0], hidden[None]):
        expect_raises(ValueError, lambda bad=bad: fn(name)(bad, weight, target), "2-D", str(bad.shape))
    expect_raises(ValueError, lambda: fn(name)(hidden, weight[0], target), "2-D")


@pytest.mark.parametrize("name", LINEAR)
def test_linear_mismatched_shapes_raise_value_error(name, rng):
    hidden, weight, target = linear_problem(rng)
    expect_raises(ValueError, lambda: fn(name)(hidden, weight[:, :3], target), str(weight[:, :3].shape))
    expect_raises(ValueError, lambda: fn(name)(hidden, weight, target[:5]), "(6,)", "(5,)")
    expect_raises(ValueError, lambda: fn(name)(hidden, weight, np.full((6, 8), 1 / 8)), "(6, 9)", "(6, 8)")
    expect_raises(ValueError, lambda: fn(name)(hidden, weight, target, bias=np.ones(8)), "bias", "(8,)")
    expect_raises(
        ValueError,
        lambda: fn(name)(hidden, weight, target, class_weight=np.ones((1, 9))),
        "class_weight",
        "(1, 9)",
    )
    if name == "linear_cross_entropy_with_grad":
        expect_raises(
            ValueError,
            lambda: fn(name)(hidden, weight, target, reduction="none", grad_output=np.ones(5)),
            "(5,)",
        )


@pytest.mark.parametrize("bad_value", [9, -1, 2**40, -(2**40)])
@pytest.mark.parametrize("name", LINEAR)
def test_linear_out_of_range_target_raises_value_error_naming_row_and_value(name, bad_value, rng):
    hidden, weight, target = linear_problem(rng)
    target[4] = bad_value
    target[1] = -100
    before = snapshot(hidden, weight, target)
    expect_raises(ValueError, lambda: fn(name)(hidden, weight, target), "target[4]", str(bad_value))
    assert snapshot(hidden, weight, target) == before
    expect_raises(
        ValueError,
        lambda: fn(name)(hidden, weight, np.array([0, 1, 2, 3, 4, 2**64 - 1], np.uint64)),
        "target[5]",
        str(2**64 - 1),
    )


@pytest.mark.parametrize("name", LINEAR)
def test_linear_float_targets_where_indices_belong_raise_value_error(name, rng):
    hidden, weight, target = linear_problem(rng)
    expect_raises(ValueError, lambda: fn(name)(hidden, weight, target.astype(np.float64)), "integer dtype")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", LINEAR)
def test_linear_empty(name, reduction, rng):
    """N = 0: "mean" NaN, "sum" 0.0, "none" empty, gradients of the inputs' shapes (zero);
    V = 0 with rows: ValueError; D = 0 (no features): the logits are 0, the loss log V."""
    hidden, weight, target = linear_problem(rng)
    got = fn(name)(hidden[:0], weight, target[:0], reduction=reduction)
    loss = got if name == "linear_cross_entropy" else got[0]
    if reduction == "mean":
        assert type(loss) is float and math.isnan(loss)
    elif reduction == "sum":
        assert type(loss) is float and loss == 0.0
    else:
        assert loss.shape == (0,) and loss.dtype == np.float64
    if name == "linear_cross_entropy_with_grad":
        assert got[1].shape == (0, 4) and got[2].shape == weight.shape and not np.any(got[2])
    with pytest.raises(ValueError):
        fn(name)(hidden, weight[:0], target)
    got = fn(name)(hidden[:, :0], weight[:, :0], target, reduction=reduction)
    check_linear(name, got, hidden[:, :0], weight[:, :0], target, reduction=reduction)


@pytest.mark.parametrize("name", LINEAR)
def test_linear_nan_and_inf(name, rng):
    """A NaN or inf in one row of ``hidden`` makes that row's loss (and its d_hidden row)
    NaN, no other row's; a -inf bias entry away from the target costs nothing."""
    hidden, weight, target = linear_problem(rng)
    hidden[1, 2] = np.nan
    hidden[3, 0] = np.inf
    bias = np.zeros(9)
    bias[min(set(range(9)) - set(target.tolist()))] = -np.inf  # a class no row targets
    with np.errstate(all="ignore"):
        got = fn(name)(hidden, weight, target, bias=bias, reduction="none")
    loss = got if name == "linear_cross_entropy" else got[0]
    assert np.all(np.isnan(loss[[1, 3]])) and np.all(np.isfinite(loss[[0, 2, 4, 5]])), loss
    good = [0, 2, 4, 5]
    check_linear(
        "linear_cross_entropy", loss[good], hidden[good], weight, target[good], bias=bias, reduction="none"
    )
    if name == "linear_cross_entropy_with_grad":
        assert np.all(np.isnan(got[1][[1, 3]])) and np.all(np.isfinite(got[1][good]))


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", LINEAR)
def test_linear_non_contiguous_and_read_only_inputs(name, dtype, view, rng):
    """hidden and weight in any layout (inside NaN guard buffers) and read-only: correct
    results, nothing around them read or written, inputs unchanged."""
    hidden, h_guard = guarded((7, 5), dtype, rng, view)
    weight, w_guard = guarded((11, 5), dtype, rng, view)
    target = rng.integers(0, 11, 7)
    target[2] = -100
    bias = rng.standard_normal(11).astype(dtype)[::-1]
    hidden.flags.writeable = False
    before = snapshot(h_guard, w_guard, target)
    got = fn(name)(hidden, weight, target, bias=bias, label_smoothing=0.1, chunk_size=3)
    check_linear(name, got, np.array(hidden), np.array(weight), target, bias=bias, label_smoothing=0.1)
    assert snapshot(h_guard, w_guard, target) == before


@pytest.mark.parametrize("name", LINEAR)
def test_linear_object_arrays_raise_type_error(name):
    hidden = np.ones((2, 3), dtype=object)
    weight = np.ones((4, 3), dtype=object)
    expect_raises(TypeError, lambda: fn(name)(hidden, weight, np.array([0, 1])), "object")
    expect_raises(
        TypeError,
        lambda: fn(name)(np.ones((2, 3)), np.ones((4, 3)), np.array([0, 1], dtype=object)),
        "object",
    )
    expect_raises(
        TypeError,
        lambda: fn(name)(
            np.ones((2, 3)), np.ones((4, 3)), np.array([0, 1]), class_weight=np.ones(4, dtype=object)
        ),
        "object",
    )


@pytest.mark.parametrize("name", LINEAR)
def test_linear_bad_options_raise(name, rng):
    hidden, weight, target = linear_problem(rng)
    expect_raises(ValueError, lambda: fn(name)(hidden, weight, target, reduction="avg"), "reduction")
    expect_raises(
        ValueError, lambda: fn(name)(hidden, weight, target, label_smoothing=2.0), "label_smoothing"
    )
    expect_raises(ValueError, lambda: fn(name)(hidden, weight, target, z_loss=-1.0), "z_loss")
    expect_raises(TypeError, lambda: fn(name)(hidden, weight, target, ignore_index=0.5), "ignore_index")
    for key in ("chunk_size", "memory_budget"):
        expect_raises(ValueError, lambda key=key: fn(name)(hidden, weight, target, **{key: 0}), key)
        expect_raises(ValueError, lambda key=key: fn(name)(hidden, weight, target, **{key: -3}), key)
        expect_raises(TypeError, lambda key=key: fn(name)(hidden, weight, target, **{key: 1.5}), key)


# -------------------------------------------------------- arrays over 2**31 elements ----
HUGE_TIMEOUT = 600


def _huge_main() -> (
    None
):  # runs in a subprocess: python -c "from tests.test_bad_input import _huge_main; ..."
    """Check 64-bit index arithmetic on arrays spanning more than 2**32 elements.

    A private anonymous mapping of 2**32 + 2**21 float32 (16 GiB of address space,
    MAP_NORESERVE) reads as zeros from the kernel's shared zero page and costs no RAM;
    a few rows near and beyond element 2**31 and 2**32 are written, then the mapping is
    made read-only and RLIMIT_DATA caps new allocations at +1.5 GiB, so a hidden full-size
    copy raises MemoryError instead of eating the machine. Results go to stdout as JSON.
    """
    import ctypes
    import mmap
    import resource
    import time
    import traceback

    results = {}

    def record(name, func):
        start = time.perf_counter()
        try:
            func()
            results[name] = {"ok": True}
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[name] = {"ok": False, "error": traceback.format_exc(limit=6)}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps({name: results[name]}), flush=True)

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    map_noreserve = 0x4000
    c = 1024
    n_rows = 2**22 + 2**11  # 2**32 + 2**21 elements
    n = n_rows * c
    addr = libc.mmap(
        None,
        n * 4,
        mmap.PROT_READ | mmap.PROT_WRITE,
        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | map_noreserve,
        -1,
        0,
    )
    if addr in (None, ctypes.c_void_p(-1).value):
        print(json.dumps({"skip": f"mmap of {n * 4} bytes failed (errno {ctypes.get_errno()})"}), flush=True)
        return
    flat = np.ctypeslib.as_array((ctypes.c_float * n).from_address(addr))
    big = flat.reshape(n_rows, c)
    rng = np.random.default_rng(3)
    # Rows that the strided views below pick: 0, 2**21+1 (offset > 2**31), 2**22+2 (> 2**32).
    picked = [0, 2**21 + 1, 2**22 + 2]
    for r in picked:
        big[r] = (3 * rng.standard_normal(c)).astype(np.float32)
    # Distinct entries of the long 1-D row (the first 2**31 + 4096 elements).
    long_n = 2**31 + 4096
    flat[2**31 + 7] = 30.0
    flat[long_n - 1] = 25.0
    # Rows 2**21 and 2**21 + 1 of the leading 2**21 + 2 rows (> 2**31 elements in all).
    big[2**21, 5] = 20.0
    assert libc.mprotect(addr, n * 4, mmap.PROT_READ) == 0
    flat.flags.writeable = False
    with open("/proc/self/status") as status:
        data_kb = int(next(line for line in status if line.startswith("VmData")).split()[1])
    resource.setrlimit(resource.RLIMIT_DATA, (data_kb * 1024 + 3 * 2**29, resource.RLIM_INFINITY))

    from tests import reference

    step = 2**21 + 1
    rows = big[::step]  # 3 rows at element offsets 0, ~2**31, ~2**32
    assert rows.shape == (3, c) and rows.strides[0] == step * c * 4
    dense = np.array(rows)
    target = np.array([3, 1000, 17])
    tol = 4e-6

    def close(got, want, what, scale=1.0):
        got = np.asarray(got, np.float64)
        want = np.asarray(want, np.float64)
        err = np.max(np.abs(got - want) / (scale + np.abs(want)))
        assert err <= tol, (
            f"{what}: max relative error {err:.3g}\ngot {got.ravel()[:8]}\nwant {want.ravel()[:8]}"
        )

    def check_rows(view, axis, dense_view):
        close(fastsce.logsumexp(view, axis=axis), reference.logsumexp(dense_view, axis), "logsumexp")
        close(fastsce.softmax(view, axis=axis), reference.softmax(dense_view, axis), "softmax", 1e-6)
        close(fastsce.log_softmax(view, axis=axis), reference.log_softmax(dense_view, axis), "log_softmax")
        g = np.ones(view.shape, np.float32)
        close(
            fastsce.softmax_backward(g, view, axis=axis),
            reference.softmax_backward(g, dense_view, axis),
            "softmax_backward",
            1.0,
        )
        close(
            fastsce.log_softmax_backward(g, view, axis=axis),
            reference.log_softmax_backward(g, dense_view, axis),
            "log_softmax_backward",
            1.0,
        )

    record("strided rows beyond 2**31 and 2**32 (row kernels)", lambda: check_rows(rows, -1, dense))
    record("reversed rows beyond 2**32 (negative strides)", lambda: check_rows(rows[::-1], -1, dense[::-1]))
    record("classes 2**31 elements apart (column kernels, axis=0)", lambda: check_rows(rows, 0, dense))
    record("transposed: class stride beyond 2**31", lambda: check_rows(rows.T, -1, dense.T))

    def losses():
        loss, grad, lse, argmax = fastsce.cross_entropy_with_grad(
            rows, target, reduction="none", return_lse=True, return_argmax=True
        )
        close(loss, reference.cross_entropy_ref(dense, target, reduction="none"), "loss")
        close(grad, reference.cross_entropy_grad_ref(dense, target, reduction="none"), "grad", 1.0)
        close(lse, reference.logsumexp(dense), "lse")
        assert np.array_equal(argmax, np.argmax(dense, -1)), (argmax, np.argmax(dense, -1))
        close(fastsce.cross_entropy(rows, target), reference.cross_entropy_ref(dense, target), "mean loss")
        close(
            fastsce.cross_entropy(rows.T, target, axis=0),
            reference.cross_entropy_ref(dense, target),
            "mean loss, axis=0",
        )
        close(
            fastsce.nll_loss(rows, target, reduction="none"),
            reference.nll_loss_ref(dense, target, reduction="none"),
            "nll_loss",
        )

    record("losses on rows beyond 2**31 and 2**32", losses)

    def long_row():
        x = flat[:long_n]
        got = fastsce.logsumexp(x)
        want = math.log(math.exp(30.0) + math.exp(25.0) + (long_n - 2))
        close(got, want, "logsumexp of one 2**31 + 4096 row")

    record("one row of 2**31 + 4096 classes (logsumexp)", long_row)

    def many_rows():
        x = big[: 2**21 + 2]  # 2**31 + 2048 elements
        t = np.zeros(x.shape[0], np.int64)
        t[2**21] = 5
        t[2**21 + 1] = 1000
        loss, lse = fastsce.cross_entropy(x, t, reduction="none", return_lse=True)
        assert loss.shape == (2**21 + 2,)
        # Rows at element offsets 0, 2**30, 2**31 - 1024, 2**31 and 2**31 + 1024.
        check = [0, 1, 2**20, 2**21 - 1, 2**21, 2**21 + 1]
        dense_rows = np.array(x[check])
        close(loss[check], reference.cross_entropy_ref(dense_rows, t[check], reduction="none"), "loss", 1.0)
        close(lse[check], reference.logsumexp(dense_rows), "lse")
        assert dense_rows[4, 7] == 30.0 and dense_rows[4, 5] == 20.0  # the row at element 2**31

    record("2**21 + 2 rows of 1024 (2**31 + 2048 elements, cross_entropy)", many_rows)
    print(json.dumps({"done": True}), flush=True)


@pytest.fixture(scope="module")
def huge_results():
    if sys.platform != "linux":
        pytest.skip("the zero-page mapping trick is Linux-only")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    env.pop("NUMBA_DISABLE_JIT", None)  # 2**31 elements need the compiled kernels
    try:
        proc = subprocess.run(
            [sys.executable, "-c", "from tests.test_bad_input import _huge_main; _huge_main()"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=HUGE_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"the >2**31-element checks did not finish in {HUGE_TIMEOUT} s:\n{exc.stdout}\n{exc.stderr}"
        )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            results.update(json.loads(line))
    if "skip" in results:
        pytest.skip(results["skip"])
    results["_returncode"] = proc.returncode
    results["_stderr"] = proc.stderr[-3000:]
    return results


HUGE_CHECKS = [
    "strided rows beyond 2**31 and 2**32 (row kernels)",
    "reversed rows beyond 2**32 (negative strides)",
    "classes 2**31 elements apart (column kernels, axis=0)",
    "transposed: class stride beyond 2**31",
    "losses on rows beyond 2**31 and 2**32",
    "one row of 2**31 + 4096 classes (logsumexp)",
    "2**21 + 2 rows of 1024 (2**31 + 2048 elements, cross_entropy)",
]


@pytest.mark.parametrize("check", HUGE_CHECKS)
def test_arrays_over_2_to_the_31_elements(huge_results, check):
    """64-bit index arithmetic: arrays over 2**31 (and offsets over 2**32) elements give
    the reference's results, without a crash and without a full-size copy (the
    subprocess may allocate at most 1.5 GiB more than it had).

    Not tested: softmax/log_softmax/backward/gradient *outputs* of more than 2**31
    elements, and 2**31 rows of cross-entropy targets: their outputs alone need >= 8 GiB,
    more than the 3 GB this suite may use on a shared machine. Their 64-bit indexing is
    covered by inputs whose strides and offsets exceed 2**31 and 2**32 elements.
    """
    result = huge_results.get(check)
    assert result is not None, (
        f"the subprocess died before this check (exit code {huge_results['_returncode']}):\n"
        f"{huge_results['_stderr']}"
    )
    assert result["ok"], result["error"]
