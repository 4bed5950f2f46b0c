"""Large-batch multinomial logistic regression trained with fastsce.cross_entropy_with_grad.

The model is ``logits = X @ W + b``; each step computes the mean cross-entropy and its
gradient with respect to the logits in one fused pass (written over the logits buffer,
``inplace=True``), then ``dW = Xᵀ @ grad`` and ``db = Σ grad`` with NumPy, and a plain
SGD update. The same loop written in NumPy (stable softmax, one-hot subtraction) runs
from the same initial weights over the same batches, so the two loss curves overlap and
the wall times compare like for like.

Data sets:

* ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), which ship
  inside scikit-learn; 25 % held out.
* ``synthetic``: Gaussian features and labels drawn from a random linear "teacher"
  (Gumbel-max sampling, so the best achievable accuracy is below 100 %); ``--rows``
  scales it to millions of rows; 10 % held out.

Examples::

    python examples/train_softmax_regression.py --dataset digits
    python examples/train_softmax_regression.py --dataset synthetic --rows 1000000 --plot loss.png
    python examples/train_softmax_regression.py --quick          # a small smoke run
    python examples/train_softmax_regression.py --blas-threads 1 # on a 2-core machine

The per-call cost of fastsce (argument checks, layout planning) is tens to hundreds of
microseconds, so on tiny batches such as digits' 256 x 10 logits NumPy's few small ops
are as fast or faster; the fused kernel pays off from batches of ~10^5 logits up.

Needs ``pip install scikit-learn matplotlib tqdm`` besides fastsce.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

import fastsce

DEFAULTS = {  # per data set: epochs, batch size, learning rate
    "digits": {"epochs": 30, "batch_size": 256, "lr": 0.5},
    "synthetic": {"epochs": 3, "batch_size": 8192, "lr": 4.0},
}
QUICK = {"rows": 20_000, "epochs": 2}


# ---------------------------------------------------------------------- data ----
@dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    name: str
    floor: float | None = None  # the test loss of the model that generated the labels


def load_digits(seed: int, dtype: np.dtype) -> Data:
    from sklearn.datasets import load_digits as sklearn_digits

    x, y = sklearn_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    n_test = len(y) // 4
    mean, std = x[n_test:].mean(0), x[n_test:].std(0) + 1.0  # +1: constant border pixels
    x = ((x - mean) / std).astype(dtype)
    return Data(x[n_test:], y[n_test:], x[:n_test], y[:n_test], 10, "digits")


def make_synthetic(rows: int, features: int, classes: int, seed: int, dtype: np.dtype) -> Data:
    """Gaussian features; labels ~ softmax(x @ W*) drawn with the Gumbel-max trick."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((features, classes)).astype(dtype) * (4.0 / math.sqrt(features))
    x = rng.standard_normal((rows, features), dtype=np.float32).astype(dtype, copy=False)
    y = np.empty(rows, np.int64)
    for start in range(0, rows, 65536):  # in blocks: no rows x classes array at once
        logits = x[start : start + 65536] @ teacher
        logits += rng.gumbel(size=logits.shape).astype(dtype)
        y[start : start + 65536] = logits.argmax(1)
    n_test = max(rows // 10, 1)
    floor = fastsce.cross_entropy(x[:n_test] @ teacher, y[:n_test])
    return Data(x[n_test:], y[n_test:], x[:n_test], y[:n_test], classes, "synthetic", floor)


# --------------------------------------------------------------------- steps ----
def fastsce_step(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and d loss / d logits, fused, written over ``logits``."""
    loss, grad = fastsce.cross_entropy_with_grad(logits, y, inplace=True)
    return loss, grad


def numpy_step(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """The same in plain NumPy: stable softmax, log-likelihood, one-hot subtraction."""
    rows = np.arange(len(y))
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    loss = float(np.mean(np.log(total[:, 0]) - shifted[rows, y]))
    probs = exp / total
    probs[rows, y] -= 1.0
    probs /= len(y)
    return loss, probs


@dataclass
class Run:
    name: str
    losses: list[float] = field(default_factory=list)
    wall: float = 0.0  # the whole training loop
    step_time: float = 0.0  # inside the loss-and-gradient step only
    accuracy: float = math.nan
    test_loss: float = math.nan


def evaluate(data: Data, w: np.ndarray, b: np.ndarray, run: Run) -> None:
    """Test loss and accuracy; the argmax comes from the same pass as the loss."""
    total, correct = 0.0, 0
    for start in range(0, len(data.y_test), 65536):
        x, y = data.x_test[start : start + 65536], data.y_test[start : start + 65536]
        loss, argmax = fastsce.cross_entropy(x @ w + b, y, reduction="sum", return_argmax=True)
        total += loss
        correct += int(np.count_nonzero(argmax == y))
    run.test_loss = total / len(data.y_test)
    run.accuracy = correct / len(data.y_test)


def train(data: Data, step, name: str, args: argparse.Namespace, progress: bool) -> tuple[Run, np.ndarray]:
    rng = np.random.default_rng(args.seed)
    n, d = data.x_train.shape
    w = np.zeros((d, data.n_classes), data.x_train.dtype)
    b = np.zeros(data.n_classes, data.x_train.dtype)
    starts = np.arange(0, n, args.batch_size)
    orders = [rng.permutation(starts) for _ in range(args.epochs)]  # same batch order for every run
    run = Run(name)
    began = time.perf_counter()
    for epoch, order in enumerate(orders):
        bar = tqdm(
            order,
            desc=f"{name:7s} epoch {epoch + 1}/{args.epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
            file=sys.stderr,
        )
        for start in bar:
            x, y = (
                data.x_train[start : start + args.batch_size],
                data.y_train[start : start + args.batch_size],
            )
            logits = x @ w
            logits += b
            t0 = time.perf_counter()
            loss, grad = step(logits, y)
            run.step_time += time.perf_counter() - t0
            w -= args.lr * (grad.T @ x).T  # Xᵀ·grad; this operand order is the fast one for OpenBLAS
            b -= args.lr * grad.sum(axis=0)
            run.losses.append(loss)
            if len(run.losses) % 20 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")
    run.wall = time.perf_counter() - began
    evaluate(data, w, b, run)
    return run, w


# ---------------------------------------------------------------------- plot ----
def plot(runs: list[Run], data: Data, args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    steps_per_epoch = math.ceil(len(data.y_train) / args.batch_size)
    for run, style in zip(runs, ("-", "--")):
        label = (
            f"{run.name}: loss+grad {run.step_time:.2f} s, loop {run.wall:.2f} s, test acc {run.accuracy:.3f}"
        )
        ax.plot(np.arange(1, len(run.losses) + 1) / steps_per_epoch, run.losses, style, lw=1.2, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training cross-entropy (batch mean)")
    ax.set_title(
        f"softmax regression on {data.name}: {len(data.y_train):,} rows x {data.x_train.shape[1]} "
        f"features, {data.n_classes} classes, batch {args.batch_size}"
    )
    ax.axhline(
        math.log(data.n_classes),
        color="gray",
        lw=0.8,
        ls=":",
        label=f"log C = {math.log(data.n_classes):.2f}",
    )
    if data.floor is not None:
        ax.axhline(data.floor, color="black", lw=0.8, ls="-.", label=f"teacher's test loss {data.floor:.2f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------- main ----
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dataset", choices=("digits", "synthetic"), default="synthetic")
    parser.add_argument(
        "--rows",
        type=int,
        default=None,
        help="synthetic: number of rows, 10%% held out; default 1,000,000 (20,000 with --quick)",
    )
    parser.add_argument("--features", type=int, default=64, help="synthetic: number of features")
    parser.add_argument("--classes", type=int, default=200, help="synthetic: number of classes")
    parser.add_argument("--epochs", type=int, default=None, help="default: 30 (digits), 3 (synthetic)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: 256 (digits), 8192 (synthetic)"
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="SGD step; default: 0.5 (digits), 4.0 (synthetic)"
    )
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a small smoke run: {QUICK['rows']:,} synthetic rows, {QUICK['epochs']} epochs",
    )
    parser.add_argument(
        "--plot",
        default=None,
        help="where to save the loss curve (PNG); default: softmax_regression_<dataset>.png",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--skip-numpy", action="store_true", help="train with fastsce only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="limit NumPy's BLAS threads (threadpoolctl); on few cores, 1 often makes the "
        "matmuls faster, since idle BLAS threads spin and slow every other step",
    )
    args = parser.parse_args(argv)
    if args.rows is None:
        args.rows = QUICK["rows"] if args.quick else 1_000_000
    if args.quick and args.epochs is None:
        args.epochs = QUICK["epochs"]
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.plot = args.plot or f"softmax_regression_{args.dataset}.png"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.blas_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.blas_threads, user_api="blas")
    dtype = np.dtype(args.dtype)
    t0 = time.perf_counter()
    if args.dataset == "digits":
        data = load_digits(args.seed, dtype)
    else:
        data = make_synthetic(args.rows, args.features, args.classes, args.seed, dtype)
    print(
        f"{data.name}: {len(data.y_train):,} training rows, {len(data.y_test):,} test rows, "
        f"{data.x_train.shape[1]} features, {data.n_classes} classes "
        f"({time.perf_counter() - t0:.1f} s to build)"
    )
    if data.floor is not None:
        print(f"the labels' own model (the teacher) has test loss {data.floor:.4f}")

    # The first call of a kernel compiles it (or loads it from the on-disk cache): not timed.
    t0 = time.perf_counter()
    warm = np.zeros((2, data.n_classes), dtype)
    fastsce.cross_entropy_with_grad(warm, np.zeros(2, np.int64), inplace=True)
    fastsce.cross_entropy(warm, np.zeros(2, np.int64), reduction="sum", return_argmax=True)
    print(f"kernels compiled or loaded in {time.perf_counter() - t0:.1f} s (not part of the timings)")

    progress = not args.no_progress
    runs = [train(data, fastsce_step, "fastsce", args, progress)[0]]
    if not args.skip_numpy:
        runs.append(train(data, numpy_step, "numpy", args, progress)[0])

    steps = len(runs[0].losses)
    print(f"{args.epochs} epochs x {steps // args.epochs} steps of {args.batch_size} rows, ", end="")
    print(f"lr {args.lr}, {args.dtype}")
    for run in runs:
        print(
            f"{run.name:8s} loop {run.wall:8.2f} s   loss+grad {run.step_time:8.2f} s "
            f"({1e3 * run.step_time / steps:.2f} ms/step)   final batch loss {run.losses[-1]:.4f}   "
            f"test loss {run.test_loss:.4f}   test accuracy {run.accuracy:.4f}"
        )
    if len(runs) == 2:
        ours, theirs = runs
        gap = np.max(np.abs(np.subtract(ours.losses, theirs.losses)))
        print(
            f"speed-up: loss+grad x{theirs.step_time / ours.step_time:.1f}, "
            f"whole loop x{theirs.wall / ours.wall:.2f}; largest loss difference between the curves {gap:.2e}"
        )
    plot(runs, data, args, args.plot)
    print(f"final test accuracy: {runs[0].accuracy:.4f} (chance {1 / data.n_classes:.4f})")
    print(f"loss curve saved to {args.plot}")
    result = {
        "dataset": data.name,
        "train_rows": len(data.y_train),
        "test_rows": len(data.y_test),
        "classes": data.n_classes,
        "teacher_test_loss": data.floor,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "plot": args.plot,
        "runs": {
            run.name: {
                "wall_s": run.wall,
                "loss_grad_s": run.step_time,
                "accuracy": run.accuracy,
                "test_loss": run.test_loss,
                "first_loss": run.losses[0],
                "last_loss": run.losses[-1],
            }
            for run in runs
        },
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
