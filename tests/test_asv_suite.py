"""The asv suite in benchmarks/ is well formed, covers the public API, and runs.

In-process: every benchmark class of every module is set up on its smallest parameters
and each of its benchmarks called once (no asv needed). With asv installed, also
``asv check --python=same``, which is what asv itself checks before a run, and
``asv run --python=same --quick`` of one benchmark per module, through asv's own runner
(fork server, parameters, skips, timeouts), with results and machine file kept out of
the repository and the home directory.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import math
import os
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


def run_once(cls, combo, cached=()):
    """setup, each benchmark once, teardown; the reason when setup skips this combination
    (asv's NotImplementedError), else None.

    ``cached``: ``(setup_cache(),)`` for a class that has one (asv passes its value first).
    """
    bench = cls()
    args = (*cached, *combo)
    try:
        if hasattr(bench, "setup"):
            bench.setup(*args)
    except NotImplementedError as skip:
        return str(skip)
    try:
        for name in benchmark_methods(cls):
            value = getattr(bench, name)(*args)
            if name.startswith("track_"):
                assert isinstance(value, float) and math.isfinite(value) and value > 0, (cls, name, value)
    finally:
        if hasattr(bench, "teardown"):
            bench.teardown(*args)
    return None


@needs_jit("the benchmarks time compiled kernels at their real sizes (10**7 elements and up)")
@pytest.mark.parametrize("module_name", MODULES)
def test_each_benchmark_runs_on_its_smallest_parameters(module_name, tmp_path, monkeypatch):
    module = importlib.import_module(module_name)
    for cls in benchmark_classes(module):
        cached = ()
        if hasattr(cls, "setup_cache"):
            monkeypatch.chdir(tmp_path)  # asv runs setup_cache in a directory of its own
            cached = (cls().setup_cache(),)
            monkeypatch.chdir(ROOT)
        skips = []
        for combo in smallest_first(cls):
            skips.append(run_once(cls, combo, cached))
            if skips[-1] is None:
                break
        else:
            # Only an optional peer (torch: installed in CI) may be missing.
            if not all(reason.endswith("is not installed") for reason in skips):
                pytest.fail(f"{cls.__name__}: every parameter combination skipped: {skips}")


def test_asv_check():
    pytest.importorskip("asv")
    result = subprocess.run([sys.executable, "-m", "asv", "check", "--python=same"], cwd=ROOT,
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No problems found" in result.stdout, result.stdout


# One benchmark per module for the asv run below: the cheapest of each family.
ASV_QUICK = {
    "bench_cross_entropy": "CrossEntropyWithGrad.time_cross_entropy_with_grad",
    "bench_half": "HalfSoftmax.time_softmax",
    "bench_import": "Startup.track_import_time",
    "bench_linear": "LinearCrossEntropy.time_linear_cross_entropy",
    "bench_softmax": "Softmax.time_softmax",
}


def test_asv_quick_names_one_benchmark_of_every_module():
    assert sorted(f"benchmarks.{m}" for m in ASV_QUICK) == MODULES
    for module, name in ASV_QUICK.items():
        cls_name, method = name.split(".")
        assert method in benchmark_methods(getattr(importlib.import_module(f"benchmarks.{module}"), cls_name))


@needs_jit("asv times compiled kernels at their real sizes")
def test_asv_quick_run_of_one_benchmark_per_module(tmp_path):
    """``asv run --python=same --quick`` of one benchmark per module, as a user runs it.

    A copy of asv.conf.json with the results, environments and HTML under ``tmp_path``,
    and HOME there too (asv's machine file), so that neither the repository's .asv/ nor
    ~/.asv-machine.json is touched.
    """
    pytest.importorskip("asv")
    text = (ROOT / "asv.conf.json").read_text()
    conf = json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.MULTILINE))
    conf.update(repo=str(ROOT), benchmark_dir=str(ROOT / "benchmarks"), env_dir=str(tmp_path / "env"),
                results_dir=str(tmp_path / "results"), html_dir=str(tmp_path / "html"))
    config = tmp_path / "asv.conf.json"
    config.write_text(json.dumps(conf))
    env = dict(os.environ, HOME=str(tmp_path))
    asv = [sys.executable, "-m", "asv", "--config", str(config)]
    machine = subprocess.run([*asv, "machine", "--yes", "--machine", "ci"], cwd=tmp_path, env=env,
                             check=False, capture_output=True, text=True, timeout=60)
    assert machine.returncode == 0, machine.stdout + machine.stderr
    # asv matches a parameterized benchmark as "name(param, ...)", once per combination.
    pattern = "^(" + "|".join(re.escape(f"{m}.{n}") for m, n in ASV_QUICK.items()) + r")(\(|$)"
    result = subprocess.run([*asv, "run", "--python=same", "--quick", "--machine", "ci", "--show-stderr",
                             "--bench", pattern], cwd=tmp_path, env=env, check=False, capture_output=True,
                            text=True, timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"Running {len(ASV_QUICK)} total benchmarks" in out, out
    # One status line per benchmark ("[ 20.00%] ··· <name, maybe cut short>   ok"); asv
    # saves no results of --python=same, so its printed tables are what there is.
    statuses = re.findall(r"^\[\s*[\d.]+%\] ··· \S+\s+(\w+)$", out, flags=re.MULTILINE)
    assert statuses == ["ok"] * len(ASV_QUICK), out
    assert "failed" not in out, out


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
