"""Softmax family: softmax, log_softmax, logsumexp, their backward passes and the Jacobian.

Every ``time_<function>`` has a ``time_numpy_<function>`` beside it (the NumPy code a user
would otherwise write), so the graphs show the gap. fastsce writes into a preallocated
output in the ``time_`` benchmarks; ``SoftmaxMemory`` measures the fresh-output case.
``Softmax`` runs on every default shape (``common.PARAMS``), the rest on the 1000-class
one in float32 (``common.SMALL_PARAMS``), unless FASTSCE_ASV_FULL=1.
"""

from __future__ import annotations

import fastsce

from . import common
from .common import PARAM_NAMES, PARAMS, SMALL_PARAMS, TIMEOUT, _MemoryBound


class Softmax(_MemoryBound):
    """softmax over the last axis; ``track_`` figures against ``np.copyto`` (floor: one copy)."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        common.check_case(shape, dtype)
        self.x = common.logits(shape, dtype)
        self.out = common.scratch(shape, dtype)
        self.call = lambda: fastsce.softmax(self.x, out=self.out)
        self.bytes_moved = 2 * self.x.nbytes
        common.warm_up(("softmax", shape, dtype), self.call)

    def time_softmax(self, shape, dtype):
        fastsce.softmax(self.x, out=self.out)

    def time_numpy_softmax(self, shape, dtype):
        common.numpy_softmax(self.x)


class LogSoftmax(_MemoryBound):
    """log_softmax over the last axis (floor: one copy)."""

    params = SMALL_PARAMS
    param_names = PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        common.check_case(shape, dtype)
        self.x = common.logits(shape, dtype)
        self.out = common.scratch(shape, dtype)
        self.call = lambda: fastsce.log_softmax(self.x, out=self.out)
        self.bytes_moved = 2 * self.x.nbytes
        common.warm_up(("log_softmax", shape, dtype), self.call)

    def time_log_softmax(self, shape, dtype):
        fastsce.log_softmax(self.x, out=self.out)

    def time_numpy_log_softmax(self, shape, dtype):
        common.numpy_log_softmax(self.x)


class LogSumExp(_MemoryBound):
    """logsumexp over the last axis (floor: one read, so the copy ratio should be < 1)."""

    params = SMALL_PARAMS
    param_names = PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        common.check_case(shape, dtype)
        self.x = common.logits(shape, dtype)
        self.out = common.scratch(shape, dtype)
        self.call = lambda: fastsce.logsumexp(self.x)
        self.bytes_moved = self.x.nbytes
        common.warm_up(("logsumexp", shape, dtype), self.call)

    def time_logsumexp(self, shape, dtype):
        fastsce.logsumexp(self.x)

    def time_numpy_logsumexp(self, shape, dtype):
        common.numpy_logsumexp(self.x)


class SoftmaxBackward:
    """softmax_backward and log_softmax_backward: read g and the forward output, write one array."""

    params = SMALL_PARAMS
    param_names = PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        common.check_case(shape, dtype)
        self.g = common.logits(shape, dtype, seed=1)
        self.s = common.scratch(shape, dtype, "softmax")
        self.ls = common.scratch(shape, dtype, "log_softmax")
        self.out = common.scratch(shape, dtype)
        x = common.logits(shape, dtype)

        def forward_and_compile():
            fastsce.softmax(x, out=self.s)
            fastsce.log_softmax(x, out=self.ls)
            fastsce.softmax_backward(self.g, self.s, out=self.out)
            fastsce.log_softmax_backward(self.g, self.ls, out=self.out)

        common.warm_up(("backward", shape, dtype), forward_and_compile)

    def time_softmax_backward(self, shape, dtype):
        fastsce.softmax_backward(self.g, self.s, out=self.out)

    def time_numpy_softmax_backward(self, shape, dtype):
        common.numpy_softmax_backward(self.g, self.s)

    def time_log_softmax_backward(self, shape, dtype):
        fastsce.log_softmax_backward(self.g, self.ls, out=self.out)

    def time_numpy_log_softmax_backward(self, shape, dtype):
        common.numpy_log_softmax_backward(self.g, self.ls)


class SoftmaxMemory:
    """Peak memory of softmax with a fresh output (asv's peakmem is the process's peak RSS:
    the logits, the output and any temporaries; NumPy's reference makes three arrays)."""

    params = SMALL_PARAMS
    param_names = PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        common.check_case(shape, dtype)
        self.x = common.logits(shape, dtype)

    def peakmem_softmax(self, shape, dtype):
        fastsce.softmax(self.x)

    def peakmem_numpy_softmax(self, shape, dtype):
        common.numpy_softmax(self.x)


class SoftmaxJacobian:
    """The explicit (N, C, C) Jacobian, for small class counts only."""

    params = [[(16_384, 32), (512, 256)] if common.FULL else [(16_384, 32)], ["float32"]]
    param_names = PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        common.require(fastsce, "softmax_jacobian")
        self.x = common.logits(shape, dtype)
        common.warm_up(("softmax_jacobian", shape, dtype), lambda: fastsce.softmax_jacobian(self.x[:2]))

    def time_softmax_jacobian(self, shape, dtype):
        fastsce.softmax_jacobian(self.x)

    def time_numpy_softmax_jacobian(self, shape, dtype):
        common.numpy_softmax_jacobian(self.x)
