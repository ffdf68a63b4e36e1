"""`python -m bench.instant_replicas --smoke` runs end to end: each start path, the first request at
zero, and a rollout under load with no failed request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_instant_replicas_benchmark_smoke(tmp_path: Path) -> None:
    json_out = tmp_path / "instant.json"
    proc = subprocess.run([sys.executable, "-m", "bench.instant_replicas", "--smoke", "--json-out", str(json_out)],
                          cwd=REPO, capture_output=True, text=True, timeout=280)
    context = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, context
    for line in ("| fork |", "| warm |", "| fresh |", "model load + warm-up", "| steady |", "| rollout |",
                 "rollout p99 ÷ steady p99"):
        assert line in proc.stdout, context
    saved = json.loads(json_out.read_text())
    assert saved["ok"] is True
    assert {path: len(samples) for path, samples in saved["start_ms"].items()} == {"fork": 1, "warm": 1, "fresh": 1}
    assert {path: len(samples) for path, samples in saved["at_zero_ms"].items()} == {"fork": 1, "warm": 1}
    for run in ("steady", "rollout"):
        assert saved["rollout"][run]["failed"] == 0, saved["rollout"]
        assert saved["rollout"][run]["ok"] == saved["rollout"][run]["requests"] > 0, saved["rollout"]
