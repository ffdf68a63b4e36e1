"""`berth loadtest`: a fast HTTP/1.1 load generator for one URL.

Built so it is never the bottleneck it measures: raw asyncio protocols on uvloop, httptools'
response parser, keep-alive connections with one request outstanding each (no pipelining), the
request bytes built once, and latencies taken with `perf_counter_ns` into a flat `array('q')` (the
status codes into a parallel `array('H')`) that a timer folds into HDR-style histograms (numpy) a
few times a second: one of every answer, and one per status code (a 429 is not a 200).

- Closed loop (`rate=None`): every connection sends its next request as soon as the last answer
  arrives; latency runs from the send.
- Open loop (`rate=R`): requests are scheduled at fixed intervals of 1/R s whatever the server
  does. A request whose time comes while every connection is busy waits for one, and its latency
  runs from its *scheduled* time (no coordinated omission). Timers have ~1 ms granularity, so a
  request may leave up to 1 ms early (then its clock starts when it leaves) or late (then the
  lateness counts as latency).

Only requests whose clock starts after the warm-up are measured; each measured request ends as
one response (counted by status) or one error (`read`, `timeout`, `parse`; `unsent` for an open-loop
request still waiting for a connection when the run ends). Connect failures are counted apart:
no request was on them.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import math
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter_ns, process_time
from typing import Any
from urllib.parse import urlsplit

import httptools
import numpy as np

NS_PER_S = 1_000_000_000
_TICK_NS = 250_000_000  # progress, timeouts and histogram folding
_LOOKAHEAD_NS = 1_000_000  # open loop: send what falls due within the next timer granularity
_RECONNECT_DELAY_S = 0.05
REQUEST_ERRORS = ("read", "timeout", "parse", "unsent")


class LoadTestError(Exception):
    """The load test cannot run (bad URL, nothing listening)."""


# --------------------------------------------------------------------------- target


@dataclass(frozen=True)
class HttpTarget:
    """Where requests go and what each one is (every request is the same bytes)."""

    url: str
    method: str = "POST"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LoadTestError(f"Not an http(s) URL: {self.url!r}")

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "https"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    def request_bytes(self) -> bytes:
        """The whole HTTP/1.1 request, built once."""
        parts = urlsplit(self.url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"{self.method} {path} HTTP/1.1", f"Host: {parts.netloc}", "User-Agent: berth-loadtest"]
        names = {k.lower() for k, _ in self.headers}
        lines += [f"{k}: {v}" for k, v in self.headers]
        if (self.body or self.method not in ("GET", "HEAD")) and "content-length" not in names:
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


@dataclass(frozen=True)
class LoadSpec:
    """How to load: connections, open-loop rate (None: closed loop), durations."""

    concurrency: int = 16
    rate: float | None = None
    duration_s: float = 10.0
    warmup_s: float = 0.0
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise LoadTestError("--concurrency must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise LoadTestError("--rate must be positive")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.timeout_s <= 0:
            raise LoadTestError("--duration and --timeout must be positive, --warmup not negative")

    @property
    def mode(self) -> str:
        return "closed" if self.rate is None else "open"


# --------------------------------------------------------------------------- histogram


class LatencyHistogram:
    """HDR-style log-linear histogram of nanosecond values: 256 exact buckets, then 128 buckets per
    power of two (values within 0.4%); percentiles report the bucket's midpoint, capped at the max."""

    SUB_BITS = 8
    _HALF = 1 << (SUB_BITS - 1)

    def __init__(self) -> None:
        self.counts = np.zeros((64 - self.SUB_BITS + 1) * self._HALF + (1 << self.SUB_BITS), dtype=np.int64)
        self.total = 0
        self.sum_ns = 0
        self.max_ns = 0
        self.min_ns = 0

    def add(self, values: np.ndarray[Any, np.dtype[np.int64]]) -> None:
        if values.size == 0:
            return
        values = np.maximum(values, 0)
        exponent = np.maximum(np.frexp(values.astype(np.float64))[1] - self.SUB_BITS, 0)
        index = exponent * self._HALF + (values >> exponent)
        self.counts += np.bincount(index, minlength=self.counts.size)[: self.counts.size]
        vmin, vmax = int(values.min()), int(values.max())
        self.min_ns = vmin if self.total == 0 else min(self.min_ns, vmin)
        self.max_ns = max(self.max_ns, vmax)
        self.total += int(values.size)
        self.sum_ns += int(values.sum())

    def _bucket_mid(self, index: int) -> int:
        if index < (1 << self.SUB_BITS):
            return index
        exponent = (index - (1 << self.SUB_BITS)) // self._HALF + 1
        low = (index - exponent * self._HALF) << exponent
        return low + (1 << exponent) // 2

    def percentile(self, q: float) -> int:
        """The value at or below which `q`% of the values lie (ns; 0 when empty)."""
        if self.total == 0:
            return 0
        rank = max(1, math.ceil(q / 100.0 * self.total))
        if rank >= self.total:
            return self.max_ns
        index = int(np.searchsorted(np.cumsum(self.counts), rank))
        return min(max(self._bucket_mid(index), self.min_ns), self.max_ns)

    @property
    def mean_ns(self) -> float:
        return self.sum_ns / self.total if self.total else 0.0


# --------------------------------------------------------------------------- results


@dataclass
class Progress:
    """A live snapshot for the progress display."""

    elapsed_s: float
    total_s: float
    warming_up: bool
    requests: int
    rps: float
    errors: int


@dataclass
class LoadResult:
    """What a run measured. Latencies in milliseconds."""

    url: str
    method: str
    body_bytes: int
    mode: str
    connections: int
    rate: float | None
    duration_s: float
    warmup_s: float
    requests: int
    responses: int
    in_window: int
    rps: float
    latency_ms: dict[str, float]
    status_codes: dict[int, int]
    errors: dict[str, int]
    connect_errors: int
    # status code -> count, p50, p90, p99, p99.9, max and mean (ms) of the answers with that code
    latency_by_status: dict[int, dict[str, float]] = field(default_factory=dict)
    waited_for_connection: int = 0
    max_backlog: int = 0
    generator_cpu: float = 0.0  # CPU this process used while loading, as a share of one core
    target_qps: float = 0.0
    provisioned_concurrency: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "method": self.method,
            "body_bytes": self.body_bytes,
            "mode": self.mode,
            "connections": self.connections,
            "rate": self.rate,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "requests": self.requests,
            "responses": self.responses,
            "rps": round(self.rps, 3),
            "latency_ms": {k: round(v, 4) for k, v in self.latency_ms.items()},
            "status_codes": {str(k): v for k, v in sorted(self.status_codes.items())},
            "latency_by_status": {
                str(code): {k: v if k == "count" else round(v, 4) for k, v in stats.items()}
                for code, stats in sorted(self.latency_by_status.items())
            },
            "errors": dict(self.errors),
            "connect_errors": self.connect_errors,
            "waited_for_connection": self.waited_for_connection,
            "max_backlog": self.max_backlog,
            "generator_cpu": round(self.generator_cpu, 3),
            "recommendation": {
                "target_qps": round(self.target_qps, 3),
                "p50_s": round(self.latency_ms["p50"] / 1000.0, 6),
                "provisioned_concurrency": self.provisioned_concurrency,
            },
            "notes": list(self.notes),
        }


def latency_summary(hist: LatencyHistogram) -> dict[str, float]:
    """p50, p90, p99, p99.9, max and mean of a histogram, in milliseconds."""
    latency = {name: hist.percentile(q) / 1e6 for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))}
    latency["max"] = hist.max_ns / 1e6
    latency["mean"] = hist.mean_ns / 1e6
    return latency


def fold_by_status(
    hists: dict[int, LatencyHistogram], latencies: np.ndarray[Any, np.dtype[np.int64]],
    codes: np.ndarray[Any, np.dtype[np.int64]],
) -> None:
    """Add each latency to the histogram of its answer's status code (`codes` parallel to `latencies`)."""
    present = np.unique(codes)
    for code in present.tolist():
        hist = hists.get(code)
        if hist is None:
            hist = hists[code] = LatencyHistogram()
        hist.add(latencies if present.size == 1 else latencies[codes == code])


def recommend_concurrency(target_qps: float, p50_s: float) -> int:
    """Little's law: requests in flight = arrival rate × time in system; at least 1."""
    return max(1, math.ceil(target_qps * p50_s))


# --------------------------------------------------------------------------- the engine


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    __slots__ = ("busy", "measured", "parser", "request", "run", "sent", "start", "transport")

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.request = run.request
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.measured = False  # the request in flight counts (its time came after the warm-up)
        self.start = 0  # latency clock (scheduled time in open loop)
        self.sent = 0  # when the bytes went out (for timeouts)

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.run.failed(self, "parse")
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy:
            self.run.failed(self, "read")
        self.run.lost(self)

    # httptools callback
    def on_message_complete(self) -> None:
        now = perf_counter_ns()
        run = self.run
        self.busy = False
        run.outstanding -= 1
        run.completed += 1
        if self.measured:
            code = self.parser.get_status_code()
            run.record(now - self.start)
            run.record_code(code)
            run.status[code] += 1
        if self.parser.should_keep_alive():
            run.next_request(self, now)
        elif self.transport is not None:
            self.transport.close()  # the server closes it: connection_lost reconnects

    def send(self, start: int, now: int, measured: bool) -> None:
        self.busy = True
        self.measured = measured
        self.start = start
        self.sent = now
        self.run.outstanding += 1
        self.transport.write(self.request)  # type: ignore[union-attr]


class _Run:
    """One load test in progress on the running loop."""

    def __init__(self, target: HttpTarget, spec: LoadSpec) -> None:
        self.target = target
        self.spec = spec
        self.request = target.request_bytes()
        self.loop = asyncio.get_running_loop()
        self.latencies = array.array("q")
        self.record = self.latencies.append
        self.codes = array.array("H")  # the status code of each latency, in the same order
        self.record_code = self.codes.append
        self.hist = LatencyHistogram()
        self.by_status: dict[int, LatencyHistogram] = {}
        self.status = [0] * 1000
        self.errors = dict.fromkeys(REQUEST_ERRORS, 0)
        self.connect_errors = 0
        self.issued = 0  # measured requests sent (closed loop) or scheduled (open loop)
        self.completed = 0  # responses, warm-up included (for the progress display)
        self.outstanding = 0
        self.connections: set[_Connection] = set()
        self.reconnecting: set[asyncio.Task[None]] = set()
        self.idle: list[_Connection] = []
        self.backlog: deque[int] = deque()
        self.waited = 0
        self.max_backlog = 0
        self.running = True
        self.sending = True
        self.t0 = 0
        self.measure_from = 1 << 62
        self.stop_at = 1 << 62
        self.in_window = 0
        self.cpu_share = 0.0
        self.done = self.loop.create_future()
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if target.tls else None
        # open loop schedule
        self.interval_ns = NS_PER_S / spec.rate if spec.rate else 0.0
        self.scheduled = 0
        self.next_due = 0

    # connections
    async def connect(self) -> _Connection:
        _, conn = await self.loop.create_connection(
            lambda: _Connection(self), self.target.host, self.target.port, ssl=self.ssl,
            server_hostname=self.target.host if self.ssl else None,
        )
        self.connections.add(conn)
        return conn

    def lost(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if self.running:
            task = self.loop.create_task(self._reconnect())
            self.reconnecting.add(task)
            task.add_done_callback(self.reconnecting.discard)

    async def _reconnect(self) -> None:
        while self.running:
            try:
                conn = await self.connect()
            except OSError:
                self.connect_errors += 1
                await asyncio.sleep(_RECONNECT_DELAY_S)
                continue
            if self.running:
                self.next_request(conn, perf_counter_ns())
            return

    def failed(self, conn: _Connection, kind: str) -> None:
        if not conn.busy:
            return
        conn.busy = False
        self.outstanding -= 1
        if conn.measured:
            self.errors[kind] += 1
        self._maybe_done()

    # scheduling
    def next_request(self, conn: _Connection, now: int) -> None:
        """`conn` is free: give it its next request, or park it."""
        if self.spec.rate is None:
            if now < self.stop_at:
                measured = now >= self.measure_from
                self.issued += measured
                conn.send(now, now, measured)
                return
        elif self.backlog:
            due = self.backlog.popleft()
            conn.send(min(due, now), now, due >= self.measure_from)
            return
        self.idle.append(conn)
        self._maybe_done()

    def _schedule(self) -> None:
        """Open loop: send (or queue) every request due within the next timer granularity."""
        if not self.sending:
            return
        now = perf_counter_ns()
        horizon = min(now + _LOOKAHEAD_NS, self.stop_at)
        while self.next_due < horizon:
            due = self.next_due
            self.scheduled += 1
            self.next_due = self.t0 + int(self.scheduled * self.interval_ns)
            measured = due >= self.measure_from
            self.issued += measured
            if self.idle:
                self.idle.pop().send(min(due, now), now, measured)
            else:
                self.backlog.append(due)
                self.waited += measured
        if len(self.backlog) > self.max_backlog:
            self.max_backlog = len(self.backlog)
        if self.next_due < self.stop_at:
            delay = max((self.next_due - _LOOKAHEAD_NS - perf_counter_ns()) / NS_PER_S, 0.001)
            self.loop.call_later(delay, self._schedule)

    def _maybe_done(self) -> None:
        if not self.sending and self.outstanding == 0 and not self.backlog and not self.done.done():
            self.done.set_result(None)

    # bookkeeping
    def fold(self) -> None:
        """Move the raw latencies into the histograms (all answers, and their status code's)."""
        if self.latencies:
            chunk = np.array(self.latencies, dtype=np.int64)
            codes = np.array(self.codes, dtype=np.int64)
            del self.latencies[:], self.codes[:]
            self.hist.add(chunk)
            fold_by_status(self.by_status, chunk, codes)

    def answered(self) -> int:
        return sum(self.status) + sum(self.errors.values())

    def expire(self, now: int) -> None:
        limit = int(self.spec.timeout_s * NS_PER_S)
        for conn in list(self.connections):
            if conn.busy and now - conn.sent > limit:
                self.failed(conn, "timeout")
                if conn.transport is not None:
                    conn.transport.abort()

    async def run(self, on_progress: Callable[[Progress], None] | None) -> None:
        spec = self.spec
        try:
            first = await self.connect()
        except OSError as exc:
            raise LoadTestError(f"Cannot connect to {self.target.host}:{self.target.port}: {exc}") from exc
        others = await asyncio.gather(*(self.connect() for _ in range(spec.concurrency - 1)), return_exceptions=True)
        conns = [first, *(c for c in others if isinstance(c, _Connection))]
        self.connect_errors += sum(1 for c in others if not isinstance(c, _Connection))

        cpu0, self.t0 = process_time(), perf_counter_ns()
        self.measure_from = self.t0 + int(spec.warmup_s * NS_PER_S)
        self.stop_at = self.measure_from + int(spec.duration_s * NS_PER_S)
        if spec.rate is None:
            for conn in conns:
                self.next_request(conn, perf_counter_ns())
        else:
            self.idle = conns[::-1]
            self.next_due = self.t0
            self._schedule()

        last_count, last_at = 0, self.t0
        drain_deadline: int | None = None
        while True:
            now = perf_counter_ns()
            if self.sending and now >= self.stop_at:
                self.sending = False
                self.in_window = self.answered()
                self.cpu_share = (process_time() - cpu0) * NS_PER_S / max(now - self.t0, 1)
                drain_deadline = now + int(spec.timeout_s * NS_PER_S)
                self._maybe_done()
            self.expire(now)
            self.fold()
            if on_progress is not None:
                count = self.completed
                on_progress(Progress(
                    elapsed_s=(now - self.t0) / NS_PER_S, total_s=spec.warmup_s + spec.duration_s,
                    warming_up=now < self.measure_from, requests=count,
                    rps=(count - last_count) * NS_PER_S / max(now - last_at, 1), errors=sum(self.errors.values()),
                ))
                last_count, last_at = count, now
            if self.done.done() or (drain_deadline is not None and now >= drain_deadline):
                break
            wake = min(now + _TICK_NS, self.stop_at) if self.sending else now + _TICK_NS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.done), max(wake - now, 1_000_000) / NS_PER_S)
        self.running = False
        self.errors["timeout"] += sum(1 for c in self.connections if c.busy and c.measured)
        self.errors["unsent"] += sum(1 for due in self.backlog if due >= self.measure_from)
        for task in list(self.reconnecting):
            task.cancel()
        await asyncio.gather(*self.reconnecting, return_exceptions=True)
        for conn in list(self.connections):
            conn.busy = False
            if conn.transport is not None:
                conn.transport.abort()
        self.fold()

    def result(self) -> LoadResult:
        hist, spec = self.hist, self.spec
        responses = sum(self.status)
        latency = latency_summary(hist)
        by_status = {code: {"count": h.total, **latency_summary(h)} for code, h in sorted(self.by_status.items())}
        rps = self.in_window / spec.duration_s
        return LoadResult(
            url=self.target.url, method=self.target.method, body_bytes=len(self.target.body), mode=spec.mode,
            connections=spec.concurrency, rate=spec.rate, duration_s=spec.duration_s, warmup_s=spec.warmup_s,
            requests=self.issued, responses=responses, in_window=self.in_window, rps=rps, latency_ms=latency,
            status_codes={code: n for code, n in enumerate(self.status) if n}, latency_by_status=by_status,
            errors=dict(self.errors), connect_errors=self.connect_errors,
            waited_for_connection=self.waited, max_backlog=self.max_backlog, generator_cpu=self.cpu_share,
        )


async def run_load(
    target: HttpTarget, spec: LoadSpec, on_progress: Callable[[Progress], None] | None = None,
    target_qps: float | None = None,
) -> LoadResult:
    """Run one load test on the running loop and return what it measured."""
    run = _Run(target, spec)
    await run.run(on_progress)
    result = run.result()
    result.target_qps = target_qps if target_qps is not None else result.rps
    result.provisioned_concurrency = recommend_concurrency(result.target_qps, result.latency_ms["p50"] / 1000.0)
    if spec.rate is not None and result.waited_for_connection:
        result.notes.append(
            f"{result.waited_for_connection:,} requests found all {spec.concurrency} connections busy and waited "
            f"(at most {result.max_backlog:,} at once); the wait counts in their latency. If that is a large share, "
            "the server cannot keep up with the rate or --concurrency is too low."
        )
    if result.generator_cpu >= 0.9:
        result.notes.append(
            f"The load generator used {result.generator_cpu:.0%} of a core: the throughput may be its limit, "
            "not the server's."
        )
    if result.requests and result.error_count == result.requests:
        result.notes.append("Every request failed.")
    return result


# --------------------------------------------------------------------------- the command behind `berth loadtest`


def build_target(
    name: str | None, url: str | None, host: str | None, token: str | None, body: str | None
) -> HttpTarget:
    """The target of `berth loadtest`: endpoint NAME on the discovered server (body from --body, else
    from the endpoint's OpenAPI document), or any --url (POST with --body, else GET)."""
    import json

    from berth.client.http import BerthClient, BerthClientError, resolve_target
    from berth.control.openapi import NoSampleRequest, sample_request

    if (name is None) == (url is None):
        raise LoadTestError("Pass an endpoint NAME or --url, not both.")
    payload = body.encode() if body is not None else None
    if payload is not None:
        try:
            json.loads(payload)
        except ValueError as exc:
            raise LoadTestError(f"--body is not valid JSON: {exc}") from exc
    if url is not None:
        parts = urlsplit(url)
        try:  # the same discovery as the other commands; a URL on another server may need no token
            _, token = resolve_target(f"{parts.scheme}://{parts.netloc}", token)
        except BerthClientError:
            token = None
    else:
        try:
            base, token = resolve_target(host, token)
        except BerthClientError as exc:
            raise LoadTestError(str(exc)) from exc
        url = f"{base}/serving-endpoints/{name}/invocations"
        if payload is None:
            client = BerthClient(base, token)
            try:
                response = client.request(
                    "GET", f"/api/2.0/serving-endpoints/{name}/openapi", headers={"Accept": "text/plain"}
                )
                payload = json.dumps(sample_request(json.loads(response.text)), separators=(",", ":")).encode()
            except BerthClientError as exc:
                raise LoadTestError(f"Cannot read the OpenAPI document of endpoint {name}: {exc}") from exc
            except NoSampleRequest as exc:
                raise LoadTestError(f"Cannot make a request body for endpoint {name}: {exc}; pass --body.") from exc
            finally:
                client.close()
    headers: list[tuple[str, str]] = []
    if token:
        headers.append(("Authorization", f"Bearer {token}"))
    if payload is not None:
        headers.append(("Content-Type", "application/json"))
    return HttpTarget(url, method="POST" if payload is not None else "GET", body=payload or b"",
                      headers=tuple(headers))


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def recommendation_line(result: LoadResult, explicit_target: bool) -> str:
    """The provisioned-concurrency recommendation, explained in one line."""
    p50_s = result.latency_ms["p50"] / 1000.0
    source = "--target-qps" if explicit_target else "the measured throughput"
    return (
        f"Provisioned concurrency for {result.target_qps:,.1f} req/s ({source}): {result.provisioned_concurrency} "
        f"= ⌈{result.target_qps:,.1f} req/s × {p50_s:.3g} s p50⌉, by Little's law the requests in flight at that "
        "rate if each takes the median latency measured here (add headroom for the tail)."
    )


def render_result(result: LoadResult, explicit_target: bool) -> Any:
    """A rich renderable of the result."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    load = (f"closed loop, {result.connections} connections" if result.mode == "closed"
            else f"open loop at {result.rate:g} req/s, up to {result.connections} connections")
    timing = f"{result.duration_s:g} s" + (f" after {result.warmup_s:g} s warm-up" if result.warmup_s else "")
    table.add_row("target", f"{result.method} {result.url} ({result.body_bytes:,}-byte body)")
    table.add_row("load", f"{load}, {timing}")
    table.add_row("requests", f"{result.requests:,}: {result.responses:,} answered, {result.error_count:,} failed")
    table.add_row("throughput", f"{result.rps:,.1f} req/s")
    lat = result.latency_ms
    table.add_row("latency ms", "  ".join(f"{k} {_ms(lat[k])}" for k in ("p50", "p90", "p99", "p99.9", "max"))
                  + f"  (mean {_ms(lat['mean'])})")
    table.add_row("status", "  ".join(f"{code}: {n:,}" for code, n in sorted(result.status_codes.items())) or "-")
    if len(result.latency_by_status) > 1:  # one status: the latency row above is its own
        for code, stats in result.latency_by_status.items():
            table.add_row(f"  {code} ms", "  ".join(f"{k} {_ms(stats[k])}" for k in ("p50", "p90", "p99", "max")))
    errors = [f"{kind} {n:,}" for kind, n in result.errors.items() if n]
    if result.connect_errors:
        errors.append(f"connect {result.connect_errors:,} (no request lost)")
    table.add_row("socket errors", "  ".join(errors) or "none")
    table.add_row("generator CPU", f"{result.generator_cpu:.0%} of one core")
    parts: list[Any] = [table, Text(recommendation_line(result, explicit_target))]
    parts += [Text(note, style="yellow") for note in result.notes]
    return Group(*parts)


def run_loadtest(
    target: HttpTarget, spec: LoadSpec, *, target_qps: float | None = None, progress: bool = True
) -> LoadResult:
    """Run a load test on a fresh uvloop loop, with a live progress line on stderr when it is a terminal."""
    import uvloop
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console(stderr=True)
    if not (progress and console.is_terminal):
        return uvloop.run(run_load(target, spec, target_qps=target_qps))

    # Refreshed from the event loop (no refresh thread competing for the GIL).
    with Live(Text("connecting…"), console=console, auto_refresh=False, transient=True) as live:

        def show(p: Progress) -> None:
            phase = "warming up" if p.warming_up else "measuring"
            done = min(p.elapsed_s / p.total_s, 1.0)
            bar = "█" * int(done * 30) + "·" * (30 - int(done * 30))
            live.update(Text(f"{bar} {p.elapsed_s:5.1f}/{p.total_s:g} s {phase}  {p.rps:10,.0f} req/s  "
                             f"{p.requests:,} requests  {p.errors:,} errors"), refresh=True)

        return uvloop.run(run_load(target, spec, show, target_qps=target_qps))
