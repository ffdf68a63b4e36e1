"""Tracing: spans gateway → replica → model with the request id, exported over OTLP/HTTP to a real
receiver (protobuf decoded with opentelemetry-proto) by a real server; and with tracing off, the
gateway's hot path makes no span, context or id at all (OpenTelemetry's entry points, patched to
count, are never called; with a tracer they are, so the patch points are the ones in use)."""

from __future__ import annotations

import asyncio
import collections
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from berth.access.permissions import Caller
from berth.gateway.app import Gateway
from berth.gateway.auth import TokenAuthority
from berth.gateway.routing import EndpointRoute, EntityRoute, EntityStatus, RoutingTable
from berth.observability.metrics import Metrics
from berth.ratelimit.local import HostLimiter
from tests.fixtures.models import FEATURES
from tests.integration.replica_tools import ReplicaProcess, poll

BODY = {"dataframe_split": {"columns": FEATURES, "data": [[0.1] * 20]}}


class Receiver:
    """An OTLP/HTTP trace receiver on loopback: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []  # (service.name, span)
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with outer.lock:
                    for resource in request.resource_spans:
                        service = next(a.value.string_value for a in resource.resource.attributes
                                       if a.key == "service.name")
                        outer.spans += [(service, s) for scope in resource.scope_spans for s in scope.spans]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def named(self, name: str) -> list[tuple[str, Any]]:
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.name == name]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def attr(span: Any, key: str) -> Any:
    for a in span.attributes:
        if a.key == key:
            value = a.value
            return value.string_value or value.int_value
    return None


@pytest.mark.slow
def test_a_request_is_traced_gateway_to_replica_to_model_with_its_request_id(server_factory, model_zoo, receiver):
    server = server_factory(extra_env={"BERTH_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"})
    server.deploy("traced", model_zoo("sklearn_classifier"))
    client_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    answers = [server.client.post("/serving-endpoints/traced/invocations", json=BODY,
                                  headers={"traceparent": f"00-{client_trace}-00f067aa0ba902b7-01",
                                           "x-request-id": "client-id-1"})]
    answers += [server.invoke("traced", BODY) for _ in range(2)]
    assert [a.status_code for a in answers] == [200] * 3
    ids = [a.headers["x-request-id"] for a in answers]
    assert ids[0] != "client-id-1"  # the platform's own id, always (the client's goes in the body)
    assert len(set(ids)) == 3
    assert all(len(i) == 32 for i in ids)

    poll(lambda: len(receiver.named("berth.model")) >= 3 and len(receiver.named("berth.replica")) >= 3
         and len(receiver.named("berth.gateway")) >= 3, timeout=30, what="the spans of 3 requests")
    gateways = {attr(s, "berth.request_id"): (svc, s) for svc, s in receiver.named("berth.gateway")}
    replicas = {attr(s, "berth.request_id"): (svc, s) for svc, s in receiver.named("berth.replica")}
    models = {s.parent_span_id: (svc, s) for svc, s in receiver.named("berth.model")}
    for request_id in ids:
        (gw_service, gateway), (rep_service, replica) = gateways[request_id], replicas[request_id]
        assert (gw_service, rep_service) == ("berth-gateway", "berth-replica")
        assert attr(gateway, "berth.endpoint") == "traced"
        assert attr(gateway, "http.response.status_code") == 200
        assert replica.trace_id == gateway.trace_id
        assert replica.parent_span_id == gateway.span_id
        _, model = models[replica.span_id]  # the model call is the replica span's child
        assert model.trace_id == gateway.trace_id
        assert attr(model, "berth.batch_size") >= 1
    # The client's trace is continued, not replaced.
    assert gateways[ids[0]][1].trace_id.hex() == client_trace
    assert gateways[ids[0]][1].parent_span_id.hex() == "00f067aa0ba902b7"


# --------------------------------------------------------------------------- off: nothing made


PATCHED = [
    ("opentelemetry.trace", "get_tracer"),
    ("opentelemetry.trace", "set_span_in_context"),
    ("opentelemetry.context", "attach"),
    ("opentelemetry.context", "get_current"),
    ("opentelemetry.sdk.trace", "Tracer.start_span"),
    ("opentelemetry.sdk.trace", "Span.__init__"),
    ("opentelemetry.trace", "NonRecordingSpan.__init__"),
    ("opentelemetry.trace.propagation.tracecontext", "TraceContextTextMapPropagator.extract"),
]


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """OpenTelemetry's entry points for spans and contexts, each counting its calls."""
    import importlib

    calls: collections.Counter[str] = collections.Counter()
    for module_name, path in PATCHED:
        owner: Any = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for part in parents:
            owner = getattr(owner, part)
        original = getattr(owner, name)

        def wrapper(*args: Any, __original: Any = original, __key: str = f"{module_name}.{path}", **kwargs: Any) -> Any:
            calls[__key] += 1
            return __original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
    return calls


async def drive(gateway: Gateway, n: int) -> list[int]:
    """`n` invocations through the gateway's hot path, in this process; their statuses."""
    caller = Caller("u", "bench@example.com", admin=True)
    body = orjson.dumps(BODY)

    async def one() -> int:
        sent: list[dict[str, Any]] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/serving-endpoints/ep/invocations",
                 "headers": [(b"content-type", b"application/json")]}
        await gateway.invoke("ep", scope, receive, send, caller)
        return int(sent[0]["status"])

    return [await one() for _ in range(n)]


def gateway_to(replica: ReplicaProcess, tmp: Path) -> Gateway:
    gateway = Gateway(TokenAuthority(), Metrics(), HostLimiter(tmp / "limits"), request_timeout_s=30)
    entity = EntityRoute("m", 100, EntityStatus.READY, (("r1", f"unix:{replica.socket}"),), concurrency=4)
    gateway.set_routes(RoutingTable({"ep": EndpointRoute("ep", (entity,))}))
    return gateway


def test_with_tracing_off_the_hot_path_never_calls_opentelemetry(tmp_path: Path, model_zoo, counted, monkeypatch):
    for var in ("BERTH_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    replica = ReplicaProcess(model_zoo("sklearn_classifier"), tmp_path, max_concurrency=4)

    async def scenario() -> None:
        off = gateway_to(replica, tmp_path)
        assert off.tracer is None
        assert await drive(off, 20) == [200] * 20
        assert sum(counted.values()) == 0, counted

        # The same path with a tracer (exporting nowhere) calls them: the counting patches are live.
        from opentelemetry.sdk.trace import TracerProvider

        on = gateway_to(replica, tmp_path / "on")
        on.tracer = TracerProvider().get_tracer("test")
        assert await drive(on, 3) == [200] * 3
        assert counted["opentelemetry.sdk.trace.Tracer.start_span"] == 3
        assert counted["opentelemetry.sdk.trace.Span.__init__"] == 3
        off.close()
        on.close()

    try:
        asyncio.run(scenario())
    finally:
        replica.stop()
