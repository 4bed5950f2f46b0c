"""Linear cross-entropy in row chunks: the loss of ``cross_entropy(hidden @ weight.T + bias)``
and its gradients, without the N×V logits ever existing at once.

Per chunk of rows: one BLAS matmul (through NumPy) into a reused logits buffer, the fused
loss + gradient written over that buffer (:func:`fastsce.cross_entropy_with_grad` with
``inplace=True``), then ``d_hidden[chunk] = g @ weight`` and ``d_weight += g.T @ hidden[chunk]``.
The "mean" denominators (``Σ class_weight[t]`` for the loss, the count of counted rows
for the z-loss) are computed over the whole batch before the first chunk, so every
chunk's gradient carries its final scale. Rows whose target is ``ignore_index`` are
dropped before the matmuls: they cost no BLAS work, and their ``d_hidden`` is 0.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .loss import _check_options, _mean, cross_entropy, cross_entropy_with_grad

__all__ = ["DEFAULT_MEMORY_BUDGET", "linear_cross_entropy", "linear_cross_entropy_with_grad"]

# Bytes of the logits buffer of one chunk, unless ``chunk_size`` says otherwise.
DEFAULT_MEMORY_BUDGET = 64 * 2**20
# ``d_weight += g.T @ h`` goes through a temporary of at most this many bytes (and at most a
# quarter of the memory budget), one block of classes at a time.
WEIGHT_BLOCK_BYTES = 16 * 2**20


def _is_16bit(dtype: np.dtype) -> bool:
    return dtype == np.float16 or dtype.name == "bfloat16"


def _compute_dtype(dtype: np.dtype, name: str) -> np.dtype:
    """float32/float64 compute in their own precision; float16 and bfloat16 in float32."""
    if dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        return dtype.newbyteorder("=")
    if _is_16bit(dtype):
        return np.dtype(np.float32)
    raise TypeError(f"{name} has dtype {dtype}; linear_cross_entropy takes float16, bfloat16, float32 or float64")


def _vector(values: ArrayLike | None, name: str, length: int, dtype: np.dtype) -> np.ndarray | None:
    """An optional per-class vector as a contiguous array of the compute dtype."""
    if values is None:
        return None
    v = np.asarray(values)
    if v.dtype.kind not in "fiu" and not _is_16bit(v.dtype):
        raise TypeError(f"{name} must be a float array, got dtype {v.dtype}")
    if v.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},) (one entry per class), got {v.shape}")
    return np.ascontiguousarray(v, dtype=dtype)


@dataclass
class _Problem:
    """Validated inputs in the shapes and dtypes the chunk loop uses."""

    hidden: np.ndarray  # (N, D), the caller's dtype
    weight: np.ndarray  # (V, D), the compute dtype
    bias: np.ndarray | None  # (V,), the compute dtype
    class_weight: np.ndarray | None  # (V,), the compute dtype
    target: np.ndarray  # (N,) int64 class indices, or (N, V) probabilities
    soft: bool
    rows: np.ndarray | None  # indices of the counted rows, None when every row counts
    ce_count: float  # "mean" denominator of the loss: Σ class_weight[t] over counted rows
    z_count: float  # "mean" denominator of the z-loss: the number of counted rows
    io_dtype: np.dtype
    dtype: np.dtype
    chunk_rows: int
    memory_budget: int

    @property
    def n_work(self) -> int:
        return self.hidden.shape[0] if self.rows is None else self.rows.size

    def select(self, lo: int, hi: int) -> slice | np.ndarray:
        """Rows ``[lo, hi)`` of the counted rows, as a slice of the batch where possible."""
        return slice(lo, hi) if self.rows is None else self.rows[lo:hi]


def _prepare(hidden, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, z_loss,
             chunk_size, memory_budget) -> _Problem:
    ignore_index = _check_options(reduction, label_smoothing, z_loss, ignore_index)
    hidden, weight = np.asarray(hidden), np.asarray(weight)
    dtype = _compute_dtype(hidden.dtype, "hidden")
    _compute_dtype(weight.dtype, "weight")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be 2-D (rows, features), got shape {hidden.shape}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be 2-D (classes, features) with {hidden.shape[1]} features like hidden "
            f"{hidden.shape} (torch's F.linear layout), got shape {weight.shape}"
        )
    (n_rows, _), n_classes = hidden.shape, weight.shape[0]
    if n_classes == 0 and n_rows:
        raise ValueError("weight has no rows: there are no classes")
    if dtype != weight.dtype or not (weight.flags.c_contiguous or weight.flags.f_contiguous):
        weight = np.ascontiguousarray(weight, dtype=dtype)  # once, not per chunk
    bias = _vector(bias, "bias", n_classes, dtype)
    class_weight = _vector(class_weight, "class_weight", n_classes, dtype)

    target = np.asarray(target)
    soft = target.dtype.kind == "f" or _is_16bit(target.dtype)
    if soft:
        if target.shape != (n_rows, n_classes):
            raise ValueError(
                f"target holds class probabilities (dtype {target.dtype}) and must have shape "
                f"{(n_rows, n_classes)}, got {target.shape} (class indices need an integer dtype)"
            )
        rows, ce_count, z_count = None, float(n_rows), float(n_rows)
    elif target.dtype.kind in "iu":
        target, rows, ce_count, z_count = _class_indices(target, n_rows, n_classes, ignore_index, class_weight)
    else:
        raise TypeError(
            f"target must hold integer class indices or float class probabilities, got dtype {target.dtype}"
        )

    budget = _positive_int(memory_budget, "memory_budget")
    if chunk_size is None:
        chunk_rows = max(1, budget // max(1, n_classes * dtype.itemsize))
    else:
        chunk_rows = _positive_int(chunk_size, "chunk_size")
    return _Problem(hidden, weight, bias, class_weight, target, soft, rows, ce_count, z_count,
                    hidden.dtype, dtype, chunk_rows, budget)


def _class_indices(target, n_rows, n_classes, ignore_index, class_weight):
    """``(int64 targets, counted rows or None, Σ class_weight[t], number counted)``, after
    checking every index is in ``[0, V)`` or ``ignore_index``."""
    if target.shape != (n_rows,):
        raise ValueError(f"target holds class indices and must have shape ({n_rows},), got {target.shape}")
    if target.dtype.kind == "u" and target.size and target.max() > np.iinfo(np.int64).max:
        flat = np.minimum(target, n_classes).astype(np.int64)  # too big for int64: any invalid index
    else:
        flat = target.astype(np.int64, copy=False)
    counted = flat != ignore_index
    bad = counted & ((flat < 0) | (flat >= n_classes))
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(
            f"target[{row}] = {target[row]} is not a class index in [0, {n_classes}) nor ignore_index ({ignore_index})"
        )
    n_counted = int(np.count_nonzero(counted))
    rows = None if n_counted == n_rows else np.flatnonzero(counted)
    if class_weight is None:
        return flat, rows, float(n_counted), float(n_counted)
    kept = flat if rows is None else flat[rows]
    return flat, rows, float(np.sum(class_weight[kept], dtype=np.float64)), float(n_counted)


def _positive_int(value: Any, name: str) -> int:
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}") from None
    if n < 1:
        raise ValueError(f"{name} must be a positive int, got {n}")
    return n


# ------------------------------------------------------------------ d_weight ----
def _add_weight_grad(d_weight: np.ndarray, g: np.ndarray, h: np.ndarray, first: bool, tmp: np.ndarray) -> None:
    """``d_weight += g.T @ h`` (``d_weight`` (V, D), ``g`` (r, V), ``h`` (r, D)).

    NumPy's matmul cannot accumulate (GEMM's beta=1), so each block of classes goes
    through ``tmp``, small enough to stay in cache for the addition.
    """
    if first or d_weight.size == 0:
        np.matmul(g.T, h, out=d_weight)
        return
    step = tmp.shape[0]
    for lo in range(0, d_weight.shape[0], step):
        hi = min(lo + step, d_weight.shape[0])
        np.matmul(g[:, lo:hi].T, h, out=tmp[: hi - lo])
        d_weight[lo:hi] += tmp[: hi - lo]


# ----------------------------------------------------------------------- driver ----
def _grad_factors(grad_output: Any, reduction: str, n_rows: int) -> np.ndarray:
    g = np.asarray(grad_output, dtype=np.float64)
    if g.ndim == 0:
        return g
    if reduction != "none":
        raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}, got shape {g.shape}")
    if g.shape != (n_rows,):
        raise ValueError(f"grad_output must be a scalar or have the loss's shape ({n_rows},), got {g.shape}")
    return g


def _linear_cross_entropy(p: _Problem, ignore_index, reduction, label_smoothing, z_loss, grad_output=None):
    """The chunk loop; ``grad_output`` None computes the loss only."""
    with_grad = grad_output is not None
    (n_rows, n_features), n_classes = p.hidden.shape, p.weight.shape[0]
    n_work = p.n_work
    chunk = max(1, min(p.chunk_rows, n_work))

    # Each chunk returns Σ (loss + z'·lse²) over its rows; for "mean", gradient scale
    # g/ce_count with z' = z_loss·ce_count/z_count gives the z-loss its own denominator.
    chunk_reduction = "none" if reduction == "none" else "sum"
    factors = np.float64(1.0)
    z_chunk = float(z_loss)
    if with_grad:
        factors = _grad_factors(grad_output, reduction, n_rows)
    if reduction == "mean":
        if p.ce_count:
            z_chunk = z_loss * p.ce_count / p.z_count
            factors = factors / p.ce_count
        else:  # every counted row has weight 0: NaN/inf, as the materialized loss
            z_chunk = 0.0
            factors = factors * math.inf
    options = {"weight": p.class_weight, "ignore_index": ignore_index, "reduction": chunk_reduction,
               "label_smoothing": label_smoothing, "z_loss": z_chunk}

    logits_buf = np.empty((chunk, n_classes), p.dtype)
    gather = p.rows is not None or p.io_dtype != p.dtype
    hidden_buf = np.empty((chunk, n_features), p.dtype) if gather else None
    row_losses = np.zeros(n_rows, p.dtype) if reduction == "none" else None
    total = 0.0
    if with_grad:
        d_hidden = np.empty((n_rows, n_features), p.io_dtype)
        if p.rows is not None:
            ignored = np.ones(n_rows, bool)
            ignored[p.rows] = False
            d_hidden[ignored] = 0
        d_hidden_buf = np.empty((chunk, n_features), p.dtype) if gather else None
        d_weight = np.zeros((n_classes, n_features), p.dtype) if n_work == 0 else np.empty(
            (n_classes, n_features), p.dtype)
        d_bias = np.zeros(n_classes, p.dtype) if p.bias is not None else None
        tmp_bytes = min(WEIGHT_BLOCK_BYTES, p.memory_budget // 4)
        tmp_rows = max(1, min(n_classes, tmp_bytes // max(1, n_features * p.dtype.itemsize)))
        weight_tmp = np.empty((tmp_rows, n_features), p.dtype) if n_work > chunk else None

    for lo in range(0, n_work, chunk):
        hi = min(lo + chunk, n_work)
        sel = p.select(lo, hi)
        if gather:
            h = hidden_buf[: hi - lo]
            if p.io_dtype == p.dtype:
                np.take(p.hidden, sel, axis=0, out=h, mode="clip")  # no temporary; indices are valid
            else:
                h[...] = p.hidden[sel]
        else:
            h = p.hidden[sel]
        logits = logits_buf[: hi - lo]
        np.matmul(h, p.weight.T, out=logits)
        if p.bias is not None:
            logits += p.bias
        target = p.target[sel]
        if p.soft and target.dtype != p.dtype:
            target = target.astype(p.dtype)
        if with_grad:
            go = factors[sel] if factors.ndim else float(factors)
            loss, g = cross_entropy_with_grad(logits, target, grad_output=go, inplace=True, **options)
            if gather:
                np.matmul(g, p.weight, out=d_hidden_buf[: hi - lo])
                d_hidden[sel] = d_hidden_buf[: hi - lo]
            else:
                np.matmul(g, p.weight, out=d_hidden[sel])
            _add_weight_grad(d_weight, g, h, lo == 0, weight_tmp)
            if d_bias is not None:
                d_bias += g.sum(axis=0)
        else:
            loss = cross_entropy(logits, target, **options)
        if reduction == "none":
            row_losses[sel] = loss
        else:
            total += loss

    if reduction == "none":
        result: Any = row_losses.astype(p.io_dtype, copy=False)
    elif reduction == "sum":
        result = total
    else:
        result = total / p.ce_count if p.ce_count else _mean(total, p.ce_count)
    if not with_grad:
        return result
    grads = [d_hidden, d_weight.astype(p.io_dtype, copy=False)]
    if d_bias is not None:
        grads.append(d_bias.astype(p.io_dtype, copy=False))
    return (result, *grads)


_PARAMS_DOC = """
    Parameters
    ----------
    hidden : array_like, shape (N, D)
        The last hidden states, one row per token.
    weight : array_like, shape (V, D)
        The output projection, laid out as ``torch.nn.functional.linear``'s weight; the
        logits are ``hidden @ weight.T + bias``. Same dtype as ``hidden``.
    target : array_like
        Class indices (an integer array of shape (N,)) or class probabilities (a float
        array of shape (N, V)), as in :func:`cross_entropy`.
    bias : array_like, shape (V,), optional
        Added to every row of logits.
    class_weight : array_like, shape (V,), optional
        The per-class weight (``weight=`` of :func:`cross_entropy` and of
        ``torch.nn.functional.cross_entropy``).
    ignore_index, reduction, label_smoothing, z_loss
        As :func:`cross_entropy`, over the whole batch: "mean" divides by
        ``Σ class_weight[target]`` over the counted rows of all chunks (the z-loss by
        their number). Ignored rows cost no matmul work.
    chunk_size : int, optional
        Rows of logits computed at a time; by default as many as fit ``memory_budget``.
    memory_budget : int, default 64 MiB
        Bytes for the logits of one chunk (``chunk_size`` rows × V × 4 or 8 bytes; at
        least one row). The gradient adds a temporary of at most a quarter of it (and
        at most 16 MiB) for ``d_weight``'s accumulation."""

_DTYPES_DOC = """
    Notes
    -----
    float32 and float64 compute in their own precision, the matmuls through NumPy's
    BLAS. float16 and ``ml_dtypes.bfloat16`` inputs are computed in float32: each chunk
    of ``hidden`` is cast to float32 and ``weight`` once, so a float32 copy of it (and,
    for the gradient, a float32 accumulator of ``d_weight``) lives during the call;
    the results are rounded once (to nearest even) to the input dtype."""


def linear_cross_entropy(
    hidden: ArrayLike, weight: ArrayLike, target: ArrayLike, *, bias: ArrayLike | None = None,
    class_weight: ArrayLike | None = None, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss: float = 0.0, chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Any:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``target``, a chunk of rows at a time.

    The same value as ``cross_entropy(hidden @ weight.T + bias, target, weight=class_weight, ...)``
    but the (N, V) logits never exist: at most ``chunk_size`` rows of them do.
    {params}

    Returns
    -------
    float or ndarray
        A Python float for "mean" and "sum"; per-row losses of shape (N,) in the
        input dtype for "none" (0 for ignored rows).
    {dtypes}

    Examples
    --------
    >>> import numpy as np, fastsce
    >>> h, w = np.ones((2, 3)), np.zeros((4, 3))
    >>> round(fastsce.linear_cross_entropy(h, w, np.array([0, 3])), 6)  # log(4)
    1.386294
    """
    p = _prepare(hidden, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, z_loss,
                 chunk_size, memory_budget)
    return _linear_cross_entropy(p, ignore_index, reduction, label_smoothing, z_loss)


def linear_cross_entropy_with_grad(
    hidden: ArrayLike, weight: ArrayLike, target: ArrayLike, *, bias: ArrayLike | None = None,
    class_weight: ArrayLike | None = None, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss: float = 0.0, chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET, grad_output: ArrayLike = 1.0,
) -> tuple[Any, ...]:
    """Linear cross-entropy and its gradients with respect to ``hidden``, ``weight`` and ``bias``.

    Per chunk: ``logits = hidden[c] @ weight.T + bias`` into a reused buffer, the fused
    loss and gradient ``g`` written over it, ``d_hidden[c] = g @ weight``,
    ``d_weight += g.T @ hidden[c]``, ``d_bias += Σ_rows g``. Memory beyond the inputs and
    the gradients: the chunk's logits (``memory_budget``) and a few chunk-sized buffers.
    {params}
    grad_output : float or array_like, default 1.0
        The gradient of the final objective with respect to the loss: a scalar, or for
        ``reduction="none"`` an array of shape (N,).

    Returns
    -------
    (loss, d_hidden, d_weight[, d_bias])
        ``loss`` as :func:`linear_cross_entropy`; the gradients have the shapes of
        ``hidden``, ``weight`` and ``bias`` and the input dtype (C-contiguous).
        ``d_bias`` only when ``bias`` is given.
    {dtypes}

    Examples
    --------
    >>> import numpy as np, fastsce
    >>> h, w = np.ones((1, 2)), np.zeros((2, 2))
    >>> loss, d_hidden, d_weight = fastsce.linear_cross_entropy_with_grad(h, w, np.array([1]))
    >>> d_weight
    array([[ 0.5,  0.5],
           [-0.5, -0.5]])
    """
    p = _prepare(hidden, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, z_loss,
                 chunk_size, memory_budget)
    return _linear_cross_entropy(p, ignore_index, reduction, label_smoothing, z_loss, grad_output=grad_output)


for _fn in (linear_cross_entropy, linear_cross_entropy_with_grad):
    _fn.__doc__ = _fn.__doc__.replace("{params}", _PARAMS_DOC).replace("{dtypes}", _DTYPES_DOC)
