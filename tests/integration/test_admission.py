"""Admission against a real server: the provisioned concurrency running, as many more forming the
replicas' next calls, the rest of the queue-wait budget queued in the gateway, then 429
RESOURCE_EXHAUSTED with Retry-After; the request deadline answers 504; a client that disconnects
while queued in the gateway never has its request run."""

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
DEADLINE_S = 5.0
QUEUE_WAIT_S = 2.5 * SLEEP_S  # a bound of 2.5 service times of work: 2 per slot (floor), 1 of them in the gateway


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_zoo):  # type: ignore[no-untyped-def]
    from tests.conftest import start_server

    # One request per replica at a time (no vertical tuning), a short deadline, a queue of 2.5 service times.
    srv = start_server(tmp_path_factory.mktemp("admission"), extra_env={
        "BERTH_REPLICA_CONCURRENCY": "1", "BERTH_REQUEST_TIMEOUT_S": str(DEADLINE_S),
        "BERTH_QUEUE_WAIT_S": str(QUEUE_WAIT_S)})
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
    assert post(server, "two").status_code == 200  # the gateway observes one service time (1 s)
    start = threading.Barrier(12)

    def one(_: int) -> httpx.Response:
        start.wait()
        return post(server, "two")

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    statuses = collections.Counter(r.status_code for r in answers)
    # Of the bound of floor(2 × 2.5) = 4 waiting: 2 form the replicas' next calls, 2 wait in the gateway;
    # 2 run; the other 6 are refused.
    assert statuses == {200: 6, 429: 6}, statuses
    for r in answers:
        if r.status_code == 429:
            assert r.json()["error_code"] == "RESOURCE_EXHAUSTED", r.text
            assert int(r.headers["retry-after"]) >= 1
            assert r.elapsed.total_seconds() < SLEEP_S  # refused without waiting for a slot
    assert post(server, "two").status_code == 200  # and it serves again once the burst passed
    assert metric_samples(server, "berth_admission_refused_total", endpoint="two", entity="two") == [6]


def test_a_request_past_its_deadline_gets_504(server) -> None:  # type: ignore[no-untyped-def]
    answer = post(server, "one", {**X_BODY, "params": {"sleep": DEADLINE_S + 2}})
    assert answer.status_code == 504, answer.text
    assert answer.json()["error_code"] == "DEADLINE_EXCEEDED"
    poll(lambda: replica_stats(replicas_named(server, "one")[0].socket)["in_flight"] == 0, timeout=30,
         what="the replica to finish the late request")


def send_then_leave(server: Any, name: str, linger_s: float = 0.3) -> None:
    """Send one invocation on a raw connection and close it after `linger_s`, before any answer."""
    body = httpx.Request("POST", "/", json=X_BODY).read()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(f"POST /serving-endpoints/{name}/invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    f"{server.token}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                    .encode() + body)
        time.sleep(linger_s)


def cancelled_count(server: Any, name: str) -> float:
    return sum(metric_samples(server, "berth_requests_total", endpoint=name, status="499"))


def test_a_client_that_disconnects_while_queued_never_runs(server) -> None:  # type: ignore[no-untyped-def]
    (replica,) = replicas_named(server, "one")
    assert post(server, "one").status_code == 200  # the gateway observes one service time (1 s)
    before = replica_stats(replica.socket)["requests"]
    cancelled = cancelled_count(server, "one")
    with ThreadPoolExecutor(2) as pool:
        sent_on = [pool.submit(post, server, "one") for _ in range(2)]
        poll(lambda: replica_stats(replica.socket)["in_flight"] == 2, what="one request to run, one to wait behind it")
        # The third waits in the gateway's queue (the bound is 2, one at the replica); then its client goes away.
        send_then_leave(server, "one")
        assert [f.result().status_code for f in sent_on] == [200, 200]
    poll(lambda: cancelled_count(server, "one") == cancelled + 1, what="the cancelled request to be counted")
    time.sleep(SLEEP_S + 0.5)  # had it been sent on, it would have run by now
    assert replica_stats(replica.socket)["requests"] == before + 2


def test_a_client_that_disconnects_while_its_request_waits_at_the_replica_never_runs(server) -> None:  # type: ignore[no-untyped-def]
    (replica,) = replicas_named(server, "one")
    stats = replica_stats(replica.socket)
    before, dropped, cancelled = stats["requests"], stats["cancelled"], cancelled_count(server, "one")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, server, "one")
        poll(lambda: replica_stats(replica.socket)["in_flight"] == 1, what="the first request to run")
        # The second is sent on to the replica to wait for the next model call; its client goes away.
        with ThreadPoolExecutor(1) as leaver:
            left = leaver.submit(send_then_leave, server, "one", 0.5)
            poll(lambda: replica_stats(replica.socket)["in_flight"] == 2, what="the second to wait at the replica")
            left.result()
        assert running.result().status_code == 200
    poll(lambda: cancelled_count(server, "one") == cancelled + 1, what="the cancelled request to be counted")
    poll(lambda: replica_stats(replica.socket)["in_flight"] == 0, what="the replica to drop it")
    stats = replica_stats(replica.socket)
    assert stats["cancelled"] == dropped + 1  # dropped before its model call
    assert stats["requests"] == before + 1
