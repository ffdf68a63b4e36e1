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
    assert "gateway-added latency (its own histogram) lr c=8: p50" in stdout, context
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
        assert saved["summary"][model]["berth"]["8"]["gateway_added_p50_ms"] > 0
    assert saved["hello"]["rps"] > 0


@pytest.mark.skipif(shutil.which("wrk") is None,
                    reason="wrk is not installed (./scripts/setup test installs it where apt-get is usable)")
def test_http_servers_benchmark_smoke(tmp_path: Path) -> None:
    json_out = tmp_path / "http.json"
    proc = subprocess.run([sys.executable, "-m", "bench.http_servers", "--smoke", "--json-out", str(json_out)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    context = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, context
    rows = json.loads(json_out.read_text())["summary"]
    servers = {(r["hop"], r["server"]) for r in rows}
    assert ("replica", "berth replica server (httptools protocol)") in servers, context
    assert ("replica", "uvicorn raw ASGI") in servers, context
    assert ("gateway", "uvicorn raw ASGI proxy") in servers, context
    assert all(r["rps"] > 0 and r["errors"] == 0 and r["cpu_ms_per_request"] > 0 for r in rows), rows


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    from bench.serving import histogram_delta, histogram_quantile

    inf = float("inf")
    before = [(0.001, 10.0), (0.002, 10.0), (0.004, 10.0), (inf, 10.0)]
    after = [(0.001, 60.0), (0.002, 100.0), (0.004, 109.0), (inf, 110.0)]  # 50, 40, 9 and 1 new observations
    delta = histogram_delta(before, after)
    assert delta == [(0.001, 50.0), (0.002, 90.0), (0.004, 99.0), (inf, 100.0)]
    assert histogram_quantile(delta, 0.5) == 0.001
    assert abs(histogram_quantile(delta, 0.7) - 0.0015) < 1e-12
    assert histogram_quantile(delta, 0.995) == 0.004  # in the +Inf bucket: the largest finite bound
    assert histogram_quantile([(0.001, 0.0), (inf, 0.0)], 0.5) == 0.0
