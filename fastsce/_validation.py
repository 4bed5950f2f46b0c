"""Argument checking and normalisation shared by the public wrappers."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
from numpy.exceptions import AxisError

from ._config import BFLOAT16, FLOAT16, NOT_16BIT

__all__ = [
    "as_float_array",
    "compute_dtype",
    "float_dtype",
    "is_16bit",
    "kernel_view",
    "check_out",
    "normalize_axis",
    "readonly_view",
    "result_dtype",
]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def is_bfloat16(dtype: np.dtype) -> bool:
    """``ml_dtypes.bfloat16`` (as JAX uses), recognized without importing ml_dtypes."""
    return dtype.name == "bfloat16" and dtype.itemsize == 2


def is_16bit(dtype: np.dtype) -> bool:
    """float16 or bfloat16: read as 16 bits, computed in float32."""
    return dtype == np.float16 or is_bfloat16(dtype)


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The precision kernels compute in: float32 for 16-bit data, else the dtype."""
    return np.dtype(np.float32) if is_16bit(dtype) else dtype


def kernel_view(array: np.ndarray) -> tuple[np.ndarray, int]:
    """``(array or its uint16 view, half_format)`` as the kernels take them."""
    if array.dtype == np.float16:
        return array.view(np.uint16), FLOAT16
    if is_bfloat16(array.dtype):
        return array.view(np.uint16), BFLOAT16
    return array, NOT_16BIT


def result_dtype(dtype: Any, name: str) -> np.dtype:
    """The float dtype fastsce works in for an input of ``dtype``.

    float32, float64, float16 and bfloat16 keep their dtype (16-bit data are computed
    in float32); integers and bools promote to float64 (as ``scipy.special.softmax``);
    everything else raises TypeError naming the dtype.
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize in (2, 4, 8):
        return dtype.newbyteorder("=")
    if is_bfloat16(dtype):
        return dtype
    if dtype.kind in "biu":
        return np.dtype(np.float64)
    raise TypeError(
        f"{name} has dtype {dtype}, which fastsce does not support; use float32, float64, "
        "float16 or bfloat16 (integer and bool inputs are promoted to float64)"
    )


def float_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """A requested result dtype: float16, bfloat16, float32 or float64."""
    requested = np.dtype(dtype)
    if requested not in FLOAT_DTYPES and not is_16bit(requested):
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {requested}")
    return requested


def as_float_array(x: Any, name: str, dtype: Any = None) -> np.ndarray:
    """``x`` as an ndarray of float32 or float64, copying only when the dtype changes.

    With ``dtype`` given (float32 or float64), ``x`` is cast to it first, as
    ``torch.softmax(x, dtype=...)`` does.
    """
    array = np.asarray(x)
    target = result_dtype(array.dtype, name) if dtype is None else float_dtype(dtype)
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
