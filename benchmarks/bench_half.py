"""16-bit logits: float16, and bfloat16 when ml_dtypes is installed.

fastsce reads them as 16 bits and computes in float32 one row at a time, so it moves half
the bytes of a float32 call. The NumPy reference is what a user would otherwise write:
cast to float32, compute, cast back. Commits that predate 16-bit support skip these.
"""

from __future__ import annotations

import numpy as np

import fastsce

from . import common
from .common import TIMEOUT, _MemoryBound

# One mid-size shape by default: NumPy's 16-bit casts make its reference slow.
HALF_PARAMS = [common.FULL_SHAPES if common.FULL else [(262_144, 128)], ["float16", "bfloat16"]]


def half_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise NotImplementedError("bfloat16 needs ml_dtypes") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def supported(call) -> None:
    """Run ``call`` once (it compiles); a commit without 16-bit support raises TypeError: skip."""
    try:
        call()
    except TypeError as error:
        raise NotImplementedError(f"this fastsce has no 16-bit support: {error}") from None


class HalfSoftmax(_MemoryBound):
    """softmax of 16-bit logits into a 16-bit output (floor: one copy of the 16-bit array)."""

    params = HALF_PARAMS
    param_names = common.PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        self.x = common.logits(shape, half_dtype(dtype))
        self.out = common.scratch(shape, half_dtype(dtype))
        self.call = lambda: fastsce.softmax(self.x, out=self.out)
        self.bytes_moved = 2 * self.x.nbytes
        common.warm_up(("half softmax", shape, dtype), lambda: supported(self.call))

    def time_softmax(self, shape, dtype):
        fastsce.softmax(self.x, out=self.out)

    def time_numpy_softmax(self, shape, dtype):
        common.numpy_softmax(self.x.astype(np.float32)).astype(self.x.dtype)


class HalfCrossEntropyWithGrad(_MemoryBound):
    """Loss and a 16-bit gradient of 16-bit logits in one pass (floor: one copy)."""

    params = HALF_PARAMS
    param_names = common.PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        common.require(fastsce, "cross_entropy_with_grad")
        self.x = common.logits(shape, half_dtype(dtype))
        self.target = common.targets(*shape)
        self.out = common.scratch(shape, half_dtype(dtype))
        self.call = lambda: fastsce.cross_entropy_with_grad(self.x, self.target, out=self.out)
        self.bytes_moved = 2 * self.x.nbytes
        common.warm_up(("half cross_entropy_with_grad", shape, dtype), lambda: supported(self.call))

    def time_cross_entropy_with_grad(self, shape, dtype):
        fastsce.cross_entropy_with_grad(self.x, self.target, out=self.out)

    def time_numpy_cross_entropy_with_grad(self, shape, dtype):
        _, grad = common.numpy_cross_entropy_with_grad(self.x.astype(np.float32), self.target)
        grad.astype(self.x.dtype)
