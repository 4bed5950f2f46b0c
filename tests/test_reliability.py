"""Reliability under what training jobs do (issue 9, items 1 and 2).

* Concurrency, per threading layer (tbb, omp, workqueue and the default), each in its
  own subprocess: 8 Python threads calling the kernels at once give the single-threaded
  results bit for bit; a child forked after the layer's threads started (multiprocessing
  "fork", as PyTorch DataLoader workers) computes correctly, also from a fork Pool and
  also when the fork happens while another thread is inside a kernel; the process exits
  cleanly. A hang cannot stall the suite: every wait has a timeout and the subprocess is
  killed after ``LAYER_TIMEOUT``.
* Environment: no writable cache anywhere (a read-only install), NUMBA_NUM_THREADS,
  NUMBA_CACHE_DIR and NUMBA_DISABLE_JIT=1, and ``python -m fastsce info``.

As root, chmod does not stop writes, so "unwritable" directories here are paths below a
regular file (``mkdir`` fails with ENOTDIR for everyone); each test checks that writing
there really fails before relying on it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_jit

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("tbb", "omp", "workqueue", "default")
PHASES = ("threads", "fork", "pool", "fork_while_busy", "exit")
LAYER_TIMEOUT = 420  # whole subprocess, seconds
WAIT = 150  # one phase's wait (first calls in forked OpenMP children compile serial kernels)


def child_env(**extra: str | None) -> dict[str, str]:
    """The environment for a subprocess that imports this checkout's fastsce and tests."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    for key in ("NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS", "NUMBA_DISABLE_JIT", "NUMBA_CACHE_DIR"):
        env.pop(key, None)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run(
    args: list[str], env: dict[str, str], timeout: float, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{' '.join(args)} did not finish in {timeout} s (hang?)\nstdout:\n{exc.stdout}\n"
            f"stderr:\n{exc.stderr}"
        )


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.search(r"warn", line, re.IGNORECASE)]


# ============================================================ per-layer subprocess ====
# Everything below up to the fixtures runs inside the subprocess (``_layer_main``).
def _cases():
    """Calls covering the row, row-block (few classes) and column kernels and the fused loss."""
    rng = np.random.default_rng(7)
    x_rows = (3 * rng.standard_normal((96, 700))).astype(np.float32)
    x_small = rng.standard_normal((500, 7))
    x_cols = (3 * rng.standard_normal((40, 20, 9))).astype(np.float32)
    t_rows = rng.integers(0, 700, 96)
    t_rows[5] = -100
    p = rng.random((500, 7))
    p /= p.sum(-1, keepdims=True)
    return [
        ("softmax", (x_rows,), {}),
        ("softmax", (x_small,), {}),
        ("softmax", (x_cols,), {"axis": 1}),
        ("log_softmax", (x_rows,), {}),
        ("log_softmax", (x_cols,), {"axis": 0}),
        ("logsumexp", (x_rows,), {}),
        ("logsumexp", (x_small,), {}),
        ("logsumexp", (x_cols,), {"axis": 1}),
        ("cross_entropy_with_grad", (x_rows, t_rows), {"label_smoothing": 0.1, "z_loss": 1e-3}),
        ("cross_entropy_with_grad", (x_rows[:, :200], np.where(t_rows < 0, t_rows, t_rows % 200)), {}),  # gradient rows in pairs
        ("cross_entropy_with_grad", (x_small, p), {"reduction": "sum"}),
        ("cross_entropy", (x_rows, t_rows), {"reduction": "none"}),
    ]


def _call(case):
    import fastsce

    name, args, kwargs = case
    return getattr(fastsce, name)(*args, **kwargs)


def _same(a, b) -> bool:
    """Bitwise equality of results (arrays, floats, tuples of them)."""
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    return type(a) is type(b) and (a == b or (math.isnan(a) and math.isnan(b)))


def _fork_child(queue, cases) -> None:
    import fastsce._config as config

    queue.put(([_call(c) for c in cases], config.serial_only()))


def _pool_task(i: int):
    cases = _cases()
    return i, _call(cases[i % len(cases)])


def _busy_loop(stop, x) -> None:
    import fastsce

    while not stop.is_set():
        fastsce.softmax(x)
        fastsce.cross_entropy_with_grad(x, np.zeros(x.shape[0], np.int64))


def _layer_main() -> None:
    """Run every phase under the layer named by NUMBA_THREADING_LAYER; one JSON line per phase."""
    import contextlib
    import io
    import multiprocessing
    import queue as queue_module
    import threading
    import traceback
    from concurrent.futures import ThreadPoolExecutor

    import fastsce
    import fastsce._config as config
    from fastsce.__main__ import info

    stuck = False

    def report(phase, **fields):
        print(json.dumps({"phase": phase, **fields}), flush=True)

    def phase(name, func):
        nonlocal stuck
        start = time.perf_counter()
        try:
            detail = func()
            report(name, ok=True, detail=detail, seconds=round(time.perf_counter() - start, 2))
        except Exception:  # noqa: BLE001 - reported to the test
            report(
                name,
                ok=False,
                error=traceback.format_exc(limit=8),
                seconds=round(time.perf_counter() - start, 2),
            )

    try:
        layer = config.threading_layer()
    except Exception:  # noqa: BLE001 - the layer cannot load here
        report("layer", ok=False, unavailable=True, error=traceback.format_exc(limit=3))
        return
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        info()
    report("layer", ok=True, layer=layer, info=buffer.getvalue())

    cases = _cases()
    with fastsce.threads(1):
        reference = [_call(c) for c in cases]

    def threads():
        nonlocal stuck

        def job(i):
            case = cases[i % len(cases)]
            if i % 3 == 0:
                with fastsce.threads(1):
                    return i, _call(case)
            return i, _call(case)

        pool = ThreadPoolExecutor(8)
        futures = [pool.submit(job, i) for i in range(8 * len(cases))]
        wrong = []
        try:
            for future in futures:
                i, result = future.result(timeout=WAIT)
                if not _same(result, reference[i % len(cases)]):
                    wrong.append(
                        f"job {i}: {cases[i % len(cases)][0]} differs from the single-threaded result"
                    )
        except TimeoutError:
            stuck = True
            raise AssertionError(f"8 threads did not finish within {WAIT} s (deadlock?)") from None
        pool.shutdown(wait=True)
        assert not wrong, "\n".join(wrong[:10])
        return f"{len(futures)} calls from 8 threads"

    def fork():
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_fork_child, args=(queue, cases))
        child.start()
        try:
            results, serial = queue.get(timeout=WAIT)
        except (queue_module.Empty, EOFError, OSError):
            child.kill()
            raise AssertionError(
                f"the forked child sent nothing within {WAIT} s (hang or crash, exit code {child.exitcode})"
            ) from None
        child.join(WAIT)
        assert child.exitcode == 0, f"forked child exit code {child.exitcode}"
        wrong = [cases[k][0] for k, r in enumerate(results) if not _same(r, reference[k])]
        assert not wrong, f"the forked child's results differ: {wrong}"
        if layer == "omp":
            assert serial, "a child forked after OpenMP started must run serial kernels"
        return {"serial_only_in_child": serial}

    def pool():
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(2) as workers:
            pending = workers.map_async(_pool_task, range(2 * len(cases)), chunksize=1)
            try:
                results = pending.get(timeout=WAIT)
            except multiprocessing.TimeoutError:
                raise AssertionError(f"the fork Pool did not finish within {WAIT} s") from None
        wrong = [cases[i % len(cases)][0] for i, r in results if not _same(r, reference[i % len(cases)])]
        assert not wrong, f"pool workers' results differ: {wrong}"
        return f"{len(results)} calls in 2 forked workers"

    def fork_while_busy():
        nonlocal stuck
        ctx = multiprocessing.get_context("fork")
        stop = threading.Event()
        busy = threading.Thread(target=_busy_loop, args=(stop, cases[0][1][0]), daemon=True)
        busy.start()
        try:
            for attempt in range(3):
                time.sleep(0.05)
                queue = ctx.Queue()
                child = ctx.Process(target=_fork_child, args=(queue, cases[:2]))
                child.start()
                try:
                    results, _ = queue.get(timeout=30 if layer != "omp" else WAIT)
                except (queue_module.Empty, EOFError, OSError):
                    child.kill()
                    child.join()
                    raise AssertionError(
                        f"fork {attempt + 1}: a child forked while another thread was inside a kernel sent "
                        f"nothing (deadlock in the child; exit code {child.exitcode})"
                    ) from None
                child.join(WAIT)
                assert child.exitcode == 0, f"fork {attempt + 1}: exit code {child.exitcode}"
                assert all(_same(r, reference[k]) for k, r in enumerate(results)), (
                    f"fork {attempt + 1}: wrong"
                )
        finally:
            stop.set()
            busy.join(WAIT)
            if busy.is_alive():
                stuck = True
        return "3 forks while a thread ran kernels"

    def warm_serial_builds():
        """Under OpenMP, compile in this process the serial kernels that forked children
        run, so the pool and fork-while-busy children inherit them instead of each
        compiling them again (the fork phase has already tested compiling in a child)."""
        if layer != "omp" or not hasattr(config, "_forked_after_openmp"):
            return
        config._forked_after_openmp = True
        try:
            for case in cases:
                _call(case)
        finally:
            config._forked_after_openmp = False

    phase("threads", threads)
    phase("fork", fork)
    warm_serial_builds()
    phase("pool", pool)
    phase("fork_while_busy", fork_while_busy)
    report("end", stuck=stuck)
    if stuck:  # threads that never return would keep the interpreter from exiting
        os._exit(3)


@pytest.fixture(scope="module")
def layer_runs():
    """Start one subprocess per layer (concurrently), then collect their JSON lines."""
    procs = {}
    for layer in LAYERS:
        env = child_env(NUMBA_THREADING_LAYER=None if layer == "default" else layer)
        procs[layer] = subprocess.Popen(
            [sys.executable, "-c", "from tests.test_reliability import _layer_main; _layer_main()"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    deadline = time.monotonic() + LAYER_TIMEOUT
    runs = {}
    for layer, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            code = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            code = "killed after timeout"
        phases = {}
        for line in out.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                phases[record.pop("phase")] = record
        runs[layer] = {"phases": phases, "returncode": code, "stderr": err[-4000:]}
    return runs


def _layer_run(layer_runs, layer):
    run_ = layer_runs[layer]
    start = run_["phases"].get("layer")
    assert start is not None, (
        f"{layer}: the subprocess died at start (exit {run_['returncode']}):\n{run_['stderr']}"
    )
    if start.get("unavailable"):
        pytest.skip(f"the {layer} threading layer cannot load here:\n{start['error']}")
    return run_


def _tbb_wheel_installed() -> bool:
    from importlib import metadata

    try:
        metadata.version("tbb")
        return True
    except metadata.PackageNotFoundError:
        return False


@needs_jit("the subprocesses test the threading layers of compiled kernels")
@pytest.mark.parametrize("layer", LAYERS)
def test_layer_is_the_one_requested_and_reported_by_info(layer_runs, layer):
    """The subprocess runs the requested layer, and ``info`` reports it. By default
    fastsce prefers TBB (safe for threads and fork) whenever it can load."""
    run_ = _layer_run(layer_runs, layer)
    reported = run_["phases"]["layer"]["layer"]
    if layer == "default":
        tbb = layer_runs["tbb"]["phases"].get("layer", {})
        if tbb.get("layer") == "tbb":
            assert reported == "tbb", f"TBB loads here but the default layer is {reported}"
        assert reported in ("tbb", "omp", "workqueue")
    else:
        assert reported == layer, f"requested {layer}, got {reported}"
    assert re.search(rf"threading layer\s+{reported}\b", run_["phases"]["layer"]["info"]), run_["phases"][
        "layer"
    ]["info"]


@needs_jit("the subprocesses test the threading layers of compiled kernels")
def test_tbb_wheel_makes_tbb_loadable(layer_runs):
    """fastsce preloads the ``tbb`` wheel's libtbb: where the wheel is installed, TBB loads."""
    if not _tbb_wheel_installed():
        pytest.skip("the tbb wheel is not installed")
    start = layer_runs["tbb"]["phases"].get("layer", {})
    assert start.get("layer") == "tbb", f"tbb wheel installed but the TBB layer did not load: {start}"


@needs_jit("the subprocesses test the threading layers of compiled kernels")
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("layer", LAYERS)
def test_layer_reliability(layer_runs, layer, phase):
    """threads: 8 Python threads at once (some inside ``threads(1)``) give the
    single-threaded results bit for bit; fork: a child forked after the layer started
    computes the same results and exits 0 (under OpenMP it runs serial kernels); pool:
    a fork ``multiprocessing.Pool`` (a DataLoader-like pattern) does too; fork_while_busy:
    forking while another thread is inside a kernel leaves the child working; exit: the
    process ends by itself with status 0 (no thread stuck, no abort at shutdown)."""
    run_ = _layer_run(layer_runs, layer)
    if phase == "exit":
        assert run_["phases"].get("end", {}).get("stuck") is False, run_["stderr"]
        assert run_["returncode"] == 0, f"exit status {run_['returncode']}\n{run_['stderr']}"
        return
    result = run_["phases"].get(phase)
    assert result is not None, (
        f"{layer}: phase {phase} never reported (the subprocess hung or died, "
        f"exit {run_['returncode']}):\n{run_['stderr']}"
    )
    assert result["ok"], f"{layer} / {phase}:\n{result['error']}\nstderr:\n{run_['stderr'][-1500:]}"


# ==================================================================== environment ====
def _unwritable(path: Path) -> None:
    """Assert that nobody (not even root) can create ``path`` or files in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "probe").write_bytes(b"x")
    except OSError:
        return
    raise AssertionError(f"{path} is writable; the test's premise does not hold")


CHECK_CALLS = """
import numpy as np, fastsce
from tests import reference as ref
x = np.random.default_rng(0).standard_normal((5, 9))
assert np.allclose(fastsce.logsumexp(x), ref.logsumexp(x), rtol=1e-13)
assert np.allclose(fastsce.softmax(x), ref.softmax(x), rtol=1e-13)
assert np.allclose(fastsce.logsumexp(x), ref.logsumexp(x), rtol=1e-13)  # a second call: no second warning
print("RESULTS OK")
"""


@needs_jit("the subprocess tests the on-disk cache of compiled kernels")
def test_read_only_install_without_any_writable_cache(tmp_path):
    """A read-only install: the package's __pycache__, NUMBA_CACHE_DIR and the user-wide
    cache (XDG_CACHE_HOME/HOME) are all unwritable. Kernels still run (compiled in
    memory), with at most one warning."""
    pkg = tmp_path / "site"
    shutil.copytree(
        ROOT / "fastsce",
        pkg / "fastsce",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"),
    )
    shutil.copytree(ROOT / "tests", pkg / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for package_dir in [p.parent for p in (pkg / "fastsce").rglob("__init__.py")] + [pkg / "tests"]:
        (package_dir / "__pycache__").write_bytes(b"")  # a file where Numba wants its cache directory
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    for path in [
        blocker / "numba-cache",
        pkg / "fastsce" / "__pycache__",
        pkg / "fastsce" / "_kernels" / "__pycache__",
        blocker / "xdg" / "numba",
        blocker / ".cache" / "numba",
    ]:
        _unwritable(path)
    env = child_env(
        NUMBA_CACHE_DIR=str(blocker / "numba-cache"),
        XDG_CACHE_HOME=str(blocker / "xdg"),
        HOME=str(blocker),
        PYTHONDONTWRITEBYTECODE="1",
    )
    env["PYTHONPATH"] = str(pkg)
    proc = run(
        [
            sys.executable,
            "-c",
            f"import fastsce; assert fastsce.__file__.startswith({str(pkg)!r}), "
            "fastsce.__file__\n" + CHECK_CALLS,
        ],
        env,
        timeout=400,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "RESULTS OK" in proc.stdout, proc.stderr[-3000:]
    assert len(warnings_in(proc.stderr)) <= 1, proc.stderr
    assert not list((pkg / "fastsce").rglob("*.nbi")), "wrote a cache index into the read-only package"


@needs_jit("the subprocess tests the on-disk cache of compiled kernels")
def test_unwritable_numba_cache_dir_still_works(tmp_path):
    """NUMBA_CACHE_DIR set to a path that cannot be created: kernels still run, with at
    most one warning."""
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    _unwritable(blocker / "cache")
    proc = run(
        [sys.executable, "-c", CHECK_CALLS], child_env(NUMBA_CACHE_DIR=str(blocker / "cache")), timeout=400
    )
    assert proc.returncode == 0 and "RESULTS OK" in proc.stdout, proc.stderr[-3000:]
    assert len(warnings_in(proc.stderr)) <= 1, proc.stderr


FRESH_OR_CACHED = """
import pickle, sys
import fastsce
from tests.test_reliability import _call, _cases
cases = [c for c in _cases() if c[1][0].shape[0] == 96]  # the row kernels
with fastsce.threads(1):
    results = [_call(c) for c in cases]
pickle.dump(([c[0] for c in cases], results), sys.stdout.buffer)
"""


@needs_jit("the subprocesses compile kernels, then load them from the on-disk cache")
def test_cached_kernels_give_the_bits_of_freshly_compiled_ones(tmp_path):
    """The same kernel compiled in this process or loaded from the cache computes the same
    bits. (A row loop that both stored its exps and summed them got another summation
    order where LLVM optimized it a second time, linked into the parallel kernel: cached
    and fresh softmax rows differed by an ulp on AVX-512.)"""
    import pickle

    env = child_env(NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    runs = []
    for _ in ("fresh", "cached"):
        proc = subprocess.run([sys.executable, "-c", FRESH_OR_CACHED], cwd=ROOT, env=env, capture_output=True,
                              timeout=400, check=False)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        runs.append(pickle.loads(proc.stdout))
    (names, fresh), (_, cached) = runs
    assert len(names) >= 5
    wrong = [name for name, a, b in zip(names, fresh, cached) if not _same(a, b)]
    assert not wrong, f"results of freshly compiled and cached kernels differ: {wrong}"


@needs_jit("the subprocess tests the on-disk cache of compiled kernels")
def test_numba_cache_dir_is_honoured(tmp_path):
    """With NUMBA_CACHE_DIR set, compiled kernels are cached there and ``info`` says so."""
    cache = tmp_path / "numba cache"
    proc = run([sys.executable, "-m", "fastsce", "info"], child_env(NUMBA_CACHE_DIR=str(cache)), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"cache directory\s+" + re.escape(str(cache)) + r"\s*$", proc.stdout, re.MULTILINE), (
        proc.stdout
    )
    index = list(cache.rglob("*.nbi"))
    assert index and list(cache.rglob("*.nbc")), (
        f"no Numba cache files under {cache}: {list(cache.rglob('*'))}"
    )
    assert all(
        "fastsce" in p.parent.name or "_kernels" in p.parent.name or p.parent.name.startswith("fastsce")
        for p in index
    ), index


@needs_jit("the subprocess tests the thread pool of compiled kernels")
def test_numba_num_threads_is_honoured():
    code = """
import numpy as np, fastsce
from tests import reference as ref
assert fastsce.get_num_threads() == 1, fastsce.get_num_threads()
try:
    fastsce.set_num_threads(2)
except ValueError as e:
    print("VALUE ERROR", e)
else:
    raise SystemExit("set_num_threads(2) did not raise")
try:
    with fastsce.threads(2):
        pass
except ValueError:
    print("CONTEXT VALUE ERROR")
fastsce.set_num_threads(1)
x = np.random.default_rng(0).standard_normal((300, 100))
assert np.allclose(fastsce.softmax(x), ref.softmax(x), rtol=1e-13)
loss, grad = fastsce.cross_entropy_with_grad(x, np.arange(300) % 100)
assert np.allclose(grad, ref.cross_entropy_grad_ref(x, np.arange(300) % 100), rtol=1e-12, atol=1e-18)
from fastsce.__main__ import info
info()
"""
    proc = run([sys.executable, "-c", code], child_env(NUMBA_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "VALUE ERROR" in proc.stdout and "CONTEXT VALUE ERROR" in proc.stdout
    assert re.search(r"threads\s+1 of 1", proc.stdout), proc.stdout


def _disable_jit_main() -> None:
    """Under NUMBA_DISABLE_JIT=1: every public function on small inputs, all kernel paths."""
    import numba

    import fastsce
    from tests.test_bad_input import LINEAR, PUBLIC, check_linear, check_result, make_args

    assert numba.config.DISABLE_JIT, "NUMBA_DISABLE_JIT=1 was not honoured"
    failures = []
    count = 0
    rng = np.random.default_rng(2)
    shapes = [((6, 5), -1), ((4, 70), -1), ((9, 4, 3), 1), ((5, 6), 0), ((3, 1), -1)]
    for name in PUBLIC:
        for dtype in (np.float32, np.float64):
            for shape, axis in shapes:
                x = (2 * rng.standard_normal(shape)).astype(dtype)
                args = make_args(name, x, axis, rng)
                if name == "nll_loss":
                    args = (fastsce.log_softmax(x, axis), args[1])
                option_sets = [{}]
                if name in ("cross_entropy", "cross_entropy_with_grad"):
                    c = shape[axis]
                    option_sets += [
                        {"label_smoothing": 0.2, "z_loss": 1e-2, "reduction": "sum"},
                        {"weight": rng.uniform(0.5, 2, c), "reduction": "none"},
                        {"ignore_index": 0},
                    ]
                for options in option_sets:
                    count += 1
                    try:
                        got = getattr(fastsce, name)(*args, axis=axis, **options)
                        check_result(name, got, args, axis, dtype, **options)
                    except Exception as exc:  # noqa: BLE001 - collected
                        failures.append(
                            f"{name} {np.dtype(dtype).name} {shape} axis={axis} {options}: "
                            f"{type(exc).__name__}: {str(exc)[:300]}"
                        )
        if name in ("cross_entropy", "cross_entropy_with_grad"):
            x = rng.standard_normal((7, 6))
            p = rng.random((7, 6))
            p /= p.sum(-1, keepdims=True)
            count += 1
            try:
                got = getattr(fastsce, name)(x, p, label_smoothing=0.1)
                check_result(name, got, (x, p), -1, np.float64, label_smoothing=0.1)
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{name} probabilities: {type(exc).__name__}: {str(exc)[:300]}")
    for name in LINEAR:
        for dtype in (np.float32, np.float64):
            hidden = rng.standard_normal((9, 5)).astype(dtype)
            weight = rng.standard_normal((7, 5)).astype(dtype)
            target = rng.integers(0, 7, 9)
            target[3] = -100
            options = {"bias": rng.standard_normal(7).astype(dtype), "label_smoothing": 0.1, "z_loss": 1e-3}
            count += 1
            try:
                got = getattr(fastsce, name)(hidden, weight, target, chunk_size=4, **options)
                check_linear(name, got, hidden, weight, target, **options)
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{name} {np.dtype(dtype).name}: {type(exc).__name__}: {str(exc)[:300]}")
    x = rng.standard_normal((6, 8)).astype(np.float32)
    t = rng.integers(0, 8, 6)
    count += 1
    try:
        want = fastsce.cross_entropy_with_grad(x, t)
        loss, grad = fastsce.cross_entropy_with_grad(x.copy(), t, inplace=True)
        assert loss == want[0] and np.array_equal(grad, want[1])
        y = x.copy()
        assert np.array_equal(fastsce.softmax(y, out=y), fastsce.softmax(x))
    except Exception as exc:  # noqa: BLE001
        failures.append(f"in place: {type(exc).__name__}: {exc}")
    print(json.dumps({"count": count, "failures": failures}))


def test_disable_jit_gives_correct_results_for_every_public_function():
    """NUMBA_DISABLE_JIT=1 runs the kernels as plain Python (for coverage): every public
    function, every kernel path (row blocks, rows, columns), both dtypes, loss options."""
    proc = run(
        [sys.executable, "-c", "from tests.test_reliability import _disable_jit_main; _disable_jit_main()"],
        child_env(NUMBA_DISABLE_JIT="1"),
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["count"] > 100
    assert not result["failures"], "\n".join(result["failures"])


def test_info_command_prints_the_threading_layer():
    proc = run([sys.executable, "-m", "fastsce", "info"], child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"^threading layer\s+(\S+)\s*$", proc.stdout, re.MULTILINE)
    assert match and match.group(1) in ("tbb", "omp", "workqueue"), proc.stdout
    for field in ("fastsce", "numba", "threads", "cache directory", "simd"):
        assert re.search(rf"^{field}\s+\S", proc.stdout, re.MULTILINE), (field, proc.stdout)
