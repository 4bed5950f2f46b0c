"""``python -m fastsce bench``: fastsce against the memory limit and its peers, in one run.

Every case is timed side by side in one process: ``np.copyto`` of the same array (the
floor for a kernel that reads the logits once and writes one array), the NumPy
reference, and torch/JAX on the CPU when they are importable. Times are the minimum of
several repetitions, fastsce and the copy in alternating rounds; ratios are what the
targets are stated in, because absolute times on a shared machine drift.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import fastsce

# (rows, classes) of the performance issue. The quick default takes three class counts,
# the vocabulary-sized rows at a quarter of the full run's rows: 262 MB like the
# 1000-class case, still far beyond the caches; at 8192 rows (1 GB) the peers alone
# took 60 s of a 100 s quick run.
FULL_SHAPES = [(1_048_576, 10), (262_144, 128), (65_536, 1_000), (8_192, 32_000), (512, 262_144), (32, 2_097_152)]
QUICK_SHAPES = [(1_048_576, 10), (65_536, 1_000), (2_048, 32_000)]
OPS = ["softmax", "log_softmax", "logsumexp", "cross_entropy", "cross_entropy_with_grad"]
DTYPES = ("float32", "float64", "float16", "bfloat16")
# 16-bit inputs (issue 7): their own copy is the floor, at these shapes.
HALF_SHAPES = [(65_536, 1_000), (8_192, 32_000)]


def numpy_dtype(name: str) -> np.dtype:
    """``name`` as a NumPy dtype; bfloat16 is ml_dtypes' (as JAX uses)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
# Ops that read the logits and write an array of their size (floor: copy), else read only.
WRITES = {"softmax", "log_softmax", "cross_entropy_with_grad"}


@dataclass
class Case:
    op: str
    rows: int
    classes: int
    dtype: str
    axis: int = -1

    @property
    def label(self) -> str:
        shape = (self.classes, self.rows) if self.axis == 0 else (self.rows, self.classes)
        return f"{self.op} {shape} {self.dtype}" + (" axis=0" if self.axis == 0 else "")


@dataclass
class Result:
    case: Case
    fastsce_s: float
    copy_s: float
    numpy_s: float | None = None
    peers_s: dict[str, float] = field(default_factory=dict)
    targets: dict[str, bool] = field(default_factory=dict)

    @property
    def bytes_moved(self) -> int:
        size = self.case.rows * self.case.classes * numpy_dtype(self.case.dtype).itemsize
        return 2 * size if self.case.op in WRITES else size


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls after one warm-up call."""
    return best_times([fn], repeats)[0]


def best_times(fns: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Minimum wall time of each of ``fns`` over ``repeats`` rounds that call them in
    turn, after one warm-up call each. On a shared machine a burst of load from
    elsewhere then slows one round of every function instead of one function's whole
    series: a ratio of these minima is a ratio measured under the same conditions."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


# ------------------------------------------------------------------- references ----
def numpy_reference(op: str, x: np.ndarray, target: np.ndarray, axis: int) -> Callable[[], Any]:
    """The plain NumPy computation a user would otherwise write."""

    def softmax():
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    def log_softmax():
        shifted = x - x.max(axis=axis, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))

    def logsumexp():
        m = x.max(axis=axis, keepdims=True)
        return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)

    rows = np.arange(target.size)

    def cross_entropy():
        return float(np.mean(logsumexp() - x[rows, target]))

    def cross_entropy_with_grad():
        p = softmax()
        loss = float(np.mean(-np.log(p[rows, target])))
        p[rows, target] -= 1.0
        p /= np.float32(target.size)  # a float16 array has no 65536: divide in float32
        return loss, p

    return locals()[op]


def torch_reference(op: str, x: np.ndarray, target: np.ndarray, axis: int) -> Callable[[], Any] | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if x.dtype.name == "bfloat16":  # torch reads ml_dtypes' bfloat16 through its bits
        xt = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    else:
        xt = torch.from_numpy(x)
    tt = torch.from_numpy(target)
    if op == "cross_entropy_with_grad":
        def run():
            leaf = xt.detach().requires_grad_(True)
            loss = F.cross_entropy(leaf, tt)
            loss.backward()
            return leaf.grad
        return run
    functions = {
        "softmax": lambda: torch.softmax(xt, axis),
        "log_softmax": lambda: torch.log_softmax(xt, axis),
        "logsumexp": lambda: torch.logsumexp(xt, axis),
        "cross_entropy": lambda: F.cross_entropy(xt, tt),
    }
    fn = functions[op]

    def run():
        with torch.no_grad():
            return fn()

    return run


def jax_reference(op: str, x: np.ndarray, target: np.ndarray, axis: int) -> Callable[[], Any] | None:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    xj = jax.device_put(x)
    tj = jax.device_put(target)

    def ce(logits, t):
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jnp.mean(lse - jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0])

    functions = {
        "softmax": jax.jit(lambda a: jax.nn.softmax(a, axis=axis)),
        "log_softmax": jax.jit(lambda a: jax.nn.log_softmax(a, axis=axis)),
        "logsumexp": jax.jit(lambda a: jax.nn.logsumexp(a, axis=axis)),
        "cross_entropy": jax.jit(lambda a: ce(a, tj)),
        "cross_entropy_with_grad": jax.jit(jax.value_and_grad(lambda a: ce(a, tj))),
    }
    fn = functions[op]
    return lambda: jax.block_until_ready(fn(xj))


def fastsce_call(op: str, x: np.ndarray, target: np.ndarray, axis: int, out: np.ndarray) -> Callable[[], Any]:
    """fastsce writing into a preallocated ``out`` (a fresh output would add page faults)."""
    calls = {
        "softmax": lambda: fastsce.softmax(x, axis, out=out),
        "log_softmax": lambda: fastsce.log_softmax(x, axis, out=out),
        "logsumexp": lambda: fastsce.logsumexp(x, axis),
        "cross_entropy": lambda: fastsce.cross_entropy(x, target),
        "cross_entropy_with_grad": lambda: fastsce.cross_entropy_with_grad(x, target, out=out),
    }
    return calls[op]


# ------------------------------------------------------------ linear cross-entropy ----
# (rows, features, classes) of issue 7: the logits would be 1 GB in float32.
LINEAR_SHAPE = (8_192, 1_024, 32_000)


def linear_inputs(shape: tuple[int, int, int], dtype: str = "float32", seed: int = 0):
    rows, features, classes = shape
    rng = np.random.default_rng(seed)
    hidden = (rng.standard_normal((rows, features), dtype=np.float32) / np.sqrt(features)).astype(dtype)
    weight = rng.standard_normal((classes, features), dtype=np.float32).astype(dtype)
    return hidden, weight, rng.integers(0, classes, rows)


def linear_three_matmuls(hidden: np.ndarray, weight: np.ndarray) -> Callable[[], None]:
    """The BLAS work the chunked linear cross-entropy must do anyway, at its chunking:
    ``h @ W.T``, ``g @ W`` and ``g.T @ h`` per chunk into preallocated buffers."""
    from fastsce.linear import DEFAULT_MEMORY_BUDGET

    rows, classes = hidden.shape[0], weight.shape[0]
    chunk = max(1, min(rows, DEFAULT_MEMORY_BUDGET // (classes * hidden.dtype.itemsize)))
    logits = np.zeros((chunk, classes), hidden.dtype)
    d_hidden, d_weight = np.zeros_like(hidden), np.zeros_like(weight)

    def run():
        for lo in range(0, rows, chunk):
            h, g = hidden[lo : lo + chunk], logits[: min(chunk, rows - lo)]
            np.matmul(h, weight.T, out=g)
            np.matmul(g, weight, out=d_hidden[lo : lo + chunk])
            np.matmul(g.T, h, out=d_weight)

    return run


def run_linear(repeats: int, peers: bool, shape: tuple[int, int, int] = LINEAR_SHAPE) -> Result:
    """linear_cross_entropy_with_grad against its three matmuls (target <= 1.2x) and torch's
    materialized F.linear + F.cross_entropy forward and backward (target: slower than fastsce)."""
    hidden, weight, target = linear_inputs(shape)
    matmuls_s, fastsce_s = best_times(
        [linear_three_matmuls(hidden, weight), lambda: fastsce.linear_cross_entropy_with_grad(hidden, weight, target)],
        repeats)
    # copy_s holds the matmuls' time: the floor of this case
    result = Result(Case("linear_cross_entropy_with_grad", shape[0], shape[2], "float32"), fastsce_s, matmuls_s)
    result.targets["matmuls x1.2"] = fastsce_s <= 1.2 * matmuls_s
    if peers:
        try:
            import torch
            import torch.nn.functional as F
        except ImportError:
            torch = None
        if torch is not None:
            ht, wt, tt = torch.from_numpy(hidden), torch.from_numpy(weight), torch.from_numpy(target)

            def torch_run():
                h, w = ht.detach().requires_grad_(True), wt.detach().requires_grad_(True)
                F.cross_entropy(F.linear(h, w), tt).backward()

            result.peers_s["torch"] = best_time(torch_run, repeats)
            result.targets["torch"] = result.peers_s["torch"] > fastsce_s
    return result


def format_linear_row(r: Result, shape: tuple[int, int, int] = LINEAR_SHAPE) -> str:
    torch_cell = f", torch {r.peers_s['torch']:.2f} s (x{r.peers_s['torch'] / r.fastsce_s:.2f})" if (
        "torch" in r.peers_s) else ""
    missed = [k for k, ok in r.targets.items() if not ok]
    return (f"linear_cross_entropy_with_grad (N, D, V)={shape} float32: {r.fastsce_s:.2f} s, "
            f"{r.fastsce_s / r.copy_s:.2f} x its three matmuls ({r.copy_s:.2f} s){torch_cell}  "
            + ("ok" if not missed else "MISSED " + ",".join(missed)))


# ---------------------------------------------------------------------- driver ----
def make_data(case: Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Normal logits and random targets for ``case``: the same arrays for every op of one
    shape and dtype (no timed call writes into them; fastsce's write to ``out=``)."""
    return _data(case.rows, case.classes, case.dtype, case.axis, seed)


# The last shape's data is kept: the cases of one shape follow each other, and drawing
# 8192 x 32000 normal samples took 4.4 s, longer than timing one op on them.
@functools.lru_cache(maxsize=1)
def _data(rows: int, classes: int, dtype: str, axis: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (classes, rows) if axis == 0 else (rows, classes)
    x = rng.standard_normal(shape, dtype=np.float32).astype(numpy_dtype(dtype), copy=False)
    return x, rng.integers(0, classes, rows)


def copy_limit(case: Case) -> float:
    """Allowed ratio to ``np.copyto`` of the same array: the performance issue's (design.md
    §5) for float32/float64; for 16-bit data the large-vocabulary issue's 1.5 for every
    operation, read-only ones included."""
    if case.dtype in ("float16", "bfloat16"):
        return 1.5
    if case.op not in WRITES:
        return 1.0
    return 2.5 if case.classes < 128 else 1.5


def time_case(case: Case, repeats: int) -> Result:
    """fastsce and ``np.copyto`` of the same array, measured side by side."""
    x, target = make_data(case)
    out = np.empty_like(x)
    copy_s, fastsce_s = best_times([lambda: np.copyto(out, x), fastsce_call(case.op, x, target, case.axis, out)],
                                   repeats)
    result = Result(case, fastsce_s, copy_s)
    result.targets["copy"] = fastsce_s <= copy_limit(case) * copy_s
    return result


def time_peers(result: Result, repeats: int) -> None:
    """NumPy, torch and JAX on the case of ``result``, on the same data (:func:`make_data`)."""
    case = result.case
    x, target = make_data(case)
    result.numpy_s = best_time(numpy_reference(case.op, x, target, case.axis), max(2, repeats // 2))
    result.targets["numpy x5"] = result.numpy_s >= 5 * result.fastsce_s
    for name, factory in (("torch", torch_reference), ("jax", jax_reference)):
        if case.axis == 0 and case.op.startswith("cross"):
            continue
        fn = factory(case.op, x, target, case.axis)
        if fn is not None:
            result.peers_s[name] = best_time(fn, repeats)
            result.targets[name] = result.peers_s[name] > result.fastsce_s


def format_row(r: Result) -> str:
    gbs = r.bytes_moved / r.fastsce_s / 1e9
    cells = [f"{r.case.label:<48}", f"{r.fastsce_s * 1e3:9.2f}", f"{gbs:7.1f}", f"{r.fastsce_s / r.copy_s:6.2f}"]
    cells.append(f"{r.numpy_s / r.fastsce_s:7.1f}" if r.numpy_s else f"{'-':>7}")
    for peer in ("torch", "jax"):
        cells.append(f"{r.peers_s[peer] / r.fastsce_s:6.2f}" if peer in r.peers_s else f"{'-':>6}")
    missed = [k for k, ok in r.targets.items() if not ok]
    cells.append("ok" if not missed else "MISSED " + ",".join(missed))
    return " ".join(cells)


HEADER = (f"{'case':<48} {'ms':>9} {'GB/s':>7} {'xcopy':>6} {'xnumpy':>7} {'xtorch':>6} {'xjax':>6} targets\n"
          "  ms: fastsce (min of repeats, out= preallocated); xcopy: fastsce time / np.copyto time "
          "(<= 1.5, 2.5 for C < 128, 1.0 for read-only ops; 16-bit: 1.5 for all); xnumpy/xtorch/xjax: their time / fastsce time")


def cases_for(shapes, ops, dtypes, full) -> list[Case]:
    cases = [Case(op, rows, classes, dtype) for dtype in dtypes for rows, classes in shapes for op in ops]
    if full:
        cases += [Case(op, 65_536, 1_000, "float64") for op in ops if "float64" not in dtypes]
        cases += [Case(op, rows, classes, half) for half in ("float16", "bfloat16") if half not in dtypes
                  for rows, classes in HALF_SHAPES for op in ops]
        cases += [Case(op, 65_536, 1_000, "float32", axis=0) for op in ops if not op.startswith("cross")]
    return cases


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastsce bench", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every shape of the performance targets")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {','.join(OPS)}")
    parser.add_argument("--dtype", default="float32", help=f"comma-separated, from {','.join(DTYPES)}")
    parser.add_argument("--threads", type=int, default=None, help="threads for fastsce and torch")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per timing (min is kept)")
    parser.add_argument("--no-peers", action="store_true", help="skip NumPy/torch/JAX references")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--linear", action="store_true",
                        help=f"also time linear_cross_entropy_with_grad at (N, D, V)={LINEAR_SHAPE} (minutes)")
    args = parser.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    unknown = set(ops) - set(OPS)
    if unknown:
        parser.error(f"unknown ops: {', '.join(sorted(unknown))}")
    dtypes = [d for d in args.dtype.split(",") if d]
    if set(dtypes) - set(DTYPES):
        parser.error(f"--dtype takes {', '.join(DTYPES)}")
    if args.threads is not None:
        fastsce.set_num_threads(args.threads)
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    repeats = args.repeats or (7 if args.full else 5)
    # Peers allocate every result afresh (page faults) and take 3-8x longer per call: in the
    # quick run their min of 3 keeps the whole run near a minute.
    peer_repeats = args.repeats or (7 if args.full else 3)
    cases = cases_for(FULL_SHAPES if args.full else QUICK_SHAPES, ops, dtypes, args.full)
    print(f"fastsce {fastsce.__version__}, {fastsce.get_num_threads()} threads, {len(cases)} cases", flush=True)
    print(HEADER, flush=True)
    # fastsce and the copy first, every case, before any peer has run in this process:
    # torch's and JAX's thread pools keep spinning after their calls and took up to 40%
    # of the two cores from the fastsce timings that followed them.
    results = []
    for n, case in enumerate(cases, 1):
        show_progress(f"[{n}/{len(cases)}] {case.label}: fastsce and copy ...")
        results.append(time_case(case, repeats))
        if args.no_peers:
            print(format_row(results[-1]), flush=True)
    if not args.no_peers:
        for n, result in enumerate(results, 1):
            show_progress(f"[{n}/{len(cases)}] {result.case.label}: NumPy, torch, JAX ...")
            time_peers(result, peer_repeats)
            print(format_row(result), flush=True)
    if args.linear or args.full:
        show_progress("[linear] linear_cross_entropy_with_grad ...")
        results.append(run_linear(min(repeats, 3), not args.no_peers))
        print(format_linear_row(results[-1]), flush=True)
    results += axis0_checks(results)
    missed = [f"{r.case.label}: {k}" for r in results for k, ok in r.targets.items() if not ok]
    total = sum(len(r.targets) for r in results)
    print(f"targets met: {total - len(missed)}/{total}" + ("" if not missed else "; missed: " + "; ".join(missed)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "label": r.case.label} for r in results], f, indent=1)
    return 0


def show_progress(text: str) -> None:
    """What runs now, on stderr: on a terminal a line that the result row overwrites
    (cleared first, as the row may be shorter); elsewhere (a log, a pipe) a line of its own."""
    if sys.stderr.isatty():
        print(f"\r\033[K{text}", end="\r", file=sys.stderr, flush=True)
    else:
        print(text, file=sys.stderr, flush=True)


def axis0_checks(results: list[Result]) -> list[Result]:
    """axis=0 of (C, N) must run within 1.5x of axis=-1 of (N, C) (same data size)."""
    by_label = {(r.case.op, r.case.rows, r.case.classes, r.case.dtype, r.case.axis): r for r in results}
    checks = []
    for (op, rows, classes, dtype, axis), r in by_label.items():
        twin = by_label.get((op, rows, classes, dtype, -1))
        if axis == 0 and twin is not None:
            check = Result(Case(op + " axis0/axis-1", rows, classes, dtype, 0), r.fastsce_s, twin.fastsce_s)
            check.targets["axis0 <= 1.5 x axis-1"] = r.fastsce_s <= 1.5 * twin.fastsce_s
            print(f"{check.case.label:<48} axis=0 {r.fastsce_s * 1e3:.2f} ms vs axis=-1 {twin.fastsce_s * 1e3:.2f} ms")
            checks.append(check)
    return checks
