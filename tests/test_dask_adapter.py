"""fastsce.dask on a dask.distributed LocalCluster, against the in-memory fastsce results."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest

import fastsce
from tests.conftest import needs_jit

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
fsd = pytest.importorskip("fastsce.dask")

# Per worker. A worker holds ~250 MiB once numpy, numba and its kernels are loaded, and
# ~520 MiB after compiling them from a cold cache (LLVM keeps what it took). It pauses
# at 80 % of its limit (a paused worker runs no task) and is restarted at 95 %.
WORKER_MEMORY = "1GiB"
WORKER_MEMORY_BYTES = 2**30

N, C = 60, 17
CHUNKINGS = {
    "rows": (16, C),  # the fused kernels block by block
    "classes": (N, 5),  # the two-phase reduction
    "both": (25, 6),
}
DTYPES = (np.float32, np.float64)
COMPUTE_TIMEOUT = 300  # seconds; the first tasks on each worker load or compile the kernels


def _cluster():
    return distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        memory_limit=WORKER_MEMORY,
        silence_logs=logging.ERROR,
    )


@pytest.fixture(scope="module")
def client():
    with _cluster() as cluster, distributed.Client(cluster) as c:
        # warm up: every worker loads the kernels it will run (compiled or from the cache)
        x = da.ones((8, 6), chunks=(4, 3))
        _compute(c, [fsd.softmax(x).sum(), fsd.cross_entropy(x.rechunk((4, 6)), np.zeros(8, int))])
        yield c


@pytest.fixture
def fresh_client(client):
    """A second cluster, after the shared one has run every test: after compiling all the
    kernels of this file from a cold cache, a worker holds ~700 MiB of LLVM memory; fresh
    workers load the kernels from the disk cache and start near 250 MiB."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Port .* is already in use")  # the shared cluster's HTTP port
        cluster = _cluster()
    with cluster, distributed.Client(cluster) as c:
        yield c


def _compute(client, collections):
    """Compute a flat list (or one collection) on the cluster; a stuck worker fails the test
    instead of hanging the suite."""
    futures = client.compute(collections)
    distributed.wait(futures, timeout=COMPUTE_TIMEOUT)
    return client.gather(futures)


def _assert_close(got, ref, dtype, log_space=False):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape
    if np.issubdtype(ref.dtype, np.floating) and ref.ndim:
        assert got.dtype == ref.dtype
    if dtype == np.float32:
        tol = {"rtol": 4e-6, "atol": 4e-6} if log_space else {"rtol": 2e-6, "atol": 1e-30}
    else:
        tol = {"rtol": 1e-12, "atol": 1e-13} if log_space else {"rtol": 1e-12, "atol": 1e-300}
    np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), equal_nan=True, **tol)


def _logits(dtype, seed=0, shape=(N, C)):
    rng = np.random.default_rng(seed)
    return (3 * rng.standard_normal(shape)).astype(dtype)


# ------------------------------------------------------------ softmax family ----
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_softmax_family_matches_in_memory(client, chunking, dtype):
    x = _logits(dtype)
    dx = da.from_array(x, chunks=CHUNKINGS[chunking])
    results = _compute(
        client,
        [
            fsd.softmax(dx),
            fsd.log_softmax(dx),
            fsd.logsumexp(dx),
            fsd.logsumexp(dx, axis=1, keepdims=True),
            fsd.softmax(dx.T, axis=0),
            fsd.log_softmax(dx, axis=1),
        ],
    )
    _assert_close(results[0], fastsce.softmax(x), dtype)
    _assert_close(results[1], fastsce.log_softmax(x), dtype, log_space=True)
    _assert_close(results[2], fastsce.logsumexp(x), dtype, log_space=True)
    _assert_close(results[3], fastsce.logsumexp(x, axis=1, keepdims=True), dtype, log_space=True)
    _assert_close(results[4], fastsce.softmax(x.T, axis=0), dtype)
    _assert_close(results[5], fastsce.log_softmax(x), dtype, log_space=True)
    np.testing.assert_allclose(results[0].sum(axis=1), 1.0, rtol=1e-5 if dtype == np.float32 else 1e-13)


def test_special_values_follow_in_memory_semantics(client):
    """-inf entries, all -inf rows and chunks, +inf and NaN rows, across class chunks."""
    x = _logits(np.float64, seed=1, shape=(8, 9))
    x[0] = -np.inf
    x[1, 2] = np.inf
    x[2, 5] = np.nan
    x[3, :3] = -np.inf  # a whole class chunk of -inf in a finite row
    x[4, 7] = -np.inf
    for chunks in [(4, 9), (4, 3)]:
        dx = da.from_array(x, chunks=chunks)
        s, ls, lse = _compute(client, [fsd.softmax(dx), fsd.log_softmax(dx), fsd.logsumexp(dx)])
        with np.errstate(all="ignore"):
            np.testing.assert_array_equal(np.isnan(s), np.isnan(fastsce.softmax(x)))
            _assert_close(s, fastsce.softmax(x), np.float64)
            _assert_close(ls, fastsce.log_softmax(x), np.float64, log_space=True)
            _assert_close(lse, fastsce.logsumexp(x), np.float64, log_space=True)


def test_three_dimensional_logits_with_the_class_axis_in_the_middle(client):
    x = _logits(np.float64, seed=2, shape=(6, 11, 4))
    target = np.random.default_rng(3).integers(0, 11, (6, 4))
    for chunks in [(3, 11, 2), (3, 4, 2)]:
        dx = da.from_array(x, chunks=chunks)
        s, lse, loss, grad = _compute(
            client,
            [
                fsd.softmax(dx, axis=1),
                fsd.logsumexp(dx, axis=1),
                *fsd.cross_entropy_with_grad(dx, target, axis=1, label_smoothing=0.1),
            ],
        )
        ref_loss, ref_grad = fastsce.cross_entropy_with_grad(x, target, axis=1, label_smoothing=0.1)
        _assert_close(s, fastsce.softmax(x, axis=1), np.float64)
        _assert_close(lse, fastsce.logsumexp(x, axis=1), np.float64, log_space=True)
        _assert_close(loss, ref_loss, np.float64, log_space=True)
        _assert_close(grad, ref_grad, np.float64, log_space=True)


# ------------------------------------------------------------- cross-entropy ----
# (probability targets, class weights, reduction, label_smoothing, z_loss): every option
# value with every other at least once, without the whole product (the file stays fast).
OPTIONS = [
    (False, False, "mean", 0.0, 0.0),
    (False, True, "mean", 0.1, 1e-3),
    (False, True, "sum", 0.1, 0.0),
    (False, False, "sum", 0.0, 1e-3),
    (False, False, "none", 0.1, 1e-3),
    (False, True, "none", 0.0, 0.0),
    (True, False, "mean", 0.1, 0.0),
    (True, True, "mean", 0.0, 1e-3),
    (True, True, "sum", 0.1, 1e-3),
    (True, False, "none", 0.0, 0.0),
    (True, True, "none", 0.1, 0.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_cross_entropy_matches_in_memory(client, chunking, dtype):
    rng = np.random.default_rng(4)
    x = _logits(dtype, seed=5)
    dx = da.from_array(x, chunks=CHUNKINGS[chunking])
    labels = rng.integers(0, C, N)
    labels[::7] = -100  # ignored rows
    probs = fastsce.softmax(rng.standard_normal((N, C))).astype(dtype)
    weight = rng.uniform(0.5, 1.5, C)
    cases, lazy = [], []
    for soft, weighted, reduction, smoothing, z_loss in OPTIONS:
        target = probs if soft else labels
        # targets as dask arrays chunked differently from the logits: they are rechunked
        dtarget = da.from_array(target, chunks=(7,) + target.shape[1:])
        options = {
            "weight": weight if weighted else None,
            "reduction": reduction,
            "label_smoothing": smoothing,
            "z_loss": z_loss,
        }
        grad_output = rng.standard_normal(N) if reduction == "none" else 1.5
        cases.append((target, options, grad_output))
        lazy.append(fsd.cross_entropy(dx, dtarget, **options))
        lazy.extend(fsd.cross_entropy_with_grad(dx, dtarget, grad_output=grad_output, **options))
    results = _compute(client, lazy)
    for k, (target, options, grad_output) in enumerate(cases):
        loss, loss_g, grad = results[3 * k : 3 * k + 3]
        ref = fastsce.cross_entropy(x, target, **options)
        ref_g, ref_grad = fastsce.cross_entropy_with_grad(x, target, grad_output=grad_output, **options)
        where = f"case {options}, soft={target.dtype.kind == 'f'}"
        assert np.shape(loss) == np.shape(ref), where
        _assert_close(loss, ref, dtype, log_space=True)
        _assert_close(loss_g, ref_g, dtype, log_space=True)
        assert grad.dtype == dtype, where
        _assert_close(grad, ref_grad, dtype, log_space=True)


@pytest.mark.parametrize("chunking", ["rows", "classes"])
def test_16_bit_logits_equal_the_in_memory_results(client, chunking):
    """float16 (and bfloat16, with ml_dtypes) are computed in float32 and rounded once, so
    the chunked results equal the in-memory ones bit for bit."""
    dtypes = [np.float16]
    ml_dtypes = pytest.importorskip("ml_dtypes") if chunking == "classes" else None
    if ml_dtypes is not None:
        dtypes.append(ml_dtypes.bfloat16)
    target = np.random.default_rng(9).integers(0, C, N)
    for dtype in dtypes:
        x = _logits(np.float64, seed=10).astype(dtype)
        dx = da.from_array(x, chunks=CHUNKINGS[chunking])
        s, ls, loss, grad = _compute(
            client,
            [
                fsd.softmax(dx),
                fsd.log_softmax(dx),
                *fsd.cross_entropy_with_grad(dx, target, reduction="none"),
            ],
        )
        ref_loss, ref_grad = fastsce.cross_entropy_with_grad(x, target, reduction="none")
        for got, ref in [
            (s, fastsce.softmax(x)),
            (ls, fastsce.log_softmax(x)),
            (loss, ref_loss),
            (grad, ref_grad),
        ]:
            assert got.dtype == ref.dtype == dtype
            np.testing.assert_array_equal(got.astype(np.float32), ref.astype(np.float32))


@pytest.mark.parametrize("chunking", ["rows", "classes"])
def test_all_rows_ignored(client, chunking):
    x = _logits(np.float64, seed=6)
    dx = da.from_array(x, chunks=CHUNKINGS[chunking])
    target = np.full(N, 3)
    loss_mean, loss_sum, _, grad = _compute(
        client,
        [
            fsd.cross_entropy(dx, target, ignore_index=3),
            fsd.cross_entropy(dx, target, ignore_index=3, reduction="sum"),
            *fsd.cross_entropy_with_grad(dx, target, ignore_index=3),
        ],
    )
    assert math.isnan(loss_mean) and math.isnan(fastsce.cross_entropy(x, target, ignore_index=3))
    assert loss_sum == 0.0
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("chunking", ["rows", "classes"])
def test_out_of_range_target_raises_naming_the_row(client, chunking):
    dx = da.from_array(_logits(np.float64), chunks=CHUNKINGS[chunking])
    target = np.zeros(N, int)
    target[41] = C
    with pytest.raises(ValueError, match=r"target\[41\] = 17"):
        _compute(client, fsd.cross_entropy(dx, target, reduction="none"))
    with pytest.raises(ValueError, match=r"target\[41\] = 17"):
        _compute(client, fsd.cross_entropy_with_grad(dx, target)[1])


def test_argument_errors_are_raised_eagerly():
    dx = da.zeros((4, 3), chunks=2)
    with pytest.raises(ValueError, match="shape"):
        fsd.cross_entropy(dx, np.zeros(5, int))
    with pytest.raises(ValueError, match="reduction"):
        fsd.cross_entropy(dx, np.zeros(4, int), reduction="avg")
    with pytest.raises(TypeError, match="complex"):
        fsd.softmax(dx.astype(np.complex64))
    with pytest.raises(ValueError, match="grad_output"):
        fsd.cross_entropy_with_grad(dx, np.zeros(4, int), grad_output=np.ones(4))


# ------------------------------------------------- beyond one worker's memory ----
@needs_jit("the point is an array (4e8 elements) larger than a worker's memory: hours as Python loops")
def test_array_larger_than_a_worker_memory_limit(fresh_client):
    """1.6 GB of logits, generated lazily, reduced by workers limited to 1 GiB each.

    No worker could hold the array; the reduction streams row blocks through the fused
    kernels and returns only per-row results.
    """
    n_rows, n_classes = 400_000, 1000
    x = da.random.default_rng(7).random((n_rows, n_classes), dtype=np.float32, chunks=(16_000, n_classes))
    target = da.random.default_rng(8).integers(0, n_classes, n_rows, chunks=16_000)
    assert x.nbytes > 1.4 * WORKER_MEMORY_BYTES
    client = fresh_client
    picked = da.blockwise(
        lambda b, t: np.take_along_axis(b, t[:, None], 1)[:, 0],
        "i",
        x,
        "ij",
        target,
        "i",
        dtype=np.float32,
        concatenate=True,
    )
    workers_before = set(client.scheduler_info()["workers"])
    loss, lse, x_t = _compute(client, [fsd.cross_entropy(x, target), fsd.logsumexp(x), picked])
    assert set(client.scheduler_info()["workers"]) == workers_before  # no worker was restarted
    assert lse.shape == (n_rows,) and lse.dtype == np.float32
    # the reduction is the mean of the per-row terms...
    assert loss == pytest.approx(np.mean(lse.astype(np.float64) - x_t), rel=1e-6)
    # ...which for uniform logits is close to log(C·(e−1)) − 1/2
    assert loss == pytest.approx(math.log(n_classes * (math.e - 1)) - 0.5, abs=5e-3)
    # and the first row block equals the in-memory result
    head = x[:1000].compute()
    _assert_close(lse[:1000], fastsce.logsumexp(head), np.float32, log_space=True)
