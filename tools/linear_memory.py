"""Peak memory and time of fastsce's chunked linear cross-entropy (issue 7's targets).

``python tools/linear_memory.py memory [--rows N --features D --classes V --dtype float32]``
runs ``linear_cross_entropy_with_grad`` in a fresh subprocess and prints the peak
resident memory beyond the inputs and the outputs. In the child: the inputs are built
and touched, one full-size warm-up call runs (kernels compiled or loaded, BLAS
initialised) and its results are dropped, the resident size is taken as the baseline,
the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), the measured call runs
and keeps its results, and extra = peak − baseline − the outputs' bytes.
``--cold`` warms up on a tiny problem instead, so that the peak also counts what the
first large call sets up once (BLAS thread buffers).
``--materialized`` measures ``hidden @ weight.T`` + ``cross_entropy_with_grad`` + the two
backward matmuls the same way, for comparison.

``python tools/linear_memory.py time [...]`` times, in one process, the fused call
against the three matmuls it must do anyway at the same chunking (``h@W.T``, ``g@W``,
``g.T@h`` per chunk into preallocated buffers) and against PyTorch's materialized
``F.linear`` + ``F.cross_entropy`` forward and backward; the minimum of ``--repeats``
interleaved runs after one warm-up each.

Linux only (it reads ``/proc/self/status``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def make_inputs(rows: int, features: int, classes: int, dtype: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    hidden = (rng.standard_normal((rows, features), dtype=np.float32) / np.sqrt(features)).astype(dtype)
    weight = rng.standard_normal((classes, features), dtype=np.float32).astype(dtype)
    target = rng.integers(0, classes, rows)
    return hidden, weight, target


def child_memory(args) -> dict:
    """Runs in the subprocess: the measurement described in the module docstring."""
    from fastsce import linear

    hidden, weight, target = make_inputs(args.rows, args.features, args.classes, args.dtype)
    kwargs = {} if args.budget is None else {"memory_budget": args.budget}

    if args.materialized:
        import fastsce

        def call():
            logits = hidden @ weight.T
            loss, g = fastsce.cross_entropy_with_grad(logits, target, inplace=True)
            return loss, g @ weight, g.T @ hidden
    else:
        def call():
            return linear.linear_cross_entropy_with_grad(hidden, weight, target, **kwargs)

    if args.cold:  # only compile/load the kernels, on a tiny problem
        h, w, t = make_inputs(4, 3, 5, args.dtype)
        linear.linear_cross_entropy(h, w, t)
    else:
        call()  # warm-up: compile/load kernels, start thread pools, BLAS buffers
    baseline = rss_bytes()
    reset_peak()
    result = call()
    peak = rss_bytes("VmHWM")
    outputs = sum(r.nbytes for r in result if isinstance(r, np.ndarray))
    return {"baseline": baseline, "peak": peak, "outputs": outputs, "extra": peak - baseline - outputs,
            "inputs": hidden.nbytes + weight.nbytes + target.nbytes,
            "logits": args.rows * args.classes * np.dtype(args.dtype).itemsize}


def measure_memory(rows: int, features: int, classes: int, dtype: str = "float32", budget: int | None = None,
                   materialized: bool = False, cold: bool = False) -> dict:
    """Run :func:`child_memory` in a fresh interpreter; returns its figures in bytes."""
    cmd = [sys.executable, __file__, "_child", "--rows", str(rows), "--features", str(features),
           "--classes", str(classes), "--dtype", dtype]
    if budget is not None:
        cmd += ["--budget", str(budget)]
    if materialized:
        cmd.append("--materialized")
    if cold:
        cmd.append("--cold")
    # A fixed mmap threshold: glibc's adaptive one would keep the warm-up's freed arrays
    # on the heap, where the measured call reuses them and its peak goes unseen.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_times(fns: dict, repeats: int) -> dict:
    """Minimum wall time of each function over ``repeats`` interleaved rounds, after a warm-up."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
        print("  round:", {k: round(v, 3) for k, v in best.items()}, file=sys.stderr, flush=True)
    return best


def measure_time(rows: int, features: int, classes: int, dtype: str, repeats: int, torch_too: bool = True) -> dict:
    from fastsce import linear

    hidden, weight, target = make_inputs(rows, features, classes, dtype)
    chunk = max(1, linear.DEFAULT_MEMORY_BUDGET // (classes * np.dtype(dtype).itemsize))
    buf = np.empty((chunk, classes), dtype)
    d_hidden = np.empty_like(hidden)
    d_weight = np.empty_like(weight)

    def three_matmuls():
        for lo in range(0, rows, chunk):
            hi = min(lo + chunk, rows)
            h, g = hidden[lo:hi], buf[: hi - lo]
            np.matmul(h, weight.T, out=g)
            np.matmul(g, weight, out=d_hidden[lo:hi])
            np.matmul(g.T, h, out=d_weight)

    fns = {
        "fastsce": lambda: linear.linear_cross_entropy_with_grad(hidden, weight, target),
        "three_matmuls": three_matmuls,
    }
    if torch_too:
        try:
            import torch
            import torch.nn.functional as F
        except ImportError:
            torch = None
        if torch is not None:
            ht, wt, tt = torch.from_numpy(hidden), torch.from_numpy(weight), torch.from_numpy(target)

            def torch_materialized():
                h = ht.detach().requires_grad_(True)
                w = wt.detach().requires_grad_(True)
                F.cross_entropy(F.linear(h, w), tt).backward()
                return h.grad, w.grad

            fns["torch"] = torch_materialized
    times = best_times(fns, repeats)
    times["chunk_rows"] = chunk
    return times


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["memory", "time", "_child"])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=32_000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--budget", type=int, default=None, help="memory_budget in bytes (default 64 MiB)")
    parser.add_argument("--materialized", action="store_true")
    parser.add_argument("--cold", action="store_true", help="warm up on a tiny problem only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    if args.dtype == "bfloat16":
        import ml_dtypes

        args.dtype = ml_dtypes.bfloat16
    shape = f"N={args.rows}, D={args.features}, V={args.classes} {np.dtype(args.dtype).name}"
    if args.mode == "_child":
        print(json.dumps(child_memory(args)))
    elif args.mode == "memory":
        m = measure_memory(args.rows, args.features, args.classes, np.dtype(args.dtype).name, args.budget,
                           args.materialized, args.cold)
        mb = {k: v / 2**20 for k, v in m.items()}
        what = ("materialized" if args.materialized else "linear_cross_entropy_with_grad") + (
            " (cold)" if args.cold else "")
        print(f"{what} {shape}: extra peak {mb['extra']:.1f} MiB beyond inputs ({mb['inputs']:.0f} MiB) "
              f"and outputs ({mb['outputs']:.0f} MiB); baseline RSS {mb['baseline']:.0f} MiB, peak "
              f"{mb['peak']:.0f} MiB; the (N, V) logits in the input dtype would be {mb['logits']:.0f} MiB")
    else:
        t = measure_time(args.rows, args.features, args.classes, args.dtype, args.repeats, not args.no_torch)
        print(f"{shape}, chunk {t['chunk_rows']} rows, min of {args.repeats}:")
        print(f"  fastsce linear_cross_entropy_with_grad {t['fastsce']:.3f} s")
        print(f"  three matmuls, same chunking          {t['three_matmuls']:.3f} s  "
              f"(ratio {t['fastsce'] / t['three_matmuls']:.3f}, target <= 1.2)")
        if "torch" in t:
            print(f"  torch F.linear + F.cross_entropy fwd+bwd {t['torch']:.3f} s  "
                  f"(torch / fastsce {t['torch'] / t['fastsce']:.2f}, target > 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
