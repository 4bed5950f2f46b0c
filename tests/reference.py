"""Naive float64 NumPy reference formulas that the fastsce kernels are tested against.

Every function here is the textbook formula, computed in float64 whatever the input
dtype (the input values are converted exactly, so a float32 input is compared with the
exact result for those float32 values). Nothing is clever or fast; each function is a
few lines that can be checked by eye. Keep this a flat module of documented functions:
other families (cross-entropy, ...) add their references here too.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "jvp_via_jacobian",
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "softmax",
    "softmax_backward",
    "softmax_jacobian",
]


def _f64(x) -> np.ndarray:
    """``x`` as a float64 array (exact for every float32/integer/bool value)."""
    return np.asarray(x).astype(np.float64)


def _row_max(x: np.ndarray, axis: int) -> np.ndarray:
    """Max along ``axis`` with keepdims; NaN propagates; an empty axis gives -inf."""
    if x.shape[axis] == 0:
        shape = list(x.shape)
        shape[axis] = 1
        return np.full(shape, -np.inf)
    return np.max(x, axis=axis, keepdims=True)


def softmax(x, axis: int = -1) -> np.ndarray:
    """``exp(x - max) / sum(exp(x - max))`` along ``axis``, in float64.

    A row that is all ``-inf`` or holds a NaN or ``+inf`` comes out all NaN
    (``-inf - -inf`` and ``inf - inf`` are NaN), as in PyTorch.
    """
    x = _f64(x)
    with np.errstate(all="ignore"):
        e = np.exp(x - _row_max(x, axis))
        return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x, axis: int = -1) -> np.ndarray:
    """``(x - max) - log(sum(exp(x - max)))`` along ``axis``, in float64.

    ``-inf`` entries give ``-inf``; bad rows (all ``-inf``, NaN, ``+inf``) give NaN.
    """
    x = _f64(x)
    with np.errstate(all="ignore"):
        shifted = x - _row_max(x, axis)
        return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def logsumexp(x, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """``m + log(sum(exp(x - m)))`` along ``axis`` with ``m`` the max, in float64.

    PyTorch semantics: all ``-inf`` (or an empty axis) gives ``-inf``, a ``+inf``
    entry (and no NaN) gives ``+inf``, a NaN gives NaN. ``m`` is replaced by 0 where
    it is not finite so that these cases fall out of the same formula.
    """
    x = _f64(x)
    with np.errstate(all="ignore"):
        m = _row_max(x, axis)
        m = np.where(np.isfinite(m), m, 0.0)
        out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def softmax_backward(g, s, axis: int = -1) -> np.ndarray:
    """Vector-Jacobian product of softmax: ``s * (g - sum(g * s))`` along ``axis``.

    ``g`` is the gradient of the output, ``s`` the softmax output.
    """
    g = _f64(g)
    s = _f64(s)
    return s * (g - np.sum(g * s, axis=axis, keepdims=True))


def log_softmax_backward(g, ls, axis: int = -1) -> np.ndarray:
    """Vector-Jacobian product of log_softmax: ``g - exp(ls) * sum(g)`` along ``axis``.

    ``g`` is the gradient of the output, ``ls`` the log_softmax output.
    """
    g = _f64(g)
    ls = _f64(ls)
    return g - np.exp(ls) * np.sum(g, axis=axis, keepdims=True)


def softmax_jacobian(x, axis: int = -1) -> np.ndarray:
    """Jacobian ``J[..., i, j] = s_i * (delta_ij - s_j)`` of softmax along ``axis``.

    The class axis is moved last first, so the result has shape
    ``x.shape`` without ``axis`` followed by ``(C, C)``. It is symmetric in ``i, j``.
    """
    s = np.moveaxis(softmax(x, axis), axis, -1)
    c = s.shape[-1]
    return s[..., :, None] * (np.eye(c) - s[..., None, :])


def jvp_via_jacobian(x, g, axis: int = -1) -> np.ndarray:
    """``softmax_jacobian(x) @ g`` row by row, with the result's class axis at ``axis``.

    The explicit (slow) Jacobian-vector product; because the Jacobian is symmetric it
    equals the vector-Jacobian product ``softmax_backward(g, softmax(x))``.
    """
    jac = softmax_jacobian(x, axis)
    gm = np.moveaxis(_f64(g), axis, -1)
    return np.moveaxis(np.einsum("...ij,...j->...i", jac, gm), -1, axis)
