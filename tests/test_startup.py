"""Start-up cost (issue 3): ``import fastsce`` compiles nothing and is fast; with a warm
on-disk cache no kernel is compiled again and each first call is fast.

These are the only wall-clock assertions outside the benchmarks, because start-up is
the contract here; the bounds are the issue's, about 3x above what is measured on an
idle 2-core machine. Numba's own one-time initialisation (importing numba and its
typing registries, which imports scipy.linalg when SciPy is installed: ~0.5 s) is paid
by whichever call comes first and is timed separately.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import needs_jit

# `timing`: the README runs these after the rest of the suite, on an otherwise idle machine.
pytestmark = [needs_jit("times compilation and the on-disk cache of compiled kernels"), pytest.mark.timing]

FUNCTIONS = ["softmax", "log_softmax", "logsumexp", "softmax_backward", "log_softmax_backward",
             "cross_entropy", "cross_entropy_with_grad"]

CALLS = textwrap.dedent(
    """
    import json, sys, time
    start = time.perf_counter()
    import fastsce
    import_seconds = time.perf_counter() - start
    numba_imported = "numba" in sys.modules
    import numpy as np
    start = time.perf_counter()
    import numba
    from numba.core.registry import cpu_target
    cpu_target.target_context.refresh()  # Numba's one-time initialisation
    numba_init_seconds = time.perf_counter() - start
    x = np.random.default_rng(0).standard_normal((32, 100), dtype=np.float32)
    t = np.zeros(32, np.int64)
    s = fastsce.softmax(x)
    calls = {
        "softmax": lambda: fastsce.softmax(x),
        "log_softmax": lambda: fastsce.log_softmax(x),
        "logsumexp": lambda: fastsce.logsumexp(x),
        "softmax_backward": lambda: fastsce.softmax_backward(x, s),
        "log_softmax_backward": lambda: fastsce.log_softmax_backward(x, s),
        "cross_entropy": lambda: fastsce.cross_entropy(x, t),
        "cross_entropy_with_grad": lambda: fastsce.cross_entropy_with_grad(x, t),
    }
    first_call = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        first_call[name] = time.perf_counter() - start
    from fastsce._kernels import softmax as k1, xent as k2
    misses = sum(sum(d.stats.cache_misses.values()) for m in (k1, k2) for d in vars(m).values()
                 if hasattr(d, "stats") and hasattr(d.stats, "cache_misses"))
    print(json.dumps(dict(import_seconds=import_seconds, numba_imported=numba_imported,
                          numba_init_seconds=numba_init_seconds, first_call=first_call, cache_misses=misses)))
    """
)


def run_fresh(cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    env.pop("NUMBA_DISABLE_JIT", None)
    done = subprocess.run([sys.executable, "-c", CALLS], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory):
    cache_dir = str(tmp_path_factory.mktemp("numba-cache"))
    cold = run_fresh(cache_dir)  # compiles every kernel into the cache
    return cold, run_fresh(cache_dir)


def test_import_compiles_nothing_and_is_fast(warm_run):
    _, warm = warm_run
    assert not warm["numba_imported"], "import fastsce must not import numba"
    assert warm["import_seconds"] <= 0.5, warm


def test_warm_cache_compiles_nothing(warm_run):
    cold, warm = warm_run
    assert cold["cache_misses"] > 0  # the first process did compile
    assert warm["cache_misses"] == 0, warm


@pytest.mark.parametrize("name", FUNCTIONS)
def test_first_call_with_warm_cache_is_fast(warm_run, name):
    _, warm = warm_run
    assert warm["first_call"][name] <= 0.5, warm
