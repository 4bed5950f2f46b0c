"""Describe N-d arrays to the kernels as flat buffers with element offsets and strides.

A kernel sees every array as ``(n_outer, n_classes, n_inner)``: the class axis in the
middle, all axes that collapse into one contiguous block as ``inner`` (stride 1), and all
remaining axes collapsed into ``outer``. ``n_inner == 1`` with class stride 1 is the row
case (softmax along the last axis of a C-ordered array); ``n_inner > 1`` is the column
case (``axis=0`` of a C-ordered array, or the last axis of a Fortran-ordered one), where
the kernels vectorize along the contiguous axis instead of transposing.

Each array is passed as a 1-D C-contiguous view spanning its memory (so Numba compiles
one signature per dtype and LLVM sees unit-stride loops), plus the element offset of
``[0, ..., 0]`` and the outer and class strides in elements, which may be negative. The
kernels never touch the gaps between rows of a strided view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Operand", "Plan", "aligned_copy", "plan_layout", "require_plan"]


@dataclass(frozen=True)
class Operand:
    """One array as a kernel sees it."""

    buffer: np.ndarray  # 1-D contiguous view of the array's memory
    start: int  # element index of [0, ..., 0] in ``buffer``
    outer_stride: int  # elements between consecutive outer indices
    class_stride: int  # elements between consecutive classes


@dataclass(frozen=True)
class Plan:
    """A common ``(n_outer, n_classes, n_inner)`` view of several same-shape arrays."""

    n_outer: int
    n_classes: int
    n_inner: int
    operands: tuple[Operand, ...]
    outer_axes: tuple[int, ...]  # original axes in the order ``outer`` enumerates them
    inner_axes: tuple[int, ...]

    @property
    def is_rows(self) -> bool:
        """True when every operand has contiguous classes: the row kernels apply."""
        return self.n_inner == 1 and all(op.class_stride == 1 for op in self.operands)

    def reduced_to_original(self, reduced: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Map a C-ordered ``(n_outer, n_inner)`` result back to ``shape`` minus the class axis.

        ``shape`` is the full array shape; the returned array has the class axis removed
        and the remaining axes in their original order.
        """
        order = self.outer_axes + self.inner_axes
        blocked = reduced.reshape(tuple(shape[a] for a in order))
        return np.asarray(blocked.transpose(np.argsort(order)), order="C")  # keeps 0-d


def _element_strides(array: np.ndarray) -> tuple[int, ...] | None:
    itemsize = array.itemsize
    if any(s % itemsize for s in array.strides):
        return None
    return tuple(s // itemsize for s in array.strides)


def _flat_buffer(array: np.ndarray) -> tuple[np.ndarray, int]:
    """A 1-D contiguous view from the lowest to the highest address of ``array``."""
    low = sum(min(0, (n - 1) * s) for n, s in zip(array.shape, array.strides, strict=True))
    high = sum(max(0, (n - 1) * s) for n, s in zip(array.shape, array.strides, strict=True))
    # Flipping every negative-stride axis puts the data pointer at the lowest address.
    lowest = array[tuple(slice(None, None, -1) if s < 0 else slice(None) for s in array.strides)]
    span = (high - low) // array.itemsize + 1
    buffer = np.lib.stride_tricks.as_strided(
        lowest, shape=(span,), strides=(array.itemsize,), writeable=array.flags.writeable
    )
    return buffer, -low // array.itemsize


def _collapse(axes: list[int], shape: tuple[int, ...], strides: list[tuple[int, ...]]) -> bool:
    """True if ``axes`` (outermost first) address memory as one axis in every array."""
    return all(
        all(st[a] == st[b] * shape[b] for st in strides) for a, b in zip(axes, axes[1:])
    )


def plan_layout(arrays: list[np.ndarray], axis: int) -> Plan | None:
    """Plan how kernels traverse ``arrays`` (all of one shape) along ``axis``.

    Returns None when no common ``(outer, classes, inner)`` view exists without a copy
    (unaligned or byte-offset views, or axes that interleave differently in the arrays);
    the caller then makes contiguous copies.
    """
    shape = arrays[0].shape
    if any(not a.flags.aligned for a in arrays):
        return None
    strides = [_element_strides(a) for a in arrays]
    if any(s is None for s in strides):
        return None
    # Size-1 axes address nothing and never block a collapse; a single class is
    # contiguous whatever its stride says.
    if shape[axis] == 1:
        strides = [tuple(1 if a == axis else s for a, s in enumerate(st)) for st in strides]
    others = [a for a in range(len(shape)) if a != axis and shape[a] > 1]
    singles = tuple(a for a in range(len(shape)) if a != axis and shape[a] == 1)
    reference = strides[0]

    inner: list[int] = []
    unit = [a for a in others if all(st[a] == 1 for st in strides)]
    if unit and shape[axis] > 1:
        # Grow the contiguous block outward from the unit-stride axis.
        inner = [unit[0]]
        grown = True
        while grown:
            grown = False
            for a in others:
                if a not in inner and _collapse([a, inner[0]], shape, strides):
                    inner.insert(0, a)
                    grown = True
                    break
    outer = sorted((a for a in others if a not in inner), key=lambda a: -abs(reference[a]))
    if not _collapse(outer, shape, strides):
        return None

    operands = []
    for array, st in zip(arrays, strides, strict=True):
        buffer, start = _flat_buffer(array)
        operands.append(
            Operand(
                buffer=buffer,
                start=start,
                outer_stride=st[outer[-1]] if outer else 0,
                class_stride=st[axis],
            )
        )
    n_inner = int(np.prod([shape[a] for a in inner], dtype=np.int64))
    n_outer = int(np.prod([shape[a] for a in outer], dtype=np.int64))
    return Plan(
        n_outer=n_outer,
        n_classes=shape[axis],
        n_inner=n_inner,
        operands=tuple(operands),
        outer_axes=singles + tuple(outer),
        inner_axes=tuple(inner),
    )


def aligned_copy(array: np.ndarray) -> np.ndarray:
    """A fresh C-ordered, aligned copy (``np.ascontiguousarray`` keeps unaligned views)."""
    return np.array(array, order="C", copy=True)


def require_plan(arrays: list[np.ndarray], axis: int) -> Plan:
    """:func:`plan_layout` for arrays that are fresh copies or allocations: never None."""
    plan = plan_layout(arrays, axis)
    if plan is None:
        shapes = [(a.shape, a.strides) for a in arrays]
        raise RuntimeError(f"fastsce: no kernel layout for arrays {shapes} along axis {axis}")
    return plan
