"""Start-up cost: ``import fastsce`` and the first ``fastsce.softmax`` call, in a fresh interpreter.

Each figure is measured inside a child process with ``time.perf_counter`` and printed
(the interpreter's own start-up is not counted). "cold" points ``NUMBA_CACHE_DIR`` at an
empty directory, so the first call compiles its kernel; "warm" at one an earlier child
filled, so the first call only loads it. Nothing compiles at import (design.md §5), so
the import time should not depend on the cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

IMPORT = """\
import time
start = time.perf_counter()
import fastsce
print(time.perf_counter() - start)
"""

FIRST_SOFTMAX = """\
import time
import numpy as np
import fastsce
x = np.random.default_rng(0).standard_normal((1024, 1000)).astype(np.float32)
start = time.perf_counter()
fastsce.softmax(x)
print(time.perf_counter() - start)
"""


def run_child(code: str, cache_dir: str) -> float:
    """Run ``code`` in a fresh interpreter with its own Numba cache; return the seconds it printed.

    The child runs in ``cache_dir`` so that a source checkout in the current directory
    cannot shadow the fastsce installed in the environment under test.
    """
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    result = subprocess.run([sys.executable, "-c", code], cwd=cache_dir, env=env, check=False,
                            capture_output=True, text=True, timeout=240)
    if result.returncode != 0:
        raise RuntimeError(f"child failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return float(result.stdout.split()[-1])


class Startup:
    """Import and first-call time with a cold and a warm Numba cache (best of 3 when warm)."""

    params = [["cold", "warm"]]
    param_names = ["numba_cache"]
    timeout = 600

    def setup_cache(self):
        """The warm cache, filled once by a first call and shared by both warm benchmarks
        (nothing writes to it after). asv runs this once per commit, in a directory of its
        own that it removes when the commit's benchmarks are done."""
        warm = os.path.abspath("numba-cache-warm")
        os.makedirs(warm, exist_ok=True)
        run_child(FIRST_SOFTMAX, warm)
        return warm

    def setup(self, warm_cache, numba_cache):
        if numba_cache == "warm":
            self.cache_dir = warm_cache
        else:
            self.cache_dir = tempfile.mkdtemp(prefix="fastsce-asv-numba-")

    def teardown(self, warm_cache, numba_cache):
        if numba_cache == "cold":
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    def track_import_time(self, warm_cache, numba_cache):
        return min(run_child(IMPORT, self.cache_dir) for _ in range(3))

    track_import_time.unit = "seconds"

    def track_first_softmax_time(self, warm_cache, numba_cache):
        # Cold can be measured once only: the first child fills the cache.
        return min(run_child(FIRST_SOFTMAX, self.cache_dir) for _ in range(1 if numba_cache == "cold" else 3))

    track_first_softmax_time.unit = "seconds"
