"""Linear cross-entropy (``hidden @ weight.T`` + cross-entropy, in row chunks): loss, loss
and gradients, their floor and their peers.

The floor is the three matmuls the chunked computation must do anyway (``h @ W.T``,
``g @ W``, ``g.T @ h`` per chunk of the same size, into preallocated buffers), timed
beside it in ``track_matmul_ratio`` (issue 7's target: <= 1.2). The NumPy reference
materializes the (N, V) logits, as a user would without fastsce; PyTorch's
``F.linear`` + ``F.cross_entropy`` forward and backward is the peer to beat. Commits that
predate ``linear_cross_entropy`` skip these benchmarks.

Shapes are (N, D, V): rows (tokens), features, classes (vocabulary).
"""

from __future__ import annotations

import functools

import numpy as np

import fastsce

from . import common
from .common import TIMEOUT

# By default one small shape (two row chunks of a 32k vocabulary in float32) in float32
# and bfloat16, so that a quick run of the whole suite stays under 5 minutes;
# FASTSCE_ASV_FULL=1 runs issue 7's shapes, and float64 too (tens of seconds per call).
# The smallest shape first.
QUICK_SHAPES = [(1024, 128, 32_000)]
FULL_SHAPES = [(1024, 256, 32_000), (8192, 1024, 32_000), (4096, 1024, 128_000)]
SHAPES = FULL_SHAPES if common.FULL else QUICK_SHAPES
DTYPES = ["float32", "float64", "bfloat16"] if common.FULL else ["float32", "bfloat16"]
PARAMS = [SHAPES, DTYPES]
FLOAT32_PARAMS = [SHAPES, ["float32"]]
PARAM_NAMES = ["shape", "dtype"]
# Default memory budget of the logits chunk (fastsce.linear.DEFAULT_MEMORY_BUDGET).
BUDGET = 64 * 2**20


def _dtype(name: str):
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise NotImplementedError("bfloat16 needs ml_dtypes") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@functools.lru_cache(maxsize=2)
def _inputs(shape: tuple[int, int, int], dtype: str):
    """``(hidden, weight, target)``: hidden rows of norm ~1, weights ~N(0, 1), so logits ~N(0, 1)."""
    n, d, v = shape
    hidden = (common.logits((n, d), "float32", seed=3) / np.sqrt(d)).astype(_dtype(dtype))
    weight = common.logits((v, d), "float32", seed=4).astype(_dtype(dtype))
    return hidden, weight, common.targets(n, v)


def _setup_case(bench, shape, dtype):
    common.require(fastsce, "linear_cross_entropy", "linear_cross_entropy_with_grad")
    bench.hidden, bench.weight, bench.target = _inputs(tuple(shape), dtype)


def _computable(*arrays):
    """16-bit arrays as float32 (NumPy has no fast 16-bit matmul); others as they are."""
    return [a.astype(np.float32) if a.dtype.itemsize == 2 else a for a in arrays]


def numpy_linear_cross_entropy(hidden, weight, target) -> float:
    """The materialized computation: the whole (N, V) logits, then the NumPy loss."""
    hidden, weight = _computable(hidden, weight)
    return common.numpy_cross_entropy(hidden @ weight.T, target)


def numpy_linear_cross_entropy_with_grad(hidden, weight, target):
    hidden, weight = _computable(hidden, weight)
    loss, g = common.numpy_cross_entropy_with_grad(hidden @ weight.T, target)
    return loss, g @ weight, g.T @ hidden


def three_matmuls(hidden, weight, buffers) -> None:
    """The BLAS work of the chunked computation, nothing else (its floor)."""
    logits, d_hidden, d_weight = buffers
    chunk = logits.shape[0]
    for lo in range(0, hidden.shape[0], chunk):
        h, g = hidden[lo : lo + chunk], logits[: min(chunk, hidden.shape[0] - lo)]
        np.matmul(h, weight.T, out=g)
        np.matmul(g, weight, out=d_hidden[lo : lo + chunk])
        np.matmul(g.T, h, out=d_weight)


class LinearCrossEntropy:
    """The loss alone: one matmul per chunk and a read of its logits."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        _setup_case(self, shape, dtype)
        common.warm_up(("linear_cross_entropy", shape, dtype), lambda: self.time_linear_cross_entropy(shape, dtype))

    def time_linear_cross_entropy(self, shape, dtype):
        fastsce.linear_cross_entropy(self.hidden, self.weight, self.target)

    def time_numpy_linear_cross_entropy(self, shape, dtype):
        numpy_linear_cross_entropy(self.hidden, self.weight, self.target)


class LinearCrossEntropyWithGrad:
    """Loss and the gradients of hidden and weight; ``track_matmul_ratio`` against the floor."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        _setup_case(self, shape, dtype)
        self.call = lambda: fastsce.linear_cross_entropy_with_grad(self.hidden, self.weight, self.target)
        common.warm_up(("linear_cross_entropy_with_grad", shape, dtype), self.call)

    def time_linear_cross_entropy_with_grad(self, shape, dtype):
        fastsce.linear_cross_entropy_with_grad(self.hidden, self.weight, self.target)

    def time_numpy_linear_cross_entropy_with_grad(self, shape, dtype):
        numpy_linear_cross_entropy_with_grad(self.hidden, self.weight, self.target)

    def track_matmul_ratio(self, shape, dtype):
        """fastsce time / the three matmuls' time at the same chunking, in float32 for 16-bit."""
        hidden, weight = _computable(self.hidden, self.weight)
        n, d, v = shape
        chunk = max(1, BUDGET // (v * hidden.dtype.itemsize))
        buffers = (np.zeros((min(chunk, n), v), hidden.dtype), np.zeros((n, d), hidden.dtype),
                   np.zeros((v, d), hidden.dtype))
        floor = common.best_time(lambda: three_matmuls(hidden, weight, buffers), repeats=2)
        return common.best_time(self.call, repeats=2) / floor

    track_matmul_ratio.unit = "x matmuls"


class TorchLinearCrossEntropyWithGrad:
    """PyTorch's materialized ``F.linear`` + ``F.cross_entropy`` forward and backward on the CPU
    (float32 only: torch's CPU bfloat16 matmul without AMX takes minutes at these shapes)."""

    params = FLOAT32_PARAMS
    param_names = PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        try:
            import torch
            import torch.nn.functional as F
        except ImportError:
            raise NotImplementedError("torch is not installed") from None
        _setup_case(self, shape, dtype)
        self.F = F
        self.h, self.w = torch.from_numpy(self.hidden), torch.from_numpy(self.weight)
        self.t = torch.from_numpy(self.target)

    def time_torch_linear_cross_entropy_with_grad(self, shape, dtype):
        h = self.h.detach().requires_grad_(True)
        w = self.w.detach().requires_grad_(True)
        self.F.cross_entropy(self.F.linear(h, w), self.t).backward()


class LinearCrossEntropyMemory:
    """Peak memory (the process's peak RSS, inputs included) of the chunked loss and
    gradients against the materialized NumPy computation."""

    params = FLOAT32_PARAMS
    param_names = PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        _setup_case(self, shape, dtype)

    def peakmem_linear_cross_entropy_with_grad(self, shape, dtype):
        fastsce.linear_cross_entropy_with_grad(self.hidden, self.weight, self.target)

    def peakmem_numpy_linear_cross_entropy_with_grad(self, shape, dtype):
        numpy_linear_cross_entropy_with_grad(self.hidden, self.weight, self.target)
