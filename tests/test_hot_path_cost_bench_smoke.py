"""`python -m bench.hot_path_cost --smoke` runs end to end: two real servers (guards off; auth with
rate limits in Redis) each answer every request 200, each one's process tree did the work, and the
guards alone are timed. Counts only: the CPU figures are the benchmark's to report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_hot_path_cost_benchmark_smoke(tmp_path: Path, redis_url: str) -> None:
    import redis

    window_key = "berth:rl:endpoint/cost"  # the Redis variant's endpoint window (berth.ratelimit.redis)
    client = redis.Redis.from_url(redis_url)
    client.delete(window_key)
    json_out = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, "-m", "bench.hot_path_cost", "--smoke", "--json-out", str(json_out)],
                          cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "BERTH_BENCH_REDIS_URL": redis_url})
    context = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, context
    for line in ("| unguarded |", "| auth + limits (Redis) |", "| host limiter, 2 keys", "| Redis limiter, 2 keys"):
        assert line in proc.stdout, context
    runs = json.loads(json_out.read_text())["runs"]
    assert [r["variant"] for r in runs] == ["unguarded", "auth + limits (Redis)"]
    for run in runs:
        assert set(run["statuses"]) == {"200"}, run
        assert run["answered"] >= run["statuses"]["200"] > 0, run
        assert run["server_cpu_s"] > 0, run
    try:  # the Redis variant's requests (its closed loop's too), and only they, were counted in Redis
        assert client.zcard(window_key) == runs[-1]["answered"] + runs[-1]["saturation_answered"], runs[-1]
    finally:
        client.close()


@pytest.mark.slow
def test_hot_path_cost_observability_smoke(tmp_path: Path) -> None:
    """`--what observability --smoke`: the unmetered baseline and metrics + inference table each answer
    every request 200, and the inference table holds exactly one row per request answered."""
    json_out = tmp_path / "obs.json"
    proc = subprocess.run([sys.executable, "-m", "bench.hot_path_cost", "--smoke", "--what", "observability",
                           "--json-out", str(json_out)], cwd=REPO, capture_output=True, text=True, timeout=400)
    context = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, context
    report = json.loads(json_out.read_text())
    assert [r["variant"] for r in report["runs"]] == ["unmetered", "metrics + inference table"]
    for run in report["runs"]:
        assert set(run["statuses"]) == {"200"}, run
        assert run["throughput_rps"] > 0, run
    answered, rows = report["inference_rows"]["metrics + inference table"]
    assert answered == rows > 0
    assert "none lost" in proc.stdout
