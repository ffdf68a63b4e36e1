"""The fuzz run works end to end: `python -m bench.fuzz --cases 50` (schemathesis over every operation of
`GET /api/2.0/openapi`, against a real server with a deployed model) exits 0 and prints its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

TIMEOUT_S = 240  # inside pytest-timeout's 300 s, so the harness gets to stop its server


def test_fuzz_smoke(tmp_path: Path) -> None:
    json_out = tmp_path / "fuzz.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.fuzz", "--cases", "50", "--json-out", str(json_out),
         "--workdir", str(tmp_path / "work")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the harness stops the server it started
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"fuzz smoke run took over {TIMEOUT_S} s:\n{stderr[-6000:]}")
    context = f"exit {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr[-6000:]}"
    assert proc.returncode == 0, context
    assert "5xx: 0 from the platform" in stdout, context
    assert "not_a_server_error" in stdout, context
    assert "after fuzzing: process alive True, /health 200" in stdout, context

    saved = json.loads(json_out.read_text())
    assert saved["ok"] is True, context
    assert saved["cases"] >= 50
    assert saved["server_errors"] == []
    assert all(op["cases"] >= 1 for op in saved["operations"].values())
    assert "POST /serving-endpoints/{name}/invocations" in saved["operations"]
    assert saved["checks"]["not_a_server_error"]["runs"] == saved["cases"]
    assert saved["after"]["healthy"] is True
