"""The platform's own log: with `BERTH_LOG_FORMAT=json` every line every process writes is one JSON
object with its time, level, logger, process and the call's structured fields; a bad format or level
stops the server at once with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from tests.conftest import REPO, start_server
from tests.integration.replica_tools import poll


def json_lines(path: Path) -> list[dict]:  # type: ignore[type-arg]
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_json_logs_from_the_main_process_and_a_gateway_worker(tmp_path: Path, model_zoo) -> None:  # type: ignore[no-untyped-def]
    server = start_server(tmp_path, extra_env={"BERTH_LOG_FORMAT": "json", "BERTH_GATEWAY_WORKERS": "2"})
    try:
        worker_log = server.data_dir / "logs" / "gateway" / "gateway-1.log"
        records = poll(lambda: [r for r in json_lines(server.log_path) if r["message"].startswith("listening on")],
                       what="the main process's listening record")
        (listening,) = records
        assert listening["url"] == server.url
        assert listening["gateway_processes"] == 2
        assert (listening["level"], listening["logger"], listening["process"]) == ("INFO", "berth", "main")
        assert datetime.fromisoformat(listening["time"]).utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        worker = poll(lambda: [r for r in json_lines(worker_log) if r["message"] == "gateway process 1 serving"],
                      what="the worker's record")[0]
        assert (worker["process"], worker["gateway"], worker["processes"]) == ("gateway-1", 1, 2)
        # Every line of the server's log is JSON (the CLI's own first-call instructions are on stdout, apart).
        for line in worker_log.read_text().splitlines():
            json.loads(line)

        # The control plane's records carry what they are about as fields: a replica's start and
        # readiness, and the config going live.
        server.deploy("logged", model_zoo("sklearn_classifier"))
        events = poll(lambda: {r["event"]: r for r in json_lines(server.log_path) if r.get("endpoint") == "logged"
                               and "event" in r} if any(r.get("event") == "config_live"
                                                       for r in json_lines(server.log_path)) else None,
                      what="the control plane's records")
        start, ready, live = events["replica_start"], events["replica_ready"], events["config_live"]
        assert start["replica_id"] == ready["replica_id"]
        assert start["entity"] == ready["entity"]
        assert ready["start_s"] > 0
        assert live["config_version"] == 1
        assert (live["logger"], live["level"]) == ("berth.reconciler", "INFO")
    finally:
        server.stop()


def test_a_bad_log_format_stops_the_server_with_a_clear_message(tmp_path: Path) -> None:
    env = {"BERTH_LOG_FORMAT": "xml", "BERTH_DATA_DIR": str(tmp_path / "data"), "BERTH_CONFIG_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "berth", "server", "--port", "0"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})
    assert proc.returncode != 0
    assert "log format must be one of text, json, not 'xml'" in proc.stderr
