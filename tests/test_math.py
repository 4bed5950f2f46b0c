"""Tests of ``fastsce._math``: the vectorizable ``exp32``/``exp64`` and the bit casts.

The exp functions are ``numba.njit`` scalar functions, so they are called from small
jitted loops over arrays. Errors are measured in ulps of the correctly rounded result:
for float32 against ``np.exp`` in float64 (exact enough: 29 extra bits), for float64
against mpmath at 80 bits and against ``np.exp`` on a dense grid.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

import fastsce._math as _fm
from fastsce._math import (
    bits_to_float32,
    bits_to_float64,
    exp32,
    exp64,
    float32_to_bits,
    float64_to_bits,
)
from tests.conftest import needs_jit

mpmath = pytest.importorskip("mpmath")

F32_TINY = np.float32(2.0**-126)  # smallest normal
F32_SUB_ULP = 2.0**-149  # spacing of subnormals
F64_TINY = 2.0**-1022
F64_SUB_ULP = 2.0**-1074


# ------------------------------------------------------------------ jitted loops ----
@numba.njit
def _exp32_array(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = exp32(x[i])
    return out


@numba.njit
def _exp64_array(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = exp64(x[i])
    return out


@numba.njit
def _f32_to_bits(x):
    out = np.empty(x.size, np.int32)
    for i in range(x.size):
        out[i] = float32_to_bits(x[i])
    return out


@numba.njit
def _bits_to_f32(b):
    out = np.empty(b.size, np.float32)
    for i in range(b.size):
        out[i] = bits_to_float32(b[i])
    return out


@numba.njit
def _f64_to_bits(x):
    out = np.empty(x.size, np.int64)
    for i in range(x.size):
        out[i] = float64_to_bits(x[i])
    return out


@numba.njit
def _bits_to_f64(b):
    out = np.empty(b.size, np.float64)
    for i in range(b.size):
        out[i] = bits_to_float64(b[i])
    return out


def exp32_np(x) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).ravel()
    got = _exp32_array(x)
    assert got.dtype == np.float32
    return got


def exp64_np(x) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float64).ravel()
    got = _exp64_array(x)
    assert got.dtype == np.float64
    return got


# ------------------------------------------------------------- ulp measurement ----
def ulp_errors_f32(x: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Error of ``got`` = exp32(x) in ulps of the float32 result, exact = float64 exp.

    Normal results: ulps of the correctly rounded value. Subnormal results: ulps of
    subnormals (2**-149). ``inf`` counts as 2**128, the next power of two past the
    largest float32, so an overflow right at the edge is measured, not infinite.
    """
    exact = np.exp(x.astype(np.float64))
    with np.errstate(over="ignore"):
        rounded = exact.astype(np.float32)
    ulp = np.where(exact < F32_TINY, F32_SUB_ULP, np.spacing(np.abs(rounded)).astype(np.float64))
    ulp = np.where(np.isinf(rounded), 2.0**104, ulp)  # the spacing just below float32 max
    got64 = np.where(np.isinf(got), 2.0**128, got.astype(np.float64))
    return np.abs(got64 - exact) / ulp


def ulp_errors_f64_vs(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Error of float64 ``got`` against float64 ``exact`` in ulps (subnormals: 2**-1074)."""
    ulp = np.where(np.abs(exact) < F64_TINY, F64_SUB_ULP, np.spacing(np.abs(exact)))
    return np.abs(got - exact) / ulp


def _worst(x, err) -> str:
    i = int(np.argmax(err))
    return f"worst {err[i]:.3f} ulp at x={x[i]!r}"


# --------------------------------------------------------------------- float32 ----
def test_exp32_dense_grid_within_2_ulp():
    x = np.linspace(-110.0, 95.0, 2_000_001, dtype=np.float64).astype(np.float32)
    got = exp32_np(x)
    exact = np.exp(x.astype(np.float64))
    normal = (exact >= F32_TINY) & (exact <= np.finfo(np.float32).max)
    err = ulp_errors_f32(x, got)
    assert np.all(err[normal] <= 2.0), _worst(x[normal], err[normal])


def test_exp32_random_points_within_2_ulp():
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            rng.uniform(-110.0, 95.0, 1_000_000),
            rng.uniform(-1.0, 1.0, 200_000),
            rng.uniform(-1e-6, 1e-6, 10_000),
        ]
    ).astype(np.float32)
    got = exp32_np(x)
    exact = np.exp(x.astype(np.float64))
    normal = (exact >= F32_TINY) & (exact <= np.finfo(np.float32).max)
    err = ulp_errors_f32(x, got)
    assert np.all(err[normal] <= 2.0), _worst(x[normal], err[normal])


def test_exp32_all_float32_in_minus_one_to_one():
    """Every float32 in [0.5, 1) and its negation (around the polynomial's domain)."""
    bits = np.arange(0x3F000000, 0x3F800000, 97, dtype=np.int32)
    x = np.concatenate([bits.view(np.float32), -bits.view(np.float32)])
    err = ulp_errors_f32(x, exp32_np(x))
    assert np.all(err <= 2.0), _worst(x, err)


def test_exp32_subnormal_results_within_1_subnormal_ulp():
    x = np.linspace(-103.9, -87.4, 500_001).astype(np.float32)
    got = exp32_np(x)
    exact = np.exp(x.astype(np.float64))
    sub = exact < F32_TINY
    assert sub.sum() > 400_000
    err = np.abs(got.astype(np.float64) - exact) / F32_SUB_ULP
    assert np.all(err[sub] <= 1.0), _worst(x[sub], err[sub])
    assert np.all(got[sub] < F32_TINY)
    # every x whose result is subnormal, from exp(-87.4) down to the last non-zero one
    lo, hi = np.float32(-103.98), np.float32(-87.33)
    bits = np.arange(
        hi.view(np.int32), lo.view(np.int32), 7, dtype=np.int32
    )  # negatives: bits grow as x falls
    x = bits.view(np.float32)
    exact = np.exp(x.astype(np.float64))
    err = np.abs(exp32_np(x).astype(np.float64) - exact)
    sub = exact < F32_TINY
    assert np.all(err[sub] <= F32_SUB_ULP), _worst(x[sub], err[sub] / F32_SUB_ULP)


def test_exp32_underflows_to_positive_zero():
    f32 = np.finfo(np.float32)
    x = np.concatenate(
        [
            np.linspace(-1000.0, -104.0001, 10_001),
            [-104.0001, -104.5, -150.0, -1e10, -1e30, float(f32.min), -np.inf],
        ]
    ).astype(np.float32)
    assert np.all(x < np.float32(-104.0))
    got = exp32_np(x)
    assert np.all(got == 0.0), x[got != 0.0][:5]
    assert not np.signbit(got).any(), "exp returned -0.0"


def test_exp32_overflows_to_inf():
    f32 = np.finfo(np.float32)
    x = np.concatenate(
        [np.linspace(88.73, 1000.0, 10_001), [88.73, 89.0, 100.0, 1e10, 1e30, float(f32.max), np.inf]]
    ).astype(np.float32)
    got = exp32_np(x)
    assert np.all(got == np.inf), x[got != np.inf][:5]


def test_exp32_largest_finite_result():
    x = np.float32(88.72283)  # exp(x) just below float32 max
    assert np.exp(np.float64(x)) < np.finfo(np.float32).max
    got = exp32_np([x])[0]
    assert np.isfinite(got)
    assert ulp_errors_f32(np.array([x]), np.array([got]))[0] <= 2.0


def test_exp32_special_values():
    got = exp32_np([np.nan, -np.nan, 0.0, -0.0, np.inf, -np.inf, 1.0])
    assert np.isnan(got[0]) and np.isnan(got[1])
    assert got[2] == np.float32(1.0) and got[3] == np.float32(1.0)
    assert got[4] == np.inf and got[5] == 0.0
    assert abs(float(got[6]) - np.e) <= 2 * float(np.spacing(np.float32(np.e)))


def test_exp32_is_monotonic_on_grid():
    x = np.linspace(-104.0, 89.0, 1_000_001).astype(np.float32)
    x = np.unique(x)
    got = exp32_np(x)
    assert np.all(got[1:] >= got[:-1])


@needs_jit("checks the type Numba infers for a compiled call")
def test_exp32_scalar_call_in_njit():
    @numba.njit
    def f(a):
        return exp32(np.float32(a))

    assert f(0.0) == np.float32(1.0)
    assert f.nopython_signatures[0].return_type == numba.float32


# --------------------------------------------------------------------- float64 ----
def test_exp64_against_mpmath():
    rng = np.random.default_rng(2)
    x = np.concatenate(
        [
            rng.uniform(-746.0, 710.0, 1200),
            rng.uniform(-1.0, 1.0, 300),
            rng.uniform(-0.35, 0.35, 200),
            rng.uniform(-708.4, -700.0, 100),
            rng.uniform(700.0, 709.78, 100),
            rng.uniform(-1e-8, 1e-8, 50),
            np.arange(-50, 51) * np.log(2.0),  # r ≈ 0 at every k
        ]
    )
    got = exp64_np(x)
    errs = np.empty(x.size)
    with mpmath.workprec(80):
        for i, (xi, gi) in enumerate(zip(x, got)):
            exact = mpmath.exp(mpmath.mpf(float(xi)))
            ef = float(exact)
            if ef == np.inf:  # beyond the largest float64: must overflow
                errs[i] = 0.0 if gi == np.inf else np.inf
                continue
            ulp = F64_SUB_ULP if ef < F64_TINY else float(np.spacing(ef))
            errs[i] = float(abs(mpmath.mpf(float(gi)) - exact) / ulp)
    assert np.all(errs <= 2.0), _worst(x, errs)


def test_exp64_dense_grid_against_numpy():
    x = np.linspace(-746.0, 710.0, 2_000_001)
    got = exp64_np(x)
    with np.errstate(over="ignore"):
        exact = np.exp(x)
    normal = (exact >= F64_TINY) & np.isfinite(exact)
    err = ulp_errors_f64_vs(got[normal], exact[normal])
    assert np.all(err <= 2.0), _worst(x[normal], err)
    # around zero and in [-1, 1] densely
    x = np.linspace(-1.0, 1.0, 500_001)
    err = ulp_errors_f64_vs(exp64_np(x), np.exp(x))
    assert np.all(err <= 2.0), _worst(x, err)


def test_exp64_subnormal_results_within_1_subnormal_ulp():
    x = np.linspace(-745.13, -708.4, 200_001)
    got = exp64_np(x)
    with mpmath.workprec(80):
        sample = x[::1000]
        exact_mp = [mpmath.exp(mpmath.mpf(float(v))) for v in sample]
        got_s = got[::1000]
        errs = np.array([float(abs(mpmath.mpf(float(g)) - e) / F64_SUB_ULP) for g, e in zip(got_s, exact_mp)])
        sub = np.array([float(e) < F64_TINY for e in exact_mp])
    assert sub.sum() > 150
    assert np.all(errs[sub] <= 1.0), _worst(sample[sub], errs[sub])
    # the whole grid against np.exp (itself correctly rounded to a subnormal within 1)
    exact = np.exp(x)
    sub = exact < F64_TINY
    err = np.abs(got - exact) / F64_SUB_ULP
    assert np.all(err[sub] <= 1.0), _worst(x[sub], err[sub])


def test_exp64_underflows_to_positive_zero():
    x = np.concatenate(
        [
            np.linspace(-5000.0, -746.0001, 10_001),
            [-746.0001, -800.0, -1e10, -1e300, -np.finfo(np.float64).max, -np.inf],
        ]
    )
    got = exp64_np(x)
    assert np.all(got == 0.0), x[got != 0.0][:5]
    assert not np.signbit(got).any(), "exp returned -0.0"


def test_exp64_overflows_to_inf():
    x = np.concatenate(
        [
            np.linspace(709.79, 5000.0, 10_001),
            [709.79, 710.0, 711.0, 1e10, 1e300, np.finfo(np.float64).max, np.inf],
        ]
    )
    got = exp64_np(x)
    assert np.all(got == np.inf), x[got != np.inf][:5]


def test_exp64_largest_finite_result():
    x = 709.782712893384  # log(DBL_MAX) rounded down
    got = exp64_np([x])[0]
    assert np.isfinite(got)
    assert ulp_errors_f64_vs(np.array([got]), np.array([np.exp(x)]))[0] <= 2.0


def test_exp64_special_values():
    got = exp64_np([np.nan, -np.nan, 0.0, -0.0, np.inf, -np.inf, 1.0])
    assert np.isnan(got[0]) and np.isnan(got[1])
    assert got[2] == 1.0 and got[3] == 1.0
    assert got[4] == np.inf and got[5] == 0.0
    assert abs(got[6] - np.e) <= 2 * np.spacing(np.e)


def test_exp64_is_monotonic_on_grid():
    x = np.linspace(-746.0, 710.0, 1_000_001)
    got = exp64_np(x)
    assert np.all(got[1:] >= got[:-1])


# -------------------------------------------------------------------- bit casts ----
def _float32_specials() -> np.ndarray:
    f = np.finfo(np.float32)
    return np.array(
        [
            0.0,
            -0.0,
            1.0,
            -1.0,
            np.inf,
            -np.inf,
            np.nan,
            f.max,
            f.min,
            f.tiny,
            f.smallest_subnormal,
            -f.smallest_subnormal,
        ],
        dtype=np.float32,
    )


def _float64_specials() -> np.ndarray:
    f = np.finfo(np.float64)
    return np.array(
        [
            0.0,
            -0.0,
            1.0,
            -1.0,
            np.inf,
            -np.inf,
            np.nan,
            f.max,
            f.min,
            f.tiny,
            f.smallest_subnormal,
            -f.smallest_subnormal,
        ]
    )


def test_float32_bits_round_trip():
    rng = np.random.default_rng(3)
    bits = np.concatenate(
        [
            rng.integers(np.iinfo(np.int32).min, np.iinfo(np.int32).max, 200_000, dtype=np.int64).astype(
                np.int32
            ),
            np.array(
                [
                    0,
                    1,
                    -1,
                    0x7F800000,
                    0x7F800001,
                    0x7FC00000,
                    np.iinfo(np.int32).min,
                    np.iinfo(np.int32).max,
                ],
                dtype=np.int32,
            ),
            _float32_specials().view(np.int32),
        ]
    )
    floats = _bits_to_f32(bits)
    assert np.array_equal(floats.view(np.int32), bits), "bits_to_float32 differs from ndarray.view"
    assert np.array_equal(_f32_to_bits(floats), bits), "float32_to_bits(bits_to_float32(b)) != b"
    x = rng.standard_normal(10_000).astype(np.float32)
    x = np.concatenate([x, _float32_specials()])
    assert np.array_equal(_f32_to_bits(x), x.view(np.int32)), "float32_to_bits differs from ndarray.view"


def test_float64_bits_round_trip():
    rng = np.random.default_rng(4)
    bits = np.concatenate(
        [
            rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 200_000, dtype=np.int64),
            np.array(
                [
                    0,
                    1,
                    -1,
                    0x7FF0000000000000,
                    0x7FF0000000000001,
                    0x7FF8000000000000,
                    np.iinfo(np.int64).min,
                    np.iinfo(np.int64).max,
                ],
                dtype=np.int64,
            ),
            _float64_specials().view(np.int64),
        ]
    )
    floats = _bits_to_f64(bits)
    assert np.array_equal(floats.view(np.int64), bits), "bits_to_float64 differs from ndarray.view"
    assert np.array_equal(_f64_to_bits(floats), bits), "float64_to_bits(bits_to_float64(b)) != b"
    x = np.concatenate([rng.standard_normal(10_000) * 1e10, _float64_specials()])
    assert np.array_equal(_f64_to_bits(x), x.view(np.int64)), "float64_to_bits differs from ndarray.view"


@needs_jit("checks Numba's typing of the intrinsics (plain Python stand-ins take any type)")
def test_bitcasts_reject_wrong_types():
    @numba.njit
    def f(v):
        return float32_to_bits(v)

    with pytest.raises(numba.core.errors.TypingError):
        f(1.0)  # a float64 is not a float32


# ------------------------------------------------------ exp_diff: e**(x - m), x <= m ----
# Private helpers used by the row kernels (x a logit, m its row maximum).
def _exp_diff_np(x, m, dtype, f=_fm.exp_diff):
    @numba.njit
    def loop(x, m):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = f(x[i], m[i])
        return out

    return loop(np.ascontiguousarray(x, dtype).ravel(), np.ascontiguousarray(m, dtype).ravel())


def _x_below_m(rng, dtype, n, m_lo, m_hi, span):
    m = rng.uniform(m_lo, m_hi, n).astype(dtype)
    x = (m.astype(np.float64) - rng.uniform(0.0, span, n)).astype(dtype)
    return np.minimum(x, m), m


@pytest.mark.parametrize("m_range", [(-5.0, 5.0), (-200.0, 200.0), (1e3, 1e5), (-1e5, -1e3), (1e20, 1e30)])
def test_exp_diff32_accuracy(m_range):
    rng = np.random.default_rng(5)
    x, m = _x_below_m(rng, np.float32, 200_000, *m_range, span=110.0)
    got = _exp_diff_np(x, m, np.float32)
    exact = np.exp(x.astype(np.float64) - m.astype(np.float64))  # exact difference of float32s
    tiny = exact < F32_TINY
    ulp = np.where(tiny, F32_SUB_ULP, np.spacing(exact.astype(np.float32)).astype(np.float64))
    err = np.abs(got.astype(np.float64) - exact) / ulp
    assert np.all(err[~tiny] <= 2.0), _worst(x[~tiny], err[~tiny])
    assert np.all(err[tiny] <= 1.0), _worst(x[tiny], err[tiny])


@pytest.mark.parametrize("m_range", [(-5.0, 5.0), (-700.0, 700.0), (1e5, 1e7), (-1e7, -1e5), (1e200, 1e300)])
def test_exp_diff64_accuracy(m_range):
    rng = np.random.default_rng(6)
    x, m = _x_below_m(rng, np.float64, 200_000, *m_range, span=760.0)
    got = _exp_diff_np(x, m, np.float64)
    # x - m exactly: mpmath on a sample, np.exp of the float64 difference is not exact
    idx = rng.choice(x.size, 1500, replace=False)
    errs = []
    with mpmath.workprec(120):
        for i in idx:
            exact = mpmath.exp(mpmath.mpf(float(x[i])) - mpmath.mpf(float(m[i])))
            ef = float(exact)
            ulp = F64_SUB_ULP if ef < F64_TINY else float(np.spacing(ef))
            lim = 1.0 if ef < F64_TINY else 2.0
            errs.append(float(abs(mpmath.mpf(float(got[i])) - exact) / ulp) / lim)
    errs = np.array(errs)
    assert np.all(errs <= 1.0), _worst(x[idx], errs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_exp_diff_special_values(dtype):
    big = float(np.finfo(dtype).max)
    cases = [  # (x, m, expected)
        (0.0, 0.0, 1.0),
        (1e30, 1e30, 1.0),
        (-1e30, -1e30, 1.0),
        (big, big, 1.0),
        (-big, -big, 1.0),
        (0.0, 1e30, 0.0),  # m - x far beyond the underflow span
        (-1e30, 1e30, 0.0),
        (-big, big, 0.0),
        (1e20, 1e30, 0.0),
        (-np.inf, 0.0, 0.0),
        (-np.inf, 1e30, 0.0),
        (-np.inf, -1e30, 0.0),
        (np.nan, 0.0, np.nan),
        (0.0, np.nan, np.nan),
        (-np.inf, -np.inf, np.nan),  # an all -inf row
        (np.inf, np.inf, np.nan),  # a +inf max
        (0.0, np.inf, 0.0),  # e**(0 - inf) is exactly 0; the row is NaN through inf - inf
    ]
    x = np.array([c[0] for c in cases], dtype)
    m = np.array([c[1] for c in cases], dtype)
    got = _exp_diff_np(x, m, dtype)
    for (xi, mi, e), g in zip(cases, got):
        if np.isnan(e):
            assert np.isnan(g), f"exp_diff({xi}, {mi}) = {g}, expected NaN"
        else:
            assert g == e and not np.signbit(g), f"exp_diff({xi}, {mi}) = {g}, expected {e}"


# The row kernels use scaled exponentials, 2**EXP_SCALE_BITS * e**(x - m): exactly the
# unscaled value times a power of two wherever that value is normal, subnormals rounded
# once by the unscaling.
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_scaled_exp_diff_is_exp_diff_times_scale(dtype):
    rng = np.random.default_rng(11)
    span = 110.0 if dtype == np.float32 else 760.0
    x, m = _x_below_m(rng, dtype, 100_000, -50.0, 50.0, span)
    scaled = _exp_diff_np(x, m, dtype, _fm.scaled_exp_diff).astype(np.float64)
    unscaled = _exp_diff_np(x, m, dtype).astype(np.float64)
    assert np.all(scaled >= 0.0) and np.all(np.isfinite(scaled))
    back = (scaled * _fm.UNSCALE).astype(dtype).astype(np.float64)  # one rounding into subnormals
    assert np.array_equal(back, unscaled)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_scaled_exp_diff_special_values(dtype):
    x = np.array([0.0, -np.inf, np.nan, 0.0, -np.inf, np.inf], dtype)
    m = np.array([0.0, 0.0, 0.0, np.nan, -np.inf, np.inf], dtype)
    for f in (_fm.scaled_exp_diff, _fm.scaled_exp_diff_rounded):
        got = _exp_diff_np(x, m, dtype, f)
        assert got[0] == 2.0**_fm.EXP_SCALE_BITS
        # -inf is clamped: the scaled term is tiny, and 0 once unscaled or normalized
        assert 0.0 <= got[1] < 1e-24 and dtype(got[1] * _fm.UNSCALE) == 0.0
        assert np.all(np.isnan(got[2:])), f.__name__


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_scaled_exp_diff_rounded_sums(dtype):
    """The rounded-difference variant is for sums: each term is within |x - m| units of
    roundoff (plus 1 ulp), and a row's sum stays within a few ulp of the exact one."""
    rng = np.random.default_rng(12)
    u = float(np.finfo(dtype).eps) / 2
    x, m = _x_below_m(rng, dtype, 100_000, -20.0, 20.0, 60.0)
    got = _exp_diff_np(x, m, dtype, _fm.scaled_exp_diff_rounded).astype(np.float64) * _fm.UNSCALE
    exact = np.exp(x.astype(np.float64) - m.astype(np.float64))
    d = np.abs(x.astype(np.float64) - m.astype(np.float64))
    normal = exact > np.finfo(dtype).tiny
    rel = np.abs(got - exact)[normal] / exact[normal]
    assert np.all(rel <= (d[normal] + 2.0) * u)
    rows = rng.normal(0.0, 8.0, (200, 1000)).astype(dtype)
    row_max = rows.max(axis=1, keepdims=True)
    terms = _exp_diff_np(rows, np.broadcast_to(row_max, rows.shape), dtype, _fm.scaled_exp_diff_rounded)
    sums = terms.reshape(rows.shape).astype(np.float64).sum(axis=1) * _fm.UNSCALE
    exact_sums = np.exp(rows.astype(np.float64) - row_max).sum(axis=1)
    assert np.all(np.abs(sums - exact_sums) <= 2.0 * u * exact_sums)


# ------------------------------------------------------------------ log64 ----
@numba.njit
def _log64_array(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = _fm.log64(x[i])
    return out


def test_log64_against_mpmath():
    """Within 1 ulp of the exact log over the whole range, subnormals included."""
    rng = np.random.default_rng(5)
    x = np.concatenate([
        np.exp(rng.uniform(-744.0, 709.0, 1500)),
        rng.uniform(0.5, 2.0, 500),
        1.0 + rng.uniform(-1e-6, 1e-6, 200),
        rng.uniform(1.0, 1e5, 300),  # sums of exponentials, as the kernels take them
        np.ldexp(1.0, np.arange(-1074, 1024, 7)),
        [5e-324, 2.2250738585072014e-308, np.sqrt(0.5), np.sqrt(2.0), np.nextafter(1.0, 0.0)],
    ])
    got = _log64_array(x)
    errs = np.empty(x.size)
    with mpmath.workprec(80):
        for i, (xi, gi) in enumerate(zip(x, got)):
            exact = mpmath.log(mpmath.mpf(float(xi)))
            ulp = float(np.spacing(abs(float(exact)))) if exact != 0 else F64_SUB_ULP
            errs[i] = float(abs(mpmath.mpf(float(gi)) - exact) / ulp)
    assert np.all(errs <= 1.0), _worst(x, errs)


def test_log64_dense_grid_against_numpy():
    x = np.linspace(1.0, 64.0, 1_000_001)
    err = ulp_errors_f64_vs(_log64_array(x), np.log(x))
    assert np.all(err <= 1.0), _worst(x, err)


def test_log64_special_values():
    x = np.array([0.0, -0.0, 1.0, np.inf, -np.inf, np.nan, -1.0, -5e-324])
    got = _log64_array(x)
    assert got[0] == -np.inf and got[1] == -np.inf and got[2] == 0.0 and got[3] == np.inf
    assert np.all(np.isnan(got[4:]))
