"""Compilation flags and thread control, defined once for every kernel."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import warnings
from collections.abc import Iterator

# Reassociation (vector reductions), FMA contraction, reciprocal and signed-zero
# freedom. Never `fastmath=True`: `nnan`/`ninf` would let LLVM drop NaN and inf.
FASTMATH = {"reassoc", "contract", "arcp", "nsz"}

# Elementwise loops need no reassociation, and must not get it: it would let LLVM
# regroup `(x - m) - log_sum` into `x - (m + log_sum)` and lose accuracy.
ELEMENTWISE_FASTMATH = {"contract", "nsz"}

# Options shared by every @njit (JIT_OPTIONS, computed on first use; see __getattr__):
# cached on disk when Numba finds a writable cache directory, no GIL, NumPy's float
# error model (Python's would insert a ZeroDivisionError branch into every division).
_jit_options: dict | None = None


def _cache_probe() -> None:
    """A function in this package whose cache location stands for all kernels'."""


def _disk_cache_available() -> bool:
    from numba.core.caching import FunctionCache

    try:
        FunctionCache(_cache_probe)
    except RuntimeError:  # no locator: read-only install, NUMBA_CACHE_DIR unwritable
        return False
    return True


def __getattr__(name: str):
    global _jit_options
    if name != "JIT_OPTIONS":
        raise AttributeError(name)
    if _jit_options is None:
        cache = _disk_cache_available()
        if not cache:
            warnings.warn(
                "fastsce: no writable cache directory for compiled kernels (set NUMBA_CACHE_DIR); "
                "kernels are compiled in memory in every process",
                RuntimeWarning,
                stacklevel=2,
            )
        _jit_options = {"cache": cache, "nogil": True, "error_model": "numpy"}
    return _jit_options

# How a kernel reads uint16 bits (its `half_format` argument); -1: not 16-bit.
FLOAT16, BFLOAT16, NOT_16BIT = 0, 1, -1

# Below this many classes, back-to-back rows are processed in blocks (row kernels
# would spend each short row in scalar loop epilogues).
SMALL_CLASSES = 64

# Rows whose working copy (in the compute dtype) is bigger than this are "long": reduced,
# then written, a segment of SEGMENT_BYTES at a time (see _kernels.softmax), so that the
# working copy stays in L1. (Zen 4 here, 1 MB of L2 and 32 KB of L1 per core: softmax of
# 512 x 262144 float32 took 1.8x a copy in one working row, 1.3x in 16 KB segments, 1.5x
# in 64 KB segments.)
LONG_ROW_BYTES = 512 * 1024
SEGMENT_BYTES = 16 * 1024


def long_row_segment(n_classes: int, work_itemsize: int) -> int:
    """Elements per segment for rows whose working copy (``work_itemsize`` bytes per
    element) exceeds LONG_ROW_BYTES, or 0 for rows that are computed whole."""
    return SEGMENT_BYTES // work_itemsize if n_classes * work_itemsize > LONG_ROW_BYTES else 0


# Long rows of at least SPLIT_ROW_BYTES (working copy) are each split into chunks of
# about SPLIT_CHUNK_BYTES that all threads share, a row at a time, rather than one row
# per thread: then one row's output, not one per thread, must stay in L3 between the
# passes, and a few rows still use every core. Fixed by the shape alone (the chunks'
# (max, Σ) are merged in order), so results do not depend on the thread count.
SPLIT_ROW_BYTES = 4 * 1024 * 1024
SPLIT_CHUNK_BYTES = 512 * 1024


def long_row_chunks(n_classes: int, work_itemsize: int, segment: int) -> int:
    """Segments per chunk of a long row split across threads, or 0 for a row that one
    thread computes (see SPLIT_ROW_BYTES); ``segment`` from :func:`long_row_segment`."""
    if not segment or n_classes * work_itemsize < SPLIT_ROW_BYTES:
        return 0
    return max(1, SPLIT_CHUNK_BYTES // (segment * work_itemsize))

# Rows per chunk of the cross-entropy's loss sums: fixed, so that the order of the
# float64 additions (and so "mean"/"sum" to the last bit) does not depend on threads.
CHUNK_ROWS = 256
# ...but at least this many chunks when the rows allow, so that a few long rows still
# spread over the threads. Both depend on the row count only, never on the threads.
MIN_CHUNKS = 16


def loss_chunk_rows(n_rows: int) -> int:
    """Rows per loss chunk (the kernels' ``chunk_rows`` is the same formula)."""
    return max(1, min(CHUNK_ROWS, n_rows // MIN_CHUNKS))

# Outputs at least this big are written around the caches (non-temporal stores): they
# would be evicted before reuse anyway, and streaming saves the read that fills each
# cache line before it is written. Smaller outputs stay in cache for the caller.
STREAM_MIN_BYTES = 16 * 2**20
# ...and rows at least this long: on short rows the non-temporal stores cost more than
# the read they save. Measured on Zen 4 (AVX-512), float32 rows of 128 MB outputs,
# streamed against cached stores: 512-byte rows 1.9-2.5x slower, 1 KB 1.6x, 2 KB up to
# 1.3x; 4 KB rows break even; 16 KB rows and longer 10-20% faster. On an Intel Xeon
# (AVX-512, 65.5M float32 elements, 2 threads, as ratios to the copy) softmax and
# log_softmax gain from 3 KB rows: 768 classes 1.56 -> 1.45 and 1.75 -> 1.56, 1000
# classes 1.54 -> 1.36 and 1.75 -> 1.45; 1 KB rows lose (1.33 -> 1.56).
STREAM_MIN_ROW_BYTES = 3072


def streams(output_bytes: int, row_bytes: int) -> bool:
    """Whether a row kernel writes its output around the caches (non-temporal stores):
    outputs of STREAM_MIN_BYTES and more, rows of STREAM_MIN_ROW_BYTES and more."""
    return output_bytes >= STREAM_MIN_BYTES and row_bytes >= STREAM_MIN_ROW_BYTES


__all__ = ["ELEMENTWISE_FASTMATH", "FASTMATH", "JIT_OPTIONS", "get_num_threads", "set_num_threads", "threads"]


_tbb_preload_done = False


def _preload_tbb() -> None:
    """Make the ``tbb`` wheel's library findable before Numba picks a threading layer.

    The wheel installs ``libtbb.so.12`` into ``<prefix>/lib``, which the loader does not
    search inside a virtualenv; Numba's TBB backend then fails to load and Numba falls
    back to OpenMP. Loading it by path first (RTLD_GLOBAL) satisfies the dependency.
    """
    global _tbb_preload_done
    if _tbb_preload_done:
        return
    _tbb_preload_done = True
    names = {"linux": ["libtbb.so.12"], "darwin": ["libtbb.12.dylib"]}.get(sys.platform, [])
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for name in names:
            path = os.path.join(prefix, "lib", name)
            if os.path.exists(path):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                    return
                except OSError:
                    continue


def _numba():
    _preload_tbb()
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


# ------------------------------------------------------------ threading safety ----
# Numba picks the first layer that loads from tbb, omp, workqueue (or the one named by
# NUMBA_THREADING_LAYER). fastsce makes each safe for what training jobs do:
# * tbb: safe for concurrent calls and for fork; nothing to do.
# * omp (GNU OpenMP): a child forked after OpenMP threads started hangs or aborts in its
#   first parallel region, so such a child runs serial builds of the kernels.
# * workqueue: aborts when two Python threads launch kernels at once, so calls are
#   serialized by a lock.
_forked_after_openmp = False
_workqueue_lock = threading.Lock()


def threading_layer() -> str:
    """The Numba threading layer in use, starting Numba's threads if needed."""
    numba = _numba()
    numba.get_num_threads()  # launches the threading layer
    return str(numba.threading_layer())


def _started_layer() -> str | None:
    """The threading layer if Numba's threads have started, else None (no side effects)."""
    if "numba" not in sys.modules:
        return None
    try:
        return str(sys.modules["numba"].threading_layer())
    except ValueError:
        return None


def _after_fork_in_child() -> None:
    global _forked_after_openmp
    if _started_layer() == "omp":
        _forked_after_openmp = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def serial_only() -> bool:
    """True in a process forked after GNU OpenMP started: parallel kernels would hang."""
    return _forked_after_openmp


class _LaunchGate:
    """Kernel launches in flight, so that ``fork()`` waits until none is running.

    A child forked while another thread is inside a parallel kernel inherits the
    threading layer's locks held and deadlocks; a fork only waits for running
    launches to end, and new launches wait for the fork.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._running = 0

    def __enter__(self) -> None:
        with self._condition:
            self._running += 1

    def __exit__(self, *exc: object) -> None:
        with self._condition:
            self._running -= 1
            self._condition.notify_all()

    def before_fork(self) -> None:
        self._condition.acquire()  # held across the fork: no launch starts
        self._condition.wait_for(lambda: self._running == 0)

    def after_fork_in_parent(self) -> None:
        self._condition.release()

    def after_fork_in_child(self) -> None:
        self.__init__()  # the inherited lock is held by a thread that does not exist here


launch_gate = _LaunchGate()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=launch_gate.before_fork,
        after_in_parent=launch_gate.after_fork_in_parent,
        after_in_child=launch_gate.after_fork_in_child,
    )


def kernel_lock() -> contextlib.AbstractContextManager:
    """A lock around kernel launches where the layer needs one (workqueue), else a no-op."""
    return _workqueue_lock if threading_layer() == "workqueue" else contextlib.nullcontext()
