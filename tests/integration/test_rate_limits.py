"""Rate limits against real servers: one gateway, two gateway processes on one host sharing their
windows through mapped files, and two separate servers sharing them through the real Redis. In each,
300 requests inside one window against a limit of 100 a minute: exactly 100 answered 200 and 200
answered 429 REQUEST_LIMIT_EXCEEDED with Retry-After."""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any

import httpx
import pytest
from databricks.sdk import WorkspaceClient
from databricks.sdk.service.serving import AiGatewayRateLimit, AiGatewayRateLimitKey, AiGatewayRateLimitRenewalPeriod

from tests.fixtures.models import FEATURES

BODY = {"dataframe_split": {"columns": FEATURES, "data": [[0.2] * 20]}}
LIMIT = {"rate_limits": [{"calls": 100, "key": "endpoint", "renewal_period": "minute"}]}
CONNECTIONS = 16
SENT = 300
SSL_CONTEXT = ssl.create_default_context()  # one for every client (plain HTTP; httpx builds one per client)


def deploy_limited(server: Any, name: str, model: Any, limits: dict[str, Any] = LIMIT) -> None:
    # Provisioned concurrency = the connections: admission never refuses here, only the rate limit does.
    server.deploy(name, model, max_provisioned_concurrency=CONNECTIONS, min_provisioned_concurrency=CONNECTIONS)
    response = server.api("PUT", f"/{name}/ai-gateway", json=limits)
    assert response.status_code == 200, response.text
    assert response.json() == limits


async def open_clients(urls_tokens: list[tuple[str, str]], per_process: int) -> list[httpx.AsyncClient]:
    """Keep-alive connections, `per_process` answered by each gateway process of each server (the
    kernel spreads connections over processes; a ping on each says which one it reached)."""
    kept: dict[tuple[str, str], list[httpx.AsyncClient]] = collections.defaultdict(list)
    spare: list[httpx.AsyncClient] = []
    for url, token in urls_tokens:
        for _ in range(400):
            client = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60,
                                       limits=httpx.Limits(max_connections=1), verify=SSL_CONTEXT)
            process = (url, (await client.get("/ping")).headers["x-berth-gateway"])
            (kept[process] if len(kept[process]) < per_process else spare).append(client)
            counts = [len(v) for k, v in kept.items() if k[0] == url]
            if counts and min(counts) >= per_process and len(counts) == expected_processes(url):
                break
    for client in spare:
        await client.aclose()
    return [client for clients in kept.values() for client in clients]


_processes: dict[str, int] = {}


def expected_processes(url: str) -> int:
    return _processes.get(url, 1)


async def burst(targets: list[tuple[str, str]], per_process: int, path: str, total: int) -> list[httpx.Response]:
    """`total` requests round-robin over `per_process` connections to each gateway process of each
    (url, token), each connection sending its share back to back."""
    clients = await open_clients(targets, per_process)
    assert len(clients) == per_process * sum(expected_processes(url) for url, _ in targets)
    shares = [total // len(clients) + (i < total % len(clients)) for i in range(len(clients))]

    async def run(client: httpx.AsyncClient, n: int) -> list[httpx.Response]:
        return [await client.post(path, json=BODY) for _ in range(n)]

    try:
        answers = await asyncio.gather(*(run(c, n) for c, n in zip(clients, shares, strict=True)))
    finally:
        for client in clients:
            await client.aclose()
    return [r for rs in answers for r in rs]


def assert_exactly_the_limit(answers: list[httpx.Response]) -> None:
    statuses = collections.Counter(r.status_code for r in answers)
    assert statuses == {200: 100, 429: SENT - 100}, statuses
    for r in answers:
        if r.status_code == 429:
            assert r.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED", r.text
            assert 1 <= int(r.headers["retry-after"]) <= 60


def test_one_gateway_admits_exactly_the_limit(shared_server, model_zoo, unique_name) -> None:
    deploy_limited(shared_server, unique_name, model_zoo("sklearn_classifier"))
    assert shared_server.get(unique_name)["ai_gateway"] == LIMIT
    answers = asyncio.run(burst([(shared_server.url, shared_server.token)], CONNECTIONS,
                                f"/serving-endpoints/{unique_name}/invocations", SENT))
    assert_exactly_the_limit(answers)
    # Lifting the limit takes effect at once.
    assert shared_server.api("PUT", f"/{unique_name}/ai-gateway", json={}).status_code == 200
    assert shared_server.invoke(unique_name, BODY).status_code == 200
    assert "ai_gateway" not in shared_server.get(unique_name)


@pytest.mark.slow
def test_two_gateway_processes_share_their_windows(server_factory, model_zoo) -> None:
    server = server_factory(args=["--gateway-workers", "2"])
    _processes[server.url] = 2
    deploy_limited(server, "limited", model_zoo("sklearn_classifier"))
    path = "/serving-endpoints/limited/invocations"
    answers = asyncio.run(burst([(server.url, server.token)], CONNECTIONS // 2, path, SENT))
    # First: each process served its share.
    by_process = collections.Counter(r.headers["x-berth-gateway"] for r in answers)
    assert set(by_process) == {"0", "1"}, by_process
    assert min(by_process.values()) >= 0.25 * SENT, by_process
    assert_exactly_the_limit(answers)
    admitted = collections.Counter(r.headers["x-berth-gateway"] for r in answers if r.status_code == 200)
    assert set(admitted) == {"0", "1"}, admitted  # both admitted some: the windows really are shared


@pytest.mark.slow
def test_two_servers_share_their_windows_through_redis(server_factory, model_zoo, redis_url, unique_name) -> None:
    servers = [server_factory(args=["--redis-url", redis_url]) for _ in range(2)]
    for server in servers:  # separate stores and processes: only Redis is shared (as on two hosts)
        deploy_limited(server, unique_name, model_zoo("sklearn_classifier"))
    answers = asyncio.run(burst([(s.url, s.token) for s in servers], CONNECTIONS // 2,
                                f"/serving-endpoints/{unique_name}/invocations", SENT))
    by_server = collections.Counter(str(r.url).split("/serving-endpoints")[0] for r in answers)
    assert min(by_server.values()) >= 0.25 * SENT, by_server
    assert_exactly_the_limit(answers)
    admitted = collections.Counter(str(r.url).split("/serving-endpoints")[0] for r in answers if r.status_code == 200)
    assert len(admitted) == 2, admitted


def test_per_user_limits_and_the_sdk(shared_server, model_zoo, unique_name) -> None:
    deploy_limited(shared_server, unique_name, model_zoo("sklearn_classifier"), limits={"rate_limits": []})
    sdk = WorkspaceClient(host=shared_server.url, token=shared_server.token, auth_type="pat")
    answer = sdk.serving_endpoints.put_ai_gateway(unique_name, rate_limits=[AiGatewayRateLimit(
        calls=3, key=AiGatewayRateLimitKey.USER, renewal_period=AiGatewayRateLimitRenewalPeriod.MINUTE)])
    assert answer.rate_limits is not None
    assert answer.rate_limits[0].calls == 3
    # A second user with CAN_QUERY has a window of its own.
    shared_server.client.post("/api/2.0/preview/scim/v2/Users", json={"userName": f"{unique_name}@x"})
    token = shared_server.client.post("/api/2.0/token-management/on-behalf-of/tokens",
                                      json={"user_name": f"{unique_name}@x"}).json()["token_value"]
    endpoint_id = shared_server.get(unique_name)["id"]
    granted = shared_server.client.patch(f"/api/2.0/permissions/serving-endpoints/{endpoint_id}", json={
        "access_control_list": [{"user_name": f"{unique_name}@x", "permission_level": "CAN_QUERY"}]})
    assert granted.status_code == 200, granted.text
    path = f"/serving-endpoints/{unique_name}/invocations"
    admin = [shared_server.client.post(path, json=BODY).status_code for _ in range(4)]
    with httpx.Client(base_url=shared_server.url, headers={"Authorization": f"Bearer {token}"}) as other:
        theirs = [other.post(path, json=BODY).status_code for _ in range(4)]
        # They may query but not change the limits.
        refused = other.put(f"/api/2.0/serving-endpoints/{unique_name}/ai-gateway", json=LIMIT)
        assert refused.status_code == 403, refused.text
    assert admin == [200, 200, 200, 429]
    assert theirs == [200, 200, 200, 429]


BAD_CONFIGS = [
    ({"rate_limits": [{"calls": 5, "key": "user_group", "renewal_period": "minute"}]}, "groups are not supported"),
    ({"rate_limits": [{"calls": -1}]}, "calls must be an integer"),
    ({"guardrails": {"input": {"safety": True}}}, "guardrails are not supported yet"),
    ({"bogus": 1}, "unknown field"),
    ([1], "must be a JSON object"),
]


def test_bad_ai_gateway_configs_are_refused_and_change_nothing(shared_server, model_zoo, unique_name) -> None:
    deploy_limited(shared_server, unique_name, model_zoo("sklearn_classifier"))
    for body, words in BAD_CONFIGS:
        response = shared_server.api("PUT", f"/{unique_name}/ai-gateway", json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        assert words in response.json()["message"]
    assert shared_server.get(unique_name)["ai_gateway"] == LIMIT


def test_rate_limits_on_create_and_after_a_restart(server_factory, model_zoo) -> None:
    server = server_factory()
    model = str(model_zoo("sklearn_classifier"))
    created = server.create("deprecated", {"served_entities": [{"entity_name": model}]},
                            rate_limits=[{"calls": 2, "key": "endpoint", "renewal_period": "minute"}])
    assert created.status_code == 200, created.text
    server.wait_not_updating("deprecated")
    assert [server.invoke("deprecated", BODY).status_code for _ in range(3)] == [200, 200, 429]
    server.stop()
    again = server_factory(data_dir=server.data_dir)
    again.wait_not_updating("deprecated")
    assert again.get("deprecated")["ai_gateway"]["rate_limits"][0]["calls"] == 2
    assert again.api("PUT", "/deprecated/rate-limits", json={"rate_limits": [{"calls": 1}]}).json() == {
        "rate_limits": [{"calls": 1, "key": "endpoint", "renewal_period": "minute"}]}
    assert [again.invoke("deprecated", BODY).status_code for _ in range(2)] == [200, 429]
