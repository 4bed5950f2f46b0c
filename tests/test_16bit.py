"""float16 and bfloat16: read as 16 bits, computed in float32, rounded once on the way back.

The contract (issue 7): every result equals the float32 computation on the same values
rounded once to the 16-bit type, allowing one unit in the last place.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastsce
from tests.conftest import jit_or_pure

ml_dtypes = pytest.importorskip("ml_dtypes")
HALF_DTYPES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
LAYOUTS = [(jit_or_pure((64, 1000), (6, 1000)), -1), ((500, 10), -1), ((40, 300), 0), ((3, 5, 70), 1), ((6, 130), -1)]


def assert_within_one_ulp(got: np.ndarray, exact32: np.ndarray, dtype: np.dtype) -> None:
    """``got`` (16-bit) is ``exact32`` rounded to ``dtype``, within one unit in the last place."""
    assert got.dtype == dtype
    expected = exact32.astype(dtype)
    finite = np.isfinite(expected.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), np.isnan(expected.astype(np.float32)))
    # Adjacent 16-bit values of one sign differ by 1 in their bit patterns.
    bits_got = got.view(np.uint16).astype(np.int32)[finite]
    bits_expected = expected.view(np.uint16).astype(np.int32)[finite]
    same_sign = (bits_got >> 15) == (bits_expected >> 15)
    distance = np.where(same_sign, np.abs(bits_got - bits_expected), np.abs(bits_got & 0x7FFF) + np.abs(bits_expected & 0x7FFF))
    assert distance.max(initial=0) <= 1, f"{distance.max()} ulp apart"


def logits(shape, dtype, rng, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_forward_matches_float32_rounded_once(name, shape, axis, dtype, rng):
    x = logits(shape, dtype, rng)
    function = getattr(fastsce, name)
    assert_within_one_ulp(function(x, axis=axis), function(x.astype(np.float32), axis=axis), dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("name", ["softmax_backward", "log_softmax_backward"])
def test_backward_matches_float32_rounded_once(name, dtype, rng):
    x = logits((50, 300), dtype, rng)
    forward = fastsce.softmax if name == "softmax_backward" else fastsce.log_softmax
    output = forward(x)
    grad = logits((50, 300), dtype, rng, scale=1.0)
    function = getattr(fastsce, name)
    exact = function(grad.astype(np.float32), output.astype(np.float32))
    assert_within_one_ulp(function(grad, output), exact, dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("classes", [10, 130, 1000])  # row blocks, paired rows, single rows
def test_cross_entropy_matches_float32(dtype, soft, classes, rng):
    rows = jit_or_pure(300, 30)
    x = logits((rows, classes), dtype, rng)
    if soft:
        target = rng.dirichlet(np.ones(classes), rows).astype(np.float32).astype(dtype)
    else:
        target = rng.integers(0, classes, rows)
        target[::7] = -100
    options = dict(label_smoothing=0.1, z_loss=1e-3)
    target32 = target.astype(np.float32) if soft else target
    loss, grad = fastsce.cross_entropy_with_grad(x, target, **options)
    loss32, grad32 = fastsce.cross_entropy_with_grad(x.astype(np.float32), target32, **options)
    assert loss == pytest.approx(loss32, rel=1e-6)
    assert fastsce.cross_entropy(x, target, **options) == pytest.approx(loss32, rel=1e-6)
    assert_within_one_ulp(grad, grad32, dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_inplace_gradient_writes_16bit_logits(dtype, rng):
    rows = jit_or_pure(200, 20)
    x = logits((rows, 500), dtype, rng)
    target = rng.integers(0, 500, rows)
    _, expected = fastsce.cross_entropy_with_grad(x, target)
    loss, grad = fastsce.cross_entropy_with_grad(x, target, inplace=True)
    assert grad is x
    np.testing.assert_array_equal(grad.view(np.uint16), expected.view(np.uint16))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_dtype_argument_decodes_exactly(dtype, rng):
    """softmax(x16, dtype=float32) equals softmax of the exactly widened values."""
    x = logits((80, 257), dtype, rng)
    np.testing.assert_array_equal(fastsce.softmax(x, dtype=np.float32), fastsce.softmax(x.astype(np.float32)))
    assert fastsce.log_softmax(x, dtype=np.float64).dtype == np.float64


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_special_values(dtype):
    x = np.array([[0.0, -np.inf, 1.0], [np.nan, 0.0, 0.0], [np.inf, 0.0, 0.0], [-np.inf] * 3], np.float32).astype(dtype)
    got = fastsce.softmax(x).astype(np.float32)
    np.testing.assert_allclose(got[0], [0.26894143, 0.0, 0.7310586], rtol=1e-2)
    assert np.isnan(got[1:]).all()
    lse = fastsce.logsumexp(x).astype(np.float32)
    assert np.isnan(lse[1]) and lse[2] == np.inf and lse[3] == -np.inf


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_inputs_unchanged_and_strided(dtype, rng):
    base = logits((40, 600), dtype, rng)
    x = base[::2, ::-2]
    before = x.copy()
    assert_within_one_ulp(fastsce.softmax(x), fastsce.softmax(x.astype(np.float32)), dtype)
    np.testing.assert_array_equal(x.view(np.uint16), before.view(np.uint16))


def test_rounding_is_nearest_even_at_the_boundary():
    """The encode step rounds ties to even, as NumPy's cast does (bit-exact)."""
    from numba import njit

    from fastsce._math import float32_to_bfloat16_bits, float32_to_float16_bits

    @njit
    def encode(values, half, brain):
        for i in range(values.size):
            half[i] = float32_to_float16_bits(values[i])
            brain[i] = float32_to_bfloat16_bits(values[i])

    rng = np.random.default_rng(3)
    values = (rng.standard_normal(200_000) * np.float32(10.0) ** rng.integers(-8, 6, 200_000)).astype(np.float32)
    ties = np.array([1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 65520.0, 3e38], np.float32)
    values = np.concatenate([values, ties, -ties])
    half = np.empty(values.size, np.uint16)
    brain = np.empty(values.size, np.uint16)
    with np.errstate(over="ignore"):
        encode(values, half, brain)
        np.testing.assert_array_equal(half, values.astype(np.float16).view(np.uint16))
        np.testing.assert_array_equal(brain, values.astype(ml_dtypes.bfloat16).view(np.uint16))
