"""Public softmax-family functions: validate, describe the layout, dispatch to a kernel."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ._layout import Plan, aligned_copy, plan_layout, require_plan
from ._config import (NOT_16BIT, SMALL_CLASSES, STREAM_MIN_BYTES, get_num_threads, long_row_chunks, long_row_segment,
                      streams)
from ._validation import (
    as_float_array,
    check_out,
    compute_dtype,
    float_dtype,
    is_16bit,
    kernel_view,
    normalize_axis,
    readonly_view,
    result_dtype,
)

__all__ = [
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "softmax",
    "softmax_backward",
    "softmax_jacobian",
]

# A column tile (classes x neighbouring columns) stays in cache (L3) between its passes.
# Its class segments should be long: at 1000 classes a 256 KB tile has 256-byte segments
# a page apart, and axis=0 ran at 7x the copy time; 2 MB tiles: 3.5x.
_TILE_BYTES = 2 * 1024 * 1024
# softmax_jacobian materializes C*C per row; refuse sizes that are surely a mistake.
JACOBIAN_MAX_CLASSES = 4096
JACOBIAN_MAX_ELEMENTS = 2**27


def _launch(name: str, *args: Any) -> None:
    """Run kernel ``name`` of the softmax family (numba is imported on first use only)."""
    from ._kernels import launch, softmax

    launch(getattr(softmax, name), *args)


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """True if ``a`` and ``b`` are the same elements (same start, shape and strides)."""
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape
        and a.strides == b.strides
    )


def _column_block(plan: Plan, itemsize: int, n_threads: int | None = None) -> int:
    """Columns per tile: the tile fits in L2, and there are tiles for every thread.

    ``n_threads`` (default: the current thread count) lets a caller whose results
    depend on the tiling (the cross-entropy's loss chunks) cut tiles from the shape alone.
    """
    n_threads = get_num_threads() if n_threads is None else n_threads
    block = max(16, _TILE_BYTES // (plan.n_classes * itemsize) // 16 * 16)
    while block > 16 and plan.n_outer * -(-plan.n_inner // block) < 4 * n_threads:
        block //= 2
    return min(block, plan.n_inner)


def _is_small_class_rows(plan: Plan) -> bool:
    """Few classes in back-to-back rows: the row-block kernels apply."""
    return (plan.is_rows and plan.n_classes < SMALL_CLASSES
            and all(op.outer_stride == plan.n_classes or plan.n_outer == 1 for op in plan.operands))


def _kernel_args(plan: Plan) -> tuple[Any, ...]:
    """Flatten a plan into a row or column kernel's argument list."""
    if plan.is_rows:
        flat = [v for op in plan.operands for v in (op.buffer, op.start, op.outer_stride)]
        return (*flat, plan.n_outer, plan.n_classes)
    flat = [v for op in plan.operands for v in (op.buffer, op.start, op.outer_stride, op.class_stride)]
    return (*flat, plan.n_outer, plan.n_classes, plan.n_inner, _column_block(plan, plan.operands[0].buffer.itemsize))


def _class_flipped(arrays: list[np.ndarray], axis: int) -> tuple[list[np.ndarray], bool]:
    """Flip every array along ``axis`` if the first runs backwards along it.

    The softmax family is permutation-equivariant along the classes (and logsumexp
    invariant), so a reversed class axis can be traversed forwards instead.
    """
    if arrays[0].strides[axis] >= 0:
        return arrays, False
    return [np.flip(a, axis) for a in arrays], True


def _run_elementwise(name: str, inputs: list[np.ndarray], axis: int, out: np.ndarray | None,
                     out_dtype: np.dtype | None = None, options: tuple[Any, ...] = ()) -> np.ndarray:
    """Run kernel family ``name`` over same-shape ``inputs`` into an output of that shape.

    ``out`` may be the first input itself (the kernels then work in place); any other
    overlap with an input is computed aside and copied. 16-bit arrays go to the row
    kernels as uint16 bits; for them any other layout is copied (in 16 bits) first.
    ``options`` are passed last to the row and column kernels (``log_form`` of ``backward``).
    """
    like = inputs[0]
    out_dtype = like.dtype if out_dtype is None else out_dtype
    result = np.empty_like(like, dtype=out_dtype) if out is None else out
    if result.size == 0:
        return result
    target = result
    in_place = out is not None and _same_memory(out, like) and out.dtype == like.dtype
    if out is not None and not in_place and any(np.may_share_memory(out, x) for x in inputs):
        target = np.empty_like(like, dtype=out_dtype)
    (target, *inputs), flipped = _class_flipped([target, *inputs], axis)
    views = [kernel_view(a) for a in (*inputs, target)]
    half_format = max(fmt for _, fmt in views)  # one 16-bit format per call
    plan = plan_layout([readonly_view(v) for v, _ in views[:-1]] + [views[-1][0]], axis)
    moved = plan is None or (half_format != NOT_16BIT and not plan.is_rows)
    if moved:  # unaligned, interleaved, or 16-bit off the rows: copies with classes last
        inputs = [aligned_copy(np.moveaxis(x, axis, -1)) for x in inputs]
        target = np.empty(inputs[0].shape, out_dtype)
        in_place = False
        views = [kernel_view(a) for a in (*inputs, target)]
        plan = require_plan([readonly_view(v) for v, _ in views[:-1]] + [views[-1][0]], like.ndim - 1)
    if _is_small_class_rows(plan) and name in ("softmax", "log_softmax"):
        (source, destination) = plan.operands
        _launch(f"{name}_row_blocks", source.buffer, source.start, destination.buffer, destination.start,
                plan.n_outer, plan.n_classes, half_format)
    elif plan.is_rows:
        stream = streams(result.nbytes, plan.n_classes * result.itemsize)
        segment = long_row_segment(plan.n_classes, max(4, result.itemsize))  # 16-bit rows compute in float32
        if name in ("softmax", "log_softmax") and segment:
            chunk_segments = long_row_chunks(plan.n_classes, max(4, result.itemsize), segment)
            _launch("forward_long_rows", *_kernel_args(plan), half_format, stream, segment, name == "log_softmax",
                    chunk_segments)
        else:
            _launch(f"{name}_rows", *_kernel_args(plan), half_format, stream, *options)
    else:  # written from scratch tiles, a few KB per class: streamed if big, whatever the
        # segment length (1000x65536: the write pass alone 8.5 ms streamed, 48 ms cached)
        stream = result.nbytes >= STREAM_MIN_BYTES
        if name == "backward":
            _launch("backward_columns", *_kernel_args(plan), in_place, stream, *options)
        else:
            _launch("forward_columns", *_kernel_args(plan), in_place, stream, name == "log_softmax")
    if not np.may_share_memory(target, result):
        computed = np.moveaxis(target, -1, axis) if moved else target
        np.copyto(result, np.flip(computed, axis) if flipped else computed)
    return result


def _source_and_result_dtype(x: ArrayLike, dtype: DTypeLike) -> tuple[np.ndarray, np.dtype]:
    """``x`` as a supported array, and the result dtype (``dtype=``, else ``x``'s).

    As ``torch.softmax(x, dtype=...)``, ``x`` is cast to ``dtype`` first; from 16 bits
    to float32/float64 the kernels decode exactly instead, with no cast array.
    """
    x = as_float_array(x, "x")
    if dtype is None:
        return x, x.dtype
    out_dtype = float_dtype(dtype)
    if out_dtype != x.dtype and not (is_16bit(x.dtype) and not is_16bit(out_dtype)):
        x = x.astype(out_dtype)
    return x, out_dtype


def softmax(x: ArrayLike, axis: int = -1, *, out: np.ndarray | None = None, dtype: DTypeLike = None) -> np.ndarray:
    """Softmax along ``axis``: ``exp(x - max x) / Σ exp(x - max x)``.

    Parameters
    ----------
    x : array_like
        Logits. float32 and float64 compute in their own precision; integer and bool
        inputs are promoted to float64.
    axis : int, default -1
        The class axis. Any memory layout is handled without a transposed copy.
    out : ndarray, optional
        Where to write the result: same shape as ``x``, dtype of the result. May be
        ``x`` itself.
    dtype : float32 or float64, optional
        Cast ``x`` to this dtype before computing (as ``torch.softmax``).

    Returns
    -------
    ndarray
        Probabilities, summing to 1 along ``axis``. ``-inf`` entries get 0; a row
        that is all ``-inf`` or holds NaN or ``+inf`` is NaN.

    Examples
    --------
    >>> import numpy as np, fastsce
    >>> fastsce.softmax(np.array([0.0, np.log(3.0)]))
    array([0.25, 0.75])
    """
    x, out_dtype = _source_and_result_dtype(x, dtype)
    axis = normalize_axis(axis, x.ndim)
    if out is not None:
        check_out(out, x.shape, out_dtype)
    return _run_elementwise("softmax", [x], axis, out, out_dtype)


def log_softmax(
    x: ArrayLike, axis: int = -1, *, out: np.ndarray | None = None, dtype: DTypeLike = None
) -> np.ndarray:
    """Log-softmax along ``axis``: ``x - logsumexp(x)``, computed stably.

    Parameters and special values as :func:`softmax`; ``-inf`` entries give ``-inf``.

    Examples
    --------
    >>> import numpy as np, fastsce
    >>> fastsce.log_softmax(np.array([0.0, 0.0]))
    array([-0.69314718, -0.69314718])
    """
    x, out_dtype = _source_and_result_dtype(x, dtype)
    axis = normalize_axis(axis, x.ndim)
    if out is not None:
        check_out(out, x.shape, out_dtype)
    return _run_elementwise("log_softmax", [x], axis, out, out_dtype)


def logsumexp(
    x: ArrayLike, axis: int = -1, *, keepdims: bool = False, out: np.ndarray | None = None
) -> np.ndarray | float:
    """``log Σ exp(x)`` along ``axis``, without overflow.

    Parameters
    ----------
    x : array_like
        float32, float64 (kept), integer or bool (promoted to float64).
    axis : int, default -1
        The axis reduced over. An empty axis gives ``-inf``.
    keepdims : bool, default False
        Keep the reduced axis with size 1.
    out : ndarray, optional
        Where to write the result (shape of the result, dtype of ``x``).

    Returns
    -------
    ndarray or float
        A Python float when the result is a scalar and ``out`` is not given. As in
        torch: all ``-inf`` gives ``-inf``, a ``+inf`` entry ``+inf``, NaN gives NaN.

    Examples
    --------
    >>> import numpy as np, fastsce
    >>> fastsce.logsumexp(np.array([0.0, 0.0]))
    0.6931471805599453
    """
    x = as_float_array(x, "x")
    axis = normalize_axis(axis, x.ndim)
    reduced_shape = x.shape[:axis] + x.shape[axis + 1 :]
    result_shape = x.shape[:axis] + (1,) + x.shape[axis + 1 :] if keepdims else reduced_shape
    if out is not None:
        check_out(out, result_shape, x.dtype)
    if x.shape[axis] == 0 or x.size == 0:
        reduced = np.full(reduced_shape, -np.inf, x.dtype)
    else:
        (x,), _ = _class_flipped([x], axis)
        bits, half_format = kernel_view(x)
        plan = plan_layout([readonly_view(bits)], axis)
        if plan is None or (half_format != NOT_16BIT and not plan.is_rows):
            x = aligned_copy(np.moveaxis(x, axis, -1))  # the other axes keep their order
            axis = x.ndim - 1
            bits, half_format = kernel_view(x)
            plan = require_plan([readonly_view(bits)], axis)
        flat = np.empty(plan.n_outer * plan.n_inner, compute_dtype(x.dtype))
        (source,) = plan.operands
        if _is_small_class_rows(plan):
            _launch("logsumexp_row_blocks", source.buffer, source.start, flat, plan.n_outer, plan.n_classes,
                    half_format)
        elif plan.is_rows:
            work_itemsize = max(4, x.itemsize)  # 16-bit rows compute in float32
            segment = long_row_segment(plan.n_classes, work_itemsize)
            chunk_segments = long_row_chunks(plan.n_classes, work_itemsize, segment)
            if chunk_segments:  # rows of megabytes: each split across the threads
                _launch("logsumexp_split_rows", source.buffer, source.start, source.outer_stride, flat,
                        plan.n_outer, plan.n_classes, half_format, segment, chunk_segments)
            else:
                _launch("logsumexp_rows", source.buffer, source.start, source.outer_stride, flat,
                        plan.n_outer, plan.n_classes, half_format)
        else:
            _launch("logsumexp_columns", source.buffer, source.start, source.outer_stride, source.class_stride,
                                         flat, plan.n_outer, plan.n_classes, plan.n_inner,
                                         _column_block(plan, x.itemsize))
        reduced = plan.reduced_to_original(flat, x.shape).astype(x.dtype, copy=False)
    result = reduced.reshape(result_shape)
    if out is not None:
        np.copyto(out, result)
        return out
    return float(result) if result.ndim == 0 else result


def _backward(log_form: bool, grad_output: ArrayLike, output: ArrayLike, axis: int,
              out: np.ndarray | None) -> np.ndarray:
    """The VJP of log-softmax (``log_form``, ``output`` = log-probabilities) or of softmax."""
    grad_output = np.asarray(grad_output)
    output = np.asarray(output)
    if grad_output.shape != output.shape:
        raise ValueError(
            f"grad_output has shape {grad_output.shape} but output has shape {output.shape}; they must match"
        )
    g_dtype, s_dtype = result_dtype(grad_output.dtype, "grad_output"), result_dtype(output.dtype, "output")
    dtype = g_dtype if g_dtype == s_dtype else np.promote_types(compute_dtype(g_dtype), compute_dtype(s_dtype))
    grad_output = as_float_array(grad_output, "grad_output", dtype)
    output = as_float_array(output, "output", dtype)
    axis = normalize_axis(axis, output.ndim)
    if out is not None:
        check_out(out, output.shape, dtype)
    return _run_elementwise("backward", [grad_output, output], axis, out, options=(log_form,))


def softmax_backward(
    grad_output: ArrayLike, output: ArrayLike, axis: int = -1, *, out: np.ndarray | None = None
) -> np.ndarray:
    """Vector-Jacobian product of softmax: ``s · (g - Σ g·s)``.

    Parameters
    ----------
    grad_output : array_like
        ``g``, the gradient of the loss with respect to the softmax output.
    output : array_like
        ``s``, the softmax result (same shape).
    axis : int, default -1
        The class axis used in the forward pass.
    out : ndarray, optional
        Where to write the gradient with respect to the logits.

    Returns
    -------
    ndarray
        The gradient with respect to the logits, in the common float dtype.
    """
    return _backward(False, grad_output, output, axis, out)


def log_softmax_backward(
    grad_output: ArrayLike, output: ArrayLike, axis: int = -1, *, out: np.ndarray | None = None
) -> np.ndarray:
    """Vector-Jacobian product of log-softmax: ``g - exp(ls) · Σ g``.

    Parameters
    ----------
    grad_output : array_like
        ``g``, the gradient of the loss with respect to the log-softmax output.
    output : array_like
        ``ls``, the log-softmax result (same shape).
    axis : int, default -1
        The class axis used in the forward pass.
    out : ndarray, optional
        Where to write the gradient with respect to the logits.

    Returns
    -------
    ndarray
        The gradient with respect to the logits, in the common float dtype.
    """
    return _backward(True, grad_output, output, axis, out)


def softmax_jacobian(x: ArrayLike, axis: int = -1) -> np.ndarray:
    """The explicit softmax Jacobian ``J[..., i, j] = s_i (δ_ij - s_j)``.

    Meant for small class counts (tests, analysis); training code wants
    :func:`softmax_backward`, which never forms the ``C x C`` matrix.

    Parameters
    ----------
    x : array_like
        Logits.
    axis : int, default -1
        The class axis; it is moved last, and the result has shape ``(..., C, C)``.

    Returns
    -------
    ndarray
        The Jacobian for every row, symmetric in its last two axes.

    Raises
    ------
    ValueError
        If ``C`` exceeds 4096 or the result would hold more than 2**27 elements.
    """
    x = as_float_array(x, "x")
    axis = normalize_axis(axis, x.ndim)
    n_classes = x.shape[axis]
    n_rows = x.size // n_classes if n_classes else 0
    if n_classes > JACOBIAN_MAX_CLASSES or n_rows * n_classes * n_classes > JACOBIAN_MAX_ELEMENTS:
        raise ValueError(
            f"softmax_jacobian of shape {x.shape} along axis {axis} would be "
            f"{n_rows} x {n_classes} x {n_classes}; the limit is C <= {JACOBIAN_MAX_CLASSES} and "
            f"{JACOBIAN_MAX_ELEMENTS} elements. Use softmax_backward for vector-Jacobian products."
        )
    s = np.moveaxis(softmax(x, axis, dtype=compute_dtype(x.dtype)), axis, -1)
    jacobian = -s[..., :, None] * s[..., None, :]
    diagonal = np.einsum("...ii->...i", jacobian)  # a writeable view of the diagonal
    diagonal += s
    return jacobian.astype(x.dtype, copy=False)  # 16-bit: computed in float32, rounded once
