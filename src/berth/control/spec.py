"""Endpoint configurations as Databricks sends them, parsed and validated into frozen specs.

Pure functions only: a request body goes in, a spec or an `InvalidParameterValue` comes out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import Any

from berth.errors import InvalidParameterValue
from berth.observability.inference import InferenceTableConfig, parse_inference_table
from berth.registry.sources import ModelSource, PinnedModel, parse_source

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,63}\Z")  # \Z: `$` also matches before a final "\n"
MAX_SERVED_ENTITIES = 15
MAX_ENVIRONMENT_VARS = 30
MAX_PROVISIONED_CONCURRENCY = 1024
ENV_VAR_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")

# Databricks' workload sizes as concurrency ranges (min, max); with scale-to-zero the min is 0.
WORKLOAD_SIZES: dict[str, tuple[int, int]] = {"Small": (4, 4), "Medium": (8, 16), "Large": (16, 64)}
CPU_WORKLOAD_TYPES = {"CPU", "CPU_MEDIUM", "CPU_LARGE"}
GPU_WORKLOAD_TYPES = {
    "GPU_SMALL",
    "GPU_MEDIUM",
    "GPU_LARGE",
    "GPU_XLARGE",
    "GPU_XLARGE_8",
    "MULTIGPU_MEDIUM",
}


@dataclass(frozen=True)
class ServedEntitySpec:
    """One served entity: a model version, how much concurrency it gets, and its environment."""

    name: str
    entity_name: str
    entity_version: str | None = None
    workload_size: str | None = None
    workload_type: str = "CPU"
    scale_to_zero_enabled: bool = False
    min_provisioned_concurrency: int = 4
    max_provisioned_concurrency: int = 4
    environment_vars: dict[str, str] = field(default_factory=dict)
    # A remote source (registry, runs:/, artifact URI) pinned when the config was accepted; None: local.
    pinned: PinnedModel | None = None

    @property
    def source(self) -> ModelSource:
        return parse_source(self.entity_name, self.entity_version)

    @property
    def model_uri(self) -> str:
        """The model as the user named it (`models:/name/version` for a registered name and version)."""
        return self.source.uri

    def deployment_key(self) -> tuple[Any, ...]:
        """Entities with equal keys keep their replicas across a config update: a change of scaling
        bounds (workload size, provisioned concurrency, scale to zero) applies to the running ones."""
        return (
            self.name,
            self.entity_name,
            self.entity_version,
            self.pinned,  # an alias moved: a new version, so new replicas
            self.workload_type,
            tuple(sorted(self.environment_vars.items())),
        )

    def to_input_dict(self) -> dict[str, Any]:
        """The entity as a create request would give it (what the store keeps)."""
        out = self.to_dict()
        if self.entity_version is None:
            out.pop("entity_version", None)  # the pinned version, shown in views only
        if self.workload_size is not None:
            del out["min_provisioned_concurrency"], out["max_provisioned_concurrency"]
        return out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "entity_name": self.entity_name}
        if self.entity_version is not None:
            out["entity_version"] = self.entity_version
        elif self.pinned is not None and self.pinned.version is not None:
            out["entity_version"] = self.pinned.version  # what models:/name@alias resolved to
        if self.workload_size is not None:
            out["workload_size"] = self.workload_size
        out["workload_type"] = self.workload_type
        out["scale_to_zero_enabled"] = self.scale_to_zero_enabled
        out["min_provisioned_concurrency"] = self.min_provisioned_concurrency
        out["max_provisioned_concurrency"] = self.max_provisioned_concurrency
        if self.environment_vars:
            out["environment_vars"] = dict(self.environment_vars)
        return out


@dataclass(frozen=True)
class Route:
    served_model_name: str
    traffic_percentage: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "served_model_name": self.served_model_name,
            "served_entity_name": self.served_model_name,
            "traffic_percentage": self.traffic_percentage,
        }


@dataclass(frozen=True)
class EndpointConfig:
    """The served entities of an endpoint and how traffic splits between them."""

    served_entities: tuple[ServedEntitySpec, ...]
    routes: tuple[Route, ...]
    auto_capture: InferenceTableConfig | None = None  # the legacy inference table (`auto_capture_config`)

    def entity(self, name: str) -> ServedEntitySpec:
        for e in self.served_entities:
            if e.name == name:
                return e
        raise KeyError(name)

    def to_input_dict(self) -> dict[str, Any]:
        out = {
            "served_entities": [e.to_input_dict() for e in self.served_entities],
            "traffic_config": {"routes": [r.to_dict() for r in self.routes]},
        }
        if self.auto_capture is not None:
            out["auto_capture_config"] = self.auto_capture.to_dict()
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {
            "served_entities": [e.to_dict() for e in self.served_entities],
            "traffic_config": {"routes": [r.to_dict() for r in self.routes]},
        }
        if self.auto_capture is not None:
            out["auto_capture_config"] = self.auto_capture.to_dict()
        return out


@dataclass(frozen=True)
class ReplicaPlan:
    """How many replicas an entity runs and how many requests each admits."""

    replicas: int  # at the maximum provisioned concurrency (also the autoscaler's replica cap)
    per_replica_concurrency: int

    @property
    def provisioned_concurrency(self) -> int:
        return self.replicas * self.per_replica_concurrency


def validate_endpoint_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidParameterValue(
            f"Invalid endpoint name {name!r}: use 1 to 63 characters from [A-Za-z0-9_-]."
        )
    return name


def is_model_uri(entity_name: str) -> bool:
    """A URI contains ':' or '/' or starts with '.'; anything else names a registered model."""
    return ":" in entity_name or "/" in entity_name or entity_name.startswith(".")


def pin_config(config: EndpointConfig, pins: dict[str, PinnedModel]) -> EndpointConfig:
    """The config with each entity named in `pins` pinned to its remote source (the others as they are)."""
    return replace(config, served_entities=tuple(
        replace(spec, pinned=pins[spec.name]) if spec.name in pins else spec for spec in config.served_entities))


def sanitize_name(text: str) -> str:
    """Turn any text (a path's last part, say) into a valid `[A-Za-z0-9_-]` name."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")
    return (cleaned or "model")[:63]


def default_entity_name(entity_name: str, entity_version: str | None) -> str:
    source = parse_source(entity_name, entity_version)
    if source.kind in ("version", "alias", "latest"):  # lr-3, lr-champion (an alias keeps its name as it moves)
        return sanitize_name(f"{source.name}-{source.ref}")
    base = entity_name
    if is_model_uri(entity_name):
        base = PurePath(entity_name.rstrip("/")).name or "model"
    name = sanitize_name(base)
    if entity_version:
        name = sanitize_name(f"{name}-{entity_version}")
    return name


def parse_config(raw: Any) -> EndpointConfig:
    """Validate a Databricks `EndpointCoreConfigInput` (served_entities or legacy served_models)."""
    if not isinstance(raw, dict):
        raise InvalidParameterValue("'config' must be an object with 'served_entities'.")
    entities_raw = raw.get("served_entities")
    legacy = raw.get("served_models")
    if entities_raw is not None and legacy is not None:
        raise InvalidParameterValue("Specify either 'served_entities' or 'served_models', not both.")
    if entities_raw is None and legacy is not None:
        entities_raw = [_from_served_model(m) for m in _require_list(legacy, "served_models")]
    entities_raw = _require_list(entities_raw, "served_entities")
    if not entities_raw:
        raise InvalidParameterValue("'config.served_entities' must name at least one entity.")
    if len(entities_raw) > MAX_SERVED_ENTITIES:
        raise InvalidParameterValue(
            f"An endpoint serves at most {MAX_SERVED_ENTITIES} entities; got {len(entities_raw)}."
        )
    entities = tuple(_parse_entity(e, i) for i, e in enumerate(entities_raw))
    names = [e.name for e in entities]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidParameterValue(f"Served entity names must be unique; repeated: {dupes}.")
    routes = _parse_routes(raw.get("traffic_config"), names)
    capture = parse_inference_table(raw.get("auto_capture_config"), "config.auto_capture_config")
    return EndpointConfig(served_entities=entities, routes=routes, auto_capture=capture)


def _from_served_model(m: Any) -> Any:
    if not isinstance(m, dict):
        return m
    out = {k: v for k, v in m.items() if k not in ("model_name", "model_version")}
    out["entity_name"] = m.get("model_name")
    out["entity_version"] = m.get("model_version")
    return out


def _require_list(value: Any, what: str) -> list[Any]:
    if value is None:
        raise InvalidParameterValue(f"'config.{what}' is required.")
    if not isinstance(value, list):
        raise InvalidParameterValue(f"'config.{what}' must be a list.")
    return value


def _int_field(raw: dict[str, Any], key: str, where: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.isdecimal() and len(value) <= 18:  # not "²", nor past int()'s limit
            return int(value)
        raise InvalidParameterValue(f"{where}.{key} must be an integer, got {value!r}.")
    return value


def _parse_entity(raw: Any, index: int) -> ServedEntitySpec:
    where = f"served_entities[{index}]"
    if not isinstance(raw, dict):
        raise InvalidParameterValue(f"{where} must be an object.")
    for unsupported in ("external_model", "foundation_model"):
        if raw.get(unsupported) is not None:
            raise InvalidParameterValue(f"{where}.{unsupported} is not supported by Berth.")
    entity_name = raw.get("entity_name")
    if not isinstance(entity_name, str) or not entity_name.strip():
        raise InvalidParameterValue(f"{where}.entity_name is required.")
    version = raw.get("entity_version")
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, str | int):
            raise InvalidParameterValue(f"{where}.entity_version must be a string.")
        version = str(version)
    parse_source(entity_name, version, where)  # 400 for what names no model
    name = raw.get("name")
    if name is None:
        name = default_entity_name(entity_name, version)
    elif not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidParameterValue(
            f"{where}.name {name!r} is invalid: use 1 to 63 characters from [A-Za-z0-9_-]."
        )

    workload_type = raw.get("workload_type") or "CPU"
    if not isinstance(workload_type, str):
        raise InvalidParameterValue(f"{where}.workload_type must be a string, got {workload_type!r}.")
    if workload_type in GPU_WORKLOAD_TYPES:
        raise InvalidParameterValue(
            f"{where}.workload_type {workload_type} needs a GPU backend, which this server lacks."
        )
    if workload_type not in CPU_WORKLOAD_TYPES:
        raise InvalidParameterValue(f"{where}.workload_type {workload_type!r} is not a known type.")

    scale_to_zero = raw.get("scale_to_zero_enabled", False)
    if not isinstance(scale_to_zero, bool):
        raise InvalidParameterValue(f"{where}.scale_to_zero_enabled must be true or false.")

    workload_size = raw.get("workload_size")
    min_pc = _int_field(raw, "min_provisioned_concurrency", where)
    max_pc = _int_field(raw, "max_provisioned_concurrency", where)
    if workload_size is not None and (min_pc is not None or max_pc is not None):
        raise InvalidParameterValue(
            f"{where}: workload_size and min/max_provisioned_concurrency are mutually exclusive."
        )
    if workload_size is not None or (min_pc is None and max_pc is None):
        workload_size = workload_size or "Small"
        canonical = {k.lower(): k for k in WORKLOAD_SIZES}.get(str(workload_size).lower())
        if canonical is None:
            raise InvalidParameterValue(
                f"{where}.workload_size {workload_size!r} is not one of {sorted(WORKLOAD_SIZES)}."
            )
        workload_size = canonical
        min_pc, max_pc = WORKLOAD_SIZES[canonical]
        if scale_to_zero:
            min_pc = 0
    else:
        if max_pc is None:
            raise InvalidParameterValue(f"{where}.max_provisioned_concurrency is required.")
        min_pc = 0 if min_pc is None else min_pc
        if min_pc < 0 or max_pc < 1:
            raise InvalidParameterValue(
                f"{where}: provisioned concurrency needs 0 <= min and max >= 1; got {min_pc}-{max_pc}."
            )
        if min_pc > max_pc:
            raise InvalidParameterValue(
                f"{where}: min_provisioned_concurrency {min_pc} exceeds max {max_pc}."
            )
        if min_pc == 0 and not scale_to_zero:
            min_pc = min(max_pc, 1)
    if max_pc > MAX_PROVISIONED_CONCURRENCY:
        raise InvalidParameterValue(
            f"{where}.max_provisioned_concurrency is at most {MAX_PROVISIONED_CONCURRENCY}."
        )

    env = raw.get("environment_vars") or {}
    if not isinstance(env, dict):
        raise InvalidParameterValue(f"{where}.environment_vars must be an object of strings.")
    if len(env) > MAX_ENVIRONMENT_VARS:
        raise InvalidParameterValue(
            f"{where}.environment_vars has {len(env)} entries; the limit is {MAX_ENVIRONMENT_VARS}."
        )
    for key, value in env.items():
        if not ENV_VAR_NAME_RE.match(key) or not isinstance(value, str):
            raise InvalidParameterValue(
                f"{where}.environment_vars[{key!r}] must be a valid name with a string value."
            )
    return ServedEntitySpec(
        name=name,
        entity_name=entity_name,
        entity_version=version,
        workload_size=workload_size,
        workload_type=workload_type,
        scale_to_zero_enabled=scale_to_zero,
        min_provisioned_concurrency=min_pc,
        max_provisioned_concurrency=max_pc,
        environment_vars=dict(env),
    )


def _parse_routes(raw: Any, names: list[str]) -> tuple[Route, ...]:
    if raw is None or raw == {} or (isinstance(raw, dict) and not raw.get("routes")):
        if len(names) == 1:
            return (Route(names[0], 100),)
        raise InvalidParameterValue(
            "traffic_config.routes is required when an endpoint serves more than one entity."
        )
    if not isinstance(raw, dict) or not isinstance(raw.get("routes"), list):
        raise InvalidParameterValue("traffic_config must be an object with a 'routes' list.")
    routes: list[Route] = []
    seen: set[str] = set()
    for i, r in enumerate(raw["routes"]):
        if not isinstance(r, dict):
            raise InvalidParameterValue(f"traffic_config.routes[{i}] must be an object.")
        target = r.get("served_model_name", r.get("served_entity_name"))
        pct = r.get("traffic_percentage")
        if target not in names:
            raise InvalidParameterValue(
                f"traffic_config.routes[{i}] names {target!r}, which is not a served entity "
                f"(served entities: {names})."
            )
        if target in seen:
            raise InvalidParameterValue(f"traffic_config names {target!r} more than once.")
        if isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100:
            raise InvalidParameterValue(
                f"traffic_config.routes[{i}].traffic_percentage must be an integer in [0, 100]."
            )
        seen.add(target)
        routes.append(Route(target, pct))
    total = sum(r.traffic_percentage for r in routes)
    if total != 100:
        raise InvalidParameterValue(f"traffic_config percentages must sum to 100; they sum to {total}.")
    return tuple(routes)


def plan_replicas(
    max_provisioned_concurrency: int, per_replica_default: int, cores: int, cpu_bound: bool = True
) -> ReplicaPlan:
    """Replicas = ceil(provisioned ÷ per-replica concurrency), at most one per core when CPU-bound.

    When the core cap bites, each replica admits more so that provisioned concurrency still reaches
    the maximum (a micro-batching replica takes many concurrent requests).
    """
    if max_provisioned_concurrency <= 0:
        return ReplicaPlan(0, per_replica_default)
    replicas = math.ceil(max_provisioned_concurrency / per_replica_default)
    if cpu_bound:
        replicas = max(1, min(replicas, cores))
    per_replica = math.ceil(max_provisioned_concurrency / replicas)
    return ReplicaPlan(replicas, per_replica)


# `{{secrets/<scope>/<key>}}` as a whole environment_vars value (as on Databricks); resolved by
# berth.control.secrets when a replica's environment is built, never stored or shown resolved.
SECRET_NAME = r"[A-Za-z0-9_.-]{1,128}"
SECRET_REFERENCE_RE = re.compile(r"\{\{secrets/(" + SECRET_NAME + r")/(" + SECRET_NAME + r")\}\}\Z")
SECRET_MARKER = "{{secrets/"


@dataclass(frozen=True)
class SecretReference:
    """One environment variable whose value is a secret reference."""

    variable: str
    scope: str
    key: str

    def __str__(self) -> str:
        return f"{{{{secrets/{self.scope}/{self.key}}}}}"


def secret_reference(variable: str, value: str) -> SecretReference | None:
    """The reference this value is, or None for a literal value (one that never mentions `{{secrets/`)."""
    match = SECRET_REFERENCE_RE.match(value)
    return SecretReference(variable, match.group(1), match.group(2)) if match else None


def secret_references(env: dict[str, str], where: str = "environment_vars") -> list[SecretReference]:
    """Every secret reference in an entity's environment_vars; a value that mentions `{{secrets/` without
    being exactly one reference is refused (it would otherwise reach the model as literal text)."""
    found = []
    for variable, value in env.items():
        ref = secret_reference(variable, value)
        if ref is None and SECRET_MARKER in value:
            raise InvalidParameterValue(
                f"{where}[{variable!r}] must be a whole secret reference, {{{{secrets/<scope>/<key>}}}} (scope and "
                "key of 1 to 128 characters from [A-Za-z0-9_.-]), or a value without '{{secrets/'.")
        if ref is not None:
            found.append(ref)
    return found
