"""Cross-entropy: the loss alone, the fused loss + gradient, nll_loss, and their options.

Every ``time_<function>`` has a ``time_numpy_<function>`` beside it. ``CrossEntropyWithGrad``
(the training step) runs on every default shape, the rest on the 1000-class one in float32,
unless FASTSCE_ASV_FULL=1. Commits that predate the losses skip these benchmarks (asv
shows them as n/a).
"""

from __future__ import annotations

import numpy as np

import fastsce

from . import common
from .common import PARAM_NAMES, PARAMS, SMALL_PARAMS, TIMEOUT, _MemoryBound


def _setup_case(bench, shape, dtype):
    common.require(fastsce, "cross_entropy", "cross_entropy_with_grad", "nll_loss")
    common.check_case(shape, dtype)
    bench.x = common.logits(shape, dtype)
    bench.target = common.targets(*shape)


class CrossEntropy(_MemoryBound):
    """The mean loss: one read of the logits (floor: a read, so the copy ratio should be < 1)."""

    params = SMALL_PARAMS
    param_names = PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        _setup_case(self, shape, dtype)
        self.out = common.scratch(shape, dtype)
        self.call = lambda: fastsce.cross_entropy(self.x, self.target)
        self.bytes_moved = self.x.nbytes
        common.warm_up(("cross_entropy", shape, dtype), self.call)

    def time_cross_entropy(self, shape, dtype):
        fastsce.cross_entropy(self.x, self.target)

    def time_numpy_cross_entropy(self, shape, dtype):
        common.numpy_cross_entropy(self.x, self.target)


class CrossEntropyWithGrad(_MemoryBound):
    """Loss and gradient in one pass into a preallocated gradient (floor: one copy)."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        _setup_case(self, shape, dtype)
        self.out = common.scratch(shape, dtype)
        self.call = lambda: fastsce.cross_entropy_with_grad(self.x, self.target, out=self.out)
        self.bytes_moved = 2 * self.x.nbytes
        common.warm_up(("cross_entropy_with_grad", shape, dtype), self.call)

    def time_cross_entropy_with_grad(self, shape, dtype):
        fastsce.cross_entropy_with_grad(self.x, self.target, out=self.out)

    def time_numpy_cross_entropy_with_grad(self, shape, dtype):
        common.numpy_cross_entropy_with_grad(self.x, self.target)


class NllLoss:
    """nll_loss of log-probabilities (the logits stand in: the values do not change the cost)."""

    params = SMALL_PARAMS
    param_names = PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        _setup_case(self, shape, dtype)
        common.warm_up(("nll_loss", shape, dtype), lambda: fastsce.nll_loss(self.x, self.target))

    def time_nll_loss(self, shape, dtype):
        fastsce.nll_loss(self.x, self.target)

    def time_numpy_nll_loss(self, shape, dtype):
        common.numpy_nll_loss(self.x, self.target)


class CrossEntropyMemory:
    """Peak memory of loss + gradient (the process's peak RSS, logits included): a fresh
    gradient array, the gradient written over the logits, and NumPy's reference."""

    params = SMALL_PARAMS
    param_names = PARAM_NAMES
    timeout = TIMEOUT

    def setup(self, shape, dtype):
        _setup_case(self, shape, dtype)
        # Its own array: inplace=True overwrites it, and the shared logits must stay intact.
        self.work = common.logits(shape, dtype, seed=2)

    def peakmem_cross_entropy_with_grad(self, shape, dtype):
        fastsce.cross_entropy_with_grad(self.x, self.target)

    def peakmem_cross_entropy_with_grad_inplace(self, shape, dtype):
        fastsce.cross_entropy_with_grad(self.work, self.target, inplace=True)

    def peakmem_numpy_cross_entropy_with_grad(self, shape, dtype):
        common.numpy_cross_entropy_with_grad(self.x, self.target)


class CrossEntropyOptions:
    """The fused loss + gradient with each PyTorch option on, on one mid-size shape."""

    params = [["none", "weight", "ignore_index", "label_smoothing", "z_loss", "sum"]]
    param_names = ["option"]
    timeout = TIMEOUT
    shape = (65_536, 1_000)

    def setup(self, option):
        _setup_case(self, self.shape, "float32")
        classes = self.shape[1]
        target = self.target
        if option == "ignore_index":
            target = target.copy()
            target[::10] = -100  # one row in ten ignored
        self.target = target
        self.kwargs = {
            "none": {},
            "weight": {"weight": np.linspace(0.5, 2.0, classes, dtype=np.float32)},
            "ignore_index": {},
            "label_smoothing": {"label_smoothing": 0.1},
            "z_loss": {"z_loss": 1e-4},
            "sum": {"reduction": "sum"},
        }[option]
        self.out = common.scratch(self.shape, "float32")
        try:
            common.warm_up(("options", option), lambda: self.time_cross_entropy_with_grad(option))
        except TypeError as error:  # a commit that predates the option
            raise NotImplementedError(str(error)) from None

    def time_cross_entropy_with_grad(self, option):
        fastsce.cross_entropy_with_grad(self.x, self.target, out=self.out, **self.kwargs)
