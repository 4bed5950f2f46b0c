"""Compilation flags and thread control, defined once for every kernel."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Reassociation (vector reductions), FMA contraction, reciprocal and signed-zero
# freedom. Never `fastmath=True`: `nnan`/`ninf` would let LLVM drop NaN and inf.
FASTMATH = {"reassoc", "contract", "arcp", "nsz"}

# Elementwise loops need no reassociation, and must not get it: it would let LLVM
# regroup `(x - m) - log_sum` into `x - (m + log_sum)` and lose accuracy.
ELEMENTWISE_FASTMATH = {"contract", "nsz"}

# Options shared by every @njit: cached on disk, no GIL, NumPy's float error model
# (Python's would insert a ZeroDivisionError branch into every division).
JIT_OPTIONS = {"cache": True, "nogil": True, "error_model": "numpy"}

__all__ = ["ELEMENTWISE_FASTMATH", "FASTMATH", "JIT_OPTIONS", "get_num_threads", "set_num_threads", "threads"]


def _numba():
    import numba

    return numba


def get_num_threads() -> int:
    """Return the number of threads fastsce kernels use in the calling thread."""
    return int(_numba().get_num_threads())


def set_num_threads(n: int) -> None:
    """Set the number of threads fastsce kernels use in the calling thread.

    Parameters
    ----------
    n : int
        Between 1 and the number of threads Numba was started with
        (``NUMBA_NUM_THREADS``, by default the number of cores).
    """
    numba = _numba()
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        raise ValueError(f"n must be between 1 and {limit} (NUMBA_NUM_THREADS), got {n}")
    numba.set_num_threads(n)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Context manager: run fastsce kernels on ``n`` threads inside the block.

    Examples
    --------
    >>> import fastsce
    >>> with fastsce.threads(1):
    ...     pass
    """
    previous = get_num_threads()
    set_num_threads(n)
    try:
        yield
    finally:
        set_num_threads(previous)


def cache_dir() -> str:
    """Directory where Numba stores compiled kernels for fastsce."""
    numba = _numba()
    configured = numba.config.CACHE_DIR
    if configured:
        return configured
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")


def threading_layer() -> str:
    """The Numba threading layer in use ("not started" before the first parallel call)."""
    numba = _numba()
    try:
        return str(numba.threading_layer())
    except ValueError:
        return "not started"
