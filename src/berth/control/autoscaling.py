"""The autoscaler's I/O edge: sample every served entity, call the decision code, apply what it says.

Every sampling period (1 s, time-scaled) each active served entity is sampled into an
`autoscaler.Sample`: the replicas' own counters (`/stats`: requests answered, in flight, waiting,
summed scoring time), their CPU time and memory (from the backend), and the requests the gateway holds for
it. Every `policy.period_s` the entity's `Autoscaler` decides, and at the samples in between it checks
for a surge (`Autoscaler.surge`); a decision sets the entity's
target replicas and per-replica concurrency (the reconciler makes them so), goes into the
decision log (memory and store), and the learned traffic profile is saved now and then so a
restart keeps it. Nothing here decides anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from berth.autoscaler import Autoscaler, AutoscalerSettings, Decision, Forecaster, Sample, ScaleState
from berth.control.state import Deployment, EndpointRuntime, EntityRuntime
from berth.observability.export import WINDOW_S
from berth.observability.metrics import Metrics
from berth.store import Store

log = logging.getLogger("berth.autoscaler")

PROFILE_SAVE_S = 600.0  # the traffic profile is written to the store this often (time-scaled)


@dataclass
class _Mark:
    """A replica's counters at the previous sample."""

    requests: int
    service_s: float
    cpu_s: float | None
    t: float
    model: tuple[float, float, float] = (0, 0.0, 0)  # model calls, seconds in them, requests they scored


@dataclass
class _Track:
    """What the loop keeps per served entity."""

    samples: deque[Sample]
    next_decision: float
    in_front: float = 0.0  # in flight + held at the previous sample
    rejected: int = 0  # the gateway's capacity refusals counted at the previous sample
    last_saved: float = 0.0
    complete: bool = True  # every ready replica answered the last sample
    model: tuple[float, float, float] = (0, 0.0, 0)  # the last period's model calls, their seconds and requests
    rss: int = 0  # the largest resident memory of a ready replica at the last sample
    held_by_replicas: int = 0  # requests the ready replicas held at the last sample (scored or waiting)
    key: tuple[str, str] = ("", "")  # (endpoint, entity): its gauges are zeroed when the track ends


class AutoscalingLoop:
    """Runs beside the reconciler in the server's event loop."""

    def __init__(self, reconciler: object, store: Store, settings: AutoscalerSettings, *, vertical: bool,
                 memory_limit_mb: int, held: Callable[[str, str], int], metrics: Metrics | None = None,
                 forecast: bool = True, rejected: Callable[[str, str], int] | None = None) -> None:
        self.reconciler = reconciler
        self.backend = reconciler.backend  # type: ignore[attr-defined]
        self.store = store
        self.settings = settings
        self.vertical = vertical
        self.memory_limit_bytes = memory_limit_mb * 2**20  # 0: no limit (no memory signal)
        self.held = held  # requests the gateway holds for a replica or queues for a slot
        self.rejected = rejected  # the gateway's 429 RESOURCE_EXHAUSTED count so far (demand it could not admit)
        self.metrics = metrics
        self.forecast = forecast
        self._marks: dict[str, _Mark] = {}
        self._tracks: dict[str, _Track] = {}
        self._task: asyncio.Task[None] | None = None
        # Decisions run on the monotonic clock (a wall-clock step must not empty a window), shifted once
        # to epoch seconds so that the decision log and the daily traffic profile read as times of day.
        self._epoch_offset = time.time() - time.monotonic()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="berth-autoscaler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for endpoint in self._endpoints():
            for entity in self._entities(endpoint):
                self._save_profile(endpoint.name, entity)

    async def _run(self) -> None:
        period = self.settings.sample_s
        while True:
            started = time.monotonic()
            try:
                await self.tick(started + self._epoch_offset)
            except Exception:  # one bad pass must not stop the loop
                log.exception("autoscaling pass failed")
            await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))

    def _endpoints(self) -> list[EndpointRuntime]:
        return list(self.reconciler.endpoints.values())  # type: ignore[attr-defined]

    @staticmethod
    def _entities(endpoint: EndpointRuntime) -> list[EntityRuntime]:
        if endpoint.active is None:
            return []
        return [e for e in endpoint.active.entities.values()
                if not e.retired and e.deployment is not Deployment.FAILED]

    async def tick(self, now: float) -> None:
        """One sampling period: sample every active entity, decide for those that are due."""
        rows: list[tuple[EndpointRuntime, str, float, dict[str, object]]] = []
        live: set[str] = set()
        changed = False
        for endpoint in self._endpoints():
            for entity in self._entities(endpoint):
                live.add(entity.uid)
                track = self._tracks.get(entity.uid)
                if track is None:
                    track = self._tracks[entity.uid] = _Track(deque(), next_decision=now, last_saved=now,
                                                              key=(endpoint.name, entity.spec.name))
                    entity.scaler = self._policy(endpoint.name, entity)
                sample = await self._sample(endpoint.name, entity, track, now)
                track.samples.append(sample)
                while track.samples and track.samples[0].t < now - self.settings.history_s:
                    track.samples.popleft()
                self._export(endpoint.name, entity, track, sample)
                if not track.complete:
                    continue  # a replica did not answer: not a time to decide (it may be busy)
                state = ScaleState(entity.desired_replicas, entity.concurrency)
                if now + 1e-6 < track.next_decision:  # between cycles: only a surge is acted on
                    decision = entity.scaler.surge(now, track.samples, state, entity.bounds)
                    if decision is None:
                        continue
                else:
                    track.next_decision = now + entity.scaler.period_s
                    decision = entity.scaler.decide(now, track.samples, state, entity.bounds)
                changed |= self._apply(entity, decision)
                rows.append((endpoint, entity.spec.name, now, _doc(decision)))
                if now - track.last_saved >= PROFILE_SAVE_S * self.settings.time_scale:
                    track.last_saved = now
                    self._save_profile(endpoint.name, entity)
        for uid in set(self._tracks) - live:
            gone = self._tracks.pop(uid)
            if self.metrics is not None and not any(
                    t.key == gone.key for t in self._tracks.values()):  # not replaced under the same names
                self.metrics.zero_entity(*gone.key)
        replicas = {rid for ep in self._endpoints() for e in ep.entities() for rid in e.replicas}
        for rid in set(self._marks) - replicas:
            del self._marks[rid]
        endpoints = self.reconciler.endpoints  # type: ignore[attr-defined]
        kept = [(ep.name, ent, t, doc) for ep, ent, t, doc in rows if endpoints.get(ep.name) is ep]  # not deleted
        if kept:
            self.store.add_decisions(kept)
        if changed:
            self.reconciler.wake()  # type: ignore[attr-defined]

    def _policy(self, endpoint_name: str, entity: EntityRuntime) -> Autoscaler:
        forecaster = None
        if self.forecast:
            saved = self.store.get_profile(endpoint_name, entity.spec.name)
            forecaster = Forecaster.from_dict(saved) if saved else Forecaster(
                bucket_s=self.settings.scaled("forecast_bucket"), day_s=86_400.0 * self.settings.time_scale)
        return Autoscaler(self.settings, vertical=self.vertical, forecast=forecaster, name="berth")

    def _save_profile(self, endpoint_name: str, entity: EntityRuntime) -> None:
        forecaster = getattr(entity.scaler, "forecast", None)
        if forecaster is not None and forecaster.first_t is not None:
            self.store.save_profile(endpoint_name, entity.spec.name, forecaster.to_dict())

    async def _sample(self, endpoint_name: str, entity: EntityRuntime, track: _Track, now: float) -> Sample:
        ready = entity.ready_replicas
        stats = await asyncio.gather(*(self.backend.stats(r.handle.id) for r in ready))
        in_flight = completed = waiting = 0
        latency = 0.0
        cpus: list[float] = []
        memories: list[float] = []
        rss_max = 0
        model = [0.0, 0.0, 0.0]
        track.complete = all(st is not None for st in stats)
        for replica, st in zip(ready, stats, strict=True):
            if st is None:
                continue
            rid = replica.handle.id
            mark = self._marks.get(rid) or _Mark(0, 0.0, None, now)
            requests, service_s = int(st["requests"]), float(st.get("service_s", 0.0))
            in_flight += int(st["in_flight"])
            waiting += int(st.get("queued", 0))  # received, waiting for the model (part of in_flight)
            completed += max(0, requests - mark.requests)
            latency += max(0.0, service_s - mark.service_s)
            calls = (float(st.get("model_calls", 0)), float(st.get("model_call_s", 0.0)),
                     float(st.get("model_call_requests", 0)))
            for i, (value, before) in enumerate(zip(calls, mark.model, strict=True)):
                model[i] += max(0.0, value - before)
            usage = self.backend.usage(rid)
            cpu_s = None
            if usage is not None:
                cpu_s, rss = usage
                rss_max = max(rss_max, rss)
                if self.memory_limit_bytes > 0:
                    memories.append(rss / self.memory_limit_bytes)
                if mark.cpu_s is not None and now > mark.t:
                    cpus.append(min(1.0, max(0.0, (cpu_s - mark.cpu_s) / (now - mark.t))))
            self._marks[rid] = _Mark(requests, service_s, cpu_s, now, calls)
        held = self.held(endpoint_name, entity.spec.name)
        in_front = in_flight + held
        refused = self.rejected(endpoint_name, entity.spec.name) if self.rejected is not None else 0
        rejected, track.rejected = max(0, refused - track.rejected), refused
        arrived = max(0, completed + round(in_front - track.in_front)) + rejected
        track.in_front = in_front
        track.model, track.rss, track.held_by_replicas = (model[0], model[1], model[2]), rss_max, in_flight
        return Sample(
            t=now, in_flight=float(in_flight - waiting), queued=float(held + waiting), rejected=rejected,
            arrived=arrived,
            completed=completed,
            latency_s=latency / completed if completed else None, ready=len(ready),
            starting=len(entity.starting_replicas), concurrency=entity.concurrency,
            cpu=sum(cpus) / len(cpus) if cpus else None, memory=max(memories) if memories else None,
        )

    def _apply(self, entity: EntityRuntime, decision: Decision) -> bool:
        entity.decisions.append(decision)
        if not decision.changed:
            return False
        if decision.desired == 0:
            entity.at_zero, entity.target = True, None
            entity.message = (f"Scaled to zero after {self.settings.scale_to_zero_idle_s:g} s without requests; "
                              "the next request starts a replica.")
        else:
            entity.at_zero, entity.target = False, decision.desired
        entity.concurrency = decision.concurrency
        log.info("endpoint %s entity %s: %d -> %d replica(s) x %d: %s", entity.endpoint_name, entity.spec.name,
                 decision.previous, decision.desired, decision.concurrency, decision.reason,
                 extra={"endpoint": entity.endpoint_name, "entity": entity.spec.name, "event": "scale",
                        "previous": decision.previous, "desired": decision.desired,
                        "concurrency": decision.concurrency, "reason": decision.reason})
        return True

    def _export(self, endpoint_name: str, entity: EntityRuntime, track: _Track, sample: Sample) -> None:
        if self.metrics is None:
            return
        m, key = self.metrics, (endpoint_name, entity.spec.name)
        ready, starting = len(entity.ready_replicas), len(entity.starting_replicas)
        m.set_replicas(*key, desired=entity.desired_replicas, ready=ready, starting=starting,
                       concurrency=entity.concurrency)
        m.in_flight.labels(*key).set(track.held_by_replicas)
        m.queued.labels(*key).set(sample.queued)
        if sample.cpu is not None:
            m.replica_cpu.labels(*key).set(sample.cpu)
        m.replica_memory.labels(*key).set(track.rss)
        calls, seconds, requests = track.model
        if calls:
            m.model_calls.labels(*key).inc(calls)
            m.model_call_seconds.labels(*key).inc(seconds)
            m.model_call_requests.labels(*key).inc(requests)

    def samples(self, entity: EntityRuntime) -> list[Sample]:
        """All the entity's samples kept (the dashboard's replica and concurrency charts)."""
        track = self._tracks.get(entity.uid)
        return list(track.samples) if track is not None else []

    def window(self, entity: EntityRuntime) -> list[Sample]:
        """The entity's samples of the last (time-scaled) minute, for the endpoint metrics export."""
        seconds = WINDOW_S * self.settings.time_scale
        track = self._tracks.get(entity.uid)
        if track is None:
            return []
        cutoff = track.samples[-1].t - seconds if track.samples else 0.0
        return [s for s in track.samples if s.t > cutoff]


def _doc(decision: Decision) -> dict[str, object]:
    out = asdict(decision)
    out["inputs"] = dict(decision.inputs)
    return out
