"""PyTorch adapter: ``torch.nn.functional``-compatible losses on fastsce's fused CPU kernels.

Import it explicitly (``import fastsce`` never imports torch)::

    import fastsce.torch as fst

    loss = fst.cross_entropy(logits, target, label_smoothing=0.1)   # as F.cross_entropy
    loss.backward()
    criterion = fst.CrossEntropyLoss(ignore_index=0)                 # as nn.CrossEntropyLoss

What it does, and does not do:

* ``cross_entropy``, ``softmax``, ``log_softmax`` and ``CrossEntropyLoss`` take PyTorch's
  signatures and semantics: class dimension 1 for ``(N, C, d1, ...)`` inputs, ``(C,)``
  unbatched input, class-index or class-probability targets, ``weight``,
  ``ignore_index``, ``reduction``, ``label_smoothing`` and the legacy ``size_average`` /
  ``reduce``.
* Each is a ``torch.autograd.Function``. The cross-entropy forward runs the fused kernel
  ``fastsce.cross_entropy_with_grad`` with ``grad_output=1``, so the gradient of the loss
  (of each row's loss, for ``reduction="none"``) is computed in the same pass over the
  logits and saved; the backward only scales it by ``grad_output`` (nothing at all when
  ``grad_output`` is 1, the usual ``loss.backward()``). When no input requires a
  gradient, or grad mode is off, the loss-only kernel runs and nothing is saved.
  Gradients with respect to class-probability targets and ``weight`` are supported
  too (computed in the backward from ``log_softmax``), as in torch.
* CPU tensors are shared with NumPy without copies, whatever their strides
  (``tensor.detach().numpy()``; results come back through ``torch.from_numpy``).
* float32 and float64 compute in their own precision. float16 and bfloat16 tensors are
  handed over as 16-bit arrays (bfloat16 through a uint16 view as ``ml_dtypes.bfloat16``),
  computed in float32 by the kernels and written back in 16 bits, with no copy.
  Without ``ml_dtypes`` installed, bfloat16 tensors are upcast to float32 (a copy) and
  the results cast back.
* Tensors on any other device (CUDA, MPS, meta, ...) fall back to torch's own function,
  with a one-time warning per device type.
* Backward passes are ``once_differentiable``: no double backward. Not traceable by
  ``torch.compile`` / TorchScript / functorch transforms (they see an opaque Function).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn import _reduction

from .loss import cross_entropy as _np_cross_entropy
from .loss import cross_entropy_with_grad as _np_cross_entropy_with_grad
from .softmax import log_softmax as _np_log_softmax
from .softmax import log_softmax_backward as _np_log_softmax_backward
from .softmax import softmax as _np_softmax
from .softmax import softmax_backward as _np_softmax_backward

__all__ = ["CrossEntropyLoss", "cross_entropy", "log_softmax", "softmax"]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_warned_devices: set[str] = set()


@functools.cache
def _numpy_bfloat16() -> np.dtype | None:
    """``ml_dtypes.bfloat16`` if installed (fastsce reads it as 16 bits), else None."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


# ------------------------------------------------------------------ helpers ----
def _fallback_device(*tensors: torch.Tensor | None) -> torch.device | None:
    """The first non-CPU device among ``tensors``, or None if all are on the CPU."""
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            return t.device
    return None


def _warn_fallback(name: str, device: torch.device, stacklevel: int = 3) -> None:
    """Warn once per device type that torch's own function is used there."""
    if device.type in _warned_devices:
        return
    _warned_devices.add(device.type)
    warnings.warn(
        f"fastsce.torch.{name}: tensors on device {device.type!r} are computed by torch's own "
        f"functions; fastsce runs on CPU tensors only (this warning is shown once per device type)",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def _as_array(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor: no copy, any strides, bfloat16 as ``ml_dtypes.bfloat16``."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        bfloat16 = _numpy_bfloat16()
        if bfloat16 is None:
            return t.float().numpy()  # no ml_dtypes: a float32 copy
        return t.view(torch.int16).numpy().view(bfloat16)
    return t.numpy()


def _as_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor sharing ``a``'s memory, cast to ``dtype`` only when it differs."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(dtype)
    return torch.from_numpy(a).to(dtype)


def _check_float(t: torch.Tensor, name: str, what: str) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"fastsce.torch.{name}: {what} must be a floating-point tensor, got {t.dtype}")


def _normalize_dim(dim: Any, ndim: int) -> int:
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-rank}, {rank - 1}], but got {dim})"
        )
    return dim % rank


# ------------------------------------------------------------ softmax family ----
class _SoftmaxFunction(torch.autograd.Function):
    """softmax along ``dim``; the backward is ``fastsce.softmax_backward`` of the saved output."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, dim: int) -> torch.Tensor:
        output = _as_tensor(_np_softmax(_as_array(input), dim), input.dtype)
        ctx.dim = dim
        ctx.save_for_backward(output)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (output,) = ctx.saved_tensors
        grad = _np_softmax_backward(_as_array(grad_output), _as_array(output), ctx.dim)
        return _as_tensor(grad, output.dtype), None


class _LogSoftmaxFunction(torch.autograd.Function):
    """log_softmax along ``dim``; the backward is ``fastsce.log_softmax_backward``."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, dim: int) -> torch.Tensor:
        output = _as_tensor(_np_log_softmax(_as_array(input), dim), input.dtype)
        ctx.dim = dim
        ctx.save_for_backward(output)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (output,) = ctx.saved_tensors
        grad = _np_log_softmax_backward(_as_array(grad_output), _as_array(output), ctx.dim)
        return _as_tensor(grad, output.dtype), None


def _softmax_like(
    name: str,
    function: type[torch.autograd.Function],
    torch_function: Any,
    input: torch.Tensor,
    dim: int | None,
    stacklevel: int,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    if dim is None:
        dim = F._get_softmax_dim(name, input.dim(), stacklevel + 1)
    device = _fallback_device(input)
    if device is not None:
        _warn_fallback(name, device, stacklevel=4)
        return torch_function(input, dim, dtype=dtype)
    if dtype is not None:
        input = input.to(dtype)  # as torch: cast first, so the gradient flows back through the cast
    _check_float(input, name, "input")
    dim = _normalize_dim(dim, input.dim())
    if input.dim() == 0:
        return function.apply(input.reshape(1), 0).reshape(())
    return function.apply(input, dim)


def softmax(
    input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Softmax along ``dim``, as ``torch.nn.functional.softmax``, on fastsce's kernels.

    Parameters
    ----------
    input : Tensor
        float32, float64, float16 or bfloat16 (16-bit data are computed in float32).
    dim : int
        The class dimension. ``None`` picks it as torch's deprecated implicit rule does.
    dtype : torch.dtype, optional
        Cast ``input`` to it before computing (torch's semantics).

    Returns
    -------
    Tensor
        Probabilities, differentiable (backward by ``fastsce.softmax_backward``).
    """
    return _softmax_like("softmax", _SoftmaxFunction, F.softmax, input, dim, _stacklevel, dtype)


def log_softmax(
    input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Log-softmax along ``dim``, as ``torch.nn.functional.log_softmax``; see :func:`softmax`."""
    return _softmax_like("log_softmax", _LogSoftmaxFunction, F.log_softmax, input, dim, _stacklevel, dtype)


# ------------------------------------------------------------- cross-entropy ----
class _CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy whose forward also computes d loss / d input (fused) and saves it.

    For ``reduction="none"`` the saved gradient is that of each row's own loss (rows are
    independent), so the backward multiplies it by ``grad_output`` broadcast along the
    class dimension; for "mean" and "sum" by the scalar ``grad_output``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
        dim: int,
    ) -> torch.Tensor:
        logits = _as_array(input)
        options = {
            "weight": None if weight is None else _as_array(weight),
            "ignore_index": ignore_index,
            "reduction": reduction,
            "label_smoothing": label_smoothing,
            "axis": dim,
        }
        labels = _as_array(target)
        loss_shape = (
            target.shape if not target.is_floating_point() else input.shape[:dim] + input.shape[dim + 1 :]
        )
        ctx.dim, ctx.reduction, ctx.label_smoothing = dim, reduction, label_smoothing
        saved: list[torch.Tensor | None] = [None, None, None, None]
        if ctx.needs_input_grad[0]:
            loss, grad = _np_cross_entropy_with_grad(logits, labels, **options)
            saved[0] = _as_tensor(grad, input.dtype)
        else:
            loss = _np_cross_entropy(logits, labels, **options)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:  # probability targets only
            saved[1:] = [input, target, weight]
        ctx.save_for_backward(*saved)
        return _loss_tensor(loss, loss_shape, input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad, input, target, weight = ctx.saved_tensors
        dim, reduction = ctx.dim, ctx.reduction
        grad_input = grad_target = grad_weight = None
        if grad is not None:
            if reduction == "none":
                grad_input = grad * grad_output.unsqueeze(dim)
            elif grad_output.numel() == 1 and grad_output.item() == 1.0:
                grad_input = grad  # loss.backward(): the saved gradient is the answer
            else:
                grad_input = grad * grad_output
        if input is not None:
            grad_target, grad_weight = _probability_target_grads(
                input, target, weight, grad_output, dim, reduction, ctx.label_smoothing, ctx.needs_input_grad
            )
        return grad_input, grad_target, grad_weight, None, None, None, None


def _loss_tensor(loss: Any, loss_shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(loss, np.ndarray):
        return _as_tensor(loss, dtype).reshape(loss_shape)
    return torch.tensor(loss, dtype=dtype)


def _probability_target_grads(
    input, target, weight, grad_output, dim, reduction, label_smoothing, needs_input_grad
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """d loss / d target and d loss / d weight for class-probability targets.

    Per row, ``loss = -Σ_c w_c ỹ_c ls_c`` with ``ỹ = (1-ε) y + ε/C`` and ``ls`` the
    log-softmax, so ``d/dy_c = -(1-ε) w_c ls_c`` and ``d/dw_c = -ỹ_c ls_c``, times
    ``grad_output`` (per row for "none") over the number of rows for "mean".
    """
    with torch.no_grad():
        half = input.dtype in (torch.float16, torch.bfloat16)  # computed in float32
        log_probs = _as_tensor(
            _np_log_softmax(_as_array(input), dim, dtype=np.float32 if half else None),
            torch.float32 if half else input.dtype,
        )
        n_classes = input.shape[dim]
        if reduction == "none":
            scale = grad_output.to(log_probs.dtype).unsqueeze(dim)
        else:
            n_rows = input.numel() // max(n_classes, 1)
            scale = grad_output.to(log_probs.dtype) / (n_rows if reduction == "mean" else 1)
        broadcast = [1] * input.dim()
        broadcast[dim] = n_classes
        w = 1.0 if weight is None else weight.detach().to(log_probs.dtype).reshape(broadcast)
        grad_target = grad_weight = None
        if needs_input_grad[1]:
            grad_target = (-(1.0 - label_smoothing) * w * log_probs * scale).to(target.dtype)
        if needs_input_grad[2]:
            smoothed = (1.0 - label_smoothing) * target.detach().to(
                log_probs.dtype
            ) + label_smoothing / n_classes
            other_dims = [d for d in range(input.dim()) if d != dim]
            grad_weight = (-(smoothed * log_probs * scale)).sum(dim=other_dims).to(weight.dtype)
        return grad_target, grad_weight


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy between ``input`` logits and ``target``, as ``torch.nn.functional.cross_entropy``.

    Parameters
    ----------
    input : Tensor
        Logits: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``; the classes are dimension 1
        (dimension 0 for unbatched input).
    target : Tensor
        Class indices (int64 or uint8, shaped like ``input`` without the class dimension)
        or class probabilities (floating point, shaped like ``input``).
    weight : Tensor, optional
        A rescaling weight per class, of shape ``(C,)``.
    size_average, reduce : bool, optional
        Deprecated; mapped to ``reduction`` as torch does.
    ignore_index : int, default -100
        Target value that contributes neither loss nor gradient (class indices only).
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" divides by ``Σ weight[target]`` over non-ignored rows (by the number of
        rows for probability targets).
    label_smoothing : float in [0, 1], default 0.0
        Mixes the target with the uniform distribution: ``(1-ε)·y + ε/C``.

    Returns
    -------
    Tensor
        A scalar for "mean" and "sum", the per-row losses for "none", in ``input``'s dtype.

    Raises
    ------
    ValueError
        A class index outside ``[0, C)`` that is not ``ignore_index`` (torch raises
        IndexError), ``ignore_index`` other than -100 with probability targets (torch
        raises RuntimeError), mismatched shapes, a bad option.
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    device = _fallback_device(input, target, weight)
    if device is not None:
        _warn_fallback("cross_entropy", device)
        return F.cross_entropy(
            input,
            target,
            weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
    _check_float(input, "cross_entropy", "input")
    if input.dim() == 0:
        raise ValueError("fastsce.torch.cross_entropy: input must have at least one dimension (the classes)")
    soft = target.is_floating_point()
    if soft and ignore_index != -100:
        raise ValueError(
            "fastsce.torch.cross_entropy: ignore_index is not supported for floating point "
            "(class-probability) targets, as in torch"
        )
    if weight is not None and weight.requires_grad and not soft:
        raise RuntimeError(
            "fastsce.torch.cross_entropy is not differentiable with respect to 'weight' for "
            "class-index targets (neither is torch's); detach the weight"
        )
    dim = 0 if input.dim() == 1 else 1
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, target, weight)
    )
    args = (input, target, weight, int(ignore_index), reduction, float(label_smoothing), dim)
    if wants_grad:
        return _CrossEntropyFunction.apply(*args)
    with torch.no_grad():  # needs_input_grad is then False: the loss-only kernel runs
        return _CrossEntropyFunction.apply(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`fastsce.torch.cross_entropy`.

    A subclass of torch's module: the same constructor (``weight``, ``size_average``,
    ``ignore_index``, ``reduce``, ``reduction``, ``label_smoothing``), the same
    ``weight`` buffer and ``state_dict``, and ``isinstance`` checks keep working; only
    ``forward`` differs.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
