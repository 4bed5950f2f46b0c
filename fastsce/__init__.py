"""fastsce: softmax, log-softmax, logsumexp and fused cross-entropy at the speed of memory.

Numba-compiled CPU kernels for the last layer of a classifier. Nothing is compiled at
import; each kernel compiles (or loads from the on-disk cache) on its first call.
"""

from ._config import get_num_threads, set_num_threads, threads
from .linear import linear_cross_entropy, linear_cross_entropy_with_grad
from .loss import cross_entropy, cross_entropy_with_grad, nll_loss
from .softmax import (
    log_softmax,
    log_softmax_backward,
    logsumexp,
    softmax,
    softmax_backward,
    softmax_jacobian,
)

__version__ = "0.1.0"

__all__ = [
    "cross_entropy",
    "cross_entropy_with_grad",
    "get_num_threads",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "log_softmax",
    "nll_loss",
    "log_softmax_backward",
    "logsumexp",
    "set_num_threads",
    "softmax",
    "softmax_backward",
    "softmax_jacobian",
    "threads",
]
