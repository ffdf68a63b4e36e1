"""The reconciler: drives the backend toward each endpoint's desired replicas.

Every tick it watches replicas (exits, readiness), replaces crashed ones with exponential
backoff, fails an entity after repeated crashes or a model that cannot load, promotes a pending
config once all its entities are ready (blue/green), retires what the old config used, persists
state changes, and pushes a fresh routing table to the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from berth.backends.base import Backend, ReplicaExit, ReplicaSpec
from berth.control.secrets import SecretUnavailable
from berth.control.state import (
    ConfigRuntime,
    ConfigUpdate,
    Deployment,
    EndpointRuntime,
    EntityRuntime,
    ReplicaPhase,
    ReplicaState,
    now_ms,
)
from berth.gateway.routing import EndpointRoute, EntityRoute, EntityStatus, RoutingTable
from berth.observability.inference import table_uri
from berth.observability.metrics import Metrics
from berth.registry.cache import ArtifactCache
from berth.runtimes.environment import check_model
from berth.store import ReplicaRecord, Store

log = logging.getLogger("berth.reconciler")

TICK_S = 0.1
# While a replica is starting the pass runs this often: a forked replica is ready within ~20 ms, and
# a request may be waiting for it (the readiness check is one connect to a local socket).
STARTING_TICK_S = 0.005


@dataclass(frozen=True)
class CrashPolicy:
    """Restart backoff and the crash count after which an entity is failed."""

    limit: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    stable_after_s: float = 60.0

    def delay(self, crashes: int) -> float:
        """Seconds to wait before restarting after the n-th consecutive crash (n >= 1)."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** max(0, crashes - 1))

    def consecutive(self, previous: int, ran_for_s: float | None) -> int:
        """The crash count after one more crash; a replica that served long enough resets it."""
        if ran_for_s is not None and ran_for_s >= self.stable_after_s:
            return 1
        return previous + 1


class Reconciler:
    """Owns the in-memory endpoints and makes the backend match them."""

    def __init__(
        self,
        backend: Backend,
        store: Store,
        *,
        crash_policy: CrashPolicy,
        memory_limit_mb: int,
        start_timeout_s: float,
        on_routes: Callable[[RoutingTable], None],
        on_persist: Callable[[EndpointRuntime], None],
        settle_s: float = 1.0,
        drain_grace_s: float = 30.0,
        metrics: Metrics | None = None,
        inference_root: str = "",
        artifacts: ArtifactCache | None = None,
        resolve_env: Callable[[dict[str, str]], dict[str, str]] | None = None,
    ) -> None:
        self.backend = backend
        # A replica's environment_vars with `{{secrets/…}}` resolved (berth.control.secrets), at its start only.
        self.resolve_env = resolve_env or dict
        self.artifacts = artifacts  # remote sources' local copies (berth.registry.cache)
        self._fetches: dict[str, asyncio.Task[Path]] = {}
        self.inference_root = inference_root  # inference tables live under it (berth.observability.inference)
        self.metrics = metrics  # replica start times (berth_replica_start_seconds)
        self.store = store
        self.crash_policy = crash_policy
        self.memory_limit_mb = memory_limit_mb
        self.start_timeout_s = start_timeout_s
        self.on_routes = on_routes
        self.on_persist = on_persist
        # Between taking a replica out of the routing table and stopping it: time for every gateway
        # process to have the new table, so that none sends it a request after its SIGTERM.
        self.settle_s = settle_s
        self.drain_grace_s = drain_grace_s  # a stopped replica's time to finish what it holds
        self.endpoints: dict[str, EndpointRuntime] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._retiring: set[asyncio.Task[None]] = set()

    # Lifecycle
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="berth-reconciler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for fetch in self._fetches.values():  # kills their child processes
            fetch.cancel()
        await asyncio.gather(*self._fetches.values(), return_exceptions=True)
        for ep in list(self.endpoints.values()):
            await self._stop_entities(ep.entities(), grace_s=5.0)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.reconcile_once()
            except Exception:  # one bad pass must not stop the loop
                log.exception("reconcile pass failed")
            self._wake.clear()
            tick = STARTING_TICK_S if self._starting() else TICK_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick)

    def _starting(self) -> bool:
        return any(r.phase is ReplicaPhase.STARTING
                   for ep in self.endpoints.values() for e in ep.entities() for r in e.replicas.values())

    # Endpoints
    def add(self, endpoint: EndpointRuntime) -> None:
        self.endpoints[endpoint.name] = endpoint
        self.publish_routes()
        self.wake()

    async def remove(self, name: str) -> None:
        endpoint = self.endpoints.pop(name, None)
        self.publish_routes()
        if endpoint is not None:
            entities = endpoint.entities()
            for entity in entities:
                entity.retired = True  # a pass in flight must not start replicas for it
            await self._stop_entities(entities, grace_s=5.0)

    def demand(self, endpoint_name: str, entity_name: str) -> None:
        """A request is waiting for an entity with no replica: scale it up from zero."""
        endpoint = self.endpoints.get(endpoint_name)
        entity = endpoint.active.entities.get(entity_name) if endpoint and endpoint.active else None
        if entity is None or not entity.at_zero:
            return
        entity.at_zero, entity.target = False, None  # back to the plan's first replicas
        if entity.scaler is not None:
            entity.scaler.woken()  # a full idle period from now
        entity.message = "Scaling up from zero: a request is waiting."
        self.publish_routes()
        self.wake()

    # One pass
    async def reconcile_once(self) -> None:
        now = time.monotonic()
        for endpoint in list(self.endpoints.values()):
            changed = False
            for entity in endpoint.entities():
                changed |= await self._reconcile_entity(entity, now)
            changed |= self._advance_config(endpoint)
            if changed and endpoint.name in self.endpoints:
                endpoint.last_updated_timestamp = now_ms()
                # Routes first: once GET shows a state, the gateway already acts on it.
                self.publish_routes()
                self.on_persist(endpoint)

    async def _reconcile_entity(self, entity: EntityRuntime, now: float) -> bool:
        if entity.retired or entity.deployment is Deployment.FAILED:
            return False
        changed = False
        for rid, replica in list(entity.replicas.items()):
            exit_info = self.backend.exited(rid)
            if exit_info is not None:
                del entity.replicas[rid]
                self.store.remove_replica(rid)
                self._on_exit(entity, replica, exit_info, now)
                changed = True
        if entity.deployment is Deployment.FAILED:
            await self._stop_entities([entity], grace_s=2.0, keep_state=True)
            return True

        starting = [r for r in entity.replicas.values() if r.phase is ReplicaPhase.STARTING]
        if starting:
            ready = await asyncio.gather(*(self.backend.is_ready(r.handle.id) for r in starting))
            for replica, ok in zip(starting, ready, strict=True):
                if ok:
                    replica.phase = ReplicaPhase.READY
                    replica.ready_at = time.monotonic()
                    took = replica.ready_at - replica.started_at
                    if self.metrics is not None:
                        self.metrics.replica_start.labels(entity.endpoint_name, entity.spec.name).observe(took)
                    log.info("endpoint %s entity %s: replica %s ready in %.2f s", entity.endpoint_name,
                             entity.spec.name, replica.handle.id, took,
                             extra={**_fields(entity), "replica_id": replica.handle.id, "event": "replica_ready",
                                    "start_s": round(took, 4)})
                    changed = True
                elif now - replica.started_at > self.start_timeout_s:
                    entity.deployment = Deployment.FAILED
                    entity.message = (
                        f"Replica {replica.handle.id} did not become ready within "
                        f"{self.start_timeout_s:.0f} s."
                    )
                    await self._stop_entities([entity], grace_s=2.0, keep_state=True)
                    return True

        if entity.at_zero and not entity.spec.scale_to_zero_enabled:  # turned off while at zero
            entity.at_zero = False
            changed = True
        if not self._has_model(entity):
            return self._fetch(entity, now) or changed
        missing = entity.desired_replicas - len(entity.replicas)
        if missing > 0 and now >= entity.next_start_at and not entity.retired:
            for _ in range(missing):
                if not await self._start_replica(entity, now):
                    break
            changed = True
        elif missing < 0:
            self._scale_down(entity, -missing)
            changed = True
        await self._apply_concurrency(entity)

        n_ready = len(entity.ready_replicas)
        if entity.desired_replicas and n_ready >= entity.desired_replicas:
            message = f"Serving with {n_ready} replica(s) x {entity.concurrency} concurrent requests."
            if entity.deployment is not Deployment.READY or entity.message != message:
                entity.deployment, entity.message = Deployment.READY, message
                entity.ever_ready = True
                changed = True
        return changed

    def _has_model(self, entity: EntityRuntime) -> bool:
        """Whether replicas can start: a local source, or a fetched one whose tree is still on disk (one
        removed behind the cache's back is fetched again)."""
        if (entity.model_path is not None and entity.desired_replicas > len(entity.replicas)
                and not os.path.isdir(entity.model_path)):
            entity.model_path = None
        return entity.fetched

    def _fetch(self, entity: EntityRuntime, now: float) -> bool:
        """Bring a remote source into the artifact cache (a child process; entities of one source share the
        fetch); a failed fetch is retried under the crash policy, then fails the entity."""
        pinned = entity.spec.pinned
        assert pinned is not None
        if self.artifacts is None:
            entity.deployment, entity.message = Deployment.FAILED, "This server has no artifact cache."
            return True
        task = self._fetches.get(pinned.artifact_uri)
        if task is None:
            if now < entity.next_start_at:
                return False
            task = asyncio.create_task(self._fetch_source(pinned.artifact_uri), name=f"berth-fetch-{entity.spec.name}")
            task.add_done_callback(lambda _t: self.wake())
            self._fetches[pinned.artifact_uri] = task
        if not task.done():
            message = f"Fetching {_described(entity)} from the MLflow tracking server."
            changed = entity.message != message
            entity.message = message
            return changed
        if self._fetches.get(pinned.artifact_uri) is task:
            del self._fetches[pinned.artifact_uri]
        if task.cancelled():
            reason = "the fetch was cancelled"
        elif (error := task.exception()) is not None:
            reason = str(error)
        else:
            entity.model_path = str(task.result())
            entity.crashes = 0
            entity.message = f"Fetched {_described(entity)}; starting replicas."
            return True
        self._setback(entity, now, f"Fetching {_described(entity)}", reason, "artifact_fetch_failed")
        return True

    async def _fetch_source(self, artifact_uri: str) -> Path:
        """The cached tree of `artifact_uri`, fetched if missing; then the cache trimmed to its bound, sparing
        what every entity uses (the set taken here, on the loop)."""
        assert self.artifacts is not None
        started = time.monotonic()
        tree = await self.artifacts.fetch_async(artifact_uri)
        took = time.monotonic() - started
        log.info("artifact %s ready in %.2f s: %s", artifact_uri, took, tree,
                 extra={"event": "artifact_ready", "artifact_uri": artifact_uri, "fetch_s": round(took, 3)})
        in_use, taken_at = self.artifacts_in_use(), time.time()
        try:
            await asyncio.to_thread(self.artifacts.evict, in_use, taken_at=taken_at)
        except Exception:  # a failed trim must not fail the entity
            log.exception("artifact cache eviction failed")
        return tree

    def artifacts_in_use(self) -> set[str]:
        """The pinned artifact URIs of every served entity, live or pending (never evicted)."""
        return {ent.spec.pinned.artifact_uri for ep in list(self.endpoints.values()) for ent in ep.entities()
                if ent.spec.pinned is not None and not ent.retired}

    def _scale_down(self, entity: EntityRuntime, count: int) -> None:
        """Take `count` replicas out of service: starting ones first, then the newest."""
        newest_first = reversed(list(entity.replicas.values()))
        order = sorted(newest_first, key=lambda r: (r.phase is ReplicaPhase.READY, -r.started_at))
        victims = [r.handle.id for r in order[:count]]
        for rid in victims:
            del entity.replicas[rid]
        self.publish_routes()  # out of the table before the settle period starts
        self._in_background(self._stop_replicas(victims, grace_s=self.drain_grace_s, settle=True))

    async def _apply_concurrency(self, entity: EntityRuntime) -> None:
        want = entity.concurrency
        stale = [r for r in entity.ready_replicas if r.concurrency != want]
        if stale:
            done = await asyncio.gather(*(self.backend.configure(r.handle.id, want) for r in stale))
            for replica, ok in zip(stale, done, strict=True):
                if ok:
                    replica.concurrency = want
            if any(done):
                self.publish_routes()  # the gateways admit by the new concurrency

    def _on_exit(self, entity: EntityRuntime, replica: ReplicaState, exit_info: ReplicaExit, now: float) -> None:
        tail = exit_info.log_tail.strip()
        fields = {**_fields(entity), "replica_id": replica.handle.id, "event": "replica_exit",
                  "returncode": exit_info.returncode}
        if exit_info.model_load_failed:
            entity.deployment = Deployment.FAILED
            entity.message = f"Failed to load model {entity.spec.model_uri}. Last output:\n{tail}"
            log.error("endpoint %s entity %s: failed to load model %s", entity.endpoint_name, entity.spec.name,
                      entity.spec.model_uri, extra={**fields, "event": "model_load_failed"})
            return
        ran_for = None if replica.ready_at is None else now - replica.ready_at
        entity.crashes = self.crash_policy.consecutive(entity.crashes, ran_for)
        if entity.crashes >= self.crash_policy.limit:
            entity.deployment = Deployment.FAILED
            entity.message = (
                f"Replica crashed {entity.crashes} times in a row; the last one "
                f"{exit_info.describe()}. Last output:\n{tail}"
            )
            log.error("endpoint %s entity %s: failed after %d crashes", entity.endpoint_name, entity.spec.name,
                      entity.crashes, extra={**fields, "event": "entity_failed", "crashes": entity.crashes})
            return
        delay = self.crash_policy.delay(entity.crashes)
        entity.next_start_at = now + delay
        entity.deployment = Deployment.RECOVERING if entity.ever_ready else Deployment.CREATING
        entity.message = (
            f"Replica {replica.handle.id} {exit_info.describe()} (crash {entity.crashes} of "
            f"{self.crash_policy.limit}); restarting in {delay:.1f} s."
        )
        log.warning("endpoint %s entity %s: %s", entity.endpoint_name, entity.spec.name, entity.message,
                    extra={**fields, "crashes": entity.crashes, "restart_in_s": round(delay, 3)})

    def _replica_spec(self, entity: EntityRuntime) -> ReplicaSpec:
        return ReplicaSpec(
            endpoint_name=entity.endpoint_name,
            entity_name=entity.spec.name,
            model_uri=entity.load_uri,
            max_concurrency=entity.concurrency,
            environment_vars=entity.spec.environment_vars,
            memory_limit_mb=self.memory_limit_mb,
            entity_uid=entity.uid,
        )

    async def _start_replica(self, entity: EntityRuntime, now: float) -> bool:
        """Start one replica; False when its environment's secrets cannot be read (counted as a crash)."""
        spec = self._replica_spec(entity)
        try:
            spec = replace(spec, environment_vars=self.resolve_env(spec.environment_vars))
        except SecretUnavailable as exc:
            await self._start_failed(entity, str(exc), now)
            return False
        if entity.environment_warning is None:
            await self._check_environment(entity, spec.model_uri)
        asked = time.monotonic()
        handle = await self.backend.start(spec)
        entity.replicas[handle.id] = ReplicaState(handle, ReplicaPhase.STARTING, asked,
                                                  concurrency=spec.max_concurrency)
        entity.last_replica_id = handle.id
        log.info("endpoint %s entity %s: starting replica %s", entity.endpoint_name, entity.spec.name, handle.id,
                 extra={**_fields(entity), "replica_id": handle.id, "event": "replica_start", "pid": handle.pid,
                        "concurrency": spec.max_concurrency})
        self.store.add_replica(
            ReplicaRecord(
                id=handle.id,
                endpoint_name=entity.endpoint_name,
                entity_name=entity.spec.name,
                pid=handle.pid,
                address=handle.address,
                started_at=time.time(),
            )
        )
        return True

    async def _start_failed(self, entity: EntityRuntime, reason: str, now: float) -> None:
        """A replica could not be started (a secret it names is gone): a setback under the crash policy;
        `reason` names the reference, never a value."""
        if self._setback(entity, now, "Starting a replica", reason, "replica_start_failed"):
            await self._stop_entities([entity], grace_s=2.0, keep_state=True)

    def _setback(self, entity: EntityRuntime, now: float, what: str, reason: str, event: str) -> bool:
        """One more failure in a row of `what` under the crash policy: back off, or at the limit fail the
        entity (True). Its state message says which, with `reason`."""
        entity.crashes = self.crash_policy.consecutive(entity.crashes, None)
        reason = reason.strip().rstrip(".")
        fields = {**_fields(entity), "event": event, "crashes": entity.crashes}
        if entity.crashes >= self.crash_policy.limit:
            entity.deployment = Deployment.FAILED
            entity.message = f"{what} failed {entity.crashes} times in a row: {reason}"
            log.error("endpoint %s entity %s: %s", entity.endpoint_name, entity.spec.name, entity.message,
                      extra=fields)
            return True
        delay = self.crash_policy.delay(entity.crashes)
        entity.next_start_at = now + delay
        entity.deployment = Deployment.RECOVERING if entity.ever_ready else Deployment.CREATING
        entity.message = (f"{what} failed (try {entity.crashes} of {self.crash_policy.limit}): {reason}; "
                          f"retrying in {delay:.1f} s.")
        log.warning("endpoint %s entity %s: %s", entity.endpoint_name, entity.spec.name, entity.message,
                    extra={**fields, "restart_in_s": round(delay, 3)})
        return False

    async def _check_environment(self, entity: EntityRuntime, model_uri: str) -> None:
        """Once per entity, before its first replica: the model's requirements against Berth's own
        environment (replicas run in it), for its state message and the platform's log."""
        try:
            report = await asyncio.to_thread(check_model, model_uri)
        except Exception:  # a check that cannot run must not stop the entity from starting
            log.exception("endpoint %s entity %s: environment check failed", entity.endpoint_name, entity.spec.name)
            report = None
        entity.environment_warning = report.warning() if report is not None else ""
        if report is not None and entity.environment_warning:
            log.warning("endpoint %s entity %s: %s", entity.endpoint_name, entity.spec.name,
                        entity.environment_warning,
                        extra={**_fields(entity), "event": "environment_mismatch", "packages": report.packages()})

    def _advance_config(self, endpoint: EndpointRuntime) -> bool:
        pending = endpoint.pending
        if pending is None or endpoint.config_update is not ConfigUpdate.IN_PROGRESS:
            return False
        entities = list(pending.entities.values())
        if any(e.deployment is Deployment.FAILED for e in entities):
            endpoint.config_update = ConfigUpdate.UPDATE_FAILED
            log.warning("endpoint %s: config version %d failed; the previous one keeps serving", endpoint.name,
                        pending.version, extra={"endpoint": endpoint.name, "config_version": pending.version,
                                                "event": "config_failed"})
            active_ids = {id(e) for e in (endpoint.active.entities.values() if endpoint.active else ())}
            self._retire([e for e in entities if id(e) not in active_ids], keep_state=True)
            if endpoint.active is None:  # a failed create: show the failure as the config
                endpoint.active, endpoint.pending = pending, None
            return True
        if all(e.deployment is Deployment.READY for e in entities):
            old = endpoint.active
            endpoint.active, endpoint.pending = pending, None
            endpoint.config_update = ConfigUpdate.NOT_UPDATING
            log.info("endpoint %s: config version %d is live", endpoint.name, pending.version,
                     extra={"endpoint": endpoint.name, "config_version": pending.version, "event": "config_live"})
            if old is not None:
                keep = {id(e) for e in pending.entities.values()}
                self._retire([e for e in old.entities.values() if id(e) not in keep])
            return True
        return False

    def _retire(self, entities: list[EntityRuntime], *, keep_state: bool = False) -> None:
        """Stop entities in the background, after the routing table no longer names them."""
        for e in entities:
            e.retired = True
        self._in_background(self._stop_entities(entities, grace_s=self.drain_grace_s, keep_state=keep_state,
                                                settle=True))

    def _in_background(self, stop: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(stop)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _stop_entities(
        self, entities: list[EntityRuntime], *, grace_s: float, keep_state: bool = False, settle: bool = False
    ) -> None:
        rids = []
        for entity in entities:
            rids += list(entity.replicas)
            entity.replicas.clear()
            if not keep_state and entity.deployment is not Deployment.FAILED:
                entity.deployment = Deployment.ABORTED if not entity.ever_ready else entity.deployment
        await self._stop_replicas(rids, grace_s=grace_s, settle=settle)
        await asyncio.gather(*(self.backend.release(self._replica_spec(e)) for e in entities))

    async def _stop_replicas(self, replica_ids: list[str], *, grace_s: float, settle: bool = False) -> None:
        """Stop replicas already out of the routing table; with `settle`, first let every gateway
        process take the new table (in-flight requests still finish: a replica drains on SIGTERM)."""
        if settle and replica_ids:
            await asyncio.sleep(self.settle_s)
        await asyncio.gather(*(self._stop_replica(rid, grace_s) for rid in replica_ids))

    async def _stop_replica(self, replica_id: str, grace_s: float) -> None:
        try:
            await self.backend.stop(replica_id, grace_s=grace_s)
        finally:
            self.store.remove_replica(replica_id)

    # Routing
    def publish_routes(self) -> None:
        self.on_routes(build_routing_table(self.endpoints.values(), self.inference_root))


def _described(entity: EntityRuntime) -> str:
    """`models:/lr@champion (version 3)`: the source as named, and what it was pinned to."""
    pinned = entity.spec.pinned
    if pinned is not None and pinned.version is not None and entity.spec.source.kind != "version":
        return f"{entity.spec.model_uri} (version {pinned.version})"
    return entity.spec.model_uri


def _fields(entity: EntityRuntime) -> dict[str, Any]:
    """The structured fields of a log record about an entity (JSON logs carry them as keys)."""
    return {"endpoint": entity.endpoint_name, "entity": entity.spec.name}


def build_routing_table(endpoints: object, inference_root: str = "") -> RoutingTable:
    """The gateway's view of the serving configs: weights, statuses and ready replicas, and where
    each endpoint's requests are logged (its inference table under `inference_root`, if it has one)."""
    table: dict[str, EndpointRoute] = {}
    for endpoint in endpoints:  # type: ignore[attr-defined]
        active: ConfigRuntime | None = endpoint.active
        capture = table_uri(inference_root, endpoint.name) if inference_root and endpoint.capture else ""
        if active is None:
            table[endpoint.name] = EndpointRoute(endpoint.name, (), creating=True, rate_limits=endpoint.rate_limits,
                                                 capture=capture)
            continue
        weights = {r.served_model_name: r.traffic_percentage for r in active.config.routes}
        entities = []
        for spec in active.config.served_entities:
            ent = active.entities[spec.name]
            if ent.deployment is Deployment.FAILED:
                status = EntityStatus.FAILED
            elif ent.ready_replicas:
                status = EntityStatus.READY
            elif ent.at_zero:
                status = EntityStatus.ZERO
            else:
                status = EntityStatus.STARTING
            entities.append(
                EntityRoute(
                    name=spec.name,
                    percentage=weights.get(spec.name, 0),
                    status=status,
                    replicas=tuple((r.handle.id, r.handle.address) for r in ent.ready_replicas),
                    message=ent.message if status is EntityStatus.FAILED else "",
                    concurrency=sum(r.concurrency or ent.concurrency for r in ent.ready_replicas),
                    uid=ent.uid,
                )
            )
        table[endpoint.name] = EndpointRoute(endpoint.name, tuple(entities), rate_limits=endpoint.rate_limits,
                                             capture=capture)
    return RoutingTable(table)
