"""The reconciler against a fake backend: crash backoff, failure after the limit, blue/green."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from berth.autoscaler import AutoscalerSettings
from berth.backends.base import EXIT_MODEL_LOAD_FAILED, ReplicaExit, ReplicaHandle, ReplicaSpec
from berth.control.autoscaling import AutoscalingLoop
from berth.control.reconciler import CrashPolicy, Reconciler
from berth.control.service import EndpointService
from berth.control.state import ConfigUpdate, Deployment, Ready
from berth.gateway.routing import EntityStatus, RoutingTable
from berth.registry.cache import ArtifactCache
from berth.registry.resolver import Resolver
from berth.registry.sources import PinnedModel
from berth.store import Store


class FakeBackend:
    """Implements the `Backend` protocol in memory; the test decides readiness and exits."""

    def __init__(self) -> None:
        self.started: list[ReplicaSpec] = []
        self.ready: set[str] = set()
        self.exits: dict[str, ReplicaExit] = {}
        self.stopped: list[str] = []
        self.auto_ready = True
        self.served: dict[str, int] = {}  # requests each replica reports in /stats
        self.in_flight: dict[str, int] = {}
        self.configured: list[tuple[str, int]] = []
        self.released: list[str] = []

    async def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        rid = f"r{len(self.started)}"
        self.started.append(spec)
        if self.auto_ready:
            self.ready.add(rid)
        return ReplicaHandle(rid, f"unix:/tmp/{rid}.sock", pid=None)

    async def is_ready(self, replica_id: str) -> bool:
        return replica_id in self.ready

    def exited(self, replica_id: str) -> ReplicaExit | None:
        return self.exits.get(replica_id)

    async def stop(self, replica_id: str, grace_s: float = 10.0) -> None:
        self.stopped.append(replica_id)

    async def stats(self, replica_id: str) -> dict[str, int] | None:
        return {"requests": self.served.get(replica_id, 0), "in_flight": self.in_flight.get(replica_id, 0),
                "queued": 0}

    def usage(self, replica_id: str) -> tuple[float, int] | None:
        return None

    async def configure(self, replica_id: str, max_concurrency: int) -> bool:
        self.configured.append((replica_id, max_concurrency))
        return True

    async def release(self, spec: ReplicaSpec) -> None:
        self.released.append(spec.entity_name)

    def logs(self, replica_id: str, max_lines: int = 200) -> str:
        return f"log of {replica_id}"

    def cleanup_orphans(self, records):  # type: ignore[no-untyped-def]
        return []

    async def close(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def world(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr("berth.control.reconciler.time.monotonic", clock)
    store = Store(f"sqlite:///{tmp_path / 'berth.db'}")
    backend = FakeBackend()
    tables: list[RoutingTable] = []
    holder: dict[str, EndpointService] = {}
    reconciler = Reconciler(
        backend,
        store,
        crash_policy=CrashPolicy(limit=5, backoff_s=1.0, backoff_max_s=30.0, stable_after_s=60.0),
        memory_limit_mb=4096,
        start_timeout_s=300.0,
        on_routes=tables.append,
        on_persist=lambda ep: holder["service"].persist(ep),
        settle_s=0.0,
    )
    service = EndpointService(store, reconciler, cores=2)
    holder["service"] = service
    yield service, reconciler, backend, clock, tables
    store.close()


def one_entity(path: str = "/models/a", **extra):  # type: ignore[no-untyped-def]
    return {"served_entities": [{"entity_name": path, "name": "a", **extra}]}


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_policy_backoff_doubles_and_caps():
    policy = CrashPolicy(limit=5, backoff_s=0.5, backoff_max_s=3.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.consecutive(3, ran_for_s=5.0) == 4
    assert policy.consecutive(3, ran_for_s=None) == 4
    assert policy.consecutive(3, ran_for_s=60.0) == 1


def test_create_becomes_ready_and_routes(world):
    service, reconciler, _backend, _clock, tables = world

    async def scenario():
        view = await service.create({"name": "ep", "config": one_entity()}, creator="admin")
        assert view["state"] == {"ready": "NOT_READY", "config_update": "IN_PROGRESS"}
        assert "config" not in view
        assert view["pending_config"]["config_version"] == 1
        assert tables[-1].endpoints["ep"].creating
        await reconciler.reconcile_once()  # starts the replica (ready at once in the fake)
        await reconciler.reconcile_once()  # sees it ready, promotes the config
        return service.get("ep")

    view = run(scenario())
    assert view["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}
    assert view["config"]["served_entities"][0]["state"]["deployment"] == "DEPLOYMENT_READY"
    route = tables[-1].endpoints["ep"]
    assert route.entities[0].status is EntityStatus.READY
    assert len(route.entities[0].replicas) == 1


def test_crashes_back_off_then_fail_after_limit(world):
    service, reconciler, backend, clock, tables = world

    async def scenario():
        await service.create({"name": "ep", "config": one_entity()}, creator="admin")
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()
        ep = reconciler.endpoints["ep"]
        entity = ep.active.entities["a"]
        delays = []
        for crash in range(1, 6):
            (rid,) = entity.replicas
            backend.exits[rid] = ReplicaExit(returncode=-9, log_tail=f"boom {crash}")
            await reconciler.reconcile_once()
            if crash < 5:
                assert entity.deployment is Deployment.RECOVERING
                delays.append(entity.next_start_at - clock.t)
                before = len(backend.started)
                await reconciler.reconcile_once()
                assert len(backend.started) == before, "no restart before the backoff elapses"
                clock.t = entity.next_start_at
                await reconciler.reconcile_once()
                assert len(backend.started) == before + 1
        return entity, delays, ep

    entity, delays, ep = run(scenario())
    assert delays == [1.0, 2.0, 4.0, 8.0]
    assert entity.deployment is Deployment.FAILED
    assert "crashed 5 times" in entity.message
    assert "boom 5" in entity.message
    assert ep.ready is Ready.NOT_READY
    assert tables[-1].endpoints["ep"].entities[0].status is EntityStatus.FAILED


def test_model_load_failure_fails_at_once_without_retry(world):
    service, reconciler, backend, _clock, _tables = world
    backend.auto_ready = False

    async def scenario():
        await service.create({"name": "ep", "config": one_entity()}, creator="admin")
        await reconciler.reconcile_once()
        backend.exits["r0"] = ReplicaExit(EXIT_MODEL_LOAD_FAILED, "RuntimeError: bad weights")
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()
        return service.get("ep")

    view = run(scenario())
    assert len(backend.started) == 1
    assert view["state"]["config_update"] == "UPDATE_FAILED"
    entity = view["config"]["served_entities"][0]
    assert entity["state"]["deployment"] == "DEPLOYMENT_FAILED"
    assert "bad weights" in entity["state"]["deployment_state_message"]


def test_update_is_blue_green_and_failed_update_keeps_old_serving(world):
    service, reconciler, backend, _clock, tables = world

    async def scenario():
        await service.create({"name": "ep", "config": one_entity()}, creator="admin")
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()
        backend.auto_ready = False
        await service.update_config("ep", one_entity("/models/b"))
        await reconciler.reconcile_once()  # new replica starting; old one still routed
        route = tables[-1].endpoints["ep"]
        assert route.entities[0].replicas[0][0] == "r0"
        backend.exits["r1"] = ReplicaExit(EXIT_MODEL_LOAD_FAILED, "cannot load b")
        await reconciler.reconcile_once()
        await asyncio.sleep(0)
        return service.get("ep")

    view = run(scenario())
    assert view["state"] == {"ready": "READY", "config_update": "UPDATE_FAILED"}
    assert view["config"]["config_version"] == 1
    assert view["config"]["served_entities"][0]["entity_name"] == "/models/a"
    assert view["pending_config"]["served_entities"][0]["state"]["deployment"] == "DEPLOYMENT_FAILED"
    assert tables[-1].endpoints["ep"].entities[0].replicas[0][0] == "r0"
    assert "r0" not in backend.stopped


def test_unchanged_entity_keeps_its_replicas_across_update(world):
    service, reconciler, backend, _clock, _tables = world

    async def scenario():
        await service.create({"name": "ep", "config": one_entity()}, creator="admin")
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()
        two = {
            "served_entities": [
                {"entity_name": "/models/a", "name": "a"},
                {"entity_name": "/models/b", "name": "b"},
            ],
            "traffic_config": {"routes": [
                {"served_model_name": "a", "traffic_percentage": 50},
                {"served_model_name": "b", "traffic_percentage": 50},
            ]},
        }
        await service.update_config("ep", two)
        for _ in range(3):
            await reconciler.reconcile_once()
        return service.get("ep")

    view = run(scenario())
    assert view["state"]["config_update"] == "NOT_UPDATING"
    assert view["config"]["config_version"] == 2
    assert len(backend.started) == 2, "a kept its replica; only b started one"
    assert backend.stopped == []


def test_restart_restores_endpoints_from_the_store(world, tmp_path):
    service, reconciler, _backend, _clock, _tables = world

    async def scenario():
        await service.create({"name": "ep", "config": one_entity()}, creator="admin")
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()

    run(scenario())
    fresh = Reconciler(
        FakeBackend(), service.store, crash_policy=CrashPolicy(), memory_limit_mb=1, start_timeout_s=1,
        on_routes=lambda t: None, on_persist=lambda e: None,
    )
    restored = EndpointService(service.store, fresh, cores=2)
    restored.load()
    ep = fresh.endpoints["ep"]
    assert ep.config_update is ConfigUpdate.NOT_UPDATING
    assert ep.active is not None
    assert ep.active.version == 1
    assert ep.active.entities["a"].deployment is Deployment.RECOVERING


def test_idle_scale_to_zero_entity_goes_to_zero_and_a_demand_brings_it_back(world):
    service, reconciler, backend, clock, tables = world
    napper = {"served_entities": [{"entity_name": "/models/a", "name": "a", "workload_size": "Small",
                                   "scale_to_zero_enabled": True}]}

    async def settle():
        await reconciler.reconcile_once()
        await asyncio.gather(*reconciler._retiring)

    async def scenario():
        await service.create({"name": "ep", "config": napper}, creator="admin")
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()
        (rid,) = reconciler.endpoints["ep"].active.entities["a"].replicas
        loop = AutoscalingLoop(reconciler, service.store, AutoscalerSettings(), vertical=False, memory_limit_mb=4096,
                               held=lambda endpoint, entity: 0, forecast=False)
        # Requests keep coming: never idle, whatever the time.
        for served in range(1, 5):
            backend.served[rid] = served
            clock.t += 1000.0
            await loop.tick(clock.t)
            await settle()
        assert tables[-1].endpoints["ep"].entities[0].status is EntityStatus.READY
        clock.t += 1000.0  # one decision sees no new request ...
        await loop.tick(clock.t)
        await settle()
        assert tables[-1].endpoints["ep"].entities[0].status is EntityStatus.READY
        clock.t += 801.0  # ... and 1,801 s later another one: idle for the whole period
        await loop.tick(clock.t)
        await settle()
        zero = service.get("ep")
        assert tables[-1].endpoints["ep"].entities[0].status is EntityStatus.ZERO
        assert backend.stopped == [rid]
        reconciler.demand("ep", "a")
        assert tables[-1].endpoints["ep"].entities[0].status is EntityStatus.STARTING
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()
        return zero, service.get("ep"), rid

    zero, back, rid = run(scenario())
    state = zero["config"]["served_entities"][0]["state"]
    assert zero["state"]["ready"] == "READY"
    assert state["deployment"] == "DEPLOYMENT_READY"
    assert "Scaled to zero after 1800 s without requests" in state["deployment_state_message"]
    assert back["state"]["ready"] == "READY"
    assert back["config"]["served_entities"][0]["state"]["deployment_state_message"].startswith("Serving with 1")
    route = tables[-1].endpoints["ep"].entities[0]
    assert route.status is EntityStatus.READY
    assert [r for r, _ in route.replicas] != [rid]  # a new replica, never the old id


def test_lower_bounds_stop_the_newest_replicas_and_new_concurrency_reaches_the_others(world):
    service, reconciler, backend, _clock, _tables = world
    wide = {"served_entities": [{"entity_name": "/models/a", "name": "a", "min_provisioned_concurrency": 64,
                                 "max_provisioned_concurrency": 64}]}
    narrow = {"served_entities": [{"entity_name": "/models/a", "name": "a", "min_provisioned_concurrency": 8,
                                   "max_provisioned_concurrency": 8}]}

    async def scenario():
        await service.create({"name": "ep", "config": wide}, creator="admin")
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()
        first = list(reconciler.endpoints["ep"].active.entities["a"].replicas)
        await service.update_config("ep", narrow)
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()
        await asyncio.gather(*reconciler._retiring)
        return first, list(reconciler.endpoints["ep"].active.entities["a"].replicas)

    first, after = run(scenario())
    assert len(first) == 2  # 64 on 2 cores: 2 replicas x 32
    assert after == first[:1]  # the newest one stopped, the other kept
    assert backend.stopped == first[1:]
    assert backend.configured == [(first[0], 8)]
    assert len(backend.started) == 2  # nothing restarted
    assert service.get("ep")["config"]["served_entities"][0]["max_provisioned_concurrency"] == 8


def test_autoscaling_loop_scales_on_demand_and_logs_each_decision(world):
    """Replicas holding more than the target make the loop raise the entity's replicas; every decision
    is kept with its inputs, in memory and in the store (read back through the service)."""
    service, reconciler, backend, clock, _tables = world
    config = {"served_entities": [{"entity_name": "/models/a", "name": "a", "min_provisioned_concurrency": 0,
                                   "max_provisioned_concurrency": 32}]}

    async def scenario():
        await service.create({"name": "ep", "config": config}, creator="admin")
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()
        entity = reconciler.endpoints["ep"].active.entities["a"]
        assert (len(entity.replicas), entity.concurrency) == (1, 16)  # starts at the minimum: 1 of at most 2
        loop = AutoscalingLoop(reconciler, service.store, AutoscalerSettings(), vertical=False,
                               memory_limit_mb=4096, held=lambda endpoint, entity: 0, forecast=False)
        (rid,) = entity.replicas
        backend.in_flight[rid] = 16  # demand 16 over a target of 0.7 x 16 = 11.2: 2 replicas
        for _ in range(6):
            clock.t += 1.0
            await loop.tick(clock.t)
            await reconciler.reconcile_once()
        return entity

    entity = run(scenario())
    assert entity.desired_replicas == 2
    assert len(entity.replicas) == 2
    grew = [d for d in entity.decisions if d.desired > d.previous]
    assert len(grew) == 1
    assert grew[0].inputs["target"] == pytest.approx(11.2)
    logged = service.decisions("ep")["decisions"]
    assert len(logged) == len(entity.decisions)
    assert [d["cycle"] for d in logged] == list(range(1, len(logged) + 1))
    assert logged[-1]["served_entity_name"] == "a"
    assert any(d["desired"] == 2 and "demand" in d["reason"] for d in logged)


def test_the_learned_traffic_profile_survives_a_restart(world):
    """The forecaster's per-bucket profile goes to the store on stop and is what a new loop starts from."""
    service, reconciler, backend, clock, _tables = world

    async def scenario():
        await service.create({"name": "ep", "config": one_entity()}, creator="admin")
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()
        entity = reconciler.endpoints["ep"].active.entities["a"]
        (rid,) = entity.replicas
        loop = AutoscalingLoop(reconciler, service.store, AutoscalerSettings(), vertical=False, memory_limit_mb=4096,
                               held=lambda endpoint, entity: 0)
        for second in range(1, 181):  # three minutes at 2 requests/s
            backend.served[rid] = 2 * second
            clock.t += 1.0
            await loop.tick(clock.t)
        learned = entity.scaler.forecast.to_dict()
        await loop.stop()
        entity.scaler = None
        again = AutoscalingLoop(reconciler, service.store, AutoscalerSettings(), vertical=False, memory_limit_mb=4096,
                                held=lambda endpoint, entity: 0)
        clock.t += 1.0
        await again.tick(clock.t)
        return learned, entity.scaler.forecast.to_dict()

    learned, restored = run(scenario())
    assert sum(learned["daily"].values()) >= 2 * 120  # at least two full minutes counted (120 per minute)
    assert restored["daily"] == learned["daily"]
    assert restored["weekly"] == learned["weekly"]


def test_an_update_keeps_the_autoscaled_size_and_a_new_version_starts_as_big(world):
    """A traffic-only update leaves what the autoscaler set; a new model version starts with the
    provisioned concurrency of the one it replaces, so traffic moves only once it can carry it."""
    service, reconciler, _backend, _clock, _tables = world
    bounds = {"min_provisioned_concurrency": 0, "max_provisioned_concurrency": 64}
    v1 = {"served_entities": [{"entity_name": "/models/a", "name": "a", **bounds}]}
    v2 = {"served_entities": [{"entity_name": "/models/b", "name": "a", **bounds}]}

    async def scenario():
        await service.create({"name": "ep", "config": v1}, creator="admin")
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()
        entity = reconciler.endpoints["ep"].active.entities["a"]
        entity.target = 2  # as the autoscaler would after a load step (2 replicas x 32 on 2 cores)
        await service.update_config("ep", v1)  # same entity, same bounds
        kept = (entity.target, entity.concurrency)
        for _ in range(3):
            await reconciler.reconcile_once()
        await service.update_config("ep", v2)  # a new model under the same name
        pending = reconciler.endpoints["ep"].pending.entities["a"]
        return kept, pending.desired_replicas

    kept, new_size = run(scenario())
    assert kept == (2, 32)
    assert new_size == 2


class PinningResolver(Resolver):
    """Stands in for the tracking server (the real one is tests/integration/test_registry.py's)."""

    def resolve(self, source):  # type: ignore[no-untyped-def]
        return PinnedModel(f"mlflow-artifacts:/0/models/{source.name}-7/artifacts", "7", "run")


class FlakyCache(ArtifactCache):
    """A real cache whose download fails `failures` times, then writes a model locally."""

    failures = 2

    async def fetch_async(self, artifact_uri):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(self.fetch, artifact_uri, evict=False)  # in process: _download is ours

    def _download(self, artifact_uri, dest):  # type: ignore[no-untyped-def]
        if self.failures:
            self.failures -= 1
            raise ConnectionError("tracking server unreachable")
        (dest / "artifacts").mkdir(parents=True)
        (dest / "artifacts" / "MLmodel").write_text("flavors: {}\n")


def test_a_registry_source_is_fetched_before_replicas_start_and_a_failed_fetch_is_retried(world, tmp_path):
    service, reconciler, backend, clock, _tables = world
    service.resolver = PinningResolver("http://tracking")
    reconciler.artifacts = FlakyCache(tmp_path / "artifacts", max_bytes=1 << 30, tracking_uri="http://tracking")

    async def settle():  # the fetch runs in a thread: wait for it (the loop's clock is the test's), reconcile
        if reconciler._fetches:
            await asyncio.wait(list(reconciler._fetches.values()))
        await reconciler.reconcile_once()

    async def scenario():
        view = await service.create({"name": "ep", "config": one_entity("models:/churn@champion")}, creator="admin")
        assert view["pending_config"]["served_entities"][0]["entity_version"] == "7"
        await reconciler.reconcile_once()
        entity = reconciler.endpoints["ep"].pending.entities["a"]
        assert entity.message.startswith("Fetching models:/churn@champion (version 7)")
        messages = []
        for _ in range(2):
            await settle()
            messages.append(entity.message)
            assert not backend.started, "no replica before the model is here"
            clock.t = entity.next_start_at
            await reconciler.reconcile_once()
        await settle()  # fetched
        await reconciler.reconcile_once()  # starts the replica
        await reconciler.reconcile_once()  # sees it ready
        return entity, messages

    entity, messages = run(scenario())
    assert "failed (try 1 of 5): tracking server unreachable; retrying in 1.0 s" in messages[0]
    assert "failed (try 2 of 5)" in messages[1]
    assert entity.model_path is not None
    assert (Path(entity.model_path) / "MLmodel").is_file()
    assert [s.model_uri for s in backend.started] == [entity.model_path]
    assert entity.deployment is Deployment.READY
