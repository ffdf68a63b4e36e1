"""The gateway's in-memory routing table and the pure choices made on it per request.

The control plane builds a new immutable `RoutingTable` whenever replicas or configs change and
swaps it in; the hot path only reads it.
"""

from __future__ import annotations

import bisect
import enum
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from berth.errors import BerthError, InvalidState, TemporarilyUnavailable
from berth.ratelimit.rules import RateLimit


class EntityStatus(enum.StrEnum):
    READY = "ready"  # has ready replicas
    STARTING = "starting"  # no ready replica yet, or all restarting: requests wait for one
    ZERO = "zero"  # scaled to zero: a request wakes it, then waits for its replica
    FAILED = "failed"  # cannot serve until its config changes


@dataclass(frozen=True)
class EntityRoute:
    name: str
    percentage: int
    status: EntityStatus
    replicas: tuple[tuple[str, str], ...] = ()  # (replica id, address) of ready replicas
    message: str = ""
    concurrency: int = 0  # provisioned concurrency of the ready replicas: what admission lets in flight
    uid: str = ""  # the served entity's id (the inference table's served_entity_id)


@dataclass(frozen=True)
class EndpointRoute:
    name: str
    entities: tuple[EntityRoute, ...]
    creating: bool = False  # no config has gone live yet
    rate_limits: tuple[RateLimit, ...] = ()
    capture: str = ""  # the URI of the endpoint's inference table; "": requests are not logged
    cumulative: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        total = 0
        cum = []
        for e in self.entities:
            total += e.percentage
            cum.append(total)
        object.__setattr__(self, "cumulative", tuple(cum))


@dataclass(frozen=True)
class RoutingTable:
    endpoints: Mapping[str, EndpointRoute] = field(default_factory=dict)

    def to_json(self) -> list[dict[str, Any]]:
        """Plain JSON (what the gateway's other processes receive)."""
        return [
            {
                "name": ep.name,
                "creating": ep.creating,
                "rate_limits": [r.to_dict() for r in ep.rate_limits],
                "capture": ep.capture,
                "entities": [
                    {"name": e.name, "percentage": e.percentage, "status": e.status.value,
                     "replicas": [list(r) for r in e.replicas], "message": e.message,
                     "concurrency": e.concurrency, "uid": e.uid}
                    for e in ep.entities
                ],
            }
            for ep in self.endpoints.values()
        ]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> RoutingTable:
        endpoints = {}
        for ep in data:
            entities = tuple(
                EntityRoute(e["name"], e["percentage"], EntityStatus(e["status"]),
                            tuple((rid, address) for rid, address in e["replicas"]), e["message"],
                            e["concurrency"], e["uid"])
                for e in ep["entities"]
            )
            limits = tuple(RateLimit(**r) for r in ep["rate_limits"])
            endpoints[ep["name"]] = EndpointRoute(ep["name"], entities, ep["creating"], limits, ep["capture"])
        return cls(endpoints)


def choose_entity(route: EndpointRoute, draw: float) -> EntityRoute | BerthError:
    """The entity a request goes to, by traffic percentage (`draw` uniform in [0, 100)),
    or the error that answers it instead."""
    if route.creating:
        return TemporarilyUnavailable(
            f"Endpoint '{route.name}' is not ready yet: its served entities are still starting.",
            retry_after=5,
        )
    if not route.cumulative or route.cumulative[-1] <= 0:
        return InvalidState(f"Endpoint '{route.name}' routes no traffic to any served entity.")
    index = bisect.bisect_right(route.cumulative, draw * route.cumulative[-1] / 100.0)
    entity = route.entities[min(index, len(route.entities) - 1)]
    if entity.status is EntityStatus.FAILED:
        return failed(route.name, entity)
    return entity  # with no ready replica (starting, restarting, at zero) the gateway holds the request


def failed(endpoint: str, entity: EntityRoute) -> InvalidState:
    """The answer for a request to a failed entity."""
    return InvalidState(f"Endpoint '{endpoint}' cannot serve: served entity '{entity.name}' failed. "
                        f"{entity.message}".strip())


def choose_replica(
    replicas: tuple[tuple[str, str], ...],
    outstanding: Callable[[str], int],
    rand: Callable[[int], int] = random.randrange,
) -> tuple[str, str]:
    """Power of two choices: of two random replicas, the one with fewer requests outstanding."""
    n = len(replicas)
    if n == 1:
        return replicas[0]
    i = rand(n)
    j = rand(n - 1)
    if j >= i:
        j += 1
    a, b = replicas[i], replicas[j]
    return a if outstanding(a[0]) <= outstanding(b[0]) else b
