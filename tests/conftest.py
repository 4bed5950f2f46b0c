"""Shared test helpers: the accuracy contract of design.md §4 and the Hypothesis profile.

Tolerances (against a float64 reference computed from the exact input values):

* softmax-like results (probabilities, in linear space):
  float32: relative error <= 4e-6 on entries whose reference is >= 1e-30, absolute
  error <= 1e-30 below that; float64: relative error <= 1e-13 on entries whose
  reference is >= 1e-290 (float64 subnormals cannot hold 13 digits), absolute
  <= 1e-300 below.
* log-space results (log_softmax, logsumexp): absolute error <= tol * (1 + |ref|),
  tol = 4e-6 (float32) or 1e-13 (float64).
* everywhere: NaN exactly where the reference is NaN, and an infinity exactly where
  the reference rounded to the result dtype is that infinity.

Backward passes and the Jacobian have no bound in the design; they are checked with a
condition-scaled bound ``|err| <= rtol * scale`` where ``scale`` is the sum of the
magnitudes of the terms of the formula (rtol 1e-5 float32, 1e-13 float64).
"""

from __future__ import annotations

import os

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# NUMBA_DISABLE_JIT=1 runs every kernel as plain Python (for coverage of kernel code,
# see README "Tests"). The whole suite passes in that mode: tests of compilation, machine
# code, timing or the threading layers of compiled code skip (``needs_jit``), and slow
# tests keep their assertions but use smaller sizes (``jit_or_pure``).
NO_JIT = bool(numba.config.DISABLE_JIT)


def needs_jit(reason: str):
    """Skip the test under NUMBA_DISABLE_JIT=1, saying why it needs compiled kernels."""
    return pytest.mark.skipif(NO_JIT, reason=f"NUMBA_DISABLE_JIT=1: {reason}")


needs_two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="NUMBA_NUM_THREADS < 2")


def jit_or_pure(compiled, pure_python):
    """A test size: ``compiled`` normally, ``pure_python`` under NUMBA_DISABLE_JIT=1,
    where the kernels run as Python loops (same assertions, smaller inputs)."""
    return pure_python if NO_JIT else compiled


# First calls compile kernels (~1-2 s each): no deadline. No example database, so a
# test run leaves no files behind in the repository.
settings.register_profile(
    "fastsce",
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("fastsce-long", parent=settings.get_profile("fastsce"), max_examples=500)
settings.load_profile(os.environ.get("FASTSCE_HYPOTHESIS_PROFILE", "fastsce"))

FLOAT_DTYPES = (np.float32, np.float64)

# design.md §4
LINEAR_RTOL = {np.dtype(np.float32): 4e-6, np.dtype(np.float64): 1e-13}
LINEAR_FLOOR = {np.dtype(np.float32): 1e-30, np.dtype(np.float64): 1e-290}
LINEAR_ATOL = {np.dtype(np.float32): 1e-30, np.dtype(np.float64): 1e-300}
LOG_TOL = {np.dtype(np.float32): 4e-6, np.dtype(np.float64): 1e-13}
# Condition-scaled tolerance for backward passes and the Jacobian (our choice).
SCALED_RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-13}


def _check_special(got: np.ndarray, ref: np.ndarray, dtype) -> np.ndarray:
    """Check dtype, shape, NaN and inf positions; return the mask of finite entries."""
    dtype = np.dtype(dtype)
    got = np.asarray(got)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.dtype == dtype, f"dtype {got.dtype}, expected {dtype}"
    assert got.shape == ref.shape, f"shape {got.shape}, expected {ref.shape}"
    with np.errstate(over="ignore"):
        ref_rounded = ref.astype(dtype)
    nan_ref = np.isnan(ref)
    bad = np.isnan(got) != nan_ref
    assert not bad.any(), _report("NaN pattern differs", got, ref, bad)
    inf_ref = np.isinf(ref_rounded)
    bad = (np.isinf(got) | inf_ref) & ~nan_ref & (got != ref_rounded)
    assert not bad.any(), _report("infinities differ", got, ref, bad)
    return ~nan_ref & ~inf_ref


def _report(what: str, got, ref, bad, err=None, bound=None) -> str:
    idx = np.argwhere(np.atleast_1d(bad))
    lines = [
        f"{what}: {idx.shape[0]} of {np.size(bad)} entries, first at {tuple(idx[0]) if len(idx) else ()}"
    ]
    got1 = np.atleast_1d(got)
    ref1 = np.atleast_1d(ref)
    for k in idx[:5]:
        k = tuple(k)
        line = f"  at {k}: got {got1[k]!r}, ref {ref1[k]!r}"
        if err is not None:
            line += f", err {np.atleast_1d(err)[k]:.3e} > bound {np.atleast_1d(bound)[k]:.3e}"
        lines.append(line)
    if err is not None:
        finite = np.isfinite(np.atleast_1d(bound)) & (np.atleast_1d(bound) > 0)
        ratio = np.where(finite, np.atleast_1d(err) / np.where(finite, np.atleast_1d(bound), 1), 0)
        lines.append(f"  worst err/bound = {np.max(ratio):.3f}")
    return "\n".join(lines)


def assert_close_softmax(got, ref, dtype) -> None:
    """Probabilities: the design.md §4 relative bound (see the module docstring)."""
    dtype = np.dtype(dtype)
    finite = _check_special(got, ref, dtype)
    got64 = np.asarray(got).astype(np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(got64 - ref), 0.0)
        bound = np.where(
            np.abs(ref) >= LINEAR_FLOOR[dtype], LINEAR_RTOL[dtype] * np.abs(ref), LINEAR_ATOL[dtype]
        )
    bad = err > bound
    assert not bad.any(), _report("softmax values outside the §4 bound", got, ref, bad, err, bound)


def assert_close_log(got, ref, dtype) -> None:
    """Log-space values: ``|err| <= tol * (1 + |ref|)`` (design.md §4)."""
    dtype = np.dtype(dtype)
    finite = _check_special(got, ref, dtype)
    got64 = np.asarray(got).astype(np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(got64 - ref), 0.0)
        bound = LOG_TOL[dtype] * (1.0 + np.abs(np.where(finite, ref, 0.0)))
    bad = err > bound
    assert not bad.any(), _report("log-space values outside the §4 bound", got, ref, bad, err, bound)


def assert_close_scaled(got, ref, scale, dtype, rtol=None) -> None:
    """``|got - ref| <= rtol * scale + tiny``; ``scale`` = Σ |terms| of the formula."""
    dtype = np.dtype(dtype)
    finite = _check_special(got, ref, dtype)
    rtol = SCALED_RTOL[dtype] if rtol is None else rtol
    got64 = np.asarray(got).astype(np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.abs(got64 - ref), 0.0)
        bound = rtol * np.asarray(scale, dtype=np.float64) + LINEAR_ATOL[dtype]
    bad = err > bound
    assert not bad.any(), _report("values outside the condition-scaled bound", got, ref, bad, err, bound)


def softmax_backward_scale(g, s, axis=-1) -> np.ndarray:
    """Magnitude of the terms of ``s * (g - Σ g·s)``: ``|s| * (|g| + Σ |g·s|)``."""
    g = np.asarray(g, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    return np.abs(s) * (np.abs(g) + np.sum(np.abs(g * s), axis=axis, keepdims=True))


def log_softmax_backward_scale(g, ls, axis=-1) -> np.ndarray:
    """Magnitude of the terms of ``g - exp(ls)·Σ g``: ``|g| + exp(ls)·Σ |g|``."""
    g = np.asarray(g, dtype=np.float64)
    ls = np.asarray(ls, dtype=np.float64)
    return np.abs(g) + np.exp(ls) * np.sum(np.abs(g), axis=axis, keepdims=True)


def jacobian_scale(s_last) -> np.ndarray:
    """Magnitude of ``s_i (δ_ij − s_j)``'s terms: ``s_i (δ_ij + s_j)``, class axis last."""
    s = np.asarray(s_last, dtype=np.float64)
    return s[..., :, None] * (np.eye(s.shape[-1]) + s[..., None, :])


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, fixed-seed generator per test."""
    return np.random.default_rng(20240611)


def tiny_long_rows(monkeypatch, split: bool = False) -> None:
    """Rows of more than 32 bytes count as long (_config.long_row_segment), in segments of
    16 float32 (8 float64) elements: the long-row kernels on small test arrays. ``split``:
    rows of 128 bytes and more are also split across threads (_config.long_row_chunks),
    in chunks of two segments (101 float32 classes: 4 chunks, the last of 5 elements)."""
    import fastsce._config as config

    monkeypatch.setattr(config, "LONG_ROW_BYTES", 32)
    monkeypatch.setattr(config, "SEGMENT_BYTES", 64)
    if split:
        monkeypatch.setattr(config, "SPLIT_ROW_BYTES", 128)
        monkeypatch.setattr(config, "SPLIT_CHUNK_BYTES", 128)
