"""Dask adapter: fastsce's softmax family and cross-entropy on dask arrays.

Import it explicitly (``import fastsce`` never imports dask)::

    import dask.array as da
    import fastsce.dask as fsd

    logits = da.from_zarr(...)                       # (N, C), any chunking
    loss, grad = fsd.cross_entropy_with_grad(logits, target)
    loss, grad = dask.compute(loss, grad)            # one pass shared by both

Every function is lazy and returns dask arrays (a 0-d array for a "mean" or "sum" loss);
the results equal the in-memory ``fastsce`` functions up to rounding. Two strategies,
chosen from the chunks of the class axis:

* **chunked along rows only** (the class axis in one chunk): each block goes through
  the fused kernels with ``map_blocks``/``blockwise``. A "mean" cross-entropy first sums
  the denominators from the targets alone (``Σ weight[target]`` over counted rows, and
  their number), so that each block's gradient is scaled exactly as in memory.
* **chunked along classes**: a two-phase reduction. Phase 1 gives each chunk's
  logsumexp — the pair (max, Σexp) of online softmax, stored as its log-sum — and, for
  cross-entropy, the target logit gathered from the chunk that holds it. Pairs merge in
  a tree with the rescaling ``Σ = Σ_a·e^(m_a−m) + Σ_b·e^(m_b−m)``. Phase 2 writes each
  chunk: ``softmax(chunk) · e^(lse_chunk − lse)`` (and the gradient from it).

Any number of leading dimensions and any class ``axis`` (moved last lazily); float32
and float64 compute in their own precision, float16 and bfloat16 in float32 (results
rounded once to 16 bits), integers and bools are promoted to float64.
Arguments that are NumPy arrays are wrapped with the logits' row chunks. On a cluster,
the workers need fastsce installed (``pip install "fastsce[dask]"``); each worker
compiles the kernels or loads them from its on-disk cache on its first task.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import dask.array as da
import numpy as np
from numpy.typing import ArrayLike

from ._validation import normalize_axis, result_dtype
from .loss import REDUCTIONS
from .loss import _mean as _safe_mean
from .loss import cross_entropy as _np_cross_entropy
from .loss import cross_entropy_with_grad as _np_cross_entropy_with_grad
from .softmax import log_softmax as _np_log_softmax
from .softmax import logsumexp as _np_logsumexp
from .softmax import softmax as _np_softmax

__all__ = ["cross_entropy", "cross_entropy_with_grad", "log_softmax", "logsumexp", "softmax"]

_F64 = np.dtype(np.float64)
_LETTERS = "abcdefghijklmnopqrstuvwxy"  # leading axes; "z" is the class axis


# ------------------------------------------------------------------ helpers ----
def _logits(x: Any, axis: int, name: str = "x") -> tuple[da.Array, int, bool]:
    """``x`` as a dask array in its compute dtype, classes last, at least 2-D.

    Returns the array, the normalised axis and whether a leading axis was added.
    """
    x = da.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (the classes)")
    dtype = result_dtype(x.dtype, name)
    x = x if x.dtype == dtype else x.astype(dtype)
    axis = normalize_axis(axis, x.ndim)
    if axis != x.ndim - 1:
        x = da.moveaxis(x, axis, -1)
    return (x[None] if x.ndim == 1 else x), axis, x.ndim == 1


def _restore(result: da.Array, axis: int, added: bool) -> da.Array:
    """Undo :func:`_logits` on a result shaped like the logits."""
    if added:
        return result[0]
    return result if axis == result.ndim - 1 else da.moveaxis(result, -1, axis)


def _lead(x: da.Array) -> str:
    return _LETTERS[: x.ndim - 1]


def _class_chunked(x: da.Array) -> bool:
    return x.numblocks[-1] > 1


def _like_rows(values: Any, x: da.Array, name: str, shape: tuple[int, ...] | None = None) -> da.Array:
    """Per-row values (or logits-shaped ones) as a dask array with ``x``'s chunks."""
    values = da.asarray(values)
    shape = x.shape[:-1] if shape is None else shape
    if values.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {values.shape}")
    return values.rechunk(x.chunks[: values.ndim])


def _class_starts(x: da.Array) -> da.Array:
    """The first class of each class chunk, one element per chunk."""
    starts = np.cumsum((0,) + x.chunks[-1][:-1])
    return da.from_array(starts, chunks=1)


def _row_starts(x: da.Array) -> list[Any]:
    """Blockwise arguments giving each block its first index along every leading axis."""
    pairs: list[Any] = []
    for letter, chunks in zip(_lead(x), x.chunks[:-1]):
        pairs += [da.from_array(np.cumsum((0,) + chunks[:-1]), chunks=1), letter]
    return pairs


def _work_dtype(dtype: np.dtype) -> np.dtype:
    """The precision fastsce computes in: float32 for 16-bit data (float16, bfloat16)."""
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


def _empty(ndim: int, dtype: Any) -> np.ndarray:
    return np.empty((0,) * ndim, dtype)


# ------------------------------------------------------------ phase 1: parts ----
def _chunk_lse(block: np.ndarray) -> np.ndarray:
    """Per-row logsumexp of one class chunk, in float64: the chunk's online-softmax pair
    (m, Σ) written as m + log Σ. Callers pass the chunk upcast to float64: phase 2
    rescales by ``e^(lse_chunk − lse)``, where a float32 log-sum would lose digits."""
    if block.shape[-1] == 0:
        return np.full(block.shape[:-1], -np.inf)
    return np.asarray(_np_logsumexp(block, axis=-1), dtype=_F64)


def _merge_parts(parts: np.ndarray, axis: Any, keepdims: bool) -> np.ndarray:
    """Merge per-chunk statistics along ``axis``: column 0 holds log-sums, merged with the
    online-softmax rescaling ``Σ = Σ_a·e^(m_a−m) + Σ_b·e^(m_b−m)`` around ``m = max``; the
    other columns are additive (gathered target logits, weighted sums)."""
    lse = parts[..., :1]
    m = np.max(lse, axis=axis, keepdims=True)
    ref = np.where(np.isfinite(m), m, 0.0)  # all -inf stays -inf, +inf stays +inf, NaN stays NaN
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        merged = ref + np.log(np.sum(np.exp(lse - ref), axis=axis, keepdims=True))
    out = np.concatenate([merged, np.sum(parts[..., 1:], axis=axis, keepdims=True)], axis=-1)
    return out if keepdims else np.squeeze(out, axis)


def _merge(parts: da.Array) -> da.Array:
    """Rows' statistics from the per-chunk ones: a tree reduction over the chunk axis."""
    return da.reduction(
        parts,
        _merge_parts,
        _merge_parts,
        combine=_merge_parts,
        axis=parts.ndim - 2,
        dtype=_F64,
        concatenate=True,
        meta=_empty(parts.ndim - 1, _F64),
    )


def _chunk_lse_part(block: np.ndarray) -> np.ndarray:
    return _chunk_lse(block.astype(np.float64, copy=False))[..., None, None]


def _lse_parts(x: da.Array) -> da.Array:
    """Phase 1 of the softmax family: ``(*rows, n_chunks, 1)`` per-chunk log-sums."""
    chunks = x.chunks[:-1] + ((1,) * x.numblocks[-1], (1,))
    return x.map_blocks(
        _chunk_lse_part, chunks=chunks, new_axis=x.ndim, dtype=_F64, meta=_empty(x.ndim + 1, _F64)
    )


def _global_softmax(block: np.ndarray, part_lse: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """``exp(x - lse)`` of one class chunk, as ``softmax(chunk) · e^(lse_chunk − lse)``,
    in float32 for 16-bit chunks (the caller rounds once to 16 bits)."""
    s = _np_softmax(block, axis=-1, dtype=_work_dtype(block.dtype))
    with np.errstate(invalid="ignore", over="ignore"):
        factor = np.exp(part_lse - lse)
    np.multiply(s, factor[..., None], out=s, casting="same_kind")
    s[factor == 0] = 0.0  # a negligible or all -inf chunk (whose own softmax may be NaN)
    s[~np.isfinite(lse)] = np.nan  # the row is all -inf, or holds NaN or +inf
    return s


def _phase2(func: Any, x: da.Array, parts: da.Array, rows: da.Array, *extra: Any, dtype: Any, **kwargs: Any):
    """Write every class chunk of ``x`` from its part statistics and its rows' merged ones.

    ``extra`` are (array, index) pairs flattened; the per-chunk parts have chunks of one
    along the chunk axis, so block indices (not chunk sizes) pair them with ``x``.
    """
    lead = _lead(x)
    return da.blockwise(
        func,
        lead + "z",
        x,
        lead + "z",
        _class_starts(x),
        "z",
        parts,
        lead + "zk",
        rows,
        lead + "k",
        *extra,
        dtype=dtype,
        align_arrays=False,
        concatenate=True,
        meta=_empty(x.ndim, dtype),
        **kwargs,
    )


# ------------------------------------------------------------ softmax family ----
def _softmax_chunk(block, start, part, rows):
    return _global_softmax(block, part[..., 0, 0], rows[..., 0]).astype(block.dtype, copy=False)


def _log_softmax_chunk(block, start, part, rows):
    lse, part_lse = rows[..., 0], part[..., 0, 0]
    out = _np_log_softmax(block, axis=-1, dtype=_work_dtype(block.dtype))
    with np.errstate(invalid="ignore"):
        np.add(out, (part_lse - lse)[..., None], out=out, casting="same_kind")
    out[(part_lse == -np.inf) & np.isfinite(lse)] = -np.inf  # an all -inf chunk in a finite row
    out[~np.isfinite(lse)] = np.nan
    return out.astype(block.dtype, copy=False)


def softmax(x: ArrayLike, axis: int = -1) -> da.Array:
    """Softmax along ``axis`` of a dask array, as :func:`fastsce.softmax`.

    Parameters
    ----------
    x : dask or NumPy array
        Logits; any chunking. Chunks along ``axis`` go through the two-phase reduction.
    axis : int, default -1
        The class axis.

    Returns
    -------
    dask.array.Array
        Probabilities, chunked like ``x``.
    """
    x, axis, added = _logits(x, axis)
    if not _class_chunked(x):
        return _restore(x.map_blocks(_np_softmax, axis=-1, dtype=x.dtype), axis, added)
    parts = _lse_parts(x)
    return _restore(_phase2(_softmax_chunk, x, parts, _merge(parts), dtype=x.dtype), axis, added)


def log_softmax(x: ArrayLike, axis: int = -1) -> da.Array:
    """Log-softmax along ``axis`` of a dask array, as :func:`fastsce.log_softmax`; see :func:`softmax`."""
    x, axis, added = _logits(x, axis)
    if not _class_chunked(x):
        return _restore(x.map_blocks(_np_log_softmax, axis=-1, dtype=x.dtype), axis, added)
    parts = _lse_parts(x)
    return _restore(_phase2(_log_softmax_chunk, x, parts, _merge(parts), dtype=x.dtype), axis, added)


def _rows_logsumexp(block: np.ndarray) -> np.ndarray:
    return np.asarray(_np_logsumexp(block, axis=-1))


def logsumexp(x: ArrayLike, axis: int = -1, *, keepdims: bool = False) -> da.Array:
    """``log Σ exp(x)`` along ``axis`` of a dask array, as :func:`fastsce.logsumexp`.

    Returns
    -------
    dask.array.Array
        In ``x``'s dtype, with ``axis`` removed (kept with size 1 if ``keepdims``).
    """
    x, axis, added = _logits(x, axis)
    if _class_chunked(x):
        lse = _merge(_lse_parts(x))[..., 0].astype(x.dtype)
    else:
        lse = x.map_blocks(_rows_logsumexp, drop_axis=x.ndim - 1, dtype=x.dtype)
    if added:
        lse = lse[0]
    return da.expand_dims(lse, axis) if keepdims else lse


# ------------------------------------------------------------- cross-entropy ----
def _check_targets(t: np.ndarray, n_classes: int, ignore_index: int, offset: tuple[int, ...]) -> np.ndarray:
    """Class indices as int64, after checking them; ``offset`` locates the block in the array."""
    t = np.asarray(t)
    if t.dtype.kind not in "iu":
        raise TypeError(f"target must hold integer class indices or float class probabilities, got {t.dtype}")
    t = t.astype(np.int64)
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if bad.any():
        where = np.unravel_index(int(np.argmax(bad)), t.shape)
        at = ", ".join(str(int(o + i)) for o, i in zip(offset, where))
        raise ValueError(
            f"target[{at}] = {t[where]} is not a class index in "
            f"[0, {n_classes}) nor ignore_index ({ignore_index})"
        )
    return t


def _count_block(t, *, weight, ignore_index, n_classes, block_info=None):
    """``[Σ weight[t], number of rows]`` over the counted rows of one target block."""
    offset = tuple(lo for lo, _ in block_info[0]["array-location"]) if block_info else (0,) * t.ndim
    t = _check_targets(t, n_classes, ignore_index, offset)
    counted = t != ignore_index
    n = float(np.count_nonzero(counted))
    total = float(np.sum(weight[t[counted]], dtype=np.float64)) if weight is not None else n
    return np.array([total, n]).reshape((1,) * t.ndim + (2,))


def _denominators(
    target: da.Array, soft: bool, weight, ignore_index: int, n_classes: int, reduction: str
) -> da.Array:
    """The "mean" denominators ``[cross-entropy, z-loss]`` as a (2,) dask array.

    From the targets alone (no logits), so that gradients can be scaled block by block.
    Unused (ones) for "sum" and "none".
    """
    if reduction != "mean":
        return da.from_array(np.ones(2), chunks=2)
    if soft:
        n_rows = float(math.prod(target.shape[:-1]))
        return da.from_array(np.array([n_rows, n_rows]), chunks=2)
    chunks = tuple((1,) * n for n in target.numblocks) + ((2,),)
    counts = target.map_blocks(
        _count_block,
        weight=weight,
        ignore_index=ignore_index,
        n_classes=n_classes,
        chunks=chunks,
        new_axis=target.ndim,
        dtype=_F64,
        meta=_empty(target.ndim + 1, _F64),
    )
    return counts.sum(axis=tuple(range(target.ndim)))


class _Problem:
    """Validated cross-entropy arguments, with the logits classes-last and at least 2-D."""

    def __init__(self, logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, axis):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
        if not (math.isfinite(z_loss) and z_loss >= 0.0):
            raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
        self.x, self.axis, self.added = _logits(logits, axis, "logits")
        target = da.asarray(target)
        self.soft = target.dtype.kind == "f"
        if target.dtype.kind not in "fiu":
            raise TypeError(
                f"target must hold integer class indices or float class probabilities, "
                f"got dtype {target.dtype}"
            )
        if self.soft:
            target = target if target.dtype == self.x.dtype else target.astype(_work_dtype(self.x.dtype))
            if target.ndim and self.axis != target.ndim - 1:
                target = da.moveaxis(target, self.axis, -1)
            shape = self.x.shape[1:] if self.added else self.x.shape
        else:
            shape = self.x.shape[1:-1] if self.added else self.x.shape[:-1]
        if target.shape != shape:
            raise ValueError(
                f"target must have shape {shape} for logits of shape {self.x.shape} along axis "
                f"{self.axis}, got {target.shape}"
            )
        target = target[None] if self.added else target
        self.target = target.rechunk(self.x.chunks if self.soft else self.x.chunks[:-1])
        self.n_classes = self.x.shape[-1]
        self.weight = None
        if weight is not None:
            w = np.asarray(weight, dtype=np.float64)
            if w.shape != (self.n_classes,):
                raise ValueError(
                    f"weight must be 1-D with one entry per class ({self.n_classes}), got {w.shape}"
                )
            self.weight = w
        self.ignore_index = operator.index(ignore_index)
        self.reduction, self.label_smoothing, self.z_loss = reduction, float(label_smoothing), float(z_loss)

    @property
    def options(self) -> dict[str, Any]:
        return {
            "weight": self.weight,
            "ignore_index": self.ignore_index,
            "label_smoothing": self.label_smoothing,
        }

    def grad_output(self, grad_output: Any) -> tuple[Any, str]:
        """``grad_output`` as a blockwise argument: a per-row array or a 0-d one."""
        g = da.asarray(grad_output, dtype=_F64) if not isinstance(grad_output, da.Array) else grad_output
        if g.ndim == 0:
            return g, ""
        if self.reduction != "none":
            raise ValueError(
                f"grad_output must be a scalar for reduction={self.reduction!r}, got shape {g.shape}"
            )
        g = g[None] if self.added else g
        return _like_rows(g, self.x, "grad_output"), _lead(self.x)

    def finish(self, loss: da.Array) -> da.Array:
        if self.reduction == "none":
            return loss[0] if self.added else loss
        return loss

    def finish_grad(self, grad: da.Array) -> da.Array:
        return _restore(grad, self.axis, self.added)


# -------------------------------------------------- rows path: fused kernels ----
def _rows_block(block, target, grad_output, denominators, *starts, options, reduction, z_loss, with_grad):
    """One row block through the fused kernel: (loss part, grad or None).

    For "mean" the kernel runs as "sum" with ``grad_output / D`` and z-loss rescaled by
    ``D / D_z``, so its gradient is exactly the block of the whole array's.
    """
    if target.dtype.kind in "iu":  # checked here so that errors name the row in the whole array
        _check_targets(target, block.shape[-1], options["ignore_index"], tuple(int(s[0]) for s in starts))
    kwargs = dict(options, reduction="sum" if reduction == "mean" else reduction, axis=-1)
    g = np.asarray(grad_output, dtype=_F64)
    if reduction == "mean":
        ce_count, z_count = (float(v) for v in denominators)
        scale = 1.0 / ce_count if ce_count else math.inf
        kwargs["z_loss"] = z_loss * ce_count / z_count if z_count and ce_count else 0.0
        g = g * scale
    else:
        kwargs["z_loss"] = z_loss
    if not with_grad:
        return _np_cross_entropy(block, target, **kwargs), None
    loss, grad = _np_cross_entropy_with_grad(block, target, grad_output=g if g.ndim else float(g), **kwargs)
    return loss, grad


def _loss_part(results, reduction, ndim):
    (result,) = results  # the row block's only class block: a (loss, grad) tuple
    loss = result[0]
    return np.asarray(loss) if reduction == "none" else np.full((1,) * ndim, loss, _F64)


def _rows_path(p: _Problem, grad_output: Any, with_grad: bool):
    x, lead = p.x, _lead(p.x)
    denominators = _denominators(p.target, p.soft, p.weight, p.ignore_index, p.n_classes, p.reduction)
    g, g_index = p.grad_output(grad_output if with_grad else 1.0)
    t_index = lead + ("z" if p.soft else "")
    results = da.blockwise(
        _rows_block,
        lead + "z",
        x,
        lead + "z",
        p.target,
        t_index,
        g,
        g_index,
        denominators,
        "q",
        *_row_starts(x),
        options=p.options,
        reduction=p.reduction,
        z_loss=p.z_loss,
        with_grad=with_grad,
        align_arrays=False,
        concatenate=True,
        meta=_empty(x.ndim, x.dtype),
        dtype=x.dtype,
    )
    adjust = None if p.reduction == "none" else {c: 1 for c in lead}
    loss_dtype = x.dtype if p.reduction == "none" else _F64
    parts = da.blockwise(
        _loss_part,
        lead,
        results,
        lead + "z",
        reduction=p.reduction,
        ndim=len(lead),
        adjust_chunks=adjust,
        concatenate=False,
        dtype=loss_dtype,
        meta=_empty(len(lead), loss_dtype),
    )
    if p.reduction == "none":
        loss = parts
    elif p.reduction == "sum":
        loss = parts.sum()
    else:
        loss = da.blockwise(
            _finish_mean,
            "",
            parts.sum(),
            "",
            denominators,
            "q",
            concatenate=True,
            dtype=_F64,
            meta=_empty(0, _F64),
        )
    grad = (
        results.map_blocks(operator.itemgetter(1), dtype=x.dtype, meta=_empty(x.ndim, x.dtype))
        if with_grad
        else None
    )
    return loss, grad


# ---------------------------------------------- classes path: two-phase reduction ----
def _xent_part(block, target, *, weight, ignore_index, label_smoothing, soft, n_classes, block_info=None):
    """Phase 1 of cross-entropy for one class chunk: ``[lse_chunk, Σ_target, Σ_smoothing]``.

    Class indices: ``w[t]·x[t]`` if the target falls in this chunk, and ``Σ_c w_c x_c``.
    Probabilities: ``Σ_c w_c ỹ_c`` and ``Σ_c w_c ỹ_c x_c`` with ``ỹ = (1-ε)y + ε/C``.
    """
    start, stop = block_info[0]["array-location"][-1]
    w = np.ones(stop - start) if weight is None else weight[start:stop]
    out = np.zeros(block.shape[:-1] + (1, 3))
    x64 = block.astype(np.float64, copy=False)
    out[..., 0, 0] = _chunk_lse(x64)
    if soft:
        smoothed = (1.0 - label_smoothing) * target.astype(np.float64) + label_smoothing / n_classes
        smoothed *= w
        out[..., 0, 1] = np.sum(smoothed, axis=-1)
        with np.errstate(invalid="ignore"):
            out[..., 0, 2] = np.einsum("...c,...c->...", smoothed, x64)
        return out
    t = target[..., 0].astype(np.int64)
    inside = (t >= start) & (t < stop) & (t != ignore_index)
    local = np.where(inside, t - start, 0)
    if block.shape[-1]:
        picked = np.take_along_axis(x64, local[..., None], -1)[..., 0]
        out[..., 0, 1] = np.where(inside, w[local] * picked, 0.0)
    if label_smoothing:
        out[..., 0, 2] = x64 @ w
    return out


def _xent_rows(rows, target=None, *, weight, ignore_index, label_smoothing, soft, n_classes, block_info=None):
    """Per-row ``[cross-entropy, lse², Σ weight[t], counted]`` from the merged statistics."""
    lse, gathered, smooth_sum = rows[..., 0], rows[..., 1], rows[..., 2]
    out = np.zeros(rows.shape[:-1] + (4,))
    with np.errstate(invalid="ignore"):
        if soft:
            out[..., 0] = lse * gathered - smooth_sum
            out[..., 1] = lse * lse
            out[..., 2] = out[..., 3] = 1.0
            return out
        offset = tuple(lo for lo, _ in block_info[1]["array-location"]) if block_info else (0,) * lse.ndim
        t = _check_targets(target[..., 0], n_classes, ignore_index, offset[:-1])
        counted = t != ignore_index
        w = np.ones(n_classes) if weight is None else weight
        w_t = np.where(counted, w[np.where(counted, t, 0)], 0.0)
        ce = (1.0 - label_smoothing) * (w_t * lse - gathered)
        if label_smoothing:
            ce += label_smoothing / n_classes * (np.sum(w) * lse - smooth_sum)
        out[..., 0] = np.where(counted, ce, 0.0)
        out[..., 1] = np.where(counted, lse * lse, 0.0)
    out[..., 2] = w_t
    out[..., 3] = counted
    return out


def _xent_grad_chunk(
    block,
    start,
    part,
    rows,
    target,
    grad_output,
    denominators,
    *starts,
    weight,
    ignore_index,
    label_smoothing,
    z_loss,
    reduction,
    soft,
    n_classes,
):
    """Phase 2: the gradient of one class chunk, ``coef·s − (target terms)``, per row scaled."""
    lse = rows[..., 0]
    s = _global_softmax(block, part[..., 0, 0], lse)
    start = int(start[0])
    stop = start + block.shape[-1]
    w_all = np.ones(n_classes) if weight is None else weight
    w = w_all[start:stop]
    g = np.broadcast_to(np.asarray(grad_output, dtype=_F64), lse.shape)
    ce_scale = z_scale = 1.0
    if reduction == "mean":
        ce_count, z_count = (float(v) for v in denominators)
        ce_scale = 1.0 / ce_count if ce_count else math.inf
        z_scale = 1.0 / z_count if z_count else math.inf
    eps = label_smoothing
    with np.errstate(invalid="ignore", over="ignore"):
        a = g * ce_scale  # d objective / d (row's cross-entropy)
        z_coef = 2.0 * z_loss * lse * g * z_scale if z_loss else 0.0
        if soft:
            coef = a * rows[..., 1] + z_coef
            np.multiply(s, coef[..., None], out=s, casting="same_kind")
            y = (1.0 - eps) * target.astype(np.float64) + eps / n_classes
            s -= a[..., None] * w * y
            return s.astype(block.dtype, copy=False)
        t = _check_targets(target, n_classes, ignore_index, tuple(int(v[0]) for v in starts))
        counted = t != ignore_index
        safe = np.where(counted, t, 0)
        a = np.where(counted, a, 0.0)
        w_t = w_all[safe]
        coef = a * ((1.0 - eps) * w_t + eps / n_classes * np.sum(w_all)) + np.where(counted, z_coef, 0.0)
        np.multiply(s, coef[..., None], out=s, casting="same_kind")
        if eps:
            s -= (a * eps / n_classes)[..., None] * w
        inside = counted & (t >= start) & (t < stop)
        hit = np.nonzero(inside)
        s[hit + (t[hit] - start,)] -= (a * (1.0 - eps) * w_t)[hit]
    s[~counted] = 0.0
    return s.astype(block.dtype, copy=False)


def _mean_from_sums(sums: np.ndarray, *, z_loss: float) -> np.ndarray:
    """The "mean" loss from ``[Σ cross-entropy, Σ lse², Σ weight[t], counted rows]``."""
    ce_total, z_total, weight_total, count = (float(v) for v in sums)
    return np.asarray(
        _safe_mean(ce_total, weight_total) + (z_loss * _safe_mean(z_total, count) if z_loss else 0.0)
    )


def _finish_mean(total: np.ndarray, denominators: np.ndarray) -> np.ndarray:
    return np.asarray(_safe_mean(float(total), float(denominators[0])))


def _classes_path(p: _Problem, grad_output: Any, with_grad: bool):
    x, lead = p.x, _lead(p.x)
    common = {
        "weight": p.weight,
        "ignore_index": p.ignore_index,
        "label_smoothing": p.label_smoothing,
        "soft": p.soft,
        "n_classes": p.n_classes,
    }
    part_chunks = x.chunks[:-1] + ((1,) * x.numblocks[-1], (3,))
    target_blocks = p.target if p.soft else p.target[..., None]
    parts = da.map_blocks(
        _xent_part,
        x,
        target_blocks,
        chunks=part_chunks,
        new_axis=x.ndim,
        dtype=_F64,
        meta=_empty(x.ndim + 1, _F64),
        **common,
    )
    rows = _merge(parts)
    if p.soft:
        per_row = da.map_blocks(
            _xent_rows,
            rows,
            dtype=_F64,
            chunks=rows.chunks[:-1] + ((4,),),
            meta=_empty(x.ndim, _F64),
            **common,
        )
    else:
        per_row = da.map_blocks(
            _xent_rows,
            rows,
            p.target[..., None],
            dtype=_F64,
            chunks=rows.chunks[:-1] + ((4,),),
            meta=_empty(x.ndim, _F64),
            **common,
        )
    ce, z, weight_total, count = (per_row[..., k] for k in range(4))
    if p.reduction == "none":
        loss = (ce + p.z_loss * z if p.z_loss else ce).astype(x.dtype)
    elif p.reduction == "sum":
        loss = ce.sum() + p.z_loss * z.sum() if p.z_loss else ce.sum()
    else:
        sums = da.stack([ce.sum(), z.sum(), weight_total.sum(), count.sum()])
        loss = sums.map_blocks(
            _mean_from_sums, z_loss=p.z_loss, drop_axis=0, dtype=_F64, meta=_empty(0, _F64)
        )
    if not with_grad:
        return loss, None
    denominators = _denominators(p.target, p.soft, p.weight, p.ignore_index, p.n_classes, p.reduction)
    g, g_index = p.grad_output(grad_output)
    t_index = lead + ("z" if p.soft else "")
    grad = _phase2(
        _xent_grad_chunk,
        x,
        parts,
        rows,
        p.target,
        t_index,
        g,
        g_index,
        denominators,
        "q",
        *_row_starts(x),
        dtype=x.dtype,
        z_loss=p.z_loss,
        reduction=p.reduction,
        **common,
    )
    return loss, grad


def _cross_entropy(
    logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, axis, grad_output, with_grad
):
    p = _Problem(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, axis)
    path = _classes_path if _class_chunked(p.x) else _rows_path
    loss, grad = path(p, grad_output, with_grad)
    loss = p.finish(loss)
    return (loss, p.finish_grad(grad)) if with_grad else loss


def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    axis: int = -1,
) -> da.Array:
    """Cross-entropy of dask logits against ``target``, as :func:`fastsce.cross_entropy`.

    Parameters
    ----------
    logits : dask or NumPy array
        Classes along ``axis``; chunked along rows, along classes, or both.
    target : dask or NumPy array
        Class indices (integers, shaped like ``logits`` without ``axis``) or class
        probabilities (floats, shaped like ``logits``). Rechunked to the logits' rows.
    weight, ignore_index, reduction, label_smoothing, z_loss, axis
        As :func:`fastsce.cross_entropy` (PyTorch's semantics; "mean" divides by
        ``Σ weight[target]`` over the counted rows of the whole array).

    Returns
    -------
    dask.array.Array
        0-d float64 for "mean" and "sum"; per-row losses in the logits' dtype for "none".
        Out-of-range class indices raise ValueError when computed.
    """
    return _cross_entropy(
        logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, axis, 1.0, with_grad=False
    )


def cross_entropy_with_grad(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    axis: int = -1,
    grad_output: Any = 1.0,
) -> tuple[da.Array, da.Array]:
    """Cross-entropy and its gradient with respect to dask logits, as :func:`fastsce.cross_entropy_with_grad`.

    ``grad_output`` is a scalar, or for ``reduction="none"`` an array shaped like the
    per-row losses (dask or NumPy). Compute both results together
    (``dask.compute(loss, grad)``) so that they share the pass over the logits.

    Returns
    -------
    (loss, grad) : tuple of dask.array.Array
        ``loss`` as :func:`cross_entropy`; ``grad`` chunked like ``logits``, in its dtype.
    """
    return _cross_entropy(
        logits,
        target,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        axis,
        grad_output,
        with_grad=True,
    )
