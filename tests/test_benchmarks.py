"""pytest-benchmark A/B: each fastsce function beside its NumPy reference.

In the normal suite (``--benchmark-disable`` in pyproject) each runs once, as a plain
test that also checks the two agree. Timed comparison::

    python -m pytest tests/test_benchmarks.py --benchmark-enable --benchmark-group-by=group
"""

from __future__ import annotations

import numpy as np
import pytest

import fastsce
from tests import reference
from tests.conftest import jit_or_pure

pytest.importorskip("pytest_benchmark")

SHAPE = jit_or_pure((4096, 1000), (64, 1000))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    target = rng.integers(0, SHAPE[1], SHAPE[0])
    return x, target, np.empty_like(x)


def numpy_cross_entropy_with_grad(x, target):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    rows = np.arange(target.size)
    loss = float(np.mean(-np.log(p[rows, target])))
    p[rows, target] -= 1.0
    return loss, p / target.size


CASES = {
    "softmax": (lambda x, t, o: fastsce.softmax(x, out=o), lambda x, t: reference.softmax(x)),
    "log_softmax": (lambda x, t, o: fastsce.log_softmax(x, out=o), lambda x, t: reference.log_softmax(x)),
    "logsumexp": (lambda x, t, o: fastsce.logsumexp(x), lambda x, t: reference.logsumexp(x)),
    "cross_entropy": (lambda x, t, o: fastsce.cross_entropy(x, t), lambda x, t: reference.cross_entropy_ref(x, t)),
    "cross_entropy_with_grad": (
        lambda x, t, o: fastsce.cross_entropy_with_grad(x, t, out=o)[1],
        lambda x, t: numpy_cross_entropy_with_grad(x, t)[1],
    ),
}


@pytest.mark.parametrize("implementation", ["fastsce", "numpy"])
@pytest.mark.parametrize("name", list(CASES))
def test_benchmark(benchmark, data, name, implementation):
    x, target, out = data
    fast, slow = CASES[name]
    benchmark.group = name
    if implementation == "fastsce":
        result = benchmark(fast, x, target, out)
    else:
        result = benchmark(slow, x.astype(np.float64) if name != "cross_entropy_with_grad" else x, target)
    expected = slow(x.astype(np.float64), target)
    np.testing.assert_allclose(np.asarray(result, np.float64), np.asarray(expected, np.float64), rtol=2e-5, atol=1e-6)
