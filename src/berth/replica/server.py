"""The replica's HTTP server: an asyncio protocol on httptools' parser, on a Unix socket (or TCP).

Its one client is the gateway (and tests, and `curl --unix-socket`): HTTP/1.1 with keep-alive and
in-order answers, no ASGI layer, no task per request. A request's body goes straight to the
`Batcher`, whose completion callback writes the answer (`bench/http_servers.py` measures this
against uvicorn's ASGI server).

Predictions run on one worker thread (one GIL-bound worker per replica, one replica per core).
Requests that arrive while it is busy wait together and go to the model as one batch when it is
free: batch size grows with load, with no timer to tune.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from http import HTTPStatus
from typing import Any, Protocol

import httptools
import orjson

from berth.observability import tracing
from berth.replica.scoring import Scorer, ScoringResult

JSON = b"application/json"
NOT_FOUND = b'{"error_code":"NOT_FOUND","message":"Not found"}'
BAD_REQUEST = b'{"error_code":"MALFORMED_REQUEST","message":"Malformed HTTP request"}'
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}

Done = Callable[[ScoringResult], None]
Alive = Callable[[], bool]  # False once the request's client (the gateway) has closed its connection
Pending = tuple[bytes, str, Done, Alive | None, Any]  # body, content type, done, alive, its span (None: untraced)
# What a request whose client left before its model call gets instead of a prediction (written nowhere).
CANCELLED = ScoringResult(499, b'{"error_code":"CANCELLED","message":"The client closed the connection"}',
                          "application/json")


# A model call shorter than this runs on the event loop itself: handing it to the predict thread and
# back costs ~0.1–0.3 ms of CPU here, a large share of it, and leaves little I/O to overlap with it.
# Longer calls (a forest, a network) run on the thread while the loop reads and answers requests.
INLINE_CALL_S = 0.002
_EWMA = 0.2  # weight of the newest model call in the running estimate of its duration


class Batcher:
    """Feeds the model from a queue: whatever waited while it was busy becomes its next batch."""

    def __init__(self, scorer: Scorer, max_batch: int, thread_setup: Callable[[], None] | None = None) -> None:
        self.scorer = scorer
        self.max_batch = max(1, max_batch)
        # `thread_setup` runs first on the predict thread: OpenMP's thread count is per thread, and a
        # forked or warm-pool replica sets it after its start (`berth.replica.launch.limit_threads`).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict", initializer=thread_setup)
        self.call_s = float("inf")  # running estimate of one model call; unknown: the thread first
        self.service_s = 0.0  # summed over requests: time each spent being scored (not waiting)
        self.cancelled = 0  # requests dropped before their model call: their client had gone
        self.tracer: Any = None  # set with the app's (berth.observability.tracing) when tracing is on
        self._pending: deque[Pending] = deque()
        self._busy = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def inline(self) -> bool:
        return self.call_s < INLINE_CALL_S

    def submit(self, body: bytes, content_type: str, done: Done, alive: Alive | None = None,
               span: Any = None) -> None:
        """Queue a request; `done(result)` runs on the event loop when it is scored (or with
        `CANCELLED`, without a model call, when `alive()` says its client left while it waited).

        An idle model starts at the end of this loop iteration, not at once: requests that
        arrived in the same read from the sockets go into one call instead of the first one alone.
        """
        self._pending.append((body, content_type, done, alive, span))
        if not self._busy:
            self._busy = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._next)

    def _next(self) -> None:
        batch: list[Pending] = []
        while self._pending and len(batch) < self.max_batch:
            item = self._pending.popleft()
            if item[3] is not None and not item[3]():
                self.cancelled += 1
                item[2](CANCELLED)
            else:
                batch.append(item)
        if not batch:
            self._busy = False
            return
        if self.inline:
            self._answer(batch, self._run(batch))
            self._loop.call_soon(self._next)  # type: ignore[union-attr]  # read the sockets before the next batch
        else:
            future = self.executor.submit(self._run, batch)
            future.add_done_callback(lambda f: self._loop.call_soon_threadsafe(self._finish, batch, f))  # type: ignore[union-attr]

    def _run(self, batch: list[Pending]) -> list[ScoringResult]:
        if self.tracer is not None:  # traced: the model call gets a span of its own
            spans = [item[4] for item in batch if item[4] is not None]
            if spans:
                with tracing.model_span(self.tracer, spans, len(batch)):
                    return self._run_untraced(batch)
        return self._run_untraced(batch)

    def _run_untraced(self, batch: list[Pending]) -> list[ScoringResult]:
        before = self.scorer.model_call_s
        started = time.perf_counter()
        try:
            if len(batch) == 1:
                results = [self.scorer.score(batch[0][0], batch[0][1])]
            else:
                results = self.scorer.score_many([(item[0], item[1]) for item in batch])
        except Exception as exc:  # the scorer turns model errors into answers: this is a bug in ours
            error = ScoringResult(500, orjson.dumps({"error_code": "INTERNAL_ERROR", "message": repr(exc)}),
                                  "application/json")
            results = [error] * len(batch)
        self.service_s += (time.perf_counter() - started) * len(batch)
        took = self.scorer.model_call_s - before
        if took > 0:
            self.call_s = took if self.call_s == float("inf") else (1 - _EWMA) * self.call_s + _EWMA * took
        return results

    def _finish(self, batch: list[Pending], future: Future[list[ScoringResult]]) -> None:
        if self.inline:
            self._answer(batch, future.result())
            self._next()
        else:
            self._next()  # start the next batch before answering: the model never waits for our writes
            self._answer(batch, future.result())

    @staticmethod
    def _answer(batch: list[Pending], results: list[ScoringResult]) -> None:
        for item, result in zip(batch, results, strict=True):
            item[2](result)


class ReplicaApp:
    """Routes `/invocations`, `/ping`, `/health` and `/stats` for one loaded model."""

    def __init__(self, scorer: Scorer, replica_id: str, name: str, max_concurrency: int = 1,
                 thread_setup: Callable[[], None] | None = None) -> None:
        self.scorer = scorer
        self.replica_id = replica_id
        self.name = name
        self.batcher = Batcher(scorer, max_batch=max_concurrency, thread_setup=thread_setup)
        self.requests = 0
        self.in_flight = 0
        self.tracer = tracing.make_tracer("berth-replica")  # None unless an OTLP endpoint is configured
        self.batcher.tracer = self.tracer

    def close(self) -> None:
        self.batcher.executor.shutdown(wait=False, cancel_futures=True)
        if self.tracer is not None:
            tracing.flush()

    def stats(self) -> dict[str, object]:
        return {
            "replica_id": self.replica_id,
            "name": self.name,
            "pid": os.getpid(),
            "requests": self.requests,
            "in_flight": self.in_flight,
            "service_s": self.batcher.service_s,  # the autoscaler's latency signal (waiting excluded)
            "queued": self.batcher.queued,
            "cancelled": self.batcher.cancelled,
            "model_calls": self.scorer.model_calls,
            "model_call_s": self.scorer.model_call_s,
            "model_call_requests": self.scorer.model_call_requests,
            "batches": self.scorer.batches,
            "batched_requests": self.scorer.batched_requests,
            "largest_batch": self.scorer.largest_batch,
            "fast_path": self.scorer.fast_path,
            "predict_on": "loop" if self.batcher.inline else "thread",
            "max_concurrency": self.batcher.max_batch,
            "model_call_ms": round(self.batcher.call_s * 1e3, 3) if self.batcher.call_s != float("inf") else None,
        }

    def _settings(self, body: bytes) -> tuple[int, bytes, bytes]:
        """Change what the control plane may change on a live replica: its concurrency."""
        try:
            value = orjson.loads(body).get("max_concurrency")
        except (orjson.JSONDecodeError, AttributeError):
            value = None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return 400, JSON, b'{"error_code":"INVALID_PARAMETER_VALUE","message":"max_concurrency must be >= 1"}'
        self.batcher.max_batch = value
        return 200, JSON, orjson.dumps({"max_concurrency": value})

    def handle(self, method: bytes, path: bytes, content_type: bytes, body: bytes,
               answer: Callable[[int, bytes, bytes], None], alive: Alive | None = None,
               trace: tuple[bytes, bytes] | None = None) -> None:
        """Answer one request through `answer(status, content_type, body)`, now or when scored;
        `alive()`: whether its client still waits for the answer; `trace`: its `traceparent` and
        `x-request-id` headers (the gateway sends them when tracing is on)."""
        if path == b"/invocations" and method == b"POST":
            self.in_flight += 1
            span = tracing.replica_span(self.tracer, self.replica_id, *trace) if trace and self.tracer else None

            def done(result: ScoringResult) -> None:
                self.in_flight -= 1
                if result is not CANCELLED:
                    self.requests += 1
                if span is not None:
                    tracing.end(span, result.status)
                answer(result.status, result.content_type.encode(), result.body)

            self.batcher.submit(body, content_type.decode("latin-1"), done, alive, span)
        elif path in (b"/ping", b"/health") and method in (b"GET", b"HEAD"):
            answer(200, JSON, b"\n")
        elif path == b"/stats" and method == b"GET":
            answer(200, JSON, orjson.dumps(self.stats()))
        elif path == b"/settings" and method == b"POST":
            answer(*self._settings(body))
        else:
            answer(404, JSON, NOT_FOUND)


class _Slot:
    """One request's place in its connection's answer order."""

    __slots__ = ("data", "keep_alive")

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.data: bytes | None = None


class _Connection(asyncio.Protocol):
    """One client connection: parses requests as they arrive and writes the answers in request order."""

    def __init__(self, server: ReplicaServer) -> None:
        self.server = server
        self.app = server.app
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.slots: deque[_Slot] = deque()
        self._url = b""
        self._trace: tuple[bytes, bytes] | None = None  # traceparent, x-request-id (tracing on)
        self._content_type = b""
        self._body: list[bytes] = []
        self._refused = False  # a malformed request came: nothing after it is read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._refuse()

    def _refuse(self) -> None:
        """Answer 400 after the answers still owed on this connection, then close it."""
        self._refused = True
        slot = _Slot(keep_alive=False)
        slot.data = _response(400, JSON, BAD_REQUEST, keep_alive=False)
        self.slots.append(slot)
        self._flush()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._content_type = b""
        self._body = []
        self._trace = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-type":
            self._content_type = value
        elif lower == b"traceparent":
            self._trace = (value, b"")
        elif lower == b"x-request-id" and self._trace is not None:
            self._trace = (self._trace[0], value)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        slot = _Slot(self.parser.should_keep_alive())
        self.slots.append(slot)
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        path = self._url.partition(b"?")[0]

        method = self.parser.get_method()

        def answer(status: int, content_type: bytes, payload: bytes) -> None:
            slot.data = _response(status, content_type, payload, slot.keep_alive, head=method == b"HEAD")
            self._flush()

        self.app.handle(method, path, self._content_type, body, answer, self.alive, self._trace)

    def alive(self) -> bool:
        return self.transport is not None

    def _flush(self) -> None:
        while self.slots and self.slots[0].data is not None:
            slot = self.slots.popleft()
            if self.transport is None:
                continue  # the client left: its answers go nowhere
            self.transport.write(slot.data)  # type: ignore[arg-type]
            if not slot.keep_alive:
                self.transport.close()
        if not self.slots:
            self.server.maybe_drained()

    @property
    def busy(self) -> bool:
        return bool(self.slots)


def _response(status: int, content_type: bytes, body: bytes, keep_alive: bool, head: bool = False) -> bytes:
    return b"".join((
        b"HTTP/1.1 ", str(status).encode(), b" ", _REASONS.get(status, b"Unknown"),
        b"\r\ncontent-type: ", content_type, b"\r\ncontent-length: ", str(len(body)).encode(),
        b"\r\n\r\n" if keep_alive else b"\r\nconnection: close\r\n\r\n", b"" if head else body,
    ))


class App(Protocol):
    """What the server serves: `ReplicaApp`, or a stub in `bench/http_servers.py`."""

    def handle(self, method: bytes, path: bytes, content_type: bytes, body: bytes,
               answer: Callable[[int, bytes, bytes], None], alive: Alive | None = None,
               trace: tuple[bytes, bytes] | None = None) -> None: ...

    def close(self) -> None: ...


class ReplicaServer:
    """Serves a `ReplicaApp` until SIGTERM/SIGINT, then finishes the requests it holds and returns."""

    def __init__(self, app: App, *, uds: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 drain_timeout_s: float = 60.0) -> None:
        self.app = app
        self.uds = uds
        self.host = host
        self.port = port
        self.drain_timeout_s = drain_timeout_s
        self.connections: set[_Connection] = set()
        self._drained: asyncio.Event | None = None

    def maybe_drained(self) -> None:
        if self._drained is not None and not any(c.busy for c in self.connections):
            self._drained.set()

    async def serve(self, on_listening: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        if self.uds is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.uds)
            server = await loop.create_unix_server(lambda: _Connection(self), self.uds, backlog=2048)
        else:
            server = await loop.create_server(lambda: _Connection(self), self.host, self.port, backlog=2048)
            for sock in server.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if on_listening is not None:
            on_listening()
        await stop.wait()
        server.close()  # no new connections; requests already read are answered
        self._drained = asyncio.Event()
        self.maybe_drained()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), self.drain_timeout_s)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        self.app.close()
