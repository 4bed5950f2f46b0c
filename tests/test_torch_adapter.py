"""fastsce.torch against torch's own functions: values, gradients, gradcheck, a training step."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
fst = pytest.importorskip("fastsce.torch")
F = torch.nn.functional

DTYPES = (torch.float32, torch.float64)
# fastsce vs torch in the same dtype: both round, so compare with a little room.
TOL = {torch.float32: {"rtol": 2e-5, "atol": 2e-6}, torch.float64: {"rtol": 1e-12, "atol": 1e-13}}


def _inputs(shape, dtype, soft, ignore_index, seed=0):
    """Logits, a target (indices with a few ignored rows, or probabilities) and a weight."""
    g = torch.Generator().manual_seed(seed)
    n_classes = shape[1] if len(shape) > 1 else shape[0]
    x = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    if soft:
        target = torch.softmax(
            torch.randn(shape, generator=g, dtype=torch.float64), dim=1 if len(shape) > 1 else 0
        )
        target = target.to(dtype)
    else:
        index_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
        target = torch.randint(0, n_classes, index_shape, generator=g)
        if target.dim():
            target.view(-1)[::3] = ignore_index  # every third row ignored
    weight = (0.5 + torch.rand(n_classes, generator=g, dtype=torch.float64)).to(dtype)
    return x, target, weight


GRID = list(
    itertools.product(
        DTYPES,
        [(12, 7), (4, 6, 3)],
        [False, True],  # probability targets
        [False, True],  # weight
        [-100, 2],  # ignore_index
        ["mean", "sum", "none"],
        [0.0, 0.15],  # label_smoothing
    )
)


@pytest.mark.parametrize("dtype,shape,soft,use_weight,ignore_index,reduction,smoothing", GRID)
def test_cross_entropy_matches_torch(dtype, shape, soft, use_weight, ignore_index, reduction, smoothing):
    x, target, weight = _inputs(shape, dtype, soft, ignore_index)
    weight = weight if use_weight else None
    options = {
        "weight": weight,
        "ignore_index": ignore_index,
        "reduction": reduction,
        "label_smoothing": smoothing,
    }
    if soft and ignore_index != -100:  # torch refuses ignore_index with probabilities; so do we
        with pytest.raises(RuntimeError, match="ignore_index"):
            F.cross_entropy(x, target, **options)
        with pytest.raises(ValueError, match="ignore_index"):
            fst.cross_entropy(x, target, **options)
        return
    x_ours = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    ours = fst.cross_entropy(x_ours, target, **options)
    ref = F.cross_entropy(x_ref, target, **options)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    # a non-trivial grad_output: per row for "none", a scalar other than 1 otherwise
    if reduction == "none":
        grad_output = torch.linspace(-1.0, 2.0, ref.numel(), dtype=dtype).reshape(ref.shape)
    else:
        grad_output = torch.tensor(2.5, dtype=dtype)
    ours.backward(grad_output)
    ref.backward(grad_output)
    assert x_ours.grad.dtype == dtype and x_ours.grad.shape == x.shape
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_backward_uses_saved_gradient(dtype):
    """loss.backward() (grad_output == 1) returns the gradient computed in the forward."""
    x, target, _ = _inputs((9, 5), dtype, False, -100)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    fst.cross_entropy(x_ours, target).backward()
    F.cross_entropy(x_ref, target).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL[dtype])


def test_retain_graph_backward_twice_accumulates():
    x, target, _ = _inputs((6, 4), torch.float64, False, -100)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    for leaf, f in ((x_ours, fst.cross_entropy), (x_ref, F.cross_entropy)):
        loss = f(leaf, target)
        loss.backward(retain_graph=True)
        loss.backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL[torch.float64])


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_unbatched_input(soft, reduction):
    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    target = torch.softmax(torch.randn(7, dtype=torch.float64), 0) if soft else torch.tensor(3)
    ours = fst.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)
    ref = F.cross_entropy(x.detach(), target, reduction=reduction, label_smoothing=0.1)
    assert ours.shape == ref.shape == ()
    torch.testing.assert_close(ours, ref, **TOL[torch.float64])
    (grad,) = torch.autograd.grad(ours, x)
    x_ref = x.detach().clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(
        F.cross_entropy(x_ref, target, reduction=reduction, label_smoothing=0.1), x_ref
    )
    torch.testing.assert_close(grad, grad_ref, **TOL[torch.float64])


def test_non_contiguous_inputs():
    """Strided views are read in place (no copy) and give torch's values and gradients."""
    base = torch.randn(10, 16, dtype=torch.float64)
    x = base.t()[:, ::2]  # (16, 5) with strides (1, 32)
    assert not x.is_contiguous()
    view = fst._as_array(x)
    assert view.__array_interface__["data"][0] == x.data_ptr()
    assert np.shares_memory(view, base.numpy())
    target = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0])
    x_ours, x_ref = x.detach().requires_grad_(), x.clone().requires_grad_()
    loss = fst.cross_entropy(x_ours, target, label_smoothing=0.2)
    ref = F.cross_entropy(x_ref, target, label_smoothing=0.2)
    torch.testing.assert_close(loss, ref, **TOL[torch.float64])
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL[torch.float64])
    torch.testing.assert_close(fst.softmax(x, 0), F.softmax(x, 0), **TOL[torch.float64])


def test_legacy_size_average_and_reduce():
    x, target, _ = _inputs((8, 5), torch.float64, False, -100)
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = fst.cross_entropy(x, target, size_average=size_average, reduce=reduce)
            ref = F.cross_entropy(x, target, size_average=size_average, reduce=reduce)
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, **TOL[torch.float64])


def test_uint8_targets():
    x, _, _ = _inputs((8, 5), torch.float32, False, -100)
    target = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2], dtype=torch.uint8)
    torch.testing.assert_close(fst.cross_entropy(x, target), F.cross_entropy(x, target), **TOL[torch.float32])


def test_all_rows_ignored_gives_nan_mean_and_zero_sum():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.full((4,), -100)
    assert torch.isnan(fst.cross_entropy(x, target))
    loss = fst.cross_entropy(x, target, reduction="sum")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_empty_batch_matches_torch():
    x = torch.zeros(0, 5, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    assert torch.isnan(fst.cross_entropy(x, target)) and torch.isnan(F.cross_entropy(x, target))
    assert fst.cross_entropy(x, target, reduction="sum").item() == 0.0
    assert fst.cross_entropy(x, target, reduction="none").shape == (0,)


def test_out_of_range_target_raises():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="class index"):
        fst.cross_entropy(x, torch.tensor([0, 4, 1]))


def test_import_fastsce_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, fastsce; assert 'torch' not in sys.modules and 'dask' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_integer_input_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        fst.cross_entropy(torch.ones(2, 3, dtype=torch.int64), torch.tensor([0, 1]))


def test_weight_requiring_grad_with_class_indices_raises():
    w = torch.ones(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="weight"):
        fst.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), weight=w)


def test_no_grad_runs_the_loss_only_kernel(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the fused gradient kernel ran without a gradient to compute")

    monkeypatch.setattr(fst, "_np_cross_entropy_with_grad", forbidden)
    x, target, _ = _inputs((8, 5), torch.float32, False, -100)
    ref = F.cross_entropy(x, target)
    torch.testing.assert_close(fst.cross_entropy(x, target), ref, **TOL[torch.float32])
    with torch.no_grad():
        loss = fst.cross_entropy(x.requires_grad_(), target)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, ref, **TOL[torch.float32])


# -------------------------------------------------------------- softmax family ----
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", [((6, 9), 1), ((6, 9), 0), ((3, 4, 5), 1), ((3, 4, 5), -1), ((7,), 0)])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_family_matches_torch(name, shape, dim, dtype):
    x = (4 * torch.randn(shape, dtype=torch.float64)).to(dtype)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = getattr(fst, name)(x_ours, dim)
    ref = getattr(F, name)(x_ref, dim)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    grad_output = torch.randn(shape, dtype=dtype)
    ours.backward(grad_output)
    ref.backward(grad_output)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL[dtype])


def test_softmax_of_sum_has_broadcast_grad_output():
    """``.sum().backward()`` hands the backward a stride-0 expanded grad_output."""
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    (fst.log_softmax(x, 1)[:, :3]).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (F.log_softmax(x_ref, 1)[:, :3]).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[torch.float64])


def test_softmax_dtype_argument_casts_first():
    x = torch.randn(4, 6, requires_grad=True)
    out = fst.softmax(x, 1, dtype=torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.softmax(x.detach(), 1, dtype=torch.float64), **TOL[torch.float64])
    out[:, 0].sum().backward()
    assert x.grad.dtype == torch.float32


def test_softmax_zero_dim_and_implicit_dim():
    torch.testing.assert_close(fst.softmax(torch.tensor(3.0), 0), torch.tensor(1.0))
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        out = fst.log_softmax(x)
    torch.testing.assert_close(out, F.log_softmax(x, 1), **TOL[torch.float32])
    with pytest.raises(IndexError):
        fst.softmax(x, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_computed_in_float32(dtype):
    """16-bit logits: the float32 computation rounded once to the input's dtype."""
    x = (3 * torch.randn(16, 10)).to(dtype)
    target = torch.randint(0, 10, (16,))
    x_ours = x.clone().requires_grad_()
    loss = fst.cross_entropy(x_ours, target, reduction="none")
    assert loss.dtype == dtype
    ulp = {"rtol": 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10, "atol": 1e-6}
    torch.testing.assert_close(loss.float(), F.cross_entropy(x.float(), target, reduction="none"), **ulp)
    loss.sum().backward()
    assert x_ours.grad.dtype == dtype
    x_ref = x.float().requires_grad_()
    F.cross_entropy(x_ref, target, reduction="sum").backward()
    torch.testing.assert_close(x_ours.grad.float(), x_ref.grad, **ulp)
    for name in ("softmax", "log_softmax"):
        x_ours = x.clone().requires_grad_()
        out = getattr(fst, name)(x_ours, 1)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), getattr(F, name)(x.float(), 1), **ulp)
        out.backward(torch.ones_like(out))
        assert x_ours.grad.dtype == dtype


def test_bfloat16_is_shared_without_copy():
    pytest.importorskip("ml_dtypes")
    x = torch.randn(6, 8).to(torch.bfloat16)[:, ::2]
    view = fst._as_array(x)
    assert view.dtype.name == "bfloat16" and view.__array_interface__["data"][0] == x.data_ptr()
    back = fst._as_tensor(view, torch.bfloat16)
    assert back.data_ptr() == x.data_ptr() and torch.equal(back, x)


def test_bfloat16_without_ml_dtypes_upcasts(monkeypatch):
    monkeypatch.setattr(fst, "_numpy_bfloat16", lambda: None)
    x = torch.randn(12, 5).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, 5, (12,))
    loss = fst.cross_entropy(x, target)
    assert loss.dtype == torch.bfloat16
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(
        loss.float(), F.cross_entropy(x.detach().float(), target), rtol=2.0**-7, atol=1e-6
    )


# ------------------------------------------------------------------ gradcheck ----
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_cross_entropy_class_indices(reduction):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, -100, 2, 1])
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: fst.cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=0.1), (x,)
    )


def test_gradcheck_cross_entropy_spatial():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0, 1, 2, -100], [2, 2, 1, 0]])
    assert torch.autograd.gradcheck(lambda x: fst.cross_entropy(x, target, reduction="none"), (x,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_cross_entropy_probabilities_input_target_weight(reduction):
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.softmax(torch.randn(4, 5, dtype=torch.float64), 1).requires_grad_()
    weight = (0.5 + torch.rand(5, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, y, w: fst.cross_entropy(x, y, weight=w, reduction=reduction, label_smoothing=0.2),
        (x, target, weight),
    )


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_gradcheck_softmax_family(name, dim):
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: getattr(fst, name)(x, dim), (x,))


# ------------------------------------------------------------ fallback path ----
def test_non_cpu_tensors_fall_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(fst, "_warned_devices", set())
    x = torch.randn(4, 3, device="meta")
    target = torch.zeros(4, dtype=torch.long, device="meta")
    with pytest.warns(RuntimeWarning, match="'meta'"):
        loss = fst.cross_entropy(x, target)
    assert loss.device.type == "meta"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        assert fst.softmax(x, 1).device.type == "meta"
        assert fst.log_softmax(x, 1).shape == (4, 3)


def test_cuda_tensors_fall_back_to_torch(monkeypatch):
    """No CUDA here: pretend CPU tensors are on a CUDA device and check torch's function runs."""
    monkeypatch.setattr(fst, "_warned_devices", set())
    monkeypatch.setattr(fst, "_fallback_device", lambda *tensors: torch.device("cuda"))
    calls = []
    real = F.cross_entropy

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fst.F, "cross_entropy", spy)
    x, target, weight = _inputs((6, 4), torch.float64, False, -100)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loss = fst.cross_entropy(x, target, weight=weight, label_smoothing=0.1)
        fst.cross_entropy(x, target)
    ours = [w for w in record if "fastsce.torch" in str(w.message)]
    assert len(ours) == 1 and "'cuda'" in str(ours[0].message) and ours[0].category is RuntimeWarning
    assert len(calls) == 2 and calls[0]["label_smoothing"] == 0.1
    torch.testing.assert_close(loss, real(x, target, weight=weight, label_smoothing=0.1))


# ----------------------------------------------------------- module, training ----
def test_module_mirrors_torch_module():
    weight = torch.tensor([1.0, 2.0, 0.5])
    ours = fst.CrossEntropyLoss(weight=weight, ignore_index=1, label_smoothing=0.05, reduction="sum")
    ref = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=1, label_smoothing=0.05, reduction="sum")
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(10, 3)
    target = torch.randint(0, 3, (10,))
    torch.testing.assert_close(ours(x, target), ref(x, target), **TOL[torch.float32])


def _train(loss_module, seed=0, steps=25):
    torch.manual_seed(seed)
    n, d, c = 256, 20, 5
    teacher = torch.randn(d, c)
    x = torch.randn(n, d)
    y = (x @ teacher + 0.5 * torch.randn(n, c)).argmax(1)
    model = torch.nn.Linear(d, c)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_module(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model


def test_training_step_matches_torch_trajectory():
    ours, model_ours = _train(fst.CrossEntropyLoss(label_smoothing=0.05))
    ref, model_ref = _train(torch.nn.CrossEntropyLoss(label_smoothing=0.05))
    assert ours[-1] < 0.6 * ours[0]
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    torch.testing.assert_close(model_ours.weight, model_ref.weight, rtol=1e-4, atol=1e-5)
