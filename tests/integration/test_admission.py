"""Admission against a real server: at most the provisioned concurrency in flight plus a queue of
about as many, then 429 RESOURCE_EXHAUSTED with Retry-After; the request deadline answers 504; a
client that disconnects while queued never has its request run."""

from __future__ import annotations

import collections
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.integration.replica_tools import X_BODY, metric_samples, poll, replica_stats, replicas_named

pytestmark = pytest.mark.slow
SLEEP_S = 1.0
DEADLINE_S = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_zoo):  # type: ignore[no-untyped-def]
    from tests.conftest import start_server

    # One request per replica at a time (no vertical tuning), a short deadline.
    srv = start_server(tmp_path_factory.mktemp("admission"), extra_env={
        "BERTH_REPLICA_CONCURRENCY": "1", "BERTH_REQUEST_TIMEOUT_S": str(DEADLINE_S)})
    model = model_zoo("sleep_model", seconds=SLEEP_S)
    for name, concurrency in (("two", 2), ("one", 1)):  # each entity named as its endpoint
        created = srv.create(name, {"served_entities": [{
            "name": name, "entity_name": str(model), "min_provisioned_concurrency": concurrency,
            "max_provisioned_concurrency": concurrency}]})
        assert created.status_code == 200, created.text
        assert srv.wait_not_updating(name)["state"]["ready"] == "READY"
    yield srv
    srv.stop()


def post(server: Any, name: str, body: Any = X_BODY) -> httpx.Response:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=30) as c:
        return c.post(f"/serving-endpoints/{name}/invocations", json=body)


def test_beyond_concurrency_and_queue_requests_are_refused_at_once(server) -> None:  # type: ignore[no-untyped-def]
    assert len(replicas_named(server, "two")) == 2  # provisioned concurrency 2 = 2 replicas × 1
    start = threading.Barrier(12)

    def one(_: int) -> httpx.Response:
        start.wait()
        return post(server, "two")

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    statuses = collections.Counter(r.status_code for r in answers)
    # 2 run, 2 wait (the queue holds one service time of work: the concurrency), 8 are refused.
    assert statuses == {200: 4, 429: 8}, statuses
    for r in answers:
        if r.status_code == 429:
            assert r.json()["error_code"] == "RESOURCE_EXHAUSTED", r.text
            assert int(r.headers["retry-after"]) >= 1
            assert r.elapsed.total_seconds() < SLEEP_S  # refused without waiting for a slot
    assert post(server, "two").status_code == 200  # and it serves again once the burst passed


def test_a_request_past_its_deadline_gets_504(server) -> None:  # type: ignore[no-untyped-def]
    answer = post(server, "one", {**X_BODY, "params": {"sleep": DEADLINE_S + 2}})
    assert answer.status_code == 504, answer.text
    assert answer.json()["error_code"] == "DEADLINE_EXCEEDED"
    poll(lambda: replica_stats(replicas_named(server, "one")[0].socket)["in_flight"] == 0, timeout=30,
         what="the replica to finish the late request")


def test_a_client_that_disconnects_while_queued_never_runs(server) -> None:  # type: ignore[no-untyped-def]
    (replica,) = replicas_named(server, "one")
    before = replica_stats(replica.socket)["requests"]
    cancelled = sum(metric_samples(server, "berth_requests_total", endpoint="one", status="499"))
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, server, "one")
        poll(lambda: replica_stats(replica.socket)["in_flight"] == 1, what="the first request to run")
        # The second waits in the gateway's queue (the one slot is taken); then its client goes away.
        body = httpx.Request("POST", "/", json=X_BODY).read()
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(f"POST /serving-endpoints/one/invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                        f"{server.token}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                        .encode() + body)
            time.sleep(0.3)
        assert running.result().status_code == 200
    poll(lambda: sum(metric_samples(server, "berth_requests_total", endpoint="one", status="499")) == cancelled + 1,
         what="the cancelled request to be counted")
    time.sleep(SLEEP_S + 0.5)  # had it been sent on, it would have run by now
    assert replica_stats(replica.socket)["requests"] == before + 1
