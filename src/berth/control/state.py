"""Endpoint lifecycle: the Databricks state enums and the runtime objects the reconciler drives."""

from __future__ import annotations

import enum
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from berth.autoscaler import Bounds, Decision
from berth.backends.base import ReplicaHandle
from berth.control.spec import EndpointConfig, ReplicaPlan, ServedEntitySpec
from berth.observability.inference import InferenceTableConfig
from berth.ratelimit.rules import RateLimit


class Ready(enum.StrEnum):
    READY = "READY"
    NOT_READY = "NOT_READY"


class ConfigUpdate(enum.StrEnum):
    NOT_UPDATING = "NOT_UPDATING"
    IN_PROGRESS = "IN_PROGRESS"
    UPDATE_FAILED = "UPDATE_FAILED"
    UPDATE_CANCELED = "UPDATE_CANCELED"


class Deployment(enum.StrEnum):
    CREATING = "DEPLOYMENT_CREATING"
    READY = "DEPLOYMENT_READY"
    FAILED = "DEPLOYMENT_FAILED"
    ABORTED = "DEPLOYMENT_ABORTED"
    RECOVERING = "DEPLOYMENT_RECOVERING"


class ReplicaPhase(enum.StrEnum):
    STARTING = "STARTING"
    READY = "READY"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class ReplicaState:
    handle: ReplicaHandle
    phase: ReplicaPhase
    started_at: float
    ready_at: float | None = None
    concurrency: int = 0  # the max_concurrency it runs with


@dataclass
class EntityRuntime:
    """One served entity's replicas and health. Shared between configs when unchanged."""

    endpoint_name: str
    spec: ServedEntitySpec
    plan: ReplicaPlan
    creation_timestamp: int = field(default_factory=now_ms)
    deployment: Deployment = Deployment.CREATING
    message: str = "Starting replicas."
    replicas: dict[str, ReplicaState] = field(default_factory=dict)
    crashes: int = 0
    next_start_at: float = 0.0
    ever_ready: bool = False
    retired: bool = False
    last_replica_id: str | None = None
    at_zero: bool = False  # scaled to zero: no replica until a request comes
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)  # never shared by two entities
    # What the autoscaler asks for (None: the plan's until its first decision), and what it decided.
    target: int | None = None
    concurrency: int = 0  # per-replica concurrency in force (0: the plan's)
    decisions: deque[Decision] = field(default_factory=lambda: deque(maxlen=200))
    scaler: Any = None  # its berth.autoscaler.Autoscaler, made by the autoscaling loop
    # A remote source's local directory in the artifact cache, once fetched (berth.registry.cache).
    model_path: str | None = None
    # The model's requirements against Berth's environment (berth.runtimes.environment), checked
    # when its first replica starts: None until then, "" when they match.
    environment_warning: str | None = None

    def __post_init__(self) -> None:
        if self.concurrency <= 0:
            self.concurrency = self.plan.per_replica_concurrency

    def replan(self, spec: ServedEntitySpec, plan: ReplicaPlan) -> None:
        """New bounds (or none) for running replicas: what the autoscaler set stays, clamped into them."""
        bounds_changed = plan != self.plan or self.bounds != _bounds(spec, plan)
        self.spec, self.plan = spec, plan
        if bounds_changed:
            self.concurrency = plan.per_replica_concurrency
            if self.target is not None:
                low, high = self.bounds.replica_range(self.concurrency)
                self.target = min(high, max(1, low, self.target))

    def inherit(self, previous: EntityRuntime) -> None:
        """A new version of a served entity starts as big as the one it replaces (within its bounds), so
        traffic moves to it only once it can carry what the old one carried."""
        if previous.at_zero or previous.target is None:
            return
        low, high = self.bounds.replica_range(self.concurrency)
        provisioned = previous.desired_replicas * previous.concurrency
        self.target = min(high, max(1, low, math.ceil(provisioned / max(1, self.concurrency))))

    @property
    def bounds(self) -> Bounds:
        return _bounds(self.spec, self.plan)

    @property
    def starting_replicas(self) -> list[ReplicaState]:
        return [r for r in self.replicas.values() if r.phase is ReplicaPhase.STARTING]

    @property
    def ready_replicas(self) -> list[ReplicaState]:
        return [r for r in self.replicas.values() if r.phase is ReplicaPhase.READY]

    @property
    def desired_replicas(self) -> int:
        if self.at_zero:
            return 0
        if self.target is None:  # before the autoscaler's first decision: what the minimum needs
            if self.plan.replicas <= 0:
                return 0
            return max(1, self.bounds.replica_range(self.concurrency)[0])
        return self.target

    def view(self, creator: str, spec: ServedEntitySpec | None = None) -> dict[str, Any]:
        out = (spec or self.spec).to_dict()
        out["creator"] = creator
        out["creation_timestamp"] = self.creation_timestamp
        out["state"] = {"deployment": self.deployment.value, "deployment_state_message": self.state_message}
        return out

    @property
    def load_uri(self) -> str:
        """What its replicas load: the fetched directory of a remote source, else the local model itself."""
        return self.model_path if self.model_path is not None else self.spec.entity_name

    @property
    def fetched(self) -> bool:
        return self.spec.pinned is None or self.model_path is not None

    @property
    def state_message(self) -> str:
        """The state message as shown: the reconciler's, then any environment warning."""
        if not self.environment_warning:
            return self.message
        sep = "\n" if "\n" in self.message else " "  # after a failure's output, on a line of its own
        return f"{self.message}{sep}{self.environment_warning}"


def _bounds(spec: ServedEntitySpec, plan: ReplicaPlan) -> Bounds:
    return Bounds(spec.min_provisioned_concurrency, spec.max_provisioned_concurrency,
                  scale_to_zero=spec.scale_to_zero_enabled, max_replicas=plan.replicas)


@dataclass
class ConfigRuntime:
    version: int
    config: EndpointConfig
    entities: dict[str, EntityRuntime]
    start_time: int = field(default_factory=now_ms)

    def view(self, creator: str, *, pending: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "config_version": self.version,
            "served_entities": [self.entities[e.name].view(creator, e) for e in self.config.served_entities],
            "traffic_config": {"routes": [r.to_dict() for r in self.config.routes]},
        }
        capture = self.config.auto_capture
        if capture is not None:
            out["auto_capture_config"] = capture.to_dict()
            if capture.enabled:
                out["auto_capture_config"]["state"] = {"payload_table": {"name": capture.table_name,
                                                                         "status": "ACTIVE"}}
        if pending:
            out["start_time"] = self.start_time
        return out


@dataclass
class EndpointRuntime:
    """An endpoint in memory: its serving config and, during an update, the pending one."""

    name: str
    id: str
    creator: str
    creation_timestamp: int
    last_updated_timestamp: int
    active: ConfigRuntime | None = None
    pending: ConfigRuntime | None = None
    config_update: ConfigUpdate = ConfigUpdate.IN_PROGRESS
    tags: list[dict[str, str]] = field(default_factory=list)
    description: str | None = None
    rate_limits: tuple[RateLimit, ...] = ()  # the AI-gateway rate limits, enforced by the gateway
    inference_table: InferenceTableConfig | None = None  # the AI-gateway inference table

    @property
    def capture(self) -> InferenceTableConfig | None:
        """The inference table requests are logged to: the AI gateway's, else the live config's legacy one."""
        if self.inference_table is not None and self.inference_table.enabled:
            return self.inference_table
        legacy = self.active.config.auto_capture if self.active is not None else None
        return legacy if legacy is not None and legacy.enabled else None

    def entities(self) -> list[EntityRuntime]:
        """Every distinct entity of the active and pending configs."""
        seen: dict[int, EntityRuntime] = {}
        for cfg in (self.active, self.pending):
            if cfg is not None:
                for ent in cfg.entities.values():
                    seen.setdefault(id(ent), ent)
        return list(seen.values())

    @property
    def ready(self) -> Ready:
        if self.active is None:
            return Ready.NOT_READY
        ok = all((e.ready_replicas or e.at_zero) and e.deployment is not Deployment.FAILED
                 for e in self.active.entities.values())
        return Ready.READY if ok else Ready.NOT_READY

    @property
    def next_version(self) -> int:
        versions = [c.version for c in (self.active, self.pending) if c is not None]
        return max(versions, default=0) + 1

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "id": self.id,
            "creator": self.creator,
            "creation_timestamp": self.creation_timestamp,
            "last_updated_timestamp": self.last_updated_timestamp,
            "state": {"ready": self.ready.value, "config_update": self.config_update.value},
            "permission_level": "CAN_MANAGE",
            "route_optimized": False,
            "tags": list(self.tags),
        }
        if self.description is not None:
            out["description"] = self.description
        gateway: dict[str, Any] = {}
        if self.rate_limits:
            gateway["rate_limits"] = [r.to_dict() for r in self.rate_limits]
        if self.inference_table is not None:
            gateway["inference_table_config"] = self.inference_table.to_dict()
        if gateway:
            out["ai_gateway"] = gateway
        if self.active is not None:
            out["config"] = self.active.view(self.creator)
        if self.pending is not None:
            out["pending_config"] = self.pending.view(self.creator, pending=True)
        return out

    def summary(self) -> dict[str, Any]:
        """The list form: config reduced to entity names and versions."""
        out = self.view()
        cfg = self.active or self.pending
        out.pop("pending_config", None)
        if cfg is not None:
            out["config"] = {
                "config_version": cfg.version,
                "served_entities": [
                    {k: v for k, v in e.spec.to_dict().items() if k in ("name", "entity_name", "entity_version")}
                    for e in cfg.entities.values()
                ],
            }
        return out
