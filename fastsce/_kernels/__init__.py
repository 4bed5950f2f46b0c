"""Numba kernels, one module per family. Private: the public wrappers call :func:`launch`."""

from __future__ import annotations

from typing import Any

import numba

from .._config import kernel_lock, launch_gate, serial_only

_serial_builds: dict[Any, Any] = {}


def _serial_build(kernel):
    """The same kernel source compiled without ``parallel`` (for forked OpenMP children).

    Not cached on disk: Numba's cache index does not tell parallel from serial builds
    of one function apart.
    """
    build = _serial_builds.get(kernel)
    if build is None:
        options = {**kernel.targetoptions, "parallel": False, "cache": False}
        options.pop("nopython", None)  # implied by njit
        build = _serial_builds[kernel] = numba.njit(**options)(kernel.py_func)
    return build


def launch(kernel, *args):
    """Run ``kernel(*args)`` safely under the active threading layer."""
    with launch_gate:
        if serial_only():
            return _serial_build(kernel)(*args)
        with kernel_lock():
            return kernel(*args)
