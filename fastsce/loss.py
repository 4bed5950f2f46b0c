"""Public cross-entropy and NLL losses with PyTorch's semantics, and the fused gradient."""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ._config import (NOT_16BIT, SMALL_CLASSES, STREAM_MIN_BYTES, long_row_chunks,
                      long_row_segment, loss_chunk_rows, streams)
from ._layout import Operand, Plan, aligned_copy, plan_layout, require_plan
from ._validation import (
    as_float_array,
    check_out,
    compute_dtype,
    is_16bit,
    kernel_view,
    normalize_axis,
    readonly_view,
    result_dtype,
)
from .softmax import _column_block

__all__ = ["cross_entropy", "cross_entropy_with_grad", "nll_loss"]

REDUCTIONS = ("mean", "sum", "none")
# Column kernels sum the loss per tile, so tiles are cut as for this many threads
# whatever the actual count: "mean"/"sum" must not depend on the threads.
_TILE_THREADS = 16


def _launch(name: str, *args: Any) -> Any:
    """Run kernel ``name`` of the cross-entropy family (numba is imported on first use)."""
    from ._kernels import launch, xent

    return launch(getattr(xent, name), *args)


def _chunk_count(n_rows: int) -> int:
    return -(-n_rows // loss_chunk_rows(n_rows))


# ------------------------------------------------------------------ validation ----
def _check_options(reduction: str, label_smoothing: float, z_loss: float, ignore_index: Any) -> int:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (isinstance(label_smoothing, (int, float, np.floating)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not (isinstance(z_loss, (int, float, np.floating)) and math.isfinite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}") from None


@functools.lru_cache(maxsize=4)
def _unit_weights(n_classes: int, dtype: np.dtype) -> np.ndarray:
    """Ones for every class, kept between calls: for a vocabulary of millions, filling a
    fresh array took longer than a row of the loss (kernels never write weights)."""
    return np.ones(n_classes, dtype)


def _class_weights(weight: ArrayLike | None, n_classes: int, dtype: np.dtype) -> tuple[np.ndarray, float]:
    """Weights as a contiguous array of the compute dtype, and their float64 sum."""
    if weight is None:
        return _unit_weights(n_classes, np.dtype(dtype)), float(n_classes)
    w = np.asarray(weight)
    if w.dtype.kind not in "fiu":
        raise TypeError(f"weight must be a float array, got dtype {w.dtype}")
    if w.ndim != 1 or w.shape[0] != n_classes:
        raise ValueError(f"weight must be 1-D with one entry per class ({n_classes}), got shape {w.shape}")
    return np.ascontiguousarray(w, dtype=dtype), float(np.sum(w, dtype=np.float64))


@dataclass(frozen=True)
class _Targets:
    """Validated class-index targets, flattened in C order, with their denominators."""

    flat: np.ndarray  # int64, C order of the target array
    weight_total: float  # Σ weight[t] over rows that count
    n_valid: int  # rows whose target is not ignore_index


def _class_indices(target: np.ndarray, n_classes: int, ignore_index: int, weight: np.ndarray) -> _Targets:
    """Check every index is in ``[0, C)`` or ``ignore_index`` (one pass over the targets,
    nothing indexed before the check) and sum the weights of the counted rows."""
    flat = np.ascontiguousarray(target, dtype=np.int64).reshape(-1)
    if flat.size == 0:
        return _Targets(flat, 0.0, 0)
    if target.dtype.kind == "u" and target.size and target.max() > np.iinfo(np.int64).max:
        bad = int(np.argmax(target.reshape(-1) > np.iinfo(np.int64).max))
    else:
        n_chunks = _chunk_count(flat.size)
        chunk_weight = np.empty(n_chunks, np.float64)
        chunk_valid = np.empty(n_chunks, np.int64)
        bad = _launch("check_targets", flat, n_classes, ignore_index, weight, chunk_weight, chunk_valid)
        if bad < 0:
            return _Targets(flat, float(np.sum(chunk_weight)), int(np.sum(chunk_valid)))
    where = np.unravel_index(bad, target.shape)
    raise ValueError(
        f"target[{', '.join(map(str, where))}] = {target[where]} is not a class index in [0, {n_classes}) "
        f"nor ignore_index ({ignore_index})"
    )


def _split_target(logits: np.ndarray, target: ArrayLike, axis: int) -> tuple[np.ndarray, bool]:
    """``(target array, is_probabilities)`` after checking its dtype and shape."""
    target = np.asarray(target)
    index_shape = logits.shape[:axis] + logits.shape[axis + 1 :]
    if target.dtype.kind in "iu":
        if target.shape != index_shape:
            raise ValueError(
                f"target holds class indices (dtype {target.dtype}) and must have shape {index_shape} "
                f"(logits {logits.shape} without axis {axis}), got {target.shape}"
            )
        return target, False
    if target.dtype.kind == "f" or is_16bit(target.dtype):
        if target.shape != logits.shape:
            hint = " (class indices must have an integer dtype)" if target.shape == index_shape else ""
            raise ValueError(
                f"target holds class probabilities (dtype {target.dtype}) and must have the logits' shape "
                f"{logits.shape}, got {target.shape}{hint}"
            )
        return target, True
    raise TypeError(
        f"target must hold integer class indices or float class probabilities, got dtype {target.dtype}"
    )


def _grad_factors(grad_output: Any, reduction: str, loss_shape: tuple[int, ...]) -> np.ndarray:
    """``grad_output`` as float64 factors: one, or one per row (``reduction="none"`` only)."""
    g = np.asarray(grad_output, dtype=np.float64)
    if g.ndim == 0:
        return g.reshape(1)
    if reduction != "none":
        raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}, got shape {g.shape}")
    if g.shape != loss_shape:
        raise ValueError(f"grad_output must be a scalar or have the loss's shape {loss_shape}, got {g.shape}")
    return g


def _mean(total: float, count: float) -> float:
    """``total / count`` with 0/0 → NaN (all rows ignored), as torch."""
    return total / count if count else (math.nan if total == 0 else math.copysign(math.inf, total))


# ---------------------------------------------------------------------- driver ----
def _back_to_back_few_classes(plan: Plan) -> bool:
    """Rows of few classes with no gaps between them: the row-block kernel applies."""
    return plan.n_classes < SMALL_CLASSES and all(
        op.outer_stride == plan.n_classes or plan.n_outer == 1 or op.buffer.size == 0 for op in plan.operands)


def _in_plan_order(values: np.ndarray, plan: Plan, axis: int) -> np.ndarray:
    """Per-row values (shaped like logits without ``axis``) in the plan's row order
    (outer, then inner: column ``j`` of outer index ``o`` is row ``o·n_inner + j``)."""
    order = tuple(a if a < axis else a - 1 for a in plan.outer_axes + plan.inner_axes)
    if order == tuple(sorted(order)):
        return values.reshape(-1)
    return np.ascontiguousarray(values.transpose(order)).reshape(-1)


def _column_args(op: Operand) -> tuple[np.ndarray, int, int, int]:
    """An operand as a column kernel takes it: buffer, start, outer and class strides."""
    return op.buffer, op.start, op.outer_stride, op.class_stride


def _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, axis,
                   *, grad_output=None, out=None, inplace=False, return_lse=False, return_argmax=False):
    """Shared body of :func:`cross_entropy` and :func:`cross_entropy_with_grad`."""
    with_grad = grad_output is not None
    ignore_index = _check_options(reduction, label_smoothing, z_loss, ignore_index)
    if inplace:
        if out is not None:
            raise ValueError("pass either out= or inplace=True, not both")
        if not isinstance(logits, np.ndarray) or result_dtype(logits.dtype, "logits") != logits.dtype:
            raise TypeError("inplace=True needs logits as a float numpy.ndarray (float16/32/64 or bfloat16)")
        if not logits.flags.writeable:
            raise ValueError("inplace=True needs writeable logits; these are read-only")
    logits = as_float_array(logits, "logits")
    if logits.ndim == 0:
        raise ValueError("logits must have at least one dimension (the classes)")
    axis = normalize_axis(axis, logits.ndim)
    n_classes = logits.shape[axis]
    target, soft = _split_target(logits, target, axis)
    loss_shape = target.shape[:axis] + target.shape[axis + 1 :] if soft else target.shape
    weights, weight_sum = _class_weights(weight, n_classes, compute_dtype(logits.dtype))
    if with_grad:
        grad_factors = _grad_factors(grad_output, reduction, loss_shape)
        if out is not None:
            check_out(out, logits.shape, logits.dtype)
        grad = logits if inplace else (out if out is not None else np.empty_like(logits))
    if n_classes == 0 and math.prod(loss_shape) > 0:
        raise ValueError(f"logits of shape {logits.shape} have no classes along axis {axis}")

    targets = None if soft else _class_indices(target, n_classes, ignore_index, weights)
    n_rows = math.prod(loss_shape)
    if soft:  # read as given if it matches the logits, else in the compute dtype
        probs = target if target.dtype == logits.dtype else target.astype(compute_dtype(logits.dtype))
        ce_count, z_count = float(n_rows), float(n_rows)
    else:
        ce_count, z_count = targets.weight_total, float(targets.n_valid)

    grad_target = None
    if with_grad:
        grad_target = grad
        if not _same_start(grad, logits) and np.may_share_memory(grad, logits):
            grad_target = np.empty_like(logits)  # `out` overlaps the logits without being them
    # The arrays as they are (row or column kernels); C-ordered copies with the classes
    # last only when no common layout exists.
    work_axis, work_logits, work_grad = axis, logits, grad_target
    work_probs = probs if soft else None
    half_format = kernel_view(logits)[1]

    def kernel_operands() -> list[np.ndarray]:
        arrays = [work_logits] + ([work_probs] if soft else [])
        return [readonly_view(kernel_view(a)[0]) for a in arrays] + ([kernel_view(work_grad)[0]] if with_grad else [])

    plan = plan_layout(kernel_operands(), axis) if n_rows and n_classes else None
    # The column kernels compute in float32/float64 only: 16-bit logits off the rows are copied (in 16 bits).
    copied = n_rows > 0 and n_classes > 0 and (plan is None or (half_format != NOT_16BIT and not plan.is_rows))
    if copied:
        work_axis = logits.ndim - 1
        work_logits = aligned_copy(np.moveaxis(logits, axis, -1))
        work_probs = aligned_copy(np.moveaxis(probs, axis, -1)) if soft else None
        work_grad = np.empty_like(work_logits) if with_grad else None
        plan = require_plan(kernel_operands(), work_axis)

    row_loss = np.empty(n_rows if reduction == "none" else 0, np.float64)
    row_lse = np.empty(n_rows if return_lse else 0, np.float64)
    row_argmax = np.empty(n_rows if return_argmax else 0, np.int64)
    # Loss sums per chunk: loss_chunk_rows rows (row kernels) or one tile (column kernels).
    if plan is None:
        n_chunks = 0
    elif plan.is_rows:
        n_chunks = _chunk_count(n_rows)
    else:
        block = _column_block(plan, plan.operands[0].buffer.itemsize, n_threads=_TILE_THREADS)
        n_chunks = plan.n_outer * -(-plan.n_inner // block)
    chunk_loss = np.zeros(n_chunks, np.float64)
    chunk_z = np.zeros(n_chunks, np.float64)
    if plan is not None:
        x_op = plan.operands[0]
        # a writeable placeholder without a gradient keeps one compiled signature per dtype
        g_op = plan.operands[-1] if with_grad else Operand(np.empty(0, kernel_view(work_logits)[0].dtype), 0, 0, 0)
        in_place = with_grad and _same_start(work_grad, work_logits)
        stream = with_grad and streams(g_op.buffer.nbytes, n_classes * g_op.buffer.itemsize)
        grad_scale = 1.0 / ce_count if reduction == "mean" and ce_count else (math.inf if reduction == "mean" else 1.0)
        z_grad_scale = 1.0 / z_count if reduction == "mean" and z_count else 1.0
        factors = _in_plan_order(grad_factors, plan, work_axis) if with_grad and grad_factors.size > 1 else (
            grad_factors.reshape(-1) if with_grad else np.ones(1))
        target_rows = None if soft else _in_plan_order(targets.flat.reshape(loss_shape), plan, work_axis)
        smoothing_z = (float(label_smoothing), float(z_loss))
        outputs = (grad_scale, z_grad_scale, factors, chunk_loss, chunk_z, row_loss, row_lse, row_argmax)
        if not plan.is_rows:  # classes strided: tiles of columns, float32/float64
            columns = (*_column_args(x_op), *_column_args(g_op))
            shape = (plan.n_outer, n_classes, plan.n_inner, block, in_place, with_grad)
            if soft:
                _launch("soft_xent_columns", *columns, *_column_args(plan.operands[1]), *shape, weights,
                        *smoothing_z, *outputs)
            else:
                _launch("hard_xent_columns", *columns, *shape, target_rows, ignore_index, weights, weight_sum,
                        *smoothing_z, *outputs, with_grad and g_op.buffer.nbytes >= STREAM_MIN_BYTES)
        elif soft:
            y_op = plan.operands[1]
            _launch("soft_xent_rows", x_op.buffer, x_op.start, x_op.outer_stride, g_op.buffer, g_op.start,
                    g_op.outer_stride, y_op.buffer, y_op.start, y_op.outer_stride, n_rows, n_classes, with_grad,
                    weights, *smoothing_z, *outputs, half_format, stream)
        elif _back_to_back_few_classes(plan):
            _launch("hard_xent_row_blocks", x_op.buffer, x_op.start, g_op.buffer, g_op.start, n_rows, n_classes,
                    with_grad, target_rows, ignore_index, weights, weight_sum, *smoothing_z, *outputs,
                    half_format)
        else:
            segment = long_row_segment(n_classes, weights.itemsize)  # weights: the compute dtype
            chunk_segments = long_row_chunks(n_classes, weights.itemsize, segment)
            rows = (x_op.buffer, x_op.start, x_op.outer_stride, g_op.buffer, g_op.start, g_op.outer_stride, n_rows,
                    n_classes, with_grad, target_rows, ignore_index, weights, weight_sum, *smoothing_z, *outputs,
                    half_format, stream, segment)
            if chunk_segments:  # rows of megabytes: each split across the threads
                _launch("hard_xent_split_rows", *rows, chunk_segments)
            else:
                _launch("hard_xent_rows", *rows)
    elif with_grad and grad_target.size:
        grad_target.fill(0.0)  # no classes or no rows: nothing to differentiate

    if with_grad:
        if copied:
            np.copyto(np.moveaxis(grad, axis, -1), work_grad)
        elif grad_target is not grad:
            np.copyto(grad, grad_target)

    def per_row(values: np.ndarray) -> np.ndarray:
        if plan is None:
            return values.reshape(loss_shape)
        return plan.reduced_to_original(values, work_logits.shape)

    if reduction == "none":
        loss: Any = per_row(row_loss).astype(logits.dtype)
    else:
        ce_total, z_total = float(np.sum(chunk_loss)), float(np.sum(chunk_z))
        if reduction == "sum":
            loss = ce_total + z_loss * z_total
        else:
            loss = _mean(ce_total, ce_count) + (z_loss * _mean(z_total, z_count) if z_loss else 0.0)
    extras = []
    if return_lse:
        extras.append(per_row(row_lse).astype(logits.dtype))
    if return_argmax:
        extras.append(per_row(row_argmax))
    result = (loss, grad) if with_grad else (loss,)
    return (*result, *extras) if extras or with_grad else loss


def _same_start(a: np.ndarray, b: np.ndarray) -> bool:
    return a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.strides == b.strides


_COMMON_DOC = """
    Parameters
    ----------
    logits : array_like
        Unnormalized scores, classes along ``axis``; float32 and float64 compute in
        their own precision.
    target : array_like
        Class indices (an integer array shaped like ``logits`` without ``axis``) or
        class probabilities (a float array shaped like ``logits``), as in
        ``torch.nn.functional.cross_entropy``.
    weight : array_like, optional
        A manual rescaling weight for each class, of length ``C``.
    ignore_index : int, default -100
        Rows whose class index equals it contribute neither loss nor gradient, and do
        not count in the "mean" denominator. Only for class-index targets.
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" divides the summed loss by ``Σ weight[target]`` over counted rows (their
        number without weights; the number of rows for probabilities); all rows
        ignored gives NaN for "mean" and 0 for "sum". "none" returns the per-row
        losses (0 for ignored rows).
    label_smoothing : float in [0, 1], default 0.0
        Mixes the target with the uniform distribution: ``(1-ε)·y + ε/C``.
    z_loss : float >= 0, default 0.0
        Adds ``z_loss·logsumexp(x)²`` per counted row (PaLM's auxiliary loss),
        unweighted; with "mean" divided by the number of counted rows.
    axis : int, default -1
        The class axis.
    return_lse, return_argmax : bool, default False
        Also return the per-row logsumexp (in the logits' dtype, reusable for a
        backward pass) and the per-row argmax (int64, for accuracy), computed in the
        same pass. They follow the other results, in this order.
"""


def cross_entropy(
    logits: ArrayLike, target: ArrayLike, *, weight: ArrayLike | None = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, axis: int = -1,
    return_lse: bool = False, return_argmax: bool = False,
) -> Any:
    """Cross-entropy of ``softmax(logits)`` against ``target``, with PyTorch's semantics.

    One read of the logits: ``logsumexp`` and the target terms per row, nothing
    materialized.
    {common}
    Returns
    -------
    float or ndarray
        A Python float for "mean" and "sum", per-row losses (dtype of the logits) for
        "none"; followed by the extras asked for, as a tuple.

    Raises
    ------
    ValueError
        A class index outside ``[0, C)`` that is not ``ignore_index`` (the message names
        the row and value), mismatched shapes, a bad option.
    TypeError
        Unsupported dtypes (a bool or object target, complex logits).

    Examples
    --------
    >>> import numpy as np, fastsce
    >>> round(fastsce.cross_entropy(np.array([[0.0, 0.0]]), np.array([1])), 6)
    0.693147
    """
    return _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, axis,
                          return_lse=return_lse, return_argmax=return_argmax)


def cross_entropy_with_grad(
    logits: ArrayLike, target: ArrayLike, *, weight: ArrayLike | None = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, axis: int = -1,
    grad_output: ArrayLike = 1.0, out: np.ndarray | None = None, inplace: bool = False,
    return_lse: bool = False, return_argmax: bool = False,
) -> tuple[Any, ...]:
    """Cross-entropy and its gradient with respect to the logits, in one fused pass.

    Each row is read once from memory; its exponentials are written over the copy in
    the gradient buffer and turned into ``grad_output·(softmax - target)·weights /
    denominator`` there, so no softmax array is materialized and read again.
    {common}
    grad_output : float or array_like, default 1.0
        The gradient of the final objective with respect to the loss: a scalar, or
        for ``reduction="none"`` an array shaped like the per-row losses.
    out : ndarray, optional
        Where to write the gradient (the logits' shape and dtype).
    inplace : bool, default False
        Write the gradient over ``logits`` (a writeable float32/float64 ndarray), so
        that a huge logits array needs no second array of its size.

    Returns
    -------
    (loss, grad[, lse][, argmax])
        ``loss`` as :func:`cross_entropy`; ``grad`` of the logits' shape and dtype.

    Examples
    --------
    >>> import numpy as np, fastsce
    >>> loss, grad = fastsce.cross_entropy_with_grad(np.array([[0.0, 0.0]]), np.array([1]))
    >>> grad
    array([[ 0.5, -0.5]])
    """
    return _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, axis,
                          grad_output=grad_output, out=out, inplace=inplace, return_lse=return_lse,
                          return_argmax=return_argmax)


cross_entropy.__doc__ = cross_entropy.__doc__.replace("{common}", _COMMON_DOC)
cross_entropy_with_grad.__doc__ = cross_entropy_with_grad.__doc__.replace("{common}", _COMMON_DOC)


def nll_loss(
    log_probs: ArrayLike, target: ArrayLike, *, weight: ArrayLike | None = None, ignore_index: int = -100,
    reduction: str = "mean", axis: int = -1,
) -> Any:
    """Negative log-likelihood of class indices under ``log_probs``, as ``torch.nn.functional.nll_loss``.

    Parameters
    ----------
    log_probs : array_like
        Log-probabilities (e.g. from :func:`log_softmax`), classes along ``axis``.
    target : array_like of int
        Class indices shaped like ``log_probs`` without ``axis``.
    weight, ignore_index, reduction, axis
        As :func:`cross_entropy`.

    Returns
    -------
    float or ndarray
        ``-weight[t]·log_probs[..., t]`` reduced as asked ("mean" divides by
        ``Σ weight[t]`` over counted rows).

    Examples
    --------
    >>> import numpy as np, fastsce
    >>> fastsce.nll_loss(np.log([[0.25, 0.75]]), np.array([1]))
    0.2876820724517809
    """
    ignore_index = _check_options(reduction, 0.0, 0.0, ignore_index)
    log_probs = as_float_array(log_probs, "log_probs")
    if log_probs.ndim == 0:
        raise ValueError("log_probs must have at least one dimension (the classes)")
    axis = normalize_axis(axis, log_probs.ndim)
    target, soft = _split_target(log_probs, target, axis)
    if soft:
        raise TypeError("nll_loss takes class indices (an integer target); use cross_entropy for probabilities")
    n_classes = log_probs.shape[axis]
    weights, _ = _class_weights(weight, n_classes, np.dtype(np.float64))
    targets = _class_indices(target, n_classes, ignore_index, weights)
    indices = targets.flat.reshape(target.shape)
    counted = indices != ignore_index
    safe = np.where(counted, indices, 0)
    picked = np.take_along_axis(log_probs, np.expand_dims(safe, axis), axis).squeeze(axis) if n_classes else (
        np.zeros(target.shape, log_probs.dtype))
    losses = np.where(counted, -weights[safe] * picked.astype(np.float64), 0.0)
    if reduction == "none":
        return losses.astype(log_probs.dtype)
    total = float(np.sum(losses))
    return total if reduction == "sum" else _mean(total, targets.weight_total)
