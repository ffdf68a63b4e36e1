"""Endpoint operations behind the REST API: validate, persist, hand to the reconciler, render.

Every operation validates the whole request before it writes anything, and writes the store
before it touches the reconciler, so a failed request leaves nothing half-made.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable
from typing import Any

from berth.access.permissions import Caller
from berth.control.autoscaling import AutoscalingLoop
from berth.control.reconciler import Reconciler
from berth.control.secrets import SecretService
from berth.control.spec import (
    EndpointConfig,
    ReplicaPlan,
    ServedEntitySpec,
    parse_config,
    pin_config,
    plan_replicas,
    secret_references,
    validate_endpoint_name,
)
from berth.control.state import (
    ConfigRuntime,
    ConfigUpdate,
    Deployment,
    EndpointRuntime,
    EntityRuntime,
    now_ms,
)
from berth.errors import (
    InvalidParameterValue,
    ResourceAlreadyExists,
    ResourceConflict,
    ResourceDoesNotExist,
    TemporarilyUnavailable,
)
from berth.observability.export import RequestWindow, Totals, render_endpoint_metrics
from berth.observability.inference import InferenceTableConfig, parse_inference_table
from berth.observability.metrics import no_requests
from berth.observability.series import request_series
from berth.ratelimit.rules import RateLimit, parse_rate_limits
from berth.registry.resolver import Resolver
from berth.registry.sources import PinnedModel
from berth.runtimes import PYFUNC
from berth.store import EndpointRecord, Store
from berth.store.db import DECISIONS_KEPT

PIN_TIMEOUT_S = 60.0  # a create or update waits this long for the registry, then 503 (nothing written)


class EndpointService:
    """Create, read, update and delete serving endpoints."""

    def __init__(self, store: Store, reconciler: Reconciler, *, cores: int, replica_concurrency: int = 0,
                 resolver: Resolver | None = None) -> None:
        self.store = store
        self.resolver = resolver or Resolver(None)  # pins registry sources (berth.registry)
        self.reconciler = reconciler
        self.cores = cores
        self.replica_concurrency = replica_concurrency  # > 0: every replica admits this many (no vertical axis)
        self.autoscaling: AutoscalingLoop | None = None  # set by the platform once built
        self.requests: RequestWindow | None = None  # the gateway's request series of the last minute (idem)
        self.secrets: SecretService | None = None  # checks `{{secrets/…}}` in environment_vars (idem)

    # Loading after a restart
    def load(self) -> None:
        for record in self.store.list_endpoints():
            self.reconciler.add(self._from_doc(record))

    # Operations
    async def create(self, body: Any, creator: str, owner: str | None = None,
                     caller: Caller | None = None) -> dict[str, Any]:
        """Create an endpoint; `owner` (a principal id) is granted CAN_MANAGE with it. The secrets its
        environment_vars name must be the `caller`'s to use (None: the platform itself)."""
        if not isinstance(body, dict):
            raise InvalidParameterValue("The request body must be a JSON object.")
        name = validate_endpoint_name(body.get("name"))
        if body.get("route_optimized"):
            raise InvalidParameterValue(
                "route_optimized is not supported: Berth serves every endpoint through its gateway "
                f"at /serving-endpoints/{name}/invocations. Omit the field or set it to false."
            )
        config = parse_config(body.get("config"))
        tags = _parse_tags(body.get("tags"))
        limits, table = parse_ai_gateway(body["ai_gateway"]) if body.get("ai_gateway") is not None else ((), None)
        if body.get("rate_limits") is not None:  # the deprecated field
            if limits:
                raise InvalidParameterValue("Give rate limits in 'ai_gateway.rate_limits' or in the deprecated "
                                            "'rate_limits', not both.")
            limits = parse_rate_limits(body["rate_limits"])
        description = body.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidParameterValue("'description' must be a string.")
        if name in self.reconciler.endpoints:  # before asking a registry anything
            raise ResourceAlreadyExists(f"Endpoint '{name}' already exists.")
        self.require_secrets(config, caller)
        remote = await self.pin_sources(config)
        if remote is not config:
            self.require_secrets(config, caller)  # a scope deleted or re-created while the registry answered
        config = remote
        ts = now_ms()
        endpoint = EndpointRuntime(
            name=name,
            id=uuid.uuid4().hex,
            creator=creator,
            creation_timestamp=ts,
            last_updated_timestamp=ts,
            tags=tags,
            description=description,
            rate_limits=limits,
            inference_table=table,
        )
        endpoint.pending, _ = self._config_runtime(endpoint, 1, config)
        endpoint.config_update = ConfigUpdate.IN_PROGRESS
        self.store.create_endpoint(EndpointRecord(name, endpoint.id, to_doc(endpoint)), owner=owner)
        self.reconciler.add(endpoint)
        return endpoint.view()

    def get(self, name: str) -> dict[str, Any]:
        return self._endpoint(name).view()

    def list(self, visible: Callable[[str], bool] = lambda name: True) -> dict[str, Any]:
        endpoints = sorted(self.reconciler.endpoints.values(), key=lambda e: e.name)
        return {"endpoints": [ep.summary() for ep in endpoints if visible(ep.name)]}

    async def update_config(self, name: str, body: Any, caller: Caller | None = None) -> dict[str, Any]:
        endpoint = self._endpoint(name)
        self._not_updating(endpoint)
        if not isinstance(body, dict):
            raise InvalidParameterValue("The request body must be a JSON object.")
        config = parse_config(body)
        self.require_secrets(config, caller)
        remote = await self.pin_sources(config)
        if remote is not config:  # the registry answered after an await: what may have changed meanwhile
            if self.reconciler.endpoints.get(name) is not endpoint:
                raise ResourceDoesNotExist(f"Endpoint '{name}' was deleted while its models were resolved.")
            self._not_updating(endpoint)  # another update was accepted meanwhile
            self.require_secrets(config, caller)  # a scope deleted or re-created meanwhile
        config = remote
        pending, rescale = self._config_runtime(endpoint, endpoint.next_version, config)
        previous = (endpoint.pending, endpoint.config_update, endpoint.last_updated_timestamp)
        endpoint.pending, endpoint.config_update = pending, ConfigUpdate.IN_PROGRESS
        endpoint.last_updated_timestamp = now_ms()
        try:
            self.store.save_endpoint(EndpointRecord(endpoint.name, endpoint.id, to_doc(endpoint)))
        except Exception:
            endpoint.pending, endpoint.config_update, endpoint.last_updated_timestamp = previous
            raise
        for entity, spec, plan in rescale:
            entity.replan(spec, plan)
        self.reconciler.wake()
        return endpoint.view()

    async def pin_sources(self, config: EndpointConfig) -> EndpointConfig:
        """Resolve every remote source (registered names, `models:/…`, `runs:/…`) to the artifacts it names
        now, in worker threads; 400/404/503 from the registry before anything is written."""
        remote = [spec for spec in config.served_entities if spec.source.remote]
        if not remote:
            return config
        try:
            pins = await asyncio.wait_for(asyncio.gather(
                *(asyncio.to_thread(self.resolver.resolve, spec.source) for spec in remote)), PIN_TIMEOUT_S)
        except TimeoutError:
            raise TemporarilyUnavailable(
                f"The MLflow tracking server did not resolve {', '.join(s.model_uri for s in remote)} within "
                f"{PIN_TIMEOUT_S:.0f} s; nothing was changed.", retry_after=10) from None
        return pin_config(config, dict(zip([spec.name for spec in remote], pins, strict=True)))

    def require_secrets(self, config: EndpointConfig, caller: Caller | None) -> None:
        """The secrets the config's environment_vars name exist and the caller manages their scopes."""
        if self.secrets is not None:
            self.secrets.require_references(caller, config)
        elif any(secret_references(e.environment_vars) for e in config.served_entities):
            raise InvalidParameterValue("This server has no secret store: environment_vars cannot name secrets.")

    @staticmethod
    def _not_updating(endpoint: EndpointRuntime) -> None:
        if endpoint.config_update is ConfigUpdate.IN_PROGRESS:
            raise ResourceConflict(
                f"Endpoint '{endpoint.name}' is already being updated (config_update IN_PROGRESS); "
                "wait for it to finish before sending another update."
            )

    def patch_tags(self, name: str, body: Any) -> dict[str, Any]:
        """Add or replace tags (`add_tags`) and remove keys (`delete_tags`); no replica restarts."""
        endpoint = self._endpoint(name)
        if not isinstance(body, dict):
            raise InvalidParameterValue("The request body must be a JSON object.")
        add = _parse_tags(body.get("add_tags"))
        delete = body.get("delete_tags") or []
        if not isinstance(delete, list) or not all(isinstance(k, str) for k in delete):
            raise InvalidParameterValue("'delete_tags' must be a list of tag keys.")
        added = {t["key"] for t in add}
        tags = [t for t in endpoint.tags if t["key"] not in added and t["key"] not in delete] + add
        previous = endpoint.tags
        endpoint.tags = tags
        try:
            self.persist(endpoint)
        except Exception:
            endpoint.tags = previous
            raise
        return {"tags": list(tags)}

    def put_ai_gateway(self, name: str, body: Any, *, legacy: bool = False) -> dict[str, Any]:
        """Replace the endpoint's AI-gateway config (`PUT …/ai-gateway`; `legacy`: `PUT …/rate-limits`,
        which carries only `rate_limits`). Takes effect in every gateway process at once, no restart."""
        endpoint = self._endpoint(name)
        if not isinstance(body, dict):
            raise InvalidParameterValue("The request body must be a JSON object.")
        if legacy:
            unknown = set(body) - {"rate_limits"}
            if unknown:
                raise InvalidParameterValue(f"Unknown field(s): {', '.join(sorted(unknown))}.")
            limits, table = parse_rate_limits(body.get("rate_limits")), endpoint.inference_table
        else:
            limits, table = parse_ai_gateway(body)
        previous = endpoint.rate_limits, endpoint.inference_table
        endpoint.rate_limits, endpoint.inference_table = limits, table
        try:
            self.persist(endpoint)
        except Exception:
            endpoint.rate_limits, endpoint.inference_table = previous
            raise
        self.reconciler.publish_routes()
        rules = [r.to_dict() for r in limits]
        out: dict[str, Any] = {"rate_limits": rules} if legacy or rules or "rate_limits" in body else {}
        if table is not None and not legacy:
            out["inference_table_config"] = table.to_dict()
        return out

    async def delete(self, name: str) -> None:
        self._endpoint(name)
        self.store.delete_endpoint(name)
        self.store.delete_decisions(name)
        self.store.delete_profiles(name)
        await self.reconciler.remove(name)

    def decisions(self, name: str, served_entity_name: str | None = None, limit: Any = 100) -> dict[str, Any]:
        """The autoscaler's newest decisions for an endpoint (or one served entity), oldest first."""
        endpoint = self._endpoint(name)
        if served_entity_name is not None and not any(
                cfg is not None and served_entity_name in cfg.entities for cfg in (endpoint.active, endpoint.pending)):
            raise ResourceDoesNotExist(f"Served entity '{served_entity_name}' does not exist in endpoint '{name}'.")
        try:
            count = int(limit)
        except (TypeError, ValueError):
            count = 0
        if not 1 <= count <= DECISIONS_KEPT:
            raise InvalidParameterValue(f"limit must be an integer from 1 to {DECISIONS_KEPT}; got {limit!r}.")
        return {"decisions": self.store.list_decisions(name, served_entity_name, count)}

    def metrics(self, name: str) -> bytes:
        """The endpoint's metrics export (Prometheus text, Databricks' names, the last minute)."""
        entities = _active_entities(self._endpoint(name))
        window = self.autoscaling.window if self.autoscaling is not None else (lambda _e: [])
        requests: dict[str, Totals] = {}
        if self.requests is not None:
            last = self.requests.last_window()
            requests = {entity: totals for (endpoint, entity), totals in last.items() if endpoint == name}
            for e in entities:
                requests.setdefault(e.spec.name, no_requests())
        return render_endpoint_metrics(name, [(e.spec.name, window(e)) for e in entities], requests)

    def series(self, name: str) -> dict[str, Any]:
        """The dashboard's data for one endpoint: per-second requests, errors and latency percentiles
        (`request_series`), each active served entity's replicas and concurrency, and the autoscaler's
        latest decisions."""
        entities = _active_entities(self._endpoint(name))
        out: dict[str, Any] = request_series(list(self.requests.history) if self.requests else [], name)
        out["entities"] = {}
        for entity in entities:
            samples = self.autoscaling.samples(entity) if self.autoscaling is not None else []
            out["entities"][entity.spec.name] = {
                "t": [round(s.t, 3) for s in samples],
                "ready": [s.ready for s in samples],
                "starting": [s.starting for s in samples],
                "concurrency": [s.concurrency for s in samples],
                "in_flight": [s.in_flight + s.queued for s in samples],
            }
        out["decisions"] = self.store.list_decisions(name, None, 20)
        return out

    def logs(self, name: str, served_model_name: str, *, build: bool = False) -> dict[str, str]:
        """The output of the entity's most recent replica (build logs: its model-load part)."""
        endpoint = self._endpoint(name)
        entity = None
        for cfg in (endpoint.pending, endpoint.active):
            if cfg is not None and served_model_name in cfg.entities:
                entity = cfg.entities[served_model_name]
                break
        if entity is None:
            raise ResourceDoesNotExist(
                f"Served entity '{served_model_name}' does not exist in endpoint '{name}'."
            )
        if entity.last_replica_id is None:
            return {"logs": ""}
        text = self.reconciler.backend.logs(entity.last_replica_id, max_lines=1000 if build else 200)
        if build:
            marker = text.find("model loaded, serving on")
            if marker != -1:
                text = text[: text.find("\n", marker) + 1]
        return {"logs": text}

    def model_locations(self, name: str) -> list[tuple[str, str]]:
        """(served name, local model) of the serving config's entities (the pending one's while the endpoint
        is being created); a remote source not fetched yet gives its URI."""
        endpoint = self._endpoint(name)
        cfg = endpoint.active or endpoint.pending
        return [(ent_name, ent.load_uri) for ent_name, ent in cfg.entities.items()] if cfg is not None else []

    def persist(self, endpoint: EndpointRuntime) -> None:
        self.store.save_endpoint(EndpointRecord(endpoint.name, endpoint.id, to_doc(endpoint)))

    # Helpers
    def _endpoint(self, name: str) -> EndpointRuntime:
        endpoint = self.reconciler.endpoints.get(name)
        if endpoint is None:
            raise ResourceDoesNotExist(f"Endpoint '{name}' does not exist.")
        return endpoint

    def _config_runtime(
        self, endpoint: EndpointRuntime, version: int, config: EndpointConfig
    ) -> tuple[ConfigRuntime, list[tuple[EntityRuntime, ServedEntitySpec, ReplicaPlan]]]:
        """The config's runtime, sharing entities whose model and environment are unchanged, and
        the new spec and plan of each shared one (applied by the caller once the change is stored)."""
        reusable = {}
        if endpoint.active is not None:
            for ent in endpoint.active.entities.values():
                if ent.deployment is not Deployment.FAILED and not ent.retired:
                    reusable[ent.spec.deployment_key()] = ent
        entities = {}
        rescale = []
        for spec in config.served_entities:
            shared = reusable.get(spec.deployment_key())
            if shared is not None:  # same model and environment: new bounds apply to its running replicas
                rescale.append((shared, spec, self._plan(spec)))
            if shared is None:
                shared = self._entity(endpoint.name, spec)
                previous = endpoint.active.entities.get(spec.name) if endpoint.active is not None else None
                if previous is not None:
                    shared.inherit(previous)
            entities[spec.name] = shared
        return ConfigRuntime(version=version, config=config, entities=entities), rescale

    def _plan(self, spec: ServedEntitySpec) -> ReplicaPlan:
        if self.replica_concurrency > 0 and spec.max_provisioned_concurrency > 0:
            fixed = self.replica_concurrency  # as many replicas as the maximum needs, no core cap
            return ReplicaPlan(math.ceil(spec.max_provisioned_concurrency / fixed), fixed)
        return plan_replicas(
            spec.max_provisioned_concurrency,
            PYFUNC.per_replica_concurrency,
            self.cores,
            cpu_bound=PYFUNC.cpu_bound,
        )

    def _entity(self, endpoint_name: str, spec: ServedEntitySpec) -> EntityRuntime:
        return EntityRuntime(endpoint_name=endpoint_name, spec=spec, plan=self._plan(spec))

    def _from_doc(self, record: EndpointRecord) -> EndpointRuntime:
        doc = record.doc
        endpoint = EndpointRuntime(
            name=record.name,
            id=record.id,
            creator=doc["creator"],
            creation_timestamp=doc["creation_timestamp"],
            last_updated_timestamp=doc["last_updated_timestamp"],
            config_update=ConfigUpdate(doc["config_update"]),
            tags=doc.get("tags", []),
            description=doc.get("description"),
            rate_limits=parse_rate_limits(doc.get("rate_limits")),
            inference_table=parse_inference_table(doc.get("inference_table"), "inference_table"),
        )
        for slot in ("active", "pending"):
            saved = doc.get(slot)
            if saved is None:
                continue
            pins = {name: PinnedModel.from_dict(raw) for name, raw in (saved.get("pinned") or {}).items()}
            config = pin_config(parse_config(saved["config"]), pins)
            cfg, rescale = self._config_runtime(endpoint, saved["version"], config)
            for entity, spec, plan in rescale:
                entity.replan(spec, plan)
            cfg.start_time = saved.get("start_time", cfg.start_time)
            for ent_name, ent in cfg.entities.items():
                state = saved["entities"].get(ent_name, {})
                ent.creation_timestamp = state.get("creation_timestamp", ent.creation_timestamp)
                if state.get("deployment") == Deployment.FAILED.value:
                    ent.deployment, ent.message = Deployment.FAILED, state.get("message", "")
                elif state.get("deployment") in (Deployment.READY.value, Deployment.RECOVERING.value):
                    ent.deployment, ent.ever_ready = Deployment.RECOVERING, True
                    ent.message = "Server restarted; starting replicas."
            setattr(endpoint, slot, cfg)
        return endpoint


def _active_entities(endpoint: EndpointRuntime) -> list[EntityRuntime]:
    """The served entities of the live config (none while the endpoint is being created)."""
    return list(endpoint.active.entities.values()) if endpoint.active is not None else []


def to_doc(endpoint: EndpointRuntime) -> dict[str, Any]:
    """The stored form of an endpoint."""

    def cfg_doc(cfg: ConfigRuntime | None) -> dict[str, Any] | None:
        if cfg is None:
            return None
        return {
            "version": cfg.version,
            "start_time": cfg.start_time,
            "config": cfg.config.to_input_dict(),
            "pinned": {e.name: e.pinned.to_dict() for e in cfg.config.served_entities if e.pinned is not None},
            "entities": {
                name: {
                    "deployment": ent.deployment.value,
                    "message": ent.message,
                    "creation_timestamp": ent.creation_timestamp,
                }
                for name, ent in cfg.entities.items()
            },
        }

    return {
        "creator": endpoint.creator,
        "creation_timestamp": endpoint.creation_timestamp,
        "last_updated_timestamp": endpoint.last_updated_timestamp,
        "config_update": endpoint.config_update.value,
        "tags": endpoint.tags,
        "description": endpoint.description,
        "rate_limits": [r.to_dict() for r in endpoint.rate_limits],
        "inference_table": endpoint.inference_table.to_dict() if endpoint.inference_table is not None else None,
        "active": cfg_doc(endpoint.active),
        "pending": cfg_doc(endpoint.pending),
    }


# AI-gateway blocks Berth does not do yet: refused when enabled, so nobody believes them on.
_AI_GATEWAY_LATER = {
    "usage_tracking_config": "usage tracking",
    "guardrails": "guardrails",
    "fallback_config": "fallbacks",
}


def parse_ai_gateway(raw: Any) -> tuple[tuple[RateLimit, ...], InferenceTableConfig | None]:
    """An `AiGatewayConfig`: its rate limits and inference table; 400 for the blocks Berth cannot honour yet."""
    if not isinstance(raw, dict):
        raise InvalidParameterValue("'ai_gateway' must be an object.")
    unknown = set(raw) - {"rate_limits", "inference_table_config", *_AI_GATEWAY_LATER}
    if unknown:
        raise InvalidParameterValue(f"ai_gateway has unknown field(s): {', '.join(sorted(unknown))}.")
    for block, what in _AI_GATEWAY_LATER.items():
        value = raw.get(block)
        if value is None or (isinstance(value, dict) and not value.get("enabled", bool(value))):
            continue
        raise InvalidParameterValue(f"ai_gateway.{block}: {what} are not supported yet; rate_limits and "
                                    "inference_table_config are.")
    table = parse_inference_table(raw.get("inference_table_config"), "ai_gateway.inference_table_config")
    return parse_rate_limits(raw.get("rate_limits"), "ai_gateway.rate_limits"), table


def _parse_tags(raw: Any) -> list[dict[str, str]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidParameterValue("'tags' must be a list of {key, value} objects.")
    tags = []
    for i, tag in enumerate(raw):
        if not isinstance(tag, dict) or not isinstance(tag.get("key"), str):
            raise InvalidParameterValue(f"tags[{i}] must be an object with a string 'key'.")
        value = tag.get("value")
        if value is not None and not isinstance(value, str):
            raise InvalidParameterValue(f"tags[{i}].value must be a string.")
        tags.append({"key": tag["key"], **({"value": value} if value is not None else {})})
    return tags
