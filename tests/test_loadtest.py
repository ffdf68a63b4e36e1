"""`berth loadtest` end to end: against a real Berth endpoint (closed and open loop, as a user runs it),
against small in-process servers that stall, drop or ignore requests (the engine's accounting and its
freedom from coordinated omission), and the nginx ceiling benchmark's smoke run."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httptools
import pytest
import uvloop
from bench.loadtest_ceiling import nginx_binary

from berth.client.loadtest import HttpTarget, LoadResult, LoadSpec, LoadTestError, run_load
from tests.conftest import REPO

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
REFUSED = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 2\r\n\r\n{}"
SLOW_OK_S = 0.03


def berth(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    return subprocess.run([sys.executable, "-m", "berth", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_accounted(result: dict[str, Any]) -> None:
    """Every measured request ended exactly once: as a response (by status) or as an error."""
    assert sum(result["status_codes"].values()) == result["responses"], result
    assert result["responses"] + sum(result["errors"].values()) == result["requests"], result
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"], lat


# --------------------------------------------------------------------------- against Berth


def test_loadtest_against_a_berth_endpoint(shared_server: Any, model_zoo: Any, unique_name: str) -> None:
    shared_server.deploy(unique_name, model_zoo("sklearn_classifier"))
    flags = ["--host", shared_server.url, "--token", shared_server.token]

    closed = berth("loadtest", unique_name, *flags, "--concurrency", "4", "--duration", "2", "--json")
    assert closed.returncode == 0, closed.stderr
    result = json.loads(closed.stdout)
    assert result["mode"] == "closed"
    assert result["method"] == "POST"
    assert result["url"] == f"{shared_server.url}/serving-endpoints/{unique_name}/invocations"
    assert result["body_bytes"] > 100  # the model's serving example, found through its OpenAPI document
    assert result["status_codes"] == {"200": result["responses"]}
    assert result["requests"] > 20
    assert_accounted(result)
    assert result["rps"] > 10
    rec = result["recommendation"]
    assert rec["target_qps"] == result["rps"]
    assert rec["provisioned_concurrency"] == max(1, math.ceil(rec["target_qps"] * result["latency_ms"]["p50"] / 1000))

    body = json.dumps({"dataframe_records": [{f"f{i}": 0.5 for i in range(20)}]})
    opened = berth("loadtest", unique_name, *flags, "--rate", "40", "--duration", "2", "--warmup", "0.5",
                   "--concurrency", "4", "--body", body, "--target-qps", "500")
    assert opened.returncode == 0, opened.stderr
    text = " ".join(opened.stdout.split())
    assert "open loop at 40 req/s" in text, text
    assert "80: 80 answered, 0 failed" in text, text  # 40/s × 2 s, all scheduled requests answered
    assert "200: 80" in text, text
    assert "Provisioned concurrency for 500.0 req/s (--target-qps):" in text, text
    assert "p99.9" in text
    assert "Little's law" in text


def test_loadtest_reports_a_missing_endpoint(shared_server: Any) -> None:
    done = berth("loadtest", "no-such-endpoint", "--host", shared_server.url, "--token", shared_server.token,
                 "--duration", "1")
    assert done.returncode == 1
    assert "RESOURCE_DOES_NOT_EXIST" in done.stderr


# --------------------------------------------------------------------------- against stub servers


class StubServer:
    """An HTTP/1.1 server on a loopback port, in a thread: `ok` answers at once; `stall` holds every
    answer due in [0.5 s, 1.0 s) after the first request until 1.0 s; `drop` closes the connection
    instead of answering every third request; `silent` never answers; `garbage` answers non-HTTP;
    `refuse` answers every other request 429 at once and the others 200 after 30 ms."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self.first: float | None = None
        self.loop = asyncio.new_event_loop()
        self.transports: list[asyncio.Transport] = []
        self.server = self.loop.run_until_complete(self.loop.create_server(self._protocol, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _protocol(self) -> asyncio.Protocol:
        stub = self

        class Conn(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: asyncio.Transport = transport  # type: ignore[assignment]
                stub.transports.append(self.transport)
                self.parser = httptools.HttpRequestParser(self)

            def data_received(self, data: bytes) -> None:
                self.parser.feed_data(data)

            def on_message_complete(self) -> None:
                stub.answer(self.transport)

        return Conn()

    def answer(self, transport: asyncio.Transport) -> None:
        self.requests += 1
        now = time.monotonic()
        self.first = self.first if self.first is not None else now
        if self.mode == "silent":
            return
        if self.mode == "garbage":
            transport.write(b"HELLO\r\n\r\n")
        elif self.mode == "drop" and self.requests % 3 == 0:
            transport.close()
        elif self.mode == "refuse":
            if self.requests % 2:
                transport.write(REFUSED)
            else:
                self.loop.call_later(SLOW_OK_S, transport.write, OK)
        elif self.mode == "stall" and self.first + 0.5 <= now < self.first + 1.0:
            self.loop.call_later(self.first + 1.0 - now, transport.write, OK)
        else:
            transport.write(OK)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/x"

    def close(self) -> None:
        def shutdown() -> None:
            self.server.close()
            for transport in self.transports:
                transport.close()
            self.loop.call_later(0.05, self.loop.stop)

        self.loop.call_soon_threadsafe(shutdown)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def stub(request: pytest.FixtureRequest) -> Iterator[StubServer]:
    server = StubServer(request.param)
    yield server
    server.close()


def load(server: StubServer, **spec: Any) -> LoadResult:
    target = HttpTarget(server.url(), body=b'{"x": 1}', headers=(("Content-Type", "application/json"),))
    return uvloop.run(run_load(target, LoadSpec(**spec)))


def as_dict(result: LoadResult) -> dict[str, Any]:
    return result.to_dict()


@pytest.mark.parametrize("stub", ["stall"], indirect=True)
def test_open_loop_counts_the_wait_of_requests_a_stalled_server_held_up(stub: StubServer) -> None:
    # 200/s on one connection; the server stalls 0.5 s: ~100 requests fall due meanwhile and wait.
    result = load(stub, concurrency=1, rate=200, duration_s=2.0)
    assert result.requests == 400
    assert_accounted(as_dict(result))
    assert result.waited_for_connection >= 50
    assert result.latency_ms["max"] >= 400
    assert result.latency_ms["p90"] >= 100, result.latency_ms  # a quarter of all requests waited 0–500 ms
    assert any("waited" in note for note in result.notes)


@pytest.mark.parametrize("stub", ["stall"], indirect=True)
def test_closed_loop_sees_one_slow_request_where_the_open_loop_sees_many(stub: StubServer) -> None:
    result = load(stub, concurrency=1, duration_s=1.5)
    assert_accounted(as_dict(result))
    assert result.latency_ms["max"] >= 400  # the one request the server held
    assert result.latency_ms["p90"] < 50, result.latency_ms  # …and nothing queued behind it was sent


@pytest.mark.parametrize("stub", ["refuse"], indirect=True)
def test_latency_is_split_by_status_code(stub: StubServer) -> None:
    result = load(stub, concurrency=8, rate=200, duration_s=1.0)
    data = as_dict(result)
    assert_accounted(data)
    assert set(result.status_codes) == {200, 429}
    by_status = data["latency_by_status"]
    assert {code: s["count"] for code, s in by_status.items()} == data["status_codes"]
    for stats in by_status.values():
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["p99.9"] <= stats["max"], stats
    assert by_status["200"]["p50"] >= SLOW_OK_S * 1000  # the server held every 200 this long
    assert max(s["max"] for s in by_status.values()) == data["latency_ms"]["max"]


@pytest.mark.parametrize("stub", ["drop"], indirect=True)
def test_dropped_connections_are_read_errors_and_reconnected(stub: StubServer) -> None:
    result = load(stub, concurrency=4, duration_s=1.0)
    data = as_dict(result)
    assert_accounted(data)
    assert result.errors["read"] > 0
    assert result.status_codes == {200: result.responses}
    assert result.responses >= 2 * result.errors["read"] - 8  # two answers per drop, give or take the edges
    assert result.connect_errors == 0


@pytest.mark.parametrize("stub", ["silent"], indirect=True)
def test_unanswered_requests_time_out(stub: StubServer) -> None:
    result = load(stub, concurrency=2, duration_s=0.6, timeout_s=0.3)
    assert result.responses == 0
    assert result.requests >= 2
    assert result.errors["timeout"] == result.requests
    assert "Every request failed." in result.notes


@pytest.mark.parametrize("stub", ["garbage"], indirect=True)
def test_non_http_answers_are_parse_errors(stub: StubServer) -> None:
    result = load(stub, concurrency=2, duration_s=0.5)
    assert result.responses == 0
    assert result.errors["parse"] == result.requests > 0


def test_nothing_listening_is_a_clear_error() -> None:
    with pytest.raises(LoadTestError, match="Cannot connect"):
        uvloop.run(run_load(HttpTarget("http://127.0.0.1:9/"), LoadSpec(duration_s=0.5)))


# --------------------------------------------------------------------------- the nginx ceiling


@pytest.mark.skipif(shutil.which("wrk") is None,
                    reason="wrk is not installed (./scripts/setup test installs it where apt-get is usable)")
@pytest.mark.skipif(nginx_binary() is None,
                    reason="nginx is not installed and could not be: ./scripts/setup test installs it with "
                           "apt-get (as root or with passwordless sudo); install nginx-light or nginx to run this")
@pytest.mark.slow
def test_loadtest_ceiling_smoke(tmp_path: Path) -> None:
    out = tmp_path / "ceiling.json"
    # The ×2 requirement is the benchmark's own verdict; the smoke run checks the harness, not speed.
    proc = subprocess.run([sys.executable, "-m", "bench.loadtest_ceiling", "--smoke", "--min-ratio", "0",
                           "--json-out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=240)
    context = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, context
    assert "berth loadtest (1 process):" in proc.stdout, context
    assert "wrk -t1:" in proc.stdout, context
    saved = json.loads(out.read_text())
    assert saved["ok"] is True, context
    assert "Berth lr c=64 (wrk, both cores):" in proc.stdout, context
    assert all(saved["median_rps"][tool] > 0 for tool in ("loadtest", "wrk", "berth_lr")), context
    assert saved["loadtest_over_berth_lr"] > 0, context
    assert {run["tool"] for run in saved["runs"]} == {"loadtest", "wrk", "berth-lr"}, context
    assert all(run["errors"] == 0 for run in saved["runs"]), context
