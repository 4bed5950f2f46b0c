"""examples/train_softmax_regression.py runs end to end on small settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import jit_or_pure

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_softmax_regression.py"


def _run(tmp_path: Path, *args: str) -> dict:
    plot, metrics = tmp_path / "loss.png", tmp_path / "metrics.json"
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE), *args, "--plot", str(plot), "--json", str(metrics), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "final test accuracy" in completed.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 10_000
    return json.loads(metrics.read_text())


def _check(result: dict, chance: float, margin: float) -> None:
    ours, numpy = result["runs"]["fastsce"], result["runs"]["numpy"]
    assert ours["accuracy"] > margin * chance, result
    assert ours["last_loss"] < ours["first_loss"]
    # the NumPy loop is the same computation: same curve, same model
    assert ours["last_loss"] == pytest.approx(numpy["last_loss"], rel=1e-4)
    assert ours["accuracy"] == pytest.approx(numpy["accuracy"], abs=0.01)


def test_digits_two_epochs(tmp_path):
    result = _run(tmp_path, "--dataset", "digits", "--epochs", "2")
    assert result["classes"] == 10 and result["train_rows"] + result["test_rows"] == 1797
    _check(result, chance=0.1, margin=6.0)  # > 60 % after 12 steps


def test_synthetic_twenty_thousand_rows(tmp_path):
    # Pure Python (NUMBA_DISABLE_JIT=1): a tenth of the rows and batch, about as many steps.
    rows, batch = jit_or_pure((20_000, 2048), (2_000, 256))
    result = _run(
        tmp_path, "--dataset", "synthetic", "--rows", str(rows), "--epochs", "2", "--batch-size", str(batch)
    )
    assert result["train_rows"] == rows * 9 // 10 and result["classes"] == 200
    _check(result, chance=1 / 200, margin=20.0)  # > 10 %; the teacher's own accuracy is ~55 %
