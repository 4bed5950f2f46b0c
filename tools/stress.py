"""Soak test: random calls of every public fastsce function against the float64 references.

For ``--seconds`` seconds, ``--threads`` Python threads each draw random cases (shapes
with few, many or very many classes, 1-4 dimensions, any axis; C, Fortran, strided,
negative-stride, transposed and read-only layouts; float32, float64, float16, bfloat16
(when ml_dtypes is installed) and integer inputs;
``out=`` arrays, in-place calls; every cross-entropy option) and compare the result with
``tests/reference.py`` within the tolerances of design.md §4 (losses and gradients as
tests/test_loss.py bounds them). Inputs must come back unchanged unless the call was
asked to write into them.

Prints ``stress: N checks, M failures`` and exits with status 1 if any check failed.
Every case is reproducible from its ``seed:thread:iteration`` label::

    python tools/stress.py --seconds 60 --threads 4
    python tools/stress.py --replay 12345:2:417
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fastsce
from tests import reference as ref

F32, F64, F16 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)
# design.md §4 (conftest.py applies the same bounds)
LINEAR_RTOL = {F32: 4e-6, F64: 1e-13}
LINEAR_FLOOR = {F32: 1e-30, F64: 1e-290}
LINEAR_ATOL = {F32: 1e-30, F64: 1e-300}
LOG_TOL = {F32: 4e-6, F64: 1e-13}
SCALED_RTOL = {F32: 1e-5, F64: 1e-13}
JAC_RTOL = {F32: 1e-5, F64: 2.5e-13}
# tests/test_loss.py
LOSS_RTOL = {F32: 1e-6, F64: 1e-12}
GRAD_RTOL = {F32: 4e-6, F64: 1e-12}
# 16-bit data are computed in float32 and rounded once to their dtype, "within 1 ulp"
# (README, "16-bit data"): the float32 bound plus one ulp (2u, u the unit roundoff) of
# the 16-bit format, and one subnormal spacing below its smallest normal number.
# Reductions to a Python float ("mean", "sum") are not rounded to 16 bits.
SIXTEEN_BIT = [(F16, 2.0**-11, 6.2e-5, 2.0**-24)]
try:
    import ml_dtypes

    SIXTEEN_BIT.append((np.dtype(ml_dtypes.bfloat16), 2.0**-8, 1.2e-38, 2.0**-133))
except ImportError:  # bfloat16 is optional
    pass
for _dtype, _u, _floor, _atol in SIXTEEN_BIT:
    LINEAR_RTOL[_dtype] = LOG_TOL[_dtype] = 2 * _u + LINEAR_RTOL[F32]
    LINEAR_FLOOR[_dtype], LINEAR_ATOL[_dtype] = _floor, _atol
    SCALED_RTOL[_dtype] = JAC_RTOL[_dtype] = GRAD_RTOL[_dtype] = 2 * _u + SCALED_RTOL[F32]
    LOSS_RTOL[_dtype] = LOSS_RTOL[F32]  # reduced losses
REDUCED_LOSS_RTOL_NONE = {d: 2 * u + LOSS_RTOL[F32] for d, u, _, _ in SIXTEEN_BIT}

SOFTMAX_FAMILY = (
    "softmax",
    "log_softmax",
    "logsumexp",
    "softmax_backward",
    "log_softmax_backward",
    "softmax_jacobian",
)
LOSSES = ("cross_entropy", "cross_entropy_with_grad", "nll_loss")
WITH_OUT = ("softmax", "log_softmax", "logsumexp", "softmax_backward", "log_softmax_backward")


class CheckFailed(AssertionError):
    pass


# ------------------------------------------------------------------ comparisons ----
def _special(got, want, dtype, what):
    with np.errstate(invalid="ignore", over="ignore"):
        return _special_checked(got, want, dtype, what)


def _special_checked(got, want, dtype, what):
    got = np.asarray(got)
    want = np.asarray(want, np.float64)
    if got.dtype != dtype:
        raise CheckFailed(f"{what}: dtype {got.dtype}, expected {dtype}")
    if got.shape != want.shape:
        raise CheckFailed(f"{what}: shape {got.shape}, expected {want.shape}")
    g64 = got.astype(np.float64)
    with np.errstate(over="ignore"):
        want_rounded = want.astype(dtype).astype(np.float64)
    nan = np.isnan(want)
    if not np.array_equal(np.isnan(g64), nan):
        raise CheckFailed(f"{what}: NaN at {np.argwhere(np.isnan(g64) != nan)[:3].tolist()}")
    inf = np.isinf(want_rounded) | np.isinf(g64)
    if np.any(inf & ~nan & (g64 != want_rounded)):
        raise CheckFailed(
            f"{what}: infinities differ at {np.argwhere(inf & ~nan & (g64 != want_rounded))[:3].tolist()}"
        )
    return g64, want, ~nan & ~inf


def _bound_check(err, bound, what, g64, want):
    with np.errstate(invalid="ignore"):
        bad = err > bound
    if np.any(bad):
        k = tuple(np.argwhere(bad)[0])
        raise CheckFailed(
            f"{what}: {int(bad.sum())} entries out of bound, first at {k}: got {g64[k]!r}, "
            f"want {want[k]!r}, err {err[k]:.3g} > {bound[k]:.3g}"
        )


def close_linear(got, want, dtype, what):
    g64, want, ok = _special(got, want, dtype, what)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(ok, np.abs(g64 - want), 0.0)
    bound = np.where(
        np.abs(want) >= LINEAR_FLOOR[dtype], LINEAR_RTOL[dtype] * np.abs(want), LINEAR_ATOL[dtype]
    )
    _bound_check(err, bound, what, g64, want)


def close_log(got, want, dtype, what):
    g64, want, ok = _special(got, want, dtype, what)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(ok, np.abs(g64 - want), 0.0)
    bound = LOG_TOL[dtype] * (1.0 + np.abs(np.where(ok, want, 0.0)))
    _bound_check(err, bound, what, g64, want)


def close_scaled(got, want, scale, dtype, rtol, what):
    g64, want, ok = _special(got, want, dtype, what)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(ok, np.abs(g64 - want), 0.0)
    bound = rtol * np.asarray(scale, np.float64) + LINEAR_ATOL[dtype]
    _bound_check(err, bound, what, g64, want)


def close_loss(got, want, cond, dtype, reduction, what="loss"):
    if reduction == "none":
        g64, want, ok = _special(got, want, dtype, what)
        with np.errstate(invalid="ignore", over="ignore"):
            err = np.where(ok, np.abs(g64 - want), 0.0)
        rtol = REDUCED_LOSS_RTOL_NONE.get(dtype, LOSS_RTOL[dtype])
        _bound_check(err, rtol * np.asarray(cond) + LINEAR_ATOL[dtype], what, g64, want)
        return
    if type(got) is not float:
        raise CheckFailed(f"{what}: {type(got).__name__}, expected a Python float")
    if math.isnan(want) or math.isinf(want):
        if not (got == want or (math.isnan(got) and math.isnan(want))):
            raise CheckFailed(f"{what}: got {got!r}, want {want!r}")
    elif abs(got - want) > LOSS_RTOL[dtype] * cond:
        raise CheckFailed(
            f"{what}: got {got!r}, want {want!r}, err {abs(got - want):.3g} > {LOSS_RTOL[dtype] * cond:.3g}"
        )


def close_grad(got, want, scale, dtype, what="grad"):
    """``|err| <= rtol · scale``, ``scale`` the largest term of the row's gradient formula
    (tests/test_loss.py bounds by the largest gradient entry, which fails for float32
    rows whose gradient is all ~1e-13: 1 - s_t is then 0 in float32)."""
    g64, want, ok = _special(got, want, dtype, what)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(np.where(ok, g64 - want, 0.0))
    _bound_check(
        err, GRAD_RTOL[dtype] * np.broadcast_to(scale, err.shape) + LINEAR_ATOL[dtype], what, g64, want
    )


def grad_scale(x, t, weight, ignore_index, reduction, eps, z, axis, grad_output):
    """Per row (broadcast along ``axis``): the magnitude of the largest term of the
    gradient ``g/D·(s·a - b) + g/Dz·2λ·lse·s`` (see tests/reference.py)."""
    xr, tr, wr, soft, loss_shape = ref._xent_rows(x, t, weight, axis)
    n, c = xr.shape
    counted, d, dz = ref._xent_denominators(tr, wr, soft, ignore_index, reduction)
    g = (
        np.abs(np.broadcast_to(np.asarray(grad_output, np.float64), loss_shape).reshape(-1))
        if n
        else np.zeros(0)
    )
    lse = np.abs(ref.logsumexp(xr, -1)) if n else np.zeros(0)
    if soft:
        v = wr * ((1 - eps) * tr + eps / c)
        terms = np.sum(v, axis=-1) + np.max(v, axis=-1)
    else:
        safe = np.where(counted, tr, 0)
        terms = (1 - eps) * wr[safe] + eps / c * np.sum(wr) + eps / c * np.max(wr)
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = g / d * terms + (g / dz * 2 * z * lse if z else 0.0)
    rows = np.where(counted, rows, 0.0)
    return np.moveaxis(rows.reshape(loss_shape + (1,)), -1, axis % np.ndim(x))


def loss_condition(x, t, weight, ignore_index, reduction, eps, z, axis):
    """Σ magnitudes of the loss terms, ``1 + |lse| + |x_c|`` for each ``lse - x_c``
    (tests/test_loss.py's bound, vectorized)."""
    xr, tr, wr, soft, loss_shape = ref._xent_rows(x, t, weight, axis)
    n, c = xr.shape
    counted, d, dz = ref._xent_denominators(tr, wr, soft, ignore_index, reduction)
    lse = np.abs(ref.logsumexp(xr, -1)) if n else np.zeros(0)
    terms = 1.0 + lse[:, None] + np.abs(xr)
    with np.errstate(invalid="ignore"):
        if soft:
            ce = np.sum(wr * ((1 - eps) * tr + eps / c) * terms, axis=-1)
        else:
            safe = np.where(counted, tr, 0)
            ce = (1 - eps) * wr[safe] * terms[np.arange(n), safe]
            if eps:
                ce = ce + eps / c * np.sum(wr * terms, axis=-1)
            ce = np.where(counted, ce, 0.0)
        zz = np.where(counted, z * (1.0 + lse) ** 2, 0.0) if z else np.zeros(n)
    if reduction == "none":
        return (ce + zz).reshape(loss_shape)
    if reduction == "sum":
        return float(np.sum(ce) + np.sum(zz))
    return float(np.sum(ce) / d + (np.sum(zz) / dz if z else 0.0)) if d else math.nan


# ----------------------------------------------------------------- random cases ----
@dataclass
class Case:
    label: str
    function: str
    description: dict = field(default_factory=dict)


def _random_shape(rng, max_elements, class_range):
    ndim = int(rng.integers(1, 5))
    axis = int(rng.integers(-ndim, ndim))
    c = int(rng.integers(*class_range))
    shape = [1] * ndim
    shape[axis] = c
    budget = max(1, max_elements // max(c, 1))
    for a in range(ndim):
        if a != axis % ndim:
            shape[a] = int(rng.integers(1, max(2, min(budget, 64) + 1)))
            budget = max(1, budget // shape[a])
    return tuple(shape), axis


def _layout(rng, x):
    """``x``'s values in a random memory layout (a view of a fresh buffer)."""
    kind = rng.choice(["C", "F", "strided", "reversed", "permuted", "readonly"])
    if x.ndim == 0:
        return np.array(x), "0-d"
    if kind == "F":
        y = np.asfortranarray(x)
    elif kind == "strided":
        a = int(rng.integers(0, x.ndim))
        shape = list(x.shape)
        shape[a] *= 2
        # gaps hold NaN (logits) or -7 (targets): reading one shows in the result
        fill = np.iinfo(x.dtype).max if x.dtype.kind == "u" else -7 if x.dtype.kind in "ib" else np.nan
        big = np.full(shape, fill, x.dtype)
        index = [slice(None)] * x.ndim
        index[a] = slice(None, None, 2)
        y = big[tuple(index)]
        y[...] = x
    elif kind == "reversed":
        flips = tuple(slice(None, None, -1) if rng.random() < 0.6 else slice(None) for _ in range(x.ndim))
        y = np.array(x[flips])[flips]
    elif kind == "permuted":
        perm = rng.permutation(x.ndim)
        y = np.ascontiguousarray(x.transpose(perm)).transpose(np.argsort(perm))
    else:
        y = np.array(x)
    if kind == "readonly" or rng.random() < 0.2:
        y.flags.writeable = False
    return y, str(kind)


def _logits(rng, shape, dtype, allow_inf):
    scale = float(rng.choice([0.1, 1.0, 3.0, 30.0, 300.0]))
    x = scale * rng.standard_normal(shape)
    if rng.random() < 0.2:
        x += float(rng.choice([-1e4, 1e4, 80.0, -700.0]))
    if allow_inf and rng.random() < 0.2:
        x[rng.random(shape) < 0.1] = -np.inf
    if np.dtype(dtype).kind in "iub":
        return np.clip(np.round(x), -50, 50).astype(dtype)
    return x.astype(dtype)


def _draw_shape(rng, function, max_elements):
    kind = rng.choice(["small", "medium", "large"], p=[0.4, 0.4, 0.2])
    if function == "softmax_jacobian":
        return _random_shape(rng, 4000, (1, 40))
    if function in LOSSES:
        max_elements = min(max_elements, 60_000)
    class_range = {"small": (1, 17), "medium": (17, 400), "large": (1000, 20_000)}[kind]
    return _random_shape(rng, max_elements, class_range)


def run_case(seed: int, thread: int, iteration: int, max_elements: int) -> Case:
    """Draw case ``seed:thread:iteration`` and check it; raises on a failed check."""
    rng = np.random.default_rng([seed, thread, iteration])
    function = str(
        rng.choice(SOFTMAX_FAMILY + LOSSES, p=[0.13, 0.12, 0.1, 0.08, 0.08, 0.04, 0.15, 0.22, 0.08])
    )
    case = Case(f"{seed}:{thread}:{iteration}", function)
    shape, axis = _draw_shape(rng, function, max_elements)
    dtype = np.dtype(rng.choice([np.float32, np.float64]))
    if rng.random() < 0.15:
        dtype = SIXTEEN_BIT[int(rng.integers(0, len(SIXTEEN_BIT)))][0]
    elif function in SOFTMAX_FAMILY and rng.random() < 0.05:
        dtype = np.dtype(rng.choice([np.int32, np.int8, np.bool_]))
    case.description.update(shape=shape, axis=axis, dtype=dtype.name)
    if function in SOFTMAX_FAMILY:
        _check_softmax_family(rng, case, shape, axis, dtype)
    else:
        _check_loss(rng, case, shape, axis, dtype)
    return case


def _check_softmax_family(rng, case, shape, axis, dtype):
    function = case.function
    compute = F64 if dtype.kind in "iub" else dtype
    x = _logits(rng, shape, dtype, allow_inf=function in ("softmax", "log_softmax", "logsumexp"))
    args = [x]
    if function == "softmax_backward":
        args = [
            _logits(rng, shape, dtype, False),
            ref.softmax(_logits(rng, shape, F64, False), axis).astype(compute),
        ]
    elif function == "log_softmax_backward":
        args = [
            _logits(rng, shape, dtype, False),
            ref.log_softmax(_logits(rng, shape, F64, False), axis).astype(compute),
        ]
    values = [np.array(a) for a in args]
    laid = []
    for a in args:
        view, kind = _layout(rng, a)
        laid.append(view)
        case.description.setdefault("layouts", []).append(kind)
    kwargs = {"axis": axis}
    out = None
    mode = rng.random()
    if function in WITH_OUT and mode < 0.25:
        want_shape = (
            shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :] if function == "logsumexp" else shape
        )
        out, kind = _layout(rng, np.zeros(want_shape, compute))
        if not out.flags.writeable:
            out = np.array(out)
        kwargs["out"] = out
        case.description["out"] = kind
    elif function in ("softmax", "log_softmax") and mode < 0.35 and compute == dtype:
        laid[0] = np.array(laid[0], order=rng.choice(["C", "F"]))
        kwargs["out"] = out = laid[0]
        case.description["out"] = "the input itself"
    elif function == "logsumexp" and mode < 0.45:
        kwargs["keepdims"] = True
        case.description["keepdims"] = True
    before = [np.array(a) for a in laid]
    got = getattr(fastsce, function)(*laid, **kwargs)
    if out is not None and got is not out:
        raise CheckFailed("the result is not the out= array")
    a = axis
    if function == "softmax":
        close_linear(got, ref.softmax(values[0], a), compute, "softmax")
    elif function == "log_softmax":
        close_log(got, ref.log_softmax(values[0], a), compute, "log_softmax")
    elif function == "logsumexp":
        want = ref.logsumexp(values[0], a, keepdims=kwargs.get("keepdims", False))
        if np.ndim(want) == 0 and out is None:
            if type(got) is not float:
                raise CheckFailed(f"logsumexp of 1-D input returned {type(got).__name__}, not float")
            got = np.asarray(got, compute)
        close_log(got, want, compute, "logsumexp")
    elif function == "softmax_backward":
        g, s = (v.astype(np.float64) for v in values)
        scale = np.abs(s) * (np.abs(g) + np.sum(np.abs(g * s), axis=a, keepdims=True))
        close_scaled(got, ref.softmax_backward(g, s, a), scale, compute, SCALED_RTOL[compute], function)
    elif function == "log_softmax_backward":
        g, ls = (v.astype(np.float64) for v in values)
        with np.errstate(over="ignore"):
            scale = np.abs(g) + np.exp(ls) * np.sum(np.abs(g), axis=a, keepdims=True)
        close_scaled(got, ref.log_softmax_backward(g, ls, a), scale, compute, SCALED_RTOL[compute], function)
    else:
        s = np.moveaxis(ref.softmax(values[0], a), a, -1)
        scale = s[..., :, None] * (np.eye(s.shape[-1]) + s[..., None, :])
        close_scaled(got, ref.softmax_jacobian(values[0], a), scale, compute, JAC_RTOL[compute], function)
    for k, (arr, was) in enumerate(zip(laid, before)):
        if arr is not out and not np.array_equal(arr, was, equal_nan=True):
            raise CheckFailed(f"input {k} was modified")


def _check_loss(rng, case, shape, axis, dtype):
    function = case.function
    a = axis % len(shape)
    c = shape[a]
    loss_shape = shape[:a] + shape[a + 1 :]
    x = _logits(rng, shape, dtype, allow_inf=False)
    soft = function != "nll_loss" and rng.random() < 0.3
    options = {}
    if soft:
        p = rng.random(shape) ** 3
        target = (p / p.sum(axis=a, keepdims=True)).astype(dtype)
    else:
        target = rng.integers(0, c, size=loss_shape).astype(
            rng.choice([np.int64, np.int32, np.uint8 if c < 256 else np.int64])
        )
        if rng.random() < 0.4:
            ignore_index = int(rng.choice([-100, -1, c + 3]))
            if target.dtype.kind == "u" and ignore_index < 0:
                target = target.astype(np.int64)
            mask = rng.random(loss_shape) < 0.3
            target = np.where(mask, ignore_index, target).astype(target.dtype)
            if ignore_index != -100:
                options["ignore_index"] = ignore_index
    if function == "nll_loss":
        x = ref.log_softmax(x, a).astype(dtype)
    # tests/reference.py tells probabilities by dtype kind "f"; bfloat16's kind is "V"
    target_ref = target.astype(np.float64) if soft else target
    if rng.random() < 0.3:
        options["weight"] = rng.uniform(0.1, 3.0, c).astype(rng.choice([np.float32, np.float64]))
    options["reduction"] = str(rng.choice(["mean", "sum", "none"]))
    if function != "nll_loss":
        if rng.random() < 0.4:
            options["label_smoothing"] = float(rng.choice([0.1, rng.random()]))
        if rng.random() < 0.3:
            options["z_loss"] = float(rng.choice([1e-4, 1e-2, rng.random()]))
    kwargs = dict(options, axis=axis)
    extras = []
    if function != "nll_loss":
        for extra in ("return_lse", "return_argmax"):
            if rng.random() < 0.2:
                kwargs[extra] = True
                extras.append(extra)
    inplace = out = None
    laid_x, kind = _layout(rng, x)
    laid_t, t_kind = _layout(rng, target)
    case.description.update(
        layout=kind, target_layout=t_kind, soft=soft, options=dict(options), extras=extras
    )
    if function == "cross_entropy_with_grad":
        if options["reduction"] == "none" and rng.random() < 0.5:
            kwargs["grad_output"] = rng.uniform(0.5, 2.0, loss_shape)
        elif rng.random() < 0.5:
            kwargs["grad_output"] = float(rng.uniform(0.1, 3.0))
        mode = rng.random()
        if mode < 0.3:
            laid_x = np.array(laid_x, order=rng.choice(["C", "F"]))
            kwargs["inplace"] = inplace = True
        elif mode < 0.5:
            out, o_kind = _layout(rng, np.zeros(shape, dtype))
            if not out.flags.writeable:
                out = np.array(out)
            kwargs["out"] = out
            case.description["out"] = o_kind
        case.description["mode"] = "inplace" if inplace else "out" if out is not None else "new"
    x_before, t_before = np.array(laid_x), np.array(laid_t)
    got = getattr(fastsce, function)(laid_x, laid_t, **kwargs)
    results = list(got) if isinstance(got, tuple) else [got]
    loss = results.pop(0)
    ref_options = dict(options)
    want = (ref.nll_loss_ref if function == "nll_loss" else ref.cross_entropy_ref)(
        x, target_ref, axis=axis, **ref_options
    )
    cond = loss_condition(
        x,
        target_ref,
        options.get("weight"),
        options.get("ignore_index", -100),
        options["reduction"],
        options.get("label_smoothing", 0.0),
        options.get("z_loss", 0.0),
        axis,
    )
    close_loss(loss, want, cond, dtype, options["reduction"])
    if function == "cross_entropy_with_grad":
        grad = results.pop(0)
        want_grad = ref.cross_entropy_grad_ref(
            x, target_ref, axis=axis, grad_output=kwargs.get("grad_output", 1.0), **ref_options
        )
        scale = grad_scale(
            x,
            target_ref,
            options.get("weight"),
            options.get("ignore_index", -100),
            options["reduction"],
            options.get("label_smoothing", 0.0),
            options.get("z_loss", 0.0),
            axis,
            kwargs.get("grad_output", 1.0),
        )
        close_grad(grad, want_grad, scale, dtype)
        if inplace and grad is not laid_x:
            raise CheckFailed("inplace=True did not return the logits array")
        if out is not None and grad is not out:
            raise CheckFailed("the gradient is not the out= array")
    if "return_lse" in extras:
        lse = results.pop(0)
        close_log(lse, ref.logsumexp(x, axis), dtype, "lse")
    if "return_argmax" in extras:
        argmax = np.asarray(results.pop(0))
        want_argmax = np.argmax(np.moveaxis(x, axis, -1), axis=-1)
        if argmax.shape != want_argmax.shape or argmax.dtype != np.int64:
            raise CheckFailed(
                f"argmax: shape {argmax.shape} dtype {argmax.dtype}, expected {want_argmax.shape} int64"
            )
        if not np.array_equal(argmax, want_argmax):
            raise CheckFailed(f"argmax differs at {np.argwhere(argmax != want_argmax)[:3].tolist()}")
    if not inplace and not np.array_equal(laid_x, x_before, equal_nan=True):
        raise CheckFailed("logits were modified")
    if not np.array_equal(laid_t, t_before, equal_nan=True):
        raise CheckFailed("target was modified")


# ------------------------------------------------------------------------ driver ----
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60)")
    parser.add_argument("--threads", type=int, default=4, help="Python threads calling fastsce (default 4)")
    parser.add_argument("--seed", type=int, default=None, help="base seed (default: from the clock)")
    parser.add_argument("--max-elements", type=int, default=200_000, help="largest array (default 200000)")
    parser.add_argument("--replay", help="run the single case SEED:THREAD:ITERATION and show it")
    parser.add_argument("--show", type=int, default=10, help="failures to print in full (default 10)")
    args = parser.parse_args(argv)

    if args.replay:
        seed, thread, iteration = (int(v) for v in args.replay.split(":"))
        try:
            case = run_case(seed, thread, iteration, args.max_elements)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            print("stress: 1 checks, 1 failures")
            return 1
        print(f"{case.label} {case.function} {case.description}: ok")
        print("stress: 1 checks, 0 failures")
        return 0

    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    deadline = time.monotonic() + args.seconds
    lock = threading.Lock()
    counts = {"checks": 0}
    failures: list[str] = []

    def worker(thread: int) -> None:
        iteration = 0
        while time.monotonic() < deadline:
            label = f"{seed}:{thread}:{iteration}"
            try:
                run_case(seed, thread, iteration, args.max_elements)
                failure = None
            except Exception as exc:  # noqa: BLE001 - every failure is reported
                failure = f"{label}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
            with lock:
                counts["checks"] += 1
                if failure:
                    failures.append(failure)
            iteration += 1

    workers = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(args.threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(args.seconds + 600)
    stuck = [w for w in workers if w.is_alive()]
    for failure in failures[: args.show]:
        print(failure, file=sys.stderr)
    if failures:
        print(
            f"replay one with: python tools/stress.py --replay SEED:THREAD:ITERATION (seed {seed})",
            file=sys.stderr,
        )
    if stuck:
        print(f"stress: {len(stuck)} threads did not finish (deadlock?)", file=sys.stderr)
    print(f"stress: {counts['checks']} checks, {len(failures) + len(stuck)} failures")
    sys.stdout.flush()
    return 1 if failures or stuck else 0


if __name__ == "__main__":
    sys.exit(main())
