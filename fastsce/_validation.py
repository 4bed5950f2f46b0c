"""Argument checking and normalisation shared by the public wrappers."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
from numpy.exceptions import AxisError

__all__ = [
    "as_float_array",
    "check_out",
    "normalize_axis",
    "readonly_view",
    "result_dtype",
]

COMPUTE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def result_dtype(dtype: Any, name: str) -> np.dtype:
    """The float dtype fastsce computes in for an input of ``dtype``.

    float32 and float64 keep their precision; integers and bools promote to float64
    (as ``scipy.special.softmax``); everything else raises TypeError naming the dtype.
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize in (4, 8):
        return dtype.newbyteorder("=")
    if dtype.kind in "biu":
        return np.dtype(np.float64)
    raise TypeError(
        f"{name} has dtype {dtype}, which fastsce does not support; "
        "use float32 or float64 (integer and bool inputs are promoted to float64)"
    )


def as_float_array(x: Any, name: str, dtype: Any = None) -> np.ndarray:
    """``x`` as an ndarray of float32 or float64, copying only when the dtype changes.

    With ``dtype`` given (float32 or float64), ``x`` is cast to it first, as
    ``torch.softmax(x, dtype=...)`` does.
    """
    array = np.asarray(x)
    target = result_dtype(array.dtype, name)
    if dtype is not None:
        requested = np.dtype(dtype)
        if requested not in COMPUTE_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {requested}")
        target = requested
    return array if array.dtype == target else array.astype(target)


def normalize_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    """``axis`` as a non-negative int; TypeError if not an int, AxisError if out of range."""
    if isinstance(axis, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(axis).__name__}") from None
    if not -ndim <= axis < ndim:
        raise AxisError(axis, ndim, name)
    return axis % ndim


def check_out(out: Any, shape: tuple[int, ...], dtype: np.dtype, name: str = "out") -> np.ndarray:
    """Validate a user's output array: an ndarray of exactly ``shape`` and ``dtype``."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} has shape {out.shape}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} has dtype {out.dtype}, expected {dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


def readonly_view(array: np.ndarray) -> np.ndarray:
    """A read-only view, so that kernels compile one signature per dtype for inputs."""
    view = array.view()
    view.flags.writeable = False
    return view
