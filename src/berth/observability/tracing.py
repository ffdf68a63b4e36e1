"""OpenTelemetry traces of invocations: gateway → replica → model, exported over OTLP when configured.

On when an OTLP endpoint is configured, in the environment every Berth process inherits:
`BERTH_OTLP_ENDPOINT` (a base URL such as `http://collector:4318`; spans go to `/v1/traces`), or
OpenTelemetry's own `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` (the
exporter's other `OTEL_*` variables apply too: headers, timeout, batch delay). Off otherwise, and
then nothing of OpenTelemetry is imported and the hot path's only cost is one `is None` test: no
span, context or id is made.

Spans: `berth.gateway` (SERVER, in the gateway process that took the request; continues a
`traceparent` the client sent), `berth.replica` (SERVER, in the replica, its child through the
`traceparent` header the gateway adds), and `berth.model` (INTERNAL, one per model call, child of
the first request's replica span and linked to the others' when a call scores a batch). Each
carries `berth.request_id` (the platform's id of the request, answered in the `x-request-id`
header and, with an inference table, its `databricks_request_id`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

ENV = "BERTH_OTLP_ENDPOINT"
_PROVIDERS: list[Any] = []  # this process's tracer providers (one, once tracing is on)


def configured() -> bool:
    return any(os.environ.get(k) for k in (ENV, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"))


def make_tracer(service: str) -> Tracer | None:
    """This process's tracer, exporting in batches over OTLP/HTTP; None when tracing is off."""
    if not configured():
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    base = os.environ.get(ENV)
    exporter = OTLPSpanExporter(endpoint=f"{base.rstrip('/')}/v1/traces") if base else OTLPSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))  # flushed at exit
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _PROVIDERS.append(provider)
    return provider.get_tracer("berth")


def parent(traceparent: bytes | None) -> object | None:
    """The context a W3C `traceparent` header names (None for none or a malformed one)."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract({"traceparent": traceparent.decode("latin-1")})
    return context or None


def traceparent(span: Span) -> bytes:
    """The `traceparent` header value that makes the next hop's span a child of `span`."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}".encode()


def replica_span(tracer: Tracer, replica_id: str, traceparent: bytes, request_id: bytes) -> Span:
    """A replica's span of one request, the child of the gateway span its `traceparent` names."""
    from opentelemetry.trace import SpanKind

    return tracer.start_span("berth.replica", context=parent(traceparent), kind=SpanKind.SERVER,  # type: ignore[arg-type]
                             attributes={"berth.replica_id": replica_id,
                                         "berth.request_id": request_id.decode("latin-1")})


def end(span: Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(error())
    span.end()


@contextlib.contextmanager
def model_span(tracer: Tracer, requests: list[Span], batch: int) -> Iterator[None]:
    """The span of one model call: the child of its first request's span, linked to the others'."""
    from opentelemetry import trace
    from opentelemetry.trace import Link

    context = trace.set_span_in_context(requests[0]) if requests else None
    links = [Link(s.get_span_context()) for s in requests[1:]]
    with tracer.start_as_current_span("berth.model", context=context, links=links,
                                      attributes={"berth.batch_size": batch}):
        yield


def server_kind() -> Any:
    from opentelemetry.trace import SpanKind

    return SpanKind.SERVER


def error() -> Any:
    from opentelemetry.trace import Status, StatusCode

    return Status(StatusCode.ERROR)


def flush() -> None:
    """Export what the tracers of this process buffer (at a clean stop, before the process exits)."""
    for provider in _PROVIDERS:
        provider.force_flush(5_000)
