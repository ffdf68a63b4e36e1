"""Two gateway processes on one port behave as one gateway: each serves a share of the connections
(proved first, by the `x-berth-gateway` header of every answer), one `/metrics` scrape counts what
both served, control-plane calls work through either, and a worker that dies is replaced."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import ssl

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.models import FEATURES
from tests.integration.replica_tools import poll

pytestmark = pytest.mark.slow

CONNECTIONS = 64
PER_CONNECTION = 8
BODY = {"dataframe_split": {"columns": FEATURES, "data": [[0.2] * 20]}}
# httpx builds an SSL context (loading the CA bundle) for every client it makes, ~30 ms each: 64 clients
# per load cost seconds. These speak plain HTTP, so one context serves them all.
SSL_CONTEXT = ssl.create_default_context()


def requests_total(text: str, endpoint: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "berth_requests_total" and s.labels.get("endpoint") == endpoint)


async def load(url: str, token: str, path: str, body: object | None) -> list[tuple[int, str]]:
    """`CONNECTIONS` clients, each on its own keep-alive connection, `PER_CONNECTION` requests each."""
    async def one_client() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60,
                                     limits=httpx.Limits(max_connections=1), verify=SSL_CONTEXT) as client:
            out = []
            for _ in range(PER_CONNECTION):
                r = await (client.post(path, json=body) if body is not None else client.get(path))
                out.append((r.status_code, r.headers.get("x-berth-gateway", "")))
            return out

    results = await asyncio.gather(*(one_client() for _ in range(CONNECTIONS)))
    return [answer for client in results for answer in client]


def workers_of(server) -> list[psutil.Process]:  # type: ignore[no-untyped-def]
    """Live gateway worker processes of the server (a killed one not yet reaped is left out)."""
    found = []
    for child in psutil.Process(server.proc.pid).children():
        try:
            if "berth.gateway.worker" in child.cmdline():
                found.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return found


def test_two_gateway_processes_share_the_port_the_metrics_and_the_control_plane(server_factory, model_zoo):
    server = server_factory(args=["--gateway-workers", "2"])
    (worker,) = workers_of(server)
    # Provisioned concurrency for every connection: admission refuses none (each process admits half).
    server.deploy("shared", model_zoo("sklearn_classifier"), min_provisioned_concurrency=CONNECTIONS,
                  max_provisioned_concurrency=CONNECTIONS)
    before = requests_total(server.client.get("/metrics").text, "shared")

    answers = asyncio.run(load(server.url, server.token, "/serving-endpoints/shared/invocations", BODY))

    # First: both processes did their share.
    by_gateway = collections.Counter(name for _, name in answers)
    assert {status for status, _ in answers} == {200}
    assert set(by_gateway) == {"0", "1"}, by_gateway
    assert min(by_gateway.values()) >= 0.25 * len(answers), by_gateway
    # Then: one scrape, wherever it lands, counts what both served.
    for _ in range(6):
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"},
                          verify=SSL_CONTEXT) as fresh:
            scrape = fresh.get("/metrics")
        assert scrape.status_code == 200
        assert requests_total(scrape.text, "shared") - before == len(answers) == CONNECTIONS * PER_CONNECTION

    # The control plane answers through either process (the worker forwards to the main one).
    listed = asyncio.run(load(server.url, server.token, "/api/2.0/serving-endpoints", None))
    assert {status for status, _ in listed} == {200}
    assert {name for _, name in listed} == {"0", "1"}
    unauthorized = [httpx.get(f"{server.url}/api/2.0/serving-endpoints", verify=SSL_CONTEXT).status_code
                    for _ in range(8)]
    assert set(unauthorized) == {401}

    # A worker that dies is replaced, and the pair serves on.
    os.kill(worker.pid, signal.SIGKILL)
    replacement = poll(lambda: [w for w in workers_of(server) if w.pid != worker.pid], timeout=30,
                       what="a new gateway worker")
    assert len(replacement) == 1
    poll(lambda: {name for _, name in asyncio.run(load(server.url, server.token, "/ping", None))} == {"0", "1"},
         timeout=30, what="both gateway processes answering again")
    assert server.invoke("shared", BODY).status_code == 200

    assert server.stop() == 0
    assert not replacement[0].is_running() or replacement[0].status() == psutil.STATUS_ZOMBIE
