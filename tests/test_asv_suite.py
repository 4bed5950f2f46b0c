"""The asv suite in benchmarks/ is well formed, covers the public API, and runs.

In-process: every benchmark class of every module is set up on its smallest parameters
and each of its benchmarks called once (no asv needed). With asv installed, also
``asv check --python=same``, which is what asv itself checks before a run.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import math
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastsce
from tests.conftest import needs_jit

ROOT = Path(__file__).resolve().parents[1]
# Every benchmarks/bench_<family>.py, so a new family's module is checked as it lands.
MODULES = sorted(f"benchmarks.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "benchmarks")])
                 if m.name.startswith("bench_"))
KINDS = ("time_", "peakmem_", "track_", "mem_", "timeraw_")
# Public names that are not computations, so have no time_ benchmark.
NOT_TIMED = {"get_num_threads", "set_num_threads", "threads"}


def benchmark_classes(module):
    """The classes asv discovers in ``module``: public, defined there, with benchmark methods."""
    return [
        cls for name, cls in vars(module).items()
        if inspect.isclass(cls) and not name.startswith("_") and cls.__module__ == module.__name__
        and benchmark_methods(cls)
    ]


def benchmark_methods(cls):
    return sorted(name for name, _ in inspect.getmembers(cls, inspect.isfunction) if name.startswith(KINDS))


def param_lists(cls):
    """``params`` as one list per parameter (this suite always writes a list of lists)."""
    params = getattr(cls, "params", [])
    assert all(isinstance(p, list) for p in params), f"{cls.__name__}.params must be a list of lists"
    return params


def size_of(value):
    return math.prod(value) if isinstance(value, tuple) else 0


def smallest_first(cls):
    """Parameter combinations, the cheapest (fewest elements) first."""
    combos = list(itertools.product(*param_lists(cls)))
    return sorted(combos, key=lambda combo: sum(size_of(v) for v in combo))


def all_classes():
    return [cls for name in MODULES for cls in benchmark_classes(importlib.import_module(name))]


def test_suite_is_well_formed():
    classes = all_classes()
    assert classes
    for cls in classes:
        lists = param_lists(cls)
        assert len(lists) == len(getattr(cls, "param_names", [])), cls
        for name in benchmark_methods(cls):
            if name.startswith("track_"):
                assert getattr(cls, name).unit, f"{cls.__name__}.{name} has no unit"


def test_every_public_function_has_a_benchmark_and_a_numpy_reference():
    names = {m for cls in all_classes() for m in benchmark_methods(cls)}
    for public in sorted(set(fastsce.__all__) - NOT_TIMED):
        assert f"time_{public}" in names, f"no time_{public} in benchmarks/"
        assert f"time_numpy_{public}" in names, f"no time_numpy_{public} in benchmarks/"


def test_asv_conf():
    text = (ROOT / "asv.conf.json").read_text()
    conf = json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.MULTILINE))  # asv allows // comments
    assert conf["repo"] == "."
    assert conf["branches"] == ["main"]
    assert conf["environment_type"] == "virtualenv"
    assert conf["benchmark_dir"] == "benchmarks"
    for key in ("results_dir", "html_dir", "env_dir"):
        assert conf[key].startswith(".asv/")
    assert ".asv/" in (ROOT / ".gitignore").read_text().split()


def run_once(cls, combo):
    """setup, each benchmark once, teardown; False when setup skips this combination."""
    bench = cls()
    try:
        if hasattr(bench, "setup"):
            bench.setup(*combo)
    except NotImplementedError:
        return False
    try:
        for name in benchmark_methods(cls):
            value = getattr(bench, name)(*combo)
            if name.startswith("track_"):
                assert isinstance(value, float) and math.isfinite(value) and value > 0, (cls, name, value)
    finally:
        if hasattr(bench, "teardown"):
            bench.teardown(*combo)
    return True


@needs_jit("the benchmarks time compiled kernels at their real sizes (10**7 elements and up)")
@pytest.mark.parametrize("module_name", MODULES)
def test_each_benchmark_runs_on_its_smallest_parameters(module_name):
    module = importlib.import_module(module_name)
    for cls in benchmark_classes(module):
        if not any(run_once(cls, combo) for combo in smallest_first(cls)):
            pytest.fail(f"{cls.__name__}: every parameter combination skipped")


def test_asv_check():
    pytest.importorskip("asv")
    result = subprocess.run([sys.executable, "-m", "asv", "check", "--python=same"], cwd=ROOT,
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No problems found" in result.stdout, result.stdout


def test_numpy_references_agree_with_fastsce():
    """The graphs compare like with like: each NumPy reference computes what fastsce does.

    float32, the dtype the benchmarks above ran in, so no kernel compiles again.
    """
    from benchmarks import common

    x = common.logits((64, 10), "float32")
    target = common.targets(64, 10)
    g = common.logits((64, 10), "float32", seed=1)
    s, ls = fastsce.softmax(x), fastsce.log_softmax(x)
    close = {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(common.numpy_softmax(x), s, **close)
    np.testing.assert_allclose(common.numpy_log_softmax(x), ls, **close)
    np.testing.assert_allclose(common.numpy_logsumexp(x), fastsce.logsumexp(x), **close)
    np.testing.assert_allclose(common.numpy_softmax_backward(g, s), fastsce.softmax_backward(g, s), **close)
    np.testing.assert_allclose(common.numpy_log_softmax_backward(g, ls), fastsce.log_softmax_backward(g, ls),
                               **close)
    np.testing.assert_allclose(common.numpy_softmax_jacobian(x), fastsce.softmax_jacobian(x), **close)
    np.testing.assert_allclose(common.numpy_cross_entropy(x, target), fastsce.cross_entropy(x, target),
                               **close)
    loss, grad = common.numpy_cross_entropy_with_grad(x, target)
    expected_loss, expected_grad = fastsce.cross_entropy_with_grad(x, target)
    np.testing.assert_allclose(loss, expected_loss, **close)
    np.testing.assert_allclose(grad, expected_grad, **close)
    np.testing.assert_allclose(common.numpy_nll_loss(ls, target), fastsce.nll_loss(ls, target), **close)
