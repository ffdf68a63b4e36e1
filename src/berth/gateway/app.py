"""The gateway: one raw ASGI app in front of everything.

Open paths are answered directly; every other request needs a bearer token. Invocations take
the hot path (routing table → traffic split → replica → pooled forward) with no framework;
everything else goes to the control plane's app.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from berth.access import oauth
from berth.access.permissions import Caller
from berth.errors import BerthError, DeadlineExceeded, PermissionDenied, ResourceDoesNotExist, TemporarilyUnavailable
from berth.gateway.auth import TokenAuthority
from berth.gateway.routing import EntityRoute, EntityStatus, RoutingTable, choose_entity, choose_replica, failed
from berth.gateway.upstream import Upstream, UpstreamError, UpstreamResponse
from berth.http import (
    JSON,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    error_body,
    header,
    limit_body,
    read_body,
    send_response,
)
from berth.observability.metrics import Metrics
from berth.payload import PayloadLimits, check_head

OPEN_PATHS = frozenset({oauth.METADATA_PATH, oauth.TOKEN_PATH, oauth.HOST_METADATA_PATH})  # OAuth discovery, token
INVOCATIONS_PREFIX = "/serving-endpoints/"
INVOCATIONS_SUFFIX = "/invocations"
_HEALTH_HEADERS = [(b"content-type", JSON)]
HOLD_RETRY_S = 0.25  # a held request looks again at least this often, even with no new routing table


class Gateway:
    """Holds the routing table and a connection pool per ready replica."""

    def __init__(self, auth: TokenAuthority, metrics: Metrics, *, request_timeout_s: float, name: str = "0",
                 hold_timeout_s: float = 60.0, on_demand: Callable[[str, str], None] | None = None,
                 payload_limits: PayloadLimits | None = None) -> None:
        self.auth = auth
        self.payload_limits = payload_limits or PayloadLimits()  # what one request may carry (berth.payload)
        self.metrics = metrics
        self.name = name  # which of the host's gateway processes this is (the x-berth-gateway header)
        self.name_header = (b"x-berth-gateway", name.encode())
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._latency: dict[str, Any] = {}
        self.request_timeout_s = request_timeout_s
        self.table = RoutingTable()
        self.upstreams: dict[str, Upstream] = {}
        self.hold_timeout_s = hold_timeout_s
        self.on_demand = on_demand  # (endpoint, entity): a request waits for an entity at zero
        self._routes_changed: asyncio.Future[None] | None = None
        self.holding: dict[tuple[str, str], int] = {}  # requests waiting for a replica, by (endpoint, entity)

    def set_routes(self, table: RoutingTable) -> None:
        """Swap in a new routing table; pools of replicas it no longer names are closed."""
        live: dict[str, str] = {}
        for endpoint in table.endpoints.values():
            for entity in endpoint.entities:
                live.update(entity.replicas)
        for rid in list(self.upstreams):
            if rid not in live:
                self.upstreams.pop(rid).close()
        for rid, address in live.items():
            if rid not in self.upstreams:
                self.upstreams[rid] = Upstream(address)
        self.table = table
        changed, self._routes_changed = self._routes_changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)  # held requests look again

    def _outstanding(self, replica_id: str) -> int:
        upstream = self.upstreams.get(replica_id)
        return upstream.outstanding if upstream is not None else 0

    async def invoke(self, name: str, scope: Scope, receive: Receive, send: Send, caller: Caller) -> None:
        try:
            body = await read_body(receive, self.payload_limits.max_body_bytes)
        except BerthError as exc:  # a body over the limit: it never reaches a replica
            await self._refuse_body(name, send, exc)
            return
        read_at = time.perf_counter()
        route = self.table.endpoints.get(name)
        entity = ""
        outcome: UpstreamResponse | BerthError
        if route is None:
            outcome = ResourceDoesNotExist(f"Endpoint '{name}' does not exist.")
            name = ""  # unknown names get no metric series of their own
        elif not self.auth.may_query(caller, name):
            outcome = PermissionDenied(f"{caller.name} does not have CAN_QUERY on endpoint '{name}'.")
        else:
            choice = choose_entity(route, random.random() * 100.0)
            if isinstance(choice, BerthError):
                outcome = choice
            else:
                entity = choice.name
                outcome = await self._forward(name, choice, body, header(scope, b"content-type") or b"")
        if isinstance(outcome, BerthError):
            status, payload, headers = error_body(outcome)
            headers.append(self.name_header)
        else:
            status, payload = outcome.status, outcome.body
            headers = [(b"content-type", outcome.content_type), (b"served-model-name", entity.encode()),
                       self.name_header]
        await send_response(send, status, payload, headers)
        self._record(name, entity, status, read_at, outcome)

    async def _forward(
        self, name: str, choice: EntityRoute, body: bytes, content_type: bytes
    ) -> UpstreamResponse | BerthError:
        """Send the request to a ready replica of the entity. With none (starting, restarting, at
        zero, or each one refused the connection) the request waits for the next routing table
        that has one, up to `hold_timeout_s`."""
        gone: set[str] = set()  # replicas that refused the connection: the request never reached them
        held_since: float | None = None
        replicas = choice.replicas
        while True:
            if gone:
                replicas = tuple(r for r in replicas if r[0] not in gone)
            if not replicas:
                if held_since is None:
                    held_since = time.perf_counter()
                key = (name, choice.name)
                self.holding[key] = self.holding.get(key, 0) + 1
                try:
                    held = await self._hold(name, choice, gone, held_since)
                finally:
                    self.holding[key] -= 1
                if isinstance(held, BerthError):
                    return held
                choice, replicas = held, held.replicas
                continue
            replica_id, _ = choose_replica(replicas, self._outstanding)
            upstream = self.upstreams.get(replica_id)
            try:
                if upstream is None:  # removed from the table while the body was read
                    raise UpstreamError("replica was removed", delivered=False)
                return await upstream.request(b"/invocations", body, content_type, self.request_timeout_s)
            except UpstreamError as exc:
                if not exc.delivered:  # the replica is gone: another one may take it
                    gone.add(replica_id)
                    continue
                return TemporarilyUnavailable(
                    f"Replica of served entity '{choice.name}' stopped before answering ({exc}); retry the request.",
                    retry_after=1,
                )
            except TimeoutError:
                return DeadlineExceeded(
                    f"Served entity '{choice.name}' did not answer within {self.request_timeout_s:g} s."
                )

    async def _hold(self, name: str, entity: EntityRoute, gone: set[str], since: float) -> EntityRoute | BerthError:
        """Wait for a routing table in which the entity has a ready replica not in `gone`; wake it
        if it is at zero. Answers an error after `hold_timeout_s`, or when the entity failed."""
        deadline = since + self.hold_timeout_s
        loop = asyncio.get_running_loop()
        waited = False
        remaining = self.hold_timeout_s
        while True:
            if waited:
                if self._routes_changed is None:
                    self._routes_changed = loop.create_future()
                try:
                    await asyncio.wait_for(asyncio.shield(self._routes_changed), min(remaining, HOLD_RETRY_S))
                except TimeoutError:
                    gone.clear()  # no news: a replica that refused may take it now (e.g. a full backlog)
            waited_once, waited = waited, True
            route = self.table.endpoints.get(name)
            if route is None:
                return ResourceDoesNotExist(f"Endpoint '{name}' does not exist.")
            current = next((e for e in route.entities if e.name == entity.name), None)
            if current is None:  # a new config without it went live: choose again
                choice = choose_entity(route, random.random() * 100.0)
                if isinstance(choice, BerthError):
                    return choice
                current = choice
            elif current.status is EntityStatus.FAILED:
                return failed(name, current)
            entity = current
            if any(r[0] not in gone for r in entity.replicas):
                if waited_once:  # it did wait: record how long
                    self.metrics.held.labels(name, entity.name).observe(time.perf_counter() - since)
                return entity
            if entity.status is EntityStatus.ZERO and self.on_demand is not None:
                self.on_demand(name, entity.name)
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return TemporarilyUnavailable(
                    f"Served entity '{entity.name}' of endpoint '{name}' had no ready replica for "
                    f"{self.hold_timeout_s:g} s; retry shortly.",
                    retry_after=1,
                )

    async def _refuse_body(self, name: str, send: Send, exc: BerthError) -> None:
        """Answer a request refused before it was routed (its body is over the limit), and count it."""
        status, payload, headers = error_body(exc)
        await send_response(send, status, payload, [*headers, self.name_header])
        self._record(name if name in self.table.endpoints else "", "", status, time.perf_counter(), exc)

    def _record(self, endpoint: str, entity: str, status: int, read_at: float, outcome: object) -> None:
        done = time.perf_counter()
        key = (endpoint, entity, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.requests.labels(endpoint, entity, str(status))
        counter.inc()
        histogram = self._latency.get(endpoint)
        if histogram is None:
            histogram = self._latency[endpoint] = self.metrics.latency.labels(endpoint)
        histogram.observe(done - read_at)
        if isinstance(outcome, UpstreamResponse):
            self.metrics.gateway_added.observe((outcome.sent_at - read_at) + (done - outcome.received_at))

    def close(self) -> None:
        for upstream in self.upstreams.values():
            upstream.close()
        self.upstreams.clear()


class RootApp:
    """The server's ASGI entry: lifespan, open paths, auth, then data plane or control plane."""

    def __init__(
        self,
        gateway: Gateway,
        control: ASGIApp,
        *,
        on_startup: Callable[[], Awaitable[None]],
        on_shutdown: Callable[[], Awaitable[None]],
    ) -> None:
        self.gateway = gateway
        self.control = control
        self.on_startup = on_startup
        self.on_shutdown = on_shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = check_head(scope["headers"], self.gateway.payload_limits)  # header sizes, a Content-Length too large
        if refused is not None:
            await self._refuse(send, refused)
            return
        path: str = scope["path"]
        if path in ("/ping", "/health"):
            await send_response(send, 200, b"\n", [*_HEALTH_HEADERS, self.gateway.name_header])
            return
        if path in OPEN_PATHS:  # OAuth discovery and the token endpoint: no token yet
            await self._control(scope, receive, send)
            return
        try:
            caller = self.gateway.auth.authenticate(header(scope, b"authorization"))
        except BerthError as exc:
            await self._refuse(send, exc)
            return
        if path == "/metrics" and scope["method"] == "GET":
            if not caller.admin:
                await self._refuse(send, PermissionDenied("Only admins may read the platform's metrics."))
                return
            metrics = self.gateway.metrics
            await send_response(send, 200, metrics.render(), [(b"content-type", metrics.content_type.encode())])
            return
        if path.startswith(INVOCATIONS_PREFIX) and path.endswith(INVOCATIONS_SUFFIX):
            name = path[len(INVOCATIONS_PREFIX) : -len(INVOCATIONS_SUFFIX)]
            if "/" not in name and name and scope["method"] == "POST":
                await self.gateway.invoke(name, scope, receive, send, caller)
                return
        scope["berth.caller"] = caller
        await self._control(scope, receive, send)

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The control plane, its body held to the limit. Starlette answers the refusal itself; a worker's
        forwarder lets it out before it sent anything, and it is answered here."""
        try:
            limited = limit_body(receive, self.gateway.payload_limits.max_body_bytes)
            await self.control(scope, limited, self._naming(send))
        except BerthError as exc:
            await self._refuse(send, exc)

    async def _refuse(self, send: Send, exc: BerthError) -> None:
        status, body, headers = error_body(exc)
        await send_response(send, status, body, [*headers, self.gateway.name_header])

    def _naming(self, send: Send) -> Send:
        """`send` with this gateway process's name on the response (control-plane answers too)."""
        name = self.gateway.name_header

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != name[0]]
                message = {**message, "headers": [*headers, name]}
            await send(message)

        return named

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.on_startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await asyncio.shield(self.on_shutdown())
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return
