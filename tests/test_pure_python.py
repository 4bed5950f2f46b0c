"""Pure-Python mode (``NUMBA_DISABLE_JIT=1``, issue 9 item 2) and kernel paths found
uncovered by measuring coverage in that mode.

* ``test_pure_python_mode_passes_a_representative_subset``: in the normal (compiled)
  suite, a small selection of the suite runs again in a subprocess with
  ``NUMBA_DISABLE_JIT=1``, so CI proves that the kernels still run as plain Python.
  The whole suite in that mode, with the coverage report, is ``tools/coverage_nojit.sh``.
* Paths that coverage found untested (they run compiled in the normal suite too):
  streamed stores (non-temporal, for big outputs of long rows: ``_config.streams``), forced
  on small arrays by lowering the threshold, for every kernel that streams, against the
  float64 references; and ``_layout``'s refusal of arrays it cannot describe. The
  per-row ``return_lse`` of the cross-entropy row kernels is a case of
  ``tests/test_loss.py::test_return_lse_and_argmax``.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numba
import numpy as np
import pytest

import fastsce
from tests import reference as ref
from tests.conftest import (
    NO_JIT,
    assert_close_log,
    assert_close_scaled,
    assert_close_softmax,
    log_softmax_backward_scale,
    softmax_backward_scale,
)
from tests.test_loss import assert_grad_close, assert_loss_close, make_logits, make_target, options

ROOT = Path(__file__).resolve().parents[1]

# One selection per family, a few seconds as Python loops: every softmax-family function
# on the row, row-block and column paths in both dtypes; the fused cross-entropy with
# every option; 16-bit inputs; the linear cross-entropy; and this file (which checks
# that the kernels really are plain Python there, and the streamed stores).
SUBSET = [
    "tests/test_pure_python.py",
    "tests/test_softmax.py::test_values",
    "tests/test_softmax.py::test_axes_3d",
    "tests/test_loss.py::test_grid_vs_reference",
    "tests/test_16bit.py::test_special_values",
    "tests/test_linear.py::test_same_as_fastsce_on_the_logits",
]
SUBSET_K = "not test_values or ((3x7 or 17x128) and normal)"  # row blocks, rows


def test_kernels_are_compiled_unless_the_jit_is_disabled():
    """The suite's mode is what the environment asks for: under NUMBA_DISABLE_JIT=1 the
    kernels are the plain Python functions (so coverage sees their lines)."""
    from fastsce._kernels import rowio, softmax, xent

    kernels = [softmax.softmax_rows, softmax.forward_columns, xent.hard_xent_rows, rowio.copy_max]
    compiled = [isinstance(k, numba.core.dispatcher.Dispatcher) for k in kernels]
    assert compiled == [not NO_JIT] * len(kernels)
    assert NO_JIT == (os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"))


@pytest.mark.skipif(NO_JIT, reason="this run is already pure Python")
def test_pure_python_mode_passes_a_representative_subset():
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET,
         "-k", SUBSET_K],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = re.search(r"(\d+) passed", out)
    assert summary and int(summary.group(1)) >= 40, out[-3000:]
    assert not re.search(r"\d+ (failed|error)", out), out[-6000:]


# ------------------------------------------------------------- streamed stores ----
@pytest.fixture
def stream_everything(monkeypatch):
    """Every output takes the streamed-store path, whatever its size. Under
    NUMBA_DISABLE_JIT=1 the calls to the streaming loop are also counted."""
    for name in ("fastsce.softmax", "fastsce.loss"):
        monkeypatch.setattr(importlib.import_module(name), "streams", lambda *sizes: True)
    calls = []
    if NO_JIT:
        from fastsce._kernels import rowio

        stream_scaled, stream_encoded = rowio.stream_scaled, rowio.stream_encoded

        def counted(src, dst, start, factor):
            calls.append(src.size)
            return stream_scaled(src, dst, start, factor)

        def counted_bits(values, bits, start, half_format, factor):
            calls.append(values.size)
            return stream_encoded(values, bits, start, half_format, factor)

        monkeypatch.setattr(rowio, "stream_scaled", counted)
        monkeypatch.setattr(rowio, "stream_encoded", counted_bits)
    yield calls
    if NO_JIT:
        assert calls, "the streamed-store path was not taken"


def test_only_big_outputs_of_long_rows_are_streamed():
    """Streaming needs both: an output bigger than the caches, and rows long enough that
    the non-temporal stores pay (short rows ran 2.5x slower streamed)."""
    from fastsce._config import STREAM_MIN_BYTES, STREAM_MIN_ROW_BYTES, streams

    assert streams(STREAM_MIN_BYTES, STREAM_MIN_ROW_BYTES)
    assert streams(2**30, 2**20)
    assert not streams(STREAM_MIN_BYTES - 1, 2**20)  # fits the caches: keep it there
    assert not streams(2**30, STREAM_MIN_ROW_BYTES - 1)  # 512-byte rows of a 1 GB output
    assert not streams(2**30, 128 * 4)
    assert streams(2**30, 1000 * 4)  # 1000 float32 classes


def test_only_rows_of_megabytes_are_split_across_threads():
    """A row is split into chunks for all threads from SPLIT_ROW_BYTES on; the chunks
    are whole segments of about SPLIT_CHUNK_BYTES."""
    from fastsce._config import SPLIT_CHUNK_BYTES, SPLIT_ROW_BYTES, long_row_chunks, long_row_segment

    n = SPLIT_ROW_BYTES // 4
    assert long_row_chunks(n, 4, long_row_segment(n, 4)) * long_row_segment(n, 4) * 4 == SPLIT_CHUNK_BYTES
    assert long_row_chunks(n - 1, 4, long_row_segment(n - 1, 4)) == 0  # a row per task
    assert long_row_chunks(2**21, 8, long_row_segment(2**21, 8)) > 0  # float64: 16 MB rows
    assert long_row_chunks(1000, 4, long_row_segment(1000, 4)) == 0  # not even long


# Row lengths (>= SMALL_CLASSES, so the row kernels) whose rows start at many offsets
# within a cache line and leave a ragged head and tail around the whole lines.
STREAM_SHAPES = [(9, 130), (5, 71), (3, 1000)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", STREAM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_streamed_softmax_and_log_softmax(stream_everything, shape, dtype):
    rng = np.random.default_rng(31)
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    assert_close_softmax(fastsce.softmax(x), ref.softmax(x), dtype)
    assert_close_log(fastsce.log_softmax(x), ref.log_softmax(x), dtype)
    # into a strided view (rows 3 elements off the array's alignment) and in place
    big = np.full((shape[0], shape[1] + 5), 7.0, dtype)
    out = big[:, 3 : 3 + shape[1]]
    assert fastsce.softmax(x, out=out) is out
    assert_close_softmax(out, ref.softmax(x), dtype)
    assert np.all(big[:, :3] == 7.0) and np.all(big[:, 3 + shape[1] :] == 7.0)  # nothing written around it
    y = x.copy()
    fastsce.log_softmax(y, out=y)
    assert_close_log(y, ref.log_softmax(x), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_streamed_backward(stream_everything, dtype):
    rng = np.random.default_rng(32)
    x = (3 * rng.standard_normal((6, 150))).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    s = ref.softmax(x).astype(dtype)
    ls = ref.log_softmax(x).astype(dtype)
    assert_close_scaled(fastsce.softmax_backward(g, s), ref.softmax_backward(g, s), softmax_backward_scale(g, s),
                        dtype)
    got = fastsce.log_softmax_backward(g, ls, out=g.copy())
    assert_close_scaled(got, ref.log_softmax_backward(g, ls), log_softmax_backward_scale(g, ls), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize(("kind", "shape"), [("hard", (11, 97)), ("soft", (11, 97)), ("hard", (5, 4500))],
                         ids=["hard", "soft", "hard-over16KB"])
def test_streamed_cross_entropy_gradient(stream_everything, shape, kind, smoothing, dtype):
    """Hard targets without smoothing finish a short streamed row in scratch (scaled,
    target entry set) before it goes out, a long one as it goes out; with smoothing, and
    soft targets, other ways."""
    rng = np.random.default_rng(33)
    x = make_logits(shape, dtype, rng)
    t = make_target(kind, x, -1, rng, ignore_rows=(4,))
    w = rng.uniform(0.5, 2.0, shape[1]).astype(dtype)
    for reduction in ("mean", "none"):
        opts = options(w, reduction, smoothing, 1e-3)
        expected_loss = ref.cross_entropy_ref(x, t, **opts)
        expected_grad = ref.cross_entropy_grad_ref(x, t, **opts)
        loss, grad = fastsce.cross_entropy_with_grad(x, t, **opts)
        assert_loss_close(loss, expected_loss, dtype, reduction)
        assert_grad_close(grad, expected_grad, dtype)
        y = x.copy()
        loss, grad = fastsce.cross_entropy_with_grad(y, t, **opts, inplace=True)
        assert grad is y
        assert_loss_close(loss, expected_loss, dtype, reduction)
        assert_grad_close(grad, expected_grad, dtype)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", STREAM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_streamed_16_bit_outputs_have_the_bits_of_plain_stores(monkeypatch, shape, half):
    """16-bit results streamed (encoded a cache line at a time in registers) are the very
    bits the plain stores write: softmax, log_softmax and the cross-entropy gradient, into
    fresh arrays, strided views 3 elements off the alignment, and in place."""
    dtype = np.dtype(ml_dtypes.bfloat16) if half == "bfloat16" else np.dtype(np.float16)
    rng = np.random.default_rng(34)
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    x[0, 1], x[-1, :2] = np.nan, np.inf  # NaN and overflow through the encoder
    t = rng.integers(0, shape[1], shape[0])

    def results():
        out = np.full((shape[0], shape[1] + 5), 7.0, dtype)
        in_place = x.copy()
        fastsce.log_softmax(in_place, out=in_place)
        computed = [fastsce.softmax(x), fastsce.log_softmax(x), fastsce.cross_entropy_with_grad(x, t)[1],
                    fastsce.softmax(x, out=out[:, 3 : 3 + shape[1]]), in_place]
        assert np.all(out[:, :3] == 7.0) and np.all(out[:, 3 + shape[1] :] == 7.0)  # nothing written around
        return [r.view(np.uint16).copy() for r in computed]

    plain = results()
    calls = []
    for name in ("fastsce.softmax", "fastsce.loss"):
        monkeypatch.setattr(importlib.import_module(name), "streams", lambda *sizes: True)
    if NO_JIT:
        from fastsce._kernels import rowio

        stream_encoded = rowio.stream_encoded
        monkeypatch.setattr(rowio, "stream_encoded", lambda *args: calls.append(1) or stream_encoded(*args))
    streamed = results()
    for got, expected in zip(streamed, plain):
        np.testing.assert_array_equal(got, expected)
    if NO_JIT:
        assert calls, "the streamed-store path was not taken"


# ------------------------------------------------------------------------ layout ----
def test_layout_refuses_arrays_it_cannot_describe():
    """Strides that are not whole elements have no kernel layout: ``plan_layout`` says so
    (the wrappers then copy), and ``require_plan``, for their own fresh arrays, raises."""
    from fastsce import _layout

    odd = np.ndarray((3,), np.float32, buffer=np.zeros(64, np.uint8), strides=(5,))
    assert _layout._element_strides(odd) is None
    assert _layout.plan_layout([odd], 0) is None
    with pytest.raises(RuntimeError, match="no kernel layout"):
        _layout.require_plan([odd], 0)
    # the public functions copy such an array and compute as usual
    assert_close_softmax(fastsce.softmax(odd), ref.softmax(odd), np.float32)
