"""Chunked linear cross-entropy against the materialized computation and torch's autograd.

The reference is ``tests/reference.py``'s cross-entropy of the float64 logits
``hidden @ weight.T + bias``, its logits gradient ``G``, and ``d_hidden = G @ weight``,
``d_weight = G.T @ hidden``, ``d_bias = Σ_rows G``. float32 results carry the float32
matmuls' rounding, so they are compared with a tolerance relative to the largest
reference magnitude; float64 to ~1e-12.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import numpy as np
import pytest

import fastsce
from fastsce import linear
from fastsce.linear import linear_cross_entropy, linear_cross_entropy_with_grad
from tests import reference as ref

N, D, V = 24, 7, 13
IGNORED = (2, 3, 11, 23)
TOL = {np.dtype(np.float32): {"rtol": 2e-5, "atol": 2e-6}, np.dtype(np.float64): {"rtol": 1e-11, "atol": 1e-12}}
CHUNKS = (1, 5, 8, None)  # one row; not dividing N; dividing N; from the memory budget
# Each test's options: every one alone, then together.
OPTIONS = [
    {},
    {"bias": True},
    {"class_weight": True},
    {"ignore": True},
    {"label_smoothing": 0.1},
    {"z_loss": 0.02},
    {"class_weight": True, "ignore": True, "z_loss": 0.02},
    {"bias": True, "class_weight": True, "ignore": True, "label_smoothing": 0.2, "z_loss": 0.05},
]


def option_id(opts: dict) -> str:
    return "+".join(opts) or "plain"


def make_problem(dtype, opts, rng, n=N, d=D, v=V, soft=False):
    """``(hidden, weight, target, kwargs)`` for the fastsce call."""
    hidden = rng.standard_normal((n, d)).astype(dtype)
    weight = (2.0 / np.sqrt(max(d, 1)) * rng.standard_normal((v, d))).astype(dtype)
    if soft:
        p = rng.random((n, v)) + 0.05
        target = (p / p.sum(axis=1, keepdims=True)).astype(dtype)
    else:
        target = rng.integers(0, v, n)
        if opts.get("ignore"):
            target[[i for i in IGNORED if i < n]] = -100
    kwargs = {}
    if opts.get("bias"):
        kwargs["bias"] = rng.standard_normal(v).astype(dtype)
    if opts.get("class_weight"):
        kwargs["class_weight"] = rng.uniform(0.2, 2.0, v).astype(dtype)
    for key in ("label_smoothing", "z_loss"):
        if key in opts:
            kwargs[key] = opts[key]
    return hidden, weight, target, kwargs


def materialized(hidden, weight, target, *, bias=None, class_weight=None, reduction="mean", grad_output=1.0,
                 **options):
    """The float64 loss and gradients of the whole (N, V) logits."""
    h, w = hidden.astype(np.float64), weight.astype(np.float64)
    logits = h @ w.T + (0.0 if bias is None else bias.astype(np.float64))
    cw = None if class_weight is None else class_weight.astype(np.float64)
    loss = ref.cross_entropy_ref(logits, target, weight=cw, reduction=reduction, **options)
    g = ref.cross_entropy_grad_ref(logits, target, weight=cw, reduction=reduction, grad_output=grad_output,
                                   **options)
    grads = [g @ w, g.T @ h] + ([g.sum(axis=0)] if bias is not None else [])
    return loss, grads


def assert_close(got, want, dtype, what):
    got, want = np.asarray(got), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    tol = TOL[np.dtype(dtype)]
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0),
                               err_msg=what)


def grad_output_for(reduction, rng, n=N):
    return rng.uniform(-1.0, 2.0, n) if reduction == "none" else 0.7


# -------------------------------------------------------- against the materialized loss ----
@pytest.mark.parametrize("opts", OPTIONS, ids=option_id)
@pytest.mark.parametrize("chunk_size", CHUNKS, ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_matches_materialized(dtype, reduction, chunk_size, opts, rng):
    hidden, weight, target, kwargs = make_problem(dtype, opts, rng)
    go = grad_output_for(reduction, rng)
    # memory_budget of 3 rows of logits when chunk_size is None: several chunks, one ragged
    budget = 3 * V * np.dtype(dtype).itemsize + 1
    got = linear_cross_entropy_with_grad(hidden, weight, target, reduction=reduction, chunk_size=chunk_size,
                                         memory_budget=budget, grad_output=go, **kwargs)
    want_loss, want_grads = materialized(hidden, weight, target, reduction=reduction, grad_output=go, **kwargs)
    assert len(got) == 1 + len(want_grads)
    loss_only = linear_cross_entropy(hidden, weight, target, reduction=reduction, chunk_size=chunk_size,
                                     memory_budget=budget, **kwargs)
    if reduction == "none":
        assert got[0].dtype == dtype and loss_only.dtype == dtype
    else:
        assert isinstance(got[0], float) and isinstance(loss_only, float)
    assert_close(got[0], want_loss, dtype, "loss")
    assert_close(loss_only, want_loss, dtype, "loss without gradient")
    for name, g, want in zip(("d_hidden", "d_weight", "d_bias"), got[1:], want_grads):
        assert g.dtype == dtype and g.flags.c_contiguous, name
        assert_close(g, want, dtype, name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_probability_targets(reduction, chunk_size, rng):
    opts = {"bias": True, "class_weight": True, "label_smoothing": 0.1, "z_loss": 0.02}
    hidden, weight, target, kwargs = make_problem(np.float64, opts, rng, soft=True)
    go = grad_output_for(reduction, rng)
    got = linear_cross_entropy_with_grad(hidden, weight, target, reduction=reduction, chunk_size=chunk_size,
                                         memory_budget=4 * V * 8, grad_output=go, **kwargs)
    want_loss, want_grads = materialized(hidden, weight, target, reduction=reduction, grad_output=go, **kwargs)
    assert_close(got[0], want_loss, np.float64, "loss")
    for g, want in zip(got[1:], want_grads):
        assert_close(g, want, np.float64, "gradient")
    assert_close(linear_cross_entropy(hidden, weight, target, reduction=reduction, chunk_size=chunk_size, **kwargs),
                 want_loss, np.float64, "loss only")


def test_same_as_fastsce_on_the_logits(rng):
    """Same float32 arithmetic as cross_entropy_with_grad on the materialized logits."""
    hidden, weight, target, kwargs = make_problem(np.float32, OPTIONS[-1], rng, n=40)
    logits = hidden @ weight.T + kwargs["bias"]
    options = {k: v for k, v in kwargs.items() if k not in ("bias", "class_weight")}
    loss, g = fastsce.cross_entropy_with_grad(logits, target, weight=kwargs["class_weight"], **options)
    got = linear_cross_entropy_with_grad(hidden, weight, target, chunk_size=7, **kwargs)
    assert got[0] == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(got[1], g @ weight, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[2], g.T @ hidden, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------- against torch ----
@pytest.mark.parametrize("opts", OPTIONS, ids=option_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_matches_torch_autograd(dtype, reduction, opts, rng):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    hidden, weight, target, kwargs = make_problem(dtype, opts, rng)
    go = grad_output_for(reduction, rng)
    got = linear_cross_entropy_with_grad(hidden, weight, target, reduction=reduction, chunk_size=5,
                                         grad_output=go, **kwargs)

    h = torch.tensor(hidden, requires_grad=True)
    w = torch.tensor(weight, requires_grad=True)
    b = torch.tensor(kwargs["bias"], requires_grad=True) if "bias" in kwargs else None
    t = torch.tensor(target)
    cw = torch.tensor(kwargs["class_weight"]) if "class_weight" in kwargs else None
    logits = F.linear(h, w, b)
    loss = F.cross_entropy(logits, t, weight=cw, reduction=reduction,
                           label_smoothing=kwargs.get("label_smoothing", 0.0))
    z = kwargs.get("z_loss", 0.0)
    if z:  # PaLM's z-loss over counted rows, "mean" over their number (design.md §3)
        counted = (t != -100).to(logits.dtype)
        z_rows = z * torch.logsumexp(logits, dim=-1) ** 2 * counted
        loss = loss + {"none": z_rows, "sum": z_rows.sum(), "mean": z_rows.sum() / counted.sum()}[reduction]
    loss.backward(torch.as_tensor(go, dtype=logits.dtype))
    want_grads = [h.grad, w.grad] + ([b.grad] if b is not None else [])

    assert_close(got[0], loss.detach().numpy(), dtype, "loss")
    assert len(got) == 1 + len(want_grads)
    for name, g, want in zip(("d_hidden", "d_weight", "d_bias"), got[1:], want_grads):
        assert_close(g, want.numpy(), dtype, name)


def test_torch_probability_targets(rng):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    hidden, weight, target, _ = make_problem(np.float64, {}, rng, soft=True)
    got = linear_cross_entropy_with_grad(hidden, weight, target, chunk_size=7, label_smoothing=0.1)
    h = torch.tensor(hidden, requires_grad=True)
    w = torch.tensor(weight, requires_grad=True)
    loss = F.cross_entropy(F.linear(h, w), torch.tensor(target), label_smoothing=0.1)
    loss.backward()
    assert_close(got[0], loss.item(), np.float64, "loss")
    assert_close(got[1], h.grad.numpy(), np.float64, "d_hidden")
    assert_close(got[2], w.grad.numpy(), np.float64, "d_weight")


# ------------------------------------------------------------------------ 16-bit ----
def _16bit_dtypes():
    dtypes = [pytest.param(np.float16, id="float16")]
    try:
        import ml_dtypes

        dtypes.append(pytest.param(ml_dtypes.bfloat16, id="bfloat16"))
    except ImportError:
        dtypes.append(pytest.param(None, id="bfloat16", marks=pytest.mark.skip("ml_dtypes is not installed")))
    return dtypes


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", _16bit_dtypes())
def test_16bit_inputs_compute_in_float32(dtype, reduction, rng):
    """float32 arithmetic, results rounded once to the input dtype."""
    hidden, weight, target, kwargs = make_problem(np.float32, OPTIONS[-1], rng)
    args16 = [a.astype(dtype) for a in (hidden, weight)]
    kw16 = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
    got = linear_cross_entropy_with_grad(*args16, target, reduction=reduction, chunk_size=5, **kw16)
    kw32 = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) else v) for k, v in kw16.items()}
    want = linear_cross_entropy_with_grad(*[a.astype(np.float32) for a in args16], target, reduction=reduction,
                                          chunk_size=5, **kw32)
    eps = float(np.finfo(np.float16).eps) if dtype == np.float16 else 2.0**-7
    if reduction == "none":
        assert got[0].dtype == dtype
    for name, g, w in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, want):
        g = np.asarray(g)
        if name != "loss" or reduction == "none":
            assert g.dtype == dtype, name
        w = np.asarray(w, dtype=np.float64)
        # within one unit in the last place of the 16-bit type (subnormals: of the smallest normal)
        np.testing.assert_allclose(g.astype(np.float64), w, rtol=eps, atol=eps * 1e-4 * np.max(np.abs(w)),
                                   err_msg=name)
    loss_only = linear_cross_entropy(*args16, target, reduction=reduction, chunk_size=5, **kw16)
    np.testing.assert_allclose(np.asarray(loss_only, np.float64), np.asarray(got[0], np.float64), rtol=eps)


# ---------------------------------------------------------------- chunking and layout ----
class _Spy:
    """Records the row count of every chunk handed to the fused kernel."""

    def __init__(self, monkeypatch):
        self.rows = []
        for name in ("cross_entropy", "cross_entropy_with_grad"):
            original = getattr(linear, name)

            def spy(logits, *args, _original=original, **kwargs):
                self.rows.append(logits.shape[0])
                return _original(logits, *args, **kwargs)

            monkeypatch.setattr(linear, name, spy)


def test_chunk_size_follows_the_memory_budget(monkeypatch, rng):
    spy = _Spy(monkeypatch)
    hidden, weight, target, _ = make_problem(np.float32, {}, rng, n=50)
    linear_cross_entropy_with_grad(hidden, weight, target, memory_budget=7 * V * 4)
    assert spy.rows == [7] * 7 + [1]
    spy.rows.clear()
    linear_cross_entropy(hidden, weight, target, memory_budget=1)  # less than a row: one row at a time
    assert spy.rows == [1] * 50
    spy.rows.clear()
    linear_cross_entropy(hidden, weight, target, chunk_size=16, memory_budget=1)  # chunk_size wins
    assert spy.rows == [16, 16, 16, 2]
    spy.rows.clear()
    linear_cross_entropy(hidden, weight, target)  # default budget: one chunk here
    assert spy.rows == [50]
    assert linear.DEFAULT_MEMORY_BUDGET == 64 * 2**20


def test_ignored_rows_cost_no_matmul(monkeypatch, rng):
    spy = _Spy(monkeypatch)
    hidden, weight, target, kwargs = make_problem(np.float32, {"ignore": True, "bias": True}, rng)
    loss, d_hidden, d_weight, d_bias = linear_cross_entropy_with_grad(hidden, weight, target, chunk_size=6,
                                                                      **kwargs)
    assert sum(spy.rows) == N - len(IGNORED) and spy.rows == [6, 6, 6, 2]
    assert not d_hidden[list(IGNORED)].any()
    want_loss, want_grads = materialized(hidden, weight, target, **kwargs)
    assert_close(loss, want_loss, np.float32, "loss")
    for g, want in zip((d_hidden, d_weight, d_bias), want_grads):
        assert_close(g, want, np.float32, "gradient")


@pytest.mark.parametrize("block_classes", [1, 4, V])
def test_weight_grad_accumulates_in_class_blocks(monkeypatch, block_classes, rng):
    """``d_weight +=`` goes through a temporary of a few classes: same result for any block size."""
    hidden, weight, target, kwargs = make_problem(np.float64, OPTIONS[-1], rng)
    monkeypatch.setattr(linear, "WEIGHT_BLOCK_BYTES", block_classes * D * 8)
    got = linear_cross_entropy_with_grad(hidden, weight, target, chunk_size=5, **kwargs)
    _, want_grads = materialized(hidden, weight, target, **kwargs)
    for g, w in zip(got[1:], want_grads):
        assert_close(g, w, np.float64, "gradient")


def test_layouts_and_inputs_untouched(rng):
    hidden, weight, target, kwargs = make_problem(np.float32, OPTIONS[-1], rng)
    want = linear_cross_entropy_with_grad(hidden, weight, target, chunk_size=5, **kwargs)
    copies = [hidden.copy(), weight.copy(), target.copy()]
    variants = [
        (np.asfortranarray(hidden), np.asfortranarray(weight)),
        (np.repeat(hidden, 2, axis=1)[:, ::2], np.repeat(weight, 3, axis=0)[::3]),  # strided views
        (hidden[::-1][::-1], weight.T.copy().T),
    ]
    for h, w in variants:
        for a in (h, w):
            a.flags.writeable = False
        got = linear_cross_entropy_with_grad(h, w, target, chunk_size=5, **kwargs)
        for g, ww in zip(got, want):
            np.testing.assert_allclose(g, ww, rtol=1e-5, atol=1e-7)
    for a, c in zip((hidden, weight, target), copies):
        np.testing.assert_array_equal(a, c)
    # nested lists (float64) and a float64 class_weight and bias with float32 hidden
    got = linear_cross_entropy_with_grad(hidden.tolist(), weight.tolist(), target.tolist(), chunk_size=5, **kwargs)
    assert got[2].dtype == np.float64
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-6)
    kw = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
    got = linear_cross_entropy_with_grad(hidden, weight, target, chunk_size=5, **kw)
    assert got[3].dtype == np.float32
    np.testing.assert_allclose(got[3], want[3], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ edge cases ----
def test_all_rows_ignored(rng):
    hidden, weight, _, kwargs = make_problem(np.float32, {"bias": True}, rng)
    target = np.full(N, -100)
    loss, d_hidden, d_weight, d_bias = linear_cross_entropy_with_grad(hidden, weight, target, **kwargs)
    assert np.isnan(loss)
    assert not d_hidden.any() and not d_weight.any() and not d_bias.any()
    assert linear_cross_entropy(hidden, weight, target, reduction="sum", **kwargs) == 0.0
    assert not linear_cross_entropy(hidden, weight, target, reduction="none", **kwargs).any()


def test_zero_weight_targets_give_nan_like_the_materialized_loss(rng):
    hidden, weight, target, _ = make_problem(np.float64, {"ignore": True}, rng)
    class_weight = np.ones(V)
    class_weight[np.unique(target[target >= 0])] = 0.0
    loss, d_hidden, d_weight = linear_cross_entropy_with_grad(hidden, weight, target, class_weight=class_weight,
                                                              chunk_size=5)
    want_loss, g = fastsce.cross_entropy_with_grad(hidden @ weight.T, target, weight=class_weight)
    assert np.isnan(loss) and np.isnan(want_loss)
    np.testing.assert_array_equal(np.isnan(d_hidden), np.isnan(g @ weight))
    assert np.isnan(d_weight).all()


def test_empty_shapes(rng):
    weight = rng.standard_normal((V, D))
    hidden = np.empty((0, D))
    loss, d_hidden, d_weight, d_bias = linear_cross_entropy_with_grad(hidden, weight, np.empty(0, int),
                                                                      bias=np.zeros(V))
    assert np.isnan(loss) and d_hidden.shape == (0, D) and not d_weight.any() and not d_bias.any()
    assert linear_cross_entropy(hidden, weight, np.empty(0, int), reduction="sum") == 0.0
    assert linear_cross_entropy(hidden, weight, np.empty(0, int), reduction="none").shape == (0,)
    # no features: the logits are the bias
    bias = rng.standard_normal(V)
    target = rng.integers(0, V, N)
    got = linear_cross_entropy_with_grad(np.empty((N, 0)), np.empty((V, 0)), target, bias=bias, chunk_size=5)
    want_loss, want_grads = materialized(np.empty((N, 0)), np.empty((V, 0)), target, bias=bias)
    assert_close(got[0], want_loss, np.float64, "loss")
    assert got[1].shape == (N, 0) and got[2].shape == (V, 0)
    assert_close(got[3], want_grads[2], np.float64, "d_bias")


# ---------------------------------------------------------------------- errors ----
def _bad_calls():
    h = np.zeros((4, 3), np.float32)
    w = np.zeros((5, 3), np.float32)
    t = np.array([0, 1, 4, -100])
    return [
        ((h[0], w, t), {}, ValueError, "hidden must be 2-D"),
        ((h, w[:, :2], t), {}, ValueError, "weight must be 2-D"),
        ((h, w[0], t), {}, ValueError, "weight must be 2-D"),
        ((h, w.astype(np.float64), t), {}, TypeError, "same dtype"),
        ((h.astype(int), w.astype(int), t), {}, TypeError, "hidden has dtype int"),
        ((h, w, t[:3]), {}, ValueError, r"shape \(4,\)"),
        ((h, w, t.astype(bool)), {}, TypeError, "integer class indices or float class probabilities"),
        ((h, w, np.zeros((4, 4), np.float32)), {}, ValueError, r"probabilities .* shape \(4, 5\)"),
        ((h, w, np.array([0, 1, 5, -100])), {}, ValueError, r"target\[2\] = 5 is not a class index in \[0, 5\)"),
        ((h, w, np.array([0, -1, 1, 1])), {}, ValueError, r"target\[1\] = -1"),
        ((h, w, t), {"bias": np.zeros(4)}, ValueError, r"bias must have shape \(5,\)"),
        ((h, w, t), {"class_weight": np.zeros((5, 1))}, ValueError, r"class_weight must have shape \(5,\)"),
        ((h, w, t), {"class_weight": np.array(["a"] * 5)}, TypeError, "class_weight must be a float array"),
        ((h, w, t), {"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ((h, w, t), {"chunk_size": 2.5}, TypeError, "chunk_size must be a positive int"),
        ((h, w, t), {"memory_budget": 0}, ValueError, "memory_budget must be a positive int"),
        ((h, w, t), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        ((h, w, t), {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ((h, w, t), {"z_loss": -1.0}, ValueError, "z_loss"),
        ((h, w, t), {"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ((h, np.zeros((0, 3), np.float32), t), {}, ValueError, "no classes"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs(case):
    args, kwargs, error, match = _bad_calls()[case]
    with pytest.raises(error, match=match):
        linear_cross_entropy_with_grad(*args, **kwargs)
    with pytest.raises(error, match=match):
        linear_cross_entropy(*args, **kwargs)


def test_bad_grad_output():
    h, w, t = np.zeros((4, 3)), np.zeros((5, 3)), np.array([0, 1, 2, 3])
    with pytest.raises(ValueError, match="must be a scalar for reduction='mean'"):
        linear_cross_entropy_with_grad(h, w, t, grad_output=np.ones(4))
    with pytest.raises(ValueError, match=r"loss's shape \(4,\)"):
        linear_cross_entropy_with_grad(h, w, t, reduction="none", grad_output=np.ones(3))


# ---------------------------------------------------------------------- memory ----
def _load_tool():
    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "linear_memory.py"
    spec = importlib.util.spec_from_file_location("linear_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads Linux's /proc/self/status")
@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"), reason="too slow without JIT")
def test_peak_memory_is_the_chunk_not_the_logits():
    """Peak RSS beyond inputs and outputs, in a fresh process (tools/linear_memory.py)."""
    budget = 4 * 2**20
    m = _load_tool().measure_memory(rows=2048, features=64, classes=8000, dtype="float32", budget=budget)
    assert m["logits"] == 2048 * 8000 * 4  # 62.5 MiB if materialized
    assert m["extra"] <= 2 * budget + 2 * 2**20, m
