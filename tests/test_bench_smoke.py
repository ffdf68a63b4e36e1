"""The serving benchmark runs end to end: `python -m bench.serving --smoke` (Berth and MLflow's
scoring server on both models under wrk, plus the hello-world ceiling) exits 0 and prints its table."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

TIMEOUT_S = 220  # well inside pytest-timeout's 300 s, so the harness gets to clean up


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None,
                    reason="wrk is not installed (./scripts/setup test installs it where apt-get is usable)")
def test_benchmark_smoke(tmp_path: Path) -> None:
    json_out = tmp_path / "results.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.serving", "--smoke", "--json-out", str(json_out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the harness stops the servers it started
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"benchmark smoke run took over {TIMEOUT_S} s:\n{stderr[-6000:]}")
    context = f"exit {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr[-6000:]}"
    assert proc.returncode == 0, context
    for model in ("lr", "rf"):
        assert f"berth ÷ mlflow  {model} c=8: rps ×" in stdout, context
    assert "hello-world ceiling" in stdout, context
    assert "RSS berth gateway" in stdout, context
    assert "RSS berth replicas lr" in stdout, context
    assert "RSS mlflow rf" in stdout, context

    saved = json.loads(json_out.read_text())
    assert saved["ok"] is True
    for model in ("lr", "rf"):
        for server in ("berth", "mlflow"):
            cell = saved["summary"][model][server]["8"]
            assert cell["rps"] > 0, cell
            assert (cell["errors"], cell["status_429"]) == (0, 0), cell
    assert saved["hello"]["rps"] > 0
