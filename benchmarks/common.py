"""Shapes, data, NumPy references and measurements shared by the benchmark modules.

The NumPy references are the code a user would otherwise write (the same as in
``fastsce/_bench.py``, copied so that the suite also runs against commits that predate
it). Nothing here launches a parallel kernel at import: asv forks every benchmark from
one process, and a Numba thread pool must not exist before the fork.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - fastsce requires it
    numba = None
if numba is not None:
    # Numba's first compilation in a process loads its typing registries (about a second).
    # Done here, once, in asv's fork server rather than in every forked benchmark; the
    # function is not parallel, so no thread pool exists before the fork.
    numba.njit(lambda: 0)()

FULL = os.environ.get("FASTSCE_ASV_FULL", "") not in ("", "0")

# (rows, classes) of the performance targets, all in float32 and float64 with
# FASTSCE_ASV_FULL=1. The default set is a subset sized so that ``asv run --quick`` of the
# whole suite, Numba compilation included, takes under 5 minutes on two cores: the
# headline benchmarks (softmax, loss + gradient) run on a few-class shape (row blocks)
# and a 1000-class one (row kernels), float64 on the latter only; the others on the
# 1000-class shape in float32. The full set adds the large vocabularies (up to 1 GB).
FULL_SHAPES = [(1_048_576, 10), (262_144, 128), (65_536, 1_000), (8_192, 32_000), (512, 262_144),
               (32, 2_097_152)]
QUICK_SHAPES = [(1_048_576, 10), (65_536, 1_000)]
DTYPES = ["float32", "float64"]
FLOAT64_SHAPE = (65_536, 1_000)
PARAM_NAMES = ["shape", "dtype"]
PARAMS = [FULL_SHAPES, DTYPES] if FULL else [QUICK_SHAPES, DTYPES]
SMALL_PARAMS = [FULL_SHAPES, DTYPES] if FULL else [[FLOAT64_SHAPE], ["float32"]]

# A 1 GB case's NumPy reference takes seconds per call: room for slow shared machines.
TIMEOUT = 300


def check_case(shape: tuple[int, int], dtype: str) -> None:
    """Skip (asv's NotImplementedError convention) float64 outside its one quick shape."""
    if dtype == "float64" and not FULL and tuple(shape) != FLOAT64_SHAPE:
        raise NotImplementedError(f"float64 runs on {FLOAT64_SHAPE} only unless FASTSCE_ASV_FULL=1")


def require(module: Any, *names: str) -> None:
    """Skip when the fastsce being measured (an older commit) lacks one of ``names``."""
    missing = [name for name in names if not hasattr(module, name)]
    if missing:
        raise NotImplementedError(f"this fastsce has no {', '.join(missing)}")


@functools.lru_cache(maxsize=4)
def logits(shape: tuple[int, int], dtype: str, seed: int = 0) -> np.ndarray:
    """Standard-normal logits, built once per process (asv re-runs setup between samples).

    A block of 2**20 random values is tiled over the array: the kernels' speed does not
    depend on the values, and drawing a gigabyte of fresh ones takes longer than timing it.
    """
    rng = np.random.default_rng(seed)
    x = np.empty(shape, dtype)
    flat = x.reshape(-1)
    block = rng.standard_normal(min(flat.size, 1 << 20)).astype(dtype)
    for start in range(0, flat.size, block.size):
        chunk = flat[start : start + block.size]
        chunk[:] = block[: chunk.size]
    return x


@functools.lru_cache(maxsize=4)
def targets(rows: int, classes: int, seed: int = 0) -> np.ndarray:
    """Class indices (int64), one per row."""
    return np.random.default_rng(seed).integers(0, classes, rows)


@functools.lru_cache(maxsize=4)
def scratch(shape: tuple[int, int], dtype: str, tag: str = "out") -> np.ndarray:
    """An output buffer, touched once so that timed calls see no first-touch page faults."""
    out = np.empty(shape, dtype)
    out.fill(0)
    return out


_warmed: set[Any] = set()


def warm_up(key: Any, fn: Callable[[], Any]) -> None:
    """Call ``fn`` once per process: it compiles, or loads the kernels from Numba's cache.

    asv re-runs ``setup`` before every sample; the data and the warm-up stay done.
    """
    if key not in _warmed:
        fn()
        _warmed.add(key)


def best_time(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Minimum wall time of ``repeats`` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class _MemoryBound:
    """Derived figures for a kernel limited by memory traffic (design.md §5).

    A subclass's ``setup`` sets ``self.call`` (the fastsce call, output preallocated),
    ``self.bytes_moved`` (bytes it must read and write at the least), and ``self.x`` and
    ``self.out`` (the logits and a buffer of their size, for ``np.copyto``).
    Both figures are measured in this process, beside a copy of the same array, so they
    hold up on a machine whose absolute speed drifts.
    """

    def track_gbs(self, *params):
        return self.bytes_moved / best_time(self.call) / 1e9

    track_gbs.unit = "GB/s"

    def track_copy_ratio(self, *params):
        copy = best_time(lambda: np.copyto(self.out, self.x))
        return best_time(self.call) / copy

    track_copy_ratio.unit = "x np.copyto"


# ------------------------------------------------------------------ NumPy references ----
def numpy_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def numpy_log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def numpy_logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def numpy_softmax_backward(g: np.ndarray, s: np.ndarray, axis: int = -1) -> np.ndarray:
    return s * (g - (g * s).sum(axis=axis, keepdims=True))


def numpy_log_softmax_backward(g: np.ndarray, ls: np.ndarray, axis: int = -1) -> np.ndarray:
    return g - np.exp(ls) * g.sum(axis=axis, keepdims=True)


def numpy_softmax_jacobian(x: np.ndarray) -> np.ndarray:
    s = numpy_softmax(x)
    return s[:, :, None] * (np.eye(x.shape[-1], dtype=x.dtype) - s[:, None, :])


def numpy_cross_entropy(x: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean(numpy_logsumexp(x) - x[np.arange(target.size), target]))


def numpy_cross_entropy_with_grad(x: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    rows = np.arange(target.size)
    p = numpy_softmax(x)
    loss = float(np.mean(-np.log(p[rows, target])))
    p[rows, target] -= 1.0
    p /= target.size
    return loss, p


def numpy_nll_loss(log_probs: np.ndarray, target: np.ndarray) -> float:
    return float(-np.mean(log_probs[np.arange(target.size), target]))
