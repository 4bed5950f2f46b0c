"""Run the soak script tools/stress.py briefly (issue 9, item 5): random shapes, layouts,
dtypes and options from two threads against the float64 references."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 10


def test_stress_script_finds_no_failures():
    seed = int(time.time()) % 1_000_000
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "stress.py"),
            "--seconds",
            str(SECONDS),
            "--threads",
            "2",
            "--seed",
            str(seed),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SECONDS + 600,
        check=False,
    )
    summary = re.search(r"^stress: (\d+) checks, (\d+) failures$", proc.stdout, re.MULTILINE)
    assert summary, f"no summary line (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    checks, failures = int(summary.group(1)), int(summary.group(2))
    assert checks > 0
    assert failures == 0 and proc.returncode == 0, (
        f"seed {seed}: {failures} of {checks} checks failed; replay with "
        f"python tools/stress.py --replay {seed}:THREAD:ITERATION\n{proc.stderr[-6000:]}"
    )
