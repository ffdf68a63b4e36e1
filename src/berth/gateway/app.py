"""The gateway: one raw ASGI app in front of everything.

Open paths are answered directly; every other request needs a bearer token. Invocations take
the hot path (routing table → traffic split → replica → pooled forward) with no framework;
everything else goes to the control plane's app.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

from berth import dashboard
from berth.access import oauth
from berth.access.permissions import Caller
from berth.errors import (
    BerthError,
    ClientCancelled,
    DeadlineExceeded,
    PermissionDenied,
    RequestLimitExceeded,
    ResourceDoesNotExist,
    ResourceExhausted,
    TemporarilyUnavailable,
)
from berth.gateway.admission import Admission, Verdict, retry_after_s
from berth.gateway.auth import TokenAuthority
from berth.gateway.protocol import head_limited
from berth.gateway.routing import (
    EndpointRoute,
    EntityRoute,
    EntityStatus,
    RoutingTable,
    choose_entity,
    choose_replica,
    failed,
)
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
from berth.observability import tracing
from berth.observability.inference import InferenceLog
from berth.observability.metrics import Metrics
from berth.payload import PayloadLimits, check_head
from berth.ratelimit import Limiter
from berth.ratelimit.local import retry_after
from berth.ratelimit.rules import windows

log = logging.getLogger("berth.gateway")

# The page holds a token: it is never framed, runs only its own files, and its types are not sniffed.
_DASHBOARD_HEADERS = ((b"cache-control", b"no-cache"), (b"x-content-type-options", b"nosniff"),
                      (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'"))
OPEN_PATHS = frozenset({oauth.METADATA_PATH, oauth.TOKEN_PATH, oauth.HOST_METADATA_PATH})  # OAuth discovery, token
INVOCATIONS_PREFIX = "/serving-endpoints/"
INVOCATIONS_SUFFIX = "/invocations"
_HEALTH_HEADERS = [(b"content-type", JSON)]
HOLD_RETRY_S = 0.25  # a held request looks again at least this often, even with no new routing table


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has gone (the request's body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(sent: Awaitable[UpstreamResponse], receive: Receive) -> UpstreamResponse | None:
    """The replica's answer, or None once the client has gone first: the request to the replica is then
    abandoned (its connection closed, so the replica drops it unless its model call already began)."""
    task = asyncio.ensure_future(sent)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    if watch.exception() is not None:  # the watch failed, not the client: wait for the answer as usual
        return await task
    task.cancel()
    await asyncio.wait((task,))  # let it close its connection; never raises (a cancel of ours still does)
    return None


class Gateway:
    """Holds the routing table and a connection pool per ready replica."""

    def __init__(self, auth: TokenAuthority, metrics: Metrics, limiter: Limiter, *, request_timeout_s: float,
                 name: str = "0", hold_timeout_s: float = 60.0, queue_wait_s: float = 0.0,
                 on_demand: Callable[[str, str], None] | None = None,
                 payload_limits: PayloadLimits | None = None, processes: int = 1,
                 inference_buffer_mb: float = 64.0) -> None:
        self.auth = auth
        self.payload_limits = payload_limits or PayloadLimits()  # what one request may carry (berth.payload)
        self.metrics = metrics
        self.limiter = limiter  # the host's (or, with Redis, every host's) rate-limit windows
        self._limiter_warned = 0.0
        self.name = name  # which of the host's gateway processes this is (the x-berth-gateway header)
        self.name_header = (b"x-berth-gateway", name.encode())
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._latency: dict[tuple[str, str], tuple[Any, Any]] = {}  # latency and queue-wait series
        self.request_timeout_s = request_timeout_s
        self.table = RoutingTable()
        self.upstreams: dict[str, Upstream] = {}
        self.hold_timeout_s = hold_timeout_s
        self.queue_wait_s = max(0.0, queue_wait_s) or None  # the admission queue's budget; None: one service time
        self.on_demand = on_demand  # (endpoint, entity): a request waits for an entity at zero
        self._routes_changed: asyncio.Future[None] | None = None
        self.holding: dict[tuple[str, str], int] = {}  # requests waiting for a replica, by (endpoint, entity)
        self.admissions: dict[tuple[str, str], Admission] = {}  # in flight and queued, by (endpoint, entity)
        self.processes = processes  # the host's gateway processes: each admits its share of the concurrency
        self.tracer = tracing.make_tracer("berth-gateway")  # None unless an OTLP endpoint is configured
        self._id_prefix = os.urandom(12).hex().encode()  # request ids (tracing, inference tables)
        self._ids = itertools.count()
        # This process's writer of inference-table rows (a thread starts with the first row).
        self.inference = InferenceLog(
            int(inference_buffer_mb * 2**20),
            on_written=lambda endpoint, n: metrics.inference_written.labels(endpoint).inc(n),
            on_dropped=lambda endpoint, n: metrics.inference_dropped.labels(endpoint).inc(n),
        )

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
        current = {(ep.name, e.name): e.concurrency for ep in table.endpoints.values() for e in ep.entities}
        for key, admission in list(self.admissions.items()):
            if key in current:
                admission.resize(self._share(current[key]))
            elif not admission.in_flight and not admission.queued:
                del self.admissions[key]
        changed, self._routes_changed = self._routes_changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)  # held requests look again

    def waiting(self, endpoint: str, entity: str) -> int:
        """Requests for the entity waiting in this process: for a ready replica, or in its admission queue."""
        admission = self.admissions.get((endpoint, entity))
        return self.holding.get((endpoint, entity), 0) + (admission.queued if admission is not None else 0)

    def rejected(self, endpoint: str, entity: str) -> int:
        """Requests for the entity refused 429 RESOURCE_EXHAUSTED by this process so far."""
        admission = self.admissions.get((endpoint, entity))
        return admission.rejected if admission is not None else 0

    def _outstanding(self, replica_id: str) -> int:
        upstream = self.upstreams.get(replica_id)
        return upstream.outstanding if upstream is not None else 0

    async def invoke(self, name: str, scope: Scope, receive: Receive, send: Send, caller: Caller) -> None:
        try:
            body = await read_body(receive, self.payload_limits.max_body_bytes)
        except BerthError as exc:  # a body over the limit: it never reaches a replica
            await self._refuse_body(name, send, exc, caller)
            return
        read_at = time.perf_counter()
        route = self.table.endpoints.get(name)
        entity = ""
        outcome: UpstreamResponse | BerthError
        # An id and a span only for what needs them: with neither on, the request makes no object for them.
        request_id = self._new_request_id() if self.tracer is not None or (route and route.capture) else None
        span = self._span(name, scope, request_id) if self.tracer is not None else None
        extra = b""
        if span is not None:
            extra = b"traceparent: " + tracing.traceparent(span) + b"\r\nx-request-id: " + request_id + b"\r\n"
        if route is None:
            outcome = ResourceDoesNotExist(f"Endpoint '{name}' does not exist.")
            name = ""  # unknown names get no metric series of their own
        elif not self.auth.may_query(caller, name):
            outcome = PermissionDenied(f"{caller.name} does not have CAN_QUERY on endpoint '{name}'.")
        elif route.rate_limits and (refused := await self._limit(route, caller)) is not None:
            outcome = refused
        else:
            choice = choose_entity(route, random.random() * 100.0)
            if isinstance(choice, BerthError):
                outcome = choice
            else:
                entity = choice.name
                outcome = await self._forward(name, choice, body, header(scope, b"content-type") or b"", receive,
                                              read_at + self.request_timeout_s, extra)
        if isinstance(outcome, BerthError):
            status, payload, headers = error_body(outcome)
            headers.append(self.name_header)
        else:
            status, payload = outcome.status, outcome.body
            headers = [(b"content-type", outcome.content_type), (b"served-model-name", entity.encode()),
                       self.name_header]
        if request_id is not None:
            headers.append((b"x-request-id", request_id))
        await send_response(send, status, payload, headers)
        self._record(name, entity, status, read_at, outcome)
        if span is not None:
            span.set_attribute("http.response.status_code", status)
            if entity:
                span.set_attribute("berth.served_entity", entity)
            if status >= 500:
                span.set_status(tracing.error())
            span.end()
        if route is not None and route.capture:
            received = time.time() - (time.perf_counter() - read_at)  # the wall time the request was read
            self._capture(route, entity, body, status, payload, outcome, caller, request_id, received)

    def _new_request_id(self) -> bytes:
        """A new request id: 32 hex digits, this process's random prefix and a counter (unique
        without a call to the OS per request). Always the platform's own, like Databricks'
        `databricks_request_id`: the client's id is `client_request_id` in the body."""
        return b"%s%08x" % (self._id_prefix, next(self._ids) & 0xFFFFFFFF)

    def _span(self, name: str, scope: Scope, request_id: bytes | None) -> Any:
        attributes = {"berth.endpoint": name, "berth.gateway": self.name,
                      "berth.request_id": (request_id or b"").decode(), "http.request.method": "POST",
                      "url.path": scope.get("path", "")}
        return self.tracer.start_span("berth.gateway", context=tracing.parent(header(scope, b"traceparent")),  # type: ignore[union-attr]
                                      kind=tracing.server_kind(), attributes=attributes)

    def _capture(self, route: EndpointRoute, entity: str, body: bytes, status: int, payload: bytes,
                 outcome: object, caller: Caller, request_id: bytes | None, received: float) -> None:
        """Log the request to the endpoint's inference table (a row queued for this process's writer)."""
        uid = None
        for e in route.entities:
            if e.name == entity:
                uid = e.uid
        executed = None
        if isinstance(outcome, UpstreamResponse):
            executed = round((outcome.received_at - outcome.sent_at) * 1e3)
        self.inference.record(route.name, route.capture, status=status, request=body, response=payload,
                              entity_id=uid, requester=caller.name, execution_ms=executed, received=received,
                              request_id=request_id.decode() if request_id else None)

    async def _limit(self, route: EndpointRoute, caller: Caller) -> RequestLimitExceeded | None:
        """Count the request in the endpoint's rate-limit windows; the refusal if one is full."""
        try:
            wait = await self.limiter.admit(windows(route.rate_limits, route.name, caller))
        except Exception as exc:  # the shared store is down: limits must not take the endpoint down
            self.metrics.limiter_errors.inc()
            now = time.monotonic()
            if now - self._limiter_warned > 10.0:
                self._limiter_warned = now
                log.warning("rate limiter unavailable, admitting requests unchecked: %r", exc)
            return None
        if not wait:
            return None
        self.metrics.rate_limited.labels(route.name).inc()
        return RequestLimitExceeded(
            f"Rate limit of endpoint '{route.name}' exceeded; retry in {wait:.1f} s.", retry_after=retry_after(wait)
        )

    async def _forward(
        self, name: str, choice: EntityRoute, body: bytes, content_type: bytes, receive: Receive, deadline: float,
        extra: bytes = b"",
    ) -> UpstreamResponse | BerthError:
        """Send the request to a ready replica of the entity, once admission lets it in (at most the
        entity's provisioned concurrency in flight, a bounded queue behind). With no ready replica
        (starting, restarting, at zero, or each one refused the connection) the request waits for the
        next routing table that has one, up to `hold_timeout_s`. Nothing outlives `deadline`."""
        gone: set[str] = set()  # replicas that refused the connection: the request never reached them
        held_since: float | None = None
        replicas = choice.replicas
        slot: Admission | None = None  # the admission slot this request holds
        service_s: float | None = None
        try:
            while True:
                if gone:
                    replicas = tuple(r for r in replicas if r[0] not in gone)
                if not replicas:
                    if held_since is None:
                        held_since = time.perf_counter()
                    key = (name, choice.name)
                    self.holding[key] = self.holding.get(key, 0) + 1
                    try:
                        held = await self._hold(name, choice, gone, held_since, deadline)
                    finally:
                        self.holding[key] -= 1
                    if isinstance(held, BerthError):
                        return held
                    choice, replicas = held, held.replicas
                    continue
                if slot is None and choice.concurrency > 0:
                    admission = self._admission(name, choice)
                    refused = await self._admit(name, choice.name, admission, deadline, receive)
                    if refused is not None:
                        return refused
                    slot = admission
                replica_id, _ = choose_replica(replicas, self._outstanding)
                upstream = self.upstreams.get(replica_id)
                try:
                    if upstream is None:  # removed from the table while the body was read
                        raise UpstreamError("replica was removed", delivered=False)
                    sent = upstream.request(b"/invocations", body, content_type,
                                            max(0.001, deadline - time.perf_counter()), extra)
                    if slot is not None and slot.in_flight > slot.capacity:
                        # It waits at the replica for a model call to end: a client that leaves cancels it there.
                        # Its time there is not one service time (the wait is in it): not observed.
                        answered = await _unless_disconnected(sent, receive)
                        if answered is None:
                            return ClientCancelled(f"The client disconnected while its request waited at a "
                                                   f"replica of served entity '{choice.name}'.")
                        return answered
                    response = await sent
                    service_s = response.received_at - response.sent_at
                    return response
                except UpstreamError as exc:
                    if not exc.delivered:  # the replica is gone: another one may take it
                        gone.add(replica_id)
                        continue
                    return TemporarilyUnavailable(
                        f"Replica of served entity '{choice.name}' stopped before answering ({exc}); "
                        "retry the request.",
                        retry_after=1,
                    )
                except TimeoutError:
                    return DeadlineExceeded(
                        f"Served entity '{choice.name}' did not answer within the request deadline "
                        f"({self.request_timeout_s:g} s)."
                    )
        finally:
            if slot is not None:
                slot.release(service_s)

    def _admission(self, name: str, choice: EntityRoute) -> Admission:
        key = (name, choice.name)
        admission = self.admissions.get(key)
        if admission is None:
            admission = self.admissions[key] = Admission(self._share(choice.concurrency))
        return admission

    def _share(self, concurrency: int) -> int:
        """This process's part of an entity's provisioned concurrency (the host's gateway processes split it)."""
        return -(-concurrency // self.processes)

    async def _admit(self, name: str, entity: str, admission: Admission, deadline: float,
                     receive: Receive) -> BerthError | None:
        """Take a slot now, or wait in the entity's bounded queue for one; the refusal otherwise.
        A client that disconnects while queued leaves the queue: its request never runs."""
        remaining = deadline - time.perf_counter()
        verdict = admission.decide(remaining, self.queue_wait_s)
        if verdict is Verdict.RUN:
            return None
        if verdict is Verdict.REFUSE:
            self.metrics.admission_refused.labels(name, entity).inc()
            return ResourceExhausted(
                f"Served entity '{entity}' of endpoint '{name}' is at its provisioned concurrency "
                f"({admission.capacity} running, {max(0, admission.in_flight - admission.capacity)} waiting at its "
                f"replicas, {admission.queued} queued); retry shortly.",
                retry_after=retry_after_s(admission.queued, admission.capacity, admission.service_s),
            )
        waiter = admission.enqueue()
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            done, _ = await asyncio.wait((waiter, watch), timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if waiter in done:
            return None
        admission.leave(waiter)
        if watch in done:
            return ClientCancelled(f"The client disconnected while its request waited for served entity '{entity}'.")
        return DeadlineExceeded(
            f"Served entity '{entity}' of endpoint '{name}' gave the request no slot within its deadline "
            f"({self.request_timeout_s:g} s)."
        )

    async def _hold(
        self, name: str, entity: EntityRoute, gone: set[str], since: float, request_deadline: float
    ) -> EntityRoute | BerthError:
        """Wait for a routing table in which the entity has a ready replica not in `gone`; wake it
        if it is at zero. Answers an error after `hold_timeout_s`, or when the entity failed."""
        deadline = min(since + self.hold_timeout_s, request_deadline)
        loop = asyncio.get_running_loop()
        waited = False
        remaining = max(0.0, deadline - time.perf_counter())
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

    async def _refuse_body(self, name: str, send: Send, exc: BerthError, caller: Caller) -> None:
        """Answer a request refused before it was routed (its body is over the limit), and count it."""
        status, payload, headers = error_body(exc)
        await send_response(send, status, payload, [*headers, self.name_header])
        route = self.table.endpoints.get(name)
        self._record(name if route is not None else "", "", status, time.perf_counter(), exc)
        if route is not None and route.capture:  # the body was not kept: the row says why its request is NULL
            self.inference.record(route.name, route.capture, status=status, request=None, response=payload,
                                  entity_id=None, requester=caller.name, execution_ms=None, received=time.time())

    def _record(self, endpoint: str, entity: str, status: int, read_at: float, outcome: object) -> None:
        done = time.perf_counter()
        key = (endpoint, entity, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.metrics.requests.labels(endpoint, entity, str(status))
        counter.inc()
        series = self._latency.get((endpoint, entity))
        if series is None:
            series = self._latency[(endpoint, entity)] = (self.metrics.latency.labels(endpoint, entity),
                                                          self.metrics.queue_wait.labels(endpoint, entity))
        series[0].observe(done - read_at)
        if isinstance(outcome, UpstreamResponse):
            series[1].observe(outcome.sent_at - read_at)
            self.metrics.gateway_added.observe((outcome.sent_at - read_at) + (done - outcome.received_at))

    def close(self) -> None:
        for upstream in self.upstreams.values():
            upstream.close()
        self.upstreams.clear()
        self.inference.close()  # what is buffered goes to the tables: a clean shutdown loses no row
        if self.tracer is not None:
            tracing.flush()


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
        if (path == dashboard.PREFIX or path.startswith(dashboard.PREFIX + "/")) and scope["method"] in ("GET", "HEAD"):
            # The page and its script: no token (the page asks for one and sends it with its API calls).
            found = dashboard.asset(path)
            if found is None:
                await self._refuse(send, ResourceDoesNotExist(f"No such dashboard file: {path}"))
                return
            kind, data = found
            await send_response(send, 200, data, [(b"content-type", kind), *_DASHBOARD_HEADERS,
                                                  self.gateway.name_header])
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


def uvicorn_config(app: RootApp) -> uvicorn.Config:
    """How every gateway process (the main one and each worker) runs uvicorn for `app`."""
    return uvicorn.Config(
        app,
        loop="uvloop",
        http=head_limited(app.gateway.payload_limits.max_header_bytes),  # httptools, refusing an endless head
        lifespan="on",
        access_log=False,
        log_level="warning",
        log_config=None,  # its records go to the platform's log (berth.observability.logs)
        timeout_keep_alive=75,
        proxy_headers=False,  # nothing reads the client address: skip the middleware on every request
    )
