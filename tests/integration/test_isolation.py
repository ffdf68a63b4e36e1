"""Isolation between endpoints: one endpoint's load or crash must not disturb another's requests."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.integration.replica_tools import (
    X_BODY,
    client_for,
    create_and_wait,
    entity_state,
    poll,
    replica_stats,
    replicas_named,
)

A_IN_FLIGHT = 200
B_REQUESTS = 200
B_BODY = {"dataframe_split": {"columns": [f"f{i}" for i in range(20)], "data": [[0.3] * 20, [1.5] * 20]}}


class Load:
    """`n` concurrent requests to one endpoint, sent from an asyncio loop in a background thread."""

    def __init__(self, server: ServerProcess, endpoint: str, n: int, body: dict[str, Any]) -> None:
        self.server, self.endpoint, self.n, self.body = server, endpoint, n, body
        self.results: list[int | str] = []  # status codes, or the exception's name
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> Load:
        self.thread.start()
        return self

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.n + 10, max_keepalive_connections=self.n + 10)
        headers = {"Authorization": f"Bearer {self.server.token}"}
        async with httpx.AsyncClient(
            base_url=self.server.url, headers=headers, limits=limits, timeout=600.0
        ) as client:

            async def one() -> None:
                try:
                    path = f"/serving-endpoints/{self.endpoint}/invocations"
                    response = await client.post(path, json=self.body)
                    self.results.append(response.status_code)
                except Exception as exc:
                    self.results.append(type(exc).__name__)

            await asyncio.gather(*(one() for _ in range(self.n)))


class Sequential:
    """Back-to-back requests to one endpoint in a thread, recording latencies and failures."""

    def __init__(self, server: ServerProcess, endpoint: str, body: dict[str, Any]) -> None:
        self.server, self.endpoint, self.body = server, endpoint, body
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with client_for(self.server, timeout=60.0) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    response = client.post(f"/serving-endpoints/{self.endpoint}/invocations", json=self.body)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                self.latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    self.errors.append(f"{response.status_code} {response.text[:300]}")

    @property
    def count(self) -> int:
        return len(self.latencies) + len(self.errors)


def measure(client: httpx.Client, endpoint: str, n: int) -> tuple[list[float], list[str]]:
    latencies, errors = [], []
    for _ in range(n):
        started = time.perf_counter()
        response = client.post(f"/serving-endpoints/{endpoint}/invocations", json=B_BODY)
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            errors.append(f"{response.status_code} {response.text[:300]}")
    return latencies, errors


def percentiles(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p50 = ordered[int(0.50 * (len(ordered) - 1))] * 1000
    p99 = ordered[int(0.99 * (len(ordered) - 1))] * 1000
    return f"p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   (n={len(ordered)})"


def a_in_flight(server: ServerProcess) -> int:
    return sum(replica_stats(r.socket)["in_flight"] for r in replicas_named(server, "sleepy"))


@pytest.mark.slow
def test_a_loaded_or_crashing_endpoint_does_not_disturb_another(server_factory, model_zoo, capsys):
    server = server_factory(extra_env={"BERTH_CORES": "2", "BERTH_REQUEST_TIMEOUT_S": "300"})
    sleepy = {
        "name": "sleepy",
        "entity_name": str(model_zoo("sleep_model", seconds=5.0)),
        "min_provisioned_concurrency": A_IN_FLIGHT,
        "max_provisioned_concurrency": A_IN_FLIGHT,
    }
    assert create_and_wait(server, "ep-a", [sleepy])["state"]["ready"] == "READY"
    fast = {"name": "fast", "entity_name": str(model_zoo("sklearn_classifier"))}
    assert create_and_wait(server, "ep-b", [fast])["state"]["ready"] == "READY"
    a_replicas = replicas_named(server, "sleepy")
    assert len(a_replicas) == 2  # 200 provisioned on 2 cores: 2 replicas x 100
    (b_replica,) = replicas_named(server, "fast")

    with client_for(server) as client:
        measure(client, "ep-b", 20)  # warm up
        unloaded, errors = measure(client, "ep-b", B_REQUESTS)
        assert errors == []

    # A: 200 requests in flight, each sleeping 5 s in A's replicas; B serves all the while.
    load = Load(server, "ep-a", A_IN_FLIGHT, X_BODY).start()
    poll(lambda: a_in_flight(server) == A_IN_FLIGHT, timeout=60, what="A's requests in flight")
    b_during = Sequential(server, "ep-b", B_BODY)
    b_during.thread.start()
    load.thread.join(timeout=120)
    b_during.stop.set()
    b_during.thread.join(timeout=60)
    assert not load.thread.is_alive(), "A's requests hung"
    assert load.results == [200] * A_IN_FLIGHT, sorted(set(map(str, load.results)))  # all ran at once
    assert b_during.errors == [], b_during.errors[:5]
    assert len(b_during.latencies) >= 10, "B was served while A's 200 requests were in flight"
    loaded = b_during.latencies

    # kill -9 of A's replicas, with A's requests in flight, while B serves continuously: B sees no
    # error, during or after; every A request on a killed replica is answered 503, none hangs.
    long_sleep = {**X_BODY, "params": {"sleep": 60.0}}
    load = Load(server, "ep-a", A_IN_FLIGHT, long_sleep).start()
    poll(lambda: a_in_flight(server) == A_IN_FLIGHT, timeout=60, what="A's requests in flight")
    b_loop = Sequential(server, "ep-b", B_BODY)
    b_loop.thread.start()
    try:
        poll(lambda: b_loop.count >= 20, timeout=30, what="B serving")
        victim = a_replicas[0]
        os.kill(victim.pid, signal.SIGKILL)
        poll(lambda: load.results.count(503) >= 1, timeout=30, what="A's killed requests answered")
        server.wait_until(
            "ep-a",
            lambda v: entity_state(v)["deployment"] == "DEPLOYMENT_READY"
            and len(replicas_named(server, "sleepy")) == 2
            and victim.pid not in {r.pid for r in replicas_named(server, "sleepy")},
            timeout=90,
        )
        recovered_at = b_loop.count
        poll(lambda: b_loop.count >= recovered_at + 100, timeout=60, what="B serving after A recovered")
        os.kill(a_replicas[1].pid, signal.SIGKILL)  # ends the rest of A's load
        load.thread.join(timeout=120)
    finally:
        b_loop.stop.set()
        b_loop.thread.join(timeout=90)
    assert b_loop.errors == [], b_loop.errors[:5]
    assert [r.pid for r in replicas_named(server, "fast")] == [b_replica.pid]
    assert not load.thread.is_alive(), "A's requests hung"
    assert load.results == [503] * A_IN_FLIGHT, sorted(set(map(str, load.results)))
    assert replica_stats(b_replica.socket)["pid"] == b_replica.pid

    with capsys.disabled():
        print("\nB (sklearn) latency through the gateway, sequential requests:")
        print(f"  unloaded                          {percentiles(unloaded)}")
        print(f"  A: {A_IN_FLIGHT} requests in flight          {percentiles(loaded)}")
        print(f"  A: replica kill -9 and recovery   {percentiles(b_loop.latencies)}")
