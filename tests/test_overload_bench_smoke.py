"""`python -m bench.overload --smoke` runs end to end: a real server offered 3× its capacity answers
every request 2xx or 429 and loses none. Counts and status classes only: latencies on this
machine are the benchmark's to report, not a test's to assert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_overload_benchmark_smoke(tmp_path: Path) -> None:
    json_out = tmp_path / "overload.json"
    proc = subprocess.run([sys.executable, "-m", "bench.overload", "--smoke", "--json-out", str(json_out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    context = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, context
    for line in ("| unloaded |", "| overload |", "accepted p99 ÷ unloaded p99", "platform stays up"):
        assert line in proc.stdout, context
    saved = json.loads(json_out.read_text())
    assert (saved["alive_after"], saved["healthy_after"]) == (True, True), saved
    assert saved["replica_concurrency"] == [4, 4], saved
    for name in ("unloaded", "overload"):
        phase = saved[name]
        load = phase["load"]
        assert load["requests"] > 0, phase
        assert (phase["lost"], load["connect_errors"]) == (0, 0), phase
        assert phase["ok"] + phase["refused"] == load["requests"] == phase["answered"], phase
        assert set(load["status_codes"]) <= {"200", "429"}, phase
        assert {code: s["count"] for code, s in load["latency_by_status"].items()} == load["status_codes"], phase
    assert saved["overload"]["ok"] > 0, saved["overload"]
    assert saved["overload"]["refused"] > 0, saved["overload"]  # offered 3× the capacity: some refused
