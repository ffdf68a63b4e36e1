"""The per-endpoint metrics export, `GET /api/2.0/serving-endpoints/{name}/metrics`, under Databricks' names.

Databricks' values describe the last minute: the `*_total` series are gauges over the trailing 60 s,
not cumulative counters, and the histograms hold the last minute's observations. Two sources feed it:

- the request series (`request_count_total`, `request_4xx_count_total`, `request_5xx_count_total`,
  `request_latency_ms`, `model_queue_time_ms`) are differences of the gateway's cumulative
  Prometheus series (`berth_requests_total`, `berth_request_latency_seconds`,
  `berth_queue_wait_seconds`, summed over the host's gateway processes): `RequestWindow` snapshots
  them once a second and the export subtracts the snapshot of a minute ago from the present;
- provisioned concurrency and the replicas' CPU and memory are means of the autoscaling loop's 1 s
  samples of the same minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from berth.autoscaler import Sample

log = logging.getLogger("berth.metrics")

LABELS = ["endpoint_name", "served_entity_name"]
WINDOW_S = 60.0  # Databricks' "last minute"
HISTORY = 900  # snapshots kept for the dashboard's charts: 15 minutes at one a second


@dataclass(frozen=True, slots=True)
class Histo:
    """A cumulative histogram: counts at or under each upper bound (the last is +Inf), and the sum."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    total: float = 0.0

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def minus(self, base: Histo | None) -> Histo:
        if base is None or base.bounds != self.bounds:
            return self
        return Histo(self.bounds, tuple(max(0.0, a - b) for a, b in zip(self.counts, base.counts, strict=True)),
                     max(0.0, self.total - base.total))

    def plus(self, other: Histo) -> Histo:
        return Histo(self.bounds, tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
                     self.total + other.total)


@dataclass(frozen=True, slots=True)
class Totals:
    """One served entity's cumulative request series (entity "": refused before one was chosen)."""

    requests: float = 0.0
    client_errors: float = 0.0  # 4xx
    server_errors: float = 0.0  # 5xx
    latency: Histo | None = None  # seconds, from the request's last byte read to its answer written
    queue: Histo | None = None  # seconds in front of the replicas: held for one, or in the admission queue

    def minus(self, base: Totals | None) -> Totals:
        if base is None:
            return self
        return Totals(
            max(0.0, self.requests - base.requests),
            max(0.0, self.client_errors - base.client_errors),
            max(0.0, self.server_errors - base.server_errors),
            self.latency.minus(base.latency) if self.latency is not None else None,
            self.queue.minus(base.queue) if self.queue is not None else None,
        )


Key = tuple[str, str]  # (endpoint, served entity)


class Trailing:
    """Snapshots of cumulative totals, kept long enough to subtract the one `window_s` ago. Pure."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._snapshots: deque[tuple[float, Mapping[Key, Totals]]] = deque()

    def add(self, t: float, totals: Mapping[Key, Totals]) -> None:
        self._snapshots.append((t, totals))
        # Keep the newest snapshot at or before the cut of any later `over` call, and all after it.
        while len(self._snapshots) > 1 and self._snapshots[1][0] <= t - self.window_s:
            self._snapshots.popleft()

    def base(self, now: float) -> Mapping[Key, Totals]:
        """The newest snapshot at least `window_s` old; none (zeros) while the series are younger."""
        found: Mapping[Key, Totals] = {}
        for t, totals in self._snapshots:
            if t > now - self.window_s:
                break
            found = totals
        return found

    def over(self, now: float, current: Mapping[Key, Totals]) -> dict[Key, Totals]:
        """What the series added in the window that ends `now`, from their values at `now`."""
        base = self.base(now)
        return {key: totals.minus(base.get(key)) for key, totals in current.items()}


class RequestWindow:
    """Samples `totals()` every `period_s` into a `Trailing`; the I/O edge of the export's request series."""

    def __init__(self, totals: Callable[[], Mapping[Key, Totals]], *, window_s: float = WINDOW_S,
                 period_s: float = 1.0, history: int = HISTORY) -> None:
        self.totals = totals
        self.period_s = period_s
        self.trailing = Trailing(window_s)
        self.history: deque[tuple[float, Mapping[Key, Totals]]] = deque(maxlen=history)  # (epoch s, totals)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sample()
        self._task = asyncio.create_task(self._run(), name="berth-metrics-window")

    def _sample(self) -> None:
        totals = self.totals()
        self.trailing.add(time.monotonic(), totals)
        self.history.append((time.time(), totals))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                self._sample()
            except Exception:  # one bad read must not end the export's window
                log.exception("sampling the request series failed")

    def last_window(self) -> dict[Key, Totals]:
        now = time.monotonic()
        return self.trailing.over(now, self.totals())


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _histogram(name: str, doc: str, rows: Iterable[tuple[list[str], Histo | None]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=LABELS)
    for labels, histo in rows:
        if histo is None:
            continue
        buckets = [(_ms_label(bound), count) for bound, count in zip(histo.bounds, histo.counts, strict=True)]
        family.add_metric(labels, buckets, sum_value=histo.total * 1e3)
    return family


def _ms_label(bound_s: float) -> str:
    return floatToGoString(round(bound_s * 1e3, 6))  # "+Inf", "0.5", "25.0": as prometheus-client writes `le`


class _Window:
    def __init__(self, endpoint: str, entities: Iterable[tuple[str, Sequence[Sample]]],
                 requests: Mapping[str, Totals]) -> None:
        self.endpoint = endpoint
        self.entities = list(entities)
        self.requests = requests

    def collect(self) -> Iterator[Metric]:
        rows = [([self.endpoint, name], totals) for name, totals in sorted(self.requests.items())]
        for name, doc, field in (
            ("request_count_total", "Requests answered in the last minute.", "requests"),
            ("request_4xx_count_total", "Requests answered 4xx in the last minute.", "client_errors"),
            ("request_5xx_count_total", "Requests answered 5xx in the last minute.", "server_errors"),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=LABELS)
            for labels, totals in rows:
                gauge.add_metric(labels, getattr(totals, field))
            yield gauge
        yield _histogram("request_latency_ms", "Latency in the gateway of the last minute's requests, ms.",
                         ((labels, t.latency) for labels, t in rows))
        yield _histogram("model_queue_time_ms",
                         "Time the last minute's requests waited in front of the model's replicas, ms.",
                         ((labels, t.queue) for labels, t in rows))

        provisioned = GaugeMetricFamily("provisioned_concurrent_requests_total",
                                        "Provisioned concurrency over the last minute (mean of 1 s samples).",
                                        labels=LABELS)
        cpu = GaugeMetricFamily("cpu_usage_percentage", "Mean CPU use of the replicas over the last minute.",
                                labels=LABELS)
        memory = GaugeMetricFamily("mem_usage_percentage",
                                   "Mean resident memory of the replicas over the last minute, % of the limit.",
                                   labels=LABELS)
        for name, samples in self.entities:
            labels = [self.endpoint, name]
            provisioned.add_metric(labels, _mean([s.ready * s.concurrency for s in samples]))
            cpu.add_metric(labels, 100 * _mean([s.cpu for s in samples if s.cpu is not None]))
            memory.add_metric(labels, 100 * _mean([s.memory for s in samples if s.memory is not None]))
        yield from (provisioned, cpu, memory)


def render_endpoint_metrics(endpoint: str, entities: Iterable[tuple[str, Sequence[Sample]]],
                            requests: Mapping[str, Totals] | None = None) -> bytes:
    """Prometheus text for one endpoint: each served entity's samples of the last minute, and the
    request series of that minute by served entity (`requests`, keyed by entity name)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Window(endpoint, entities, requests or {}))  # type: ignore[arg-type]
    return generate_latest(registry)
