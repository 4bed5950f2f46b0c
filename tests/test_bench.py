"""``python -m fastsce bench``: its NumPy references compute what they stand for (a
reference that is fast because it is wrong would make every speed-up over it
meaningless), and its ratios are timed in interleaved rounds."""

from __future__ import annotations

import time

import numpy as np
import pytest

import fastsce
from fastsce._bench import OPS, best_times, numpy_reference
from tests.conftest import jit_or_pure


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_numpy_references_agree_with_fastsce(op, dtype):
    """Also at 70000 rows, more than float16's largest finite value: the gradient's mean
    divisor once overflowed a float16 cast to inf and made the reference gradient 0."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((jit_or_pure(70_000, 700), 3)).astype(dtype)
    target = rng.integers(0, 3, x.shape[0])
    got = numpy_reference(op, x, target, -1)()
    expected = {
        "softmax": lambda: fastsce.softmax(x),
        "log_softmax": lambda: fastsce.log_softmax(x),
        "logsumexp": lambda: fastsce.logsumexp(x),
        "cross_entropy": lambda: fastsce.cross_entropy(x, target),
        "cross_entropy_with_grad": lambda: fastsce.cross_entropy_with_grad(x, target),
    }[op]()
    # NumPy computes float16 in float16 (a few of its ulp off); fastsce in float32, rounded once
    tol = dict(rtol=1e-2, atol=4e-3) if dtype == np.float16 else dict(rtol=1e-5, atol=1e-6)
    grad_atol = 2e-7 if dtype == np.float16 else 1e-10  # the gradient's entries are ~1/rows
    if op == "cross_entropy_with_grad":
        np.testing.assert_allclose(got[0], float(expected[0]), **tol)
        np.testing.assert_allclose(np.asarray(got[1], np.float64), np.asarray(expected[1], np.float64),
                                   rtol=tol["rtol"], atol=grad_atol)
        assert np.abs(np.asarray(got[1], np.float64)).max() > 1e-6
    else:
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(expected, np.float64), **tol)


def test_ratios_are_timed_in_interleaved_rounds():
    """The copy and the kernel of a case alternate, round by round (a burst of load on the
    shared machine then hits both), and each keeps its own minimum."""
    calls = []
    durations = {"a": iter([0.0, 0.03, 0.01, 0.02]), "b": iter([0.0, 0.02, 0.04, 0.03])}

    def timed(name):
        def run():
            calls.append(name)
            time.sleep(next(durations[name]))

        return run

    best = best_times([timed("a"), timed("b")], repeats=3)
    assert calls == ["a", "b"] * 4  # a warm-up call each, then three rounds in turn
    assert best[0] == pytest.approx(0.01, abs=5e-3) and best[1] == pytest.approx(0.02, abs=5e-3)
