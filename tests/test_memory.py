"""No hidden full-size temporaries (issue 9, item 4): peak RSS measured in a subprocess.

For each call, on a 200 MB logits array (float32 50 000 x 1 000, or float16 100 000 x
1 000, where a float32 copy of the input would show up as 400 MB), the peak resident
memory during the call minus the resident memory just before it (the input already
allocated, every kernel already compiled on a small array of the same layout) must be:

* softmax: the output plus a small constant;
* loss-only cross_entropy: a small constant (per-row buffers are 50 000 x 8 bytes);
* cross_entropy_with_grad(inplace=True): a small constant (no second logits-sized array);
* cross_entropy_with_grad (out of place): the gradient plus a small constant.

"Small constant" is ``SLACK`` (60 MB). With the input counted, that is the issue's
"input + output + a small constant" measured from the baseline after imports and warm-up.

The peak is VmHWM from /proc/self/status, reset before each call by writing 5 to
/proc/self/clear_refs, so one subprocess measures every case; where that reset is not
available, each case runs in its own subprocess and ru_maxrss is used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000
SLACK = 60 * MB
N_ROWS, N_CLASSES = 50_000, 1_000  # float32: 200 MB
TIMEOUT = 300

# case: (function, layout, keyword arguments, allowed extra memory in units of the array)
CASES = {
    "softmax C-order": ("softmax", "C", {}, 1),
    "softmax Fortran-order (column kernels)": ("softmax", "F", {}, 1),
    "log_softmax C-order": ("log_softmax", "C", {}, 1),
    "logsumexp C-order": ("logsumexp", "C", {}, 0),
    "cross_entropy loss-only C-order": ("cross_entropy", "C", {}, 0),
    "cross_entropy loss-only, reduction='none', return_lse": (
        "cross_entropy",
        "C",
        {"reduction": "none", "return_lse": True},
        0,
    ),
    # classes strided: the cross-entropy column kernels read the logits (or compute in them) as they are
    "cross_entropy loss-only Fortran-order": ("cross_entropy", "F", {}, 0),
    "cross_entropy_with_grad inplace=True C-order": ("cross_entropy_with_grad", "C", {"inplace": True}, 0),
    "cross_entropy_with_grad inplace=True Fortran-order": (
        "cross_entropy_with_grad",
        "F",
        {"inplace": True},
        0,
    ),
    "cross_entropy_with_grad out of place C-order": ("cross_entropy_with_grad", "C", {}, 1),
    "cross_entropy_with_grad out of place Fortran-order": ("cross_entropy_with_grad", "F", {}, 1),
    # 16-bit data are decoded one row at a time: no float32 array of the input's size.
    "softmax float16": ("softmax", "C16", {}, 1),
    "cross_entropy loss-only float16": ("cross_entropy", "C16", {}, 0),
    "cross_entropy_with_grad inplace=True float16": ("cross_entropy_with_grad", "C16", {"inplace": True}, 0),
}


# --------------------------------------------------------------- in the subprocess ----
def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _peak_bytes() -> int:
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _current_bytes() -> int:
    current = _status_bytes("VmRSS")
    if current is not None:
        return current
    return _peak_bytes()  # without /proc, only the peak is known: measure from it


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None and _status_bytes("VmHWM") <= _status_bytes("VmRSS") + 4 * MB


def _logits(layout: str, n_rows: int, n_classes: int) -> np.ndarray:
    """Random logits of 200 MB (for ``N_ROWS``), float32 or (layout "C16") float16 with
    twice the rows, filled in slices so that no full-size temporary appears."""
    rng = np.random.default_rng(0)
    dtype = np.float16 if layout == "C16" else np.float32
    if dtype == np.float16:
        n_rows *= 2
    x = np.empty((n_rows, n_classes), dtype, order=layout[0])
    for start in range(0, n_rows, 2_000):
        x[start : start + 2_000] = rng.standard_normal(
            (min(2_000, n_rows - start), n_classes), dtype=np.float32
        )
    return x


def _call(name: str, x: np.ndarray, kwargs: dict):
    import fastsce

    if name in ("cross_entropy", "cross_entropy_with_grad"):
        target = np.arange(x.shape[0], dtype=np.int64) % x.shape[1]
        return getattr(fastsce, name)(x, target, **kwargs)
    return getattr(fastsce, name)(x, **kwargs)


def _memory_main(names: list[str], resettable: bool) -> None:
    """Measure the cases ``names``; print one JSON line per case."""
    import gc

    for name in names:  # warm up: compile or load every kernel on small arrays of the same layout
        function, layout, kwargs, _ = CASES[name]
        _call(function, _logits(layout, 300, N_CLASSES), kwargs)
    for name in names:
        function, layout, kwargs, _ = CASES[name]
        gc.collect()
        before_input = _current_bytes()
        x = _logits(layout, N_ROWS, N_CLASSES)
        gc.collect()
        if resettable:
            _reset_peak()
        before = _current_bytes() if resettable else before_input + x.nbytes
        result = _call(function, x, kwargs)
        peak = _peak_bytes()
        print(json.dumps({"case": name, "extra": peak - before, "array": x.nbytes}), flush=True)
        del result, x


# ------------------------------------------------------------------------- tests ----
def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    env.pop("NUMBA_DISABLE_JIT", None)  # the compiled kernels' memory, also when the suite runs without JIT
    try:
        return subprocess.run(
            [sys.executable, "-c", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"memory measurement did not finish in {TIMEOUT} s:\n{exc.stderr}")


@pytest.fixture(scope="module")
def measurements():
    probe = _run(["from tests.test_memory import _reset_peak; print(_reset_peak())"])
    resettable = probe.stdout.strip().endswith("True")
    batches = [list(CASES)] if resettable else [[name] for name in CASES]
    results = {}
    for batch in batches:
        proc = _run([f"from tests.test_memory import _memory_main; _memory_main({batch!r}, {resettable})"])
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            results[record["case"]] = record
        for name in batch:
            results.setdefault(name, {"error": proc.stderr[-3000:]})
    return results


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.skipif(sys.platform == "win32", reason="RSS measurement needs /proc or getrusage")
def test_peak_memory(measurements, case):
    """Peak RSS during the call, over the RSS just before it (input allocated, kernels
    compiled): at most ``arrays`` logits-sized arrays (the output) plus 60 MB."""
    result = measurements[case]
    assert "error" not in result, f"the measurement failed:\n{result['error']}"
    arrays = CASES[case][3]
    allowed = arrays * result["array"] + SLACK
    extra_arrays = result["extra"] / result["array"]
    assert result["extra"] <= allowed, (
        f"{case}: peak RSS rose by {result['extra'] / MB:.0f} MB = {extra_arrays:.2f} arrays of "
        f"{result['array'] / MB:.0f} MB; allowed {arrays} array(s) + {SLACK / MB:.0f} MB. "
        "A hidden full-size temporary?"
    )
