"""Tests of cross_entropy, cross_entropy_with_grad and nll_loss (design.md §1, §3).

Values are compared with the naive float64 references in tests/reference.py and, when
torch is installed, with ``torch.nn.functional.cross_entropy``/``nll_loss`` in float64
(the z-loss added with torch ops, as design.md §3 defines it). References are computed
from the very values passed to fastsce (float32 inputs converted exactly to float64).

Tolerances: losses 1e-6 (float32) / 1e-12 (float64) relative; gradients max abs error
<= 4e-6 (float32) / 1e-12 (float64) times max |reference gradient|.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsce
from tests import reference as ref
from tests.conftest import FLOAT_DTYPES, jit_or_pure, needs_two_threads, tiny_long_rows

REDUCTIONS = ("mean", "sum", "none")
LOSS_RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
GRAD_RTOL = {np.dtype(np.float32): 4e-6, np.dtype(np.float64): 1e-12}
N_ROWS, N_CLASSES = 13, 11
try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False
IGNORED_ROWS = (2, 7)


# ------------------------------------------------------------------------ helpers ----
def make_logits(shape, dtype, rng, scale=2.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(dtype)


def make_target(kind, logits, axis, rng, ignore_rows=(), ignore_index=-100) -> np.ndarray:
    """Class indices (int64, logits' shape without ``axis``; ``ignore_rows`` are flat
    indices set to ``ignore_index``) or probabilities (logits' shape and dtype)."""
    axis = axis % logits.ndim
    c = logits.shape[axis]
    if kind == "hard":
        shape = logits.shape[:axis] + logits.shape[axis + 1 :]
        t = rng.integers(0, c, size=shape).astype(np.int64)
        t.reshape(-1)[list(ignore_rows)] = ignore_index
        return t
    p = rng.random(logits.shape) + 0.05
    return (p / p.sum(axis=axis, keepdims=True)).astype(logits.dtype)


def make_weight(weighted, c, dtype, rng):
    return rng.uniform(0.2, 2.0, c).astype(dtype) if weighted else None


def make_grad_output(reduction, loss_shape, rng):
    if reduction == "none":
        return rng.uniform(0.5, 2.0, loss_shape)
    return 1.7


def assert_loss_close(got, expected, dtype, reduction, rtol=None) -> None:
    """``got`` has the right type and is within ``rtol`` relative of ``expected``."""
    dtype = np.dtype(dtype)
    rtol = LOSS_RTOL[dtype] if rtol is None else rtol
    if reduction == "none":
        assert isinstance(got, np.ndarray), type(got)
        assert got.dtype == dtype, got.dtype
        expected = np.asarray(expected, np.float64)
        assert got.shape == expected.shape, (got.shape, expected.shape)
        got64 = got.astype(np.float64)
        assert np.array_equal(np.isnan(got64), np.isnan(expected)), (got, expected)
        ok = ~np.isnan(expected)
        err = np.abs(got64[ok] - expected[ok])
        bound = rtol * np.abs(expected[ok])
        assert np.all(err <= bound), (
            f"per-row losses off: max err/bound {np.max(err / np.where(bound > 0, bound, 1e-300)):.3g}\n"
            f"got {got64}\nexpected {expected}"
        )
    else:
        assert type(got) is float, type(got)
        if math.isnan(expected):
            assert math.isnan(got), got
        else:
            assert abs(got - expected) <= rtol * abs(expected), (
                got,
                expected,
                abs(got - expected) / abs(expected),
            )


def assert_loss_close_cond(got, expected, cond, dtype, reduction) -> None:
    """Like :func:`assert_loss_close` with the bound ``rtol · cond`` (see
    :func:`loss_condition`) instead of ``rtol · |expected|``."""
    dtype = np.dtype(dtype)
    rtol = LOSS_RTOL[dtype]
    if reduction == "none":
        assert isinstance(got, np.ndarray) and got.dtype == dtype, got
        assert got.shape == np.shape(expected), (got.shape, np.shape(expected))
        got64 = got.astype(np.float64)
        assert np.array_equal(np.isnan(got64), np.isnan(expected)), (got, expected)
        assert np.array_equal(np.isposinf(got64), np.isposinf(expected)), (got, expected)
        ok = np.isfinite(expected)
        err = np.abs(got64[ok] - expected[ok])
        assert np.all(err <= rtol * cond[ok]), (got, expected)
    else:
        assert type(got) is float, type(got)
        if math.isnan(expected):
            assert math.isnan(got), got
        else:
            assert abs(got - expected) <= rtol * cond, (got, expected)


def assert_grad_close(got, expected, dtype, rtol=None) -> None:
    """Max abs error <= rtol · max |expected| (NaN exactly where expected is NaN)."""
    dtype = np.dtype(dtype)
    rtol = GRAD_RTOL[dtype] if rtol is None else rtol
    assert isinstance(got, np.ndarray)
    assert got.dtype == dtype, got.dtype
    assert got.shape == expected.shape, (got.shape, expected.shape)
    got64 = got.astype(np.float64)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got64), nan), np.argwhere(np.isnan(got64) != nan)[:5]
    if nan.all():
        return
    scale = np.max(np.abs(expected[~nan]))
    err = np.max(np.abs(got64[~nan] - expected[~nan]))
    assert err <= rtol * scale, f"gradient max err {err:.3e} > {rtol:.0e} × scale {scale:.3e}"


def options(weight, reduction, label_smoothing, z_loss, ignore_index=-100, axis=-1) -> dict:
    return {
        "weight": weight,
        "ignore_index": ignore_index,
        "reduction": reduction,
        "label_smoothing": label_smoothing,
        "z_loss": z_loss,
        "axis": axis,
    }


def torch_cross_entropy(
    logits, target, *, weight, ignore_index, reduction, label_smoothing, z_loss, axis, grad_output
):
    """``(loss, grad)`` from torch in float64, class dim moved to 1, z-loss added by hand."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    axis = axis % logits.ndim
    x = torch.tensor(
        np.moveaxis(np.asarray(logits, np.float64), axis, 1), dtype=torch.float64, requires_grad=True
    )
    target = np.asarray(target)
    soft = target.dtype.kind == "f"
    if soft:
        t = torch.tensor(np.moveaxis(target.astype(np.float64), axis, 1), dtype=torch.float64)
    else:
        t = torch.tensor(target.astype(np.int64))
    w = None if weight is None else torch.tensor(np.asarray(weight, np.float64), dtype=torch.float64)
    loss = F.cross_entropy(
        x, t, weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    if z_loss:
        lse = torch.logsumexp(x, dim=1)
        mask = torch.ones_like(lse) if soft else (t != ignore_index).to(torch.float64)
        z = z_loss * lse * lse * mask
        if reduction == "none":
            loss = loss + z
        elif reduction == "sum":
            loss = loss + z.sum()
        else:
            loss = loss + z.sum() / mask.sum()
    g = torch.tensor(np.asarray(grad_output, np.float64), dtype=torch.float64)
    (loss * g).sum().backward()
    loss_np = loss.detach().numpy()
    loss_out = loss_np if reduction == "none" else float(loss_np)
    return loss_out, np.moveaxis(x.grad.numpy(), 1, axis)


GRID = list(
    itertools.product(["hard", "soft"], FLOAT_DTYPES, [False, True], REDUCTIONS, [0.0, 0.1], [0.0, 1e-3])
)
GRID_IDS = [f"{k}-{np.dtype(d).name}-{'w' if w else 'nw'}-{r}-ls{ls}-z{z}" for k, d, w, r, ls, z in GRID]


def grid_case(kind, dtype, weighted, seed=0):
    rng = np.random.default_rng(seed)
    x = make_logits((N_ROWS, N_CLASSES), dtype, rng)
    t = make_target(kind, x, -1, rng, IGNORED_ROWS)
    w = make_weight(weighted, N_CLASSES, dtype, rng)
    return x, t, w, rng


# --------------------------------------------------------------- grid: reference ----
# The grid's 13 rows are fewer than one group of the few-class tiles' in-register
# transposes (16 float32 or 8 float64 rows): these shapes take whole groups and a tail.
@pytest.mark.parametrize("shape", [(70, 10), (45, 7)], ids=["70x10", "45x7"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("weighted", "reduction", "ls", "z"),
                         [(False, "mean", 0.0, 0.0), (True, "none", 0.1, 1e-3), (True, "sum", 0.0, 1e-3),
                          (False, "none", 0.1, 0.0)])
def test_few_class_tiles_vs_reference(shape, dtype, weighted, reduction, ls, z):
    rng = np.random.default_rng(3)
    x = make_logits(shape, dtype, rng)
    ignored = (1, 17, shape[0] - 1)
    t = make_target("hard", x, -1, rng, ignored)
    opts = options(make_weight(weighted, shape[1], dtype, rng), reduction, ls, z)
    g = make_grad_output(reduction, (shape[0],), rng)
    expected = ref.cross_entropy_ref(x, t, **opts)
    assert_loss_close(fastsce.cross_entropy(x, t, **opts), expected, dtype, reduction)
    loss, grad = fastsce.cross_entropy_with_grad(x, t, **opts, grad_output=g)
    assert_loss_close(loss, expected, dtype, reduction)
    assert_grad_close(grad, ref.cross_entropy_grad_ref(x, t, **opts, grad_output=g), dtype)
    assert np.all(grad[list(ignored)] == 0)


@pytest.mark.parametrize(("kind", "dtype", "weighted", "reduction", "ls", "z"), GRID, ids=GRID_IDS)
def test_grid_vs_reference(kind, dtype, weighted, reduction, ls, z):
    x, t, w, rng = grid_case(kind, dtype, weighted)
    x0, t0 = x.copy(), t.copy()
    opts = options(w, reduction, ls, z)
    g = make_grad_output(reduction, (N_ROWS,), rng)
    expected = ref.cross_entropy_ref(x, t, **opts)
    assert_loss_close(fastsce.cross_entropy(x, t, **opts), expected, dtype, reduction)
    loss, grad = fastsce.cross_entropy_with_grad(x, t, **opts, grad_output=g)
    assert_loss_close(loss, expected, dtype, reduction)
    assert_grad_close(grad, ref.cross_entropy_grad_ref(x, t, **opts, grad_output=g), dtype)
    if kind == "hard":
        assert np.all(grad[list(IGNORED_ROWS)] == 0)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(t, t0)


# ------------------------------------------------------------------- grid: torch ----
@pytest.mark.parametrize(("kind", "dtype", "weighted", "reduction", "ls", "z"), GRID, ids=GRID_IDS)
def test_grid_vs_torch(kind, dtype, weighted, reduction, ls, z):
    pytest.importorskip("torch")
    x, t, w, rng = grid_case(kind, dtype, weighted, seed=1)
    opts = options(w, reduction, ls, z)
    g = make_grad_output(reduction, (N_ROWS,), rng)
    t_loss, t_grad = torch_cross_entropy(x, t, **opts, grad_output=g)
    # the references agree with torch (a check of tests/reference.py itself)
    assert_loss_close(ref.cross_entropy_ref(x, t, **opts), t_loss, np.float64, reduction)
    assert_grad_close(ref.cross_entropy_grad_ref(x, t, **opts, grad_output=g), t_grad, np.float64)
    assert_loss_close(fastsce.cross_entropy(x, t, **opts), t_loss, dtype, reduction)
    loss, grad = fastsce.cross_entropy_with_grad(x, t, **opts, grad_output=g)
    assert_loss_close(loss, t_loss, dtype, reduction)
    assert_grad_close(grad, t_grad, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index_that_is_a_class_vs_torch(reduction):
    """``ignore_index`` may be a valid class: those rows are skipped, as in torch."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = make_logits((20, 6), np.float64, rng)
    t = rng.integers(0, 6, 20)
    t[:3] = 4
    w = make_weight(True, 6, np.float64, rng)
    opts = options(w, reduction, 0.1, 1e-3, ignore_index=4)
    g = make_grad_output(reduction, (20,), rng)
    t_loss, t_grad = torch_cross_entropy(x, t, **opts, grad_output=g)
    loss, grad = fastsce.cross_entropy_with_grad(x, t, **opts, grad_output=g)
    assert_loss_close(loss, t_loss, np.float64, reduction)
    assert_grad_close(grad, t_grad, np.float64)
    assert np.all(grad[t == 4] == 0)


# ----------------------------------------------------------------- edge semantics ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("z", [0.0, 1e-3])
def test_all_rows_ignored(dtype, z):
    rng = np.random.default_rng(3)
    x = make_logits((5, 4), dtype, rng)
    t = np.full(5, -100)
    w = make_weight(True, 4, dtype, rng)
    for weight in (None, w):
        opts = {"weight": weight, "label_smoothing": 0.1, "z_loss": z}
        assert math.isnan(fastsce.cross_entropy(x, t, reduction="mean", **opts))
        assert fastsce.cross_entropy(x, t, reduction="sum", **opts) == 0.0
        none = fastsce.cross_entropy(x, t, reduction="none", **opts)
        assert none.dtype == dtype and none.shape == (5,) and np.all(none == 0)
        for reduction in REDUCTIONS:
            loss, grad = fastsce.cross_entropy_with_grad(x, t, reduction=reduction, **opts)
            assert grad.dtype == dtype and grad.shape == x.shape
            assert np.all(grad == 0), (reduction, grad)
        loss, _ = fastsce.cross_entropy_with_grad(x, t, reduction="mean", **opts)
        assert math.isnan(loss)


def test_weighted_mean_denominator():
    """ "mean" divides by Σ w[t] over counted rows, not by the number of rows."""
    x = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0], [0.3, 0.1, 0.2]])
    t = np.array([0, 2, -100, 1])
    w = np.array([0.5, 2.0, 4.0])
    lse = np.log(np.sum(np.exp(x), axis=1))
    rows = [0, 1, 3]
    numerator = sum(w[t[i]] * (lse[i] - x[i, t[i]]) for i in rows)
    denominator = w[0] + w[2] + w[1]
    got = fastsce.cross_entropy(x, t, weight=w)
    assert math.isclose(got, numerator / denominator, rel_tol=1e-13)
    assert not math.isclose(got, numerator / 3, rel_tol=1e-3)
    assert math.isclose(fastsce.cross_entropy(x, t, weight=w, reduction="sum"), numerator, rel_tol=1e-13)
    # z-loss: divided by the number of counted rows, unweighted
    z = 0.01
    got_z = fastsce.cross_entropy(x, t, weight=w, z_loss=z)
    assert math.isclose(
        got_z, numerator / denominator + z * sum(lse[i] ** 2 for i in rows) / 3, rel_tol=1e-13
    )


def test_label_smoothing_with_weights():
    """(1-ε)·w_t·(lse-x_t) + ε/C·Σ_c w_c·(lse-x_c), mean over Σ w_t (as torch)."""
    x = np.array([[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.25]])
    t = np.array([3, 1])
    w = np.array([0.5, 2.0, 4.0, 1.5])
    eps, c = 0.2, 4
    lse = np.log(np.sum(np.exp(x), axis=1))
    rows = [
        (1 - eps) * w[t[i]] * (lse[i] - x[i, t[i]]) + eps / c * np.sum(w * (lse[i] - x[i])) for i in range(2)
    ]
    got = fastsce.cross_entropy(x, t, weight=w, label_smoothing=eps, reduction="none")
    np.testing.assert_allclose(got, rows, rtol=1e-13)
    got = fastsce.cross_entropy(x, t, weight=w, label_smoothing=eps)
    assert math.isclose(got, sum(rows) / (w[3] + w[1]), rel_tol=1e-13)


ND_CASES = [((2, 3, 7), -1), ((2, 7, 3), 1), ((7, 2, 3), 0), ((2, 3, 4, 7), 2)]


@pytest.mark.parametrize(("shape", "axis"), ND_CASES, ids=[f"{s}-axis{a}" for s, a in ND_CASES])
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nd_logits(shape, axis, kind, reduction):
    rng = np.random.default_rng(4)
    x = make_logits(shape, np.float64, rng)
    t = make_target(kind, x, axis, rng, ignore_rows=(1, 4))
    w = make_weight(True, shape[axis], np.float64, rng)
    opts = options(w, reduction, 0.1, 1e-3, axis=axis)
    loss_shape = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    g = make_grad_output(reduction, loss_shape, rng)
    loss, grad = fastsce.cross_entropy_with_grad(x, t, **opts, grad_output=g)
    assert_loss_close(loss, ref.cross_entropy_ref(x, t, **opts), np.float64, reduction)
    assert_grad_close(grad, ref.cross_entropy_grad_ref(x, t, **opts, grad_output=g), np.float64)
    if reduction == "none":
        assert loss.shape == loss_shape
    if HAVE_TORCH:
        t_loss, t_grad = torch_cross_entropy(x, t, **opts, grad_output=g)
        assert_loss_close(loss, t_loss, np.float64, reduction)
        assert_grad_close(grad, t_grad, np.float64)


def layouts(x):
    """``(name, view)`` of the same logits in other memory layouts."""
    n, c = x.shape
    wide = np.zeros((n, 2 * c), x.dtype)
    wide[:, ::2] = x
    tall = np.zeros((2 * n, c), x.dtype)
    tall[::2] = x
    rev = x[::-1, ::-1].copy()[::-1, ::-1]
    return [
        ("fortran", np.asfortranarray(x)),
        ("column_stride", wide[:, ::2]),
        ("row_stride", tall[::2]),
        ("negative", rev),
    ]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_layouts(dtype, kind, reduction):
    rng = np.random.default_rng(5)
    x = make_logits((9, 6), dtype, rng)
    t = make_target(kind, x, -1, rng, ignore_rows=(3,))
    w = make_weight(True, 6, dtype, rng)
    opts = options(w, reduction, 0.1, 1e-3)
    g = make_grad_output(reduction, (9,), rng)
    expected = ref.cross_entropy_ref(x, t, **opts)
    expected_grad = ref.cross_entropy_grad_ref(x, t, **opts, grad_output=g)
    for name, view in layouts(x):
        np.testing.assert_array_equal(view, x)
        before = view.copy()
        targets = [t] if kind == "hard" else [t, np.asfortranarray(t), layouts(t)[3][1]]
        for tt in targets:
            assert_loss_close(fastsce.cross_entropy(view, tt, **opts), expected, dtype, reduction)
            loss, grad = fastsce.cross_entropy_with_grad(view, tt, **opts, grad_output=g)
            assert_loss_close(loss, expected, dtype, reduction)
            assert_grad_close(grad, expected_grad, dtype)
            np.testing.assert_array_equal(view, before, err_msg=name)
        _, grad = fastsce.cross_entropy_with_grad(view, t, **opts, grad_output=g, inplace=True)
        assert grad is view
        assert_grad_close(grad, expected_grad, dtype)


def test_layouts_3d_axis1():
    rng = np.random.default_rng(6)
    x = np.asfortranarray(make_logits((3, 5, 4), np.float32, rng))
    t = make_target("hard", x, 1, rng, ignore_rows=(2,))
    opts = options(None, "none", 0.0, 1e-3, axis=1)
    g = make_grad_output("none", (3, 4), rng)
    loss, grad = fastsce.cross_entropy_with_grad(x, t, **opts, grad_output=g)
    assert_loss_close(loss, ref.cross_entropy_ref(x, t, **opts), np.float32, "none")
    assert_grad_close(grad, ref.cross_entropy_grad_ref(x, t, **opts, grad_output=g), np.float32)
    xs = x[:, :, ::-1]
    ts = t[:, ::-1]
    loss, grad = fastsce.cross_entropy_with_grad(xs, ts, **opts, grad_output=g)
    assert_loss_close(loss, ref.cross_entropy_ref(xs, ts, **opts), np.float32, "none")
    assert_grad_close(grad, ref.cross_entropy_grad_ref(xs, ts, **opts, grad_output=g), np.float32)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_read_only_logits(kind):
    rng = np.random.default_rng(7)
    x = make_logits((6, 5), np.float32, rng)
    t = make_target(kind, x, -1, rng, ignore_rows=(1,))
    x.setflags(write=False)
    t.setflags(write=False)
    w = make_weight(True, 5, np.float32, rng)
    w.setflags(write=False)
    opts = options(w, "mean", 0.1, 1e-3)
    assert_loss_close(
        fastsce.cross_entropy(x, t, **opts), ref.cross_entropy_ref(x, t, **opts), np.float32, "mean"
    )
    _, grad = fastsce.cross_entropy_with_grad(x, t, **opts)
    assert grad.flags.writeable
    assert_grad_close(grad, ref.cross_entropy_grad_ref(x, t, **opts), np.float32)
    with pytest.raises(ValueError):
        fastsce.cross_entropy_with_grad(x, t, **opts, inplace=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_inputs_not_modified(dtype, kind):
    rng = np.random.default_rng(8)
    x = make_logits((7, 5), dtype, rng)
    t = make_target(kind, x, -1, rng, ignore_rows=(0,))
    w = make_weight(True, 5, dtype, rng)
    g = rng.uniform(0.5, 2.0, 7)
    copies = [a.copy() for a in (x, t, w, g)]
    for reduction in REDUCTIONS:
        opts = options(w, reduction, 0.1, 1e-3)
        fastsce.cross_entropy(x, t, **opts, return_lse=True, return_argmax=True)
        fastsce.cross_entropy_with_grad(
            x, t, **opts, grad_output=g if reduction == "none" else 1.0, return_lse=True, return_argmax=True
        )
    for a, b in zip((x, t, w, g), copies):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_out(dtype, kind):
    rng = np.random.default_rng(9)
    x = make_logits((8, 6), dtype, rng)
    t = make_target(kind, x, -1, rng, ignore_rows=(5,))
    opts = options(None, "sum", 0.1, 1e-3)
    expected = ref.cross_entropy_grad_ref(x, t, **opts, grad_output=0.5)
    for out in (
        np.full_like(x, np.nan),
        np.asfortranarray(np.full_like(x, np.nan)),
        np.full((8, 12), np.nan, dtype)[:, ::2],
    ):
        loss, grad = fastsce.cross_entropy_with_grad(x, t, **opts, grad_output=0.5, out=out)
        assert grad is out
        assert_loss_close(loss, ref.cross_entropy_ref(x, t, **opts), dtype, "sum")
        assert_grad_close(out, expected, dtype)
    with pytest.raises(ValueError):
        fastsce.cross_entropy_with_grad(x, t, **opts, out=np.empty((8, 5), dtype))
    with pytest.raises(ValueError):
        fastsce.cross_entropy_with_grad(x, t, **opts, out=np.empty((6, 8), dtype))
    other = np.float32 if dtype == np.float64 else np.float64
    with pytest.raises(TypeError):
        fastsce.cross_entropy_with_grad(x, t, **opts, out=np.empty((8, 6), other))
    with pytest.raises(ValueError):
        fastsce.cross_entropy_with_grad(x, t, **opts, out=np.empty_like(x), inplace=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inplace(dtype, kind, reduction):
    rng = np.random.default_rng(10)
    x = make_logits((12, 9), dtype, rng)
    t = make_target(kind, x, -1, rng, ignore_rows=(4,))
    w = make_weight(True, 9, dtype, rng)
    opts = options(w, reduction, 0.1, 1e-3)
    g = make_grad_output(reduction, (12,), rng)
    _, grad = fastsce.cross_entropy_with_grad(x, t, **opts, grad_output=g)
    buf = x.copy()
    loss2, grad2 = fastsce.cross_entropy_with_grad(buf, t, **opts, grad_output=g, inplace=True)
    assert grad2 is buf
    np.testing.assert_array_equal(grad2, grad)
    assert_loss_close(loss2, ref.cross_entropy_ref(x, t, **opts), dtype, reduction)
    assert_grad_close(buf, ref.cross_entropy_grad_ref(x, t, **opts, grad_output=g), dtype)


def test_out_overlapping_logits():
    """``out`` sharing memory with the logits without being them still gives the right gradient."""
    rng = np.random.default_rng(11)
    base = make_logits((6, 10), np.float64, rng)
    x = base[:, :5].copy()
    buf = np.zeros((6, 10))
    buf[:, 1:6] = x
    logits, out = buf[:, 1:6], buf[:, 0:5]
    t = make_target("hard", x, -1, rng)
    expected = ref.cross_entropy_grad_ref(x, t)
    _, grad = fastsce.cross_entropy_with_grad(logits, t, out=out)
    assert grad is out
    assert_grad_close(out, expected, np.float64)


SINGLE_CLASS = [((3, 1), -1), ((1, 1), -1), ((1, 3), 0), ((2, 1, 3), 1), ((2, 3, 1), -1)]


@pytest.mark.parametrize(("shape", "axis"), SINGLE_CLASS, ids=[f"{s}-axis{a}" for s, a in SINGLE_CLASS])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_single_class(shape, axis, dtype, kind, reduction):
    """C = 1: lse = x, the cross-entropy is 0, only the z-loss λ·x² remains; grad 2λ·x·g/Dz."""
    rng = np.random.default_rng(20)
    x = make_logits(shape, dtype, rng)
    t = make_target(kind, x, axis, rng)
    opts = options(None, reduction, 0.1, 0.1, axis=axis)
    loss_shape = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
    g = make_grad_output(reduction, loss_shape, rng)
    expected = ref.cross_entropy_ref(x, t, **opts)
    cond = loss_condition(x, t, **opts)
    assert_loss_close_cond(fastsce.cross_entropy(x, t, **opts), expected, cond, dtype, reduction)
    loss, grad, lse, argmax = fastsce.cross_entropy_with_grad(
        x, t, **opts, grad_output=g, return_lse=True, return_argmax=True
    )
    assert_loss_close_cond(loss, expected, cond, dtype, reduction)
    assert_grad_close(grad, ref.cross_entropy_grad_ref(x, t, **opts, grad_output=g), dtype)
    np.testing.assert_array_equal(lse, np.squeeze(x, axis))
    np.testing.assert_array_equal(argmax, np.zeros(loss_shape, np.int64))


# --------------------------------------------------------------- non-finite logits ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_nan_logits_row(dtype, kind):
    rng = np.random.default_rng(12)
    x = make_logits((6, 5), dtype, rng)
    x[2, 3] = np.nan
    t = make_target(kind, x, -1, rng)
    if kind == "hard":
        t[2] = 1  # the NaN is not at the target
    none = fastsce.cross_entropy(x, t, reduction="none")
    assert np.isnan(none[2]) and np.all(np.isfinite(np.delete(none, 2)))
    assert math.isnan(fastsce.cross_entropy(x, t))
    assert math.isnan(fastsce.cross_entropy(x, t, reduction="sum"))
    loss, grad = fastsce.cross_entropy_with_grad(x, t, reduction="none")
    assert np.isnan(loss[2])
    assert np.all(np.isnan(grad[2]))
    rest = np.delete(np.arange(6), 2)
    assert np.all(np.isfinite(grad[rest]))
    expected = ref.cross_entropy_grad_ref(x, t, reduction="none")
    assert_grad_close(grad[rest], expected[rest], dtype)
    assert_loss_close(loss[rest], ref.cross_entropy_ref(x, t, reduction="none")[rest], dtype, "none")
    _, grad = fastsce.cross_entropy_with_grad(x, t)
    assert np.all(np.isnan(grad[2])) and np.all(np.isfinite(grad[rest]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_minus_inf_logits(dtype, weighted):
    """-inf logits away from the target: probability 0, finite loss and gradient."""
    rng = np.random.default_rng(13)
    x = make_logits((6, 5), dtype, rng)
    t = np.array([0, 1, 2, 3, 4, -100])
    x[0, 3] = x[1, 0] = x[1, 4] = x[4, :4] = x[5, :] = -np.inf
    w = make_weight(weighted, 5, dtype, rng)
    for reduction in REDUCTIONS:
        opts = options(w, reduction, 0.0, 1e-3)
        g = make_grad_output(reduction, (6,), rng)
        expected = ref.cross_entropy_ref(x, t, **opts)
        assert np.all(np.isfinite(expected))
        # rows with few finite logits have small losses: bound relative to the terms' size
        cond = loss_condition(x, t, **opts)
        assert_loss_close_cond(fastsce.cross_entropy(x, t, **opts), expected, cond, dtype, reduction)
        loss, grad = fastsce.cross_entropy_with_grad(x, t, **opts, grad_output=g)
        assert_loss_close_cond(loss, expected, cond, dtype, reduction)
        expected_grad = ref.cross_entropy_grad_ref(x, t, **opts, grad_output=g)
        assert_grad_close(grad, expected_grad, dtype)
        assert grad[0, 3] == 0 and grad[1, 0] == 0 and np.all(grad[4, :4] == 0)
    # label smoothing puts mass on the -inf classes: infinite loss, finite gradient (as torch)
    opts = options(w, "none", 0.1, 0.0)
    loss, grad = fastsce.cross_entropy_with_grad(x, t, **opts)
    assert np.isposinf(loss[0]) and np.isfinite(loss[2]) and loss[5] == 0
    assert_grad_close(grad, ref.cross_entropy_grad_ref(x, t, **opts), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_plus_inf_logit_not_at_target(dtype):
    rng = np.random.default_rng(14)
    x = make_logits((4, 5), dtype, rng)
    t = np.array([0, 1, 2, 3])
    x[1, 3] = np.inf
    loss, grad = fastsce.cross_entropy_with_grad(x, t, reduction="none")
    assert np.all(np.isnan(grad[1]))
    rest = [0, 2, 3]
    assert np.all(np.isfinite(grad[rest]))
    assert_grad_close(grad[rest], ref.cross_entropy_grad_ref(x, t, reduction="none")[rest], dtype)
    assert np.all(np.isfinite(loss[rest]))


def test_plus_inf_logit_loss_vs_torch():
    """The loss of a row holding +inf is what torch gives (NaN: design.md §3, bad rows)."""
    torch = pytest.importorskip("torch")
    x = np.array([[0.0, 1.0, np.inf], [0.5, 0.25, -1.0]])
    t = np.array([0, 1])
    expected = torch.nn.functional.cross_entropy(torch.tensor(x), torch.tensor(t), reduction="none").numpy()
    got = fastsce.cross_entropy(x, t, reduction="none")
    assert np.isnan(expected[0])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=f"got {got}, torch {expected}")


# -------------------------------------------------------------------- bad input ----
@pytest.mark.parametrize("bad", [5, 6, 9, -1, -7])
@pytest.mark.parametrize("with_grad", [False, True])
def test_bad_class_index(bad, with_grad):
    rng = np.random.default_rng(15)
    x = make_logits((6, 5), np.float32, rng)
    t = np.array([0, 4, -100, bad, 1, 2])
    x0 = x.copy()
    with pytest.raises(ValueError) as info:
        if with_grad:
            fastsce.cross_entropy_with_grad(x, t, inplace=True)
        else:
            fastsce.cross_entropy(x, t)
    message = str(info.value)
    assert "target[3]" in message and str(bad) in message, message
    np.testing.assert_array_equal(x, x0)


def test_bad_class_index_nd():
    x = np.zeros((2, 3, 4))
    t = np.zeros((2, 3), np.int64)
    t[1, 2] = 17
    with pytest.raises(ValueError, match=r"target\[1, 2\].*17"):
        fastsce.cross_entropy_with_grad(x, t)
    with pytest.raises(ValueError, match="17"):
        fastsce.nll_loss(x, t)


def test_bad_target_dtypes_and_shapes():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match="integer"):
        fastsce.cross_entropy(x, np.array([0.0, 1.0, 2.0, 1.0]))
    with pytest.raises(TypeError):
        fastsce.cross_entropy(x, np.array([True, False, True, False]))
    with pytest.raises(TypeError):
        fastsce.cross_entropy_with_grad(x, np.array([True, False, True, False]))
    with pytest.raises(ValueError):
        fastsce.cross_entropy(x, np.array([0, 1, 2]))
    with pytest.raises(ValueError):
        fastsce.cross_entropy(x, np.zeros((4, 1), np.int64))
    with pytest.raises(ValueError):
        fastsce.cross_entropy(x, np.zeros((4, 4)))
    with pytest.raises(ValueError):
        fastsce.cross_entropy_with_grad(x, np.zeros((3, 4)))


@pytest.mark.parametrize("func", ["cross_entropy", "cross_entropy_with_grad", "nll_loss"])
def test_bad_options(func):
    f = getattr(fastsce, func)
    x = np.zeros((4, 3))
    t = np.array([0, 1, 2, 1])
    with pytest.raises(ValueError):
        f(x, t, weight=np.ones(4))
    with pytest.raises(ValueError):
        f(x, t, weight=np.ones(2))
    with pytest.raises(ValueError):
        f(x, t, weight=np.ones((1, 3)))
    with pytest.raises(ValueError):
        f(x, t, reduction="avg")
    if func != "nll_loss":
        for ls in (1.5, -0.1):
            with pytest.raises(ValueError):
                f(x, t, label_smoothing=ls)
        with pytest.raises(ValueError):
            f(x, t, z_loss=-1)


def test_bad_grad_output():
    x = np.zeros((4, 3))
    t = np.array([0, 1, 2, 1])
    for reduction in ("mean", "sum"):
        with pytest.raises(ValueError):
            fastsce.cross_entropy_with_grad(x, t, reduction=reduction, grad_output=np.ones(4))
    with pytest.raises(ValueError):
        fastsce.cross_entropy_with_grad(x, t, reduction="none", grad_output=np.ones(3))
    # a scalar and a per-row array are both fine for "none"
    _, g1 = fastsce.cross_entropy_with_grad(x, t, reduction="none", grad_output=2.0)
    _, g2 = fastsce.cross_entropy_with_grad(x, t, reduction="none", grad_output=np.full(4, 2.0))
    np.testing.assert_array_equal(g1, g2)


# ----------------------------------------------------------------- determinism ----
@needs_two_threads
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_deterministic_across_threads(kind):
    rng = np.random.default_rng(16)
    n_rows = jit_or_pure(3000, 300)  # pure Python: still several loss chunks
    x = make_logits((n_rows, 257), np.float32, rng)
    t = make_target(kind, x, -1, rng, ignore_rows=range(0, n_rows, 97))
    w = make_weight(True, 257, np.float32, rng)
    results = []
    for n_threads in (1, 2, 1, 2):
        with fastsce.threads(n_threads):
            row = []
            for reduction in ("mean", "sum"):
                opts = options(w, reduction, 0.1, 1e-3)
                row.append(fastsce.cross_entropy(x, t, **opts))
                loss, grad = fastsce.cross_entropy_with_grad(x, t, **opts)
                row.extend([loss, grad])
            results.append(row)
    first = results[0]
    for other in results[1:]:
        for a, b in zip(first, other):
            if isinstance(a, np.ndarray):
                assert a.tobytes() == b.tobytes()
            else:
                assert a == b or (math.isnan(a) and math.isnan(b)), (a, b)
    opts = options(w, "mean", 0.1, 1e-3)
    assert_loss_close(first[0], ref.cross_entropy_ref(x, t, **opts), np.float32, "mean")


# ---------------------------------------------------------- return_lse / argmax ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["hard", "soft"])
# row blocks (C < SMALL_CLASSES), row kernels, column kernels
@pytest.mark.parametrize("shape_axis", [((40, 17), -1), ((12, 100), -1), ((3, 17, 5), 1)])
def test_return_lse_and_argmax(dtype, kind, shape_axis):
    shape, axis = shape_axis
    rng = np.random.default_rng(17)
    x = make_logits(shape, dtype, rng)
    t = make_target(kind, x, axis, rng, ignore_rows=(1, 6))
    lse_expected = fastsce.logsumexp(x, axis=axis)
    argmax_expected = np.argmax(x, axis=axis)
    tol = 4e-6 if dtype == np.float32 else 1e-13

    def check(lse, argmax):
        assert lse.dtype == dtype and lse.shape == lse_expected.shape
        np.testing.assert_allclose(lse, lse_expected, rtol=tol, atol=tol)
        np.testing.assert_allclose(lse, ref.logsumexp(x, axis), rtol=tol, atol=tol)
        assert argmax.dtype == np.int64
        np.testing.assert_array_equal(argmax, argmax_expected)

    for reduction in REDUCTIONS:
        opts = options(None, reduction, 0.1, 1e-3, axis=axis)
        expected = ref.cross_entropy_ref(x, t, **opts)
        loss, lse, argmax = fastsce.cross_entropy(x, t, **opts, return_lse=True, return_argmax=True)
        assert_loss_close(loss, expected, dtype, reduction)
        check(lse, argmax)
        loss, lse = fastsce.cross_entropy(x, t, **opts, return_lse=True)
        check(lse, argmax_expected)
        loss, argmax = fastsce.cross_entropy(x, t, **opts, return_argmax=True)
        check(lse_expected, argmax)
        loss, grad, lse, argmax = fastsce.cross_entropy_with_grad(
            x, t, **opts, return_lse=True, return_argmax=True
        )
        assert_loss_close(loss, expected, dtype, reduction)
        assert_grad_close(grad, ref.cross_entropy_grad_ref(x, t, **opts), dtype)
        check(lse, argmax)
        loss, grad, argmax = fastsce.cross_entropy_with_grad(x, t, **opts, return_argmax=True)
        check(lse_expected, argmax)


# ------------------------------------------------------ gradient rows in pairs ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("classes", [64, 100, 256, 257])  # paired up to 256 classes; 257 not
def test_gradient_rows_in_pairs(dtype, classes):
    """Rows of the gradient kernel are exponentiated two at a time when both count. Ignored
    rows break pairs at every offset, chunks have an odd row count (67 rows: chunks of 4,
    the last of 3), and a NaN row and a row with a masked (-inf) class must not leak into
    their partners."""
    rng = np.random.default_rng(23)
    n_rows = 67
    x = make_logits((n_rows, classes), dtype, rng, scale=4.0)
    x[9, 5] = np.nan
    x[20, 7] = -np.inf
    ignored = [1, 2, 6, 13, 14, 15, 30, 33, 66]
    t = make_target("hard", x, -1, rng, ignore_rows=ignored)
    t[20] = 8  # not the masked class: a finite loss
    w = make_weight(True, classes, dtype, rng)
    g = make_grad_output("none", (n_rows,), rng)
    for smoothing, z_loss in [(0.0, 0.0), (0.1, 1e-3)]:
        opts = options(w, "none", smoothing, z_loss)
        loss, grad, lse, argmax = fastsce.cross_entropy_with_grad(
            x, t, **opts, grad_output=g, return_lse=True, return_argmax=True
        )
        # (with label smoothing, the masked class makes row 20's loss +inf)
        assert_loss_close_cond(loss, ref.cross_entropy_ref(x, t, **opts), loss_condition(x, t, **opts), dtype, "none")
        assert_grad_close(grad, ref.cross_entropy_grad_ref(x, t, **opts, grad_output=g), dtype)
        np.testing.assert_array_equal(argmax, np.argmax(x, axis=-1))
        tol = 4e-6 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(lse, ref.logsumexp(x, -1), rtol=tol, atol=tol)
        # Each row as computed alone (a one-row call has no partner).
        for i in [0, 3, 4, 5, 9, 10, 20, 21, 65]:
            one_loss, one_grad = fastsce.cross_entropy_with_grad(x[i : i + 1], t[i : i + 1], **opts,
                                                                 grad_output=g[i : i + 1])
            np.testing.assert_allclose(loss[i], one_loss[0], rtol=LOSS_RTOL[np.dtype(dtype)], equal_nan=True)
            assert_grad_close(grad[i : i + 1], one_grad.astype(np.float64), dtype)
        assert np.all(grad[ignored] == 0)


# ---------------------------------------------------------------------- nll_loss ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_of_log_softmax_is_cross_entropy(dtype, weighted, reduction):
    rng = np.random.default_rng(18)
    x = make_logits((15, 8), dtype, rng)
    t = make_target("hard", x, -1, rng, ignore_rows=(3,))
    w = make_weight(weighted, 8, dtype, rng)
    ls = fastsce.log_softmax(x)
    got = fastsce.nll_loss(ls, t, weight=w, reduction=reduction)
    expected = fastsce.cross_entropy(x, t, weight=w, reduction=reduction)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    if reduction == "none":
        assert got.dtype == dtype and got.shape == (15,)
        np.testing.assert_allclose(got, expected, rtol=rtol)
    else:
        assert type(got) is float
        assert math.isclose(got, expected, rel_tol=rtol)
    assert_loss_close(got, ref.nll_loss_ref(ls, t, weight=w, reduction=reduction), dtype, reduction)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize(("shape", "axis"), [((15, 8), -1), ((3, 8, 4), 1), ((3, 4, 8), -1)])
def test_nll_loss_vs_torch(weighted, reduction, ignore_index, shape, axis):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(19)
    x = make_logits(shape, np.float64, rng)
    log_probs = ref.log_softmax(x, axis)
    t = make_target("hard", x, axis, rng, ignore_rows=(0, 5), ignore_index=ignore_index)
    w = make_weight(weighted, shape[axis], np.float64, rng)
    got = fastsce.nll_loss(log_probs, t, weight=w, ignore_index=ignore_index, reduction=reduction, axis=axis)
    expected = torch.nn.functional.nll_loss(
        torch.tensor(np.moveaxis(log_probs, axis, 1)),
        torch.tensor(t),
        weight=None if w is None else torch.tensor(w),
        ignore_index=ignore_index,
        reduction=reduction,
    ).numpy()
    expected = expected if reduction == "none" else float(expected)
    assert_loss_close(got, expected, np.float64, reduction)
    assert_loss_close(
        got, ref.nll_loss_ref(log_probs, t, w, ignore_index, reduction, axis), np.float64, reduction
    )


def test_nll_loss_rejects_probabilities():
    with pytest.raises(TypeError):
        fastsce.nll_loss(np.zeros((2, 3)), np.full((2, 3), 1 / 3))


# -------------------------------------------------------------------- hypothesis ----
def loss_condition(
    x, t, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, axis=-1
):
    """Magnitude of the terms of the loss (per row for "none"), with ``1 + |lse| + |x_c|``
    for each ``lse - x_c``: the scale of its rounding error, for cases where the loss
    itself may be ~0 (one class, a dominant target logit)."""
    eps, z = label_smoothing, z_loss
    xr, tr, wr, soft, loss_shape = ref._xent_rows(x, t, weight, axis)
    n, c = xr.shape
    counted, d, dz = ref._xent_denominators(tr, wr, soft, ignore_index, reduction)
    ce = np.zeros(n)
    zz = np.zeros(n)
    for i in range(n):
        if not counted[i]:
            continue
        lse = abs(float(ref.logsumexp(xr[i])))
        terms = 1.0 + lse + np.abs(xr[i])
        if soft:
            ce[i] = np.sum(wr * ((1 - eps) * tr[i] + eps / c) * terms)
        else:
            ce[i] = (1 - eps) * wr[tr[i]] * terms[tr[i]] + (eps / c * np.sum(wr * terms) if eps else 0.0)
        zz[i] = z * (1.0 + lse) ** 2 if z else 0.0
    if reduction == "none":
        return (ce + zz).reshape(loss_shape)
    if reduction == "sum":
        return float(np.sum(ce) + np.sum(zz))
    return float(np.sum(ce) / d + (np.sum(zz) / dz if z else 0.0)) if d else math.nan


@st.composite
def xent_cases(draw, max_rows=20, max_classes=30, dtypes=FLOAT_DTYPES, min_classes=1):
    n = draw(st.integers(1, max_rows))
    c = draw(st.integers(min_classes, max_classes))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    soft = draw(st.booleans())
    weighted = draw(st.booleans())
    reduction = draw(st.sampled_from(REDUCTIONS))
    eps = draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
    z = draw(st.sampled_from([0.0, 1e-4, 0.1]))
    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    ignore_frac = draw(st.sampled_from([0.0, 0.3, 1.0]))
    rng = np.random.default_rng(seed)
    x = make_logits((n, c), dtype, rng, scale=scale)
    if soft:
        t = make_target("soft", x, -1, rng)
    else:
        t = rng.integers(0, c, n)
        t[rng.random(n) < ignore_frac] = ignore_index
    w = make_weight(weighted, c, dtype, rng)
    g = make_grad_output(reduction, (n,), rng)
    return x, t, options(w, reduction, eps, z, ignore_index), g


@given(xent_cases())
def test_hypothesis_vs_reference(case):
    x, t, opts, g = case
    dtype = x.dtype
    reduction = opts["reduction"]
    soft = t.dtype.kind == "f"
    expected = ref.cross_entropy_ref(x, t, **opts)
    cond = loss_condition(x, t, **opts)
    for loss in (
        fastsce.cross_entropy(x, t, **opts),
        fastsce.cross_entropy_with_grad(x, t, **opts, grad_output=g)[0],
    ):
        assert_loss_close_cond(loss, expected, cond, dtype, reduction)
    _, grad = fastsce.cross_entropy_with_grad(x, t, **opts, grad_output=g)
    expected_grad = ref.cross_entropy_grad_ref(x, t, **opts, grad_output=g)
    # Scale: the terms s·a and b of each row, bounded by |g|·max(w)·2/D plus the z-loss term.
    xr, tr, wr, _, _ = ref._xent_rows(x, t, opts["weight"], -1)
    counted, d, dz = ref._xent_denominators(tr, wr, soft, opts["ignore_index"], reduction)
    if not counted.any():
        assert np.all(grad == 0)
        return
    gmax = float(np.max(np.abs(g)))
    lse_max = float(np.max(np.abs(ref.logsumexp(xr[counted]))))
    scale = gmax * (2 * np.max(wr) / d + 2 * opts["z_loss"] * lse_max / dz)
    assert grad.dtype == dtype
    err = np.max(np.abs(grad.astype(np.float64) - expected_grad))
    assert err <= GRAD_RTOL[dtype] * scale, (err, scale)


@settings(max_examples=15)
@given(xent_cases(max_rows=4, max_classes=6, dtypes=(np.float64,)))
def test_hypothesis_grad_vs_finite_differences(case):
    x, t, opts, g = case
    reduction = opts["reduction"]

    def objective(z):
        loss = fastsce.cross_entropy(z, t, **opts)
        return float(np.sum(loss * g)) if reduction == "none" else loss * g

    loss0 = objective(x)
    if math.isnan(loss0):  # all rows ignored with "mean"
        return
    _, grad = fastsce.cross_entropy_with_grad(x, t, **opts, grad_output=g)
    h = 1e-6
    fd = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        fd[idx] = (objective(xp) - objective(xm)) / (2 * h)
    tol = 1e-6 * (1.0 + abs(loss0)) + 1e-6 * np.max(np.abs(grad))
    assert np.max(np.abs(fd - grad)) <= tol, (fd, grad)


# ------------------------------------------------------------ argmax with NaN ----
@pytest.mark.parametrize("n_classes", [10, 1000], ids=["row-blocks", "rows"])
@pytest.mark.parametrize("order", ["C", "F"], ids=["classes-contiguous", "classes-strided"])
@pytest.mark.parametrize("with_grad", [False, True], ids=["loss", "loss+grad"])
def test_return_argmax_counts_nan_as_numpy_does(n_classes, order, with_grad):
    """A row holding NaN reports its first NaN, as np.argmax and torch.argmax do, on every
    kernel path (row kernels, small-class blocks, column kernels)."""
    rng = np.random.default_rng(40)
    x = np.asarray(rng.standard_normal((300, n_classes), dtype=np.float32), order=order)
    x[5, 3] = np.nan
    x[7, n_classes - 1] = np.nan
    x[9, 0] = np.nan
    x[9, 2] = np.nan
    x[11, 1] = 50.0  # a max before a later NaN: the NaN still wins
    x[11, 6] = np.nan
    t = rng.integers(0, n_classes, 300)
    if with_grad:
        _, _, argmax = fastsce.cross_entropy_with_grad(x, t, reduction="none", return_argmax=True)
    else:
        _, argmax = fastsce.cross_entropy(x, t, reduction="none", return_argmax=True)
    assert np.array_equal(argmax, np.argmax(x, axis=1))


@pytest.mark.parametrize("n_classes", [1, 10, 63])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_small_classes_across_tiles(n_classes, dtype):
    """Few classes: loss chunks go through (classes, rows) tiles. Many chunks, a ragged
    last one, ignored rows, smoothing and weights, against the float64 reference."""
    rng = np.random.default_rng(n_classes)
    x = make_logits((4099, n_classes), dtype, rng)
    t = make_target("hard", x, -1, rng, ignore_rows=(3, 4000))
    w = rng.uniform(0.5, 2.0, n_classes).astype(dtype)
    opts = options(w, "mean", 0.1, 1e-3)
    loss, grad = fastsce.cross_entropy_with_grad(x, t, **opts)
    assert_loss_close(loss, ref.cross_entropy_ref(x, t, **opts), dtype, "mean")
    assert_loss_close(fastsce.cross_entropy(x, t, **opts), ref.cross_entropy_ref(x, t, **opts), dtype, "mean")
    expected = ref.cross_entropy_grad_ref(x, t, **opts)
    np.testing.assert_allclose(grad, expected, rtol=1e-4 if dtype == np.float32 else 1e-10,
                               atol=1e-9 if dtype == np.float32 else 1e-16)
    inplace = x.copy()
    fastsce.cross_entropy_with_grad(inplace, t, **opts, inplace=True)
    np.testing.assert_array_equal(inplace, grad)


# ------------------------------------------------------------------- long rows ----
@pytest.fixture(params=["row per task", "rows split"])
def short_segments(monkeypatch, request):
    """Rows of more than 32 bytes take the long-row path of ``hard_xent_rows``, in
    segments of 16 float32 (8 float64) elements, or with rows split across threads
    ``hard_xent_split_rows``, in chunks of two segments; returns the segment lengths
    launched, and checks after the test that rows were split exactly when asked."""
    import sys

    module = sys.modules["fastsce.loss"]
    split = request.param == "rows split"
    tiny_long_rows(monkeypatch, split=split)
    segments = []
    kernels = set()
    launch = module._launch

    def recorded(name, *args):
        if name in ("hard_xent_rows", "hard_xent_split_rows"):
            kernels.add(name)
            segments.append(args[-1] if name == "hard_xent_rows" else args[-2])
        return launch(name, *args)

    monkeypatch.setattr(module, "_launch", recorded)
    yield segments
    assert kernels == {"hard_xent_split_rows" if split else "hard_xent_rows"}, kernels


def _long_rows(dtype, rng):
    """101 classes (7 segments of 16 float32), targets in every segment, two ignored rows;
    rows whose max sits far above the first segments, that open with all -inf segments,
    that hold NaN in a later segment, whose max is in the first segment."""
    x = make_logits((10, 101), dtype, rng)
    x[0, 90] = 60.0
    x[1, :50] = -np.inf
    x[2, 77] = np.nan
    x[3, 0] = 40.0
    x[4, 30], x[4, 95] = 9.0, 9.0  # argmax: the first of two maxima, in another segment
    t = np.array([90, 60, 5, 100, -100, 16, 15, 0, -100, 47], np.int64)
    return x, t


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("weighted", "ls", "z"), [(False, 0.0, 0.0), (True, 0.1, 1e-3), (False, 0.2, 0.0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_long_rows_segment_by_segment(short_segments, dtype, weighted, ls, z, reduction):
    """Loss, gradient, lse and argmax of long rows (reduced, then written, a segment at a
    time) against the references; in place gives the same bits."""
    rng = np.random.default_rng(41)
    x, t = _long_rows(dtype, rng)
    if reduction != "none":
        x[2, 77] = 1.0  # the NaN row would make the whole loss NaN
    if ls:
        x[1, :50] = -80.0  # label smoothing makes the loss of a row with -inf logits +inf
    w = make_weight(weighted, x.shape[1], dtype, rng)
    opts = options(w, reduction, ls, z)
    g = make_grad_output(reduction, (x.shape[0],), rng)
    loss, grad, lse, argmax = fastsce.cross_entropy_with_grad(x, t, **opts, grad_output=g, return_lse=True,
                                                              return_argmax=True)
    assert_loss_close(loss, ref.cross_entropy_ref(x, t, **opts), dtype, reduction)
    assert_grad_close(grad, ref.cross_entropy_grad_ref(x, t, **opts, grad_output=g), dtype)
    assert np.all(grad[t == -100] == 0)
    tol = 4e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(lse, ref.logsumexp(x, -1), rtol=tol, atol=tol)
    np.testing.assert_array_equal(argmax, np.argmax(x, axis=-1))
    y = x.copy()
    loss_inplace, grad_inplace = fastsce.cross_entropy_with_grad(y, t, **opts, grad_output=g, inplace=True)
    assert grad_inplace is y
    np.testing.assert_array_equal(grad_inplace, grad)
    assert short_segments[0] == 64 // np.dtype(dtype).itemsize and short_segments[-1] > 0


@needs_two_threads
def test_long_rows_same_bits_for_every_thread_count(short_segments):
    """Split rows merge their chunks in chunk order: one thread or two, the same bits."""
    x, t = _long_rows(np.float32, np.random.default_rng(43))
    opts = options(make_weight(True, x.shape[1], np.float32, np.random.default_rng(44)), "none", 0.1, 1e-3)
    results = []
    for n_threads in (1, 2):
        with fastsce.threads(n_threads):
            results.append(fastsce.cross_entropy_with_grad(x, t, **opts, return_lse=True, return_argmax=True))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_long_rows_segment_by_segment_16_bit(short_segments, half):
    """16-bit long rows: the gradient equals the float32 computation rounded once."""
    ml_dtypes = pytest.importorskip("ml_dtypes") if half == "bfloat16" else None
    dtype = np.dtype(ml_dtypes.bfloat16) if ml_dtypes else np.dtype(np.float16)
    x, t = _long_rows(np.float32, np.random.default_rng(42))
    x16 = x.astype(dtype)
    loss, grad = fastsce.cross_entropy_with_grad(x16, t, label_smoothing=0.1)
    loss32, grad32 = fastsce.cross_entropy_with_grad(x16.astype(np.float32), t, label_smoothing=0.1)
    assert grad.dtype == dtype
    want = grad32.astype(dtype)
    finite = ~np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(grad.view(np.uint16)[finite], want.view(np.uint16)[finite])
    assert np.array_equal(np.isnan(grad.astype(np.float32)), ~finite)
    assert loss == pytest.approx(loss32, rel=1e-6, nan_ok=True)
    assert short_segments == [16, 16]
