"""Cross-entropy on logits whose classes are strided: the column kernels.

Fortran-ordered ``(N, C)`` logits, PyTorch-style ``(N, C, d1, ...)`` with the classes on
axis 1, ``axis=0`` of C-ordered arrays, and sliced, reversed and padded views of them
go to ``hard_xent_columns``/``soft_xent_columns``, which compute in place of the
gradient (or read the logits) tile by tile, without a logits-sized copy. Every test
here compares with tests/reference.py (and torch where installed) with the tolerances
of tests/test_loss.py, and the ``no_copy`` fixture makes any copy of the logits fail
the test, so each case proves it ran on the column kernels.
"""

from __future__ import annotations

import importlib
import itertools
import math

import numpy as np
import pytest

import fastsce
from tests import reference as ref
from tests.conftest import FLOAT_DTYPES, jit_or_pure, needs_two_threads
from tests.test_loss import (
    HAVE_TORCH,
    REDUCTIONS,
    assert_grad_close,
    assert_loss_close,
    make_grad_output,
    make_logits,
    make_target,
    make_weight,
    options,
    torch_cross_entropy,
)

loss_module = importlib.import_module("fastsce.loss")


@pytest.fixture
def no_copy(monkeypatch):
    """Fail on the wrapper's fallback copy of the logits (classes moved last)."""

    def refuse(array):
        raise AssertionError(f"the logits {array.shape} were copied: no column kernel ran")

    monkeypatch.setattr(loss_module, "aligned_copy", refuse)


def padded(x: np.ndarray, axis: int, step: int = 1) -> np.ndarray:
    """``x`` as a view into a NaN-filled buffer: NaN gaps along ``axis`` before and after
    the values, and between neighbours if ``step > 1`` (same values, fresh memory)."""
    shape = list(x.shape)
    shape[axis] = x.shape[axis] * step + 2
    big = np.full(shape, np.nan, x.dtype)
    index = [slice(None)] * x.ndim
    index[axis] = slice(1, 1 + x.shape[axis] * step, step)
    view = big[tuple(index)]
    view[...] = x
    return view


# name -> (shape, axis, make the view from a C-ordered array)
LAYOUTS = {
    "fortran-2d": ((37, 11), -1, np.asfortranarray),
    "NCd-axis1": ((5, 9, 13), 1, lambda x: x),
    "NCd1d2-axis1": ((3, 7, 4, 6), 1, lambda x: x),
    "axis0": ((9, 29), 0, lambda x: x),
    "fortran-NCd-axis1": ((6, 7, 5), 1, np.asfortranarray),  # inner is N, outer is d
    "padded-inner": ((4, 8, 10), 1, lambda x: padded(x, 2)),
    "padded-classes": ((4, 8, 10), 1, lambda x: padded(x, 1)),
    "reversed-classes": ((4, 8, 10), 1, lambda x: x[:, ::-1, :].copy()[:, ::-1, :]),
    "reversed-outer": ((4, 8, 10), 1, lambda x: x[::-1].copy()[::-1]),
    "class-stride-2": ((15, 6), -1, lambda x: padded(x, 1, step=2)),  # no contiguous axis: n_inner == 1
}
LAYOUT_IDS = list(LAYOUTS)


def layout_case(name, kind, dtype, seed, ignore_rows=(1, 4)):
    """``(x, view, t, axis, rng)``: C-ordered logits, the same values in layout ``name``,
    and targets (probabilities in the view's layout too)."""
    shape, axis, make_view = LAYOUTS[name]
    rng = np.random.default_rng(seed)
    x = make_logits(shape, dtype, rng)
    view = make_view(x)
    np.testing.assert_array_equal(view, x)
    t = make_target(kind, x, axis, rng, ignore_rows)
    return x, view, t if kind == "hard" else make_view(t), axis, rng


def loss_shape_of(shape, axis):
    axis %= len(shape)
    return shape[:axis] + shape[axis + 1 :]


def check_case(view, x, t, opts, g, dtype, reduction):
    """Loss (both functions) and gradient of ``view`` against the reference on ``x``."""
    expected = ref.cross_entropy_ref(x, t, **opts)
    expected_grad = ref.cross_entropy_grad_ref(x, t, **opts, grad_output=g)
    before = view.copy()
    assert_loss_close(fastsce.cross_entropy(view, t, **opts), expected, dtype, reduction)
    loss, grad = fastsce.cross_entropy_with_grad(view, t, **opts, grad_output=g)
    assert_loss_close(loss, expected, dtype, reduction)
    assert_grad_close(grad, expected_grad, dtype)
    np.testing.assert_array_equal(view, before)
    return expected, expected_grad


# ------------------------------------------------------------- option grid ----
GRID = list(itertools.product(["hard", "soft"], FLOAT_DTYPES, [False, True], REDUCTIONS, [0.0, 0.1], [0.0, 1e-3]))
GRID_IDS = [f"{k}-{np.dtype(d).name}-{'w' if w else 'nw'}-{r}-ls{ls}-z{z}" for k, d, w, r, ls, z in GRID]


@pytest.mark.parametrize("layout", ["fortran-2d", "NCd-axis1"])
@pytest.mark.parametrize(("kind", "dtype", "weighted", "reduction", "ls", "z"), GRID, ids=GRID_IDS)
def test_grid_vs_reference(no_copy, layout, kind, dtype, weighted, reduction, ls, z):
    x, view, t, axis, rng = layout_case(layout, kind, dtype, seed=0)
    w = make_weight(weighted, x.shape[axis], dtype, rng)
    opts = options(w, reduction, ls, z, axis=axis)
    g = make_grad_output(reduction, loss_shape_of(x.shape, axis), rng)
    check_case(view, x, t, opts, g, dtype, reduction)
    if kind == "hard":  # ignored rows get exactly zero gradient
        _, grad = fastsce.cross_entropy_with_grad(view, t, **opts, grad_output=g)
        ignored = np.expand_dims(t == -100, axis)
        assert np.all(np.where(ignored, grad, 0) == 0)


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("layout", ["fortran-2d", "NCd1d2-axis1"])
@pytest.mark.parametrize(("kind", "dtype", "weighted", "reduction", "ls", "z"), GRID, ids=GRID_IDS)
def test_grid_vs_torch(no_copy, layout, kind, dtype, weighted, reduction, ls, z):
    x, view, t, axis, rng = layout_case(layout, kind, dtype, seed=1)
    w = make_weight(weighted, x.shape[axis], dtype, rng)
    opts = options(w, reduction, ls, z, axis=axis)
    g = make_grad_output(reduction, loss_shape_of(x.shape, axis), rng)
    t_loss, t_grad = torch_cross_entropy(x, t, **opts, grad_output=g)
    assert_loss_close(fastsce.cross_entropy(view, t, **opts), t_loss, dtype, reduction)
    loss, grad = fastsce.cross_entropy_with_grad(view, t, **opts, grad_output=g)
    assert_loss_close(loss, t_loss, dtype, reduction)
    assert_grad_close(grad, t_grad, dtype)


# ----------------------------------------------------------------- layouts ----
@pytest.mark.parametrize("layout", LAYOUT_IDS)
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_layouts(no_copy, monkeypatch, layout, kind, dtype, reduction):
    """Every column layout, all options at once, including per-row grad_output."""
    x, view, t, axis, rng = layout_case(layout, kind, dtype, seed=2)
    w = make_weight(True, x.shape[axis], dtype, rng)
    opts = options(w, reduction, 0.1, 1e-3, axis=axis)
    g = make_grad_output(reduction, loss_shape_of(x.shape, axis), rng)
    check_case(view, x, t, opts, g, dtype, reduction)
    if kind == "soft":  # probabilities in C order: where the axes interleave differently, both are copied
        monkeypatch.undo()
        check_case(view, x, np.ascontiguousarray(t), opts, g, dtype, reduction)


@pytest.mark.parametrize("layout", LAYOUT_IDS)
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_inplace(no_copy, layout, kind):
    """inplace=True writes the gradient over the strided logits, and nowhere else."""
    x, view, t, axis, rng = layout_case(layout, kind, np.float32, seed=3)
    opts = options(make_weight(True, x.shape[axis], np.float32, rng), "mean", 0.1, 1e-3, axis=axis)
    expected = ref.cross_entropy_ref(x, t, **opts)
    expected_grad = ref.cross_entropy_grad_ref(x, t, **opts)
    memory = view.base if view.base is not None else view
    gaps = np.isnan(memory)  # the NaN around gapped views; the view itself is finite
    loss, grad = fastsce.cross_entropy_with_grad(view, t, **opts, inplace=True)
    assert grad is view
    assert_loss_close(loss, expected, np.float32, "mean")
    assert_grad_close(grad, expected_grad, np.float32)
    np.testing.assert_array_equal(np.isnan(memory), gaps)  # nothing outside the view written


@pytest.mark.parametrize("shift", [0, 3])
def test_axis0_gradient_streamed_from_scratch_tiles(no_copy, shift):
    """Gradients of 16 MB and more are written from the scratch tiles with streaming
    stores: into ``out`` at any alignment (nothing around it written), and in place."""
    shape = jit_or_pure((1000, 4203), (40, 203))  # 16.8 MB of float32 (pure Python: not streamed)
    rng = np.random.default_rng(11)
    x = make_logits(shape, np.float32, rng)
    t = make_target("hard", x, 0, rng, ignore_rows=(5, 77))
    opts = options(make_weight(True, shape[0], np.float32, rng), "mean", 0.1, 1e-3, axis=0)
    expected = ref.cross_entropy_ref(x, t, **opts)
    expected_grad = ref.cross_entropy_grad_ref(x, t, **opts)
    buf = np.full(x.size + 16, 7.0, np.float32)
    out = buf[shift : shift + x.size].reshape(shape)
    loss, grad = fastsce.cross_entropy_with_grad(x, t, **opts, out=out)
    assert grad is out
    assert_loss_close(loss, expected, np.float32, "mean")
    assert_grad_close(out, expected_grad, np.float32)
    assert (buf[:shift] == 7.0).all() and (buf[shift + x.size :] == 7.0).all()
    y = x.copy()
    loss, grad = fastsce.cross_entropy_with_grad(y, t, **opts, inplace=True)
    assert grad is y
    assert_grad_close(grad, expected_grad, np.float32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_axis0_tiles_too_big_for_scratch(no_copy, dtype):
    """Tiles over COLUMN_SCRATCH_MAX_BYTES are computed where they lie (in the gradient,
    or read from the logits for the loss alone)."""
    from fastsce._kernels.softmax import COLUMN_SCRATCH_MAX_BYTES

    n_classes = jit_or_pure(COLUMN_SCRATCH_MAX_BYTES // (16 * np.dtype(dtype).itemsize) + 1000, 2000)
    rng = np.random.default_rng(12)
    x = make_logits((n_classes, 16), dtype, rng)
    t = make_target("hard", x, 0, rng, ignore_rows=(3,))
    opts = options(None, "sum", 0.0, 0.0, axis=0)
    check_case(x, x, t, opts, 1.0, dtype, "sum")


@pytest.mark.parametrize("layout", ["fortran-2d", "NCd-axis1", "padded-inner"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_out(layout, kind):
    """out= in the logits' layout (column kernels, no copy), in C order, and overlapping."""
    x, view, t, axis, _ = layout_case(layout, kind, np.float64, seed=4)
    opts = options(None, "sum", 0.1, 1e-3, axis=axis)
    expected = ref.cross_entropy_grad_ref(x, t, **opts, grad_output=0.5)
    same_layout = np.full_like(view, np.nan)  # empty_like keeps the stride order
    for out in (same_layout, np.full(x.shape, np.nan), padded(np.full(x.shape, np.nan), axis)):
        loss, grad = fastsce.cross_entropy_with_grad(view, t, **opts, grad_output=0.5, out=out)
        assert grad is out
        assert_loss_close(loss, ref.cross_entropy_ref(x, t, **opts), np.float64, "sum")
        assert_grad_close(out, expected, np.float64)


def test_out_in_logits_layout_makes_no_copy(no_copy):
    x, view, t, _, _ = layout_case("fortran-2d", "hard", np.float32, seed=5)
    out = np.empty_like(view)
    _, grad = fastsce.cross_entropy_with_grad(view, t, out=out)
    assert grad is out and out.flags.f_contiguous
    assert_grad_close(out, ref.cross_entropy_grad_ref(x, t), np.float32)


def test_out_overlapping_the_logits():
    """An ``out`` that shares memory with the logits without being them: computed aside."""
    rng = np.random.default_rng(6)
    buf = np.asfortranarray(make_logits((20, 7), np.float64, rng))
    x = buf[:, :6]
    x_values = x.copy()
    t = rng.integers(0, 6, 20)
    out = buf[:, 1:]
    _, grad = fastsce.cross_entropy_with_grad(x, t, out=out)
    assert grad is out
    assert_grad_close(out, ref.cross_entropy_grad_ref(x_values, t), np.float64)


def test_inner_stride_not_one_is_copied_and_correct():
    """No unit-stride axis besides the classes (``[:, :, ::2]``): fastsce._layout has no
    column view for it, so the logits are copied with the classes last; still correct."""
    rng = np.random.default_rng(7)
    x = make_logits((4, 6, 10), np.float32, rng)[:, :, ::2]
    t = make_target("hard", x, 1, rng, (2,))
    w = make_weight(True, 6, np.float32, rng)
    for reduction in REDUCTIONS:
        opts = options(w, reduction, 0.1, 1e-3, axis=1)
        g = make_grad_output(reduction, (4, 5), rng)
        check_case(x, np.ascontiguousarray(x), t, opts, g, np.float32, reduction)


# ------------------------------------------------------ semantics and extras ----
@pytest.mark.parametrize("layout", ["fortran-2d", "NCd1d2-axis1", "fortran-NCd-axis1", "class-stride-2"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_return_lse_and_argmax(no_copy, layout, kind, dtype):
    x, view, t, axis, _ = layout_case(layout, kind, dtype, seed=8)
    x.reshape(-1)[::5] = 1.5  # ties: argmax is the first of them, as np.argmax
    view = LAYOUTS[layout][2](x)
    tol = 4e-6 if dtype == np.float32 else 1e-13
    for reduction in REDUCTIONS:
        opts = options(None, reduction, 0.1, 1e-3, axis=axis)
        expected = ref.cross_entropy_ref(x, t, **opts)
        for with_grad in (False, True):
            if with_grad:
                loss, grad, lse, argmax = fastsce.cross_entropy_with_grad(
                    view, t, **opts, return_lse=True, return_argmax=True)
                assert_grad_close(grad, ref.cross_entropy_grad_ref(x, t, **opts), dtype)
            else:
                loss, lse, argmax = fastsce.cross_entropy(view, t, **opts, return_lse=True, return_argmax=True)
            assert_loss_close(loss, expected, dtype, reduction)
            assert lse.dtype == dtype and lse.shape == loss_shape_of(x.shape, axis)
            np.testing.assert_allclose(lse, ref.logsumexp(x, axis), rtol=tol, atol=tol)
            assert argmax.dtype == np.int64
            np.testing.assert_array_equal(argmax, np.argmax(x, axis=axis))
        _, argmax = fastsce.cross_entropy(view, t, **opts, return_argmax=True)
        np.testing.assert_array_equal(argmax, np.argmax(x, axis=axis))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_same_results_as_row_kernels(no_copy, dtype):
    """The column kernels agree with the row kernels on the same values (the row kernels
    run on the C-ordered copy made here), extras included."""
    rng = np.random.default_rng(9)
    x = make_logits((300, 37), dtype, rng)
    t = make_target("hard", x, -1, rng, range(0, 300, 7))
    w = make_weight(True, 37, dtype, rng)
    opts = options(w, "none", 0.1, 1e-3)
    g = rng.uniform(0.5, 2.0, 300)
    rows = fastsce.cross_entropy_with_grad(x, t, **opts, grad_output=g, return_lse=True, return_argmax=True)
    cols = fastsce.cross_entropy_with_grad(np.asfortranarray(x), t, **opts, grad_output=g, return_lse=True,
                                           return_argmax=True)
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    for a, b in zip(rows, cols):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * np.max(np.abs(a)))
    np.testing.assert_array_equal(rows[3], cols[3])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_special_values(no_copy, dtype):
    """NaN, +inf and all -inf columns give NaN in that row only; -inf entries get 0."""
    rng = np.random.default_rng(10)
    x = make_logits((8, 5), dtype, rng)
    t = np.array([0, 1, 2, 3, 4, 0, 1, -100])
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    x[3, :] = -np.inf
    x[4, 1] = -np.inf  # not the target: finite loss, zero gradient there
    x[7, 2] = np.nan  # ignored row: zero gradient, no NaN in the loss
    xf = np.asfortranarray(x)
    loss, grad, lse, argmax = fastsce.cross_entropy_with_grad(
        xf, t, reduction="none", return_lse=True, return_argmax=True)
    rows = fastsce.cross_entropy_with_grad(x, t, reduction="none", return_lse=True, return_argmax=True)
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(rows[0]))
    np.testing.assert_array_equal(np.isnan(grad), np.isnan(rows[1]))
    np.testing.assert_array_equal(lse[[1, 2, 3]], rows[2][[1, 2, 3]])  # NaN, +inf, -inf as torch
    # argmax of a row holding NaN is left unspecified (the row kernels' differs with the
    # vector width too); every other row: the first maximum, as the row kernels
    np.testing.assert_array_equal(argmax[[0, 2, 3, 4, 5, 6]], rows[3][[0, 2, 3, 4, 5, 6]])
    assert np.all(np.isnan(grad[[1, 2, 3]])) and np.all(np.isfinite(grad[[0, 4, 5, 6, 7]]))
    assert grad[4, 1] == 0 and np.all(grad[7] == 0) and loss[7] == 0
    ok = [0, 4, 5, 6, 7]
    assert_grad_close(grad[ok], ref.cross_entropy_grad_ref(x, t, reduction="none")[ok], dtype)
    assert math.isnan(fastsce.cross_entropy(xf, t))
    assert not math.isnan(fastsce.cross_entropy(np.asfortranarray(x[ok]), t[ok]))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index_that_is_a_class_and_all_ignored(no_copy, reduction):
    rng = np.random.default_rng(11)
    x, view, t, axis, rng = layout_case("NCd-axis1", "hard", np.float64, seed=11, ignore_rows=())
    t[0, :4] = 3
    opts = options(make_weight(True, x.shape[axis], np.float64, rng), reduction, 0.1, 1e-3, 3, axis)
    g = make_grad_output(reduction, t.shape, rng)
    check_case(view, x, t, opts, g, np.float64, reduction)
    if HAVE_TORCH:
        t_loss, t_grad = torch_cross_entropy(x, t, **opts, grad_output=g)
        loss, grad = fastsce.cross_entropy_with_grad(view, t, **opts, grad_output=g)
        assert_loss_close(loss, t_loss, np.float64, reduction)
        assert_grad_close(grad, t_grad, np.float64)
    all_ignored = np.full_like(t, -100)
    loss, grad = fastsce.cross_entropy_with_grad(view, all_ignored, reduction=reduction, axis=axis, z_loss=1e-3)
    assert np.all(grad == 0)
    if reduction == "mean":
        assert math.isnan(loss)
    elif reduction == "sum":
        assert loss == 0.0
    else:
        assert np.all(loss == 0)


def test_bad_class_index_names_the_row(no_copy):
    x = np.zeros((2, 5, 3))
    t = np.zeros((2, 3), np.int64)
    t[1, 2] = 9
    before = x.copy()
    with pytest.raises(ValueError, match=r"target\[1, 2\].*9"):
        fastsce.cross_entropy_with_grad(x, t, axis=1, inplace=True)
    with pytest.raises(ValueError, match=r"target\[2\].*-3"):
        fastsce.cross_entropy(np.asfortranarray(x[0]), np.array([0, 1, -3, 2, 2]))
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("dtype", [np.float16])
def test_16bit_keeps_the_row_kernels(dtype):
    """16-bit logits in a column layout are copied (in 16 bits) to the row kernels:
    the result is the float32 computation on the same values, rounded once."""
    rng = np.random.default_rng(12)
    x = make_logits((6, 9, 5), dtype, rng)
    t = make_target("hard", x, 1, rng, (3,))
    loss, grad = fastsce.cross_entropy_with_grad(x, t, axis=1, reduction="none")
    loss32, grad32 = fastsce.cross_entropy_with_grad(x.astype(np.float32), t, axis=1, reduction="none")
    assert loss.dtype == dtype and grad.dtype == dtype
    np.testing.assert_array_equal(loss, loss32.astype(dtype))
    np.testing.assert_array_equal(grad, grad32.astype(dtype))


# -------------------------------------------------------------- determinism ----
@needs_two_threads
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("layout", ["fortran", "NCd"])
def test_deterministic_across_threads(no_copy, kind, layout):
    """Loss sums per tile, tiles cut from the shape alone: bitwise the same for 1 and
    2 threads and across runs (many tiles, so that both threads get work)."""
    rng = np.random.default_rng(13)
    if layout == "fortran":
        x, axis = np.asfortranarray(make_logits((1000, 67), np.float32, rng)), -1
    else:
        x, axis = make_logits((4, 67, 250), np.float32, rng), 1
    t = make_target(kind, x, axis, rng, range(0, 1000, 37))
    t = np.asfortranarray(t) if kind == "soft" and layout == "fortran" else t
    w = make_weight(True, 67, np.float32, rng)
    results = []
    for n_threads in (1, 2, 1, 2):
        with fastsce.threads(n_threads):
            row = []
            for reduction in ("mean", "sum"):
                opts = options(w, reduction, 0.1, 1e-3, axis=axis)
                row.append(fastsce.cross_entropy(x, t, **opts))
                loss, grad = fastsce.cross_entropy_with_grad(x, t, **opts)
                row.extend([loss, grad.tobytes()])
            results.append(row)
    assert all(r == results[0] for r in results[1:])
    opts = options(w, "mean", 0.1, 1e-3, axis=axis)
    assert_loss_close(results[0][0], ref.cross_entropy_ref(x, t, **opts), np.float32, "mean")
