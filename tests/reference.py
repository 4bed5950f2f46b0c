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


# ---------------------------------------------------------------- cross-entropy ----
# Per row (class axis moved last, rows in C order): x the logits, lse = logsumexp(x),
# s = softmax(x), w the class weights, ε the label smoothing, C classes, λ the z-loss.
# Class index t: loss = (1-ε)·w_t·(lse - x_t) + ε/C·Σ_c w_c·(lse - x_c);
# probabilities y (smoothed y' = (1-ε)·y + ε/C): loss = Σ_c w_c·y'_c·(lse - x_c).
# z-loss adds λ·lse² per counted row. "mean" divides the cross-entropy by Σ w_t over
# counted rows (the number of rows for probabilities) and the z-loss by the number of
# counted rows (all rows for probabilities). Ignored rows count 0 and get 0 gradient.

__all__ += ["cross_entropy_grad_ref", "cross_entropy_ref", "nll_loss_ref"]


def _xent_rows(logits, target, weight, axis):
    """``(x, targets, weights, soft, loss_shape)`` with the class axis last, rows flat.

    ``targets`` is an int64 vector of class indices or a float64 ``(rows, C)`` array of
    probabilities (``soft``); ``loss_shape`` is ``logits.shape`` without ``axis``.
    """
    x = np.moveaxis(_f64(logits), axis, -1)
    loss_shape = x.shape[:-1]
    c = x.shape[-1]
    x = x.reshape(-1, c)
    w = np.ones(c) if weight is None else _f64(weight)
    t = np.asarray(target)
    soft = t.dtype.kind == "f"
    if soft:
        t = np.moveaxis(_f64(t), axis, -1).reshape(-1, c)
    else:
        t = t.astype(np.int64).reshape(-1)
    return x, t, w, soft, loss_shape


def _xent_row_loss(x_row, lse, t_row, w, soft, eps):
    """Cross-entropy of one counted row (without the z-loss), in float64."""
    c = x_row.size
    with np.errstate(invalid="ignore"):
        if soft:
            y = (1.0 - eps) * t_row + eps / c
            return float(np.sum(w * y * (lse - x_row)))
        loss = (1.0 - eps) * w[t_row] * (lse - x_row[t_row])
        if eps:  # skipped when 0 so that a -inf logit does not make 0·inf = NaN
            loss += eps / c * np.sum(w * (lse - x_row))
        return float(loss)


def _xent_denominators(t, w, soft, ignore_index, reduction):
    """``(counted, D, Dz)``: the mask of counted rows and the "mean" denominators of the
    cross-entropy and of the z-loss (1 and 1 for "sum" and "none")."""
    n = t.shape[0]
    counted = np.ones(n, bool) if soft else t != ignore_index
    if reduction != "mean":
        return counted, 1.0, 1.0
    if soft:
        return counted, float(n), float(n)
    return counted, float(np.sum(w[t[counted]])), float(np.sum(counted))


def cross_entropy_ref(logits, target, weight=None, ignore_index=-100, reduction="mean",
                      label_smoothing=0.0, z_loss=0.0, axis=-1):
    """``torch.nn.functional.cross_entropy`` (with ``axis`` the class axis) plus the
    z-loss, in float64: a float for "mean"/"sum", per-row losses for "none".

    All rows ignored gives NaN for "mean" (0/0), 0 for "sum", zeros for "none".
    """
    x, t, w, soft, loss_shape = _xent_rows(logits, target, weight, axis)
    n = x.shape[0]
    counted, d, dz = _xent_denominators(t, w, soft, ignore_index, reduction)
    ce = np.zeros(n)
    z = np.zeros(n)
    for i in range(n):
        if not counted[i]:
            continue
        lse = float(logsumexp(x[i]))
        ce[i] = _xent_row_loss(x[i], lse, t[i], w, soft, label_smoothing)
        if z_loss:
            z[i] = z_loss * lse * lse
    if reduction == "none":
        return (ce + z).reshape(loss_shape)
    if reduction == "sum":
        return float(np.sum(ce) + np.sum(z))
    with np.errstate(invalid="ignore", divide="ignore"):
        loss = np.float64(np.sum(ce)) / np.float64(d)
        if z_loss:
            loss += np.float64(np.sum(z)) / np.float64(dz)
    return float(loss)


def cross_entropy_grad_ref(logits, target, weight=None, ignore_index=-100, reduction="mean",
                           label_smoothing=0.0, z_loss=0.0, axis=-1, grad_output=1.0):
    """Gradient of :func:`cross_entropy_ref` times ``grad_output`` (a scalar, or per-row
    factors shaped like the "none" loss), with respect to the logits, in float64.

    Row by row, with ``g`` the row's grad_output, ``D``/``Dz`` the "mean" denominators:
    class index t: ``g/D·[s·((1-ε)w_t + ε/C·Σw) - (1-ε)w_t·onehot(t) - ε/C·w]``;
    probabilities: ``g/D·(s·Σ_c w_c y'_c - w·y')``; plus ``g/Dz·2λ·lse·s``; zero for
    ignored rows.
    """
    x, t, w, soft, loss_shape = _xent_rows(logits, target, weight, axis)
    n, c = x.shape
    eps = label_smoothing
    counted, d, dz = _xent_denominators(t, w, soft, ignore_index, reduction)
    g_rows = np.broadcast_to(_f64(grad_output), loss_shape).reshape(-1) if n else np.zeros(0)
    grad = np.zeros_like(x)
    for i in range(n):
        if not counted[i]:
            continue
        s = softmax(x[i])
        g = g_rows[i]
        if soft:
            v = w * ((1.0 - eps) * t[i] + eps / c)
            row = g / d * (s * np.sum(v) - v)
        else:
            w_t = w[t[i]]
            row = s * ((1.0 - eps) * w_t + eps / c * np.sum(w)) - eps / c * w
            row[t[i]] -= (1.0 - eps) * w_t
            row = g / d * row
        if z_loss:
            lse = float(logsumexp(x[i]))
            row = row + g / dz * 2.0 * z_loss * lse * s
        grad[i] = row
    shape = loss_shape + (c,)
    return np.moveaxis(grad.reshape(shape), -1, axis)


def nll_loss_ref(log_probs, target, weight=None, ignore_index=-100, reduction="mean", axis=-1):
    """``torch.nn.functional.nll_loss`` (``axis`` the class axis) in float64:
    ``-w_t·log_probs[t]`` per counted row; "mean" divides by Σ w_t over counted rows."""
    lp, t, w, soft, loss_shape = _xent_rows(log_probs, target, weight, axis)
    assert not soft, "nll_loss takes class indices"
    counted, d, _ = _xent_denominators(t, w, soft, ignore_index, reduction)
    losses = np.zeros(lp.shape[0])
    for i in range(lp.shape[0]):
        if counted[i]:
            losses[i] = -w[t[i]] * lp[i, t[i]]
    if reduction == "none":
        return losses.reshape(loss_shape)
    if reduction == "sum":
        return float(np.sum(losses))
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.float64(np.sum(losses)) / np.float64(d))
